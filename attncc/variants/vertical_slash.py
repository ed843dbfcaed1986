"""Vertical-slash attention (MInference's pattern): a few key columns plus a few diagonals, chosen per call.

``vertical_slash(vertical=64, slash=64, last_q=64)``, training-free. Per (batch, query head), from the
attention of a few *estimation queries*:

1. score those queries against every key exactly as the site does (scale, softcap, bias, mask, causality,
   learned sink logits), take the softmax: ``p`` ``[last_q, Nk]`` (``O(last_q * Nk)``, never ``Nq x Nk``);
2. **vertical**: the ``vertical`` key columns ``j`` with the largest ``sum_rows p[:, j]``; the first key (the
   attention sink) is always kept;
3. **slash**: the ``slash`` diagonals with the largest summed probability along them, a diagonal being an
   offset ``o = position(query) - key``; the main diagonal (``o = 0``) is always kept;
4. every query then attends **exactly** its chosen columns plus the keys ``position - o`` of its chosen
   diagonals (each key once), under all of the site's ScoreMods; a query that sees no key returns zeros.

Estimation queries. Causal calls use the last ``last_q`` real queries (MInference's choice: they see every
key). Bidirectional calls use the same scheme with both-sided offsets (``o`` runs from ``1 - Nq`` to
``Nk - 1``: keys after the query are negative offsets), but their ``last_q`` estimation queries are spread
evenly over the real queries (the last one included): every query sees every key there, and the last queries
alone would see the diagonals right of the main one only from the few rows near the end. "Real" queries are
those that see some key under the mask (a padded token's query under a key-padding mask ``[B, 1, 1, Nk]`` is
not real), so a right-padded batch estimates from its text, not from its padding.

Budgets are counts: ``vertical >= Nk`` keeps every column and ``slash >= Nq + Nk - 1`` every diagonal, and
either one makes the variant exact (``exact_limit``). Budget beyond what the estimate ranks (columns or
diagonals no estimation query sees) goes to the unranked ones in no particular order; they are attended
exactly wherever the mask and causality let a query see them.

Fewer queries than keys (decode with a KV cache, chunked prefill): the queries are the last ``Nq`` tokens,
query ``i`` at position ``Nk - Nq + i`` (bottom-right), its diagonals are placed at that position, and
``mods.causal`` keeps SDPA's top-left meaning; ``supports`` declines a causal site with ``Nq != Nk`` (the
dispatch runs such calls on the fallback). A decode step estimates from its own query.

The selection is not differentiated (a discrete choice); gradients flow through the attention over the
chosen keys. ``forward`` works a chunk of query rows at a time: the columns are one gathered key set
(``[B, Hq, vertical, D]``, a matmul), the diagonal keys a gather of ``k[position - o]`` per row
(``[B, Hq, rows, slash, D]``); memory is ``O(rows * slash * D)`` per head, never ``Nq x Nk``. Those gathers
move about ``D + Dv`` floats per pair, which on a CPU costs more per pair than SDPA's tiled matmuls: the torch
path wins only at long sequences; the Triton kernel (``attncc.codegen.vertical_slash``) is the fast path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Optional

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor

from attncc.variants.base import (
    ScoreMods, VariantSpec, attention_cost, check_decode_queries, check_int, site_sizes, sink_rows,
    softmax_with_sink, unapplied_site_features,
)
from attncc.variants.blocks import DEAD, MASKED, run_tasks
from attncc.variants.exact import masked_reference
from attncc.variants.local import TOP_LEFT_CAUSAL
from attncc.variants.registry import register_variant
from attncc.variants.score_mods import modified_scores

CHUNK_FLOATS = 1 << 21
"""Gathered diagonal keys and values per chunk of query rows (8 MB of float32 per worker: measured best of 2^20..2^25)."""


class Selection(NamedTuple):
    """What one call attends, per (batch, query head)."""

    columns: Tensor
    """int64 ``[B, Hq, V]``: the chosen key columns, ascending."""
    offsets: Tensor
    """int64 ``[B, Hq, S]``: the chosen diagonals as offsets ``position - key``, ascending."""
    is_column: Tensor
    """bool ``[B, Hq, Nk]``: True at the chosen columns (a diagonal key that is a column is attended once)."""


@register_variant
@dataclass(frozen=True)
class VerticalSlashSpec(VariantSpec):
    """Key columns plus diagonals chosen per call from the estimation queries' attention (module docstring)."""

    vertical: int = 64
    """Key columns each (batch, query head) keeps, the first key included."""
    slash: int = 64
    """Diagonals (offsets ``position - key``) each (batch, query head) keeps, the main one included."""
    last_q: int = 64
    """Estimation queries: the last ones (causal) or spread over the sequence (bidirectional)."""

    name: ClassVar[str] = "vertical_slash"
    listed: ClassVar[int] = 60

    @classmethod
    def examples(cls) -> tuple[VariantSpec, ...]:
        return cls(vertical=3, slash=3, last_q=4), cls(vertical=1, slash=5, last_q=19), cls(vertical=6, slash=1,
                                                                                             last_q=2)

    @classmethod
    def exact_limit(cls, n: int) -> VariantSpec:
        return cls(vertical=n, slash=1, last_q=1)

    def __post_init__(self):
        check_int(self, "vertical", self.vertical, minimum=1)
        check_int(self, "slash", self.slash, minimum=1)
        check_int(self, "last_q", self.last_q, minimum=1)

    # ----------------------------------------------------------------------------------------- contract

    def aligns_last_queries(self) -> bool:
        return True

    def supports(self, site) -> tuple[bool, str]:
        """Self-attention (``Nq == Nk``, or ``Nq < Nk``: the last tokens' queries against a KV cache), causal or
        bidirectional, with bias, softcap, padding or dense masks and learned sink logits; not dropout, segment
        masks or a model's own band."""
        if site.kind != "self":
            return False, "vertical_slash needs self-attention (its diagonals relate a query to the key at its own " \
                          "position), this site is cross-attention"
        if isinstance(site.q_len, int) and isinstance(site.kv_len, int) and site.q_len > site.kv_len:
            return False, f"vertical_slash needs at most as many queries as keys (Nq={site.q_len}, Nk={site.kv_len})"
        if site.causal and site.q_len != site.kv_len:
            return False, TOP_LEFT_CAUSAL
        reason = unapplied_site_features(self, site, band=True)
        if reason:
            return False, reason
        where = f"the last {self.last_q} queries" if site.causal else f"{self.last_q} queries spread over the sequence"
        return True, f"{self.vertical} key columns + {self.slash} diagonals chosen from {where}' attention"

    def pairs(self, site) -> sympy.Expr:
        """(query, key) pairs scored per (batch, head), an upper bound: every query scores its columns and
        diagonals (``min(Nk, vertical + slash)`` keys)."""
        s = site_sizes(site)
        return s["Nq"] * sympy.Min(s["Nk"], self.vertical + self.slash)

    def cost(self, site) -> dict[str, sympy.Expr]:
        """Attention over the chosen keys (:meth:`pairs`) plus the estimate: the estimation queries scored
        against every key (``2 * last_q * Nk * D`` FLOPs per head) and the keys read once more."""
        out = attention_cost(site, self.pairs(site))
        s = site_sizes(site)
        estimate = 2 * s["B"] * s["Hq"] * sympy.Min(s["Nq"], self.last_q) * s["Nk"] * s["D"]
        itemsize = site.dtype.itemsize if getattr(site, "dtype", None) is not None else 4
        out["flops"] = out["flops"] + estimate
        out["bytes"] = out["bytes"] + itemsize * s["B"] * s["Hkv"] * s["Nk"] * s["D"]
        return out

    # ----------------------------------------------------------------------------------------- selection

    @torch.no_grad()
    def select(self, q: Tensor, k: Tensor, mods: ScoreMods) -> Selection:
        """The columns and diagonals each (batch, query head) attends (see the module docstring).

        q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]`` (Nq <= Nk, queries at the last positions). Memory is
        ``O(B * Hq * last_q * Nk)``.
        """
        batch, hq, nq, d = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        g = hq // hkv
        real = real_query_rows(mods.mask, nq, nk)
        rows, valid = estimation_rows(real, nq, self.last_q, spread=not mods.causal, device=q.device)
        rows4 = rows[:, None, :, None]  # [R, 1, L, 1]
        n_est = rows.shape[-1]
        q_est = q[torch.arange(batch, device=q.device)[:, None, None], torch.arange(hq, device=q.device)[None, :, None],
                  rows[:, None, :]]  # [B, Hq, L, D]
        s = (q_est.float().reshape(batch, hkv, g * n_est, d) @ k.float().transpose(-1, -2)).view(batch, hq, n_est, nk)
        keys = torch.arange(nk, device=q.device).view(1, 1, 1, nk)
        bias = take_pairs(mods.bias, rows4, keys) if mods.bias is not None else None
        s = modified_scores(s, ScoreMods(scale=mods.scale, softcap=mods.softcap, bias=bias))
        hidden = ~visible_at(mods, rows4, keys) if mods.mask is not None or mods.causal else None
        if real is not None:  # fewer real queries than estimation rows: the extra rows count nothing
            hidden = ~valid[:, None, :, None] if hidden is None else hidden | ~valid[:, None, :, None]
        if hidden is not None:
            s = s.masked_fill(hidden, float("-inf"))
        p = softmax_with_sink(s, sink_rows(mods.sinks, 1, hq, 1, 1))
        if hidden is not None:
            p = p.nan_to_num(0.0)  # a row that sees nothing
        # A column or diagonal no estimation query sees (or whose every probability underflows) sums to 0: it
        # ranks after every seen one, and is taken only where the budget exceeds those.

        # Columns: summed probability per key, the sink first.
        column_score = p.sum(dim=-2)
        column_score = column_score.masked_fill(column_score == 0, float("-inf"))
        column_score[..., 0] = float("inf")
        columns = column_score.topk(min(self.vertical, nk), dim=-1).indices.sort(dim=-1).values

        # Diagonals: candidate c = o + Nq - 1 for offset o = position - key in [1 - Nq, Nk - 1]; the pair
        # (row i, key j) lies on c = i - j + Nk - 1.
        n_cand = nq + nk - 1
        cand = (rows4 - keys + (nk - 1)).expand(batch, hq, n_est, nk).reshape(batch, hq, -1)
        diag_score = torch.zeros(batch, hq, n_cand, device=q.device).scatter_add_(-1, cand, p.reshape(batch, hq, -1))
        diag_score = diag_score.masked_fill(diag_score == 0, float("-inf"))
        diag_score[..., nq - 1] = float("inf")  # the main diagonal
        offsets = diag_score.topk(min(self.slash, n_cand), dim=-1).indices.sort(dim=-1).values - (nq - 1)

        is_column = torch.zeros(batch, hq, nk, dtype=torch.bool, device=q.device)
        is_column.scatter_(-1, columns, True)
        return Selection(columns, offsets, is_column)

    # ------------------------------------------------------------------------------------------- forward

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        """q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``, v ``[B, Hkv, Nk, Dv]`` (Nq <= Nk) -> ``[B, Hq, Nq, Dv]`` in
        q's dtype (float32 math). Differentiable in q, k, v, bias and sinks; no ``Nq x Nk`` tensor is built."""
        check_decode_queries(self, q, k, v)
        sel = self.select(q, k, mods)
        pairs = SelectedPairs(sel, q, k, mods)
        d = k.shape[-1]
        # Keys and values side by side: one gather per pair brings both (wider rows copy faster).
        kv_cols, kv_diag = pairs.gather_keys(torch.cat([k.float(), v.float()], dim=-1))
        k_cols, v_cols = kv_cols[..., :d], kv_cols[..., d:]
        qs = q.float() * mods.scale
        sink = sink_rows(mods.sinks, 1, q.shape[1], 1, 1)

        def rows_out(chunk: tuple[int, int]) -> Tensor:
            r0, r1 = chunk
            qc = qs[:, :, r0:r1]
            s_cols = pairs.finish_columns(qc @ k_cols.transpose(-1, -2), r0, r1)  # [B, Hq, rows, V]
            index = pairs.diagonal_index(r0, r1)  # [B, Hq, rows, S] into the padded keys
            kv = F.embedding(index, kv_diag)  # [B, Hq, rows, S, D + Dv]: k and v at position - offset
            s_diag = (kv[..., :d] @ qc[..., None]).squeeze(-1)
            s_diag = pairs.finish_diagonals(s_diag, index, r0, r1)
            # One softmax over both parts (no concatenation): shared max, shared denominator.
            m = torch.maximum(s_cols.amax(-1, keepdim=True), s_diag.amax(-1, keepdim=True)).detach()
            if sink is not None:
                m = torch.maximum(m, sink)
            e_cols, e_diag = torch.exp(s_cols - m), torch.exp(s_diag - m)
            denom = e_cols.sum(-1, keepdim=True) + e_diag.sum(-1, keepdim=True)
            if sink is not None:
                denom = denom + torch.exp(sink - m)
            o = e_cols @ v_cols + (e_diag[..., None, :] @ kv[..., d:]).squeeze(-2)
            return o / denom * (m > DEAD)  # a row that sees no key gives zeros

        # Chunks of rows are independent: single-threaded workers run them side by side (many small ops
        # with no per-op thread barrier, see blocks.run_tasks).
        outs = run_tasks(rows_out, pairs.chunks(k.shape[-1] + v.shape[-1]), q.device)
        return torch.cat(outs, dim=2).to(q.dtype)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        """Dense float32 oracle: the same selection as a ``[B, Hq, Nq, Nk]`` mask over exact attention."""
        nq, nk = check_decode_queries(self, q, k, v)
        return masked_reference(q, k, v, mods, self.keep(self.select(q, k, mods), nq, nk))

    @staticmethod
    def keep(sel: Selection, nq: int, nk: int) -> Tensor:
        """The selection as a dense bool mask ``[B, Hq, Nq, Nk]`` (tests and the reference only)."""
        batch, hq, _ = sel.columns.shape
        device = sel.columns.device
        is_offset = torch.zeros(batch, hq, nq + nk - 1, dtype=torch.bool, device=device)
        is_offset.scatter_(-1, sel.offsets + (nq - 1), True)
        cand = torch.arange(nq, device=device)[:, None] - torch.arange(nk, device=device)[None, :] + (nk - 1)
        return sel.is_column[:, :, None, :] | is_offset[:, :, cand]

    @torch.no_grad()
    def measured_pairs(self, q: Tensor, k: Tensor, mods: ScoreMods) -> Tensor:
        """The (query, key) pairs this call scores, float ``[B, Hq]``: per real query (see the module docstring),
        its chosen keys that are visible (inside the sequence, not hidden by the mask or causality)."""
        nq, nk = check_decode_queries(self, q, k, k)
        pairs = SelectedPairs(self.select(q, k, mods), q, k, mods)
        real = real_query_rows(mods.mask, nq, nk)
        total = torch.zeros(q.shape[0], q.shape[1], device=q.device)
        for r0, r1 in pairs.chunks(1):
            index = pairs.diagonal_index(r0, r1)
            zeros_cols = torch.zeros(*pairs.columns.shape[:2], r1 - r0, pairs.columns.shape[-1], device=q.device)
            visible = torch.cat([pairs.finish_columns(zeros_cols, r0, r1),
                                 pairs.finish_diagonals(torch.zeros(index.shape, device=q.device), index, r0, r1)],
                                dim=-1) > DEAD
            if real is not None:
                visible = visible & real[:, None, r0:r1, None].to(q.device)
            total += visible.sum(dim=(-2, -1))
        return total


# ------------------------------------------------------------------------------------------------ helpers


def real_query_rows(mask: Optional[Tensor], nq: int, nk: int) -> Optional[Tensor]:
    """Which query rows are real tokens: bool ``[R, Nq]`` (``R`` the mask's batch size or 1); None without a mask.

    A key-padding mask (query dim 1) marks query ``i`` real when the key at its own position ``Nk - Nq + i`` is
    visible (self-attention: a padded token's query); any other mask, when row ``i`` sees some key.
    """
    if mask is None:
        return None
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).bool().any(dim=1)  # [R, Nq|1, Nk|1]
    if m.shape[-2] == 1:
        m = m[:, 0, :]
        return m.expand(m.shape[0], nk)[:, nk - nq:] if m.shape[-1] == 1 else m[:, nk - nq:]
    return m.any(dim=-1).expand(m.shape[0], nq)


def estimation_rows(real: Optional[Tensor], nq: int, last_q: int, spread: bool, device) -> tuple[Tensor, Tensor]:
    """The estimation queries: ``(rows, valid)``, int64 and bool ``[R, L]`` with ``L = min(last_q, Nq)``.

    Per row of ``real`` (``[R, Nq]``, None: all real): the last ``L`` real queries, or (``spread``) ``L`` real
    queries evenly spaced, the last one included; ``valid`` is False where fewer than ``L`` rows are real.
    """
    real = torch.ones(1, nq, dtype=torch.bool, device=device) if real is None else real.to(device)
    n_est = min(last_q, nq)
    count = real.sum(dim=-1, keepdim=True)  # [R, 1]
    slot = torch.arange(n_est, device=device)[None, :]
    if spread:  # ranks (slot + 1) * count / L - 1: distinct when count >= L, the last one count - 1
        rank = torch.where(count >= n_est, (slot + 1) * count // n_est - 1, slot)
        valid = rank < count
    else:
        rank = count - n_est + slot
        valid = rank >= 0
    rows = torch.searchsorted(real.long().cumsum(dim=-1), (rank.clamp(min=0) + 1).contiguous())
    return rows.clamp(max=nq - 1).masked_fill(~valid, 0), valid


def visible_at(mods: ScoreMods, rows: Tensor, keys: Tensor) -> Tensor:
    """Bool: the mask and causality (top-left: key ``<= row``) at query rows ``rows`` and key positions ``keys``
    (int64, broadcasting to ``[B, Hq, rows, K]``)."""
    visible = torch.ones((), dtype=torch.bool, device=keys.device)
    if mods.mask is not None:
        visible = visible & take_pairs(mods.mask, rows, keys).bool()
    if mods.causal:
        visible = visible & (keys <= rows)
    return visible


def take_pairs(t: Tensor, rows: Tensor, keys: Tensor) -> Tensor:
    """Entries of ``t`` (broadcastable to ``[B, Hq, Nq, Nk]``) at query rows ``rows`` and keys ``keys`` (int64,
    both broadcasting to ``[B, Hq, Q, K]``); the dims ``t`` broadcasts stay broadcast."""
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t
    tb, th, tq, tk = t.shape
    zero = torch.zeros((), dtype=torch.int64, device=t.device)
    bi = torch.arange(tb, device=t.device).view(tb, 1, 1, 1) if tb > 1 else zero
    hi = torch.arange(th, device=t.device).view(1, th, 1, 1) if th > 1 else zero
    qi = rows.to(t.device) if tq > 1 else zero
    ki = keys.to(t.device) if tk > 1 else zero
    return t[bi, hi, qi, ki]


class SelectedPairs:
    """The pairs a selection scores, laid out for gathers: the columns as one key set per (batch, query head),
    the diagonal keys as rows of a padded key table (``k`` with ``Nq - 1`` zero rows before and ``2 * Nq - 1``
    after, per kv head, flattened for ``F.embedding``), so ``k[position - offset]`` is one gather whatever the
    offset. Hidden pairs get ``MASKED`` added: a per-key penalty (outside the sequence, a chosen column
    again, a padding key) read with the same index, a per-offset one (causality hides negative offsets: they
    point at the last padding rows), and, only for masks with a query dim or a bias, a gather at the pairs.
    """

    def __init__(self, sel: Selection, q: Tensor, k: Tensor, mods: ScoreMods):
        batch, hq, nq, _ = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        dev = q.device
        self.mods, self.nq, self.nk, self.hkv = mods, nq, nk, hkv
        self.columns = sel.columns
        self.pad = nq - 1
        self.width = self.pad + nk + 2 * nq - 1  # rows per kv head of the padded key table
        g = hq // hkv
        kv_head = torch.arange(batch, device=dev).view(batch, 1, 1) * hkv + (torch.arange(hq, device=dev) // g).view(1, hq, 1)
        q_head = torch.arange(batch * hq, device=dev).view(batch, hq, 1)
        self.column_index = kv_head * nk + sel.columns  # [B, Hq, V] into k flattened
        # Diagonal key of row r: position(r) - offset + pad, i.e. r + (Nk - Nq + pad - offset).
        shift = (nk - nq + self.pad) - sel.offsets
        if mods.causal:  # top-left causality hides key > row, i.e. offsets below Nk - Nq: point at the padding
            shift = torch.where(sel.offsets < nk - nq, self.pad + nk + nq - 1, shift)
        self.diagonal_shift = (kv_head * self.width + shift)[:, :, None, :]  # [B, Hq, 1, S]
        self.table_start = (kv_head * self.width + self.pad)[:, :, None, :]  # [B, Hq, 1, 1]: key 0's table row
        self.penalty_shift = ((q_head - kv_head) * self.width)[:, :, None, :]  # kv table row -> penalty row
        self.penalty = self._penalty(sel, batch, hq, dev)  # [B * Hq * width, 1]
        key_mask = mods.mask is not None and _as4(mods.mask).shape[-2] == 1
        self.column_mask = None
        if key_mask:  # a key mask hides whole columns: gathered once
            self.column_mask = take_pairs(mods.mask, torch.zeros((), dtype=torch.int64, device=dev),
                                          sel.columns[:, :, None, :]).bool()
        self.pair_mask = mods.mask is not None and not key_mask

    def _penalty(self, sel: Selection, batch: int, hq: int, dev) -> Tensor:
        hidden = torch.ones(batch, hq, self.width, dtype=torch.bool, device=dev)
        inside = ~sel.is_column
        if self.mods.mask is not None and _as4(self.mods.mask).shape[-2] == 1:
            inside = inside & _as4(self.mods.mask)[:, :, 0, :].bool().to(dev)
        hidden[..., self.pad:self.pad + self.nk] = ~inside
        return torch.zeros(hidden.shape, device=dev).masked_fill(hidden, MASKED).view(-1, 1)

    def gather_keys(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """k or v ``[B, Hkv, Nk, D]`` -> the column rows ``[B, Hq, V, D]`` and the padded table for the diagonals
        ``[B * Hkv * width, D]`` (float32)."""
        batch, hkv, nk, d = x.shape
        flat = x.float().reshape(batch * hkv * nk, d)
        table = F.pad(x.float(), (0, 0, self.pad, self.width - self.pad - nk)).reshape(-1, d)
        return F.embedding(self.column_index, flat), table

    def chunks(self, floats_per_pair: int) -> list[tuple[int, int]]:
        """Query row ranges whose gathered diagonal keys and values stay about ``CHUNK_FLOATS``."""
        per_row = self.columns.shape[0] * self.columns.shape[1] * self.diagonal_shift.shape[-1] * floats_per_pair
        return _row_chunks(self.nq, per_row)

    def diagonal_index(self, r0: int, r1: int) -> Tensor:
        """int64 ``[B, Hq, rows, S]``: the row of the padded key table each (query row, diagonal) reads."""
        return torch.arange(r0, r1, device=self.columns.device).view(1, 1, -1, 1) + self.diagonal_shift

    def finish_columns(self, s: Tensor, r0: int, r1: int) -> Tensor:
        """Plain column scores ``[B, Hq, rows, V]`` (q already scaled) softcapped, biased and masked."""
        keys = self.columns[:, :, None, :]
        s = self._modified(s, r0, r1, keys)
        hidden = None
        if self.column_mask is not None:
            hidden = ~self.column_mask
        if self.pair_mask:
            hidden = ~take_pairs(self.mods.mask, _rows(r0, r1, s.device), keys).bool()
        if self.mods.causal:
            future = keys > _rows(r0, r1, s.device)
            hidden = future if hidden is None else hidden | future
        return s if hidden is None else s.masked_fill(hidden, MASKED)

    def finish_diagonals(self, s: Tensor, index: Tensor, r0: int, r1: int) -> Tensor:
        """Plain diagonal scores ``[B, Hq, rows, S]`` (q already scaled) softcapped, biased and masked."""
        keys = None
        if self.mods.bias is not None or self.pair_mask:
            keys = (index - self.table_start).clamp(0, self.nk - 1)  # the key positions, for gathers at pairs
        s = self._modified(s, r0, r1, keys)
        s = s + F.embedding(index + self.penalty_shift, self.penalty).squeeze(-1)
        if self.pair_mask:
            s = s.masked_fill(~take_pairs(self.mods.mask, _rows(r0, r1, s.device), keys).bool(), MASKED)
        return s

    def _modified(self, s: Tensor, r0: int, r1: int, keys: Optional[Tensor]) -> Tensor:
        if self.mods.softcap > 0:
            s = self.mods.softcap * torch.tanh(s / self.mods.softcap)
        if self.mods.bias is not None:
            s = s + take_pairs(self.mods.bias, _rows(r0, r1, s.device), keys).float()
        return s


def _as4(t: Tensor) -> Tensor:
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t


def _rows(r0: int, r1: int, device) -> Tensor:
    return torch.arange(r0, r1, device=device).view(1, 1, -1, 1)


def _row_chunks(nq: int, floats_per_row: int) -> list[tuple[int, int]]:
    """Query row ranges of about ``CHUNK_FLOATS`` gathered floats each."""
    step = max(1, CHUNK_FLOATS // max(1, floats_per_row))
    return [(r0, min(nq, r0 + step)) for r0 in range(0, nq, step)]


__all__ = ["Selection", "VerticalSlashSpec", "estimation_rows", "real_query_rows"]
