"""Exact attention under a region mask (Swin's shifted windows), skipping the mask where it is all zero.

Swin attends within windows of N tokens; after the cyclic shift some windows hold tokens of up to four image
regions, and the model adds a fill value (timm: -100) to the scores between tokens of different regions. Most
windows hold one region, so their mask is zero everywhere: those rows run without any mask, the mixed ones
with the mask built from the labels. Same numbers as the model (the fill value is kept as it is, not turned
into -inf).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attncc.variants.exact import exact_attention


def region_bias(labels: Tensor, fill: float, dtype: torch.dtype) -> Tensor:
    """``[R, 1, N, N]`` additive mask: 0 between tokens of one region, ``fill`` between regions."""
    same = labels[:, None, :, None] == labels[:, None, None, :]
    return torch.zeros(same.shape, dtype=dtype, device=labels.device).masked_fill(~same, fill)


def segment_attention(
    q: Tensor, k: Tensor, v: Tensor, segments: Tensor, fill: float, bias: Optional[Tensor], mask: Optional[Tensor],
    scale: float, causal: bool, softcap: float, dropout_p: float, dropout_seed: Optional[Tensor],
) -> Tensor:
    """Exact attention with a region mask.

    q ``[R, H, N, D]`` (R = batch x windows), k/v likewise; ``segments`` int64 ``[nW, N]`` (row r of q uses
    ``segments[r % nW]``); ``bias`` and ``mask`` broadcast to ``[R, H, N, N]`` (or to ``[1, H, N, N]``).
    Returns ``[R, H, N, Dv]``.
    """
    rows = q.shape[0]
    windows = segments.shape[0]
    labels = segments.to(q.device).repeat(rows // windows, 1) if rows != windows else segments.to(q.device)
    mixed = (labels != labels[:, :1]).any(dim=1)                      # [R]: windows holding several regions
    if not bool(mixed.any()):
        return exact_attention(q, k, v, bias, mask, scale, causal, softcap, dropout_p, dropout_seed)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    for rows_of, with_regions in ((~mixed).nonzero().flatten(), False), (mixed.nonzero().flatten(), True):
        if rows_of.numel() == 0:
            continue
        sel_bias = _rows(bias, rows_of, rows)
        if with_regions:
            regions = region_bias(labels[rows_of], fill, q.dtype if q.is_floating_point() else torch.float32)
            sel_bias = regions if sel_bias is None else sel_bias + regions
        out[rows_of] = exact_attention(q[rows_of], _rows(k, rows_of, rows), _rows(v, rows_of, rows), sel_bias,
                                       _rows(mask, rows_of, rows), scale, causal, softcap, dropout_p, dropout_seed)
    return out


def _rows(t: Optional[Tensor], index: Tensor, rows: int) -> Optional[Tensor]:
    """Batch rows ``index`` of a tensor whose dim 0 is the batch (or 1, broadcasting)."""
    if t is None or t.dim() < 4 or t.shape[0] == 1:
        return t
    return t[index] if t.shape[0] == rows else t
