"""Frontend: capture a model as FX graphs.

``fx.symbolic_trace`` is tried first: one graph for the whole forward, valid for any input shape. Models it
cannot trace (every transformers 5.x model, anything with data-dependent Python control flow) are captured by
Dynamo instead: ``torch.compile`` with an attncc backend that receives each FX graph (one per graph break),
runs the pass pipeline on it and hands the result on. Dynamo's guards recapture when inputs need a new graph.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from attncc.torch_nn_capture import capture_context, symbolic_trace

Inputs = tuple | dict


@dataclass
class CallArgs:
    """Positional and keyword arguments of one call, split from what users pass as ``example_inputs``."""

    args: tuple
    kwargs: dict

    @staticmethod
    def from_example(example_inputs: Any) -> "CallArgs":
        if isinstance(example_inputs, dict):
            return CallArgs((), dict(example_inputs))
        if isinstance(example_inputs, (list, tuple)):
            return CallArgs(tuple(example_inputs), {})
        return CallArgs((example_inputs,), {})

    def signature_key(self) -> tuple:
        """What a traced graph depends on beyond tensor values: which arguments are given and their kinds."""

        def kind(x):
            if isinstance(x, torch.Tensor):
                return ("tensor", x.dtype, x.dim(), x.device.type)
            if isinstance(x, (int, float, bool, str, type(None))):
                return ("const", x)
            return (type(x).__name__,)

        return (len(self.args), tuple(kind(a) for a in self.args),
                tuple(sorted((k, kind(v)) for k, v in self.kwargs.items())))


def try_symbolic_trace(model: nn.Module, call: CallArgs) -> Optional[fx.GraphModule]:
    """``fx.symbolic_trace`` with the arguments not passed fixed to their defaults; None if it cannot trace.

    On success every node carries ``meta['val']`` (FakeTensors propagated from ``call``).
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    given = {p.name for p in params[: len(call.args)]} | set(call.kwargs)
    if not set(call.kwargs) <= {p.name for p in params}:
        return None
    concrete = {p.name: p.default for p in params if p.name not in given and p.default is not p.empty}
    if any(p.name not in given and p.default is p.empty for p in params):
        return None
    try:
        # traces into nn.Transformer* containers with PyTorch's fused fast path off (see torch_nn_capture)
        gm = symbolic_trace(model, concrete_args=concrete or None)
        propagate_fake_values(gm, call)
    except Exception:
        return None
    return gm


def placeholder_values(gm: fx.GraphModule, call: CallArgs) -> list:
    """The values of ``gm``'s placeholders for a call (keyword arguments mapped by name)."""
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    bound = dict(zip(names, call.args))
    bound.update(call.kwargs)
    values = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.target in bound:
                values.append(bound[node.target])
            elif node.args:
                values.append(node.args[0])
            else:
                values.append(None)
    return values


def propagate_fake_values(gm: fx.GraphModule, call: CallArgs) -> None:
    """Set ``meta['val']`` on every node by running ``gm`` on fake copies of the call's tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    class KeepingAllValues(FakeTensorProp):
        # FakeTensorProp keeps tensors and numbers only; a pass that re-evaluates ``zeros_like(m, dtype=x.dtype)``
        # needs the dtype too, and an unused node without a value reads as one run for its effect (dead_code)
        def run_node(self, n):
            result = super().run_node(n)
            if "val" not in n.meta and result is not None and not isinstance(result, torch.Tensor):
                n.meta["val"] = result
            return result

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    values = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in placeholder_values(gm, call)]
    KeepingAllValues(gm, mode).propagate(*values)


def dynamo_capture(model: nn.Module, on_graph: Callable[[fx.GraphModule, list], Callable]) -> Callable:
    """``model`` wrapped by ``torch.compile`` with a backend that passes each captured graph to ``on_graph``.

    ``on_graph(gm, example_inputs)`` returns the callable Dynamo runs in the graph's place. Every call runs in
    ``torch_nn_capture.capture_context()`` (PyTorch's fused transformer fast path off), so Dynamo records (and
    its guards keep) the decomposed attention of PyTorch's own transformer modules.
    """
    compiled = torch.compile(model, backend=on_graph, dynamic=None)

    def run(*args, **kwargs):
        with capture_context():
            return compiled(*args, **kwargs)

    return run
