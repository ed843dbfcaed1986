"""The score modifications of ``ScoreMods`` in torch, written once.

Every torch reference and torch path that builds explicit scores goes through these: ``apply_mods`` for the
whole statement, or its two halves where a path hides pairs its own way (``blocks.dense_rows`` fills a finite
``MASKED``; ``exact.combined_sdpa_mask`` hands the hidden pairs to SDPA as its ``attn_mask``):

* ``modified_scores``: ``s * scale``, then ``softcap * tanh(s / softcap)``, then ``s + bias`` (float32);
* ``visible_pairs``: the bool mask, and'ed with causality (key position <= query position).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attncc.variants.base import ScoreMods


def modified_scores(s: Tensor, mods: ScoreMods) -> Tensor:
    """Plain float scores ``q @ k^T`` ``[..., Nq, Nk]`` scaled, softcapped and biased, in that order.

    ``mods.bias`` must broadcast to ``s`` (callers that score a subset of rows pass the bias of those rows).
    """
    s = s * mods.scale
    if mods.softcap > 0:
        s = mods.softcap * torch.tanh(s / mods.softcap)
    if mods.bias is not None:
        s = s + mods.bias.float()
    return s


def visible_pairs(mods: ScoreMods, q_pos: Optional[Tensor], k_pos: Optional[Tensor]) -> Optional[Tensor]:
    """Bool ``keep`` (True = attend) of the pairs ``mods.mask`` and causality leave; None when neither applies.

    ``q_pos`` ``[Nq]`` and ``k_pos`` ``[Nk]`` are the positions of the scored query rows and key columns, read
    only when ``mods.causal`` (key j is visible from query i when ``j <= i``, top-left aligned). The result broadcasts against the mask
    and ``[Nq, Nk]``.
    """
    keep = mods.mask
    if mods.causal:
        causal = k_pos[None, :] <= q_pos[:, None]
        keep = causal if keep is None else keep & causal
    return keep


def apply_mods(s: Tensor, mods: ScoreMods, q_pos: Optional[Tensor] = None, k_pos: Optional[Tensor] = None) -> Tensor:
    """``ScoreMods``' semantics on float scores ``s = q @ k^T`` ``[..., Nq, Nk]``: scale, softcap, bias, then
    ``-inf`` where the mask or causality hides a pair. Returns float scores of ``s``'s shape, ready for softmax.

    ``q_pos`` ``[Nq]`` / ``k_pos`` ``[Nk]``: positions of the rows and columns of ``s`` (default ``0 .. N-1``;
    a block of query rows passes its own). ``mods.bias`` and ``mods.mask`` must broadcast to ``s``.
    """
    s = modified_scores(s, mods)
    if mods.causal:  # only causality reads positions
        q_pos = torch.arange(s.shape[-2], device=s.device) if q_pos is None else q_pos
        k_pos = torch.arange(s.shape[-1], device=s.device) if k_pos is None else k_pos
    keep = visible_pairs(mods, q_pos, k_pos)
    return s if keep is None else s.masked_fill(~keep, float("-inf"))


__all__ = ["apply_mods", "modified_scores", "visible_pairs"]
