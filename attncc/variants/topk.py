"""Dynamic top-k block sparsity (training-free; in the spirit of MoBA, BiFormer and SpargeAttn).

``TopKSpec(block=64, density=0.125)`` reads as text ``topk(block=64, density=0.125, k=None, threshold=None,
sinks=1, local=1)``. Per (batch, query head), each query block picks the key blocks it attends from a cheap
estimate of the block-level attention:

1. mean-pool q over each query block and k over each key block (the ragged last block averages its real
   tokens); a GQA query head is scored against the pooled keys of the kv head it reads. Padding is left out:
   where ``mods.mask`` is a key-padding mask (``[B, 1, 1, Nk]``), a key block averages only its real keys and
   a query block only its real queries (self-attention: query ``i`` is the token at ``Nk - Nq + i``; Nq == Nk
   is taken as self-attention); a query block of padding only averages all its rows (its rows are computed
   like any other, as exact attention computes padded query rows, and their outputs follow the reference);
2. score every (query block, key block) pair as ``pooled_q . pooled_k * scale`` (bias, softcap, dropout and
   learned sink logits do not enter the estimate; causality and the mask do: a key block that is entirely in
   the future, or entirely masked for the query block, is never picked);
3. keep the ``local`` diagonal blocks (the query block's own key block and the ``local - 1`` before it) and
   the first ``sinks`` key blocks, then fill up by score: up to ``k`` blocks in all, or
   ``ceil(density * nKB)`` (at least 1), or the fewest blocks whose softmax mass over the pooled scores
   reaches ``threshold``. Forced blocks count toward ``k``/``density``, and their mass counts toward
   ``threshold`` (they are ranked first: the fill adds only the mass still missing). With a key-padding mask,
   ``nKB`` counts the key blocks of each batch row that hold a real key (a block of padding only is neither
   counted nor ever selected).

Fewer queries than keys with ``decode=True`` (decode, chunked prefill; the plan sets it): the queries are the last Nq tokens (query ``i`` at
position ``Nk - Nq + i``); query blocks are blocks of those absolute positions, so a decode step scores its one
query row against every pooled key block of the cache and keeps its own block (``local``), the ``sinks`` first
blocks and the best-scoring rest.

The chosen blocks are computed exactly (every pair inside them, under the ScoreMods, learned sink logits
included) by ``block_sparse_attention``; a query that sees no key returns zeros. With ``density=1`` every
allowed block is kept and the result equals exact attention. The selection is not differentiated (it is a
discrete choice); gradients flow through the attention over the chosen blocks.

``remainder=True`` adds, to each query block's softmax, one pooled entry for every key block it skips
(``attncc.variants.remainder``): score ``log(count) + softcap(q . mean(k) * scale)``, value ``mean(v)``, over
the block's real keys. Under causality only key blocks entirely visible to every query of the query block are
pooled; a partly visible one (the diagonal, when ``local=0`` leaves it out) is skipped without an entry. A bias
cannot be pooled (it differs per key): such sites are declined, as are masks other than key padding. With
``density=1`` nothing is skipped and the result is exact attention. ``remainder_block=R`` (a multiple of
``block``) pools each run of R keys a query block selects nothing of as one entry (the selection stays fine,
the remainder costs about ``1 / R`` of dense); ``clusters=C`` pools the skipped keys by k-means cluster of the
keys instead of by position (``attncc.variants.clusters``), one entry per cluster.

``measured_pairs`` counts what a call actually scored: the visible pairs of the selected blocks between real
queries and real keys, plus one pair per pooled entry and real query, plus the selection's block-pair scores
(and, with ``clusters``, the k-means and the per-query-block sums): the report's measured FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, Optional

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor

from attncc.errors import AttnccError
from attncc.util import cdiv
from attncc.variants.base import (
    ScoreMods, VariantSpec, attention_cost, check_int, site_sizes, unapplied_site_features,
)
from attncc.variants.block_sparse import block_keep_to_elements, blocks_to_keep
from attncc.variants.exact import masked_reference
from attncc.variants.local import TOP_LEFT_CAUSAL
from attncc.variants.registry import register_variant
from attncc.variants.blocks import BlockLayout, block_sparse_attention
from attncc.variants.clusters import (
    KMEANS_PASSES, clustered_reference, clustered_remainder, clustering_pairs, key_clusters,
)
from attncc.variants.remainder import (
    Remainder, block_counts, check_poolable, fully_visible, pool_blocks, pooled_keys_values, real_keys, real_queries,
    remainder_reference,
)


def _pool(x: Tensor, block: int) -> Tensor:
    """Mean over blocks of the sequence dim: ``[..., N, D]`` -> float32 ``[..., ceil(N / block), D]``."""
    n = x.shape[-2]
    nb, whole = cdiv(n, block), n // block
    # Sum whole blocks in place and the ragged tail apart: padding would copy all of x.
    parts = [x[..., : whole * block, :].unflatten(-2, (whole, block)).sum(dim=-2, dtype=torch.float32)]
    if whole < nb:
        parts.append(x[..., whole * block:, :].sum(dim=-2, keepdim=True, dtype=torch.float32))
    sums = torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]
    counts = torch.clamp(n - torch.arange(nb, device=x.device) * block, max=block).to(sums.dtype)
    return sums / counts[:, None]


def _block_any(mask: Tensor, block: int, nq: int, nk: int) -> Tensor:
    """A bool mask broadcastable to ``[B, Hq, Nq, Nk]`` -> whether any element of each block is True,
    ``[b, h, nQB or 1, nKB or 1]`` (broadcast dims stay size 1)."""
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if m.shape[-1] != 1:
        m = torch.nn.functional.pad(m, (0, cdiv(nk, block) * block - nk)).unflatten(-1, (-1, block)).any(-1)
    if m.shape[-2] != 1:
        m = m.transpose(-2, -1)
        m = torch.nn.functional.pad(m, (0, cdiv(nq, block) * block - nq)).unflatten(-1, (-1, block)).any(-1)
        m = m.transpose(-2, -1)
    return m


def _as_fraction(spec: "TopKSpec", field_name: str, value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise spec.invalid(field_name, f"must be a number in (0, 1], got {value!r}")
    return float(value)


@register_variant
@dataclass(frozen=True)
class TopKSpec(VariantSpec):
    """Dynamic block-sparse attention choosing key blocks per query block from mean-pooled scores.

    Exactly one of ``density`` (fraction of key blocks, in (0, 1]), ``k`` (blocks per query block) or
    ``threshold`` (softmax mass of the pooled scores to reach, in (0, 1]) is given.
    """

    name: ClassVar[str] = "topk"
    block: int = 64
    density: Optional[float] = None
    k: Optional[int] = None
    threshold: Optional[float] = None
    sinks: int = 1
    local: int = 1
    decode: bool = False
    """Fewer queries than keys are the *last* tokens (bottom-right): query blocks are blocks of absolute positions
    (see the module docstring); the plan sets it on self-attention sites with fewer queries than keys (decode
    with a KV cache). Without it such calls are aligned top-left, as before."""
    remainder: bool = False
    """Every key block a query block skips enters its softmax as one pooled entry (``attncc.variants.remainder``:
    score ``log(count) + q . mean(k) * scale``, value ``mean(v)``, padding excluded). Declines sites with a bias
    or a mask other than key padding."""
    remainder_block: Optional[int] = None
    """Coarser pooling of the remainder (a multiple of ``block``; ``remainder=True`` only): a run of
    ``remainder_block`` keys of which a query block selects nothing becomes *one* pooled entry instead of
    ``remainder_block / block``; skipped blocks next to selected ones stay pooled per ``block``. The selection
    stays fine while the remainder costs about ``1 / remainder_block`` of dense."""
    clusters: Optional[int] = None
    """Pool the remainder by key *content* instead (``remainder=True`` only; ``attncc.variants.clusters``): the
    keys are grouped into this many k-means clusters per (batch row, kv head), and each query block adds one
    entry per cluster over that cluster's keys in the blocks it skips. Broad heads err far less than with
    positional pools of the same number of entries."""

    listed: ClassVar[int] = 40

    @classmethod
    def examples(cls) -> tuple[VariantSpec, ...]:
        return (cls(block=4, density=0.5), cls(block=2, k=2, sinks=0, local=1), cls(block=4, threshold=0.8),
                cls(block=4, density=0.25, remainder=True))

    @classmethod
    def exact_limit(cls, n: int) -> VariantSpec:
        return cls(block=4, density=1.0)

    def __post_init__(self):
        check_int(self, "block", self.block, minimum=1)
        given = [n for n in ("density", "k", "threshold") if getattr(self, n) is not None]
        if len(given) != 1:
            raise AttnccError(
                f"topk: give exactly one of density, k or threshold (got density={self.density!r}, "
                f"k={self.k!r}, threshold={self.threshold!r})"
            )
        # Stored as floats so the canonical text is stable (density=1 and density=1.0 read the same).
        object.__setattr__(self, "density", _as_fraction(self, "density", self.density))
        object.__setattr__(self, "threshold", _as_fraction(self, "threshold", self.threshold))
        check_int(self, "k", self.k, minimum=1, allow_none=True)
        check_int(self, "sinks", self.sinks)
        check_int(self, "local", self.local)
        if not isinstance(self.decode, bool):
            raise self.invalid("decode", f"must be True or False, got {self.decode!r}")
        if not isinstance(self.remainder, bool):
            raise self.invalid("remainder", f"must be True or False, got {self.remainder!r}")
        if self.remainder_block is not None:
            check_int(self, "remainder_block", self.remainder_block, minimum=1)
            if not self.remainder:
                raise self.invalid("remainder_block", "needs remainder=True")
            if self.remainder_block % self.block:
                raise self.invalid("remainder_block", f"must be a multiple of block ({self.block}), "
                                                      f"got {self.remainder_block}")
            if self.remainder_block == self.block:  # the default spelled out: one canonical text
                object.__setattr__(self, "remainder_block", None)
        if self.clusters is not None:
            check_int(self, "clusters", self.clusters, minimum=1)
            if not self.remainder:
                raise self.invalid("clusters", "needs remainder=True")
            if self.remainder_block is not None:
                raise self.invalid("clusters", "pools by key content: give clusters or remainder_block, not both")

    def aligns_last_queries(self) -> bool:
        return self.decode

    def specialize(self, site):
        """The spec for ``site``: ``decode=True`` on self-attention with fewer queries than keys (a decode step
        against a KV cache), else as the default does."""
        spec = super().specialize(site)
        if isinstance(spec, TopKSpec) and site.kind == "self" and site.q_len != site.kv_len:
            return replace(spec, decode=True)
        return spec

    # ------------------------------------------------------------------------------------------ supports

    def supports(self, site) -> tuple[bool, str]:
        """Self-attention sites (Nq == Nk, or Nq < Nk: the last tokens' queries against a KV cache, blocks
        bottom-right aligned), without dropout or band/segment masks; bias, softcap, padding and dense masks
        are applied."""
        reason = unapplied_site_features(self, site, band=True)
        if reason:
            return False, reason
        if site.q_len != site.kv_len and site.kind != "self":
            return False, f"topk needs as many queries as keys on cross-attention (Nq={site.q_len}, " \
                          f"Nk={site.kv_len}); fewer queries than keys are aligned only for self-attention (decode)"
        if isinstance(site.q_len, int) and isinstance(site.kv_len, int) and site.q_len > site.kv_len:
            return False, f"topk needs at most as many queries as keys (Nq={site.q_len}, Nk={site.kv_len})"
        if site.causal and site.q_len != site.kv_len:
            return False, TOP_LEFT_CAUSAL
        if self.remainder and site.has_bias:
            return False, "topk(remainder=True) cannot pool an additive bias into its remainder (it differs per key)"
        if self.remainder and site.mask_residual == "dense":
            return False, "topk(remainder=True) pools key-padding masks only, this site has a dense mask"
        more = " + pooled remainder" if self.remainder else ""
        return True, f"dynamic top-k block sparsity ({self._budget_text()}){more}"

    def _budget_text(self) -> str:
        if self.density is not None:
            return f"density {self.density:g}"
        if self.k is not None:
            return f"{self.k} key blocks per query block"
        return f"softmax mass {self.threshold:g}"

    # ---------------------------------------------------------------------------------------------- cost

    def blocks_kept(self, nkb: int) -> int:
        """Key blocks the k/density budget keeps per query block out of ``nkb`` (``nkb`` for a threshold rule,
        which decides per row); the Triton selection uses the same count."""
        if self.k is not None:
            return min(nkb, self.k)
        if self.density is not None:
            # round() first: 0.1 * 30 is 3.0000000000000004 in floats, which must not become 4 blocks.
            return min(nkb, max(1, math.ceil(round(self.density * nkb, 9))))
        return nkb

    def pairs(self, site) -> sympy.Expr:
        """(query, key) pairs scored per (batch, head): all elements of the kept blocks. ``threshold`` keeps
        a data-dependent number of blocks, so it counts the dense bound."""
        b = self.block
        if isinstance(site.q_len, int) and isinstance(site.kv_len, int):
            nq, nk = site.q_len, site.kv_len
            nkb = cdiv(nk, b)
            kept = max(self.blocks_kept(nkb), min(nkb, self.local + self.sinks))
            total = 0
            for qb in range(cdiv(nq, b)):
                rows = min(b, nq - qb * b)
                visible = min(nk, (qb + 1) * b) if site.causal else nk
                total += rows * min(visible, kept * b)
            return sympy.Integer(total)
        s = site_sizes(site)
        nq, nk = s["Nq"], s["Nk"]
        if self.k is not None:
            return sympy.Min(nq * nk, nq * max(self.k, self.local + self.sinks) * b)
        if self.density is not None:
            return sympy.Min(nq * nk, sympy.nsimplify(self.density) * nq * nk + nq * (self.local + self.sinks) * b)
        return nq * nk

    def cost(self, site) -> dict[str, sympy.Expr]:
        """Attention over the kept blocks, plus pooling q and k and scoring every block pair (with
        ``remainder``: plus pooling v and scoring each query against every pooled key block, an upper bound
        on the pooled entries)."""
        out = attention_cost(site, self.pairs(site))
        s = site_sizes(site)
        b = self.block
        pooled = s["B"] * (s["Hq"] * s["Nq"] + s["Hkv"] * s["Nk"]) * s["D"]
        nqb, nkb = sympy.ceiling(s["Nq"] / b), sympy.ceiling(s["Nk"] / b)
        out["flops"] = out["flops"] + pooled + 2 * s["B"] * s["Hq"] * nqb * nkb * s["D"]
        itemsize = site.dtype.itemsize if getattr(site, "dtype", None) is not None else 4
        out["bytes"] = out["bytes"] + itemsize * pooled
        if self.remainder:  # pooling v, and one pooled entry per (query, key block): about 1/block of dense
            out["flops"] = out["flops"] + s["B"] * s["Hkv"] * s["Nk"] * s["Dv"] \
                + 2 * s["B"] * s["Hq"] * s["Nq"] * self._entries_bound(site) * (s["D"] + s["Dv"])
        if self.clusters is not None:  # the k-means, and each query block's sums (total minus its kept blocks)
            out["flops"] = out["flops"] + 2 * s["B"] * s["Hkv"] * KMEANS_PASSES * s["Nk"] * self.clusters * s["D"] \
                + s["B"] * s["Hq"] * nqb * self._kept_bound(site) * self.clusters * (1 + s["D"] + s["Dv"])
        return out

    def _kept_bound(self, site) -> sympy.Expr:
        """Key blocks a query block keeps, an upper bound (every block for a threshold)."""
        s = site_sizes(site)
        nkb = sympy.ceiling(s["Nk"] / self.block)
        if self.k is not None:
            return sympy.Min(nkb, max(self.k, self.local + self.sinks))
        if self.density is not None:
            return sympy.Min(nkb, sympy.ceiling(sympy.nsimplify(self.density) * nkb) + self.local + self.sinks)
        return nkb

    def _entries_bound(self, site) -> sympy.Expr:
        """Pooled entries per query, an upper bound: every key block, or with a coarser ``remainder_block`` one
        per coarse block plus the fine blocks left beside each kept block, or one per cluster."""
        s = site_sizes(site)
        nkb = sympy.ceiling(s["Nk"] / self.block)
        if self.clusters is not None:
            return sympy.Min(nkb * self.block, self.clusters)
        rb = self.remainder_block or self.block
        if rb == self.block:
            return nkb
        return sympy.Min(nkb, sympy.ceiling(s["Nk"] / rb) + self._kept_bound(site) * (rb // self.block - 1))

    # ----------------------------------------------------------------------------------------- selection

    @torch.no_grad()
    def select(self, q: Tensor, k: Tensor, mods: ScoreMods) -> Tensor:
        """The key blocks each query block attends: int64 ``[B, Hq, nQB, K]``, ascending, ``-1`` padding last.

        q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``. Memory is ``O(B * Hq * nQB * nKB)`` (block pairs). With
        Nq < Nk the queries are the last Nq tokens (bottom-right): query blocks are blocks of absolute positions
        (the first one holds ``(Nk - Nq) % block`` fewer rows), so a decode step's one query block is the block
        of its position; ``nQB`` counts those blocks (``decode_rows(...)`` gives the row padding).
        """
        return _to_lists(self.select_blocks(q, k, mods))

    @torch.no_grad()
    def select_blocks(self, q: Tensor, k: Tensor, mods: ScoreMods) -> Tensor:
        """The selection of :meth:`select` as a bool block mask ``[B, Hq, nQB, nKB]``."""
        b = self.block
        batch, hq, nq, d = q.shape
        hkv, nk = k.shape[-3], k.shape[-2]
        pad, first = self._decode_rows(nq, nk)
        nqb, nkb = cdiv(nq + pad, b), cdiv(nk, b)
        keys = real_keys(mods.mask, nk)  # [b, Nk] where the mask is key padding: pooling skips padding
        queries = real_queries(keys, nq, nk, self_attention=nq == nk or self.decode)
        pq = pool_blocks(q, b, queries, front=pad)  # [B, Hq, nQB, D], [B, Hkv, nKB, D]
        pk = pool_blocks(k, b, keys).expand(batch, hkv, nkb, d)
        # Query head h reads kv head h // g: group the g query heads' rows under their kv head.
        pq = pq.reshape(batch, hkv, (hq // hkv) * nqb, d)
        scores = ((pq @ pk.transpose(-2, -1)) * mods.scale).reshape(batch, hq, nqb, nkb)

        qb = torch.arange(nqb, device=q.device)[:, None]
        kb = torch.arange(nkb, device=q.device)[None, :]
        allowed = torch.ones(nqb, nkb, dtype=torch.bool, device=q.device)
        if mods.causal:  # top-left (SDPA): query row i sees keys j <= i
            last_q = torch.clamp((qb + 1) * b - pad, max=nq) - 1
            allowed = kb * b <= last_q
        if mods.mask is not None:
            allowed = allowed & _block_any(_pad_rows(mods.mask.to(q.device), pad, False), b, nq + pad, nk)
        allowed = allowed.expand(batch, hq, nqb, nkb)
        diagonal = qb + first  # the key block at each query block's positions
        forced = ((kb <= diagonal) & (kb > diagonal - self.local)) | (kb < self.sinks)
        forced = forced & allowed

        scores = scores.masked_fill(~allowed, float("-inf"))
        if self.threshold is not None:
            keep = self._by_mass(scores, allowed, forced)
        else:
            kept = self.budget(keys, nk)  # int64 [b, 1, 1, 1]: per batch row, over its key blocks with a real key
            width = min(nkb, max(self.blocks_kept(nkb), self.local + self.sinks))
            top = scores.masked_fill(forced, float("inf")).topk(width, dim=-1)
            # Forced blocks (+inf) come first; past the budget only forced ones stay.
            take = top.values > float("-inf")
            take &= (torch.arange(width, device=q.device) < kept) | (top.values == float("inf"))
            keep = torch.zeros_like(allowed)
            keep.scatter_(-1, top.indices, take)
        return (keep | forced) & allowed

    def budget(self, keys: Optional[Tensor], nk: int) -> Tensor:
        """Key blocks the k/density budget keeps per query block, int64 ``[b, 1, 1, 1]``: ``blocks_kept`` of the
        number of key blocks holding a real key in each batch row (``keys`` bool ``[b, Nk]``; None: all of
        them). A block of padding only is never counted (nor selected)."""
        nkb = cdiv(nk, self.block)
        device = keys.device if keys is not None else None
        if keys is None:
            return torch.full((1, 1, 1, 1), self.blocks_kept(nkb), dtype=torch.int64, device=device)
        real_blocks = (block_counts(keys, nk, self.block, keys.device) > 0).sum(-1)  # [b]
        table = torch.tensor([self.blocks_kept(n) for n in range(nkb + 1)], device=keys.device)
        return table[real_blocks].view(-1, 1, 1, 1)

    def _by_mass(self, scores: Tensor, allowed: Tensor, forced: Tensor) -> Tensor:
        """The fewest blocks whose softmax mass (over the pooled scores) reaches the threshold, counting the
        forced blocks first: they are kept whatever their scores, so their mass counts toward the threshold
        and the fill by score adds only what is still missing."""
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with nothing allowed: no mass anywhere
        order = scores.masked_fill(forced, float("inf")).argsort(dim=-1, descending=True)
        p = probs.gather(-1, order)
        before = p.cumsum(dim=-1) - p
        keep = torch.zeros_like(allowed)
        keep.scatter_(-1, order, before < self.threshold)
        return keep

    # ------------------------------------------------------------------------------------------- forward

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        """Select blocks, then run exact attention over them (plus, with ``remainder``, one pooled entry per
        skipped key block). q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``, v ``[B, Hkv, Nk, Dv]`` ->
        ``[B, Hq, Nq, Dv]`` in q's dtype; no N x N tensor is built. Nq < Nk: the queries are the last tokens
        (``select``); q gets ``pad`` leading zero rows so that its blocks are blocks of absolute positions, and
        their output is dropped."""
        keep = self.select_blocks(q, k, mods)
        blocks = _to_lists(keep)
        pad, _ = self._decode_rows(q.shape[-2], k.shape[-2])
        remainder = self.pooled_remainder(q, k, v, mods, keep) if self.remainder else None
        if not pad:
            layout = BlockLayout(self.block, self.block, q.shape[-2], k.shape[-2], blocks)
            return block_sparse_attention(q, k, v, layout, mods, remainder=remainder)
        if mods.causal:  # top-left causality at the unpadded rows, as a mask (rare: dispatch runs exact here)
            rows, cols = torch.arange(q.shape[-2], device=q.device), torch.arange(k.shape[-2], device=q.device)
            causal = cols[None, :] <= rows[:, None]
            mods = replace(mods, causal=False, mask=causal if mods.mask is None else mods.mask & causal)
        padded = replace(mods, bias=_pad_rows(mods.bias, pad, 0.0), mask=_pad_rows(mods.mask, pad, True))
        layout = BlockLayout(self.block, self.block, q.shape[-2] + pad, k.shape[-2], blocks)
        out = block_sparse_attention(F.pad(q, (0, 0, pad, 0)), k, v, layout, padded, remainder=remainder)
        return out[..., pad:, :]

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        """Float32 oracle: the same selection as a dense ``[B, Hq, Nq, Nk]`` mask over exact attention (with
        ``remainder``: plus the pooled entries, built densely by ``remainder_reference``)."""
        keep_blocks = self.select_blocks(q, k, mods)
        nq, nk = q.shape[-2], k.shape[-2]
        pad, _ = self._decode_rows(nq, nk)
        keep = block_keep_to_elements(keep_blocks, self.block, self.block, nq + pad, nk)[..., pad:, :]
        if not self.remainder:
            return masked_reference(q, k, v, mods, keep)
        if self.clusters is not None:
            check_poolable(self.name, mods, nk)
            assign = key_clusters(k, real_keys(mods.mask, nk), self.clusters)
            pooled = self._pooled_blocks(keep_blocks, mods, nq, nk)
            return clustered_reference(q, k, v, mods, keep, pooled, self.block, assign, pad)
        entries = self.remainder_entries(keep_blocks, mods, nq, nk)
        return remainder_reference(q, k, v, mods, keep, self.block, entries, pad, self._coarse_blocks())

    # ----------------------------------------------------------------------------------------- remainder

    def remainder_entries(self, keep: Tensor, mods: ScoreMods, nq: int, nk: int) -> Tensor:
        """Bool ``[B, Hq, nQB, nR]``: the pooled blocks each query block adds (``remainder=True``): the key
        blocks it does not visit (``keep``, from :meth:`select_blocks`) that hold a real key and are visible to
        every one of its queries (``nR = nKB``). Under causality a block partly in the future of the query block
        (its diagonal block, where ``local=0`` leaves it out) is skipped without a pooled entry: part of it must
        stay hidden.

        With a coarser ``remainder_block`` the entries go on past ``nKB``, one per coarse block: a coarse block
        the query block selects nothing of (and sees entirely) is one entry there, and its fine blocks are not
        entries; the fine blocks of the other coarse blocks are pooled per ``block`` as above."""
        b = self.block
        nqb, nkb = keep.shape[-2:]
        pad, _ = self._decode_rows(nq, nk)
        keys = real_keys(mods.mask, nk)
        fine = self._pooled_blocks(keep, mods, nq, nk)
        coarse = self._coarse_blocks()
        if not coarse:
            return fine
        rb = coarse[0]
        ratio, ncb = rb // b, cdiv(nk, rb)
        touched = F.pad(keep, (0, ncb * ratio - nkb)).unflatten(-1, (ncb, ratio)).any(-1)  # [B, Hq, nQB, nCB]
        coarse_counts = block_counts(keys, nk, rb, keep.device)
        whole = ~touched & fully_visible(nqb, ncb, b, nq, nk, mods.causal, pad, keep.device, key_block=rb) \
            & (coarse_counts > 0)[:, None, None, :]
        fine = fine & ~whole.repeat_interleave(ratio, dim=-1)[..., :nkb]
        return torch.cat([fine, whole], dim=-1)

    def _pooled_blocks(self, keep: Tensor, mods: ScoreMods, nq: int, nk: int) -> Tensor:
        """Bool ``[B, Hq, nQB, nKB]``: the key blocks each query block pools (skipped, holding a real key, seen
        entirely by each of its queries)."""
        nqb, nkb = keep.shape[-2:]
        pad, _ = self._decode_rows(nq, nk)
        counts = block_counts(real_keys(mods.mask, nk), nk, self.block, keep.device)  # [b, nKB]
        visible = fully_visible(nqb, nkb, self.block, nq, nk, mods.causal, pad, keep.device)
        return ~keep & visible & (counts > 0)[:, None, None, :]

    def _coarse_blocks(self) -> tuple[int, ...]:
        """The coarser pooled block sizes after ``block`` (``(remainder_block,)`` or none)."""
        rb = self.remainder_block
        return (rb,) if rb is not None and rb != self.block else ()

    def pooled_remainder(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods, keep: Tensor) -> Remainder:
        """The :class:`Remainder` of a selection ``keep`` (bool ``[B, Hq, nQB, nKB]``): pooled keys and values
        of every key block (then of every coarse block) over its real keys, and the entries of
        :meth:`remainder_entries`."""
        check_poolable(self.name, mods, k.shape[-2])
        if self.clusters is not None:
            pooled = self._pooled_blocks(keep, mods, q.shape[-2], k.shape[-2])
            return clustered_remainder(k, v, mods.mask, pooled, self.block, self.clusters)
        keys, values, log_count = pooled_keys_values(k, v, self.block, mods.mask)
        for size in self._coarse_blocks():
            more = pooled_keys_values(k, v, size, mods.mask)
            keys, values = torch.cat([keys, more[0]], dim=-2), torch.cat([values, more[1]], dim=-2)
            log_count = torch.cat([log_count, more[2]], dim=-1)
        entries = self.remainder_entries(keep, mods, q.shape[-2], k.shape[-2])
        return Remainder(keys, values, log_count, entries)

    # ---------------------------------------------------------------------------------------- measured

    @torch.no_grad()
    def measured_pairs(self, q: Tensor, k: Tensor, mods: ScoreMods) -> Tensor:
        """(query, key) pairs scored per batch row and query head, float64 ``[B, Hq]``: the visible pairs of
        the selected blocks between real queries and real keys (padding excluded, causality applied), plus
        one pair per pooled remainder entry of each real query, plus the selection itself: every (query block,
        key block) score of pooled rows holding a real token, each counted as half a pair (one ``D``-dot, where
        a pair is a ``D``-dot and a ``Dv``-wide update)."""
        keep = self.select_blocks(q, k, mods)
        nq, nk = q.shape[-2], k.shape[-2]
        pad, _ = self._decode_rows(nq, nk)
        if self.clusters is not None:
            entries = clustered_remainder(k, k[..., :1], mods.mask, self._pooled_blocks(keep, mods, nq, nk),
                                          self.block, self.clusters).entries
        else:
            entries = self.remainder_entries(keep, mods, nq, nk) if self.remainder else None
        pairs = selected_pairs(keep, self.block, pad, nq, nk, mods, entries)
        keys = real_keys(mods.mask, nk)
        keys = torch.ones(1, nk, dtype=torch.bool, device=q.device) if keys is None else keys
        queries = real_queries(keys, nq, nk, self_attention=nq == nk or self.decode)
        queries = torch.ones(1, nq, dtype=torch.bool, device=q.device) if queries is None else queries
        key_blocks = (block_counts(keys, nk, self.block, q.device) > 0).sum(-1).double()
        query_blocks = (block_counts(F.pad(queries, (pad, 0)), nq + pad, self.block, q.device) > 0).sum(-1).double()
        pairs = pairs + (0.5 * key_blocks * query_blocks)[:, None].to(pairs.device)
        if self.clusters is not None:
            pairs = pairs + self._clustering_pairs(keep, keys, queries, pad, q.shape[1] // k.shape[1])
        return pairs

    def _clustering_pairs(self, keep: Tensor, keys: Tensor, queries: Tensor, pad: int, group: int) -> Tensor:
        """``clusters.clustering_pairs`` of this selection: the blocks each real query block keeps."""
        rows = F.pad(queries, (pad, 0))
        blocks = F.pad(rows, (0, keep.shape[-2] * self.block - rows.shape[-1])).unflatten(-1, (-1, self.block)).any(-1)
        kept = (keep.double().sum(-1) * blocks[:, None, :].double()).sum(-1)  # [B, Hq]
        return clustering_pairs(keys.sum(-1), kept, self.clusters, group)

    def _decode_rows(self, nq: int, nk: int) -> tuple[int, int]:
        """``decode_rows`` with ``decode=True``, ``(0, 0)`` (top-left) otherwise."""
        return decode_rows(nq, nk, self.block) if self.decode else (0, 0)


def selected_pairs(keep: Tensor, block: int, pad: int, nq: int, nk: int, mods: ScoreMods,
                   entries: Optional[Tensor] = None) -> Tensor:
    """Pairs a block selection scores, float64 ``[B, Hq]``: for each query block (``keep`` bool
    ``[B, Hq, nQB, nKB]``, query row ``i`` in block ``(i + pad) // block``), its real queries times the real
    keys of its selected blocks that they see (top-left causality under ``mods.causal``), plus one pair per
    pooled ``entries`` block (same shape as ``keep``) and real query. Real tokens: ``mods.mask`` where it is
    key padding (the queries of Nq <= Nk self-attention are the last Nq tokens); all tokens otherwise."""
    device = keep.device
    keys = real_keys(mods.mask, nk)
    keys = torch.ones(1, nk, dtype=torch.bool, device=device) if keys is None else keys.to(device)
    queries = keys[:, nk - nq:] if nq <= nk else torch.ones(1, nq, dtype=torch.bool, device=device)
    nkb = keep.shape[-1]
    cum = F.pad(keys.double().cumsum(-1), (1, 0))  # [b, Nk + 1]: real keys before each position
    starts = torch.arange(nkb, device=device) * block
    ends = torch.clamp(starts + block, max=nk)
    if mods.causal:  # real keys j <= i of each block, per query row i
        upto = torch.maximum(torch.minimum(torch.arange(nq, device=device)[:, None] + 1, ends), starts)
        seen = cum[:, upto] - cum[:, starts][:, None, :]  # [b, Nq, nKB]
    else:
        seen = (cum[:, ends] - cum[:, starts])[:, None, :].expand(-1, nq, -1)
    row_block = (torch.arange(nq, device=device) + pad) // block
    weight = queries.double()[:, :, None]
    per_block = torch.zeros(seen.shape[0], keep.shape[-2], nkb, dtype=torch.float64, device=device)
    per_block.index_add_(1, row_block, seen * weight)  # [b, nQB, nKB]: sum over the real rows of each block
    batch = keep.shape[0]
    pairs = torch.einsum("bhqk,bqk->bh", keep.double(), per_block.expand(batch, -1, -1))
    if entries is not None:
        rows = torch.zeros(queries.shape[0], keep.shape[-2], dtype=torch.float64, device=device)
        rows.index_add_(1, row_block, queries.double())
        pairs = pairs + torch.einsum("bhqk,bq->bh", entries.double().expand(batch, *entries.shape[1:]),
                                     rows.expand(batch, -1))
    return pairs


def decode_rows(nq: int, nk: int, block: int) -> tuple[int, int]:
    """``(pad, first)`` for queries that are the last ``nq`` of ``nk`` tokens: ``pad`` rows put in front of q
    make its blocks blocks of absolute positions, the first of which is key block ``first``; ``(0, 0)`` when
    ``nq == nk``."""
    offset = nk - nq
    return offset % block, offset // block


def _pad_rows(t: Optional[Tensor], rows: int, value) -> Optional[Tensor]:
    """A bias/mask broadcastable to ``[B, Hq, Nq, Nk]`` with ``rows`` rows of ``value`` in front of its query
    dim (a broadcast query dim stays size 1)."""
    if t is None or rows == 0:
        return t
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t
    if t.shape[-2] == 1:
        return t
    front = torch.full((*t.shape[:-2], rows, t.shape[-1]), value, dtype=t.dtype, device=t.device)
    return torch.cat([front, t], dim=-2)


def _to_lists(keep: Tensor) -> Tensor:
    """Bool block mask ``[..., nQB, nKB]`` -> ascending index lists ``[..., nQB, K]``, ``-1`` padding last."""
    nkb = keep.shape[-1]
    width = max(1, int(keep.sum(dim=-1).max())) if keep.numel() else 1
    idx = torch.arange(nkb, device=keep.device).expand_as(keep).masked_fill(~keep, nkb)
    lists = idx.sort(dim=-1).values[..., :width]
    return lists.masked_fill(lists >= nkb, -1)
