"""The pass pipeline: canonicalize -> detect -> analyze masks -> plan (policy) -> rewrite (-> verify, in tests).

Each pass is pure: it returns a new graph or new sites (frozen records, ``attncc.site``) and leaves its input
untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from attncc.measure import SiteError
from attncc.module_names import ModuleNames
from attncc.passes.canonicalize import canonicalize
from attncc.passes.detect import detect_sites
from attncc.passes.masks import analyze_masks
from attncc.passes.plan import plan_sites
from attncc.passes.rewrite import rewrite_sites
from attncc.passes.verify import verify_graph
from attncc.policy import Policy
from attncc.site import AttentionSite, RejectedSite


@dataclass
class PassResult:
    """What the pipeline made of one captured graph."""

    graph_module: fx.GraphModule
    sites: list[AttentionSite] = field(default_factory=list)
    rejected: list[RejectedSite] = field(default_factory=list)
    errors: Optional[dict[int, SiteError]] = None
    """Measured error per site position, filled by the first run of the graph (None until then)."""


def run_pipeline(gm: fx.GraphModule, policy: Policy, graph_index: int = 0, verify: bool = False,
                 modules: Optional[ModuleNames] = None) -> PassResult:
    """canonicalize -> detect -> analyze masks -> plan -> rewrite on one graph.

    ``modules`` (the compiled model's names) gives each site its layer number; the frontend has already named
    the nodes' modules by identity (``ModuleNames.annotate``).
    """
    canonical = canonicalize(gm)
    sites, rejected = detect_sites(canonical, graph_index)
    if modules is not None:
        sites = [site.replace(layer=modules.layer_of(site.module)) for site in sites]
    sites = analyze_masks(canonical, sites)
    sites = plan_sites(canonical, sites, policy)
    # policy 'none' runs the captured graph exactly as it was; detection only reports
    rewritten, sites = rewrite_sites(canonical, sites) if policy.rewrites else (gm, sites)
    if verify:
        verify_graph(rewritten)
    return PassResult(rewritten, sites, rejected)


__all__ = ["PassResult", "analyze_masks", "canonicalize", "detect_sites", "plan_sites", "rewrite_sites",
           "run_pipeline", "verify_graph"]
