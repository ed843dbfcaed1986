"""Block-sparse softmax attention: the executor that sparse variants lower to.

A :class:`BlockLayout` lists, for each block of ``block_q`` queries, the blocks of ``block_k`` keys it visits.
:func:`block_sparse_attention` gathers exactly those key/value blocks, scores them in float32, applies the
element predicate only where the layout says a block is partial (plus the :class:`ScoreMods` causality, mask,
bias and softcapping), and combines with a softmax over the visited keys. Memory is
``O(Nq * K * block_k)`` per head for ``K`` visited blocks per query block; no ``Nq x Nk`` tensor is ever built
(masks and biases are gathered at the visited pairs only). :func:`layout_from_keep` turns any predicate into
a layout without building one either.

A query row with no visible key returns zeros (the softmax of an empty set is taken as the zero vector).

:func:`run_tasks` runs independent chunks of such work on single-threaded CPU worker threads (used by the
local and neighborhood variants too); see its docstring for why.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from attncc.errors import AttnccError
from attncc.util import cdiv
from attncc.variants.base import ScoreMods, sink_rows, softmax_with_sink
from attncc.variants.score_mods import modified_scores, visible_pairs

MASKED = -1e30
"""Score of a hidden pair. Finite on purpose: a fully hidden row then stays finite through softmax and its
backward (``-inf`` would give NaN gradients that leak into k and v); such rows are zeroed explicitly."""

DEAD = MASKED / 2
"""A row whose largest score is below this saw no visible key."""

if TYPE_CHECKING:
    from attncc.variants.remainder import Remainder

KeepFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Which key blocks each query block visits.

    ``kv_blocks`` is int64 ``[*lead, nQB, K]`` with ``nQB = ceil(nq / block_q)``: the key-block indices
    (``0 <= idx < ceil(nk / block_k)``) each query block visits, ``-1`` for padding entries. ``lead`` is ``()``
    or broadcastable to ``(B, Hq)``; its head size may also be ``Hkv`` (one layout per key/value head, shared
    by its query group). ``partial`` (bool, same shape) is True where the element predicate must be applied,
    False where the whole block is visible; None means every entry is partial.
    """

    block_q: int
    block_k: int
    nq: int
    nk: int
    kv_blocks: Tensor
    partial: Optional[Tensor] = None

    def __post_init__(self):
        for name in ("block_q", "block_k", "nq", "nk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AttnccError(f"BlockLayout: {name} must be an integer >= 1, got {value!r}")
        kv = self.kv_blocks
        if not isinstance(kv, Tensor) or kv.dtype != torch.int64 or kv.dim() < 2:
            raise AttnccError("BlockLayout: kv_blocks must be an int64 tensor [*lead, nQB, K]")
        if kv.dim() > 4:
            raise AttnccError(f"BlockLayout: kv_blocks lead must broadcast to (B, Hq), got shape {tuple(kv.shape)}")
        if kv.shape[-2] != self.n_q_blocks:
            raise AttnccError(
                f"BlockLayout: kv_blocks has {kv.shape[-2]} query blocks, expected ceil({self.nq}/{self.block_q})"
                f" = {self.n_q_blocks}"
            )
        if self.partial is not None and (self.partial.dtype != torch.bool or self.partial.shape != kv.shape):
            raise AttnccError("BlockLayout: partial must be a bool tensor shaped like kv_blocks")

    @property
    def n_q_blocks(self) -> int:
        return cdiv(self.nq, self.block_q)

    @property
    def n_k_blocks(self) -> int:
        return cdiv(self.nk, self.block_k)

    def pairs_visited(self) -> int:
        """(query, key) pairs scored per (batch, head), counting whole blocks (the executor's real work)."""
        visits = (self.kv_blocks >= 0).sum(-1).double().reshape(-1, self.n_q_blocks)  # [lead, nQB]
        return int(round(visits.mean(0).sum().item() * self.block_q * self.block_k))


def layout_from_keep(keep: KeepFn, nq: int, nk: int, block_q: int, block_k: int, device) -> BlockLayout:
    """The layout of a predicate ``keep(q_idx, kv_idx) -> bool`` (``q_idx`` int64 ``[rows, 1]``, ``kv_idx``
    ``[1, nk]``).

    Evaluated a few query blocks at a time (``O(block_q * Nk)`` temporaries, ``O(nQB * nKB)`` result).
    Blocks with no visible element are dropped; blocks visible everywhere (within ``nq x nk``) are marked
    not partial. ``kv_blocks`` is ``[nQB, K]`` with K the most blocks any query block visits.
    """
    for name, value in (("nq", nq), ("nk", nk), ("block_q", block_q), ("block_k", block_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AttnccError(f"layout_from_keep: {name} must be an integer >= 1, got {value!r}")
    nqb, nkb = cdiv(nq, block_q), cdiv(nk, block_k)
    kv_idx = torch.arange(nk, device=device)[None, :]
    rows_per_step = max(1, (1 << 22) // max(1, block_q * nk))
    any_parts, all_parts = [], []
    for b0 in range(0, nqb, rows_per_step):
        b1 = min(nqb, b0 + rows_per_step)
        q_lo, q_hi = b0 * block_q, min(nq, b1 * block_q)
        q_idx = torch.arange(q_lo, q_hi, device=device)[:, None]
        visible = torch.as_tensor(keep(q_idx, kv_idx), device=device).broadcast_to(q_hi - q_lo, nk)
        # Padded rows/keys are outside the attention: neither visible nor a reason to call a block partial.
        rows_pad, keys_pad = (b1 - b0) * block_q - (q_hi - q_lo), nkb * block_k - nk
        grid_any = F.pad(visible, (0, keys_pad, 0, rows_pad), value=False)
        grid_all = F.pad(visible, (0, keys_pad, 0, rows_pad), value=True)
        shape = (b1 - b0, block_q, nkb, block_k)
        any_parts.append(grid_any.view(shape).any(3).any(1))
        all_parts.append(grid_all.view(shape).all(3).all(1))
    visits, full = torch.cat(any_parts), torch.cat(all_parts)
    k = max(1, int(visits.sum(1).max().item()))
    # Stable sort puts visited blocks first, in increasing block order.
    order = torch.sort((~visits).to(torch.int8), dim=1, stable=True).indices[:, :k]
    taken = visits.gather(1, order)
    kv_blocks = torch.where(taken, order, torch.full_like(order, -1))
    partial = taken & ~full.gather(1, order)
    return BlockLayout(block_q, block_k, nq, nk, kv_blocks, partial)


def layout_from_block_mask(visits: Tensor, full: Optional[Tensor], block_q: int, block_k: int, nq: int,
                           nk: int) -> BlockLayout:
    """The layout visiting the key blocks ``visits`` marks (bool ``[*lead, nQB, nKB]``), in increasing block
    order; ``full`` (same shape, or None: every visit partial) marks blocks visible everywhere, which need no
    element predicate. ``kv_blocks`` is ``[*lead, nQB, K]`` with K the most blocks any query block visits."""
    nkb = visits.shape[-1]
    k = max(1, int(visits.sum(-1).max().item())) if visits.numel() else 1
    order = torch.sort((~visits).to(torch.int8), dim=-1, stable=True).indices[..., :k]
    taken = visits.gather(-1, order)
    kv_blocks = torch.where(taken, order, torch.full_like(order, -1))
    partial = None if full is None else taken & ~full.gather(-1, order)
    if nkb == 0:
        raise AttnccError("layout_from_block_mask: no key blocks")
    return BlockLayout(block_q, block_k, nq, nk, kv_blocks, partial)


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, mods: ScoreMods, keep: Optional[KeepFn] = None,
    chunk_bytes: Optional[int] = None, remainder: Optional["Remainder"] = None,
) -> Tensor:
    """Softmax attention over the key blocks ``layout`` lists for each query block.

    q ``[B, Hq, Nq, Dqk]``, k ``[B, Hkv, Nk, Dqk]``, v ``[B, Hkv, Nk, Dv]`` (GQA: query head h reads kv head
    ``h // (Hq // Hkv)``); returns ``[B, Hq, Nq, Dv]`` in q's dtype. ``keep(q_idx, kv_idx)`` (int64 index
    tensors that broadcast, positions clamped into ``[0, Nq)`` x ``[0, Nk)``) is applied inside partial blocks;
    ``mods`` (scale, softcap, bias, mask, causal) everywhere. A row with no visible key returns zeros.
    Differentiable. Work is chunked over query blocks so temporaries stay near ``chunk_bytes`` (default: 8 MB
    on CPU, where cache-resident chunks are fastest; 256 MB elsewhere); on CPU the chunks run on
    :func:`run_tasks` worker threads, so ``keep`` must be a pure tensor function.

    ``remainder`` (a :class:`attncc.variants.remainder.Remainder`): pooled key blocks that each query block adds
    to its softmax as one entry each (score ``log(count) + softcap(q . mean_k * scale)``, value ``mean_v``);
    ``mods.bias`` does not reach them (callers decline a bias with a remainder).
    """
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or hq % hkv != 0 or k.shape[-1] != d:
        raise AttnccError(
            f"block_sparse_attention: bad shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if (layout.nq, layout.nk) != (nq, nk):
        raise AttnccError(f"block_sparse_attention: layout is for {layout.nq}x{layout.nk}, inputs are {nq}x{nk}")
    g = hq // hkv
    bq, bk = layout.block_q, layout.block_k
    nqb, nkb = layout.n_q_blocks, layout.n_k_blocks
    kv_blocks, partial = _layout_heads(layout, b, hq, hkv)
    per_head = kv_blocks.shape[3] > 1  # a different key set per query head of a group
    kk = kv_blocks.shape[-1] * bk

    # Queries as [B, Hkv, nQB, g, bq, D] so a group's heads share one gathered key block.
    qs = _pad_seq(q.float() * mods.scale, nqb * bq - nq).view(b, hkv, g, nqb, bq, d).transpose(2, 3)
    kb = _pad_seq(k.float(), nkb * bk - nk).view(b, hkv, nkb, bk, d)
    vb = _pad_seq(v.float(), nkb * bk - nk).view(b, hkv, nkb, bk, dv)

    if chunk_bytes is None:
        chunk_bytes = (8 << 20) if q.device.type == "cpu" else (256 << 20)
    # Temporaries of one query block of one batch row (scores, probabilities, gathered keys and values).
    per_block = 4 * hq * bq * kk * 3 + 4 * hkv * (g if per_head else 1) * kk * (d + dv)
    # A task takes whole batch rows while one query block of all of them fits the budget, else one batch row
    # and as many query blocks as fit: chunks stay cache-sized (small blocks gather many small pieces, and
    # fresh multi-MB temporaries cost page faults on every chunk).
    if per_block * b <= chunk_bytes:
        rows, step = b, max(1, min(chunk_bytes // (per_block * b), cdiv(nqb, torch.get_num_threads())))
    else:
        rows, step = 1, max(1, min(nqb, chunk_bytes // per_block))
    tasks = [(b0, min(b, b0 + rows), c0, min(nqb, c0 + step)) for b0 in range(0, b, rows) for c0 in range(0, nqb, step)]

    pooled = None if remainder is None else _remainder_heads(remainder, b, hq, hkv, nqb)

    def chunk(task) -> Tensor:
        b0, b1, c0, c1 = task
        lb = slice(b0, b1) if kv_blocks.shape[0] > 1 else slice(None)
        rem = None
        if pooled is not None:
            pk, pv, log_count, entries = pooled
            if pk.dim() == 6:  # per query block
                rem = (pk[b0:b1, :, c0:c1], pv[b0:b1, :, c0:c1], log_count[b0:b1, :, c0:c1], entries[b0:b1, :, c0:c1])
            else:
                rem = (pk[b0:b1], pv[b0:b1], log_count[b0:b1] if log_count.shape[0] > 1 else log_count,
                       entries[slice(b0, b1) if entries.shape[0] > 1 else slice(None), :, c0:c1])
        return _chunk(qs[b0:b1, :, c0:c1], kb[b0:b1], vb[b0:b1], kv_blocks[lb, :, c0:c1],
                      None if partial is None else partial[lb, :, c0:c1], c0, layout,
                      _batch_rows(mods, b0, b1, b), keep, g, per_head, rem)

    pieces = run_tasks(chunk, tasks, q.device)
    per_row = cdiv(nqb, step)
    out = torch.cat([torch.cat(pieces[i:i + per_row], dim=2) for i in range(0, len(pieces), per_row)], dim=0)
    return out.transpose(2, 3).reshape(b, hq, nqb * bq, dv)[:, :, :nq].to(q.dtype)  # from [B, Hkv, nQB, g, bq, Dv]


def _pad_seq(x: Tensor, rows: int) -> Tensor:
    """``x`` ``[B, H, N, D]`` with ``rows`` zero rows after its sequence, contiguous (no copy when it already is
    and needs none: the blocks view it as it is)."""
    return F.pad(x, (0, 0, 0, rows)) if rows else x.contiguous()


def _batch_rows(mods: ScoreMods, b0: int, b1: int, b: int) -> ScoreMods:
    """``mods`` for batch rows ``[b0, b1)`` of ``b``: bias and mask sliced where they have a batch dim."""
    if b0 == 0 and b1 == b:
        return mods

    def rows(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None or t.dim() < 4 or t.shape[0] == 1:
            return t
        return t[b0:b1]

    return replace(mods, bias=rows(mods.bias), mask=rows(mods.mask))


def _layout_heads(layout: BlockLayout, b: int, hq: int, hkv: int) -> tuple[Tensor, Optional[Tensor]]:
    """kv_blocks and partial as ``[lb, Hkv|1, nQB, g|1, K]`` (lb in (1, B))."""
    g = hq // hkv
    kv = layout.kv_blocks
    lead = kv.shape[:-2]
    lead = (1,) * (2 - len(lead)) + tuple(lead)
    if lead[0] not in (1, b) or lead[1] not in (1, hq, hkv):
        raise AttnccError(f"block_sparse_attention: layout lead {tuple(kv.shape[:-2])} does not broadcast to "
                          f"(B={b}, Hq={hq})")

    def shaped(t: Tensor) -> Tensor:
        t = t.reshape(*lead, *t.shape[-2:])
        if lead[1] == hq and g > 1:
            return t.view(lead[0], hkv, g, *t.shape[-2:]).transpose(2, 3)
        return t.unsqueeze(3)

    kv_blocks = shaped(kv.to(torch.int64))
    partial = None if layout.partial is None else shaped(layout.partial)
    return kv_blocks, partial


def _remainder_heads(remainder, b: int, hq: int, hkv: int, nqb: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A Remainder in the executor's layout: pooled keys ``[B, Hkv, nR, D]`` and values (float32), log counts
    ``[b|1, 1, 1, 1, 1, nR]`` and entries ``[b|1, Hkv|1, nQB, g|1, nR]``; per query block (keys
    ``[B, Hq, nQB, nR, D]``, log counts ``[B, Hq, nQB, nR]``): keys and values ``[B, Hkv, nQB, g, nR, D]`` and
    log counts ``[B, Hkv, nQB, g, 1, nR]``."""
    g = hq // hkv
    keys, values = remainder.keys.float(), remainder.values.float()
    n_r = keys.shape[-2]
    if keys.dim() == 5:  # pooled per query block (by key cluster)
        if keys.shape[:4] != (b, hq, nqb, n_r) or values.shape[:4] != keys.shape[:4] \
                or remainder.log_count.shape != (b, hq, nqb, n_r) or remainder.entries.shape != (b, hq, nqb, n_r):
            raise AttnccError(f"block_sparse_attention: per-query-block remainder keys {tuple(keys.shape)} / "
                              f"entries {tuple(remainder.entries.shape)} are not [B={b}, Hq={hq}, nQB={nqb}, nR]")

        def grouped(t: Tensor) -> Tensor:  # [B, Hq, nQB, ...] -> [B, Hkv, nQB, g, ...]
            return t.reshape(b, hkv, g, *t.shape[2:]).transpose(2, 3)

        return (grouped(keys), grouped(values), grouped(remainder.log_count.float()).unsqueeze(-2),
                grouped(remainder.entries))
    if keys.shape[:2] != (b, hkv) or values.shape[:3] != keys.shape[:3]:
        raise AttnccError(f"block_sparse_attention: remainder keys {tuple(keys.shape)} / values "
                          f"{tuple(values.shape)} are not [B={b}, Hkv={hkv}, nR, D]")
    log_count = remainder.log_count.float().reshape(-1, 1, 1, 1, 1, n_r)
    entries = remainder.entries
    if entries.dim() != 4 or entries.shape[-2:] != (nqb, n_r) or entries.shape[1] not in (1, hq):
        raise AttnccError(f"block_sparse_attention: remainder entries {tuple(entries.shape)} are not "
                          f"[B|1, Hq|1, nQB={nqb}, nR={n_r}]")
    if entries.shape[1] == hq and g > 1:
        entries = entries.view(entries.shape[0], hkv, g, nqb, n_r).transpose(2, 3)
    else:
        entries = entries.unsqueeze(3)
    return keys, values, log_count, entries


def _chunk(qs, kb, vb, kv_blocks, partial, c0, layout, mods, keep, g, per_head, rem=None) -> Tensor:
    """Attention of query blocks ``[c0, c0 + c)``: qs ``[B, Hkv, c, g, bq, D]`` -> ``[B, Hkv, c, g, bq, Dv]``;
    ``rem``: the chunk's pooled remainder (``_remainder_heads``) or None."""
    b, hkv, c, _, bq, d = qs.shape
    bk, dv = kb.shape[3], vb.shape[-1]
    idx = kv_blocks.clamp_min(0)  # [lb, Hkv|1, c, g|1, K]
    kg, vg = _gather_blocks(kb, idx), _gather_blocks(vb, idx)  # [B, Hkv, c, g|1, K*bk, D|Dv]
    if per_head:
        s = qs @ kg.transpose(-1, -2)  # [B, Hkv, c, g, bq, K*bk]
    else:
        s = (qs.reshape(b, hkv, c, g * bq, d) @ kg.squeeze(3).transpose(-1, -2)).view(b, hkv, c, g, bq, -1)
    if mods.softcap > 0:
        s = mods.softcap * torch.tanh(s / mods.softcap)

    q_pos = (c0 + torch.arange(c, device=kb.device))[:, None] * bq + torch.arange(bq, device=kb.device)
    k_pos = (idx[..., None] * bk + torch.arange(bk, device=kb.device)).flatten(-2)  # [lb, Hkv|1, c, g|1, K*bk]
    q6 = q_pos.view(1, 1, c, 1, bq, 1)
    k6 = k_pos.unsqueeze(-2)
    if mods.bias is not None:
        s = s + gather_pairs(mods.bias, q_pos, k_pos, hkv, g).float()
    keep_mask = _element_keep(kv_blocks, partial, q6, k6, layout, mods, keep, bk)
    if mods.mask is not None:
        m = gather_pairs(mods.mask, q_pos, k_pos, hkv, g)
        keep_mask = m if keep_mask is None else keep_mask & m
    sink = sink_rows(mods.sinks, 1, hkv, 1, g, 1, 1)
    if rem is not None:
        return _chunk_with_remainder(qs, s, keep_mask, vg, rem, mods, sink, per_head)
    p = masked_softmax(s, keep_mask, sink)
    if per_head:
        return p @ vg
    return (p.view(b, hkv, c, g * bq, -1) @ vg.squeeze(3)).view(b, hkv, c, g, bq, dv)


def _chunk_with_remainder(qs, s, keep_mask, vg, rem, mods, sink, per_head) -> Tensor:
    """The chunk's softmax over its visited keys (scores ``s`` ``[B, Hkv, c, g, bq, KK]``, visibility
    ``keep_mask``) and its pooled entries together: ``[B, Hkv, c, g, bq, Dv]``."""
    pk, pv, log_count, entries = rem
    b, hkv, c, g, bq, d = qs.shape
    kk, n_r, dv = s.shape[-1], pk.shape[-2], pv.shape[-1]
    if pk.dim() == 6:  # per query block: [B, Hkv, c, g, nR, D]
        sr = qs @ pk.transpose(-1, -2)
    else:
        sr = (qs.reshape(b, hkv, c * g * bq, d) @ pk.transpose(-1, -2)).view(b, hkv, c, g, bq, n_r)
    if mods.softcap > 0:
        sr = mods.softcap * torch.tanh(sr / mods.softcap)
    sr = sr + log_count
    visible = torch.ones_like(s, dtype=torch.bool) if keep_mask is None else keep_mask.expand(s.shape)
    keep_all = torch.cat([visible, entries.unsqueeze(-2).expand(sr.shape)], dim=-1)
    p = masked_softmax(torch.cat([s, sr], dim=-1), keep_all, sink)
    if pv.dim() == 6:
        pr = p[..., kk:] @ pv
    else:
        pr = (p[..., kk:].reshape(b, hkv, c * g * bq, n_r) @ pv).view(b, hkv, c, g, bq, dv)
    p = p[..., :kk]
    if per_head:
        return p @ vg + pr
    return (p.reshape(b, hkv, c, g * bq, kk) @ vg.squeeze(3)).view(b, hkv, c, g, bq, dv) + pr


def _gather_blocks(xb: Tensor, idx: Tensor) -> Tensor:
    """The key (or value) blocks ``idx`` lists, each query block's laid out in one row of ``K * bk``.

    xb ``[B, Hkv, nKB, bk, D]``, idx int64 ``[lb, Hkv|1, c, g|1, K]`` (valid block indices) ->
    ``[B, Hkv, c, g|1, K * bk, D]``. One ``index_select`` of whole blocks from the flattened tensor: a block is
    one contiguous row of ``bk * D`` floats, so this is a row copy, about 3x faster on CPU than advanced
    indexing with broadcast index tensors (which dominated the time of 16-key blocks).
    """
    b, hkv, nkb, bk, d = xb.shape
    rows = torch.arange(b, device=xb.device).view(b, 1, 1, 1, 1) * (hkv * nkb)
    rows = rows + torch.arange(hkv, device=xb.device).view(1, hkv, 1, 1, 1) * nkb + idx
    flat = xb.reshape(b * hkv * nkb, bk * d)
    return flat.index_select(0, rows.reshape(-1)).view(*rows.shape[:-1], rows.shape[-1] * bk, d)


def _element_keep(kv_blocks, partial, q6, k6, layout, mods, keep, bk) -> Optional[Tensor]:
    """The per-element visibility inside the gathered blocks (None where everything is visible)."""
    terms = []
    padded = (kv_blocks < 0).any().item() or layout.nk % bk != 0
    if padded:
        entry_ok = (kv_blocks >= 0).repeat_interleave(bk, dim=-1).unsqueeze(-2)
        terms.append(entry_ok & (k6 < layout.nk))
    if keep is not None and (partial is None or partial.any().item()):
        inside = keep(q6.clamp_max(layout.nq - 1), k6.clamp_max(layout.nk - 1))
        inside = torch.as_tensor(inside, device=k6.device)
        if partial is not None:
            inside = inside | ~partial.repeat_interleave(bk, dim=-1).unsqueeze(-2)
        terms.append(inside)
    if mods.causal:
        terms.append(k6 <= q6)
    if not terms:
        return None
    out = terms[0]
    for t in terms[1:]:
        out = out & t
    return out


def gather_pairs(t: Tensor, q_pos: Tensor, k_pos: Tensor, hkv: int, g: int) -> Tensor:
    """Entries of ``t`` (broadcastable to ``[B, Hq, Nq, Nk]``, ``Hq = hkv * g``) at the visited pairs.

    ``q_pos`` is ``[c, bq]`` (query positions of c query blocks), ``k_pos`` ``[lb, Hkv|1, c, g|1, KK]`` (key
    positions each block visits); both are clamped into range. Returns ``[tb, Hkv|1, c|1, g|1, bq|1, KK|1]``,
    keeping size 1 wherever ``t`` broadcasts, so a key-padding mask costs ``O(c * KK)``, never ``Nq x Nk``.
    """
    while t.dim() < 4:
        t = t.unsqueeze(0)
    if t.dim() != 4:
        raise AttnccError(f"score mask/bias must broadcast to [B, Hq, Nq, Nk], got shape {tuple(t.shape)}")
    tb, th, tq, tk = t.shape
    if th not in (1, hkv * g):
        raise AttnccError(f"score mask/bias has {th} heads, expected 1 or {hkv * g}")
    c, bq = q_pos.shape
    if tq == 1 and tk == 1:
        heads = (hkv, g) if th > 1 else (1, 1)
        return t.reshape(tb, heads[0], 1, heads[1], 1, 1)
    dev = t.device
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    bi = torch.arange(tb, device=dev).view(tb, 1, 1, 1, 1, 1) if tb > 1 else zero
    hi = torch.arange(th, device=dev).view(1, hkv, 1, g, 1, 1) if th > 1 else zero
    qi = q_pos.clamp_max(tq - 1).view(1, 1, c, 1, bq, 1) if tq > 1 else zero
    ki = k_pos.clamp_max(tk - 1).unsqueeze(-2) if tk > 1 else zero
    return t[bi, hi, qi, ki]


_POOL: Optional[ThreadPoolExecutor] = None
_POOL_LOCK = threading.Lock()
_IN_WORKER = threading.local()


def _single_threaded_worker() -> None:
    # get_num_threads first: its one-time per-thread initialization would later overwrite the setting with
    # the process-wide default. set_num_threads(1) then holds for this thread (the default is restored below).
    torch.get_num_threads()
    torch.set_num_threads(1)
    _IN_WORKER.active = True


def _make_pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` single-threaded workers, all started before it is returned.

    ``torch.set_num_threads`` in a worker also changes the process-wide default that threads initializing
    later copy (inductor's compiled kernels then ran on one thread), so once every worker is up the caller's
    setting is written back.
    """
    pool = ThreadPoolExecutor(threads, initializer=_single_threaded_worker, thread_name_prefix="attncc")
    ready = threading.Barrier(threads + 1)
    started = [pool.submit(ready.wait) for _ in range(threads)]  # each blocks a distinct worker until all exist
    ready.wait()
    for f in started:
        f.result()
    torch.set_num_threads(threads)
    return pool


def run_tasks(work: Callable[[Any], Any], tasks: Sequence[Any], device) -> list:
    """``[work(t) for t in tasks]``, spread over ``torch.get_num_threads()`` worker threads on CPU.

    Each worker runs single-threaded torch ops, so the tasks run side by side with no per-op OpenMP barrier:
    with many small ops a barrier costs little on an idle machine but up to a scheduler time slice when
    another process competes for a core, which made the per-op parallel version several times slower under
    load. Grad and inference modes (thread-local) are carried into the workers. Serial elsewhere (other
    devices, one thread or task, or when already inside a worker).
    """
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads < 2 or len(tasks) < 2 or getattr(_IN_WORKER, "active", False):
        return [work(t) for t in tasks]
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers != threads:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = _make_pool(threads)
        pool = _POOL
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(task):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return work(task)

    return list(pool.map(run, tasks))


def dense_rows(q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods, rows: int) -> Tensor:
    """Queries ``[0, rows)`` attending every key under ``mods`` (global tokens): ``[B, Hq, rows, Dv]`` float32.

    ``O(rows * Nk)`` scores; a row with no visible key returns zeros. q ``[B, Hq, Nq, Dqk]``, k/v ``[B, Hkv, ...]``.
    """
    b, hq, _, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    dev = q.device
    qg = (q[:, :, :rows].float() * mods.scale).reshape(b, hkv, g * rows, d)
    s = (qg @ k.float().transpose(-1, -2)).view(b, hkv, g, rows, nk)
    q_pos, k_pos = torch.arange(rows, device=dev), torch.arange(nk, device=dev)

    def pairs(t: Optional[Tensor]) -> Optional[Tensor]:  # bias / mask rows in the layout of s
        return None if t is None else gather_pairs(t, q_pos.view(1, rows), k_pos.view(1, 1, 1, 1, nk), hkv, g)[:, :, 0]

    # q was scaled before the product (this path always did; keeps its numbers): scale 1.0 multiplies exactly
    row_mods = replace(mods, scale=1.0, bias=pairs(mods.bias), mask=pairs(mods.mask))
    s = modified_scores(s, row_mods)
    keep = visible_pairs(row_mods, q_pos, k_pos)
    p = masked_softmax(s, keep, sink_rows(mods.sinks, 1, hkv, g, 1, 1))
    return (p.view(b, hkv, g * rows, nk) @ v.float()).view(b, hq, rows, -1)


def masked_softmax(s: Tensor, keep: Optional[Tensor], sink: Optional[Tensor] = None) -> Tensor:
    """Softmax over the last dim of float scores ``s`` with the pairs where ``keep`` is False hidden
    (``MASKED``); a row with no visible key gives zeros. ``keep`` None: a plain softmax. ``sink``: learned sink
    logits broadcastable to ``s[..., :1]``, one more term in each row's denominator (see ``softmax_with_sink``)."""
    if keep is None:
        return softmax_with_sink(s, sink)
    s = s.masked_fill(~keep, MASKED)
    return softmax_with_sink(s, sink) * (s.amax(-1, keepdim=True) > DEAD)


def dense_layout(nq: int, nk: int, block_q: int = 64, block_k: int = 64, device=None) -> BlockLayout:
    """Every query block visits every key block, none partial: the executor then computes exact attention."""
    nqb, nkb = cdiv(nq, block_q), cdiv(nk, block_k)
    kv = torch.arange(nkb, device=device).expand(nqb, nkb).contiguous()
    return BlockLayout(block_q, block_k, nq, nk, kv, torch.zeros(nqb, nkb, dtype=torch.bool, device=device))


def visited_fraction(layout: BlockLayout) -> float:
    """Scored pairs over ``nq * nk`` (whole blocks counted): how much of dense attention the layout does."""
    return layout.pairs_visited() / (layout.nq * layout.nk) if layout.nq * layout.nk else 0.0


__all__ = [
    "BlockLayout", "DEAD", "MASKED", "block_sparse_attention", "dense_layout", "dense_rows", "gather_pairs",
    "layout_from_block_mask", "layout_from_keep", "run_tasks", "visited_fraction",
]
