"""Learned sink logits (``ScoreMods.sinks``) in every variant that has a softmax: each torch path against a
dense reference that literally concatenates the sink column to the scores and drops it after the softmax
(as gpt-oss writes it), values and gradients (q, k, v, sinks); linear attention declines them.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import attncc
from attncc.errors import AttnccError
from attncc.variants.base import ScoreMods
from attncc.variants.block_sparse import (
    BigBirdPattern, BlockSparseSpec, PowerPattern, block_keep_to_elements, blocks_to_keep, mask_mod_pattern,
)
from attncc.variants.exact import ExactSpec, _sdpa_with_lse, exact_attention
from attncc.variants.linear import LinearSpec
from attncc.variants.local import LocalSpec
from attncc.variants.neighborhood import NeighborhoodSpec
from attncc.variants.parse import parse_variant
from attncc.variants.topk import TopKSpec
from variant_helpers import random_qkv

B, HQ, HKV, N, D, DV = 2, 4, 2, 40, 16, 8
BLOCK = 16
GRID, GLOBALS = (5, 7), 1  # neighborhood: 1 global token + a 5 x 7 grid


def stripes(q_idx, kv_idx):
    return (q_idx + kv_idx) % 3 != 0


SPECS = {
    # id: (spec, tokens)
    "exact": (ExactSpec(), N),
    "local": (LocalSpec(window=5), N),
    "local_sinks_globals": (LocalSpec(window=3, sinks=2, globals=1), N),
    "local_covers": (LocalSpec(window=64), N),
    "block_sparse_bigbird": (BlockSparseSpec(BigBirdPattern(window=0, globals=1, random=1, seed=2), block=BLOCK), N),
    "block_sparse_power": (BlockSparseSpec(PowerPattern(window=1, sinks=1), block=BLOCK), N),
    "block_sparse_mask_mod": (BlockSparseSpec(mask_mod_pattern(stripes), block=BLOCK), N),
    "topk": (TopKSpec(block=BLOCK, density=0.5), N),
    "neighborhood": (NeighborhoodSpec(kernel=3, grid=GRID, globals=GLOBALS), GLOBALS + math.prod(GRID)),
}

MODS = ["plain", "causal", "padding_bias_softcap"]


def keep_of(spec, q, k, mods: ScoreMods):
    """The variant's pattern as a dense ``[Nq, Nk]`` (or ``[B, Hq, Nq, Nk]``) bool mask; None: every key."""
    nq, nk = q.shape[-2], k.shape[-2]
    idx = torch.arange(nq)
    if isinstance(spec, LocalSpec):
        return spec.keep(idx[:, None], idx[None, :], mods.causal)
    if isinstance(spec, NeighborhoodSpec):
        return spec.keep(nq)
    if isinstance(spec, TopKSpec):
        blocks = blocks_to_keep(spec.select(q, k, mods), -(-nk // spec.block))
        return block_keep_to_elements(blocks, spec.block, spec.block, nq, nk)
    if isinstance(spec, BlockSparseSpec):
        if spec.name == "block_sparse" and hasattr(spec.pattern, "fn"):
            return torch.as_tensor(spec.pattern.fn(idx[:, None], torch.arange(nk)[None, :])).expand(nq, nk)
        grid = spec.pattern.block_mask(-(-nq // BLOCK), -(-nk // BLOCK), mods.causal)
        return block_keep_to_elements(grid, BLOCK, BLOCK, nq, nk)
    return None


def literal_reference(q, k, v, mods: ScoreMods, keep):
    """``softmax(cat([scores, sink column], -1))[..., :-1] @ v`` in float32, every hidden pair ``-inf``."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1).float(), v.repeat_interleave(g, dim=1).float()
    s = q.float() @ k.transpose(-2, -1) * mods.scale
    if mods.softcap > 0:
        s = mods.softcap * torch.tanh(s / mods.softcap)
    if mods.bias is not None:
        s = s + mods.bias
    hidden = torch.zeros(s.shape, dtype=torch.bool)
    if mods.mask is not None:
        hidden |= ~mods.mask
    if mods.causal:
        hidden |= torch.ones(s.shape[-2:], dtype=torch.bool).triu(1)
    if keep is not None:
        hidden |= ~keep
    s = s.masked_fill(hidden, float("-inf"))
    column = mods.sinks.float().view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
    return torch.softmax(torch.cat([s, column], dim=-1), dim=-1)[..., :-1] @ v


def make_mods(kind: str, n: int, sinks, bias=None) -> ScoreMods:
    if kind == "plain":
        return ScoreMods(scale=D ** -0.5, sinks=sinks)
    if kind == "causal":
        return ScoreMods(scale=D ** -0.5, causal=True, sinks=sinks)
    gen = torch.Generator().manual_seed(3)
    mask = torch.ones(B, 1, 1, n, dtype=torch.bool)
    mask[1, ..., n - 7:] = False  # right padding in batch row 1
    if bias is None:
        bias = torch.randn(1, HQ, n, n, generator=gen) * 0.5
    return ScoreMods(scale=D ** -0.5, softcap=5.0, bias=bias, mask=mask, sinks=sinks)


def sink_logits(requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor([-1.0, 0.5, 2.0, 4.0]).requires_grad_(requires_grad)  # one per query head


def applies(spec, mods: ScoreMods) -> bool:
    return not (isinstance(spec, NeighborhoodSpec) and mods.causal)


@pytest.mark.parametrize("mods_kind", MODS)
@pytest.mark.parametrize("name", SPECS)
def test_forward_and_reference_match_the_concatenated_sink_column(name, mods_kind):
    spec, n = SPECS[name]
    mods = make_mods(mods_kind, n, sink_logits())
    if not applies(spec, mods):
        pytest.skip("neighborhood attention is bidirectional")
    q, k, v = random_qkv(B, HQ, HKV, n, D, DV, seed=1)
    want = literal_reference(q, k, v, mods, keep_of(spec, q, k, mods))
    torch.testing.assert_close(spec.forward(q, k, v, mods), want, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(spec.reference(q, k, v, mods), want, rtol=1e-5, atol=2e-6)
    # the sinks change the result (the comparison above would notice them ignored)
    plain = ScoreMods(scale=mods.scale, causal=mods.causal, softcap=mods.softcap, bias=mods.bias, mask=mods.mask)
    assert (spec.forward(q, k, v, plain) - want).abs().max() > 1e-2


@pytest.mark.parametrize("name", SPECS)
def test_gradients_match_the_concatenated_sink_column(name):
    spec, n = SPECS[name]
    q, k, v = random_qkv(B, HQ, HKV, n, D, DV, seed=2)
    weight = torch.randn(B, HQ, n, DV, generator=torch.Generator().manual_seed(4))
    causal = not isinstance(spec, NeighborhoodSpec)
    grads = []
    for run in ("forward", "literal"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)] + [sink_logits(requires_grad=True)]
        mods = ScoreMods(scale=D ** -0.5, causal=causal, sinks=leaves[3])
        if run == "forward":
            out = spec.forward(*leaves[:3], mods)
        else:
            out = literal_reference(*leaves[:3], mods, keep_of(spec, q, k, mods))
        grads.append(torch.autograd.grad((out * weight).sum(), leaves))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- exact: the fused path


FUSED_CASES = {
    # id: (Hq, Hkv, Nq, Nk, D, Dv, causal, mask, bias)
    "plain": (4, 4, 20, 20, 16, 16, False, False, False),
    "causal_gqa": (4, 2, 20, 20, 16, 16, True, False, False),
    "padding_bias": (4, 1, 20, 20, 16, 16, False, True, True),
    "causal_padding_dv": (4, 2, 20, 20, 16, 8, True, True, False),
    "cross_nq_nk": (4, 2, 7, 23, 8, 16, True, False, True),
}


@pytest.mark.parametrize("case", FUSED_CASES.values(), ids=FUSED_CASES.keys())
def test_exact_rescales_the_fused_output_by_the_logsumexp(case):
    """Without autograd the exact path runs one fused kernel that returns each row's logsumexp and rescales
    its output by ``sigmoid(lse - sink)`` (= exp(lse) / (exp(lse) + exp(sink))): equal to the column form."""
    hq, hkv, nq, nk, d, dv, causal, with_mask, with_bias = case
    q, _, _ = random_qkv(B, hq, hkv, nq, d, dv, seed=5)
    _, k, v = random_qkv(B, hq, hkv, nk, d, dv, seed=6)
    mask = bias = None
    if with_mask:
        mask = torch.ones(B, 1, 1, nk, dtype=torch.bool)
        mask[0, ..., nk - 5:] = False
    if with_bias:
        bias = torch.randn(B, hq, nq, nk, generator=torch.Generator().manual_seed(7))
    sinks = torch.linspace(-2.0, 3.0, hq)
    assert _sdpa_with_lse(q, k, v, bias, mask, d ** -0.5, causal) is not None  # the fused path applies
    out = exact_attention(q, k, v, bias, mask, d ** -0.5, causal, sinks=sinks)
    mods = ScoreMods(scale=d ** -0.5, causal=causal, bias=bias, mask=mask, sinks=sinks)
    torch.testing.assert_close(out, literal_reference(q, k, v, mods, None), rtol=1e-5, atol=2e-6)


def test_lse_rescaling_identity():
    """The derivation on its own: ``softmax([s, c])[:-1] = softmax(s) * sigmoid(logsumexp(s) - c)``."""
    s = torch.randn(5, 9, dtype=torch.float64) * 3
    c = torch.randn(5, 1, dtype=torch.float64) * 3
    with_column = torch.softmax(torch.cat([s, c], dim=-1), dim=-1)[:, :-1]
    rescaled = torch.softmax(s, dim=-1) * torch.sigmoid(torch.logsumexp(s, dim=-1, keepdim=True) - c)
    torch.testing.assert_close(rescaled, with_column, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------- the op and linear


@pytest.mark.parametrize("variant", ["exact", "local(window=4)", "topk(block=16, density=0.5)"])
def test_the_op_carries_sinks_to_the_variant(variant):
    q, k, v = random_qkv(B, HQ, HKV, N, D, DV, seed=8)
    sinks = sink_logits()
    out = attncc.attention(q, k, v, variant=variant, causal=True, sinks=sinks)
    spec = parse_variant(variant)
    mods = ScoreMods(scale=D ** -0.5, causal=True, sinks=sinks)
    torch.testing.assert_close(out, literal_reference(q, k, v, mods, keep_of(spec, q, k, mods)), rtol=1e-5,
                               atol=2e-6)


def test_one_shared_sink_and_3d_inputs():
    """A single logit ``[1]`` applies to every head; 3-D inputs (one head) take only that form."""
    q, k, v = random_qkv(B, HQ, HQ, N, D, DV, seed=9)
    shared = torch.tensor([0.7])
    out = attncc.attention(q, k, v, sinks=shared)
    mods = ScoreMods(scale=D ** -0.5, sinks=shared.expand(HQ))
    torch.testing.assert_close(out, literal_reference(q, k, v, mods, None), rtol=1e-5, atol=2e-6)
    out3 = attncc.attention(q[:, 0], k[:, 0], v[:, 0], variant="local(window=4)", sinks=shared)
    keep = LocalSpec(window=4).keep(torch.arange(N)[:, None], torch.arange(N)[None, :], False)
    want3 = literal_reference(q[:, :1], k[:, :1], v[:, :1], ScoreMods(scale=D ** -0.5, sinks=shared), keep)
    torch.testing.assert_close(out3, want3[:, 0], rtol=1e-5, atol=2e-6)
    with pytest.raises(AttnccError, match="one learned sink logit per query head"):
        attncc.attention(q, k, v, sinks=torch.zeros(3))


def test_linear_declines_sink_logits():
    site = SimpleNamespace(dropout_p=0.0, softcap=0.0, has_bias=False, mask_residual="none", band=None,
                           segments=False, causal=False, q_len=N, kv_len=N, sink_logits=object())
    supported, why = LinearSpec().supports(site)
    assert not supported
    assert why == "learned sink logits: linear attention has no softmax denominator to add them to"
    q, k, v = random_qkv(B, HQ, HKV, N, D, DV)
    with pytest.raises(AttnccError, match="no softmax denominator"):
        LinearSpec().forward(q, k, v, ScoreMods(scale=D ** -0.5, sinks=sink_logits()))
