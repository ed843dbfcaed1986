"""The neighborhood variant (NATTEN semantics on 2-D/3-D token grids, with global tokens): the per-axis window
rule, the tiled forward against its dense oracle, the kernel == grid limit against exact attention, every
ScoreMods field, gradients, no N x N tensor, and its planning contract (validation, canonical text, supports,
cost)."""

from __future__ import annotations

import ast
import math

import pytest
import torch

from attncc.errors import AttnccError
from attncc.site import AttentionSite
from attncc.variants.base import ScoreMods
from attncc.variants.exact import dense_attention_cost
from attncc.variants.exact import reference as exact_reference
from attncc.variants import neighborhood as neighborhood_module
from attncc.variants.neighborhood import NeighborhoodSpec, axis_neighbors, neighborhood_attention
from attncc.variants.parse import parse_variant
from variant_helpers import LargestTensor, assert_gradients_match, random_qkv





def _site(**fields):
    base = dict(module="m", source="sdpa", q=None, k=None, v=None, output=None, batch=2, q_heads=6, kv_heads=6,
                q_len=197, kv_len=197, head_dim=64, value_dim=64, dtype=torch.float32, grid=(14, 14),
                grid_prefix=1)
    base.update(fields)
    return AttentionSite(**base)


def _tokens(spec):
    return spec.globals + math.prod(spec.grid)


# -- the per-axis rule --------------------------------------------------------------------------------------


def _rows(vis):
    return [torch.nonzero(row).flatten().tolist() for row in vis]


def test_axis_windows_clamp_at_borders():
    assert _rows(axis_neighbors(5, 3, 1, 1)) == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4]]


def test_axis_dilation_splits_into_interleaved_subsequences():
    # positions 0,2,4,6 and 1,3,5: each a sub-sequence with its own clamped windows of 3
    assert _rows(axis_neighbors(7, 3, 2, 1)) == [
        [0, 2, 4], [1, 3, 5], [0, 2, 4], [1, 3, 5], [2, 4, 6], [1, 3, 5], [2, 4, 6]]


def test_axis_stride_shares_windows_within_a_group():
    # stride 2: groups {0,1},{2,3},{4,5},{6,7} share a window starting at 2g + 1 - 1, clamped to [0, 5]
    assert _rows(axis_neighbors(8, 3, 1, 2)) == [[0, 1, 2]] * 2 + [[2, 3, 4]] * 2 + [[4, 5, 6]] * 2 + [[5, 6, 7]] * 2
    # stride == kernel: non-overlapping blocked windows
    assert _rows(axis_neighbors(6, 3, 1, 3)) == [[0, 1, 2]] * 3 + [[3, 4, 5]] * 3


def test_every_grid_query_sees_the_kernel_volume():
    spec = NeighborhoodSpec(kernel=(3, 5), dilation=(2, 1), stride=(1, 2), grid=(9, 11), globals=2)
    keep = spec.keep(_tokens(spec))
    assert (keep[2:, 2:].sum(1) == 15).all()
    assert keep[:2].all() and keep[:, :2].all()


# -- forward against the oracle ----------------------------------------------------------------------------


# N = globals + prod(grid) in (1, 63, 100, 257)
CASES = {
    "n1-k1": NeighborhoodSpec(kernel=1, grid=(1, 1)),
    "n63-k3": NeighborhoodSpec(kernel=3, grid=(7, 9)),
    "n100-k5x3-dil2x1-g1": NeighborhoodSpec(kernel=(5, 3), dilation=(2, 1), grid=(11, 9), globals=1),
    "n257-k7-g1": NeighborhoodSpec(kernel=7, grid=(16, 16), globals=1),
    "n257-k4-stride2-g1": NeighborhoodSpec(kernel=4, stride=2, grid=(16, 16), globals=1),
    "n100-k5-stride5": NeighborhoodSpec(kernel=5, stride=5, grid=(10, 10)),
    "n257-3d-k3x3x2-dil1x2x1-g5": NeighborhoodSpec(kernel=(3, 3, 2), dilation=(1, 2, 1), stride=(1, 1, 2),
                                                   grid=(4, 7, 9), globals=5),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads,d", [((4, 2), 16), ((4, 1), 48), ((2, 2), 80)],
                         ids=["hq4-hkv2-d16", "hq4-hkv1-d48", "hq2-hkv2-d80"])
def test_forward_matches_reference(case, heads, d):
    spec = CASES[case]
    n = _tokens(spec)
    q, k, v = random_qkv(2, heads[0], heads[1], n, d, dv=d + 8)
    mods = ScoreMods(scale=d ** -0.5)
    out = spec.forward(q, k, v, mods)
    assert out.shape == (2, heads[0], n, d + 8) and out.dtype == torch.float32
    torch.testing.assert_close(out, spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["padding", "dense"])
def test_forward_applies_every_mod(mask_kind):
    spec = CASES["n100-k5x3-dil2x1-g1"]
    b, hq, hkv, n = 2, 4, 2, 100
    q, k, v = random_qkv(b, hq, hkv, n, 16)
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(b, 1, 1, n, generator=gen) > 0.3 if mask_kind == "padding" else \
        torch.rand(b, hq, n, n, generator=gen) > 0.2
    bias = torch.randn(1, hq, n, n, generator=gen)
    mods = ScoreMods(scale=0.3, softcap=2.5, bias=bias, mask=mask)
    torch.testing.assert_close(spec.forward(q, k, v, mods), spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


def test_causal_mods_are_still_applied():
    # supports() declines causal sites; a direct causal call still means "and j <= i".
    spec = CASES["n257-k7-g1"]
    q, k, v = random_qkv(1, 2, 2, 257, 16)
    mods = ScoreMods(scale=0.25, causal=True)
    torch.testing.assert_close(spec.forward(q, k, v, mods), spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


def test_rows_without_visible_keys_are_zero():
    spec = NeighborhoodSpec(kernel=3, grid=(8, 8))
    q, k, v = random_qkv(1, 2, 2, 64, 16)
    mask = torch.ones(1, 1, 1, 64, dtype=torch.bool)
    mask[..., :24] = False  # rows 0-2 of the grid; grid row 0 and 1 queries see only rows 0-2
    out = spec.forward(q, k, v, ScoreMods(scale=0.25, mask=mask))
    assert torch.count_nonzero(out[:, :, :16]) == 0
    assert torch.count_nonzero(out[:, :, 16:]) > 0


@pytest.mark.parametrize("grid,globals_", [((7, 9), 0), ((16, 16), 1), ((3, 4, 5), 2), ((1, 19), 0), ((19, 1), 1)],
                         ids=str)
def test_kernel_covering_the_grid_is_exact(grid, globals_):
    spec = NeighborhoodSpec(kernel=tuple(grid), grid=grid, globals=globals_)
    n = _tokens(spec)
    q, k, v = random_qkv(1, 4, 2, n, 48)
    out = spec.forward(q, k, v, ScoreMods(scale=0.2))
    torch.testing.assert_close(out, exact_reference(q, k, v, scale=0.2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid,kernel", [((1, 19), (1, 5)), ((19, 1), (7, 1)), ((2, 19), (1, 19))], ids=str)
def test_an_axis_of_one_row_or_a_kernel_as_wide_as_its_axis(grid, kernel):
    """Tiles that share one key region (the kernel spans the whole axis) were once a zero-step unfold."""
    spec = NeighborhoodSpec(kernel=kernel, grid=grid)
    q, k, v = random_qkv(2, 4, 2, _tokens(spec), 16)
    mods = ScoreMods(scale=0.25)
    torch.testing.assert_close(spec.forward(q, k, v, mods), spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tiles", [(1, 1), (3, 5), (16, 16)], ids=str)
def test_tile_size_does_not_change_the_result(tiles):
    spec = CASES["n257-k7-g1"]
    q, k, v = random_qkv(1, 4, 2, 257, 16)
    mods = ScoreMods(scale=0.25)
    out = neighborhood_attention(q, k, v, mods, (16, 16), (7, 7), (1, 1), (1, 1), 1, tiles=tiles)
    torch.testing.assert_close(out, spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_chunking_does_not_change_the_result(monkeypatch, grad):
    spec = CASES["n257-k7-g1"]
    q, k, v = random_qkv(2, 4, 2, 257, 16)
    mods = ScoreMods(scale=0.25, mask=torch.rand(2, 1, 1, 257, generator=torch.Generator().manual_seed(2)) > 0.2)
    monkeypatch.setattr(neighborhood_module, "CHUNK_FLOATS", 1)  # one row of tiles per chunk
    with torch.set_grad_enabled(grad):
        out = spec.forward(q.requires_grad_(grad), k, v, mods)
    torch.testing.assert_close(out, spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


def test_bf16_relative_rms():
    spec = CASES["n257-k7-g1"]
    q, k, v = random_qkv(1, 4, 2, 257, 80, dtype=torch.bfloat16)
    mods = ScoreMods(scale=80 ** -0.5)
    out = spec.forward(q, k, v, mods)
    assert out.dtype == torch.bfloat16
    ref = spec.reference(q.float(), k.float(), v.float(), mods)
    err = (out.float() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
    assert err < 2e-2


def test_gradients_match_the_reference():
    spec = NeighborhoodSpec(kernel=3, dilation=(1, 2), grid=(5, 7), globals=1)
    n = _tokens(spec)
    q, k, v = random_qkv(1, 4, 2, n, 16)
    bias = torch.randn(1, 4, n, n)
    weight = torch.randn(1, 4, n, 16, generator=torch.Generator().manual_seed(5))
    assert_gradients_match(spec, q, k, v, bias, weight, scale=0.25, softcap=3.0)





def test_never_builds_an_n_by_n_tensor():
    spec = NeighborhoodSpec(kernel=5, grid=(48, 48), globals=1)
    n = _tokens(spec)
    q, k, v = random_qkv(1, 1, 1, n, 16)
    mods = ScoreMods(scale=0.25, mask=torch.ones(1, 1, 1, n, dtype=torch.bool))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # run_tasks then stays on this thread, where the (thread-local) mode sees every op
    try:
        with LargestTensor() as probe:
            spec.forward(q, k, v, mods)
    finally:
        torch.set_num_threads(threads)
    assert probe.largest < n * n / 8


# -- planning contract -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    (dict(kernel=0), "kernel"),
    (dict(kernel=(3, 3, 3, 3)), "kernel"),
    (dict(kernel=True), "kernel"),
    (dict(dilation=(1, 0)), "dilation"),
    (dict(stride=8, kernel=7), "stride"),
    (dict(grid=(14,)), "grid"),
    (dict(grid=(14, 0)), "grid"),
    (dict(kernel=(3, 3, 3), grid=(14, 14)), "kernel"),
    (dict(kernel=7, dilation=3, grid=(14, 20)), "kernel"),
    (dict(globals=-1), "globals"),
], ids=["zero", "four-axes", "bool", "dilation", "stride-gt-kernel", "grid-rank", "grid-zero", "rank-mismatch",
        "kernel-times-dilation", "globals"])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(AttnccError, match=rf"^neighborhood: {field}"):
        NeighborhoodSpec(**kwargs)


def test_lists_become_tuples():
    spec = NeighborhoodSpec(kernel=[3, 5], grid=[8, 8])
    assert spec.kernel == (3, 5) and spec.grid == (8, 8)


@pytest.mark.parametrize("case", list(CASES))
def test_canonical_text_round_trips(case):
    spec = CASES[case]
    text = str(spec)
    assert parse_variant(text) == spec
    call = ast.parse(text, mode="eval").body
    assert NeighborhoodSpec(**{kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}) == spec


def test_forward_needs_a_grid():
    q, k, v = random_qkv(1, 2, 2, 50, 16)
    with pytest.raises(AttnccError, match="grid must be set"):
        NeighborhoodSpec(kernel=3).forward(q, k, v, ScoreMods(scale=0.25))
    with pytest.raises(AttnccError, match="do not match"):
        NeighborhoodSpec(kernel=3, grid=(7, 7)).forward(q, k, v, ScoreMods(scale=0.25))


def test_supports():
    spec = NeighborhoodSpec(kernel=7)
    assert spec.supports(_site())[0]
    assert spec.supports(_site(has_bias=True, mask_residual="padding", softcap=50.0))[0]
    assert NeighborhoodSpec(kernel=7, grid=(8, 8)).supports(_site(q_len=64, kv_len=64, grid=None, grid_prefix=0))[0]
    for site, why in [
        (_site(grid=None, grid_prefix=0), "grid is unknown"),
        (_site(kind="cross"), "cross"),
        (_site(causal=True), "causal"),
        (_site(dropout_p=0.1), "dropout"),
        (_site(segments=True), "segment"),
        (_site(q_len=200, kv_len=200), "tokens are not"),
        (_site(grid=(4, 49), q_len=197, kv_len=197), "kernel * dilation"),
    ]:
        ok, reason = spec.supports(site)
        assert not ok and why in reason, reason


@pytest.mark.parametrize("case", ["n63-k3", "n100-k5x3-dil2x1-g1", "n257-3d-k3x3x2-dil1x2x1-g5"])
def test_cost_counts_the_visible_pairs(case):
    spec = CASES[case]
    n = _tokens(spec)
    site = _site(q_len=n, kv_len=n, grid=None, grid_prefix=0)
    assert spec.pairs(site) == int(spec.keep(n).sum())
    cost = spec.cost(site)
    assert cost["flops"] == 2 * 2 * 6 * int(spec.keep(n).sum()) * 128
    assert cost["bytes"] == dense_attention_cost(site)["bytes"]


def test_cost_below_dense():
    site = _site(q_len=4097, kv_len=4097, grid=(64, 64), grid_prefix=1)
    assert NeighborhoodSpec(kernel=13).cost(site)["flops"] < dense_attention_cost(site)["flops"] / 10
