"""Static block-sparse attention on the Triton kernels against the variant's dense oracle: named patterns
(whole blocks, causal diagonal partial) and mask_mod patterns (packed bits of partial blocks only).

Runs in Triton's CPU interpreter without a GPU (small sizes, 16-token blocks); the ``gpu`` tests repeat it at
real sizes.
"""

from __future__ import annotations

import pytest
import torch

from attncc.codegen.block_sparse import block_sparse_attention, mask_mod_tiles, named_layout
from attncc.variants.base import ScoreMods
from attncc.variants.block_sparse import mask_mod_pattern
from attncc.variants.parse import parse_variant
from variant_helpers import random_qkv, rel_rms


def stripes(q_idx, kv_idx):
    """A mask_mod no block formula gives: every third key, plus the diagonal."""
    return (kv_idx % 3 == 0) | (kv_idx == q_idx)


STRIPES = mask_mod_pattern(stripes)

CASES = [
    # (variant text, n, d, dv, hq, hkv, causal)
    ("block_sparse(pattern=bigbird(window=1, globals=1, random=1), block=16)", 100, 16, 16, 2, 2, False),
    ("block_sparse(pattern=bigbird(window=1, globals=1, random=1), block=16)", 100, 48, 32, 4, 1, True),
    ("block_sparse(pattern=radial(window=1), block=16)", 63, 80, 80, 2, 1, True),
    ("block_sparse(pattern=power(), block=16)", 100, 16, 48, 2, 2, True),
    ("block_sparse(pattern=radial(window=2), block=32)", 1, 16, 16, 1, 1, False),
    (f"block_sparse(pattern={STRIPES!r}, block=16)", 63, 16, 16, 2, 1, False),
    (f"block_sparse(pattern={STRIPES!r}, block=16)", 100, 48, 48, 4, 1, True),
]


def _case_id(case) -> str:
    text, n, d, dv, hq, hkv, causal = case
    pattern = "mask_mod" if "mask_mod" in text else text.split("pattern=")[1].split("(")[0]
    block = text.rsplit("block=", 1)[1].rstrip(")")
    return f"{pattern}-b{block}-n{n}-d{d}-dv{dv}-gqa{hq // hkv}-{'causal' if causal else 'bidir'}"


@pytest.mark.parametrize("text, n, d, dv, hq, hkv, causal", CASES, ids=[_case_id(c) for c in CASES])
def test_block_sparse_kernel_matches_reference_fp32(text, n, d, dv, hq, hkv, causal, device):
    spec = parse_variant(text)
    q, k, v = (t.to(device) for t in random_qkv(2, hq, hkv, n, d, dv))
    mods = ScoreMods(scale=d ** -0.5, causal=causal)
    out = block_sparse_attention(spec, q, k, v, mods)
    torch.testing.assert_close(out, spec.reference(q, k, v, mods), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_block_sparse_kernel_half_precision_with_mods(dtype, device):
    spec = parse_variant("block_sparse(pattern=bigbird(window=1, globals=1, random=1), block=16)")
    q, k, v = (t.to(device) for t in random_qkv(2, 4, 1, 100, 48, 32, dtype=dtype))
    pad = torch.ones(2, 1, 1, 100, dtype=torch.bool, device=device)
    pad[1, ..., 80:] = False
    bias = torch.randn(1, 4, 100, 100, device=device).to(dtype)
    mods = ScoreMods(scale=48 ** -0.5, causal=True, softcap=5.0, bias=bias, mask=pad)
    out = block_sparse_attention(spec, q, k, v, mods)
    assert rel_rms(out.float(), spec.reference(q, k, v, mods).float()) < 2e-2


def test_named_layout_marks_only_the_diagonal_and_ragged_end_partial():
    spec = parse_variant("block_sparse(pattern=radial(window=1), block=16)")
    layout = named_layout(spec, 40, 40, True, torch.device("cpu"))
    kv, partial = layout.kv_blocks, layout.partial
    for qb in range(kv.shape[0]):
        for slot in range(kv.shape[1]):
            kb = int(kv[qb, slot])
            if kb >= 0:
                assert bool(partial[qb, slot]) == (kb == qb or kb == 2)  # 40 = 2 * 16 + 8: block 2 is ragged


def test_mask_mod_packs_bits_of_partial_blocks_only():
    spec = parse_variant(f"block_sparse(pattern={STRIPES!r}, block=16)")
    layout, tiles, index = mask_mod_tiles(spec, 48, 48, False, "cpu")
    partial = layout.partial
    assert int((index >= 0).sum()) == int(partial.sum()) == tiles.numel() // 256
    assert bool((index[~partial] == -1).all())
    qb, slot = partial.nonzero()[0].tolist()
    kb = int(layout.kv_blocks[qb, slot])
    rows, cols = torch.arange(16)[:, None] + qb * 16, torch.arange(16)[None, :] + kb * 16
    tile = tiles[int(index[qb, slot]) * 256:(int(index[qb, slot]) + 1) * 256].view(16, 16).bool()
    assert torch.equal(tile, stripes(rows, cols))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_block_sparse_kernel_real_size(causal):
    spec = parse_variant("block_sparse(pattern=bigbird(window=3, globals=2, random=3), block=64)")
    q, k, v = (t.cuda() for t in random_qkv(2, 16, 4, 4096, 128, dtype=torch.bfloat16))
    mods = ScoreMods(scale=128 ** -0.5, causal=causal)
    out = block_sparse_attention(spec, q, k, v, mods)
    assert rel_rms(out.float(), spec.forward(q.float(), k.float(), v.float(), mods).float()) < 2e-2


def test_mask_mod_kernel_with_fewer_queries_than_keys(device):
    spec = parse_variant(f"block_sparse(pattern={STRIPES!r}, block=16)")
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 37, 16, generator=gen).to(device)
    k, v = (torch.randn(1, 1, 100, 16, generator=gen).to(device) for _ in range(2))
    mods = ScoreMods(scale=0.25)
    torch.testing.assert_close(block_sparse_attention(spec, q, k, v, mods), spec.reference(q, k, v, mods),
                               rtol=1e-4, atol=2e-5)
