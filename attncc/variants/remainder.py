"""Padding-aware block pooling and the pooled remainder that ``topk`` and ``local`` add with ``remainder=True``.

**Padding.** A key-padding mask (``mods.mask`` broadcastable to ``[B, 1, 1, Nk]``: the same keys hidden for
every query and head) marks the real tokens of each batch row. :func:`real_keys` reads it, :func:`real_queries`
carries it over to the query positions of self-attention (query ``i`` at position ``Nk - Nq + i``), and
:func:`pool_blocks` averages only real rows of each block, so padding never enters a block estimate.

**Remainder.** With ``remainder=True`` every key block a query block skips still enters that query block's
softmax, as *one* pooled entry::

    score(i, J) = log(count_J) + softcap(q_i . mean_{j in J} k_j * scale)      value(J) = mean_{j in J} v_j

where ``count_J`` is the number of real keys of block J and both means run over those keys only (padding
excluded). This is the softmax of a block whose keys all equal their mean (``count_J`` equal terms), so a
block whose keys are alike is kept almost exactly, at the cost of one score per (query, block): about
``1 / block`` of dense attention. Softcapping, when the site has it, applies to the pooled score as to any
score (before ``log(count)`` is added); an additive bias cannot be pooled exactly (it differs per key), so
the variants decline sites with a bias when ``remainder=True``; a mask other than key padding likewise.

:class:`Remainder` holds the pooled keys/values and which blocks each query block adds;
``blocks.block_sparse_attention`` takes it and appends those entries to each query block's scores.
:func:`remainder_reference` builds the same softmax densely (the test oracle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from attncc.errors import AttnccError
from attncc.util import cdiv
from attncc.variants.base import ScoreMods, sink_rows, softmax_with_sink
from attncc.variants.exact import expand_kv_heads
from attncc.variants.score_mods import apply_mods


def as_4d(t: Tensor) -> Tensor:
    """A mask or bias broadcastable to ``[B, Hq, Nq, Nk]`` with exactly four dims (leading size-1 dims added)."""
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t


def real_keys(mask: Optional[Tensor], nk: int) -> Optional[Tensor]:
    """Bool ``[b, Nk]`` (``b`` 1 or B): the real keys of each batch row when ``mask`` is a key-padding mask
    (broadcastable to ``[B, 1, 1, Nk]``: one row shared by every query and head); None for no mask or any
    other mask (a per-query or per-head mask is not padding)."""
    if mask is None or mask.dtype != torch.bool:
        return None
    m = as_4d(mask)
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[2] != 1 or m.shape[3] != nk:
        return None
    return m[:, 0, 0, :]


def real_queries(keys: Optional[Tensor], nq: int, nk: int, self_attention: bool = True) -> Optional[Tensor]:
    """Bool ``[b, Nq]``: the real queries of self-attention whose real keys are ``keys`` ``[b, Nk]`` (query
    ``i`` is the token at position ``Nk - Nq + i``); None when there is no padding or the queries are not
    the key tokens (``self_attention`` False)."""
    if keys is None or not self_attention or nq > nk:
        return None
    return keys[:, nk - nq:]


def block_sums(x: Tensor, block: int, weights: Optional[Tensor] = None, front: int = 0) -> tuple[Tensor, Tensor]:
    """Float32 sums of the rows of each block of the sequence dim and how many rows they count.

    x ``[B, H, N, D]``; ``weights`` bool/float ``[b, N]`` (b 1 or B; None: every row counts) multiplies each
    row; ``front`` zero rows are counted in front of the sequence (blocks of absolute positions, decode).
    Returns sums ``[B|b, H, nB, D]`` and counts ``[B|b, 1, nB, 1]`` with ``nB = ceil((front + N) / block)``.
    """
    n = x.shape[-2]
    total = front + n
    nb = cdiv(total, block)
    x = x.float()
    if weights is not None:
        w = weights.to(x.dtype)
        x = x * w[:, None, :, None]
    else:
        w = torch.ones(1, n, dtype=x.dtype, device=x.device)
    # Zero rows in front (decode alignment) and behind (the ragged last block) make whole blocks.
    x = F.pad(x, (0, 0, front, nb * block - total))
    w = F.pad(w, (front, nb * block - total))
    sums = x.unflatten(-2, (nb, block)).sum(dim=-2)
    counts = w.unflatten(-1, (nb, block)).sum(dim=-1)[:, None, :, None]
    return sums, counts


def pool_blocks(x: Tensor, block: int, weights: Optional[Tensor] = None, front: int = 0) -> Tensor:
    """Mean of the real rows of each block: x ``[B, H, N, D]`` -> float32 ``[B, H, nB, D]`` (see
    :func:`block_sums`). A block without a real row averages all its rows instead (its estimate then matters
    to padding only), and a block of no rows at all is zero."""
    sums, counts = block_sums(x, block, weights, front)
    mean = sums / counts.clamp_min(1)
    if weights is None:
        return mean
    all_sums, all_counts = block_sums(x, block, None, front)
    fallback = all_sums / all_counts.clamp_min(1)
    return torch.where(counts > 0, mean, fallback).expand(x.shape[0], *mean.shape[1:])


def block_counts(keys: Optional[Tensor], n: int, block: int, device) -> Tensor:
    """Real keys per key block, float32 ``[b, nKB]`` (``keys`` bool ``[b, N]``; None: every key is real)."""
    w = torch.ones(1, n, device=device) if keys is None else keys.float()
    w = F.pad(w, (0, cdiv(n, block) * block - n))
    return w.unflatten(-1, (-1, block)).sum(dim=-1)


@dataclass(frozen=True, eq=False)
class Remainder:
    """The pooled entries each query block adds to its softmax.

    ``keys`` float32 ``[B, Hkv, nR, D]`` and ``values`` ``[B, Hkv, nR, Dv]``: the mean real key/value of each
    of the ``nR`` pooled blocks; ``log_count`` float32 ``[b, 1, nR]`` (b 1 or B): ``log`` of its real keys;
    ``entries`` bool ``[b, Hq|1, nQB, nR]``: which pooled blocks query block ``i`` adds (only blocks it does
    not visit, with at least one real key, entirely visible to all of its queries).
    """

    keys: Tensor
    values: Tensor
    log_count: Tensor
    entries: Tensor


# Pooled per query block instead (``attncc.variants.clusters``): keys ``[B, Hq, nQB, nR, D]``, values
# ``[B, Hq, nQB, nR, Dv]``, ``log_count`` and ``entries`` ``[B, Hq, nQB, nR]``: each query block its own
# pooled entries; ``block_sparse_attention`` takes either form.


def pooled_keys_values(k: Tensor, v: Tensor, block: int, mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Pooled keys ``[B, Hkv, nKB, D]``, values ``[B, Hkv, nKB, Dv]`` (means over real keys) and ``log`` of
    the real-key counts ``[b, 1, nKB]`` (``-inf`` for a block of padding only)."""
    keys = real_keys(mask, k.shape[-2])
    k_sums, counts = block_sums(k, block, keys)
    v_sums, _ = block_sums(v, block, keys)
    pk, pv = k_sums / counts.clamp_min(1), v_sums / counts.clamp_min(1)
    return pk, pv, counts[:, :, :, 0].log()


def check_poolable(name: str, mods: ScoreMods, nk: int) -> None:
    """Raise unless the remainder can pool under ``mods``: no bias, and no mask other than key padding."""
    if mods.bias is not None:
        raise AttnccError(f"{name}: remainder=True cannot pool an additive bias (it differs per key); "
                          f"run without remainder or without the bias")
    if mods.mask is not None and real_keys(mods.mask, nk) is None:
        raise AttnccError(f"{name}: remainder=True pools key-padding masks only ([B, 1, 1, Nk]), got a mask "
                          f"of shape {tuple(mods.mask.shape)}")


def fully_visible(nqb: int, nkb: int, block: int, nq: int, nk: int, causal: bool, pad: int = 0,
                  device=None, key_block: Optional[int] = None) -> Tensor:
    """Bool ``[nQB, nKB]``: key block J (of ``key_block`` keys, default ``block``) is visible to every query of
    query block I (of ``block`` rows; under top-left causality when ``causal``: its last key is at or before
    the block's first query). Query block I holds rows ``I * block - pad ..`` (``pad`` leading rows that are
    not queries, decode alignment)."""
    if not causal:
        return torch.ones(nqb, nkb, dtype=torch.bool, device=device)
    key_block = block if key_block is None else key_block
    first_q = (torch.arange(nqb, device=device) * block - pad).clamp(0, nq - 1)
    last_k = (torch.arange(1, nkb + 1, device=device) * key_block).clamp(max=nk) - 1
    return last_k[None, :] <= first_q[:, None]


def remainder_reference(q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods, keep: Tensor, block: int,
                        entries: Tensor, pad: int = 0, pooled_blocks: Sequence[int] = ()) -> Tensor:
    """Dense float32 oracle of attention over the pairs ``keep`` plus pooled entries.

    q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``, v ``[B, Hkv, Nk, Dv]``; ``keep`` bool broadcastable to
    ``[B, Hq, Nq, Nk]`` (the exactly computed pairs, ``mods`` applied on top); ``entries`` bool
    ``[b, Hq|1, nQB, nR]``: the pooled blocks query block I adds (query row i is in block
    ``(i + pad) // block``). The pooled blocks are the key blocks of size ``block`` (``nKB`` of them), then
    those of each size in ``pooled_blocks`` in turn (a coarser pooling), ``nR`` in all. The pooled keys and
    values are written as averaging matrices over the real keys (independently of :func:`block_sums`).
    Returns ``[B, Hq, Nq, Dv]`` in q's dtype.
    """
    check_poolable("remainder", mods, k.shape[-2])
    qe, ke, ve, gqa = expand_kv_heads(q, k, v)
    if gqa:
        g = qe.shape[-3] // ke.shape[-3]
        ke, ve = ke.repeat_interleave(g, dim=-3), ve.repeat_interleave(g, dim=-3)
    nq, nk = q.shape[-2], k.shape[-2]
    real = real_keys(mods.mask, nk)
    real = torch.ones(1, nk, dtype=torch.bool, device=q.device) if real is None else real
    # average[b, J, j] = 1 / count_J for the real keys j of pooled block J (every size's blocks in turn)
    member = torch.cat([(torch.arange(nk, device=q.device)[None, :] // size)
                        == torch.arange(cdiv(nk, size), device=q.device)[:, None] for size in (block, *pooled_blocks)])
    nkb = member.shape[0]
    member = member[None] & real[:, None, :]
    count = member.sum(-1, keepdim=True)
    average = member.float() / count.clamp_min(1)
    pk = average[:, None] @ ke.float()            # [B, Hq, nKB, D]
    pv = average[:, None] @ ve.float()
    s = apply_mods(qe.float() @ ke.float().transpose(-2, -1), mods).masked_fill(~keep, float("-inf"))
    sp = (qe.float() @ pk.transpose(-2, -1)) * mods.scale
    if mods.softcap > 0:
        sp = mods.softcap * torch.tanh(sp / mods.softcap)
    sp = sp + count[:, None, :, 0].float().log()[:, :, None, :]
    row_block = (torch.arange(nq, device=q.device) + pad) // block
    sp = sp.masked_fill(~entries[:, :, row_block, :], float("-inf"))
    scores = torch.cat([s, sp], dim=-1)
    values = torch.cat([ve.float().expand(*scores.shape[:2], nk, -1), pv.expand(*scores.shape[:2], nkb, -1)], dim=-2)
    # a row that sees nothing (every score -inf, no sink) gives zeros, as the executor does
    p = softmax_with_sink(scores, sink_rows(mods.sinks, 1, scores.shape[1], 1, 1)).nan_to_num(0.0)
    return (p @ values).to(q.dtype)


__all__ = [
    "Remainder", "block_counts", "block_sums", "check_poolable", "fully_visible", "pool_blocks",
    "pooled_keys_values", "real_keys", "real_queries", "remainder_reference",
]
