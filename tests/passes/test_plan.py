"""plan_sites on hand-built sites: what each variant makes of a site (``VariantSpec.specialize``), what runs
exact and why, without tracing a model."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from attncc.passes.plan import CHANNEL_ATTENTION, plan_sites
from attncc.policy import Policy
from attncc.site import AttentionSite
from attncc.variants.exact import ExactSpec
from attncc.variants.local import LocalSpec
from attncc.variants.neighborhood import NeighborhoodSpec
from attncc.variants.parse import parse_variant


def graph(*conv_outputs: tuple[int, ...]) -> fx.GraphModule:
    """A graph with one conv2d per shape in ``conv_outputs`` (their output shapes as example values): the
    patch embeddings the plan reads token grids from."""
    g = fx.Graph()
    x = g.placeholder("x")
    for shape in conv_outputs:
        conv = g.call_function(F.conv2d, (x, x))
        conv.meta["val"] = torch.empty(shape)
    g.output(x)
    return fx.GraphModule(torch.nn.Module(), g)


def site(**facts) -> AttentionSite:
    """A self-attention site of 64 tokens, 4 heads of 16 (no graph nodes)."""
    sizes = dict(module="layers.0.attn", source="sdpa", q=None, k=None, v=None, output=None, batch=2, q_heads=4,
                 kv_heads=4, q_len=64, kv_len=64, head_dim=16, value_dim=16, scale=0.25, dtype=torch.float32)
    return AttentionSite(**(sizes | facts))


def plan(policy: str, *sites: AttentionSite, gm: fx.GraphModule = None) -> list[AttentionSite]:
    return plan_sites(gm or graph(), list(sites), Policy(policy))


def test_a_supported_variant_runs_with_the_exact_form_as_fallback():
    (s,) = plan("local(window=8)", site(causal=True))
    assert s.variant == "local(window=8)" and s.spec == LocalSpec(window=8)
    assert s.fallback == ExactSpec() and s.reason == "policy: local(window=8)"


def test_local_within_the_models_own_window_is_the_intersection():
    (s,) = plan("local(window=4)", site(causal=True, band=(15, 0)))
    assert s.spec == LocalSpec(left=4, right=0) and s.variant == "local(left=4, right=0)"
    assert s.fallback == LocalSpec(left=15, right=0)  # the model's band is the site's exact form


def test_bidirectional_band_intersects_both_sides():
    (s,) = plan("local(left=3, right=20)", site(band=(10, 10)))
    assert s.spec == LocalSpec(left=3, right=10)


def test_a_window_wider_than_the_models_keeps_the_site_exact_as_its_band():
    (s,) = plan("local(window=64)", site(causal=True, band=(15, 0)))
    assert s.variant == "exact" and s.spec == s.fallback == LocalSpec(left=15, right=0)
    assert s.reason == "policy: local(window=64); the model's own window (16 keys) is already narrower: exact"


def test_sinks_outside_the_models_window_keep_the_site_exact():
    (s,) = plan("local(window=4, sinks=2)", site(causal=True, band=(15, 0)))
    assert s.variant == "exact" and s.spec == LocalSpec(left=15, right=0)
    assert "sinks/globals outside the model's own window cannot be expressed" in s.reason


def test_exact_on_a_banded_site_runs_the_band():
    (s,) = plan("exact", site(causal=True, band=(7, 0)))
    assert s.variant == "exact" and s.spec == LocalSpec(left=7, right=0)
    assert "already narrower" not in s.reason


def test_unsupported_keeps_the_site_exact_with_the_variants_reason():
    (s,) = plan("topk(density=0.25)", site(dropout_p=0.1))
    why = parse_variant("topk(density=0.25)").supports(site(dropout_p=0.1))[1]
    assert s.variant == "exact" and s.spec == s.fallback == ExactSpec()
    assert s.reason == f"policy: topk(density=0.25); topk does not apply ({why}): exact"


def test_a_variant_on_a_banded_site_is_declined_by_its_own_reason_first():
    (s,) = plan("topk(density=0.25)", site(causal=True, band=(15, 0)))
    assert s.variant == "exact" and s.spec == LocalSpec(left=15, right=0)
    assert "(band) mask is not applied by topk" in s.reason


def test_neighborhood_on_a_bidirectional_banded_site_is_declined_for_the_band():
    (s,) = plan("neighborhood(kernel=3, grid=(8, 8))", site(band=(4, 4)))
    assert s.variant == "exact"
    assert "the model already limits this site to a window of 5 keys" in s.reason


@pytest.mark.parametrize("policy", ["local(window=8)", "topk(density=0.5)", "linear"])
def test_channel_attention_runs_exact_only(policy):
    (s,) = plan(policy, site(axis="channels"))
    assert s.variant == "exact" and CHANNEL_ATTENTION in s.reason


def test_other_layouts_run_exact():
    (s,) = plan("local(window=8)", site(layout="bnhd"))
    assert s.variant == "exact" and "this site's layout is bnhd" in s.reason


def test_neighborhood_gets_the_grid_of_the_patch_embedding():
    gm = graph((2, 32, 8, 8))
    (s,) = plan("neighborhood(kernel=3)", site(q_len=65, kv_len=65), gm=gm)  # a class token + 8 x 8 patches
    assert (s.grid, s.grid_prefix) == ((8, 8), 1)
    assert s.spec == NeighborhoodSpec(kernel=3, grid=(8, 8), globals=1)
    assert s.variant == "neighborhood(kernel=3, grid=(8, 8), globals=1)"


def test_neighborhood_without_a_grid_keeps_the_site_exact():
    (s,) = plan("neighborhood(kernel=3)", site())
    assert s.variant == "exact" and "token grid is unknown" in s.reason


def test_none_plans_nothing():
    (s,) = plan("none", site(causal=True))
    assert s.variant == "none" and s.spec is None and s.fallback is None


def test_min_len_applies_to_the_variant_only():
    rules = [{"variant": "local(window=8)", "min_len": 32}]
    (s,) = plan_sites(graph(), [site(causal=True)], Policy(rules))
    assert s.variant == "local(window=8)" and s.min_len == 32
    (kept,) = plan_sites(graph(), [site(dropout_p=0.1)], Policy(rules))
    assert kept.variant == "exact" and kept.min_len == 0
