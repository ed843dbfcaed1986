"""Capturing PyTorch's own transformer modules (``nn.Transformer``, ``nn.TransformerEncoder[Layer]``,
``nn.TransformerDecoder[Layer]``, ``nn.MultiheadAttention``) so that their attention reaches the passes.

Two things hide it by default:

- PyTorch's fast path. In eval mode (and without autograd) ``TransformerEncoderLayer`` calls the fused
  ``torch._transformer_encoder_layer_fwd`` and ``MultiheadAttention`` ``torch._native_multi_head_attention``:
  opaque ops with the attention inside. ``fast_path_disabled()`` turns it off (the documented switch,
  ``torch.backends.mha.set_fastpath_enabled``) while attncc captures and runs a Dynamo-captured model, so the
  graph holds the decomposed path (``F.multi_head_attention_forward``, which the canonicalize pass lowers to
  SDPA). Both paths compute the same function; the fused one only runs it as one kernel.
- ``fx.symbolic_trace`` keeps every ``torch.nn`` module as one ``call_module`` node. ``TorchNNTracer`` still
  keeps ``MultiheadAttention`` whole (canonicalize lowers it, with its parameters read through ``get_attr``),
  but traces into the transformer containers. Their ``forward`` decides the fast path from tensor properties;
  with the fast path off those checks are skipped, and the few helpers that still look at a traced tensor
  (mask dtype conversion, causal-mask detection) are recorded as calls or answered as explained below.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.modules.transformer as transformer_module

TRANSFORMER_CONTAINERS = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder, nn.TransformerEncoderLayer,
                          nn.TransformerDecoderLayer)


@contextlib.contextmanager
def fast_path_disabled() -> Iterator[None]:
    """PyTorch's fused transformer/MHA fast path off inside the block (restored after, also on errors)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "get_fastpath_enabled"):  # older torch: no switch, nothing to do
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


class TorchNNTracer(fx.Tracer):
    """``fx.Tracer`` that traces through the ``nn.Transformer*`` containers (not ``nn.MultiheadAttention``).

    Use inside ``capture_context()`` (``symbolic_trace`` below does).
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, TRANSFORMER_CONTAINERS):
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def to_bool(self, obj: fx.Proxy) -> bool:
        # nn.Transformer.forward validates its inputs (batch sizes of src and tgt equal, feature size d_model)
        # and raises if not; a traced graph keeps only the valid path, where each of those conditions is False.
        # Only these checks are answered: any other control flow on a traced value still fails the trace.
        frame = sys._getframe(1)
        for _ in range(3):
            frame = frame.f_back
            if frame is None:
                break
            if frame.f_code is nn.Transformer.forward.__code__:
                return False
        return super().to_bool(obj)


def symbolic_trace(model: nn.Module, concrete_args: Optional[dict] = None) -> fx.GraphModule:
    """``fx.symbolic_trace`` with ``TorchNNTracer`` inside ``capture_context()``."""
    tracer = TorchNNTracer()
    with capture_context():
        graph = tracer.trace(model, concrete_args=concrete_args)
    name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
    return fx.GraphModule(tracer.root, graph, name)


# ------------------------------------------------------------------------- helpers seen by the capture


def _proxy_in(*values: Any) -> Optional[fx.Proxy]:
    return next((v for v in values if isinstance(v, fx.Proxy)), None)


def _canonical_mask(mask, mask_name, other_type, other_name, target_type, check_other=True):
    """``F._canonical_mask`` (a bool mask as an additive float mask), recorded as one call for a traced mask.

    Under Dynamo the mismatched-dtype deprecation warning is not raised: ``warnings.warn`` is a graph break, and
    the frames after it (PyTorch's own modules) then run eagerly, unseen by attncc. The mask is the same.
    """
    if _proxy_in(mask) is not None:
        return mask.tracer.create_proxy(
            "call_function", _ORIGINAL["canonical_mask"], (mask,),
            {"mask_name": mask_name, "other_type": other_type, "other_name": other_name, "target_type": target_type,
             "check_other": check_other})
    if torch.compiler.is_compiling():
        check_other = False
    return _ORIGINAL["canonical_mask"](mask, mask_name, other_type, other_name, target_type, check_other)


def _none_or_dtype(value):
    """``F._none_or_dtype`` (a mask's dtype, for that warning) recorded as a call for a traced mask."""
    proxy = _proxy_in(value)
    if proxy is None:
        return _ORIGINAL["none_or_dtype"](value)
    return proxy.tracer.create_proxy("call_function", _ORIGINAL["none_or_dtype"], (value,), {})


def _get_seq_len(src, batch_first):
    # its only reader is _detect_is_causal_mask, which (below) does not need it for a traced mask
    if _proxy_in(src) is not None:
        return None
    return _ORIGINAL["get_seq_len"](src, batch_first)


def _detect_is_causal_mask(mask, is_causal=None, size=None):
    # With a mask and no hint, PyTorch compares the mask's values with a causal mask and, if equal, passes
    # is_causal=True down to the attention, which then skips the mask. That comparison cannot be captured (fx:
    # control flow on a traced value; Dynamo: a graph break, after which PyTorch's modules run eagerly, unseen).
    # Answering False applies the mask as given instead: the same result, since the hint is only taken when the
    # mask is exactly the causal one.
    if mask is not None and (_proxy_in(mask) is not None or torch.compiler.is_compiling()):
        return is_causal is True
    return _ORIGINAL["detect_is_causal_mask"](mask, is_causal, size)


_ORIGINAL = {
    "canonical_mask": F._canonical_mask,
    "none_or_dtype": F._none_or_dtype,
    "get_seq_len": transformer_module._get_seq_len,
    "detect_is_causal_mask": transformer_module._detect_is_causal_mask,
}
_PATCHES = (
    (F, "_canonical_mask", _canonical_mask),
    (F, "_none_or_dtype", _none_or_dtype),
    (transformer_module, "_get_seq_len", _get_seq_len),
    (transformer_module, "_detect_is_causal_mask", _detect_is_causal_mask),
)


@contextlib.contextmanager
def capture_context() -> Iterator[None]:
    """What attncc captures PyTorch's transformer modules under (fx and Dynamo alike, and every call of a
    Dynamo-captured model, whose guards then keep the graphs captured so): the fast path off, and the helpers
    above in place of PyTorch's."""
    with fast_path_disabled(), _transformer_helpers_patched():
        yield


@contextlib.contextmanager
def _transformer_helpers_patched() -> Iterator[None]:
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in _PATCHES]
    try:
        for owner, name, replacement in _PATCHES:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
