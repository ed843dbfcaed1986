"""Exact attention under a label mask: Swin's shifted-window regions and packed documents.

Documents (``-inf`` between tokens of different labels): each batch row runs block-sparse over the blocks where
a query and a key share a document, so the others are skipped with zero error.

Regions: Swin attends within windows of N tokens; after the cyclic shift some windows hold tokens of up to four
image regions, and the model adds a fill value (timm: -100) to the scores between tokens of different regions. Most
windows hold one region, so their mask is zero everywhere: those rows run without any mask, the mixed ones
with the mask built from the labels. Same numbers as the model (the fill value is kept as it is, not turned
into -inf).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from attncc.variants.base import ScoreMods
from attncc.variants.blocks import block_sparse_attention, layout_from_keep
from attncc.variants.exact import exact_forward


def region_bias(labels: Tensor, fill: float, dtype: torch.dtype) -> Tensor:
    """``[R, 1, N, N]`` additive mask: 0 between tokens of one region, ``fill`` between regions."""
    same = labels[:, None, :, None] == labels[:, None, None, :]
    return torch.zeros(same.shape, dtype=dtype, device=labels.device).masked_fill(~same, fill)


def segment_attention(
    q: Tensor, k: Tensor, v: Tensor, segments: Tensor, fill: float, bias: Optional[Tensor], mask: Optional[Tensor],
    scale: float, causal: bool, softcap: float, dropout_p: float, dropout_seed: Optional[Tensor],
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """``segment_forward`` with the score modifications spelled out as arguments."""
    mods = ScoreMods(scale=scale, causal=causal, softcap=softcap, bias=bias, mask=mask, sinks=sinks,
                     dropout_p=dropout_p, dropout_seed=dropout_seed)
    return segment_forward(q, k, v, segments, fill, mods)


def segment_forward(q: Tensor, k: Tensor, v: Tensor, segments: Tensor, fill: float, mods: ScoreMods) -> Tensor:
    """Exact attention with a region mask.

    q ``[R, H, N, D]`` (R = batch x windows), k/v likewise; ``segments`` int64 ``[nW, N]`` (row r of q uses
    ``segments[r % nW]``); ``mods.bias`` and ``mods.mask`` broadcast to ``[R, H, N, N]`` (or to
    ``[1, H, N, N]``); learned sink logits ``mods.sinks`` ``[H]``. Returns ``[R, H, N, Dv]``.
    """
    rows = q.shape[0]
    windows = segments.shape[0]
    labels = segments.to(q.device).repeat(rows // windows, 1) if rows != windows else segments.to(q.device)
    mixed = (labels != labels[:, :1]).any(dim=1)                      # [R]: windows holding several regions
    if not bool(mixed.any()):
        return exact_forward(q, k, v, mods)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    for rows_of, with_regions in ((~mixed).nonzero().flatten(), False), (mixed.nonzero().flatten(), True):
        if rows_of.numel() == 0:
            continue
        if with_regions and fill == float("-inf") and q.dim() == 4 and mods.dropout_p == 0:
            for r in rows_of.tolist():  # documents: visit only the key blocks of the query's own document
                index = torch.tensor([r])
                out[r:r + 1] = _documents(q[r:r + 1], _rows(k, index, rows), _rows(v, index, rows), labels[r],
                                          _batch_rows(mods, index, rows))
            continue
        row_mods = _batch_rows(mods, rows_of, rows)
        if with_regions:
            regions = region_bias(labels[rows_of], fill, q.dtype if q.is_floating_point() else torch.float32)
            row_mods = replace(row_mods, bias=regions if row_mods.bias is None else row_mods.bias + regions)
        out[rows_of] = exact_forward(q[rows_of], _rows(k, rows_of, rows), _rows(v, rows_of, rows), row_mods)
    return out


def _documents(q: Tensor, k: Tensor, v: Tensor, labels: Tensor, mods: ScoreMods) -> Tensor:
    """One batch row whose tokens belong to several documents (``-inf`` between documents): block-sparse
    over the blocks where some query and key share a document, which is exact and skips the others."""
    def same_document(q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return labels[q_idx] == labels[kv_idx]

    n = q.shape[-2]
    block = 64 if n >= 256 else 16
    layout = layout_from_keep(same_document, n, k.shape[-2], block, block, q.device)
    return block_sparse_attention(q, k, v, layout, mods, same_document)


def _batch_rows(mods: ScoreMods, index: Tensor, rows: int) -> ScoreMods:
    """``mods`` with bias and mask cut to batch rows ``index``."""
    return replace(mods, bias=_rows(mods.bias, index, rows), mask=_rows(mods.mask, index, rows))


def _rows(t: Optional[Tensor], index: Tensor, rows: int) -> Optional[Tensor]:
    """Batch rows ``index`` of a tensor whose dim 0 is the batch (or 1, broadcasting)."""
    if t is None or t.dim() < 4 or t.shape[0] == 1:
        return t
    return t[index] if t.shape[0] == rows else t
