"""Dispatch of one attncc op call to the variant that runs it, on the selected backend.

Today every call runs the variant's PyTorch path (CPU or any device); the Triton kernels come with codegen/.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from attncc.errors import AttnccError
from attncc.variants.base import ScoreMods
from attncc.variants.exact import ExactSpec, exact_attention
from attncc.variants.segments import segment_attention
from attncc.variants.parse import parse_variant

BACKENDS = ("torch",)


def selected_backend() -> str:
    """The backend ``ATTNCC_BACKEND`` forces, or 'torch' (the only one built so far)."""
    name = os.environ.get("ATTNCC_BACKEND", "torch").strip().lower() or "torch"
    if name not in BACKENDS:
        raise AttnccError(f"ATTNCC_BACKEND={name!r} is not available: choose one of {', '.join(BACKENDS)}")
    return name


def run_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], scale: float, causal: bool,
    softcap: float, dropout_p: float, dropout_seed: Optional[Tensor], variant: str, fallback: str, min_len: int,
    segments: Optional[Tensor] = None, segment_fill: float = 0.0,
) -> Tensor:
    """Run the variant ``variant`` names (``fallback`` when the key length is below ``min_len``).

    q ``[*batch, Nq, Dqk]``, k ``[*batch_kv, Nk, Dqk]``, v ``[*batch_kv, Nk, Dv]``; returns ``[*batch, Nq, Dv]``.
    The exact variant takes any rank; the others run in ``[B, H, N, D]`` (3-D inputs get a head dim of 1).
    """
    selected_backend()
    spec = parse_variant(fallback if min_len and k.shape[-2] < min_len else variant)
    if segments is not None:
        if not isinstance(spec, ExactSpec):
            raise AttnccError(f"{spec.name}: region masks (segments) run exact only")
        return segment_attention(q, k, v, segments, segment_fill, bias, mask, scale, causal, softcap, dropout_p,
                                 dropout_seed)
    if isinstance(spec, ExactSpec):
        return exact_attention(q, k, v, bias, mask, scale, causal, softcap, dropout_p, dropout_seed)
    if dropout_p > 0:
        raise AttnccError(f"{spec.name}: attention dropout is not supported (run the model in eval mode)")
    if mask is not None and mask.dtype == torch.bool and mask.dim() >= 2 and mask.shape[-2] == 1 and bool(mask.all()):
        mask = None  # a padding mask with nothing padded (the usual unpadded batch): skip its per-block work
    rank = q.dim()
    if rank == 3:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        bias = bias.unsqueeze(-3) if bias is not None and bias.dim() >= 3 else bias
        mask = mask.unsqueeze(-3) if mask is not None and mask.dim() >= 3 else mask
    elif rank != 4:
        raise AttnccError(f"{spec.name}: expects [B, H, N, D] or [B, N, D] inputs, got rank {rank}")
    out = spec.forward(q, k, v, ScoreMods(scale=scale, causal=causal, softcap=softcap, bias=bias, mask=mask))
    return out.squeeze(1) if rank == 3 else out
