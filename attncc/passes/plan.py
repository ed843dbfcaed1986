"""Plan: give every detected site the variant spec its op will run, as the policy says.

For each site the policy's first matching rule names a variant; the plan fills in what the site shows (the
token grid of a ViT for ``neighborhood``, the model's own sliding window for ``local``), asks the variant
whether it supports the site and, where it does not, keeps the site exact with the variant's reason. A site
whose model mask is a sliding-window band runs ``exact`` as the band (``local(left=W-1, right=0)``: exact,
and it skips the blocks outside the window).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from attncc.passes import graph_ops as g
from attncc.policy import Policy
from attncc.site import AttentionSite
from attncc.variants.exact import ExactSpec
from attncc.variants.local import LocalSpec
from attncc.variants.neighborhood import NeighborhoodSpec
from attncc.variants.parse import parse_variant

MAX_PREFIX_TOKENS = 16
"""At most this many tokens before a ViT's patch grid (class, distillation and register tokens)."""

CHANNEL_ATTENTION = "channel attention (softmax over the feature axis): only exact applies"
"""Why no approximate variant runs on a site with ``axis == 'channels'``: their windows, blocks and top-k
choices are about token positions, and its 'keys' are feature channels."""


def plan_sites(gm: fx.GraphModule, sites: list[AttentionSite], policy: Policy) -> list[AttentionSite]:
    """Set ``variant``, ``reason``, ``spec``, ``fallback`` and ``min_len`` on each site (in place)."""
    grids = patch_grids(gm)
    for site in sites:
        site.grid, site.grid_prefix = _grid_for(site, grids)
        decision = policy.decide(site)
        site.variant, site.reason, site.min_len = decision.variant, decision.reason, 0
        if decision.variant == "none":
            site.spec = site.fallback = None
            continue
        exact = exact_spec(site)
        asked = parse_variant(decision.variant)
        spec = _specialize(asked, site)
        if isinstance(spec, ExactSpec) or spec == exact:
            site.spec, site.fallback = exact, exact
            if not isinstance(asked, ExactSpec):
                site.variant = "exact"
                site.reason += f"; the model's own window ({site.band[0] + 1} keys) is already narrower: exact"
            continue
        packed = _packed_documents(site) and not isinstance(spec, str)
        # Documents the model computes from its inputs (HF packs sequences by position_ids): the variant runs
        # while every row holds one document, and rows packed with several run exact (decided per call).
        checked = dataclasses.replace(site, segments=False) if packed else site
        supported, why = (False, spec) if isinstance(spec, str) else spec.supports(checked)
        if supported and site.axis == "channels":
            supported, why = False, CHANNEL_ATTENTION
        if supported and site.layout not in ("bhnd", "(bh)nd"):
            supported, why = False, f"it runs on [B, H, N, D] or [B, N, D] tensors, this site's layout is {site.layout}"
        if supported and site.band is not None and not isinstance(spec, LocalSpec):
            supported, why = False, f"the model already limits this site to a window of {site.band[0] + 1} keys"
        if not supported:
            site.variant, site.spec, site.fallback = "exact", exact, exact
            site.reason = f"{decision.reason}; {asked.name} does not apply ({why}): exact"
            continue
        site.spec, site.fallback, site.min_len = spec, exact, decision.min_len
        site.variant = str(spec)
        if packed:
            site.reason += "; batches packed with several documents run exact"
    return sites


def _packed_documents(site: AttentionSite) -> bool:
    """True when the site's only segment mask is document ids computed from the inputs (``-inf`` between
    documents), as transformers builds for packed sequences."""
    return bool(site.segments) and isinstance(site.segment_labels, fx.Node) and site.segment_fill == float("-inf")


def exact_spec(site: AttentionSite):
    """The spec that runs ``site`` exactly: its model's sliding-window band where it has one."""
    if site.band is not None:
        return LocalSpec(left=site.band[0], right=site.band[1])
    return ExactSpec()


def _specialize(spec, site: AttentionSite):
    """Fill in what the variant needs from the site: a ViT's grid; the intersection with a model window.

    Returns the spec to run, or a string: why the variant cannot run on this site.
    """
    if isinstance(spec, NeighborhoodSpec) and spec.grid is None and site.grid is not None:
        return dataclasses.replace(spec, grid=site.grid, globals=site.grid_prefix)
    if isinstance(spec, LocalSpec) and site.band is not None:
        own_left, _ = spec.bounds(site.causal)
        if own_left >= site.band[0]:
            return exact_spec(site)  # the model's window is already narrower: nothing to add
        if spec.sinks or spec.globals:
            # the model's mask hides sinks outside its window; a single band cannot say that
            return "sinks/globals outside the model's own window cannot be expressed"
        return spec.intersect_band(*site.band, causal=site.causal)
    return spec


def _grid_for(site: AttentionSite, grids: list[tuple[int, ...]]) -> tuple[Optional[tuple[int, ...]], int]:
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
