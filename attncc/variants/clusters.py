"""A pooled remainder by key *content*: the keys a query block skips, pooled per k-means cluster of the keys.

The positional remainder (``attncc.variants.remainder``) pools each skipped key block into one entry; a block of
neighbouring tokens mixes unlike keys, so its mean key scores poorly for a broad head. Here the keys of each
(batch row, kv head) are grouped by k-means into ``C`` clusters (real keys only; seeded by farthest points,
then ``CLUSTER_ITERS`` Lloyd iterations: deterministic), and a query block adds one entry per cluster, over the
keys of that cluster in the blocks it pools::

    score(i, c) = log(n_Ic) + q_i . mean_k(I, c) * scale        value(I, c) = mean_v(I, c)

where the means and the count ``n_Ic`` run over the real keys of cluster c inside the key blocks query block I
pools (those it skips, that hold a real key and that it sees entirely). On all-MiniLM-L6-v2's last layer,
8-token top-k at density 1/16 with 16 clusters erred 0.26 (relative L2 of the attention output) against 0.50
with 32-key positional pools, and 0.29 at density 1/4 with those.

Cost, per (batch, kv head): the k-means (``KMEANS_PASSES`` passes of ``Nk x C`` distances) and one pass summing
keys and values per (key block, cluster); per query block its cluster sums, the total minus those of the blocks
it keeps (what the measured FLOPs count; the torch path here does it as one dense matmul over the pooled
blocks, which is simpler but does more work than that count); then one score per (query, cluster) entry.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from attncc.util import cdiv
from attncc.variants.base import ScoreMods, sink_rows, softmax_with_sink
from attncc.variants.remainder import Remainder, real_keys
from attncc.variants.score_mods import apply_mods

CLUSTER_ITERS = 1
"""Lloyd iterations of the key k-means after the farthest-point seeding. On all-MiniLM-L6-v2 (8-token top-k at
density 1/16, 16 clusters, relative L2 error of the attention output) the last layer erred 0.273 with none,
0.260 with one, 0.255 with three, against 0.276 for five iterations from random seeds: one buys most of it,
and each costs as much as attending ``C / 2`` more keys per query."""

KMEANS_PASSES = CLUSTER_ITERS + 2
"""Passes of ``Nk x C`` distances the k-means makes: the farthest-point seeding (one distance per key and seed),
an assignment before each Lloyd update, and the final one."""


@torch.no_grad()
def key_clusters(k: Tensor, keys: Optional[Tensor], clusters: int, iters: int = CLUSTER_ITERS) -> Tensor:
    """k-means cluster of every key, int64 ``[B, Hkv, Nk]`` (``-1`` for padding keys).

    k ``[B, Hkv, Nk, D]``; ``keys`` bool ``[b, Nk]`` (b 1 or B): the real keys (None: all). Seeds by farthest
    points (the first real key, then repeatedly the real key farthest from every seed so far: deterministic,
    and keys unlike the rest, such as [CLS] or separators, get clusters of their own), then ``iters`` Lloyd
    iterations (nearest centroid, centroid = mean of its real keys; a cluster that empties keeps its centroid).
    """
    b, h, n, d = k.shape
    kf = k.float()
    real = torch.ones(1, n, dtype=torch.bool, device=k.device) if keys is None else keys.to(k.device)
    real = real.expand(b, n)[:, None, :].expand(b, h, n)
    first = real.long().argmax(-1)  # [B, H]: the first real key
    centroids = torch.gather(kf, 2, first[..., None, None].expand(b, h, 1, d))
    nearest = ((kf - centroids) ** 2).sum(-1)  # [B, H, N]: squared distance to the closest seed
    for _ in range(1, clusters):
        far = nearest.masked_fill(~real, -1.0).argmax(-1)
        seed = torch.gather(kf, 2, far[..., None, None].expand(b, h, 1, d))
        centroids = torch.cat([centroids, seed], dim=2)
        nearest = torch.minimum(nearest, ((kf - seed) ** 2).sum(-1))
    weight = real[..., None].float()
    for step in range(iters + 1):
        # nearest centroid: argmax of k . c - |c|^2 / 2
        assign = (kf @ centroids.transpose(-1, -2) - 0.5 * (centroids * centroids).sum(-1)[..., None, :]).argmax(-1)
        if step == iters:
            break
        onehot = F.one_hot(assign, clusters).float() * weight  # [B, H, N, C]
        sizes = onehot.sum(-2)[..., None]
        centroids = torch.where(sizes > 0, (onehot.transpose(-1, -2) @ kf) / sizes.clamp_min(1), centroids)
    return assign.masked_fill(~real, -1)


def cluster_block_sums(k: Tensor, v: Tensor, assign: Tensor, block: int, clusters: int) -> Tensor:
    """Per (key block, cluster): the count, key sum and value sum of its real keys, float32
    ``[B, Hkv, nKB, C, 1 + D + Dv]`` (``assign`` from :func:`key_clusters`; ``-1`` keys count nowhere)."""
    b, h, n, d = k.shape
    nkb = cdiv(n, block)
    onehot = F.one_hot(assign.clamp_min(0), clusters).float() * (assign >= 0)[..., None].float()  # [B, H, N, C]
    rows = torch.cat([torch.ones(b, h, n, 1, device=k.device), k.float(), v.float()], dim=-1)  # [B, H, N, X]
    pad = nkb * block - n
    onehot, rows = F.pad(onehot, (0, 0, 0, pad)), F.pad(rows, (0, 0, 0, pad))
    return torch.einsum("bhjnc,bhjnx->bhjcx", onehot.unflatten(2, (nkb, block)), rows.unflatten(2, (nkb, block)))


def clustered_remainder(k: Tensor, v: Tensor, mask: Optional[Tensor], pooled: Tensor, block: int,
                        clusters: int, iters: int = CLUSTER_ITERS) -> Remainder:
    """The :class:`Remainder` of query blocks that pool the key blocks ``pooled`` (bool ``[B, Hq, nQB, nKB]``),
    by key cluster: keys and values ``[B, Hq, nQB, C, D|Dv]`` (means per query block), ``log_count`` and
    ``entries`` ``[B, Hq, nQB, C]`` (an entry where the cluster has a real key among the pooled blocks)."""
    b, hkv, nk, d = k.shape
    hq, nqb, nkb = pooled.shape[1], pooled.shape[2], pooled.shape[3]
    g = hq // hkv
    assign = key_clusters(k, real_keys(mask, nk), clusters, iters)
    sums = cluster_block_sums(k, v, assign, block, clusters)  # [B, Hkv, nKB, C, X]
    x = sums.shape[-1]
    # sum over the pooled blocks of each query block: [B, Hkv, g * nQB, nKB] @ [B, Hkv, nKB, C * X]
    per_query_block = pooled.expand(b, hq, nqb, nkb).float().reshape(b, hkv, g * nqb, nkb) @ sums.flatten(-2)
    per_query_block = per_query_block.view(b, hq, nqb, clusters, x)
    count = per_query_block[..., 0]
    mean = per_query_block[..., 1:] / count[..., None].clamp_min(1)
    entries = count > 0.5
    return Remainder(mean[..., :d], mean[..., d:], count.clamp_min(1).log(), entries)


def clustered_reference(q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods, keep: Tensor, pooled: Tensor, block: int,
                        assign: Tensor, pad: int = 0) -> Tensor:
    """Dense float32 oracle: exact attention over the pairs ``keep`` (bool broadcastable to ``[B, Hq, Nq, Nk]``,
    ``mods`` applied on top) plus, for query row i (in block ``(i + pad) // block``), one entry per cluster
    (``assign`` ``[B, Hkv, Nk]``) over the real keys of that cluster in the key blocks ``pooled``
    (``[B, Hq, nQB, nKB]``) lists for its block: the means written as a dense averaging matrix
    ``[B, Hq, Nq, C, Nk]``, the pooled score softcapped like any score, learned sinks in the denominator."""
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    ke, ve = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    clusters = int(assign.max()) + 1
    member = F.one_hot(assign.clamp_min(0), clusters).bool() & (assign >= 0)[..., None]  # [B, Hkv, Nk, C]
    member = member.repeat_interleave(g, 1)
    row_block = (torch.arange(nq, device=q.device) + pad) // block
    key_block = torch.arange(nk, device=q.device) // block
    pooled_keys = pooled.expand(b, hq, -1, -1)[:, :, row_block][..., key_block]  # [B, Hq, Nq, Nk]
    weights = (pooled_keys[..., None] & member[:, :, None]).float().transpose(-1, -2)  # [B, Hq, Nq, C, Nk]
    count = weights.sum(-1)
    pk = (weights @ ke[:, :, None]) / count[..., None].clamp_min(1)  # [B, Hq, Nq, C, D]
    pv = (weights @ ve[:, :, None]) / count[..., None].clamp_min(1)
    s = apply_mods(q.float() @ ke.transpose(-1, -2), mods).masked_fill(~keep, float("-inf"))
    sp = (pk @ q.float()[..., None]).squeeze(-1) * mods.scale
    if mods.softcap > 0:
        sp = mods.softcap * torch.tanh(sp / mods.softcap)
    sp = (sp + count.clamp_min(1).log()).masked_fill(count < 0.5, float("-inf"))
    # a row that sees nothing (every score -inf, no sink) gives zeros, as the executor does
    p = softmax_with_sink(torch.cat([s, sp], dim=-1), sink_rows(mods.sinks, 1, hq, 1, 1)).nan_to_num(0.0)
    out = p[..., :nk] @ ve + (p[..., nk:, None] * pv).sum(-2)
    return out.to(q.dtype)


def clustering_pairs(real_keys: Tensor, kept_blocks: Tensor, clusters: int, group: int) -> Tensor:
    """The clustered remainder's own work in pairs (a pair is ``2 (D + Dv)`` FLOPs; a distance, or a sum of
    ``D + Dv`` floats, is counted as half a pair), float64 ``[B, Hq]``: the k-means (``KMEANS_PASSES`` passes of
    a distance per real key and cluster; ``real_keys`` ``[b]`` real keys per batch row; per kv head, shared by
    its ``group`` query heads) and each query block's cluster sums, the total minus those of the key blocks it
    visits (``kept_blocks`` float ``[B, Hq]``: visited blocks summed over the real query blocks)."""
    kmeans = 0.5 * KMEANS_PASSES * real_keys.double() * clusters / group
    return kmeans[:, None].to(kept_blocks.device) + 0.5 * kept_blocks.double() * clusters


__all__ = [
    "CLUSTER_ITERS", "KMEANS_PASSES", "cluster_block_sums", "clustered_reference", "clustered_remainder",
    "clustering_pairs", "key_clusters",
]
