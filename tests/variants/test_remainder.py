"""remainder=True on topk and local: forward against the dense oracle (odd N, GQA, causal, padding, softcap,
learned sinks, decode), an independent check (blocks of equal keys pool exactly, so top-k with a remainder is
exact attention there), the degenerate limits, what is declined (bias, dense masks, the Triton kernels),
cost(), and measured_pairs against counts done by hand and by brute force."""

from __future__ import annotations

import pytest
import torch

from attncc.errors import AttnccError
from attncc.site import AttentionSite
from attncc.variants import exact
from attncc.variants.base import ScoreMods
from attncc.variants.local import LocalSpec
from attncc.variants.topk import TopKSpec
from variant_helpers import POOLED_CASES, LargestTensor, key_padding, random_qkv


SPECS = {
    "topk-density": TopKSpec(block=8, density=0.25, remainder=True),
    "topk-k-nolocal": TopKSpec(block=8, k=1, sinks=0, local=0, remainder=True),
    "topk-threshold": TopKSpec(block=16, threshold=0.5, remainder=True),
    "topk-coarse": TopKSpec(block=4, density=0.25, remainder=True, remainder_block=16),
    "local-sinks": LocalSpec(window=5, sinks=2, remainder=True, remainder_block=8),
    "local-globals": LocalSpec(left=3, right=6, globals=3, remainder=True),
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("n, hq, hkv, causal, padded", [pytest.param(*c[1:], id=c[0]) for c in POOLED_CASES])
def test_forward_matches_dense_reference(name, n, hq, hkv, causal, padded):
    spec = SPECS[name]
    q, k, v = random_qkv(2, hq, hkv, n, 16, dv=8, seed=n + hq)
    mask = key_padding(n, (n, n // 3)) if padded else None
    mods = ScoreMods(scale=0.3, causal=causal, mask=mask)
    out = spec.forward(q, k, v, mods)
    assert out.shape == (2, hq, n, 8)
    torch.testing.assert_close(out, spec.reference(q, k, v, mods), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("name", list(SPECS))
def test_softcap_and_sinks(name):
    spec = SPECS[name]
    q, k, v = random_qkv(2, 4, 2, 45, 16, seed=1)
    mods = ScoreMods(scale=0.5, softcap=2.0, sinks=torch.tensor([0.5, -1.0, 2.0, 0.0]), mask=key_padding(45, (45, 20)))
    torch.testing.assert_close(spec.forward(q, k, v, mods), spec.reference(q, k, v, mods), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("spec", [TopKSpec(block=8, density=0.25, remainder=True, decode=True), SPECS["local-sinks"],
                                  TopKSpec(block=4, density=0.25, remainder=True, remainder_block=12, decode=True)],
                         ids=["topk", "local", "topk-coarse"])
def test_fewer_queries_than_keys(spec):
    gen = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 4, 11, 16, generator=gen), torch.randn(2, 2, 50, 16, generator=gen), \
        torch.randn(2, 2, 50, 16, generator=gen)
    mods = ScoreMods(scale=0.25, mask=key_padding(50, (50, 44)))
    torch.testing.assert_close(spec.forward(q, k, v, mods), spec.reference(q, k, v, mods), rtol=1e-5, atol=2e-6)


def test_gradients_match_reference():
    spec = SPECS["topk-density"]
    q, k, v = random_qkv(1, 2, 1, 30, 8, seed=3)
    grads = []
    for fn in (spec.forward, spec.reference):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, ScoreMods(scale=0.3, causal=True))
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, 8)).sum(), leaves))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------- an independent check


def equal_key_runs(run: int, seed: int, n: int = 45, real: int = 21):
    """q ``[2, 4, n, 16]``, k ``[2, 2, n, 16]``, v ``[2, 2, n, 8]`` whose keys and values are equal over each run of
    ``run`` positions, and a key-padding mask: row 1 has ``real`` real tokens and garbage (x100) keys and values
    behind them, which no pool may take in."""
    gen = torch.Generator().manual_seed(seed)
    runs = 48 // run
    k = torch.randn(2, 2, runs, 1, 16, generator=gen).expand(2, 2, runs, run, 16).reshape(2, 2, 48, 16)[:, :, :n]
    v = torch.randn(2, 2, runs, 1, 8, generator=gen).expand(2, 2, runs, run, 8).reshape(2, 2, 48, 8)[:, :, :n]
    k, v = k.clone(), v.clone()
    q = torch.randn(2, 4, n, 16, generator=gen)
    k[1, :, real:] = 100 * torch.randn(2, n - real, 16, generator=gen)
    v[1, :, real:] = 100 * torch.randn(2, n - real, 8, generator=gen)
    return q, k, v, key_padding(n, (n, real))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_blocks_of_equal_keys_pool_exactly(causal):
    """A block whose real keys and values are all equal is one pooled entry with weight count * exp(score): top-k
    with a remainder (diagonal kept, every other visible block either kept or pooled) is then exact attention,
    whatever it selects; the padding's own keys and values (garbage here) must not enter the pools."""
    bs = 8
    q, k, v, mask = equal_key_runs(bs, seed=4)
    mods = ScoreMods(scale=0.4, causal=causal, mask=mask)
    want = exact.reference(q, k, v, scale=0.4, causal=causal, mask=mask)
    for spec in (TopKSpec(block=bs, k=1, sinks=0, local=1, remainder=True),
                 TopKSpec(block=bs, threshold=0.3, remainder=True)):
        torch.testing.assert_close(spec.forward(q, k, v, mods), want, rtol=1e-5, atol=1e-5)
        without = TopKSpec(block=bs, k=1, sinks=0, local=1).forward(q, k, v, mods)
        assert (without - want).abs().max() > 1e-2  # the remainder is what makes it exact


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_coarse_blocks_of_equal_keys_pool_exactly(causal):
    """The same check for ``remainder_block``: keys and values equal over each run of 16 positions, selection
    blocks of 4. A coarse block the query block selects nothing of is one entry, the others' skipped fine blocks
    are one entry each: both pool equal keys exactly, so the result is exact attention; the coarse pools must
    skip the padding too."""
    rb = 16
    q, k, v, mask = equal_key_runs(rb, seed=9)
    mods = ScoreMods(scale=0.4, causal=causal, mask=mask)
    want = exact.reference(q, k, v, scale=0.4, causal=causal, mask=mask)
    spec = TopKSpec(block=4, k=1, sinks=0, local=1, remainder=True, remainder_block=rb)
    torch.testing.assert_close(spec.forward(q, k, v, mods), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(spec.reference(q, k, v, mods), want, rtol=1e-5, atol=1e-5)


def test_coarse_remainder_entries_by_hand():
    """32 keys, selection blocks of 4, remainder blocks of 16, each query block keeping its own block only:
    it pools the 3 other fine blocks of its own coarse block and the other coarse block whole (4 entries where
    fine pooling has 7)."""
    q, k, _ = random_qkv(1, 1, 1, 32, 4, seed=7)
    mods = ScoreMods(scale=0.5)
    coarse = TopKSpec(block=4, k=1, sinks=0, local=1, remainder=True, remainder_block=16)
    keep = coarse.select_blocks(q, k, mods)
    entries = coarse.remainder_entries(keep, mods, 32, 32)
    assert entries.shape == (1, 1, 8, 8 + 2)
    assert entries[0, 0, 1].tolist() == [True, False, True, True, False, False, False, False] + [False, True]
    assert entries[0, 0, 6].tolist() == [False] * 4 + [True, True, False, True] + [True, False]
    # 8 query blocks x 4 queries x (4 kept keys + 4 entries), plus the selection's 8 x 8 half pairs
    assert coarse.measured_pairs(q, k, mods).tolist() == [[8 * 4 * 8 + 32.0]]
    fine = TopKSpec(block=4, k=1, sinks=0, local=1, remainder=True)
    assert fine.measured_pairs(q, k, mods).tolist() == [[8 * 4 * (4 + 7) + 32.0]]


# ----------------------------------------------------------------------------------- degenerate limits


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_degenerate_limits_are_exact(causal):
    q, k, v = random_qkv(2, 4, 2, 67, 16, seed=5)
    mask = key_padding(67, (67, 30))
    mods = ScoreMods(scale=0.3, causal=causal, mask=mask, softcap=3.0)
    want = exact.reference(q, k, v, scale=0.3, causal=causal, mask=mask, softcap=3.0)
    for spec in (TopKSpec(block=16, density=1.0, remainder=True), LocalSpec(window=67, remainder=True),
                 LocalSpec(window=200, remainder=True, remainder_block=4)):
        torch.testing.assert_close(spec.forward(q, k, v, mods), want, rtol=1e-5, atol=1e-5)


def test_forward_builds_no_n_by_n_tensor():
    n = 512
    q, k, v = random_qkv(1, 1, 1, n, 16, seed=6)
    for spec in (TopKSpec(block=32, density=0.125, remainder=True), LocalSpec(window=32, remainder=True)):
        with LargestTensor() as probe:
            spec.forward(q, k, v, ScoreMods(scale=0.25, causal=True))
        assert probe.largest < n * n // 4


# ------------------------------------------------------------------------------- declined and validated


def site(**kw):
    fields = dict(batch=2, q_heads=8, kv_heads=2, q_len=4096, kv_len=4096, head_dim=64, value_dim=64,
                  dtype=torch.float16)
    fields.update(kw)
    return AttentionSite(module="m", source="sdpa", q=None, k=None, v=None, output=None, **fields)


@pytest.mark.parametrize("spec", [TopKSpec(density=0.125, remainder=True), LocalSpec(window=64, remainder=True)],
                         ids=["topk", "local"])
def test_bias_and_dense_masks_are_declined(spec):
    assert spec.supports(site(mask_residual="padding", causal=True))[0]
    ok, why = spec.supports(site(has_bias=True))
    assert not ok and "bias" in why
    ok, why = spec.supports(site(mask_residual="dense"))
    assert not ok and "dense mask" in why
    q, k, v = random_qkv(1, 2, 2, 20, 8)
    with pytest.raises(AttnccError, match="bias"):
        spec.forward(q, k, v, ScoreMods(scale=0.3, bias=torch.zeros(1, 2, 20, 20)))
    with pytest.raises(AttnccError, match="key-padding"):
        spec.forward(q, k, v, ScoreMods(scale=0.3, mask=torch.ones(1, 1, 20, 20, dtype=torch.bool)))


def test_text_and_validation():
    assert str(TopKSpec(density=0.25, remainder=True)) == "topk(density=0.25, remainder=True)"
    assert str(LocalSpec(window=8, remainder=True, remainder_block=32)) == \
        "local(window=8, remainder=True, remainder_block=32)"
    from attncc.variants.parse import parse_variant

    for text in ("topk(density=0.25, remainder=True)", "local(window=8, remainder=True)"):
        assert str(parse_variant(text)) == text
    assert str(TopKSpec(block=8, density=0.25, remainder=True, remainder_block=32)) == \
        "topk(block=8, density=0.25, remainder=True, remainder_block=32)"
    assert TopKSpec(block=8, density=0.25, remainder=True, remainder_block=8) == \
        TopKSpec(block=8, density=0.25, remainder=True)  # the default spelled out
    with pytest.raises(AttnccError, match="remainder_block needs remainder=True"):
        TopKSpec(block=8, density=0.25, remainder_block=32)
    with pytest.raises(AttnccError, match="must be a multiple of block"):
        TopKSpec(block=8, density=0.25, remainder=True, remainder_block=20)
    with pytest.raises(AttnccError, match="remainder_block needs remainder=True"):
        LocalSpec(window=8, remainder_block=8)
    with pytest.raises(AttnccError, match="remainder must be True or False"):
        TopKSpec(density=0.5, remainder=1)


def test_triton_kernels_decline_the_remainder():
    pytest.importorskip("triton")
    from attncc.codegen.softmax import local_covers
    from attncc.codegen.topk import _topk_covers

    q, k, v = random_qkv(1, 2, 2, 64, 16)
    mods = ScoreMods(scale=0.25)
    assert "remainder" in _topk_covers(TopKSpec(block=16, density=0.25, remainder=True), q, k, v, mods)
    assert "remainder" in local_covers(LocalSpec(window=16, remainder=True), q, k, v, mods)
    assert _topk_covers(TopKSpec(block=16, density=0.25), q, k, v, mods) == ""
    assert local_covers(LocalSpec(window=16), q, k, v, mods) == ""


def test_cost_counts_the_remainder():
    s = site()
    nkb = 4096 // 64
    extra = 2 * 2 * 8 * 4096 * nkb * 128 + 2 * 2 * 4096 * 64  # one entry per (query, key block); pooling v
    base, pooled = TopKSpec(density=0.125), TopKSpec(density=0.125, remainder=True)
    assert pooled.cost(s)["flops"] - base.cost(s)["flops"] == extra
    dense = exact.dense_attention_cost(s)["flops"]
    assert extra < dense / 32  # about 1/block of dense
    # remainder_block=256: at most 16 coarse entries + 3 fine ones beside each of the 2 + 8 kept blocks
    coarse = TopKSpec(density=0.125, remainder=True, remainder_block=256).cost(s)["flops"] - base.cost(s)["flops"]
    assert coarse == 2 * 2 * 8 * 4096 * (16 + 10 * 3) * 128 + 2 * 2 * 4096 * 64
    local = LocalSpec(window=256, remainder=True).cost(s)["flops"] - LocalSpec(window=256).cost(s)["flops"]
    assert local == 2 * 2 * 8 * 4096 * (4096 // 16) * 128 + 2 * 2 * 4096 * 128


# ------------------------------------------------------------------------------------- measured pairs


def tiny(n):
    return random_qkv(1, 1, 1, n, 4, seed=7)


def test_topk_measured_pairs_by_hand():
    q, k, _ = tiny(8)  # 2 blocks of 4; the last 2 tokens are padding
    mask = key_padding(8, (6,))
    diag = TopKSpec(block=4, k=1, sinks=0, local=1)
    # the selection scores 2 real query blocks x 2 real key blocks, each half a pair: 2 pairs in every case
    # query block 0: 4 real queries x 4 real keys; block 1: 2 x 2
    assert diag.measured_pairs(q, k, ScoreMods(scale=0.5, mask=mask)).tolist() == [[20.0 + 2]]
    # causal: rows 0..3 see 1, 2, 3, 4 keys; rows 4, 5 see 1, 2 keys of their block
    assert diag.measured_pairs(q, k, ScoreMods(scale=0.5, mask=mask, causal=True)).tolist() == [[13.0 + 2]]
    pooled = TopKSpec(block=4, k=1, sinks=0, local=1, remainder=True)
    # + one pooled entry for each real query: 4 (block 0 pools block 1) + 2 (block 1 pools block 0)
    assert pooled.measured_pairs(q, k, ScoreMods(scale=0.5, mask=mask)).tolist() == [[26.0 + 2]]
    # causal: block 1 is in block 0's future (no entry); block 1 pools block 0 for its 2 real queries
    assert pooled.measured_pairs(q, k, ScoreMods(scale=0.5, mask=mask, causal=True)).tolist() == [[15.0 + 2]]
    # a third block of padding only is neither selected, pooled nor scored
    q3, k3, _ = tiny(12)
    assert pooled.measured_pairs(q3, k3, ScoreMods(scale=0.5, mask=key_padding(12, (6,)))).tolist() == [[26.0 + 2]]


def test_local_measured_pairs_by_hand():
    q, k, _ = tiny(6)
    spec = LocalSpec(window=1)
    assert spec.measured_pairs(q, k, ScoreMods(scale=0.5)).tolist() == [[16.0]]  # 2 + 3 + 3 + 3 + 3 + 2
    assert spec.measured_pairs(q, k, ScoreMods(scale=0.5, mask=key_padding(6, (4,)))).tolist() == [[10.0]]  # 2+3+3+2
    assert spec.measured_pairs(q, k, ScoreMods(scale=0.5, causal=True)).tolist() == [[11.0]]
    assert LocalSpec(window=1, sinks=1).measured_pairs(q, k, ScoreMods(scale=0.5, causal=True)).tolist() == [[15.0]]


def brute_force_pairs(keep, q_real, k_real):
    """Visible pairs per (batch, head) from a dense bool [B, H, Nq, Nk] and real-token masks [B, N]."""
    return (keep & q_real[:, None, :, None] & k_real[:, None, None, :]).sum((-1, -2)).double()


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_measured_pairs_against_brute_force(causal):
    from attncc.variants.block_sparse import block_keep_to_elements

    n = 53
    q, k, _ = random_qkv(2, 4, 2, n, 8, seed=8)
    mask = key_padding(n, (n, 29))
    real = mask[:, 0, 0]
    mods = ScoreMods(scale=0.3, causal=causal, mask=mask)
    visible = torch.ones(n, n, dtype=torch.bool).tril() if causal else torch.ones(n, n, dtype=torch.bool)
    spec = TopKSpec(block=8, density=0.3)
    keep = block_keep_to_elements(spec.select_blocks(q, k, mods), 8, 8, n, n) & visible
    blocks = torch.tensor([[7.0 * 7.0], [4.0 * 4.0]], dtype=torch.float64)  # ceil(53 / 8), ceil(29 / 8) real blocks
    torch.testing.assert_close(spec.measured_pairs(q, k, mods), brute_force_pairs(keep, real, real) + 0.5 * blocks)
    local = LocalSpec(left=4, right=2, sinks=3, globals=2)
    pattern = local.keep(torch.arange(n)[:, None], torch.arange(n)[None, :], causal) & visible
    torch.testing.assert_close(local.measured_pairs(q, k, mods),
                               brute_force_pairs(pattern.expand(2, 4, n, n), real, real))
