"""The Triton backend: which generated kernel family runs each variant spec.

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
    reason = _uncovered(spec, q, k, v, mods)
    if reason:
        if reason not in _SAID:
            _SAID.add(reason)
            log.debug("attncc: %s runs on the torch path: %s", spec, reason)
        return None
    try:
        return _run_kernels(spec, q, k, v, mods)
    except Exception as error:
        if not _out_of_resources(error):
            raise
        # a shape no launch config fits on this GPU (huge head dims): the PyTorch path still runs it
        reason = f"no kernel config fits this GPU ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
        if reason not in _SAID:
            _SAID.add(reason)
            warnings.warn(f"attncc: {spec} runs on the PyTorch path: {reason}")
        return None


def _out_of_resources(error: BaseException) -> bool:
    from attncc.codegen.autotune import NoRunnableConfig

    if isinstance(error, NoRunnableConfig):
        return True
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:
        return False
    return isinstance(error, OutOfResources)


def _run_kernels(spec: VariantSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Optional[Tensor]:
    name = spec.name
    if name == "exact":
        from attncc.codegen.softmax import DenseVisit, softmax_attention

        return softmax_attention(q, k, v, mods, DenseVisit())
    if name == "local":
        from attncc.codegen.softmax import BandVisit, softmax_attention

        left, right = spec.bounds(mods.causal)
        return softmax_attention(q, k, v, mods, BandVisit(left, right, spec.sinks, spec.globals))
    if name == "block_sparse":
        from attncc.codegen.block_sparse import block_sparse_attention

        return block_sparse_attention(spec, q, k, v, mods)
    if name == "topk":
        from attncc.codegen.topk import topk_attention

        return topk_attention(spec, q, k, v, mods)
    if name == "neighborhood":
        from attncc.codegen.neighborhood import neighborhood_attention

        return neighborhood_attention(spec, q, k, v, mods)
    if name == "linear":
        from attncc.codegen.linear import linear_attention

        return linear_attention(spec, q, k, v, mods)
    return None


def _uncovered(spec: VariantSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> str:
    """Why no kernel runs this call ('' when one does)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"rank {q.dim()} inputs"
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if q.shape[1] % k.shape[1] != 0 or k.shape[0] != q.shape[0] or v.shape[:2] != k.shape[:2]:
        return f"head layout q {tuple(q.shape)}, k {tuple(k.shape)}"
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        return "an empty sequence"
    if spec.name in ("block_sparse", "topk") and (spec.block < 16 or spec.block & (spec.block - 1)):
        return f"block {spec.block} is not a power of two >= 16 (kernel tiles are)"
    return ""
