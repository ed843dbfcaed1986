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
either one makes the variant exact (``exact_limit``). Budget beyond what the call can use (columns or
diagonals no estimation query sees) is spent on the remaining ones in index order: harmless, they are
hidden anyway where the mask hides them.

Fewer queries than keys (decode with a KV cache, chunked prefill): the queries are the last ``Nq`` tokens,
query ``i`` at position ``Nk - Nq + i`` (bottom-right), its diagonals are placed at that position, and
``mods.causal`` keeps SDPA's top-left meaning; ``supports`` declines a causal site with ``Nq != Nk`` (the
dispatch runs such calls on the fallback). A decode step estimates from its own query.

The selection is not differentiated (a discrete choice); gradients flow through the attention over the
chosen keys. ``forward`` works a chunk of query rows at a time: the columns are one gathered key set
(``[B, Hq, vertical, D]``, a matmul), the diagonal keys a gather of ``k[position - o]`` per row
(``[B, Hq, rows, slash, D]``); memory is ``O(rows * slash * D)`` per head, never ``Nq x Nk``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Optional

import sympy
import torch
from torch import Tensor

from attncc.variants.base import (
    ScoreMods, VariantSpec, attention_cost, check_decode_queries, check_int, site_sizes, sink_rows,
    softmax_with_sink, unapplied_site_features,
)
from attncc.variants.blocks import masked_softmax
from attncc.variants.exact import masked_reference
from attncc.variants.local import TOP_LEFT_CAUSAL
from attncc.variants.registry import register_variant
from attncc.variants.score_mods import modified_scores

CHUNK_FLOATS = 1 << 22
"""Gathered diagonal keys and values per chunk of query rows (16 MB of float32)."""


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
    listed: ClassVar[int] = 45

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
        s, keep = scores_at(s, mods, rows4, keys)
        keep = keep & valid[:, None, :, None]
        p = softmax_with_sink(s.masked_fill(~keep, float("-inf")), sink_rows(mods.sinks, 1, hq, 1, 1))
        p = p.nan_to_num(0.0).masked_fill(~keep, 0.0)  # rows that see nothing, and invalid estimation rows

        # Columns: summed probability per key; keys no estimation query sees rank last, the sink first.
        column_score = p.sum(dim=-2).masked_fill(~keep.any(dim=-2), float("-inf"))
        column_score[..., 0] = float("inf")
        columns = column_score.topk(min(self.vertical, nk), dim=-1).indices.sort(dim=-1).values

        # Diagonals: candidate c = o + Nq - 1 for offset o = position - key in [1 - Nq, Nk - 1]; the pair
        # (row i, key j) lies on c = i - j + Nk - 1.
        n_cand = nq + nk - 1
        cand = (rows4 - keys + (nk - 1)).expand(batch, hq, n_est, nk).reshape(batch, hq, -1)
        diag_score = torch.zeros(batch, hq, n_cand, device=q.device).scatter_add_(-1, cand, p.reshape(batch, hq, -1))
        seen = torch.zeros(batch, hq, n_cand, device=q.device).scatter_add_(
            -1, cand, keep.expand(batch, hq, n_est, nk).reshape(batch, hq, -1).float())
        diag_score = diag_score.masked_fill(seen == 0, float("-inf"))
        diag_score[..., nq - 1] = float("inf")  # the main diagonal
        offsets = diag_score.topk(min(self.slash, n_cand), dim=-1).indices.sort(dim=-1).values - (nq - 1)

        is_column = torch.zeros(batch, hq, nk, dtype=torch.bool, device=q.device)
        is_column.scatter_(-1, columns, True)
        return Selection(columns, offsets, is_column)

    # ------------------------------------------------------------------------------------------- forward

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        """q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``, v ``[B, Hkv, Nk, Dv]`` (Nq <= Nk) -> ``[B, Hq, Nq, Dv]`` in
        q's dtype (float32 math). Differentiable in q, k, v, bias and sinks; no ``Nq x Nk`` tensor is built."""
        nq, nk = check_decode_queries(self, q, k, v)
        sel = self.select(q, k, mods)
        batch, hq, _, d = q.shape
        dv = v.shape[-1]
        kf, vf = k.float(), v.float()
        bi, hi = _batch_head_index(batch, hq, k.shape[1], q.device)
        k_cols = kf[bi, hi, sel.columns]  # [B, Hq, V, D]
        v_cols = vf[bi, hi, sel.columns]
        n_cols = sel.columns.shape[-1]
        sink = sink_rows(mods.sinks, 1, hq, 1, 1)
        outs = []
        for r0, r1 in _row_chunks(nq, batch * hq * sel.offsets.shape[-1] * (d + dv)):
            keys, keep = pair_keys(sel, r0, r1, nq, nk)
            diag = keys[..., n_cols:]
            qc = q[:, :, r0:r1].float()
            s_cols = qc @ k_cols.transpose(-1, -2)  # [B, Hq, rows, V]
            s_diag = (kf[bi[..., None], hi[..., None], diag] @ qc[..., None]).squeeze(-1)  # [B, Hq, rows, S]
            s, visible = scores_at(torch.cat([s_cols, s_diag], dim=-1), mods, _rows(r0, r1, q.device), keys)
            p = masked_softmax(s, keep & visible, sink)
            o = p[..., :n_cols] @ v_cols + (p[..., None, n_cols:] @ vf[bi[..., None], hi[..., None], diag]).squeeze(-2)
            outs.append(o)
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
        sel = self.select(q, k, mods)
        real = real_query_rows(mods.mask, nq, nk)
        total = torch.zeros(q.shape[0], q.shape[1], device=q.device)
        for r0, r1 in _row_chunks(nq, q.shape[0] * q.shape[1] * (sel.columns.shape[-1] + sel.offsets.shape[-1])):
            keys, keep = pair_keys(sel, r0, r1, nq, nk)
            keep = keep & visible_at(mods, _rows(r0, r1, q.device), keys)
            if real is not None:
                keep = keep & real[:, None, r0:r1, None]
            total += keep.sum(dim=(-2, -1))
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


def scores_at(s: Tensor, mods: ScoreMods, rows: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """Plain scores ``s`` (``q . k``, ``[B, Hq, rows, K]``) at query rows ``rows`` and key positions ``keys``
    scaled, softcapped and biased, and which of them the mask and causality leave visible (bool)."""
    bias = take_pairs(mods.bias, rows, keys) if mods.bias is not None else None
    s = modified_scores(s, ScoreMods(scale=mods.scale, softcap=mods.softcap, bias=bias))
    return s, visible_at(mods, rows, keys).expand(s.shape)


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


def pair_keys(sel: Selection, r0: int, r1: int, nq: int, nk: int) -> tuple[Tensor, Tensor]:
    """The keys query rows ``[r0, r1)`` attend: int64 ``[B, Hq, rows, V + S]`` (the columns, then the diagonal
    keys ``position - offset`` clamped into range) and bool of the same shape, False at a diagonal key outside
    the sequence or that is one of the columns (attended once, as a column)."""
    batch, hq, n_cols = sel.columns.shape
    positions = torch.arange(r0, r1, device=sel.columns.device).view(1, 1, -1, 1) + (nk - nq)
    diag = positions - sel.offsets[:, :, None, :]
    inside = (diag >= 0) & (diag < nk)
    diag = diag.clamp(0, nk - 1)
    again = sel.is_column.gather(-1, diag.flatten(-2)).view(diag.shape)
    keys = torch.cat([sel.columns[:, :, None, :].expand(batch, hq, r1 - r0, n_cols), diag], dim=-1)
    keep = torch.cat([torch.ones(batch, hq, r1 - r0, n_cols, dtype=torch.bool, device=diag.device),
                      inside & ~again], dim=-1)
    return keys, keep


def _batch_head_index(batch: int, hq: int, hkv: int, device) -> tuple[Tensor, Tensor]:
    """Index tensors ``[B, 1, 1]`` and ``[1, Hq, 1]`` selecting each query head's kv head (``h // g``)."""
    return (torch.arange(batch, device=device).view(batch, 1, 1),
            (torch.arange(hq, device=device) // (hq // hkv)).view(1, hq, 1))


def _rows(r0: int, r1: int, device) -> Tensor:
    return torch.arange(r0, r1, device=device).view(1, 1, -1, 1)


def _row_chunks(nq: int, floats_per_row: int) -> list[tuple[int, int]]:
    """Query row ranges of about ``CHUNK_FLOATS`` gathered floats each."""
    step = max(1, CHUNK_FLOATS // max(1, floats_per_row))
    return [(r0, min(nq, r0 + step)) for r0 in range(0, nq, step)]


__all__ = ["Selection", "VerticalSlashSpec", "estimation_rows", "real_query_rows"]
