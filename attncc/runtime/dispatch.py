"""Dispatch of one attncc op call to the variant that runs it, on the selected backend.

Backends: ``triton`` (the generated kernels in ``attncc.codegen``; CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``) and ``torch`` (each variant's PyTorch path; any device). ``ATTNCC_BACKEND`` picks:
``auto`` (default: triton for CUDA tensors, torch otherwise), ``triton`` or ``torch``. Calls no kernel covers
(attention dropout, region masks, and the exact variant's calls that need gradients) run on the torch path
whatever the setting. Backward is the op's autograd (``attncc.runtime.ops``): the softmax family's backward
kernels on the triton backend, else a recompute through the torch path. Per-head variants (``heads(...)``)
run each group of heads through that group's kernel (or torch path) on its head slices, in the same call.
"""

from __future__ import annotations

import functools
import os
from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from attncc.errors import AttnccError
from attncc.runtime.call import AttentionCall
from attncc.variants.base import ScoreMods, VariantSpec
from attncc.variants.heads import HeadsSpec
from attncc.variants.parse import parse_variant
from attncc.variants.segments import segment_forward

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


def run_attention(call: AttentionCall) -> Tensor:
    """Run one op call: the variant ``call.variant`` names (``call.fallback`` when the key length is below
    ``call.min_len``), on the backend ``ATTNCC_BACKEND`` selects.

    q ``[*batch, Nq, Dqk]``, k ``[*batch_kv, Nk, Dqk]``, v ``[*batch_kv, Nk, Dv]``; returns ``[*batch, Nq, Dv]``.
    The exact variant takes any rank; the others run in ``[B, H, N, D]`` (3-D inputs get a head dim of 1).
    ``sinks``: learned sink logits, ``[Hq]`` for 4-D q (one per query head) or ``[1]`` (shared; the only
    form for other ranks).
    """
    q, k, v = call.q, call.k, call.v
    spec = resolve_spec(call)
    backend = backend_for(q)
    mods = replace(call.score_mods(), sinks=_sink_vector(call.sinks, q))
    spec, mods, segments = route_segments(spec, call, mods)
    if segments is not None:
        return segment_forward(q, k, v, segments, call.segment_fill, mods)
    if spec.exact and (backend == "torch" or mods.dropout_p > 0 or _needs_grad(q, k, v, mods)):
        return spec.forward(q, k, v, mods)  # any rank, dropout, autograd: the torch path
    if mods.dropout_p > 0:
        raise AttnccError(f"{spec.name}: attention dropout is not supported (run the model in eval mode)")
    return run_backend(spec, q, k, v, mods, backend)


def resolve_spec(call: AttentionCall) -> VariantSpec:
    """The variant this call runs: ``fallback`` while the key length is below ``min_len``, else ``variant``.

    A causal call with fewer queries than keys also runs ``fallback``: SDPA's ``is_causal`` is top-left aligned
    there (transformers passes it only while prefilling a static cache, whose extra keys are empty slots), while
    the approximate variants place such queries bottom-right (the last tokens, as in decode)."""
    short = call.min_len and call.k.shape[-2] < call.min_len
    spec = parse_variant(call.fallback if short else call.variant)
    if call.causal and call.q.shape[-2] < call.k.shape[-2] and spec.aligns_last_queries():
        return parse_variant(call.fallback)
    return spec


def route_segments(spec: VariantSpec, call: AttentionCall,
                   mods: ScoreMods) -> tuple[VariantSpec, ScoreMods, Optional[Tensor]]:
    """Where the call's region/document labels go: ``(spec, mods, segments)`` with ``segments`` None once they
    are accounted for. Exact runs them itself (the labels come back); another variant drops documents that
    hide nothing, else the call runs the model's own ``fallback``: exactly with the labels, or (a band) with
    the documents as a bool mask."""
    segments, fill = call.segments, call.segment_fill
    if segments is None or spec.exact:
        return spec, mods, segments
    if fill == float("-inf") and _one_document_per_row(segments):
        return spec, mods, None  # one document per row: the document mask hides nothing
    spec = parse_variant(call.fallback)  # several documents in a row: the model's exact semantics
    if spec.exact:
        return spec, mods, segments
    if fill != float("-inf"):
        raise AttnccError(f"{spec.name}: region masks with a finite fill run exact only")
    same = segments[..., :, None] == segments[..., None, :]           # [B, N, N], rare: packed rows
    same = same[:, None] if call.q.dim() == 4 else same
    return spec, replace(mods, mask=same if mods.mask is None else mods.mask & same), None


def run_backend(spec: VariantSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods, backend: str) -> Tensor:
    """``spec`` on ``backend`` (``triton`` or ``torch``) for a call without dropout: inputs brought to
    ``[B, H, N, D]``, the kernels where they cover the call and it needs no gradient, else the torch path."""
    if backend == "torch" and _all_visible_padding(mods.mask):
        # a padding mask with nothing padded (the usual unpadded batch): skip its per-block work on the torch
        # path (the kernels read it as one vector per key block, cheaper than a device sync to check it)
        mods = replace(mods, mask=None)
    heads = as_heads(spec, q, k, v, mods)
    if heads is None:  # exact attention in a layout [B, H, N, D] cannot express: the torch path takes any rank
        return spec.forward(q, k, v, mods)
    q, k, v, mods, restore = heads
    mods = mods if mods.sinks is None else replace(mods, sinks=mods.sinks.expand(q.shape[1]))
    if backend == "triton" and not _needs_grad(q, k, v, mods):
        if isinstance(spec, HeadsSpec):  # per-head variants: each group's kernel on its heads, in this call
            return restore(spec.run_groups(q, k, v, mods, _on_triton))
        return restore(_on_triton(spec, q, k, v, mods))
    return restore(spec.forward(q, k, v, mods))


def _on_triton(spec: VariantSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
    """``spec``'s Triton kernel on ``[B, H, N, D]`` inputs, or its torch path where no kernel covers the call."""
    from attncc.runtime.triton_backend import triton_attention

    out = triton_attention(spec, q, k, v, mods)
    return spec.forward(q, k, v, mods) if out is None else out


def as_heads(spec: VariantSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods):
    """The call in ``[B, H, N, D]``: ``(q, k, v, mods, restore)`` with ``restore(out)`` giving the output its
    original shape; None for exact attention no such layout expresses. Exact attention of other ranks folds
    its leading dims into B; 3-D inputs of other variants get a head dim of 1; other ranks are an error."""
    if spec.exact and (q.dim() != 4 or k.dim() != 4):
        return _exact_as_heads(q, k, v, mods)
    if q.dim() == 4:
        return q, k, v, mods, lambda out: out
    if q.dim() != 3:
        raise AttnccError(f"{spec.name}: expects [B, H, N, D] or [B, N, D] inputs, got rank {q.dim()}")

    def one_head(t: Optional[Tensor]) -> Optional[Tensor]:  # bias / mask [B, N, N] -> [B, 1, N, N]
        return t.unsqueeze(-3) if t is not None and t.dim() >= 3 else t

    mods = replace(mods, bias=one_head(mods.bias), mask=one_head(mods.mask))
    return q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), mods, lambda out: out.squeeze(1)


def _all_visible_padding(mask: Optional[Tensor]) -> bool:
    """True for a bool key-padding mask (one row, ``[..., 1, Nk]``) that hides nothing (one device sync)."""
    return mask is not None and mask.dtype == torch.bool and mask.dim() >= 2 and mask.shape[-2] == 1 \
        and bool(mask.all())


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


def _needs_grad(q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> bool:
    """True when autograd will differentiate this call (the kernels are forward-only)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mods.bias, mods.sinks))


def _exact_as_heads(q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods):
    """Exact attention of any rank as ``[B, H, N, D]``: leading dims of q flattened into B with one head when k
    has the same leading dims; returns ``(q, k, v, mods, restore)`` reshaped, with how to shape the output back
    (None: not expressible, run the torch path)."""
    lead = q.shape[:-2]
    if k.shape[:-2] != lead or v.shape[:-2] != lead:
        return None
    n_q, n_k = q.shape[-2], k.shape[-2]

    def flat(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None:
            return None
        rows = t.shape[-2] if t.dim() >= 2 else n_q
        t = t.expand(*lead, rows, n_k) if t.dim() < len(lead) + 2 or t.shape[:-2] != lead else t
        return t.reshape(-1, 1, t.shape[-2], n_k)

    def shape(t: Tensor) -> Tensor:
        return t.reshape(-1, 1, *t.shape[-2:])

    try:
        mods = replace(mods, bias=flat(mods.bias), mask=flat(mods.mask))
    except RuntimeError:
        return None
    return shape(q), shape(k), shape(v), mods, lambda out: out.reshape(*lead, n_q, out.shape[-1])
