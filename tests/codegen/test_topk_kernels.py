"""Top-k block selection kernels: pooling against the PyTorch pooling, block masks against ``_block_any``, the
device layout against ``TopKSpec.select`` (same key-block set per row, and ``partial`` exactly where a block is
not entirely visible), and top-k attention end to end against the spec's dense oracle.

Runs in Triton's CPU interpreter without a GPU (small sizes); the ``gpu`` tests repeat it at real sizes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from attncc.codegen.topk import mask_blocks, pool_blocks, topk_attention, topk_layout
from attncc.errors import AttnccError
from attncc.variants.base import ScoreMods
from attncc.variants.exact import ExactSpec
from attncc.variants.topk import TopKSpec, _block_any, _pool

# The shared input/error helpers live beside the variant tests (pytest puts only this folder on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "variants"))
from variant_helpers import random_qkv, rel_rms  # noqa: E402

HAVE_SOFTMAX = importlib.util.find_spec("attncc.codegen.softmax") is not None
needs_softmax = pytest.mark.skipif(not HAVE_SOFTMAX, reason="attncc.codegen.softmax (the attention kernel) is missing")


def row_sets(blocks: torch.Tensor) -> list[set[int]]:
    """``[..., nQB, K]`` block lists -> one set of kept key blocks per row."""
    return [set(int(x) for x in row if x >= 0) for row in blocks.reshape(-1, blocks.shape[-1]).cpu()]


def expected_partial(layout, causal: bool, mask, shape) -> torch.Tensor:
    """Brute force: an entry is partial unless every pair of its real query rows and its key block (keys past
    Nk count as hidden) is visible under causality and the mask."""
    b, hq, nq, nk = shape
    bs = layout.block_q
    nkb = layout.n_k_blocks
    visible = torch.ones(b, hq, nq, nkb * bs, dtype=torch.bool)
    visible[..., nk:] = False
    if causal:
        visible &= torch.arange(nkb * bs)[None, :] <= torch.arange(nq)[:, None]
    if mask is not None:
        visible[..., :nk] &= mask.cpu().expand(b, hq, nq, nk)
    kv = layout.kv_blocks.cpu()
    out = torch.zeros_like(kv, dtype=torch.bool)
    for idx in (kv >= 0).nonzero().tolist():
        bi, hi, qb, slot = idx
        kb = int(kv[bi, hi, qb, slot])
        tile = visible[bi, hi, qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs]
        out[bi, hi, qb, slot] = not bool(tile.all())
    return out


def check_layout(spec: TopKSpec, q, k, mods: ScoreMods):
    layout = topk_layout(spec, q, k, mods)
    expected = spec.select(q, k, mods)
    assert layout.kv_blocks.shape[:3] == expected.shape[:3]
    assert row_sets(layout.kv_blocks) == row_sets(expected)
    kv = layout.kv_blocks.cpu()
    # ascending entries, -1 padding only at the end of each row
    kept = kv >= 0
    assert torch.equal(kept, kept.cummin(-1).values)
    assert bool(((kv[..., 1:] > kv[..., :-1]) | ~kept[..., 1:]).all())
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    assert torch.equal(layout.partial.cpu() & kept, expected_partial(layout, mods.causal, mods.mask, shape))
    assert not bool((layout.partial.cpu() & ~kept).any())
    return layout


# ------------------------------------------------------------------------------------------------ pooling


@pytest.mark.parametrize("n, d, dtype", [
    pytest.param(1, 16, torch.float32, id="n1-d16-fp32"),
    pytest.param(63, 48, torch.bfloat16, id="n63-d48-bf16"),
    pytest.param(100, 80, torch.float16, id="n100-d80-fp16"),
])
def test_pool_blocks_matches_torch_pooling(device, n, d, dtype):
    x = torch.randn(2, 3, n, d).to(dtype).to(device)
    torch.testing.assert_close(pool_blocks(x, 16), _pool(x, 16), atol=1e-6, rtol=1e-5)


def test_pool_blocks_reads_strided_inputs_and_odd_blocks(device):
    x = torch.randn(2, 100, 3, 48, device=device).transpose(1, 2)  # [B, H, N, D] view of [B, N, H, D]
    torch.testing.assert_close(pool_blocks(x, 16), _pool(x, 16), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pool_blocks(x, 24), _pool(x, 24), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mask_shape", [
    pytest.param((2, 1, 1, 100), id="key-padding"),
    pytest.param((2, 3, 63, 100), id="full"),
    pytest.param((63, 1), id="query-only"),
])
def test_mask_blocks_any_matches_torch(device, mask_shape):
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(mask_shape, generator=gen) > 0.97
    any_, all_ = mask_blocks(mask.to(device), 16, (2, 3, 63, 100))
    assert torch.equal(any_.cpu(), _block_any(mask, 16, 63, 100))
    assert torch.equal(all_.cpu(), ~_block_any(~mask, 16, 63, 100))


# -------------------------------------------------------------------------------------------- the layout


LAYOUT_CASES = [
    # id, spec, causal, (B, Hq, Hkv, N, D), dtype
    ("k3-causal-gqa-n100-d48-fp32", TopKSpec(block=16, k=3), True, (1, 4, 1, 100, 48), torch.float32),
    ("k2-bidir-n63-d80-bf16", TopKSpec(block=16, k=2), False, (2, 2, 2, 63, 80), torch.bfloat16),
    ("density-causal-gqa-n100-d16-bf16", TopKSpec(block=16, density=0.25), True, (1, 4, 1, 100, 16),
     torch.bfloat16),
    ("density-bidir-nosinks-nolocal-n100-d48", TopKSpec(block=16, density=0.5, sinks=0, local=0), False,
     (2, 2, 1, 100, 48), torch.float32),
    ("threshold0.9-causal-gqa-n100-d80", TopKSpec(block=16, threshold=0.9), True, (1, 4, 1, 100, 80),
     torch.float32),
    ("threshold0.5-bidir-n63-d16-bf16", TopKSpec(block=16, threshold=0.5, sinks=0), False, (2, 2, 2, 63, 16),
     torch.bfloat16),
    ("sinks2-local2-k4-causal-n100-d48", TopKSpec(block=16, k=4, sinks=2, local=2), True, (1, 2, 2, 100, 48),
     torch.float32),
    ("forced-over-budget-k1-bidir", TopKSpec(block=16, k=1, sinks=2, local=2), False, (1, 2, 1, 100, 16),
     torch.float32),
    ("n1-k1-causal", TopKSpec(block=16, k=1), True, (1, 4, 1, 1, 48), torch.float32),
    ("n1-threshold-bidir-bf16", TopKSpec(block=16, threshold=0.5), False, (1, 2, 2, 1, 16), torch.bfloat16),
    ("block32-density-causal-n100-d80", TopKSpec(block=32, density=0.5), True, (1, 2, 1, 100, 80),
     torch.float32),
]


@pytest.mark.parametrize("spec, causal, sizes, dtype", [pytest.param(*c[1:], id=c[0]) for c in LAYOUT_CASES])
def test_layout_matches_select(device, spec, causal, sizes, dtype):
    b, hq, hkv, n, d = sizes
    q, k, _ = random_qkv(b, hq, hkv, n, d, dtype=dtype, seed=n + d)
    check_layout(spec, q.to(device), k.to(device), ScoreMods(scale=d ** -0.5, causal=causal))


@pytest.mark.parametrize("spec, causal", [
    pytest.param(TopKSpec(block=16, k=2), True, id="k2-causal"),
    pytest.param(TopKSpec(block=16, threshold=0.8, sinks=0), False, id="threshold-bidir"),
])
def test_layout_with_key_padding_mask(device, spec, causal):
    q, k, _ = random_qkv(2, 2, 1, 100, 48, seed=3)
    lengths = torch.tensor([100, 37])
    mask = (torch.arange(100)[None, :] < lengths[:, None]).view(2, 1, 1, 100)
    mods = ScoreMods(scale=48 ** -0.5, causal=causal, mask=mask.to(device))
    check_layout(spec, q.to(device), k.to(device), mods)


def test_layout_with_full_mask_hiding_whole_blocks(device):
    q, k, _ = random_qkv(1, 2, 1, 63, 16, seed=4)
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(1, 2, 63, 63, generator=gen) > 0.3
    mask[..., 16:32, :] = False  # query block 1 sees nothing: an empty row
    mask[..., 32:, 48:] = False  # key block 3 is hidden from query blocks 2 and 3
    mods = ScoreMods(scale=0.25, mask=mask.to(device))
    layout = check_layout(TopKSpec(block=16, k=2), q.to(device), k.to(device), mods)
    assert not bool((layout.kv_blocks[:, :, 1] >= 0).any())


def test_layout_with_expanded_mask_view(device):
    q, k, _ = random_qkv(2, 2, 2, 63, 16, seed=6)
    pad = torch.arange(63)[None, :] < torch.tensor([63, 20])[:, None]
    mask = pad.view(2, 1, 1, 63).expand(2, 2, 63, 63)  # stride-0 dims: read once
    check_layout(TopKSpec(block=16, k=2), q.to(device), k.to(device), ScoreMods(scale=0.25, mask=mask.to(device)))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_layout_with_fewer_queries_than_keys(device, causal):
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 40, 48, generator=gen).to(device)
    k = torch.randn(1, 1, 100, 48, generator=gen).to(device)
    check_layout(TopKSpec(block=16, k=3), q, k, ScoreMods(scale=48 ** -0.5, causal=causal))


def test_density_one_keeps_every_allowed_block(device):
    q, k, _ = random_qkv(1, 2, 1, 100, 16, seed=8)
    layout = topk_layout(TopKSpec(block=16, density=1.0), q.to(device), k.to(device),
                         ScoreMods(scale=0.25, causal=True))
    assert row_sets(layout.kv_blocks) == [set(range(qb + 1)) for _ in range(2) for qb in range(7)]


def test_bad_inputs_raise_attncc_error(device):
    q = torch.randn(1, 3, 32, 16, device=device)
    k = torch.randn(1, 2, 32, 16, device=device)
    with pytest.raises(AttnccError, match="multiple"):
        topk_layout(TopKSpec(block=16, k=1), q, k, ScoreMods(scale=0.25))
    with pytest.raises(AttnccError, match="empty"):
        topk_layout(TopKSpec(block=16, k=1), q[:, :, :0], k[:, :1, :0], ScoreMods(scale=0.25))
    with pytest.raises(AttnccError, match="broadcast"):
        bad_mask = torch.ones(5, 32, dtype=torch.bool, device=device)
        topk_layout(TopKSpec(block=16, k=1), q, k[:, :1], ScoreMods(scale=0.25, mask=bad_mask))
    with pytest.raises(AttnccError, match="dtype"):
        topk_layout(TopKSpec(block=16, k=1), q.double(), k[:, :1].double(), ScoreMods(scale=0.25))


# -------------------------------------------------------------------------------------------- end to end


ATTENTION_CASES = [
    # id, spec, causal, (B, Hq, Hkv, N, D, Dv), dtype
    ("k2-causal-gqa-n100-d48-fp32", TopKSpec(block=16, k=2), True, (1, 4, 1, 100, 48, 48), torch.float32),
    ("density-bidir-n63-d80-dv16-fp32", TopKSpec(block=16, density=0.5), False, (2, 2, 2, 63, 80, 16),
     torch.float32),
    ("threshold-causal-n100-d16-bf16", TopKSpec(block=16, threshold=0.9), True, (1, 2, 1, 100, 16, 48),
     torch.bfloat16),
    ("k1-causal-n1-d16-fp16", TopKSpec(block=16, k=1), True, (1, 2, 2, 1, 16, 16), torch.float16),
]


@needs_softmax
@pytest.mark.parametrize("spec, causal, sizes, dtype", [pytest.param(*c[1:], id=c[0]) for c in ATTENTION_CASES])
def test_topk_attention_matches_reference(device, spec, causal, sizes, dtype):
    b, hq, hkv, n, d, dv = sizes
    q, k, v = (t.to(device) for t in random_qkv(b, hq, hkv, n, d, dv, dtype=dtype, seed=n + dv))
    mods = ScoreMods(scale=d ** -0.5, causal=causal)
    out = topk_attention(spec, q, k, v, mods)
    ref = spec.reference(q.float(), k.float(), v.float(), mods)
    assert out.dtype == dtype and out.shape == (b, hq, n, dv)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    else:
        assert rel_rms(out, ref) < 2e-2


@needs_softmax
def test_topk_attention_with_key_padding_mask(device):
    q, k, v = (t.to(device) for t in random_qkv(2, 2, 1, 63, 16, seed=9))
    mask = (torch.arange(63)[None, :] < torch.tensor([63, 30])[:, None]).view(2, 1, 1, 63).to(device)
    mods = ScoreMods(scale=0.25, causal=True, mask=mask)
    spec = TopKSpec(block=16, k=2)
    torch.testing.assert_close(topk_attention(spec, q, k, v, mods), spec.reference(q, k, v, mods),
                               atol=2e-5, rtol=1e-4)


@needs_softmax
def test_density_one_equals_exact_attention(device):
    q, k, v = (t.to(device) for t in random_qkv(1, 4, 1, 100, 48, seed=10))
    mods = ScoreMods(scale=48 ** -0.5, causal=True)
    out = topk_attention(TopKSpec(block=16, density=1.0), q, k, v, mods)
    torch.testing.assert_close(out, ExactSpec().reference(q, k, v, mods), atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------- real sizes


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_real_size_layout_matches_select(causal):
    q, k, _ = (t.cuda() for t in random_qkv(1, 8, 2, 8192, 128, dtype=torch.bfloat16, seed=11))
    spec = TopKSpec(block=64, density=0.125)
    mods = ScoreMods(scale=128 ** -0.5, causal=causal)
    layout = topk_layout(spec, q, k, mods)
    got, want = row_sets(layout.kv_blocks), row_sets(spec.select(q, k, mods))
    # Float sums in another order may swap two near-equal blocks at the budget's edge: allow a rare row.
    differing = sum(a != b for a, b in zip(got, want))
    assert differing <= len(want) // 1000


@pytest.mark.gpu
@needs_softmax
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_real_size_attention_matches_torch_path(causal):
    q, k, v = (t.cuda() for t in random_qkv(1, 8, 2, 8192, 128, dtype=torch.bfloat16, seed=12))
    spec = TopKSpec(block=64, density=0.125)
    mods = ScoreMods(scale=128 ** -0.5, causal=causal)
    out = topk_attention(spec, q, k, v, mods)
    assert rel_rms(out, spec.forward(q.float(), k.float(), v.float(), mods)) < 2e-2


@pytest.mark.parametrize("spec", [
    pytest.param(TopKSpec(block=16, density=0.5), id="density"),
    pytest.param(TopKSpec(block=16, threshold=0.7), id="threshold"),
])
def test_layout_leaves_padding_out_of_pooling_and_budget(device, spec):
    # Batch row 1 has 37 real tokens (key blocks 0..2 of 7): its budget is ceil(0.5 * 3) = 2, not 4, and the
    # block means skip the padded rows, as TopKSpec.select does.
    q, k, _ = random_qkv(2, 2, 1, 100, 16, seed=13)
    q[1, :, 37:], k[1, :, 37:] = 30.0, -30.0  # padding that would dominate the block means if pooled
    mask = (torch.arange(100)[None, :] < torch.tensor([100, 37])[:, None]).view(2, 1, 1, 100)
    layout = check_layout(spec, q.to(device), k.to(device), ScoreMods(scale=0.25, mask=mask.to(device)))
    kept = (layout.kv_blocks.cpu() >= 0).sum(-1)
    if spec.density is not None:
        assert bool((kept[0] == 4).all()) and bool((kept[1] == 2).all())


def test_threshold_counts_forced_mass_in_the_kernel(device):
    # Query block 2 scores the 4 key blocks 1, 1.1, 1, -10; sinks=1 and local=1 force blocks 0 and 2 (mass 0.63).
    k = torch.zeros(1, 1, 64, 16)
    k[..., 0] = torch.tensor([1.0, 1.1, 1.0, -10.0]).repeat_interleave(16)
    q = torch.zeros(1, 1, 64, 16)
    q[..., 0] = 1.0
    for threshold, want in ((0.6, {0, 2}), (0.7, {0, 1, 2})):
        spec = TopKSpec(block=16, threshold=threshold)
        layout = check_layout(spec, q.to(device), k.to(device), ScoreMods(scale=1.0))
        assert row_sets(layout.kv_blocks[0, 0])[2] == want
