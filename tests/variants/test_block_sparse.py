"""block_sparse: pattern layouts against their definitions, forward against the dense oracle, the degenerate
limit against exact attention, ScoreMods, GQA, bf16, gradients, validation, text, supports() and cost()."""

from __future__ import annotations

import math

import pytest
import sympy
import torch

from attncc.errors import AttnccError
from attncc.site import AttentionSite
from attncc.variants import exact
from attncc.variants.base import ScoreMods
from attncc.variants.block_sparse import (
    PATTERNS, BigBirdPattern, BlockSparseSpec, MaskModPattern, PowerPattern, RadialPattern,
    mask_mod_pattern,
)
from variant_helpers import LargestTensor, assert_gradients_match, random_qkv, rel_rms

BLOCK = 16  # small blocks so that short test sequences still have many of them


def qkv(n, d, hq=4, hkv=4, b=2, dtype=torch.float32, seed=0, nk=None):
    return random_qkv(b, hq, hkv, n, d, dtype=dtype, seed=seed, nk=nk)





def band_mod(q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 20


def stripes_mod(q_idx, kv_idx):
    return ((kv_idx // 7) % 3 == 0) | (q_idx == kv_idx)


def always(q_idx, kv_idx):
    return torch.ones_like(q_idx - kv_idx, dtype=torch.bool)


def first_rows_see_nothing(q_idx, kv_idx):
    return (q_idx >= 5) & (kv_idx <= q_idx + 3)


SPECS = {
    "bigbird": BlockSparseSpec(BigBirdPattern(window=1, globals=1, random=2, seed=3), block=BLOCK),
    "radial": BlockSparseSpec(RadialPattern(window=1), block=BLOCK),
    "power": BlockSparseSpec(PowerPattern(window=1, sinks=1), block=BLOCK),
    "mask_mod": BlockSparseSpec(mask_mod_pattern(stripes_mod), block=BLOCK),
}


# ------------------------------------------------------------------------------------- layouts by formula


def block_sets(blocks):
    return [set(int(x) for x in row if x >= 0) for row in blocks]


def check_packed(blocks):
    for row in blocks.tolist():
        valid = [x for x in row if x >= 0]
        assert row[: len(valid)] == sorted(set(valid)), row  # ascending, unique, padding last


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("nb", [1, 7, 33])
def test_radial_and_power_layouts_match_definition(nb, causal):
    for pattern in (RadialPattern(window=1), RadialPattern(window=3), PowerPattern(window=2, sinks=2)):
        blocks = pattern.blocks(nb, nb, causal)
        check_packed(blocks)
        for qb, got in enumerate(block_sets(blocks)):
            want = set()
            for kb in range(nb):
                d = abs(qb - kb)
                if causal and kb > qb:
                    continue
                if isinstance(pattern, RadialPattern):
                    w = pattern.window
                    j = 0 if d <= w else math.ceil(math.log2(d / w))
                    ok = d <= w or d % 2 ** j == 0
                else:
                    ok = d <= pattern.window or (d & (d - 1)) == 0 or kb < pattern.sinks
                if ok:
                    want.add(kb)
            assert got == want, (pattern, qb)


def test_radial_density_decays_with_distance():
    blocks = RadialPattern(window=4).blocks(1024, 1024, causal=True)
    row = block_sets(blocks)[-1]
    dist = [1023 - kb for kb in row]
    per_band = [sum(1 for d in dist if 4 * 2 ** (j - 1) < d <= 4 * 2 ** j) for j in range(1, 8)]
    assert per_band == [2] * 7  # band j is 2**(j+1) wide and keeps every 2**j-th block
    assert len(row) < 30  # O(log n) of 1024


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_bigbird_layout_matches_definition(causal):
    p = BigBirdPattern(window=2, globals=2, random=3, seed=7)
    nb = 40
    check_packed(p.blocks(nb, nb, causal))
    assert (p.blocks(nb, nb, causal)[:2] == -1).all()  # global rows are not listed
    sets = [set(torch.nonzero(row).flatten().tolist()) for row in p.block_mask(nb, nb, causal)]
    for qb, got in enumerate(sets):
        allowed = set(range(qb + 1 if causal else nb))
        if qb < 2:
            assert got == allowed
            continue
        fixed = {kb for kb in allowed if abs(qb - kb) <= 2 or kb < 2}
        assert fixed <= got
        assert len(got - fixed) == min(3, len(allowed - fixed))  # random blocks are extra, not repeats
        assert got <= allowed
    again = BigBirdPattern(window=2, globals=2, random=3, seed=7)
    assert torch.equal(p.blocks(nb, nb, causal), again.blocks(nb, nb, causal))
    other = BigBirdPattern(window=2, globals=2, random=3, seed=8).blocks(nb, nb, causal)
    assert not torch.equal(p.blocks(nb, nb, causal), other)


def test_layouts_are_computed_at_block_granularity():
    # 2**20 tokens with 64-token blocks: an element predicate would need 2**40 evaluations.
    for pattern in (RadialPattern(window=2), PowerPattern(), BigBirdPattern(window=1, globals=1, random=2)):
        blocks = pattern.blocks(2 ** 14, 2 ** 14, causal=False)
        assert blocks.shape[0] == 2 ** 14 and blocks.shape[1] < 64


# ------------------------------------------------------------------------------------ forward vs oracle

CASES = [
    pytest.param(name, n, d, hkv, causal, id=f"{name}-N{n}-D{d}-Hkv{hkv}-{'causal' if causal else 'bidir'}")
    for name in SPECS
    for i, n in enumerate((1, 63, 100, 257))
    for causal in (False, True)
    for d, hkv in [((16, 4), (48, 2), (80, 1), (48, 1))[(i + causal) % 4]]
]


@pytest.mark.parametrize("name, n, d, hkv, causal", CASES)
def test_forward_matches_reference_fp32(name, n, d, hkv, causal):
    spec = SPECS[name]
    q, k, v = qkv(n, d, hkv=hkv)
    mods = ScoreMods(scale=d ** -0.5, causal=causal)
    out = spec.forward(q, k, v, mods)
    assert out.shape == (2, 4, n, d) and out.dtype == torch.float32
    torch.testing.assert_close(out, spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_forward_matches_reference_bf16(name, causal):
    spec = SPECS[name]
    q, k, v = qkv(257, 48, hkv=2, dtype=torch.bfloat16)
    mods = ScoreMods(scale=48 ** -0.5, causal=causal)
    out = spec.forward(q, k, v, mods)
    assert out.dtype == torch.bfloat16
    assert rel_rms(out, spec.reference(q.float(), k.float(), v.float(), mods)) < 2e-2


@pytest.mark.parametrize("name", list(SPECS))
def test_score_mods(name):
    spec = SPECS[name]
    b, n, d = 2, 100, 16
    q, k, v = qkv(n, d, hkv=2, b=b)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(1, 4, n, n, generator=gen)  # e.g. a relative-position bias
    pad = torch.ones(b, 1, 1, n, dtype=torch.bool)
    pad[1, ..., 70:] = False
    dense = torch.rand(b, 1, n, n, generator=gen) > 0.3
    for mods in (
        ScoreMods(scale=0.3, causal=True, softcap=5.0, bias=bias, mask=pad),
        ScoreMods(scale=0.3, mask=dense, bias=torch.randn(b, 4, 1, n, generator=gen)),
        ScoreMods(scale=0.3, causal=True, mask=pad[0, 0]),  # [1, Nk]: broadcast over batch and heads
    ):
        torch.testing.assert_close(spec.forward(q, k, v, mods), spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


def test_rows_without_visible_keys_are_zero():
    q, k, v = qkv(40, 16)
    spec = BlockSparseSpec(mask_mod_pattern(first_rows_see_nothing), block=BLOCK)
    mods = ScoreMods(scale=0.25, causal=True)
    out = spec.forward(q, k, v, mods)
    assert torch.equal(out[..., :5, :], torch.zeros_like(out[..., :5, :]))
    torch.testing.assert_close(out, spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)
    pad = torch.zeros(2, 1, 1, 40, dtype=torch.bool)  # a fully padded sequence
    pad[0] = True
    out = SPECS["bigbird"].forward(q, k, v, ScoreMods(scale=0.25, mask=pad))
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros_like(out[1]))


def test_mask_mod_for_cross_attention_lengths():
    spec = BlockSparseSpec(mask_mod_pattern(band_mod), block=BLOCK)
    q, k, v = qkv(50, 16, hkv=2, nk=90)
    mods = ScoreMods(scale=0.25)
    torch.testing.assert_close(spec.forward(q, k, v, mods), spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- degenerate limits


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize(
    "spec",
    [
        BlockSparseSpec(BigBirdPattern(window=17, globals=0, random=0), block=BLOCK),
        BlockSparseSpec(BigBirdPattern(window=0, globals=17, random=0), block=BLOCK),
        BlockSparseSpec(RadialPattern(window=17), block=BLOCK),
        BlockSparseSpec(PowerPattern(window=17, sinks=0), block=BLOCK),
        BlockSparseSpec(mask_mod_pattern(always), block=BLOCK),
    ],
    ids=["bigbird-window", "bigbird-globals", "radial", "power", "mask_mod-always"],
)
def test_degenerate_limit_is_exact(spec, causal):
    n, d = 257, 48  # 17 blocks of 16
    q, k, v = qkv(n, d, hkv=2)
    bias = torch.randn(1, 4, n, n)
    out = spec.forward(q, k, v, ScoreMods(scale=0.2, causal=causal, bias=bias))
    want = exact.reference(q, k, v, scale=0.2, causal=causal, bias=bias)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ no N x N





@pytest.mark.parametrize("name", list(SPECS))
def test_forward_builds_no_n_by_n_tensor(name):
    n = 2048
    pattern = mask_mod_pattern(band_mod) if name == "mask_mod" else SPECS[name].pattern  # sparse at block level
    spec = BlockSparseSpec(pattern, block=64)
    q, k, v = qkv(n, 16, hq=1, hkv=1, b=1)
    mods = ScoreMods(scale=0.25, causal=True)
    spec.forward(q, k, v, mods)  # layouts are cached: the mask_mod predicate ran once, by rows of blocks
    with LargestTensor() as probe:
        spec.forward(q, k, v, mods)
    assert probe.largest < n * n // 4


# ------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", list(SPECS))
def test_gradients_match_reference(name):
    spec = SPECS[name]
    q, k, v = qkv(70, 16, hkv=2, b=1)
    bias = torch.randn(1, 4, 70, 70)
    assert_gradients_match(spec, q, k, v, bias, torch.linspace(-1, 1, 16), scale=0.25, causal=True, softcap=4.0)


# ------------------------------------------------------------------------------------ validation & text


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: BlockSparseSpec(RadialPattern(), block=0), "block_sparse: block must be an integer >= 1"),
        (lambda: BlockSparseSpec(pattern="bigbird"), "block_sparse: pattern must be one of bigbird(...)"),
        (lambda: BlockSparseSpec(), "block_sparse: pattern must be one of bigbird(...), radial(...)"),
        (lambda: BigBirdPattern(window=-1), "block_sparse: bigbird.window must be an integer >= 0"),
        (lambda: BigBirdPattern(random=1.5), "block_sparse: bigbird.random must be an integer"),
        (lambda: RadialPattern(window=0), "block_sparse: radial.window must be an integer >= 1"),
        (lambda: PowerPattern(sinks=True), "block_sparse: power.sinks must be an integer >= 0"),
        (lambda: MaskModPattern(name="f", key=10 ** 9), "block_sparse: mask_mod.key must name a predicate"),
        (lambda: mask_mod_pattern(3), "block_sparse: mask_mod must be a callable"),
    ],
    ids=["block", "pattern", "no-pattern", "window", "random", "radial", "sinks", "mask_mod-key", "mask_mod-fn"],
)
def test_invalid_parameters(make, words):
    with pytest.raises(AttnccError) as err:
        make()
    assert words in str(err.value)


def test_canonical_text_round_trips():
    spec = BlockSparseSpec(BigBirdPattern(window=3, globals=1, random=2, seed=0), block=64)
    assert str(spec) == "block_sparse(pattern=bigbird(window=3, globals=1, random=2, seed=0))"  # block: default
    assert str(SPECS["radial"]) == "block_sparse(pattern=radial(window=1), block=16)"
    assert repr(RadialPattern(window=2)) == "radial(window=2)"
    assert repr(PowerPattern(window=1, sinks=2)) == "power(window=1, sinks=2)"
    mm = mask_mod_pattern(band_mod)
    assert repr(mm) == f"mask_mod(name='band_mod', key={mm.key})"
    assert mask_mod_pattern(band_mod) == mm  # the same callable keeps its key
    namespace = {"block_sparse": BlockSparseSpec, **PATTERNS}
    for s in [spec, *SPECS.values(), BlockSparseSpec(mm)]:
        assert eval(str(s), namespace) == s  # literal keyword calls of PATTERNS names
    try:
        from attncc.variants.parse import parse_variant

        parsed = parse_variant(str(SPECS["power"]))
    except ImportError:
        pytest.skip("the variant registry is not complete yet")
    assert parsed == SPECS["power"]


# ------------------------------------------------------------------------------------ supports and cost


def site(**kw):
    fields = dict(batch=2, q_heads=8, kv_heads=2, q_len=4096, kv_len=4096, head_dim=64, value_dim=64,
                  dtype=torch.float16)
    fields.update(kw)
    return AttentionSite(module="m", source="sdpa", q=None, k=None, v=None, output=None, **fields)


def test_supports():
    spec = SPECS["bigbird"]
    assert spec.supports(site())[0]
    assert spec.supports(site(causal=True, has_bias=True, softcap=30.0, mask_residual="padding"))[0]
    assert spec.supports(site(q_len="s0", kv_len="s0"))[0]
    for bad, word in [
        (site(dropout_p=0.1), "dropout"), (site(kv_len=77), "as many queries as keys"),
        (site(band=(128, 0)), "band"), (site(segments=True), "segment"),
    ]:
        ok, reason = spec.supports(bad)
        assert not ok and word in reason
    # A predicate defines its own shape: cross-attention lengths are fine.
    assert SPECS["mask_mod"].supports(site(kind="cross", kv_len=77))[0]


def test_cost_at_static_site():
    s = site(q_len=1000, kv_len=1000)
    dense = exact.dense_attention_cost(s)
    spec = BlockSparseSpec(BigBirdPattern(window=1, globals=1, random=1, seed=0), block=100)
    # 10 blocks of 100: row 0 visits all 10; rows 1..9 visit 3 window + 1 global + 1 random, minus overlaps.
    visited = int(spec.pattern.block_mask(10, 10, False).sum())
    assert spec.pairs(s) == visited * 100 * 100
    assert spec.cost(s)["flops"] == 2 * 2 * 8 * visited * 100 * 100 * 128
    assert spec.cost(s)["bytes"] == dense["bytes"]
    sparse = {**SPECS, "mask_mod": BlockSparseSpec(mask_mod_pattern(band_mod), block=BLOCK)}
    for name, sp in sparse.items():  # (stripes_mod touches every 16-block: it is not sparse at block level)
        for causal in (False, True):
            c = sp.cost(site(q_len=2048, kv_len=2048, causal=causal))
            assert c["flops"] < dense["flops"] * 2048 ** 2 / 1000 ** 2 / 2, name
    full = BlockSparseSpec(mask_mod_pattern(always), block=64).cost(site(q_len=1000, kv_len=1000))
    assert full["flops"] == dense["flops"]  # ragged last block counted at its real size


def test_cost_at_dynamic_site():
    for name, spec in SPECS.items():
        c = spec.cost(site(q_len="s0", kv_len="s0"))
        assert isinstance(c["flops"], sympy.Expr) and c["flops"].free_symbols == {sympy.Symbol("s0", positive=True)}
        at = float(c["flops"].subs(sympy.Symbol("s0", positive=True), 2 ** 16))
        dense = 2 * 2 * 8 * 2 ** 32 * 128
        assert at <= dense and (name == "mask_mod" or at < dense / 8), name
