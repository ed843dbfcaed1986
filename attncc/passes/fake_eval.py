"""Give nodes a pass inserts the same ``meta['val']`` every captured node has, by running them on fake values."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map


def fill_val(node: fx.Node, fallback_mode=None) -> None:
    """Set ``node.meta['val']`` by evaluating node's call on its inputs' fake values (FakeTensors/SymInts).

    A call with no fake inputs (``torch.randint(...)``) runs under ``fallback_mode``, so its value is fake too:
    a real tensor next to fake ones breaks later fake evaluation under Dynamo.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    def to_val(a):
        if isinstance(a, fx.Node):
            return a.meta.get("val", a.meta.get("example_value"))
        return a

    args = tree_map(to_val, node.args)
    kwargs = tree_map(to_val, node.kwargs)
    # the mode the inputs' values live in (not the ambient tracing context's, which Dynamo may have replaced)
    fakes = [x for x in (*tree_flatten(args)[0], *tree_flatten(kwargs)[0]) if isinstance(x, FakeTensor)]
    fake_mode = fakes[0].fake_mode if fakes else fallback_mode
    if node.op == "get_attr":  # a constant the pass stored on the module: its fake copy
        value = node.graph.owning_module.get_buffer(node.target)
        node.meta["val"] = fake_mode.from_tensor(value) if fake_mode is not None else value
        return
    with fake_mode if fake_mode is not None else torch.no_grad():
        if node.op == "call_function":
            result = node.target(*args, **kwargs)
        elif node.op == "call_method":
            result = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:  # pragma: no cover - passes only insert calls and constants
            raise ValueError(f"cannot evaluate {node.op} nodes")
    node.meta["val"] = result


def copy_meta(src: fx.Node, dst: fx.Node) -> None:
    """Carry provenance (module stack, stack trace) from the node a new node stands for."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
