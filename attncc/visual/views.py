"""SiteView: what the visual report shows of one site: its row of ``cm.report()`` and its graphs before and after.

The facts (module, mask, variant, FLOPs, measured error) are the report's own ``SiteReport``, never recomputed
here; this module only adds the graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import networkx as nx

from attncc.errors import AttnccError
from attncc.report import Report, SiteReport
from attncc.report import _error_cells as error_cells  # the table's own formatting, so the page says the same
from attncc.report import _gflop as gflop
from attncc.visual.subgraph import fx_as_networkx, label_qkv, matched_subgraph, op_arguments, rewritten_subgraph


@dataclass
class SiteView:
    """One site as the visual report draws it."""

    site: SiteReport
    """The site's row of ``cm.report()``: every fact the page states."""
    before: nx.DiGraph
    """The matched subgraph, before the rewrite (``attncc.visual.subgraph.matched_subgraph``)."""
    after: Optional[nx.DiGraph] = None
    """The op and the nodes the rewrite added around it; None when the site was left alone."""
    arguments: list[tuple[str, str]] = field(default_factory=list)
    """The op call's arguments ``[(name, value as text)]``, empty when the site was left alone."""


def site_views(cm) -> tuple[Report, list[SiteView]]:
    """``(cm.report(), one SiteView per report site, in the report's order)`` for a compiled model.

    Raises AttnccError when the model has not been captured yet (no example inputs and no call).
    """
    report = cm.report()
    if not report.captured:
        raise AttnccError("nothing captured yet: call the compiled model once (or pass example_inputs)")
    views: list[SiteView] = []
    for result in cm.pass_results:
        matched_flows: dict[int, nx.DiGraph] = {}
        rewritten_names = {node.name for node in result.graph_module.graph.nodes}
        for position, site in enumerate(result.sites):
            row = report.sites[len(views)]
            if row.module != site.module:  # the report and the pass results are read in the same order
                raise AttnccError(f"report site {row.index} is {row.module!r}, the graph's is {site.module!r}")
            graph = site.output.graph
            flow = matched_flows.setdefault(id(graph), fx_as_networkx(graph))
            left_alone = site.variant == "none"
            before = matched_subgraph(site, None if left_alone else rewritten_names, flow)
            after = None
            if not left_alone:
                after = rewritten_subgraph(result.graph_module, position, {n.name for n in graph.nodes})
                if after is None:  # the report says it runs a variant: a page without its op would contradict it
                    raise AttnccError(f"site {row.index} ({row.module}) runs {row.variant}, but its graph has no "
                                      f"attncc op for it")
                label_qkv(after, site)
            views.append(SiteView(row, before, after, op_arguments(result.graph_module, position)))
    if len(views) != len(report.sites):
        raise AttnccError(f"the report has {len(report.sites)} sites, the graphs {len(views)}")
    return report, views


def site_heading(site: SiteReport) -> str:
    """``#0 blocks.0.attn: local(window=16) | `` and the site's ``site_facts``."""
    variant = site.variant + (f" from {site.min_len} keys" if site.min_len else "")
    return f"#{site.index} {site.module or '<root>'}: {variant} | {site_facts(site)}"


def site_facts(site: SiteReport) -> str:
    """One line of a site's facts, formatted as the report's table formats them:
    ``self, mask causal | attn GFLOP 0.00419 -> 0.000975 (4.3x) | rel. error 5.36e-01, cosine 0.87827``"""
    ratio = f" ({site.saving:.1f}x)" if site.saving is not None else ""
    rel_l2, cosine = error_cells(site)
    return (f"{site.kind}, mask {site.mask}, heads q/kv {site.q_heads}/{site.kv_heads}, len q/kv "
            f"{site.q_len}/{site.kv_len} | attn GFLOP {gflop(site.flops_before)} -> {gflop(site.flops_after)}{ratio} | "
            f"rel. error {rel_l2}, cosine {cosine}")
