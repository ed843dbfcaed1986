"""Neighborhood attention on the online-softmax kernels: the visit order, layouts and element predicate
against ``NeighborhoodSpec.keep`` (exact pair sets, in plain torch), and the kernel end to end against the
spec's dense oracle.

The pair-set tests run the generated token-map and predicate code itself, in torch: the code uses only
integer arithmetic, comparisons and ``tl.where``/``tl.maximum``/``tl.minimum`` on non-negative values, where
torch and Triton agree. The kernel tests run in Triton's CPU interpreter without a GPU (small grids); the
``gpu`` tests repeat them at real sizes.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from attncc.codegen.autotune import Config
from attncc.codegen.neighborhood import (
    BLOCK_SIZES, NeighborhoodTiling, neighborhood_attention, neighborhood_visit, tile_shape,
)
from attncc.errors import AttnccError
from attncc.variants.base import ScoreMods
from attncc.variants.exact import reference as exact_reference
from attncc.variants.neighborhood import NeighborhoodSpec

# The shared input/error helpers live beside the variant tests (pytest puts only this folder on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "variants"))
from variant_helpers import random_qkv, rel_rms  # noqa: E402

HAVE_SOFTMAX = importlib.util.find_spec("attncc.codegen.softmax") is not None
needs_softmax = pytest.mark.skipif(not HAVE_SOFTMAX, reason="attncc.codegen.softmax (the attention kernel) is missing")


def tokens(spec: NeighborhoodSpec) -> int:
    return spec.globals + math.prod(spec.grid)


# -- the generated code, run in torch -----------------------------------------------------------------------


class TorchTl:
    """The few ``tl`` functions the generated token map and predicate call, on torch tensors."""

    @staticmethod
    def maximum(a, b):
        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))

    @staticmethod
    def minimum(a, b):
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))

    @staticmethod
    def where(cond, a, b):
        return torch.where(cond, torch.as_tensor(a), torch.as_tensor(b))


def run_code(code: str, **names) -> dict:
    scope = {"tl": TorchTl, **names}
    exec(code, scope)
    return scope


def visible_pairs(tiling: NeighborhoodTiling, block_m: int, block_n: int):
    """What the kernel would compute, as the layout, token map and predicate say.

    Returns ``(counts, layout, real, truth)``: ``counts`` ``[N, N]`` how many times each (query, key) token
    pair is scored as visible; ``real`` ``[nQB, BM, K, BN]`` which (query row, key column) of each layout entry
    are both real tokens, ``truth`` (same shape) whether the pattern shows that pair.
    """
    layout = tiling.layout(block_m, block_n)
    n = tiling.n_tokens
    kv = layout.kv_blocks
    n_qb, width = kv.shape
    q_pos = (torch.arange(n_qb)[:, None] * block_m + torch.arange(block_m))[:, :, None]  # [nQB, BM, 1]
    k_pos = (kv.clamp_min(0)[:, :, None] * block_n + torch.arange(block_n)).reshape(n_qb, 1, width * block_n)
    scope = run_code(tiling.token_map().code, q_pos=q_pos, k_pos=k_pos, BLOCK_M=block_m, BLOCK_N=block_n)
    q_ok = scope["q_ok"] & (q_pos < tiling.n_q_visit)
    k_ok = scope["k_ok"] & (k_pos < tiling.n_k_visit)
    q_tok, k_tok = scope["q_tok"], scope["k_tok"]
    keep = run_code(tiling.predicate().code, q_tok=q_tok, k_tok=k_tok)["keep"]
    entry = (kv >= 0).repeat_interleave(block_n, dim=1)[:, None, :]
    partial = layout.partial.repeat_interleave(block_n, dim=1)[:, None, :]
    # What the kernel does: full entries score everything (they must hold no padding, checked below),
    # partial ones apply the predicate and drop padding keys; padding query rows are never written.
    visible = torch.where(partial, keep & k_ok, torch.ones_like(keep)) & entry & q_ok
    assert bool((k_ok | partial | ~entry).all()), "a full entry holds a padding key"
    counts = torch.zeros(n, n, dtype=torch.int64)
    qi, ki = torch.broadcast_tensors(q_tok, k_tok)
    counts.index_put_((qi[visible], ki[visible]), torch.ones(int(visible.sum()), dtype=torch.int64),
                      accumulate=True)
    real = (q_ok & k_ok & entry).view(n_qb, block_m, width, block_n)
    truth = tiling_truth(tiling)[qi.clamp(0, n - 1), ki.clamp(0, n - 1)].view(n_qb, block_m, width, block_n)
    return counts, layout, real, truth


def tiling_truth(tiling: NeighborhoodTiling) -> torch.Tensor:
    spec = NeighborhoodSpec(kernel=tiling.kernel, dilation=tiling.dilation, stride=tiling.stride, grid=tiling.grid,
                            globals=tiling.globals)
    return spec.keep(tiling.n_tokens)


PATTERNS = {
    "2d-1x1-k1": NeighborhoodSpec(kernel=1, grid=(1, 1)),
    "2d-7x9-k3": NeighborhoodSpec(kernel=3, grid=(7, 9)),
    "2d-7x9-k3-g1": NeighborhoodSpec(kernel=3, grid=(7, 9), globals=1),
    "2d-11x9-k5x3-dil2x1-stride1x2-g1": NeighborhoodSpec(kernel=(5, 3), dilation=(2, 1), stride=(1, 2), grid=(11, 9),
                                                         globals=1),
    "2d-16x12-k4-stride2-g2": NeighborhoodSpec(kernel=4, stride=2, grid=(16, 12), globals=2),
    "2d-10x10-k5-stride5": NeighborhoodSpec(kernel=5, stride=5, grid=(10, 10)),
    "2d-13x12-k3-dil2-stride3-g2": NeighborhoodSpec(kernel=3, dilation=2, stride=3, grid=(13, 12), globals=2),
    "2d-20x18-k7": NeighborhoodSpec(kernel=7, grid=(20, 18)),
    "2d-7x9-kernel-is-grid-g1": NeighborhoodSpec(kernel=(7, 9), grid=(7, 9), globals=1),
    "3d-3x4x5-k3-g1": NeighborhoodSpec(kernel=3, grid=(3, 4, 5), globals=1),
    "3d-4x7x9-k3x3x2-dil1x2x1-stride1x1x2-g5": NeighborhoodSpec(kernel=(3, 3, 2), dilation=(1, 2, 1),
                                                                stride=(1, 1, 2), grid=(4, 7, 9), globals=5),
    "3d-6x6x8-k3-dil2-stride3": NeighborhoodSpec(kernel=3, dilation=2, stride=3, grid=(6, 6, 8)),
    "3d-3x4x5-kernel-is-grid": NeighborhoodSpec(kernel=(3, 4, 5), grid=(3, 4, 5)),
}

BLOCK_PAIRS = [(16, 16), (32, 16), (16, 64), (128, 32)]


@pytest.mark.parametrize("blocks", BLOCK_PAIRS, ids=lambda b: f"bm{b[0]}-bn{b[1]}")
@pytest.mark.parametrize("case", list(PATTERNS))
def test_layout_and_predicate_visit_exactly_the_pattern(case, blocks):
    spec = PATTERNS[case]
    tiling = NeighborhoodTiling.of(spec, spec.grid)
    counts, layout, real, truth = visible_pairs(tiling, *blocks)
    keep = spec.keep(tokens(spec))
    # every visible pair scored exactly once, nothing else
    assert torch.equal(counts, keep.long())
    # every visited entry holds a visible pair; full entries are visible everywhere (real rows x keys)
    visited = layout.kv_blocks >= 0
    useful = (real & truth).any(3).any(1)
    assert bool(useful[visited].all()), "a visited key block has no visible pair"
    hidden_inside = (real & ~truth).any(3).any(1)
    assert not bool(hidden_inside[visited & ~layout.partial].any()), "a full entry hides a pair"
    # rows: increasing block indices, -1 padding at the end; every block inside the key visit space
    for row in layout.kv_blocks.tolist():
        blocks_in_row = [b for b in row if b >= 0]
        assert row[:len(blocks_in_row)] == blocks_in_row == sorted(set(blocks_in_row))
        assert all(b * blocks[1] < tiling.n_k_visit for b in blocks_in_row)


@pytest.mark.parametrize("case", ["2d-11x9-k5x3-dil2x1-stride1x2-g1", "3d-4x7x9-k3x3x2-dil1x2x1-stride1x1x2-g5"])
def test_token_map_is_one_to_one_on_queries_and_covers_keys(case):
    spec = PATTERNS[case]
    tiling = NeighborhoodTiling.of(spec, spec.grid)
    n = tokens(spec)
    for block in BLOCK_SIZES:
        q_pos = torch.arange(tiling.n_q_visit)[:, None]
        k_pos = torch.arange(tiling.n_k_visit)[None, :]
        scope = run_code(tiling.token_map().code, q_pos=q_pos, k_pos=k_pos, BLOCK_M=block, BLOCK_N=block)
        q_tok = scope["q_tok"][scope["q_ok"]]
        assert sorted(q_tok.tolist()) == list(range(n)), f"block {block}"
        k_tok = scope["k_tok"][scope["k_ok"]]
        assert set(k_tok.tolist()) == set(range(n)), f"block {block}"
        assert bool((scope["q_tok"] >= 0).all() & (scope["q_tok"] < n).all())  # padding reads token 0
        assert bool((scope["k_tok"] >= 0).all() & (scope["k_tok"] < n).all())


def test_work_per_query_is_close_to_the_window():
    # 8x8 query tiles, kernel 7: the windows span 14x14 keys; the half-tile shifted key copy covers them
    # with 2x2 tiles of 8x8 (256 keys per query) where aligned tiles need 3x3 (576).
    tiling = NeighborhoodTiling.of(NeighborhoodSpec(kernel=7, grid=(64, 64)), (64, 64))
    assert tiling.tile(64) == (8, 8) and tiling.tile(128) == (8, 16)
    assert tiling.layout(64, 64).pairs_visited() / 4096 <= 256
    assert tiling.layout(128, 64).pairs_visited() / 4096 <= 400
    assert tiling.layout(64, 32).pairs_visited() / 4096 <= 256
    tiling_3d = NeighborhoodTiling.of(NeighborhoodSpec(kernel=5, grid=(16, 16, 16)), (16, 16, 16))
    assert tiling_3d.tile(64) == (4, 4, 4)
    assert tiling_3d.layout(64, 64).pairs_visited() / 4096 <= 8 ** 3


def test_tile_shapes_follow_the_kernel_and_the_axes():
    assert tile_shape(64, (64, 64), (7, 7)) == (8, 8)
    assert tile_shape(128, (64, 64), (7, 7)) == (8, 16)
    assert tile_shape(64, (32, 32, 32), (7, 7, 7)) == (4, 4, 4)
    assert tile_shape(64, (16, 32, 32), (3, 7, 7)) == (2, 4, 8)
    assert tile_shape(64, (32, 2), (3, 1)) == (32, 2)  # a tile never overhangs a short axis needlessly


def test_unknown_block_size_is_refused():
    tiling = NeighborhoodTiling.of(PATTERNS["2d-7x9-k3"], (7, 9))
    with pytest.raises(AttnccError, match="block size 256"):
        tiling.layout(256, 16)


# -- the kernel end to end ----------------------------------------------------------------------------------


def check_kernel(spec, device, b=1, hq=2, hkv=1, d=16, dv=None, dtype=torch.float32, mods=None, tol=None,
                 seed=0):
    n = tokens(spec)
    q, k, v = (t.to(device) for t in random_qkv(b, hq, hkv, n, d, dv=dv, dtype=dtype, seed=seed))
    mods = mods or ScoreMods(scale=d ** -0.5)
    out = neighborhood_attention(spec, q, k, v, mods)
    assert out.shape == (b, hq, n, dv or d) and out.dtype == dtype
    ref = spec.reference(q.float(), k.float(), v.float(), mods)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=tol or 2e-5)
    else:
        assert rel_rms(out.float(), ref) < (tol or 1.5e-2)
    return out, ref


KERNEL_CASES = {
    # name: (spec, hq, hkv, d, dv)
    "2d-1x1-k1-d16": (NeighborhoodSpec(kernel=1, grid=(1, 1)), 2, 2, 16, None),
    "2d-7x9-k3-d16-gqa4": (NeighborhoodSpec(kernel=3, grid=(7, 9)), 4, 1, 16, None),
    "2d-11x9-k5x3-dil2x1-stride1x2-g1-d48-dv56": (
        NeighborhoodSpec(kernel=(5, 3), dilation=(2, 1), stride=(1, 2), grid=(11, 9), globals=1), 2, 1, 48, 56),
    "2d-10x10-k5-stride5-d80": (NeighborhoodSpec(kernel=5, stride=5, grid=(10, 10)), 1, 1, 80, None),
    "3d-3x4x5-k3-g1-d80-dv16": (NeighborhoodSpec(kernel=3, grid=(3, 4, 5), globals=1), 2, 1, 80, 16),
}


@needs_softmax
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_matches_reference_fp32(case, device):
    spec, hq, hkv, d, dv = KERNEL_CASES[case]
    check_kernel(spec, device, hq=hq, hkv=hkv, d=d, dv=dv)


@needs_softmax
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kernel_half_precision_relative_rms(dtype, device):
    spec = NeighborhoodSpec(kernel=3, dilation=(1, 2), grid=(7, 9), globals=1)
    check_kernel(spec, device, hq=4, hkv=1, d=48, dtype=dtype, tol=1.5e-2 if dtype == torch.float16 else 2e-2)


@needs_softmax
@pytest.mark.parametrize("mask_kind", ["padding-mask", "dense-mask"])
def test_kernel_applies_bias_mask_and_softcap(mask_kind, device):
    spec = NeighborhoodSpec(kernel=3, grid=(7, 9), globals=1)
    b, hq, n = 2, 2, 64
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(b, 1, 1, n, generator=gen) > 0.3 if mask_kind == "padding-mask" else \
        torch.rand(b, hq, n, n, generator=gen) > 0.2
    bias = torch.randn(1, hq, n, n, generator=gen)
    mods = ScoreMods(scale=0.3, softcap=2.5, bias=bias.to(device), mask=mask.to(device))
    check_kernel(spec, device, b=b, hq=hq, hkv=1, mods=mods)


@needs_softmax
@pytest.mark.parametrize("blocks", [(16, 64), (64, 16), (128, 32)], ids=lambda b: f"bm{b[0]}-bn{b[1]}")
def test_kernel_at_other_tile_sizes(blocks, device):
    # Autotuning in the interpreter takes its first (32 x 32) config; force the others' token-map branches.
    from attncc.codegen.softmax import softmax_attention

    spec = NeighborhoodSpec(kernel=3, dilation=(1, 2), stride=(2, 1), grid=(7, 9), globals=1)
    q, k, v = (t.to(device) for t in random_qkv(1, 2, 1, 64, 16))
    mods = ScoreMods(scale=0.25)
    config = Config.of(4, 2, BLOCK_M=blocks[0], BLOCK_N=blocks[1])
    out = softmax_attention(q, k, v, mods, neighborhood_visit(spec, 64, device), config=config)
    torch.testing.assert_close(out, spec.reference(q, k, v, mods), rtol=1e-5, atol=2e-5)


@needs_softmax
def test_kernel_applies_causality_on_tokens(device):
    # supports() declines causal sites; a direct causal call still means "and j <= i" (in token order).
    spec = NeighborhoodSpec(kernel=3, grid=(3, 4, 5), globals=1)
    check_kernel(spec, device, mods=ScoreMods(scale=0.25, causal=True))


@needs_softmax
def test_rows_without_visible_keys_are_zero(device):
    spec = NeighborhoodSpec(kernel=3, grid=(8, 8))
    q, k, v = (t.to(device) for t in random_qkv(1, 1, 1, 64, 16))
    mask = torch.ones(1, 1, 1, 64, dtype=torch.bool, device=device)
    mask[..., :24] = False  # grid rows 0-2: queries of rows 0 and 1 see only those
    out = neighborhood_attention(spec, q, k, v, ScoreMods(scale=0.25, mask=mask))
    assert torch.count_nonzero(out[:, :, :16]) == 0
    torch.testing.assert_close(out, spec.reference(q, k, v, ScoreMods(scale=0.25, mask=mask)), rtol=1e-5,
                               atol=1e-5)


@needs_softmax
@pytest.mark.parametrize("grid,globals_", [((7, 9), 1), ((3, 4, 5), 0)], ids=["2d-7x9-g1", "3d-3x4x5"])
def test_kernel_covering_the_grid_is_exact(grid, globals_, device):
    spec = NeighborhoodSpec(kernel=grid, grid=grid, globals=globals_)
    q, k, v = (t.to(device) for t in random_qkv(1, 2, 1, tokens(spec), 16))
    out = neighborhood_attention(spec, q, k, v, ScoreMods(scale=0.25))
    torch.testing.assert_close(out, exact_reference(q, k, v, scale=0.25), rtol=1e-5, atol=2e-5)


@needs_softmax
def test_bad_calls_raise_one_clear_error(device):
    q, k, v = (t.to(device) for t in random_qkv(1, 2, 1, 63, 16))
    with pytest.raises(AttnccError, match="grid must be set"):
        neighborhood_attention(NeighborhoodSpec(kernel=3), q, k, v, ScoreMods(scale=0.25))
    with pytest.raises(AttnccError, match="do not match"):
        neighborhood_attention(NeighborhoodSpec(kernel=3, grid=(8, 8)), q, k, v, ScoreMods(scale=0.25))
    with pytest.raises(AttnccError, match="as many queries as keys"):
        neighborhood_attention(NeighborhoodSpec(kernel=3, grid=(7, 9)), q, k[:, :, :40], v[:, :, :40],
                               ScoreMods(scale=0.25))


# -- real sizes (GPU only) ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gpu_2d_64x64_kernel7_d128(dtype):
    spec = NeighborhoodSpec(kernel=7, grid=(64, 64), globals=1)
    check_kernel(spec, torch.device("cuda"), b=2, hq=4, hkv=2, d=128, dtype=dtype, tol=1e-4 if
                 dtype == torch.float32 else None)


@pytest.mark.gpu
def test_gpu_2d_dilated_strided_with_mods():
    spec = NeighborhoodSpec(kernel=(7, 5), dilation=(2, 3), stride=(1, 2), grid=(48, 60), globals=4)
    n = tokens(spec)
    gen = torch.Generator().manual_seed(4)
    mask = (torch.rand(2, 1, 1, n, generator=gen) > 0.1).cuda()
    bias = torch.randn(1, 8, n, n, generator=gen).cuda()
    mods = ScoreMods(scale=0.1, softcap=30.0, bias=bias, mask=mask)
    check_kernel(spec, torch.device("cuda"), b=2, hq=8, hkv=2, d=80, dv=64, dtype=torch.bfloat16, mods=mods)


@pytest.mark.gpu
def test_gpu_3d_8x32x32_kernel_3x7x7():
    spec = NeighborhoodSpec(kernel=(3, 7, 7), grid=(8, 32, 32), globals=1)
    check_kernel(spec, torch.device("cuda"), b=1, hq=4, hkv=1, d=128, dtype=torch.bfloat16)
