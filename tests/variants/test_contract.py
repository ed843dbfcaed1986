"""The variant contract, checked for every registered family (``attncc.variants.variant_classes()``) on the
specs its ``examples()`` gives: forward equals reference (and so do their gradients) under every score
modification ``supports`` accepts, the canonical text parses back, ``supports`` explains what it declines,
the cost is at most dense attention's, and the family's degenerate limit (``exact_limit``) is exact.

A new family file gets all of this by registering its spec and giving ``examples()`` / ``exact_limit()``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from attncc.site import AttentionSite
from attncc.variants import variant_classes
from attncc.variants.base import EXAMPLE_TOKENS, ScoreMods
from attncc.variants.exact import ExactSpec, dense_attention_cost
from attncc.variants.parse import parse_variant
from variant_helpers import random_qkv

N = EXAMPLE_TOKENS
B, HQ, HKV, D = 2, 4, 2, 8

FAMILIES = list(variant_classes().values())
EXAMPLES = [spec for family in FAMILIES for spec in family.examples()]
APPROXIMATE = [family for family in FAMILIES if not family.exact]


def site_of(**facts) -> AttentionSite:
    """A detected self-attention site over the test sizes (no graph nodes: only what ``supports`` reads)."""
    return AttentionSite(module="layer", source="test", q=None, k=None, v=None, output=None, batch=B, q_heads=HQ,
                         kv_heads=HKV, q_len=N, kv_len=N, head_dim=D, value_dim=D, scale=D ** -0.5,
                         dtype=torch.float32, **facts)


def padding_mask() -> torch.Tensor:
    """``[B, 1, 1, N]``: the second sequence has its last 4 keys padded."""
    keep = torch.ones(B, 1, 1, N, dtype=torch.bool)
    keep[1, ..., -4:] = False
    return keep


def bias() -> torch.Tensor:
    return torch.randn(1, HQ, N, N, generator=torch.Generator().manual_seed(7))


MODS = {
    # name: (site facts that ask for it, the ScoreMods fields)
    "plain": ({}, {}),
    "causal": ({"causal": True}, {"causal": True}),
    "padding": ({"mask_residual": "padding"}, {"mask": padding_mask}),
    "causal+padding": ({"causal": True, "mask_residual": "padding"}, {"causal": True, "mask": padding_mask}),
    "bias+padding": ({"has_bias": True, "mask_residual": "padding"}, {"bias": bias, "mask": padding_mask}),
    "softcap": ({"softcap": 5.0}, {"softcap": 5.0}),
}


GRADIENT_MODS = ("causal+padding", "bias+padding")
"""Gradients are compared at these two (the other entries of MODS leave parts of them out): every family
takes at least one."""


def accepted_mods(spec, names=tuple(MODS)):
    """``(name, ScoreMods)`` for each entry of MODS (of ``names``) whose site ``spec.supports``."""
    for name in names:
        facts, fields = MODS[name]
        if spec.supports(site_of(**facts))[0]:
            made = {key: value() if callable(value) else value for key, value in fields.items()}
            yield name, ScoreMods(scale=D ** -0.5, **made)


def spec_id(spec) -> str:
    return str(spec)


@pytest.mark.parametrize("spec", EXAMPLES, ids=spec_id)
def test_forward_equals_reference(spec):
    q, k, v = random_qkv(B, HQ, HKV, N, D, seed=1)
    tried = []
    for name, mods in accepted_mods(spec):
        torch.testing.assert_close(spec.forward(q, k, v, mods), spec.reference(q, k, v, mods), rtol=1e-4,
                                   atol=1e-5, msg=lambda m: f"{spec} with {name}: {m}")
        tried.append(name)
    assert "plain" in tried or "causal" in tried, f"{spec} supports neither a plain nor a causal site"


@pytest.mark.parametrize("spec", EXAMPLES, ids=spec_id)
def test_gradients_through_forward_equal_the_reference(spec):
    q, k, v = random_qkv(B, HQ, HKV, N, D, seed=2)
    weight = torch.randn(B, HQ, N, D, generator=torch.Generator().manual_seed(3))
    tried = []
    for name, mods in accepted_mods(spec, GRADIENT_MODS):
        tried.append(name)
        grads = []
        for fn in (spec.forward, spec.reference):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = fn(*leaves, mods)
            grads.append(torch.autograd.grad((out * weight).sum(), leaves))
        for got, want, what in zip(*grads, "qkv"):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{spec} with {name}, d{what}: {m}")
    assert tried, f"{spec} supports none of {GRADIENT_MODS}"


@pytest.mark.parametrize("spec", EXAMPLES, ids=spec_id)
def test_canonical_text_parses_back(spec):
    assert parse_variant(str(spec)) == spec


@pytest.mark.parametrize("family", APPROXIMATE, ids=lambda family: family.name)
def test_supports_declines_dropout_with_a_reason(family):
    for spec in family.examples():
        supported, why = spec.supports(site_of(dropout_p=0.1))
        assert supported is False and isinstance(why, str) and why.strip(), (spec, why)


@pytest.mark.parametrize("spec", EXAMPLES, ids=spec_id)
@pytest.mark.parametrize("causal", [False, True])
def test_cost_is_at_most_dense_at_long_sequences(spec, causal):
    if getattr(spec, "threshold", None) is not None and not causal:
        pytest.xfail("topk(threshold=...) keeps a data-dependent number of blocks: its cost is the dense bound "
                     "plus the block selection")
    long_site = replace(site_of(causal=causal), q_len=16384, kv_len=16384, head_dim=64, value_dim=64)
    assert spec.cost(long_site)["flops"] <= dense_attention_cost(long_site)["flops"], spec


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.exact_limit(N) is not None], ids=lambda f: f.name)
def test_degenerate_limit_is_exact(family):
    spec = family.exact_limit(N)
    q, k, v = random_qkv(B, HQ, HKV, N, D, seed=4)
    tried = []
    for name, mods in accepted_mods(spec):
        torch.testing.assert_close(spec.forward(q, k, v, mods), ExactSpec().reference(q, k, v, mods), rtol=1e-4,
                                   atol=1e-5, msg=lambda m: f"{spec} with {name}: {m}")
        tried.append(name)
    assert tried, f"{spec} supports none of the test sites"


def test_every_family_gives_examples():
    for family in FAMILIES:
        assert family.examples(), f"{family.name} gives no examples() for the contract tests"
