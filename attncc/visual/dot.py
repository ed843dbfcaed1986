"""DOT text of the visual report (``attncc inspect MODEL --format dot | dot -Tsvg``): one cluster per site holding its
matched subgraph, the attncc op that replaced it, and a dashed edge from the one to the other."""

from __future__ import annotations

import networkx as nx

from attncc.report import Report
from attncc.visual.svg import ROLE_STYLE, box_text
from attncc.visual.views import SiteView, site_heading


def report_dot(report: Report, views: list[SiteView], title: str) -> str:
    """The whole report as one ``digraph``: a ``cluster_site<N>`` subgraph per site, near-misses in the label."""
    lines = ["digraph attncc {",
             f"  graph [label={_quote(_graph_label(report, title))}, labelloc=t, labeljust=l, fontname=Helvetica];",
             '  node [shape=box, style="rounded,filled", fontname=Courier, fontsize=10];',
             '  edge [color="#6b7280"];']
    for view in views:
        lines.extend(_site_cluster(view))
    lines.append("}")
    return "\n".join(lines) + "\n"


def _graph_label(report: Report, title: str) -> str:
    text = f"{title}: {len(report.sites)} site(s), policy {report.policy!r}, {report.frontend}, {report.graphs} graph(s)"
    for rejected in report.rejected:
        text += f"\nnot rewritten: {rejected.module or '<root>'}: {rejected.reason}"
    return text


def _site_cluster(view: SiteView) -> list[str]:
    index = view.site.index
    lines = [f"  subgraph cluster_site{index} {{", f"    label={_quote(site_heading(view.site))};"]
    lines.extend(_graph_lines(view.before, f"s{index}.before."))
    if view.after is not None:
        lines.extend(_graph_lines(view.after, f"s{index}.after."))
        output = _quote(f"s{index}.before.{view.before.graph['output']}")
        op = _quote(f"s{index}.after.{view.after.graph['op']}")
        lines.append(f'    {output} -> {op} [style=dashed, color="#15803d", label="rewritten as"];')
    lines.append("  }")
    return lines


def _graph_lines(graph: nx.DiGraph, prefix: str) -> list[str]:
    lines = []
    for node, data in graph.nodes(data=True):
        fill, stroke, dashed = ROLE_STYLE[data["role"]]
        style = '"rounded,filled,dashed"' if dashed else '"rounded,filled"'
        label, shape = box_text(graph, node)
        lines.append(f"    {_quote(prefix + node)} [label={_quote(label + chr(10) + shape)}, "
                     f'fillcolor="{fill}", color="{stroke}", style={style}, tooltip={_quote(data["detail"])}];')
    for source, target in graph.edges:
        lines.append(f"    {_quote(prefix + source)} -> {_quote(prefix + target)};")
    return lines


def _quote(text: str) -> str:
    """A DOT quoted string (backslashes and quotes escaped, newlines as ``\\n``)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
