"""Dispatch of one attncc op call to the variant that runs it, on the selected backend.

Backends: ``triton`` (the generated kernels in ``attncc.codegen``; CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``) and ``torch`` (each variant's PyTorch path; any device). ``ATTNCC_BACKEND`` picks:
``auto`` (default: triton for CUDA tensors, torch otherwise), ``triton`` or ``torch``. Calls no kernel covers
(attention dropout, region masks, inputs that need gradients: the kernels are forward-only and backward
recomputes through the torch path) run on the torch path whatever the setting.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from attncc.errors import AttnccError
from attncc.variants.base import ScoreMods
from attncc.variants.exact import ExactSpec, exact_attention
from attncc.variants.segments import segment_attention
from attncc.variants.parse import parse_variant

BACKENDS = ("auto", "triton", "torch")


def selected_backend() -> str:
    """The backend ``ATTNCC_BACKEND`` names (``auto`` when unset)."""
    name = os.environ.get("ATTNCC_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise AttnccError(f"ATTNCC_BACKEND={name!r} is not a backend: choose one of {', '.join(BACKENDS)}")
    return name


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton imports (it ships with CUDA builds of torch; CPU users install it for the interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def backend_for(q: Tensor) -> str:
    """``triton`` or ``torch`` for a call with query tensor ``q`` under the ``ATTNCC_BACKEND`` setting."""
    name = selected_backend()
    if name == "torch":
        return "torch"
    if name == "auto":
        return "triton" if q.is_cuda and triton_available() else "torch"
    if not triton_available():
        raise AttnccError("ATTNCC_BACKEND=triton but Triton is not installed (pip install triton)")
    if not q.is_cuda:
        from attncc.codegen.source import interpreting

        if not interpreting():
            raise AttnccError(
                f"ATTNCC_BACKEND=triton needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels on "
                f"{q.device.type} tensors in Triton's interpreter")
    return "triton"


def run_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], scale: float, causal: bool,
    softcap: float, dropout_p: float, dropout_seed: Optional[Tensor], variant: str, fallback: str, min_len: int,
    segments: Optional[Tensor] = None, segment_fill: float = 0.0, sinks: Optional[Tensor] = None,
) -> Tensor:
    """Run the variant ``variant`` names (``fallback`` when the key length is below ``min_len``).

    q ``[*batch, Nq, Dqk]``, k ``[*batch_kv, Nk, Dqk]``, v ``[*batch_kv, Nk, Dv]``; returns ``[*batch, Nq, Dv]``.
    The exact variant takes any rank; the others run in ``[B, H, N, D]`` (3-D inputs get a head dim of 1).
    ``sinks``: learned sink logits, ``[Hq]`` for 4-D q (one per query head) or ``[1]`` (shared; the only
    form for other ranks).
    """
    spec = parse_variant(fallback if min_len and k.shape[-2] < min_len else variant)
    backend = backend_for(q)
    sinks = _sink_vector(sinks, q)
    if segments is not None and not isinstance(spec, ExactSpec):
        if segment_fill == float("-inf") and _one_document_per_row(segments):
            segments = None  # one document per row: the document mask hides nothing
        else:
            spec = parse_variant(fallback)  # several documents in a row: the model's exact semantics
            if not isinstance(spec, ExactSpec):  # the model's own band: add the documents as a bool mask
                if segment_fill != float("-inf"):
                    raise AttnccError(f"{spec.name}: region masks with a finite fill run exact only")
                same = segments[..., :, None] == segments[..., None, :]           # [B, N, N], rare: packed rows
                same = same[:, None] if q.dim() == 4 else same
                mask = same if mask is None else mask & same
                segments = None
    if segments is not None:
        return segment_attention(q, k, v, segments, segment_fill, bias, mask, scale, causal, softcap, dropout_p,
                                 dropout_seed, sinks)
    if isinstance(spec, ExactSpec) and (backend == "torch" or dropout_p > 0 or _needs_grad(q, k, v, bias, sinks)):
        return exact_attention(q, k, v, bias, mask, scale, causal, softcap, dropout_p, dropout_seed, sinks)
    if dropout_p > 0:
        raise AttnccError(f"{spec.name}: attention dropout is not supported (run the model in eval mode)")
    if backend == "torch" and mask is not None and mask.dtype == torch.bool and mask.dim() >= 2 \
            and mask.shape[-2] == 1 and bool(mask.all()):
        # a padding mask with nothing padded (the usual unpadded batch): skip its per-block work on the torch
        # path (the kernels read it as one vector per key block, cheaper than a device sync to check it)
        mask = None
    rank = q.dim()
    if isinstance(spec, ExactSpec) and (rank != 4 or k.dim() != 4):
        q, k, v, bias, mask, restore = _as_heads(q, k, v, bias, mask)
        if restore is None:
            return exact_attention(q, k, v, bias, mask, scale, causal, softcap, 0.0, None, sinks)
        rank = 4
    else:
        restore = None
        if rank == 3:
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
            bias = bias.unsqueeze(-3) if bias is not None and bias.dim() >= 3 else bias
            mask = mask.unsqueeze(-3) if mask is not None and mask.dim() >= 3 else mask
        elif rank != 4:
            raise AttnccError(f"{spec.name}: expects [B, H, N, D] or [B, N, D] inputs, got rank {rank}")
    mods = ScoreMods(scale=scale, causal=causal, softcap=softcap, bias=bias, mask=mask,
                     sinks=None if sinks is None else sinks.expand(q.shape[1]))
    out = None
    if backend == "triton" and not _needs_grad(q, k, v, bias, sinks):
        from attncc.runtime.triton_backend import triton_attention

        out = triton_attention(spec, q, k, v, mods)
    if out is None:
        out = spec.forward(q, k, v, mods)
    if restore is not None:
        return restore(out)
    return out.squeeze(1) if rank == 3 else out


def _sink_vector(sinks: Optional[Tensor], q: Tensor) -> Optional[Tensor]:
    """``sinks`` checked and flattened: ``[Hq]`` (4-D q) or ``[1]``; an error naming the shapes otherwise."""
    if sinks is None:
        return None
    heads = q.shape[1] if q.dim() == 4 else 1
    if not sinks.is_floating_point() or sinks.numel() not in (1, heads):
        raise AttnccError(f"attention: sinks must be a float tensor of {heads} value(s) (one learned sink logit per "
                          f"query head of q {tuple(q.shape)}), got {sinks.dtype} {tuple(sinks.shape)}")
    if sinks.device != q.device:
        raise AttnccError(f"attention: sinks are on {sinks.device}, q on {q.device}")
    return sinks.reshape(-1)


def _one_document_per_row(labels: Tensor) -> bool:
    """True when every row of document ids ``[R, N]`` holds a single document (one read of the result)."""
    return bool((labels == labels[..., :1]).all())


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    """True when autograd will differentiate this call (the kernels are forward-only)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _as_heads(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor]):
    """Exact attention of any rank as ``[B, H, N, D]``: leading dims of q flattened into B with one head when k
    has the same leading dims; returns the reshaped tensors and how to shape the output back (None: not
    expressible, run the torch path)."""
    lead = q.shape[:-2]
    if k.shape[:-2] != lead or v.shape[:-2] != lead:
        return q, k, v, bias, mask, None
    n_q, n_k = q.shape[-2], k.shape[-2]

    def flat(t: Optional[Tensor], rows: int) -> Optional[Tensor]:
        if t is None:
            return None
        t = t.expand(*lead, rows, n_k) if t.dim() < len(lead) + 2 or t.shape[:-2] != lead else t
        return t.reshape(-1, 1, t.shape[-2], n_k)

    def shape(t: Tensor) -> Tensor:
        return t.reshape(-1, 1, *t.shape[-2:])

    try:
        bias4 = flat(bias, bias.shape[-2] if bias is not None and bias.dim() >= 2 else n_q)
        mask4 = flat(mask, mask.shape[-2] if mask is not None and mask.dim() >= 2 else n_q)
    except RuntimeError:
        return q, k, v, bias, mask, None
    return shape(q), shape(k), shape(v), bias4, mask4, lambda out: out.reshape(*lead, n_q, out.shape[-1])
