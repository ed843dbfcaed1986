"""The Triton backend: the generated kernel that runs a variant spec, looked up by the spec's name in the kernel
registry (``attncc.codegen.registry``: each kernel module declares its variant with ``@kernel_for``).

Every family lives in ``attncc.codegen`` (one module per family) and takes SDPA-layout tensors
``q [B, Hq, Nq, Dqk]``, ``k [B, Hkv, Nk, Dqk]``, ``v [B, Hkv, Nk, Dv]`` plus the call's :class:`ScoreMods`.
A call a kernel does not cover returns None here and runs on the variant's PyTorch path instead (the
reason is logged once per reason at debug level).
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import torch
from torch import Tensor

from attncc.variants.base import ScoreMods, VariantSpec

log = logging.getLogger("attncc.runtime")
_SAID: set[str] = set()

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_attention(spec: VariantSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Optional[Tensor]:
    """Run ``spec`` through its Triton kernels; None when no kernel covers this call."""
    found = _kernel_of(spec)
    reason = _uncovered(spec, found, q, k, v, mods)
    if reason:
        if reason not in _SAID:
            _SAID.add(reason)
            log.debug("attncc: %s runs on the torch path: %s", spec, reason)
        return None
    try:
        return found.run(spec, q, k, v, mods)
    except Exception as error:
        if not _out_of_resources(error):
            raise
        # a shape no launch config fits on this GPU (huge head dims): the PyTorch path still runs it
        reason = f"no kernel config fits this GPU ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
        if reason not in _SAID:
            _SAID.add(reason)
            warnings.warn(f"attncc: {spec} runs on the PyTorch path: {reason}")
        return None


def backward_uncovered(spec: VariantSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> str:
    """Why the backward kernels do not run this call ('' when they do), from shapes, dtypes and options only
    (the autograd glue decides with it while ``torch.compile`` traces): the forward kernel's checks, then the
    backward's own (``attncc.codegen.backward_visits.backward_declines``)."""
    reason = _uncovered(spec, _kernel_of(spec), q, k, v, mods)
    if not reason:
        from attncc.codegen.backward_visits import backward_declines

        reason = backward_declines(spec, mods)
    if reason:
        _say_once(f"attncc: the backward of {spec} recomputes on the torch path: {reason}", log.debug)
    return reason


def triton_attention_backward(spec: VariantSpec, q: Tensor, k: Tensor, v: Tensor, out: Tensor, grad_out: Tensor,
                              mods: ScoreMods, bias_grad: bool = False):
    """The gradients of ``spec``'s attention by the backward kernels (:mod:`attncc.codegen.softmax_backward`):
    a ``BackwardGrads`` (dq, dk, dv, dscores when ``bias_grad``, dsinks), or None when no backward kernel
    covers this call or no launch config fits the GPU (the caller then recomputes through the torch path).
    Shapes as in :func:`triton_attention`; ``out`` and ``grad_out`` ``[B, Hq, Nq, Dv]``."""
    if backward_uncovered(spec, q, k, v, mods):
        return None
    from attncc.codegen.backward_visits import backward_visit
    from attncc.codegen.softmax_backward import softmax_backward

    try:
        return softmax_backward(q, k, v, out, grad_out, mods, backward_visit(spec, q, k, v, mods),
                                bias_grad=bias_grad)
    except Exception as error:
        if not _out_of_resources(error):
            raise
        _say_once(f"attncc: the backward of {spec} recomputes on the torch path: no kernel config fits this GPU "
                  f"({type(error).__name__}: {str(error).splitlines()[0][:120]})", warnings.warn)
        return None


def _say_once(message: str, say) -> None:
    if message not in _SAID:
        _SAID.add(message)
        say(message)


def _out_of_resources(error: BaseException) -> bool:
    from attncc.codegen.autotune import NoRunnableConfig

    if isinstance(error, NoRunnableConfig):
        return True
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:
        return False
    return isinstance(error, OutOfResources)


def _uncovered(spec: VariantSpec, found, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> str:
    """Why no kernel runs this call ('' when one does): the checks every kernel shares, then the ``covers`` of
    ``found``, the variant's registered kernel (``attncc.codegen.registry``; None when it has none)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"rank {q.dim()} inputs"
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if q.shape[1] % k.shape[1] != 0 or k.shape[0] != q.shape[0] or v.shape[:2] != k.shape[:2]:
        return f"head layout q {tuple(q.shape)}, k {tuple(k.shape)}"
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        return "an empty sequence"
    if found is None:
        return f"no Triton kernel is registered for {spec.name}"
    return found.covers(spec, q, k, v, mods)


def _kernel_of(spec: VariantSpec):
    """The registered kernel of ``spec``'s family, or None. Imported here, not at module level: the kernel
    modules are found (imported) on first use, only when the Triton backend runs."""
    from attncc.codegen.registry import kernel

    return kernel(spec.name)
