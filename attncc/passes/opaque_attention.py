"""Attention the detector recognizes but cannot rewrite: PyTorch's fused kernels, higher-order ops, and
multi-head attention calls canonicalize had to leave whole. Each is reported (a RejectedSite with this
reason), never passed over in silence.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from attncc.passes.lower_torch_nn import UNLOWERED

FUSED_FAST_PATH = "PyTorch's fused transformer fast path"
FLEX_ATTENTION = "FlexAttention call: score_mod/block_mask are not carried yet"


def _targets(*names: str) -> set:
    """The Python function and the aten overload packet of each fused op that exists in this torch."""
    found = set()
    for name in names:
        for owner in (torch, torch.ops.aten):
            fn = getattr(owner, name, None)
            if fn is not None:
                found.add(fn)
                if hasattr(fn, "default"):
                    found.add(fn.default)
    return found


_FUSED = {
    **{t: f"{FUSED_FAST_PATH} (torch._transformer_encoder_layer_fwd)"
       for t in _targets("_transformer_encoder_layer_fwd")},
    **{t: f"{FUSED_FAST_PATH} (torch._native_multi_head_attention)" for t in _targets("_native_multi_head_attention")},
}


def _flex_attention_op():
    try:
        return torch.ops.higher_order.flex_attention
    except (AttributeError, RuntimeError):  # pragma: no cover - torch without FlexAttention
        return None


def opaque_attention_reason(node: fx.Node) -> Optional[str]:
    """Why ``node`` is attention left as it is, or None when it is not attention the passes know of."""
    if UNLOWERED in node.meta:
        return node.meta[UNLOWERED]
    if node.op != "call_function":
        return None
    flex = _flex_attention_op()
    if flex is not None and node.target is flex:
        return FLEX_ATTENTION
    try:
        return _FUSED.get(node.target)
    except TypeError:  # an unhashable target
        return None
