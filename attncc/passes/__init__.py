"""The pass pipeline: canonicalize -> detect -> plan (policy) -> rewrite (-> verify, in tests).

Each pass is one file and pure: it returns a new graph or a list of sites and leaves its input untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from attncc.passes.canonicalize import canonicalize
from attncc.passes.detect import detect_sites
from attncc.passes.rewrite import rewrite_sites
from attncc.passes.verify import verify_graph
from attncc.policy import Policy
from attncc.site import AttentionSite, RejectedSite

PIPELINE = ("canonicalize", "detect", "plan", "rewrite")


@dataclass
class PassResult:
    """What the pipeline made of one captured graph."""

    graph_module: fx.GraphModule
    sites: list[AttentionSite] = field(default_factory=list)
    rejected: list[RejectedSite] = field(default_factory=list)


def plan_sites(sites: list[AttentionSite], policy: Policy) -> list[AttentionSite]:
    """Set ``variant`` and ``reason`` on each site as the policy says (in place; returns the list)."""
    for site in sites:
        site.variant, site.reason = policy.choose(site)
    return sites


def run_pipeline(gm: fx.GraphModule, policy: Policy, graph_index: int = 0, verify: bool = False) -> PassResult:
    """canonicalize -> detect -> plan -> rewrite on one graph."""
    canonical = canonicalize(gm)
    sites, rejected = detect_sites(canonical, graph_index)
    plan_sites(sites, policy)
    # policy 'none' runs the captured graph exactly as it was; detection only reports
    rewritten = rewrite_sites(canonical, sites) if policy.rewrites else gm
    if verify:
        verify_graph(rewritten)
    return PassResult(rewritten, sites, rejected)


__all__ = ["PIPELINE", "PassResult", "canonicalize", "detect_sites", "plan_sites", "rewrite_sites", "run_pipeline",
           "verify_graph"]
