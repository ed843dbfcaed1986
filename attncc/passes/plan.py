"""Plan: give every detected site the variant spec its op will run, as the policy says.

For each site the policy's first matching rule names a variant; the variant fills in what the site shows
(``VariantSpec.specialize``: the token grid of a ViT for ``neighborhood``, the model's own sliding window for
``local``), says whether it supports the site and, where it does not, the site stays exact with the variant's
reason. The plan names no variant: what a family does with a site is the family's (``attncc.variants``). A site
whose model mask is a sliding-window band runs ``exact`` as the band (``local(left=W-1, right=0)``: exact,
and it skips the blocks outside the window).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from attncc.passes import graph_ops as g
from attncc.policy import Policy
from attncc.site import AttentionSite, SitePlan
from attncc.variants import VariantSpec, exact_spec
from attncc.variants.parse import parse_variant

MAX_PREFIX_TOKENS = 16
"""At most this many tokens before a ViT's patch grid (class, distillation and register tokens)."""

CHANNEL_ATTENTION = "channel attention (softmax over the feature axis): only exact applies"
"""Why no approximate variant runs on a site with ``axis == 'channels'``: their windows, blocks and top-k
choices are about token positions, and its 'keys' are feature channels."""


def plan_sites(gm: fx.GraphModule, sites: list[AttentionSite], policy: Policy) -> list[AttentionSite]:
    """The sites with the plan's decision (``site.with_plan``: variant, reason, spec, fallback, min_len, grid);
    the given ones are unchanged."""
    grids = patch_grids(gm)
    return [site.with_plan(plan_site(site, policy, grids)) for site in sites]


def plan_site(site: AttentionSite, policy: Policy, grids: list[tuple[int, ...]] = ()) -> SitePlan:
    """What runs at ``site``: the variant of the policy's first matching rule, made to fit the site, or exact with
    the variant's reason where it does not apply; ``grids``: the token grids of the graph (``patch_grids``)."""
    grid, grid_prefix = _grid_for(site, grids)
    site = site.replace(grid=grid, grid_prefix=grid_prefix)
    decision = policy.decide(site)
    located = dict(grid=grid, grid_prefix=grid_prefix)
    if decision.variant == "none":
        return SitePlan("none", decision.reason, **located)
    exact = exact_spec(site)
    asked = parse_variant(decision.variant)
    # Documents the model computes from its inputs (HF packs sequences by position_ids): the variant runs
    # while every row holds one document, and rows packed with several run exact (decided per call).
    packed = _packed_documents(site)
    checked = site.replace(segments=False) if packed else site
    spec = asked.specialize(checked)
    if spec == exact:
        reason = decision.reason if asked.exact else f"{decision.reason}; " + (
            f"the model's own window ({site.band[0] + 1} keys) is already narrower: exact" if site.band is not None
            else "every head runs exact: exact")  # a per-head spec whose groups are all exact
        return SitePlan(decision.variant if asked.exact else "exact", reason, exact, exact, **located)
    why = spec if isinstance(spec, str) else _unsupported(spec, checked)
    if why:
        return SitePlan("exact", f"{decision.reason}; {asked.name} does not apply ({why}): exact", exact, exact,
                        declined=asked.name, **located)
    reason = decision.reason + ("; batches packed with several documents run exact" if packed else "")
    return SitePlan(str(spec), reason, spec, exact, decision.min_len, **located)


def _unsupported(spec: VariantSpec, site: AttentionSite) -> str:
    """Why ``spec`` cannot replace ``site`` ('' when it can): the variant's own reason, or what no variant
    but exact runs (channel attention, a layout other than ``[B, H, N, D]`` / ``[B, N, D]``)."""
    supported, why = spec.supports(site)
    if not supported:
        return why
    if site.axis == "channels":
        return CHANNEL_ATTENTION
    if site.layout not in ("bhnd", "(bh)nd"):
        return f"it runs on [B, H, N, D] or [B, N, D] tensors, this site's layout is {site.layout}"
    return ""


def _packed_documents(site: AttentionSite) -> bool:
    """True when the site's only segment mask is document ids computed from the inputs (``-inf`` between
    documents), as transformers builds for packed sequences."""
    return bool(site.segments) and isinstance(site.segment_labels, fx.Node) and site.segment_fill == float("-inf")


def _grid_for(site: AttentionSite, grids) -> tuple[Optional[tuple[int, ...]], int]:
    if site.kind != "self" or site.axis != "tokens" or not isinstance(site.q_len, int):
        return None, 0
    for grid in grids:
        tokens = 1
        for size in grid:
            tokens *= size
        prefix = site.q_len - tokens
        if 0 <= prefix <= MAX_PREFIX_TOKENS:
            return grid, prefix
    return None, 0


def patch_grids(gm: fx.GraphModule) -> list[tuple[int, ...]]:
    """Spatial sizes of the convolutions in the graph (a ViT's patch embedding gives its token grid)."""
    grids = []
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        is_conv = (node.op == "call_function" and node.target in (F.conv2d, F.conv3d, torch.conv2d, torch.conv3d)) or (
            node.op == "call_module" and isinstance(modules.get(node.target), (torch.nn.Conv2d, torch.nn.Conv3d)))
        shape = g.shape(node) if is_conv else None
        if shape is not None and len(shape) in (4, 5) and all(isinstance(s, int) for s in shape[2:]):
            grid = tuple(shape[2:])
            if grid not in grids:
                grids.append(grid)
    return grids
