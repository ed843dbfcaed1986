"""Attention that ran outside the captured graphs: found by counting, reported by module.

Dynamo runs code it could not put in a graph (after a graph break, in a frame it skipped) eagerly, so attncc
never sees that code's attention. To say so instead of staying silent, attncc counts attention calls two ways for
the same inputs: in an eager run of the original model, per module (a dispatch mode sees every softmax and SDPA
kernel, global module hooks say which module is running), and in the captured graphs, per module, times the
number of times each graph ran. A module whose eager count exceeds its count in the graphs ran attention
outside them.

Counting units agree on both sides: one ``softmax``/``scaled_dot_product_attention`` node in a graph is one
kernel call eagerly (``_softmax``, or one of SDPA's backends; SDPA's math backend runs ``_safe_softmax``).
"""

from __future__ import annotations

import copy
from collections import Counter
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from attncc.module_names import ModuleNames
from attncc.passes import graph_ops as g
from attncc.site import RejectedSite

_aten = torch.ops.aten
ATTENTION_KERNELS = {
    _aten._softmax.default, _aten._safe_softmax.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default, _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default, _aten._scaled_dot_product_cudnn_attention.default,
}
"""The aten kernels one softmax or one SDPA call runs exactly one of (where they exist in this torch)."""
if hasattr(_aten, "_scaled_dot_product_fused_attention_overrideable"):
    ATTENTION_KERNELS.add(_aten._scaled_dot_product_fused_attention_overrideable.default)


def graph_attention_calls(gm: fx.GraphModule) -> Counter:
    """Softmax and SDPA nodes of a captured (not yet rewritten) graph, per module name."""
    return Counter(g.module_path(n) for n in gm.graph.nodes if g.is_softmax(n) or g.is_sdpa(n))


class _CountAttention(TorchDispatchMode):
    supports_higher_order_operators = True  # FlexAttention & co. run as they would (and count as no softmax)

    def __init__(self, current_module: list[str]):
        super().__init__()
        self.current_module = current_module
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in ATTENTION_KERNELS:
            self.counts[self.current_module[-1]] += 1
        return func(*args, **(kwargs or {}))


def eager_attention_calls(model: nn.Module, names: ModuleNames, args: tuple, kwargs: dict) -> Counter:
    """Softmax and SDPA kernel calls of one eager run of ``model``, per module name (inputs deep-copied where
    they are not tensors, so a cache object the model appends to is not touched)."""
    stack = [""]

    def enter(module, _inputs):
        name = names.name_of(module)
        stack.append(stack[-1] if name is None else name)

    def leave(module, _inputs, _output):
        if len(stack) > 1:
            stack.pop()

    args = tuple(a if isinstance(a, torch.Tensor) else copy.deepcopy(a) for a in args)
    kwargs = {k: v if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in kwargs.items()}
    pre = nn.modules.module.register_module_forward_pre_hook(enter)
    post = nn.modules.module.register_module_forward_hook(leave, always_call=True)
    mode = _CountAttention(stack)
    try:
        with torch.no_grad(), mode:
            model(*args, **kwargs)
    finally:
        pre.remove()
        post.remove()
    return mode.counts


def uncaptured_sites(eager: Counter, in_graphs: Counter, reason: str) -> list[RejectedSite]:
    """A RejectedSite for each module that ran more attention calls eagerly than its captured graphs hold."""
    missing = []
    for module, count in sorted(eager.items()):
        extra = count - in_graphs.get(module, 0)
        if extra > 0:
            missing.append(RejectedSite(module, f"{extra} attention call(s) ran outside the captured graphs ({reason}); "
                                                f"they run unchanged"))
    return missing


def graph_break_reasons(since: dict[str, int]) -> str:
    """The graph-break reasons recorded since the ``counters['graph_break']`` snapshot ``since``, shortened."""
    from torch._dynamo.utils import counters

    new = [reason for reason, n in counters["graph_break"].items() if n > since.get(reason, 0)]
    text = "; ".join(r.strip().splitlines()[0][:120] for r in new[:3])
    return f"Dynamo graph break: {text}" if text else "Dynamo ran this code eagerly"


def snapshot_graph_breaks() -> dict[str, int]:
    """Dynamo's graph-break counts by reason so far in this process."""
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])

