"""Local (sliding-window) attention, with attention sinks and global tokens.

``local(window=W)`` or ``local(left=L, right=R)``, plus ``sinks`` and ``globals``. Query i attends key j iff

* ``i - left <= j <= i + right`` (the band), or
* ``j < sinks`` (StreamingLLM attention sinks), or
* ``j < globals`` or ``i < globals`` (Longformer global tokens: attend to all, attended by all),

and the site's ScoreMods still apply on top (causality, mask, bias, softcapping). ``window=W`` is the
symmetric shorthand: ``left=W`` and ``right=W`` on bidirectional calls, ``right=0`` on causal ones (the spec
learns the call's causality from ``mods.causal`` at run time). Give either ``window`` or both ``left`` and
``right``; on a causal call ``right`` is irrelevant (causality hides every key after the query).

A query row with no visible key (possible only through ``mods.mask``) returns zeros.

``remainder=True`` (with ``remainder_block``, default 16): queries and keys go in blocks of ``remainder_block``
positions, and every key block with no pair in a query block's pattern enters that block's softmax as one
pooled entry (``attncc.variants.remainder``: score ``log(count) + softcap(q . mean(k) * scale)``, value
``mean(v)``, real keys only); under causality only blocks entirely visible to all its queries. A block partly
inside the window is visited with the pattern per element (its keys outside the window stay out). This path
runs the band through ``block_sparse_attention`` (not the banded kernel below); bias and masks other than key
padding are declined. A window over every key gives exact attention.

Fewer queries than keys (decode with a KV cache, chunked prefill): the queries are the *last* ``Nq`` tokens,
query ``i`` at absolute position ``p = Nk - Nq + i`` (bottom-right alignment), and the pattern above holds with
``p`` for ``i``: a decode step attends the keys ``p - left .. p`` of the cache plus the ``sinks`` first keys,
``O(left + sinks)`` keys however long the cache is. ``mods.causal`` keeps SDPA's meaning (top-left: key
``j <= i``) on top; the dispatch runs such calls (a causal call with Nq < Nk) on the fallback instead.

The forward never builds an ``N x N`` tensor: queries go in blocks of ``Bq`` rows, and each block's keys are
the contiguous range ``[start - left, end + right]``, read as an overlapping strided view of the padded keys
(no gather, no copy); the sink/global key columns join that block's softmax, and the global query rows are
computed densely on their own (``globals x N``). Work is ``O(N * (Bq + left + right + max(sinks, globals)))``.
The (batch, kv head, chunk of query blocks) pieces are independent and run on ``blocks.run_tasks`` worker
threads on CPU; chunks of about 2 MB of scores stay in cache.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, replace
from typing import ClassVar, Optional, Union

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor

from attncc.errors import AttnccError
from attncc.util import cdiv
from attncc.variants.base import (
    ScoreMods, VariantSpec, attention_cost, check_decode_queries, check_int, gather_rows_keys, query_positions,
    site_sizes, sink_rows, softmax_with_sink, unapplied_site_features,
)
from attncc.variants.exact import exact_spec, masked_reference
from attncc.variants.registry import register_variant
from attncc.variants.blocks import (
    DEAD, MASKED, block_sparse_attention, dense_layout, dense_rows, gather_pairs, layout_from_block_mask, run_tasks,
)
from attncc.variants.clusters import (
    KMEANS_PASSES, clustered_reference, clustered_remainder, clustering_pairs, key_clusters,
)
from attncc.variants.remainder import (
    Remainder, block_counts, check_poolable, fully_visible, pooled_keys_values, real_keys, remainder_reference,
)

CHUNK_FLOATS = 1 << 19
"""Scores per chunk of query blocks (2 MB per worker thread): cache-resident chunks make the elementwise
passes several times faster on CPU than one big score tensor (measured: 512K floats best, 128K and 2M
slower by 10-40%)."""


TOP_LEFT_CAUSAL = ("a causal mask (SDPA's is_causal, top-left aligned) over fewer queries than keys, as when a "
                   "static cache is prefilled: the variant places such queries at the last positions")
"""Why local and topk decline causal sites with Nq != Nk (decode calls come without is_causal)."""


@register_variant
@dataclass(frozen=True)
class LocalSpec(VariantSpec):
    """Sliding-window attention (see the module docstring for the exact pattern)."""

    window: Optional[int] = None
    left: Optional[int] = None
    right: Optional[int] = None
    sinks: int = 0
    globals: int = 0
    remainder: bool = False
    """Every key block (of ``remainder_block`` keys) outside a query block's window enters its softmax as one
    pooled entry (see :meth:`remainder_layout`)."""
    remainder_block: int = 16
    """Block size of the remainder: query blocks and the pooled key blocks (``remainder=True`` only)."""
    clusters: Optional[int] = None
    """Pool the blocks outside the window by key *content* (``remainder=True`` only; ``attncc.variants.clusters``):
    one entry per k-means cluster of the keys instead of one per block."""

    name: ClassVar[str] = "local"
    listed: ClassVar[int] = 10

    @classmethod
    def examples(cls) -> tuple[VariantSpec, ...]:
        return (cls(window=3), cls(left=2, right=1, sinks=2), cls(window=2, globals=2),
                cls(window=3, sinks=1, remainder=True, remainder_block=4))

    @classmethod
    def exact_limit(cls, n: int) -> VariantSpec:
        return cls(window=n)

    def __post_init__(self):
        if self.window is not None:
            check_int(self, "window", self.window)
            if self.left is not None or self.right is not None:
                raise self.invalid(
                    "window", f"cannot be combined with left/right: give either window=W or left=L, right=R "
                              f"(got window={self.window!r}, left={self.left!r}, right={self.right!r})"
                )
        elif self.left is None and self.right is None:
            raise self.invalid("window", "or left and right must be given, e.g. local(window=256) or "
                                         "local(left=256, right=0), got neither")
        else:
            check_int(self, "left", self.left)
            check_int(self, "right", self.right)
        check_int(self, "sinks", self.sinks)
        check_int(self, "globals", self.globals)
        if not isinstance(self.remainder, bool):
            raise self.invalid("remainder", f"must be True or False, got {self.remainder!r}")
        check_int(self, "remainder_block", self.remainder_block, minimum=1)
        if self.remainder_block != 16 and not self.remainder:
            raise self.invalid("remainder_block", "needs remainder=True")
        if self.clusters is not None:
            check_int(self, "clusters", self.clusters, minimum=1)
            if not self.remainder:
                raise self.invalid("clusters", "needs remainder=True")

    # ------------------------------------------------------------------------------------------ pattern

    def aligns_last_queries(self) -> bool:
        return True

    def bounds(self, causal: bool) -> tuple[int, int]:
        """``(left, right)`` of the band on a causal or bidirectional call (right is 0 under causality)."""
        if self.window is not None:
            return self.window, 0 if causal else self.window
        return self.left, 0 if causal else self.right

    def intersect_band(self, left: int, right: int, causal: bool = False) -> "LocalSpec":
        """This spec restricted to a model's own band ``i - left <= j <= i + right`` (the model's mask hides
        every key outside it, sinks and globals included).

        Where this spec's band is at least as wide as the model's, the result is the model's band. Otherwise
        the result is the narrower band; sinks or globals then cannot be expressed (they would be visible
        only inside the model's band), so that raises AttnccError.
        """
        own_left, own_right = self.bounds(causal)
        new_left, new_right = min(own_left, left), 0 if causal else min(own_right, right)
        narrower = new_left < left or (not causal and new_right < right)
        if narrower and (self.sinks or self.globals):
            raise AttnccError(
                f"{self.name}: sinks/globals outside a model's own window of ({left}, {right}) cannot be expressed "
                f"by one band; use a window of at least the model's or no sinks/globals")
        return LocalSpec(left=new_left, right=new_right)

    def keep(self, q_idx: Tensor, kv_idx: Tensor, causal: bool) -> Tensor:
        """The pattern as a predicate on broadcasting int64 index tensors (without ``mods.causal``)."""
        left, right = self.bounds(causal)
        visible = (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)
        prefix = max(self.sinks, self.globals)
        if prefix:
            visible = visible | (kv_idx < prefix)
        if self.globals:
            visible = visible | (q_idx < self.globals)
        return visible

    def covers(self, n: int, causal: bool) -> bool:
        """True when the band alone reaches every key of an ``n``-token sequence (the variant is exact)."""
        left, right = self.bounds(causal)
        return left >= n - 1 and (causal or right >= n - 1)

    # ----------------------------------------------------------------------------------------- contract

    def supports(self, site) -> tuple[bool, str]:
        """Self-attention (``Nq == Nk``, or ``Nq < Nk``: the last tokens' queries against a KV cache, bottom-right
        aligned) without dropout or segment masks; causal or not, with bias, softcap, padding or dense masks
        (gathered at the visited pairs), and within a model's own band."""
        if site.kind != "self":
            return False, "local attention needs self-attention (queries and keys are the same tokens), this " \
                          "site is cross-attention"
        if isinstance(site.q_len, int) and isinstance(site.kv_len, int) and site.q_len > site.kv_len:
            return False, f"local attention needs at most as many queries as keys (Nq={site.q_len}, Nk={site.kv_len})"
        if site.causal and site.q_len != site.kv_len:
            return False, TOP_LEFT_CAUSAL
        reason = unapplied_site_features(self, site, band=False)
        if reason:
            return False, reason
        if self.remainder and site.has_bias:
            return False, "local(remainder=True) cannot pool an additive bias into its remainder (it differs per key)"
        if self.remainder and site.mask_residual == "dense":
            return False, "local(remainder=True) pools key-padding masks only, this site has a dense mask"
        left, right = self.bounds(site.causal)
        extra = []
        if self.sinks:
            extra.append(f"{self.sinks} sink keys")
        if self.globals:
            extra.append(f"{self.globals} global tokens")
        if self.remainder:
            extra.append(f"pooled remainder of {self.remainder_block}-key blocks")
        return True, f"sliding window of {left} keys left, {right} right" + (f" + {', '.join(extra)}" if extra else "")

    def specialize(self, site) -> Union[VariantSpec, str]:
        """This window within the model's own (``site.band``): the intersection; the site's exact form where
        the model's window is already at most this one; a reason where sinks or globals would reach outside
        the model's window (one band cannot say that)."""
        if site.band is None:
            return self
        if self.remainder:
            return "the model already limits this site to a window: a remainder would add keys it hides"
        own_left, _ = self.bounds(site.causal)
        if own_left >= site.band[0]:
            return exact_spec(site)  # the model's window is already narrower: nothing to add
        if self.sinks or self.globals:
            return "sinks/globals outside the model's own window cannot be expressed"
        return self.intersect_band(*site.band, causal=site.causal)

    def pairs(self, site) -> sympy.Expr:
        """Visible (query, key) pairs per (batch, head) of the pattern under the site's causality, before
        mask/bias: the band clipped at both ends, plus the prefix columns outside it, plus the global rows.
        Exact for static sizes; a sympy expression of the length symbol where dynamic. With fewer queries than
        keys (decode), an upper bound: every query sees at most ``left + 1 + right`` band keys plus the prefix."""
        if site.q_len != site.kv_len:
            sizes = site_sizes(site)
            left, right = self.bounds(site.causal)
            seen = sympy.Min(sizes["Nk"], left + 1 + right + max(self.sinks, self.globals))
            return sizes["Nq"] * (sizes["Nk"] if self.globals else seen)
        n = site_sizes(site)["Nq"]
        left, right = self.bounds(site.causal)
        lc, rc = sympy.Min(left, n - 1), sympy.Min(right, n - 1)
        band = n * (lc + rc + 1) - lc * (lc + 1) / 2 - rc * (rc + 1) / 2
        prefix = sympy.Min(max(self.sinks, self.globals), n)
        # Prefix columns left of row i's band: min(prefix, i - left) for each row i > left.
        rows_past = sympy.Max(0, n - 1 - left)
        low = sympy.Min(rows_past, prefix)
        total = band + low * (low + 1) / 2 + sympy.Max(0, rows_past - prefix) * prefix
        if not site.causal:
            # ... and right of it (rows i < prefix - 1 - right), which causality hides.
            t = sympy.Max(0, prefix - 1 - right)
            total += t * (t + 1) / 2
            rows = self.globals if not n.is_Integer else min(self.globals, int(n))
            for i in range(rows):  # global rows see all n keys instead
                seen = sympy.Min(n - 1, i + right) - max(0, i - left) + 1
                seen += max(0, min(i - left, max(self.sinks, self.globals))) + sympy.Max(0, prefix - 1 - i - right)
                total += sympy.Max(0, n - seen) if isinstance(n, sympy.Symbol) else max(0, n - seen)
        return sympy.simplify(total) if not isinstance(total, int) else sympy.Integer(total)

    def cost(self, site) -> dict[str, sympy.Expr]:
        """FLOPs and bytes of the visible pairs (see :meth:`pairs`); with ``remainder``, plus pooling k and v
        and one score and value per (query, pooled key block), an upper bound: about ``1 / remainder_block``
        of dense attention."""
        out = attention_cost(site, self.pairs(site))
        if self.remainder:
            s = site_sizes(site)
            nkb = sympy.ceiling(s["Nk"] / self.remainder_block)
            entries = nkb if self.clusters is None else sympy.Min(nkb, self.clusters)
            out["flops"] = out["flops"] + s["B"] * s["Hkv"] * s["Nk"] * (s["D"] + s["Dv"]) \
                + 2 * s["B"] * s["Hq"] * s["Nq"] * entries * (s["D"] + s["Dv"])
            if self.clusters is not None:  # the k-means, and each query block's sums (total minus its window)
                visited = sympy.ceiling(sympy.Integer(sum(self.bounds(False)) + max(self.sinks, self.globals))
                                        / self.remainder_block) + 2
                out["flops"] = out["flops"] + 2 * s["B"] * s["Hkv"] * KMEANS_PASSES * s["Nk"] * self.clusters * s["D"] \
                    + s["B"] * s["Hq"] * sympy.ceiling(s["Nq"] / self.remainder_block) * visited * self.clusters \
                    * (1 + s["D"] + s["Dv"])
        return out

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        """Banded attention: q ``[B, Hq, N, Dqk]``, k ``[B, Hkv, N, Dqk]``, v ``[B, Hkv, N, Dv]`` ->
        ``[B, Hq, N, Dv]`` in q's dtype (float32 math). Differentiable. With Nq < Nk (decode), the queries are
        the last Nq tokens and attend only their windows and the prefix (``local_decode_attention``)."""
        n, nk = check_decode_queries(self, q, k, v)
        if self.remainder:
            return self._forward_with_remainder(q, k, v, mods)
        if n < nk:
            return local_decode_attention(self, q, k, v, mods)
        if self.covers(n, mods.causal):
            return block_sparse_attention(q, k, v, dense_layout(n, n, device=q.device), mods)
        left, right = self.bounds(mods.causal)
        return local_attention(q, k, v, mods, left, right, max(self.sinks, self.globals), self.globals)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        """Dense float32 oracle: the pattern as an ``Nq x Nk`` mask (queries at positions ``Nk - Nq + i``) ANDed
        with ``mods.mask`` (and top-left causality when ``mods.causal``); empty rows -> 0."""
        nq, nk = check_decode_queries(self, q, k, v)
        keys = torch.arange(nk, device=q.device)
        keep = self.keep(query_positions(nq, nk, q.device)[:, None], keys[None, :], mods.causal)
        if not self.remainder:
            return masked_reference(q, k, v, mods, keep)
        # The blocks each query block visits, read off the dense pattern (independently of remainder_layout).
        rb, pad = self.remainder_block, (nk - nq) % self.remainder_block
        grid = F.pad(keep, (0, cdiv(nk, rb) * rb - nk, pad, cdiv(nq + pad, rb) * rb - nq - pad))
        visits = grid.unflatten(0, (-1, rb)).unflatten(-1, (-1, rb)).any(-1).any(1)
        entries = self._entries(visits, mods, nq + pad, nk, pad)
        if self.clusters is not None:
            check_poolable(self.name, mods, nk)
            assign = key_clusters(k, real_keys(mods.mask, nk), self.clusters)
            return clustered_reference(q, k, v, mods, keep, entries.expand(q.shape[0], q.shape[1], -1, -1), rb,
                                       assign, pad)
        return remainder_reference(q, k, v, mods, keep, rb, entries, pad)

    # ----------------------------------------------------------------------------------------- remainder

    def remainder_layout(self, nq: int, nk: int, causal: bool, device=None) -> tuple[Tensor, Tensor]:
        """``(visits, full)``, bool ``[nQB, nKB]`` over blocks of ``remainder_block`` positions: whether any /
        every (query, key) pair of the block pair is in the pattern (band, sinks, globals; causality and masks
        apply on top). Queries are the last ``nq`` of ``nk`` tokens; query block I holds absolute positions
        ``(first + I) * block ..`` with ``first = (nk - nq) // block`` (the first block has ``pad`` fewer rows).

        A key block with no pair in a query block's pattern is pooled for it (``remainder=True``); a block
        partly inside the window of some of its queries is visited, with the pattern applied per element, so
        its keys outside the window are neither attended nor pooled for those queries.
        """
        rb = self.remainder_block
        pad, first = (nk - nq) % rb, (nk - nq) // rb
        nqb, nkb = cdiv(nq + pad, rb), cdiv(nk, rb)
        q_lo = (first + torch.arange(nqb, device=device)) * rb
        q_lo = torch.maximum(q_lo, torch.full_like(q_lo, nk - nq))[:, None]  # first real query of each block
        q_hi = torch.clamp((first + torch.arange(1, nqb + 1, device=device)) * rb, max=nk)[:, None] - 1
        k_lo = torch.arange(nkb, device=device)[None, :] * rb
        k_hi = torch.clamp(k_lo + rb, max=nk) - 1
        left, right = self.bounds(causal)
        prefix = max(self.sinks, self.globals)
        visits = (k_lo <= q_hi + right) & (k_hi >= q_lo - left) | (k_lo < prefix) | (q_lo < self.globals)
        full = (k_lo >= q_hi - left) & (k_hi <= q_lo + right) | (k_hi < prefix) | (q_hi < self.globals)
        return visits, full & visits

    def _entries(self, visits: Tensor, mods: ScoreMods, nq_rows: int, nk: int, pad: int) -> Tensor:
        """Bool ``[b, 1, nQB, nKB]``: the pooled blocks of each query block: not visited, holding a real key,
        and entirely visible to each of its queries (under causality; ``nq_rows`` counts the ``pad`` rows)."""
        rb = self.remainder_block
        nqb, nkb = visits.shape
        counts = block_counts(real_keys(mods.mask, nk), nk, rb, visits.device)  # [b, nKB]
        visible = fully_visible(nqb, nkb, rb, nq_rows - pad, nk, mods.causal, pad, visits.device)
        return (~visits & visible)[None, None] & (counts > 0)[:, None, None, :]

    def _forward_with_remainder(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        """The band (``block_sparse_attention`` over the blocks of :meth:`remainder_layout`, the pattern applied
        inside partial blocks) plus one pooled entry per block outside each query block's window."""
        nq, nk = q.shape[-2], k.shape[-2]
        if mods.causal and nq != nk:
            raise AttnccError(f"{self.name}: remainder=True with a top-left causal mask over fewer queries than "
                              f"keys ({TOP_LEFT_CAUSAL})")
        check_poolable(self.name, mods, nk)
        rb = self.remainder_block
        pad = (nk - nq) % rb
        visits, full = self.remainder_layout(nq, nk, mods.causal, q.device)
        layout = layout_from_block_mask(visits, full, rb, rb, nq + pad, nk)
        offset = nk - nq - pad  # absolute position of padded row 0

        def keep(q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return self.keep(q_idx + offset, kv_idx, mods.causal)

        entries = self._entries(visits, mods, nq + pad, nk, pad)
        if self.clusters is not None:
            pooled = entries.expand(q.shape[0], q.shape[1], -1, -1)
            remainder = clustered_remainder(k, v, mods.mask, pooled, rb, self.clusters)
        else:
            keys, values, log_count = pooled_keys_values(k, v, rb, mods.mask)
            remainder = Remainder(keys, values, log_count, entries)
        if pad:
            q = F.pad(q, (0, 0, pad, 0))
            mods = replace(mods, mask=_front_rows(mods.mask, pad))
        out = block_sparse_attention(q, k, v, layout, mods, keep=keep, remainder=remainder)
        return out[..., pad:, :]

    @torch.no_grad()
    def measured_pairs(self, q: Tensor, k: Tensor, mods: ScoreMods) -> Tensor:
        """(query, key) pairs scored per batch row and query head, float64 ``[B, Hq]``: for each real query, the
        real keys of its band, sinks and globals it sees (causality applied), plus one pair per pooled block
        (``remainder=True``). Real tokens: ``mods.mask`` where it is key padding; all tokens otherwise."""
        nq, nk = q.shape[-2], k.shape[-2]
        keys = real_keys(mods.mask, nk)
        keys = torch.ones(1, nk, dtype=torch.bool, device=q.device) if keys is None else keys.to(q.device)
        queries = keys[:, nk - nq:].double()  # [b, Nq]: queries are the last Nq tokens
        cum = F.pad(keys.double().cumsum(-1), (1, 0))  # [b, Nk + 1]
        pos = query_positions(nq, nk, q.device)
        left, right = self.bounds(mods.causal)
        lo = (pos - left).clamp(0, nk)
        hi = (pos + right + 1).clamp(0, nk)
        if mods.causal:  # top-left: key j <= query index i
            hi = torch.minimum(hi, torch.arange(1, nq + 1, device=q.device))
        lo = torch.minimum(lo, hi)
        prefix = min(max(self.sinks, self.globals), nk)
        seen = cum[:, hi] - cum[:, lo] + cum[:, torch.minimum(lo, torch.full_like(lo, prefix))]
        if not mods.causal:  # prefix keys right of the band
            after = torch.maximum(hi, torch.full_like(hi, prefix))
            seen = seen + cum[:, after] - cum[:, hi]
        if self.globals:  # a global query row sees every key (up to itself under causality)
            last = torch.arange(1, nq + 1, device=q.device) if mods.causal else torch.full_like(pos, nk)
            seen = torch.where(pos < self.globals, cum[:, last], seen)
        pairs = (seen * queries).sum(-1)  # [b]
        if self.remainder:
            rb = self.remainder_block
            pad = (nk - nq) % rb
            visits, _ = self.remainder_layout(nq, nk, mods.causal, q.device)
            entries = self._entries(visits, mods, nq + pad, nk, pad)  # [b, 1, nQB, nKB]
            row_block = (torch.arange(nq, device=q.device) + pad) // rb
            if self.clusters is None:
                per_block = entries[:, 0].double().sum(-1)  # [b, nQB]
                pairs = pairs + (per_block[:, row_block] * queries).sum(-1)
            else:
                pooled = entries.expand(q.shape[0], q.shape[1], -1, -1)
                clustered = clustered_remainder(k, k[..., :1], mods.mask, pooled, rb, self.clusters).entries
                per_query = (clustered.double().sum(-1)[:, :, row_block] * queries[:, None, :]).sum(-1)  # [B, Hq]
                real_blocks = torch.zeros(queries.shape[0], visits.shape[0], dtype=torch.float64, device=q.device)
                real_blocks.index_add_(1, row_block, queries)
                visited = ((real_blocks > 0).double() * visits.double().sum(-1)).sum(-1)  # [b]
                return (pairs[:, None] + per_query + clustering_pairs(
                    keys.sum(-1), visited[:, None].expand(q.shape[0], q.shape[1]), self.clusters,
                    q.shape[1] // k.shape[1])).clone()
        return pairs[:, None].expand(q.shape[0], q.shape[1]).clone()


DECODE_QUERY_BLOCK = 64
"""Queries per block when fewer queries than keys run (chunked prefill): each block gathers its own keys."""


def local_decode_attention(spec: LocalSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
    """``spec`` for queries that are the last ``Nq`` of ``Nk`` tokens (decode, chunked prefill).

    q ``[B, Hq, Nq, Dqk]``, k ``[B, Hkv, Nk, Dqk]``, v ``[B, Hkv, Nk, Dv]`` -> ``[B, Hq, Nq, Dv]``. Each block of
    queries gathers only the keys its pattern can reach (the prefix, then its band), so a decode step reads
    ``sinks + left + 1`` keys of the cache, not ``Nk``; the block is then exact attention over those keys.
    """
    nq, nk = q.shape[-2], k.shape[-2]
    left, right = spec.bounds(mods.causal)
    prefix = min(max(spec.sinks, spec.globals), nk)
    positions = query_positions(nq, nk, q.device)
    outs = []
    for q0 in range(0, nq, DECODE_QUERY_BLOCK):
        q1 = min(nq, q0 + DECODE_QUERY_BLOCK)
        first, last = nk - nq + q0, nk - nq + q1 - 1  # absolute positions of the block's queries
        lo = 0 if first < spec.globals else max(0, first - left)  # a global query row sees every key
        hi = nk if first < spec.globals else min(nk, last + right + 1)
        keys = torch.cat([torch.arange(min(prefix, lo), device=q.device), torch.arange(lo, hi, device=q.device)])
        keep = spec.keep(positions[q0:q1, None], keys[None, :], mods.causal)
        if mods.causal:  # SDPA's top-left causality: key j <= query index i
            keep = keep & (keys[None, :] <= torch.arange(q0, q1, device=q.device)[:, None])
        block_mods = ScoreMods(scale=mods.scale, softcap=mods.softcap, sinks=mods.sinks,
                               bias=gather_rows_keys(mods.bias, q0, q1, keys),
                               mask=gather_rows_keys(mods.mask, q0, q1, keys))
        outs.append(masked_reference(q[:, :, q0:q1], k.index_select(2, keys), v.index_select(2, keys),
                                     block_mods, keep))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _front_rows(mask: Optional[Tensor], rows: int) -> Optional[Tensor]:
    """A key-padding (or None) mask for queries with ``rows`` more rows in front: a mask with a query dim of
    size 1 broadcasts as it is; a per-query mask gets ``rows`` rows of True in front."""
    if mask is None:
        return None
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
    if m.shape[-2] == 1:
        return m
    return torch.cat([torch.ones(*m.shape[:-2], rows, m.shape[-1], dtype=m.dtype, device=m.device), m], dim=-2)


def _block_size(left: int, right: int, n: int) -> int:
    """Query block: big enough for efficient matmuls, small enough that the band's ragged ends (about
    ``Bq / (left + right + Bq)`` of the work) stay cheap. 32 measured best for windows of 256 (16 to 64 are
    within 7%, 128 is 15% slower)."""
    bq = 32 if left + right >= 32 else 16
    return max(1, min(bq, n))


def local_attention(
    q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods, left: int, right: int, prefix: int = 0, globals_: int = 0,
    block: Optional[int] = None,
) -> Tensor:
    """Attention over the band ``i - left <= j <= i + right``, plus key columns ``j < prefix`` for every
    query, plus full rows for queries ``i < globals_``; ``mods`` applied on top.

    q ``[B, Hq, N, Dqk]``, k ``[B, Hkv, N, Dqk]``, v ``[B, Hkv, N, Dv]`` -> ``[B, Hq, N, Dv]`` in q's dtype.
    """
    b, hq, n, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g = hq // hkv
    left, right = min(left, n - 1), (0 if mods.causal else min(right, n - 1))
    prefix = min(prefix, n)
    bq = block or _block_size(left, right, n)
    nqb = cdiv(n, bq)
    npad = nqb * bq
    width = bq + left + right
    dev = q.device
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, mods.bias, mods.sinks)
    )

    # Keys padded by `left` before and `right` (plus the query padding) after, so block r's keys
    # [r*bq - left, r*bq + bq + right) are the window r*bq .. r*bq + width of the padded sequence.
    # The scale goes on the keys: they are copied for the padding anyway, and q then needs no copy.
    kp = _padded(k, left, npad - n + right, mods.scale, grad)
    vp = _padded(v, left, npad - n + right, 1.0, grad)
    k_win = kp.unfold(2, width, bq)  # [B, Hkv, nQB, D, width]: overlapping view, no copy
    v_win = vp.unfold(2, width, bq).transpose(-1, -2)  # [B, Hkv, nQB, width, Dv]
    qs = q.float()
    qs = (F.pad(qs, (0, 0, 0, npad - n)) if npad > n else qs).view(b, hkv, g, nqb, bq, d)
    qs = qs.transpose(2, 3).reshape(b, hkv, nqb, g * bq, d)  # a group's heads share one key window

    a = torch.arange(bq, device=dev)[:, None]
    c = torch.arange(width, device=dev)[None, :]
    band_bias = torch.zeros(bq, width, device=dev).masked_fill(~((c >= a) & (c <= a + left + right)), MASKED)
    band_rows = band_bias.repeat(g, 1)  # [g * bq, width]: the rows of one kv head's query block
    key_pos = (torch.arange(nqb, device=dev) * bq - left)[:, None] + c  # [nQB, width]
    key_bad = (key_pos < prefix) | (key_pos >= n)  # outside the sequence, or a prefix column (added below)
    bad_blocks = key_bad.any(1).nonzero().flatten().tolist()  # the first and last few blocks

    if prefix:
        k_pre, v_pre = k[:, :, :prefix].float() * mods.scale, v[:, :, :prefix].float()
        pre_bias = None
        if mods.causal:
            rows = torch.arange(npad, device=dev).view(nqb, 1, bq, 1)
            pre_bias = torch.zeros(nqb, 1, bq, prefix, device=dev).masked_fill(
                torch.arange(prefix, device=dev) > rows, MASKED)

    step = max(1, CHUNK_FLOATS // (g * bq * (width + prefix)))
    has_mods = mods.bias is not None or mods.mask is not None
    sink_heads = sink_rows(mods.sinks, hkv, 1, g, 1, 1)  # [kv head][1, g, 1, 1]: a group's learned sink logits
    out = None if grad else torch.empty(b, hkv, nqb, g * bq, dv, device=dev)

    def block_chunk(task) -> Optional[Tensor]:
        """Query blocks [c0, c1) of batch bi, kv head h -> [c, g*bq, Dv] (written into `out` when not grad)."""
        bi, h, c0, c1 = task
        cc = c1 - c0
        qc = qs[bi, h, c0:c1]
        if mods.softcap > 0:
            s = torch.bmm(qc, k_win[bi, h, c0:c1]).view(cc, g, bq, width)
            s = _softcap(s, mods.softcap, grad)
            s = s + band_bias if grad else s.add_(band_bias)
        else:  # the band mask rides on the matmul's accumulator (one pass less)
            s = torch.baddbmm(band_rows.expand(cc, g * bq, width), qc, k_win[bi, h, c0:c1]).view(cc, g, bq, width)
        if has_mods:
            q_pos = torch.arange(c0 * bq, c1 * bq, device=dev).view(cc, bq)
            k_pos = key_pos[c0:c1].clamp(0, n - 1).view(1, 1, cc, 1, width)
            s = _apply_mods(s, mods, bi, h, g, q_pos, k_pos, grad)
        for r in bad_blocks[bisect_left(bad_blocks, c0):bisect_left(bad_blocks, c1)]:
            s = _hide_block(s, r - c0, key_bad[r].view(1, 1, width), grad)
        if prefix:
            sp = torch.matmul(qc, k_pre[bi, h].transpose(0, 1)).view(cc, g, bq, prefix)
            sp = _softcap(sp, mods.softcap, grad)
            if pre_bias is not None:
                sp = sp + pre_bias[c0:c1]
            if has_mods:
                sp = _apply_mods(sp, mods, bi, h, g, q_pos, torch.arange(prefix, device=dev).view(1, 1, 1, 1, -1),
                                 grad)
            s = torch.cat([sp, s], dim=-1)
        p = softmax_with_sink(s, None if sink_heads is None else sink_heads[h])
        if mods.mask is not None:
            p = p * (s.amax(-1, keepdim=True) > DEAD)
        p = p.view(cc, g * bq, -1)
        target = None if grad else out[bi, h, c0:c1]
        if prefix:
            o = torch.matmul(p[..., :prefix], v_pre[bi, h])
            return torch.baddbmm(o, p[..., prefix:], v_win[bi, h, c0:c1], out=target)
        return torch.bmm(p, v_win[bi, h, c0:c1], out=target)

    tasks = [(bi, h, c0, min(nqb, c0 + step)) for bi in range(b) for h in range(hkv) for c0 in range(0, nqb, step)]
    pieces = run_tasks(block_chunk, tasks, dev)
    if grad:
        out = torch.cat(pieces).view(b, hkv, nqb, g * bq, dv)
    out = out.view(b, hkv, nqb, g, bq, dv).transpose(2, 3).reshape(b, hq, npad, dv)[:, :, :n]
    if globals_:
        out = torch.cat([dense_rows(q, k, v, mods, min(globals_, n)), out[:, :, globals_:]], dim=2)
    return out.to(q.dtype)


def _padded(x: Tensor, before: int, after: int, scale: float, grad: bool) -> Tensor:
    """``x * scale`` in float32 with zero rows before and after the sequence dim, written in one pass."""
    b, h, n, d = x.shape
    if grad:
        x = x.float() * scale if scale != 1.0 else x.float()
        return F.pad(x, (0, 0, before, after))
    out = torch.empty(b, h, before + n + after, d, device=x.device)
    out[:, :, :before].zero_()
    out[:, :, before + n:].zero_()
    torch.mul(x, scale, out=out[:, :, before:before + n])
    return out


def _hide_block(s: Tensor, r: int, hide: Tensor, grad: bool) -> Tensor:
    """Scores of block ``r`` of the chunk ``s [c, g, bq, width]`` set to MASKED where ``hide`` is True."""
    if not grad:
        s[r].masked_fill_(hide, MASKED)
        return s
    keep = torch.ones(s.shape[0], 1, 1, 1, dtype=torch.bool, device=s.device)
    keep[r] = False
    return s.masked_fill(~keep & hide, MASKED)


def _softcap(s: Tensor, softcap: float, grad: bool) -> Tensor:
    if softcap <= 0:
        return s
    if grad:
        return softcap * torch.tanh(s / softcap)
    return s.div_(softcap).tanh_().mul_(softcap)


def _apply_mods(s: Tensor, mods: ScoreMods, bi: int, h: int, g: int, q_pos: Tensor, k_pos: Tensor,
                grad: bool) -> Tensor:
    """Add ``mods.bias`` and apply ``mods.mask`` at the visited pairs of one (batch, kv head): s is
    ``[c, g, bq, width]``, gathered entries broadcast to it."""
    if mods.bias is not None:
        bias = _pairs_of_head(mods.bias, bi, h, g, q_pos, k_pos).float()
        s = s + bias if grad else s.add_(bias)
    if mods.mask is not None:
        m = _pairs_of_head(mods.mask, bi, h, g, q_pos, k_pos)
        s = s.masked_fill(~m, MASKED) if grad else s.masked_fill_(~m, MASKED)
    return s


def _pairs_of_head(t: Tensor, bi: int, h: int, g: int, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """``gather_pairs`` restricted to batch ``bi`` and kv head ``h``'s query group: ``[c|1, g|1, bq|1, W|1]``."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    t = t[bi:bi + 1] if t.shape[0] > 1 else t
    t = t[:, h * g:(h + 1) * g] if t.shape[1] > 1 else t
    return gather_pairs(t, q_pos, k_pos, 1, g)[0, 0]


__all__ = ["LocalSpec", "local_attention"]
