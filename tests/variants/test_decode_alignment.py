"""Queries fewer than keys (decode with a KV cache, chunked prefill): every variant that defines such calls
places its queries bottom-right (query i at absolute position Nk - Nq + i).

Each variant's Nq < Nk output is checked against the last rows of the same variant run causally over the whole
sequence (what generating token by token must reproduce), and against the variant's own reference; the
variants that define no decode call decline such sites with a reason.
"""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.site import AttentionSite
from attncc.variants.parse import parse_variant
from attncc.variants.base import ScoreMods
from attncc.variants.linear import LinearSpec
from attncc.variants.local import LocalSpec
from attncc.variants.topk import TopKSpec

from variant_helpers import random_qkv

N = 37  # odd, so blocks and windows end ragged
SCALE = 0.25


def _causal_tail_mask(nq: int, nk: int) -> torch.Tensor:
    """The bottom-right causal keep-mask ``[Nq, Nk]`` of the last nq queries (what transformers builds)."""
    positions = torch.arange(nk - nq, nk)[:, None]
    return torch.arange(nk)[None, :] <= positions


def _full_and_tail(spec, nq: int, seed: int = 0, **mods):
    """(the last nq rows of spec run causally over N tokens, spec on those nq queries against all N keys)."""
    q, k, v = random_qkv(2, 4, 2, N, 16, seed=seed)
    full = spec.forward(q, k, v, ScoreMods(scale=SCALE, causal=True, **mods))
    mask = None if nq == 1 else _causal_tail_mask(nq, N)  # decode: transformers passes no mask, is_causal=False
    tail = spec.forward(q[:, :, -nq:], k, v, ScoreMods(scale=SCALE, mask=mask, **mods))
    return full[:, :, -nq:], tail


LOCAL_SPECS = [
    pytest.param(LocalSpec(window=5), id="window5"),
    pytest.param(LocalSpec(window=5, sinks=3), id="window5-sinks3"),
    pytest.param(LocalSpec(left=4, right=2, sinks=1), id="left4-right2-sinks1"),
    pytest.param(LocalSpec(window=3, globals=2), id="window3-globals2"),
    pytest.param(LocalSpec(window=64), id="window-covers-all"),
]


@pytest.mark.parametrize("spec", LOCAL_SPECS)
@pytest.mark.parametrize("nq", [1, 9, 37], ids=lambda n: f"nq{n}")
def test_local_tail_equals_full_sequence_rows(spec, nq):
    want, got = _full_and_tail(spec, nq)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", LOCAL_SPECS)
def test_local_tail_matches_reference_with_bias_and_padding(spec):
    q, k, v = random_qkv(2, 4, 2, 7, 16, nk=N, seed=1)
    gen = torch.Generator().manual_seed(2)
    bias = torch.randn(2, 4, 7, N, generator=gen)
    padding = torch.ones(2, 1, 1, N, dtype=torch.bool)
    padding[1, :, :, 10:13] = False
    mods = ScoreMods(scale=SCALE, bias=bias, mask=padding & _causal_tail_mask(7, N), softcap=5.0,
                     sinks=torch.randn(4, generator=gen))
    torch.testing.assert_close(spec.forward(q, k, v, mods), spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


def test_local_decode_reads_only_window_and_sinks():
    """Keys outside the window and the sinks are never read: NaN there leaves the decode output unchanged."""
    spec = LocalSpec(window=6, sinks=2)
    q, k, v = random_qkv(1, 4, 2, 1, 16, nk=200, seed=3)
    clean = spec.forward(q, k, v, ScoreMods(scale=SCALE))
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[:, :, 2:200 - 7] = float("nan")
    poisoned_v[:, :, 2:200 - 7] = float("nan")
    got = spec.forward(q, poisoned_k, poisoned_v, ScoreMods(scale=SCALE))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, clean, rtol=0, atol=0)


@pytest.mark.parametrize("spec", [
    pytest.param(TopKSpec(block=4, density=0.5, decode=True), id="density0.5"),
    pytest.param(TopKSpec(block=4, k=2, sinks=1, local=2, decode=True), id="k2-local2"),
    pytest.param(TopKSpec(block=4, threshold=0.7, decode=True), id="threshold0.7"),
    pytest.param(TopKSpec(block=4, density=1.0, decode=True), id="density1"),
])
@pytest.mark.parametrize("nq,nk", [(1, N), (9, N), (8, 36), (4, 4)], ids=lambda x: str(x))
def test_topk_tail_matches_reference(spec, nq, nk):
    q, k, v = random_qkv(2, 4, 2, nq, 16, nk=nk, seed=4)
    mods = ScoreMods(scale=SCALE, mask=_causal_tail_mask(nq, nk)[None, None])
    torch.testing.assert_close(spec.forward(q, k, v, mods), spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [TopKSpec(block=4, density=0.5, decode=True),
                                  TopKSpec(block=4, k=3, sinks=1, local=1, decode=True)], ids=str)
def test_topk_block_aligned_chunk_equals_full_sequence_rows(spec):
    """A chunk starting at a block boundary selects what the full causal run selects for those query blocks."""
    q, k, v = random_qkv(2, 4, 2, 36, 16, seed=5)
    full = spec.forward(q, k, v, ScoreMods(scale=SCALE, causal=True))
    tail = spec.forward(q[:, :, -12:], k, v, ScoreMods(scale=SCALE, mask=_causal_tail_mask(12, 36)))
    torch.testing.assert_close(tail, full[:, :, -12:], rtol=1e-5, atol=1e-5)


def test_topk_decode_keeps_its_own_block_and_the_sink_block():
    spec = TopKSpec(block=4, k=2, sinks=1, local=1, decode=True)
    q, k, _ = random_qkv(1, 2, 2, 1, 8, nk=N, seed=6)
    blocks = spec.select(q, k, ScoreMods(scale=SCALE))
    assert blocks.shape[-2] == 1  # one query block: the block of position N - 1
    for row in blocks.reshape(-1, blocks.shape[-1]).tolist():
        assert set(row) - {-1} == {0, (N - 1) // 4}


@pytest.mark.parametrize("spec", [
    pytest.param(LinearSpec("elu", chunk=8), id="elu"),
    pytest.param(LinearSpec("taylor", chunk=8), id="taylor"),
    pytest.param(LinearSpec("elu", window=4, chunk=8, decode=True), id="elu-window4"),
    pytest.param(LinearSpec("relu", window=40, chunk=8, decode=True), id="relu-window-covers-all"),
])
def test_linear_decode_equals_causal_linear_attention_of_the_full_sequence(spec):
    """The decode step's output is the causal linear attention of the whole sequence at the last position
    (computed from the cache: the sums over all cached keys, no state carried between calls)."""
    causal_spec = LinearSpec(spec.feature_map, window=spec.window, chunk=spec.chunk)
    q, k, v = random_qkv(2, 4, 2, N, 16, seed=7)
    full = causal_spec.forward(q, k, v, ScoreMods(scale=SCALE, causal=True))
    tail = spec.forward(q[:, :, -1:], k, v, ScoreMods(scale=SCALE))
    torch.testing.assert_close(tail, full[:, :, -1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tail, spec.reference(q[:, :, -1:], k, v, ScoreMods(scale=SCALE)), rtol=1e-5, atol=1e-5)


def _decode_site(**kw) -> AttentionSite:
    fields = dict(module="m", source="sdpa", q=None, k=None, v=None, output=None, batch=1, q_heads=4, kv_heads=2,
                  q_len=1, kv_len="s0 + 1", head_dim=16, value_dim=16, dtype=torch.float32)
    fields.update(kw)
    return AttentionSite(**fields)


def test_topk_plans_decode_alignment_on_decode_sites():
    assert TopKSpec(block=4, k=2).specialize(_decode_site()) == TopKSpec(block=4, k=2, decode=True)
    assert TopKSpec(block=4, k=2).specialize(_decode_site(q_len="s0", kv_len="s0")) == TopKSpec(block=4, k=2)
    assert parse_variant(str(TopKSpec(block=4, k=2, decode=True))) == TopKSpec(block=4, k=2, decode=True)


def test_linear_window_plans_decode_alignment_on_decode_sites():
    assert LinearSpec(window=4).specialize(_decode_site()) == LinearSpec(window=4, decode=True)
    assert LinearSpec().specialize(_decode_site()) == LinearSpec()  # no window: nothing to align
    assert LinearSpec(window=4).specialize(_decode_site(q_len="s0", kv_len="s0")) == LinearSpec(window=4)
    assert parse_variant(str(LinearSpec(window=4, decode=True))) == LinearSpec(window=4, decode=True)


@pytest.mark.parametrize("variant", ["block_sparse(pattern=radial(window=2), block=16)", "neighborhood(kernel=3)"])
def test_variants_without_decode_decline_decode_sites(variant):
    supported, why = parse_variant(variant).supports(_decode_site())
    assert not supported and why


@pytest.mark.parametrize("variant", ["local(window=3, sinks=1)", "topk(block=4, density=0.5)"])
def test_supported_on_decode_sites(variant):
    supported, why = parse_variant(variant).supports(_decode_site())
    assert supported, why


def test_causal_call_with_fewer_queries_runs_exact_top_left():
    """SDPA's is_causal with Nq < Nk is top-left aligned (a static cache's prefill): the op runs the fallback."""
    q, k, v = random_qkv(1, 4, 2, 5, 16, nk=12, seed=8)
    got = attncc.attention(q, k, v, variant="local(window=2)", causal=True)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["local(window=4, sinks=1)", "topk(block=16, density=0.5, decode=True)",
                                     "block_sparse(pattern=radial(window=2), block=16)"])
def test_kernels_decline_fewer_queries_than_keys(variant):
    """The Triton kernels align queries with keys: their covers() decline a decode call with a reason, so the
    PyTorch path (which gathers only the window / selected blocks of the cache) runs it."""
    pytest.importorskip("triton")
    from attncc.codegen.registry import kernel

    spec = parse_variant(variant)
    q, k, v = random_qkv(1, 4, 2, 1, 16, nk=40)
    why = kernel(spec.name).covers(spec, q, k, v, ScoreMods(scale=SCALE))
    assert "fewer queries than keys" in why
    q, k, v = random_qkv(1, 4, 2, 40, 16)
    assert kernel(spec.name).covers(spec, q, k, v, ScoreMods(scale=SCALE)) == ""


def test_linear_kernels_decline_decode_alignment():
    pytest.importorskip("triton")
    from attncc.codegen.registry import kernel

    q, k, v = random_qkv(1, 4, 2, 1, 16, nk=40)
    assert "decode" in kernel("linear").covers(LinearSpec(window=4, decode=True), q, k, v, ScoreMods(scale=SCALE))


@pytest.mark.parametrize("variant", ["local(window=3)", "topk(block=4, density=0.5)"])
def test_causal_sites_with_fewer_queries_decline(variant):
    """SDPA's is_causal over fewer queries than keys is top-left aligned (a static cache's prefill): declined
    at plan time, and (a direct call) run on the fallback by the dispatch."""
    supported, why = parse_variant(variant).supports(_decode_site(causal=True, q_len=8, kv_len=32))
    assert not supported and "top-left" in why
