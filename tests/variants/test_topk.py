"""topk: block selection against a plain loop over its definition, forward against the dense oracle, the
degenerate limit (density=1) against exact attention, ScoreMods, GQA, bf16, gradients, validation, text,
supports() and cost()."""

from __future__ import annotations

import math

import pytest
import sympy
import torch

from attncc.errors import AttnccError
from attncc.site import AttentionSite
from attncc.variants import exact
from attncc.variants.base import ScoreMods
from attncc.variants.topk import TopKSpec
from variant_helpers import LargestTensor, assert_gradients_match, random_qkv, rel_rms

BLOCK = 16


def qkv(n, d, hq=4, hkv=4, b=2, dtype=torch.float32, seed=0):
    return random_qkv(b, hq, hkv, n, d, dtype=dtype, seed=seed)





def block_sets(blocks):
    return [set(int(x) for x in row if x >= 0) for row in blocks]


# ---------------------------------------------------------------------------------- selection by loops


def naive_selection(spec: TopKSpec, q, k, mods: ScoreMods):
    """The definition, one (batch, head, query block) at a time: {(b, h, qb): set of key blocks}.

    Padding (a key-padding mask ``[B, 1, 1, N]``) is left out of the block means of keys and of queries (a
    query block of padding only averages all its rows), and the k/density budget counts only key blocks
    holding a real key; the threshold counts the forced blocks' mass first."""
    bs, n = spec.block, q.shape[-2]
    nb = -(-n // bs)
    g = q.shape[1] // k.shape[1]
    padding = mods.mask is not None and mods.mask.dim() == 4 and mods.mask.shape[1:3] == (1, 1)
    out = {}
    for b in range(q.shape[0]):
        real = mods.mask[b % mods.mask.shape[0], 0, 0] if padding else torch.ones(n, dtype=torch.bool)

        def mean(x, j):
            rows, ok = x[j * bs:(j + 1) * bs].float(), real[j * bs:(j + 1) * bs]
            return rows[ok].mean(0) if ok.any() else rows.mean(0)

        real_blocks = sum(bool(real[j * bs:(j + 1) * bs].any()) for j in range(nb))
        for h in range(q.shape[1]):
            pk = [mean(k[b, h // g], j) for j in range(nb)]
            for i in range(nb):
                pq = mean(q[b, h], i)
                allowed = []
                for j in range(nb):
                    if mods.causal and j * bs > min(n, (i + 1) * bs) - 1:
                        continue
                    if mods.mask is not None:
                        m = mods.mask.expand(q.shape[0], q.shape[1], n, n)[b, h]
                        m = m[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs]
                        if not m.any():
                            continue
                    allowed.append(j)
                forced = {j for j in allowed if i - spec.local < j <= i or j < spec.sinks}
                score = {j: float(pq @ pk[j]) * mods.scale for j in allowed}
                ranked = sorted((j for j in allowed if j not in forced), key=lambda j: -score[j])
                if spec.threshold is None:
                    kept = spec.k if spec.k is not None else max(1, math.ceil(round(spec.density * real_blocks, 9)))
                    chosen = set(ranked[: max(0, min(kept, real_blocks) - len(forced))])
                else:
                    top = max(score.values()) if score else 0.0
                    z = sum(math.exp(s - top) for s in score.values())
                    chosen, mass = set(), sum(math.exp(score[j] - top) / z for j in forced)
                    for j in ranked:
                        if mass >= spec.threshold - 1e-6:
                            break
                        chosen.add(j)
                        mass += math.exp(score[j] - top) / z
                out[(b, h, i)] = forced | chosen
    return out


SELECTIONS = [
    pytest.param(TopKSpec(block=BLOCK, density=0.25, sinks=1, local=1), id="density"),
    pytest.param(TopKSpec(block=BLOCK, k=3, sinks=2, local=2), id="k"),
    pytest.param(TopKSpec(block=BLOCK, k=1, sinks=1, local=2), id="k-below-forced"),
    pytest.param(TopKSpec(block=BLOCK, threshold=0.6, sinks=0, local=1), id="threshold"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("spec", SELECTIONS)
def test_selection_matches_definition(spec, causal):
    n = 100  # 7 blocks, the last one ragged
    q, k, _ = qkv(n, 16, hkv=2)
    pad = torch.ones(2, 1, 1, n, dtype=torch.bool)
    pad[1, ..., 40:] = False  # key blocks 3.. of batch 1 are fully padded: never picked
    mods = ScoreMods(scale=0.25, causal=causal, mask=pad)
    blocks = spec.select(q, k, mods)
    assert blocks.shape[:3] == (2, 4, 7) and blocks.dtype == torch.int64
    want = naive_selection(spec, q, k, mods)
    for b in range(2):
        for h in range(4):
            got = block_sets(blocks[b, h])
            for i in range(7):
                assert got[i] == want[(b, h, i)], (b, h, i)
                if causal:
                    assert max(got[i]) <= i
                if b == 1:
                    assert max(got[i]) <= 2
    for row in blocks.reshape(-1, blocks.shape[-1]).tolist():
        valid = [x for x in row if x >= 0]
        assert row[: len(valid)] == sorted(set(valid))  # ascending, padding last


def test_selection_finds_the_matching_key_block():
    # Key block j is near direction e_j, query block i near e_perm[i]: the top-1 pick must be perm[i].
    nb, bs, d = 8, BLOCK, 16
    perm = torch.randperm(nb, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    k = (torch.eye(d)[:nb].repeat_interleave(bs, 0) * 4 + 0.1 * torch.randn(nb * bs, d, generator=gen))[None, None]
    q = (torch.eye(d)[perm].repeat_interleave(bs, 0) * 4 + 0.1 * torch.randn(nb * bs, d, generator=gen))[None, None]
    spec = TopKSpec(block=bs, k=1, sinks=0, local=0)
    blocks = spec.select(q, k, ScoreMods(scale=d ** -0.5))
    assert blocks[0, 0, :, 0].tolist() == perm.tolist()


# ------------------------------------------------------------------------------------ forward vs oracle

MODES = {
    "density": dict(density=0.25), "k": dict(k=2, sinks=1, local=2), "threshold": dict(threshold=0.5, sinks=0),
}
CASES = [
    pytest.param(mode, n, d, hkv, causal, id=f"{mode}-N{n}-D{d}-Hkv{hkv}-{'causal' if causal else 'bidir'}")
    for mode in MODES
    for i, n in enumerate((1, 63, 100, 257))
    for causal in (False, True)
    for d, hkv in [((16, 4), (48, 2), (80, 1), (48, 1))[(i + causal) % 4]]
]


@pytest.mark.parametrize("mode, n, d, hkv, causal", CASES)
def test_forward_matches_reference_fp32(mode, n, d, hkv, causal):
    spec = TopKSpec(block=BLOCK, **MODES[mode])
    q, k, v = qkv(n, d, hkv=hkv)
    mods = ScoreMods(scale=d ** -0.5, causal=causal)
    out = spec.forward(q, k, v, mods)
    assert out.shape == (2, 4, n, d) and out.dtype == torch.float32
    torch.testing.assert_close(out, spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("mode", list(MODES))
def test_forward_matches_reference_bf16(mode, causal):
    spec = TopKSpec(block=BLOCK, **MODES[mode])
    q, k, v = qkv(257, 48, hkv=2, dtype=torch.bfloat16)
    mods = ScoreMods(scale=48 ** -0.5, causal=causal)
    out = spec.forward(q, k, v, mods)
    assert out.dtype == torch.bfloat16
    assert rel_rms(out, spec.reference(q, k, v, mods).float()) < 2e-2


def test_score_mods():
    spec = TopKSpec(block=BLOCK, density=0.3, sinks=1, local=1)
    b, n = 2, 100
    q, k, v = qkv(n, 16, hkv=2, b=b)
    gen = torch.Generator().manual_seed(1)
    pad = torch.ones(b, 1, 1, n, dtype=torch.bool)
    pad[1, ..., 70:] = False
    for mods in (
        ScoreMods(scale=0.3, causal=True, softcap=5.0, bias=torch.randn(1, 4, n, n, generator=gen), mask=pad),
        ScoreMods(scale=0.3, mask=torch.rand(b, 1, n, n, generator=gen) > 0.3, bias=torch.randn(b, 4, 1, n)),
    ):
        torch.testing.assert_close(spec.forward(q, k, v, mods), spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


def test_rows_without_visible_keys_are_zero():
    q, k, v = qkv(40, 16)
    pad = torch.zeros(2, 1, 1, 40, dtype=torch.bool)
    pad[0] = True  # batch 1 is fully padded
    out = TopKSpec(block=BLOCK, k=1).forward(q, k, v, ScoreMods(scale=0.25, mask=pad))
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros_like(out[1]))


# ---------------------------------------------------------------------------------- degenerate limit


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("spec", [TopKSpec(block=BLOCK, density=1.0, sinks=0, local=0), TopKSpec(block=BLOCK, k=17)],
                         ids=["density-1", "k-all"])
def test_degenerate_limit_is_exact(spec, causal):
    n, d = 257, 48
    q, k, v = qkv(n, d, hkv=2)
    bias = torch.randn(1, 4, n, n)
    out = spec.forward(q, k, v, ScoreMods(scale=0.2, causal=causal, bias=bias, softcap=3.0))
    want = exact.reference(q, k, v, scale=0.2, causal=causal, bias=bias, softcap=3.0)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_threshold_grows_the_selection():
    q, k, _ = qkv(257, 16, b=1)
    mods = ScoreMods(scale=0.25, causal=True)
    sizes = []
    for t in (0.1, 0.5, 0.9, 1.0):
        blocks = TopKSpec(block=BLOCK, threshold=t, sinks=0, local=0).select(q, k, mods)
        sizes.append(int((blocks >= 0).sum()))
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


# ------------------------------------------------------------------------------------------ no N x N





@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_forward_builds_no_n_by_n_tensor(causal):
    n = 2048
    q, k, v = qkv(n, 16, hq=1, hkv=1, b=1)
    with LargestTensor() as probe:
        TopKSpec(block=64, density=0.125).forward(q, k, v, ScoreMods(scale=0.25, causal=causal))
    assert probe.largest < n * n // 4


# ------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("mode", list(MODES))
def test_gradients_match_reference(mode):
    spec = TopKSpec(block=BLOCK, **MODES[mode])
    q, k, v = qkv(70, 16, hkv=2, b=1)
    bias = torch.randn(1, 4, 70, 70)
    assert_gradients_match(spec, q, k, v, bias, torch.linspace(-1, 1, 16), scale=0.25, causal=True, softcap=4.0)


# ------------------------------------------------------------------------------------ validation & text


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(), "topk: give exactly one of density, k or threshold"),
        (dict(density=0.5, k=2), "topk: give exactly one of density, k or threshold"),
        (dict(density=0.0), "topk: density must be a number in (0, 1]"),
        (dict(density=1.5), "topk: density must be a number in (0, 1]"),
        (dict(density="1/8"), "topk: density must be a number in (0, 1]"),
        (dict(threshold=0), "topk: threshold must be a number in (0, 1]"),
        (dict(k=0), "topk: k must be an integer >= 1"),
        (dict(k=2.5), "topk: k must be an integer >= 1"),
        (dict(k=2, block=0), "topk: block must be an integer >= 1"),
        (dict(k=2, sinks=-1), "topk: sinks must be an integer >= 0"),
        (dict(k=2, local=None), "topk: local must be an integer >= 0"),
    ],
    ids=["none", "two", "density-0", "density-big", "density-str", "threshold", "k-0", "k-float", "block",
         "sinks", "local"],
)
def test_invalid_parameters(kwargs, words):
    with pytest.raises(AttnccError) as err:
        TopKSpec(**kwargs)
    assert words in str(err.value)


def test_canonical_text_round_trips():
    assert str(TopKSpec(density=1)) == "topk(density=1.0)"
    spec = TopKSpec(block=32, k=4, sinks=0, local=2)
    assert str(spec) == "topk(block=32, k=4, sinks=0, local=2)"
    for s in (spec, TopKSpec(threshold=0.9), TopKSpec(density=0.125)):
        assert eval(str(s), {"topk": TopKSpec}) == s
    try:
        from attncc.variants.parse import parse_variant

        parsed = parse_variant(str(spec))
    except ImportError:
        pytest.skip("the variant registry is not complete yet")
    assert parsed == spec


# ------------------------------------------------------------------------------------ supports and cost


def site(**kw):
    fields = dict(batch=2, q_heads=8, kv_heads=2, q_len=4096, kv_len=4096, head_dim=64, value_dim=64,
                  dtype=torch.float16)
    fields.update(kw)
    return AttentionSite(module="m", source="sdpa", q=None, k=None, v=None, output=None, **fields)


def test_supports():
    spec = TopKSpec(density=0.125)
    assert spec.supports(site())[0]
    assert spec.supports(site(causal=True, has_bias=True, softcap=30.0, mask_residual="dense"))[0]
    assert spec.supports(site(q_len="s0", kv_len="s0"))[0]
    for bad, word in [
        (site(dropout_p=0.1), "dropout"), (site(kind="cross", kv_len=77), "as many queries as keys"),
        (site(band=(128, 0)), "band"), (site(segments=True), "segment"),
    ]:
        ok, reason = spec.supports(bad)
        assert not ok and word in reason


def test_cost_at_static_site():
    s = site()
    dense = exact.dense_attention_cost(s)
    spec = TopKSpec(block=64, density=0.125)
    assert spec.pairs(s) == 4096 * 4096 // 8  # 8 of 64 key blocks per query block
    pooling = 2 * (8 * 4096 + 2 * 4096) * 64 + 2 * 2 * 8 * 64 * 64 * 64
    assert spec.cost(s)["flops"] == dense["flops"] // 8 + pooling
    assert spec.cost(s)["bytes"] == dense["bytes"] + 2 * 2 * (8 * 4096 + 2 * 4096) * 64
    causal = spec.cost(site(causal=True))["flops"]
    assert causal < spec.cost(s)["flops"] < dense["flops"] / 4
    assert TopKSpec(block=64, k=4).pairs(s) == 4096 * 4 * 64
    assert TopKSpec(block=64, threshold=0.9).pairs(s) == 4096 * 4096  # data-dependent: the dense bound


def test_cost_at_dynamic_site():
    n = sympy.Symbol("s0", positive=True)
    for spec in (TopKSpec(density=0.125), TopKSpec(k=8)):
        flops = spec.cost(site(q_len="s0", kv_len="s0"))["flops"]
        assert flops.free_symbols == {n}
        dense = 2 * 2 * 8 * 2 ** 32 * 128
        assert float(flops.subs(n, 2 ** 16)) < dense / 4


# ------------------------------------------------------------------------------------ padding excluded


def padded_batch(n=128, lengths=(128, 40), hq=4, hkv=2, d=16, seed=0):
    q, k, v = random_qkv(len(lengths), hq, hkv, n, d, seed=seed)
    mask = (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).view(len(lengths), 1, 1, n)
    return q, k, v, mask


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_padding_blocks_are_never_selected_and_not_counted(causal):
    q, k, v, mask = padded_batch()  # 8 key blocks of 16; batch row 1 has 40 real tokens: blocks 0..2
    spec = TopKSpec(block=16, density=0.5)
    mods = ScoreMods(scale=0.25, causal=causal, mask=mask)
    keep = spec.select_blocks(q, k, mods)
    assert not keep[1, ..., 3:].any()  # blocks of padding only: never selected
    per_row = keep.sum(-1)  # [B, Hq, nQB]
    if not causal:
        # budget: ceil(0.5 * 8) = 4 blocks on the unpadded row, ceil(0.5 * 3) = 2 (not 4) on the padded one
        assert bool((per_row[0] == 4).all()) and bool((per_row[1] == 2).all())
    else:  # query block i sees i + 1 blocks (at most 3 real ones on the padded row)
        visible = torch.arange(1, 9)
        assert torch.equal(per_row[0], torch.minimum(visible, torch.tensor(4)).expand(4, 8))
        assert torch.equal(per_row[1], torch.minimum(visible, torch.tensor(2)).expand(4, 8))
    assert torch.equal(spec.budget(mask[:, 0, 0], 128).flatten(), torch.tensor([4, 2]))


def test_padding_content_changes_nothing_for_real_rows():
    # Before: padded keys and queries entered the block means, so what padding held changed the selection.
    q, k, v, mask = padded_batch(lengths=(128, 37))
    spec = TopKSpec(block=16, density=0.25)
    mods = ScoreMods(scale=0.25, mask=mask)
    gen = torch.Generator().manual_seed(5)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[1, :, 37:] = 50 * torch.randn(t[1, :, 37:].shape, generator=gen)
    keep, keep2 = spec.select_blocks(q, k, mods), spec.select_blocks(q2, k2, mods)
    assert torch.equal(keep[:, :, :3], keep2[:, :, :3])  # every query block holding a real query
    out, out2 = spec.forward(q, k, v, mods), spec.forward(q2, k2, v2, mods)
    torch.testing.assert_close(out[1, :, :37], out2[1, :, :37], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


def test_padded_rows_follow_the_reference():
    q, k, v, mask = padded_batch(n=100, lengths=(100, 37))
    for spec in (TopKSpec(block=16, density=0.25), TopKSpec(block=16, threshold=0.7), TopKSpec(block=16, k=2)):
        for causal in (False, True):
            mods = ScoreMods(scale=0.25, causal=causal, mask=mask)
            out = spec.forward(q, k, v, mods)
            torch.testing.assert_close(out, spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)
            # a padded query row gets what exact gives it approximately: attention over the real keys, finite
            assert torch.isfinite(out).all()


# ------------------------------------------------------------------------- threshold counts forced mass


def forced_mass_case(threshold):
    """4 key blocks of 4 constant keys; query block 2 scores them 1, 1.1, 1, -10 (sinks=1 forces block 0,
    local=1 forces block 2): forced mass 2e / (2e + e^1.1) = 0.63 of the pooled softmax."""
    d, bs = 4, 4
    level = torch.tensor([1.0, 1.1, 1.0, -10.0]).repeat_interleave(bs)
    k = torch.zeros(1, 1, 16, d)
    k[..., 0] = level
    q = torch.zeros(1, 1, 16, d)
    q[..., 0] = 1.0
    spec = TopKSpec(block=bs, threshold=threshold, sinks=1, local=1)
    return block_sets(spec.select(q, k, ScoreMods(scale=1.0))[0, 0])[2]


def test_threshold_counts_forced_blocks():
    assert forced_mass_case(0.6) == {0, 2}  # the forced blocks already hold 0.63 >= 0.6: nothing added
    assert forced_mass_case(0.7) == {0, 1, 2}  # 0.63 < 0.7: the best other block fills up
    assert forced_mass_case(1.0) == {0, 1, 2, 3}
