"""topk(remainder=True, clusters=C): the remainder pooled by key k-means cluster. The k-means itself, forward
against the dense oracle (odd N, GQA, causal, padding, decode, softcap, learned sinks), an independent check
(keys drawn from C distinct vectors pool exactly, so the result is exact attention), validation, cost and
measured pairs."""

from __future__ import annotations

import pytest
import torch

from attncc.errors import AttnccError
from attncc.variants import exact
from attncc.variants.base import ScoreMods
from attncc.variants.clusters import KMEANS_PASSES, key_clusters
from attncc.variants.local import LocalSpec
from attncc.variants.topk import TopKSpec
from variant_helpers import POOLED_CASES, key_padding, random_qkv


def distinct_keys(b, h, n, d, kinds, seed):
    """Keys each equal to one of ``kinds`` random vectors (chosen at random per position)."""
    gen = torch.Generator().manual_seed(seed)
    table = 2 * torch.randn(b, h, kinds, d, generator=gen)
    which = torch.randint(0, kinds, (b, h, n), generator=gen)
    return torch.gather(table, 2, which[..., None].expand(b, h, n, d)), which


def test_key_clusters_find_distinct_keys_and_skip_padding():
    k, which = distinct_keys(2, 3, 40, 8, 4, seed=1)
    k = k + 0.01 * torch.randn(k.shape, generator=torch.Generator().manual_seed(2))
    real = key_padding(40, (40, 25))[:, 0, 0]
    assign = key_clusters(k, real, clusters=4)
    assert assign.shape == (2, 3, 40) and assign.dtype == torch.int64
    assert (assign[1, :, 25:] == -1).all() and (assign[:, :, :25] >= 0).all()
    for b in range(2):
        for h in range(3):
            n = 40 if b == 0 else 25
            # same kind <-> same cluster, on the real keys
            same_kind = which[b, h, :n, None] == which[b, h, None, :n]
            same_cluster = assign[b, h, :n, None] == assign[b, h, None, :n]
            assert torch.equal(same_kind, same_cluster)
    assert torch.equal(assign, key_clusters(k, real, clusters=4))  # deterministic


SPECS = {
    "density": TopKSpec(block=8, density=0.25, remainder=True, clusters=6),
    "threshold": TopKSpec(block=4, threshold=0.5, remainder=True, clusters=3),
    "k-nolocal": TopKSpec(block=8, k=1, sinks=0, local=0, remainder=True, clusters=4),
    "local": LocalSpec(window=5, sinks=2, remainder=True, remainder_block=8, clusters=4),
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
def test_softcap_sinks_and_fewer_queries(name):
    spec = SPECS[name]
    q, k, v = random_qkv(2, 4, 2, 45, 16, seed=1)
    mods = ScoreMods(scale=0.5, softcap=2.0, sinks=torch.tensor([0.5, -1.0, 2.0, 0.0]), mask=key_padding(45, (45, 20)))
    torch.testing.assert_close(spec.forward(q, k, v, mods), spec.reference(q, k, v, mods), rtol=1e-5, atol=2e-6)
    decode = TopKSpec(block=8, density=0.25, remainder=True, clusters=5, decode=True)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 11, 16, generator=gen), torch.randn(2, 2, 50, 16, generator=gen),
               torch.randn(2, 2, 50, 16, generator=gen))
    mods = ScoreMods(scale=0.25, mask=key_padding(50, (50, 44)))
    torch.testing.assert_close(decode.forward(q, k, v, mods), decode.reference(q, k, v, mods), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_keys_of_few_kinds_pool_exactly(causal):
    """Keys equal to one of 3 vectors, scattered over the sequence: 3 clusters hold equal keys, and n equal keys
    weigh n * exp(score) whatever their values, so top-k with a clustered remainder is exact attention (positional
    pools, which mix the kinds, are not); the padding's garbage keys must not enter any cluster."""
    n = 45
    k, _ = distinct_keys(2, 2, n, 16, 3, seed=4)
    gen = torch.Generator().manual_seed(5)
    q, v = torch.randn(2, 4, n, 16, generator=gen), torch.randn(2, 2, n, 8, generator=gen)
    mask = key_padding(n, (n, 21))
    k[1, :, 21:] = 100 * torch.randn(2, n - 21, 16, generator=gen)
    mods = ScoreMods(scale=0.4, causal=causal, mask=mask)
    want = exact.reference(q, k, v, scale=0.4, causal=causal, mask=mask)
    spec = TopKSpec(block=8, k=1, sinks=0, local=1, remainder=True, clusters=3)
    torch.testing.assert_close(spec.forward(q, k, v, mods), want, rtol=1e-5, atol=1e-5)
    positional = TopKSpec(block=8, k=1, sinks=0, local=1, remainder=True).forward(q, k, v, mods)
    assert (positional - want).abs().max() > 1e-2
    # local: the keys of a block its band touches but does not cover are neither attended nor pooled, so the
    # result is exact attention over the band and the pooled blocks' keys (a dense mask, no clusters in it)
    local = LocalSpec(window=3, remainder=True, remainder_block=8, clusters=3)
    pos = torch.arange(n)
    visits, _ = local.remainder_layout(n, n, causal)
    pooled = local._entries(visits, mods, n, n, 0)[:, 0]  # [b, nQB, nKB]
    seen = local.keep(pos[:, None], pos[None, :], causal) | pooled[:, pos // 8][:, :, pos // 8]
    want_local = exact.reference(q, k, v, scale=0.4, causal=causal, mask=mask & seen[:, None])
    torch.testing.assert_close(local.forward(q, k, v, mods), want_local, rtol=1e-5, atol=1e-5)


def test_text_and_validation():
    spec = TopKSpec(block=8, density=0.125, remainder=True, clusters=16)
    assert str(spec) == "topk(block=8, density=0.125, remainder=True, clusters=16)"
    from attncc.variants.parse import parse_variant

    assert parse_variant(str(spec)) == spec
    with pytest.raises(AttnccError, match="clusters needs remainder=True"):
        TopKSpec(block=8, density=0.125, clusters=16)
    with pytest.raises(AttnccError, match="not both"):
        TopKSpec(block=8, density=0.125, remainder=True, remainder_block=32, clusters=16)
    with pytest.raises(AttnccError, match="clusters"):
        TopKSpec(block=8, density=0.125, remainder=True, clusters=0)
    local = LocalSpec(window=8, remainder=True, clusters=8)
    assert parse_variant("local(window=8, remainder=True, clusters=8)") == local
    with pytest.raises(AttnccError, match="clusters needs remainder=True"):
        LocalSpec(window=8, clusters=8)


def test_measured_pairs_by_hand():
    """16 keys, blocks of 4, each query block keeping its own block only, 2 clusters of keys of 2 kinds laid out
    so that every query block's 3 skipped blocks hold both kinds: 2 entries per query."""
    k, _ = distinct_keys(1, 1, 16, 4, 2, seed=0)
    k[..., 0::2, :], k[..., 1::2, :] = k[..., 0:1, :], k[..., 1:2, :] + 1  # alternate two kinds
    q = torch.randn(1, 1, 16, 4, generator=torch.Generator().manual_seed(1))
    mods = ScoreMods(scale=0.5)
    spec = TopKSpec(block=4, k=1, sinks=0, local=1, remainder=True, clusters=2)
    kept = 4 * 4 * 4            # 4 query blocks x 4 queries x 4 keys of their own block
    entries = 16 * 2            # every query: 2 cluster entries
    selection = 0.5 * 4 * 4     # the block-pair scores
    kmeans = 0.5 * KMEANS_PASSES * 16 * 2  # distances of 16 keys to 2 centroids per pass
    sums = 0.5 * 4 * 1 * 2      # per query block: its 1 kept block's sums for 2 clusters
    assert spec.measured_pairs(q, k, mods).tolist() == [[kept + entries + selection + kmeans + sums]]


def test_local_measured_pairs_by_hand():
    """16 keys of 2 alternating kinds, window 1, remainder blocks of 4: each query sees 2-3 band keys, its block
    pools the blocks it does not touch, and those hold both kinds: 2 entries per query."""
    k, _ = distinct_keys(1, 1, 16, 4, 2, seed=0)
    k[..., 0::2, :], k[..., 1::2, :] = k[..., 0:1, :], k[..., 1:2, :] + 1
    q = torch.randn(1, 1, 16, 4, generator=torch.Generator().manual_seed(1))
    spec = LocalSpec(window=1, remainder=True, remainder_block=4, clusters=2)
    band = 14 * 3 + 2 * 2
    entries = 16 * 2
    kmeans = 0.5 * KMEANS_PASSES * 16 * 2
    visited = 2 + 3 + 3 + 2    # the blocks each query block's band touches
    sums = 0.5 * visited * 2
    assert spec.measured_pairs(q, k, ScoreMods(scale=0.5)).tolist() == [[band + entries + kmeans + sums]]


def test_cost_counts_the_clustering():
    from attncc.site import AttentionSite

    site = AttentionSite(module="m", source="sdpa", q=None, k=None, v=None, output=None, batch=2, q_heads=8,
                         kv_heads=2, q_len=4096, kv_len=4096, head_dim=64, value_dim=64, dtype=torch.float16)
    plain = TopKSpec(block=8, density=0.125).cost(site)["flops"]
    pooled = TopKSpec(block=8, density=0.125, remainder=True).cost(site)["flops"]
    clustered = TopKSpec(block=8, density=0.125, remainder=True, clusters=16).cost(site)["flops"]
    assert plain < clustered < pooled  # 16 entries per query instead of up to 512 pooled blocks
    kmeans = 2 * 2 * 2 * KMEANS_PASSES * 4096 * 16 * 64
    entries = 2 * 2 * 8 * 4096 * 16 * 128
    assert clustered - plain > kmeans + entries
