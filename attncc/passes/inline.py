"""Inline ``torch.fx.wrap``-ed helpers: replace an opaque call of a plain Python function by its traced graph.

``fx.symbolic_trace`` keeps a function registered with ``torch.fx.wrap`` as one ``call_function`` node (timm's
``maybe_add_mask(scores, mask)`` between the scores and the softmax), so the detector sees an unknown operation
where Dynamo, which traces through it, sees ``scores + mask``. Tracing the function again with the node's
arguments, graph nodes as proxies and everything else as the constants they are, gives the operations it
performs for those constants; where that fails (control flow on a traced value, a constant tensor made inside,
a result that is not what the node computed) the node is left as it was.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_aggregate, map_arg

from attncc.passes.fake_eval import copy_meta, fill_val

_LIBRARY_MODULES = ("torch", "operator", "_operator", "math", "builtins", "functools", "typing")


def is_wrapped_function(target: Any) -> bool:
    """A plain Python function from outside torch: what a ``call_function`` node holds for an fx-wrapped helper."""
    if not inspect.isfunction(target):
        return False
    module = (getattr(target, "__module__", None) or "").split(".")[0]
    return module not in _LIBRARY_MODULES


def inline_call(node: fx.Node) -> bool:
    """Replace ``node`` (a call of a Python function) by the operations of that function; True if it did.

    The result must be a tensor of the node's shape and dtype, one of the node's inputs, ``None`` where the
    node's value was ``None``, or a tuple of those read only through ``getitem``.
    """
    traced = _trace_call(node.target, node.args, node.kwargs)
    if traced is None:
        return False
    graph_of_call, inputs = traced
    body = [n for n in graph_of_call.nodes if n.op not in ("placeholder", "output")]
    if any(n.op not in ("call_function", "call_method") for n in body):
        return False  # get_attr (a tensor made inside the helper) or a module: not ours to add
    env = dict(zip([n for n in graph_of_call.nodes if n.op == "placeholder"], inputs))
    added: list[fx.Node] = []
    try:
        with node.graph.inserting_before(node):
            for n in body:
                new = node.graph.node_copy(n, lambda x: env[x])
                added.append(new)
                copy_meta(node, new)
                fill_val(new)
                env[n] = new
    except Exception:
        _erase(added)
        return False
    (result,) = next(n for n in graph_of_call.nodes if n.op == "output").args
    result = map_arg(result, lambda x: env[x])
    if not _same_value(result, node.meta.get("val")) or not _substitute(node, result):
        _erase(added)
        return False
    node.graph.erase_node(node)
    return True


def _trace_call(fn, args, kwargs) -> Optional[tuple[fx.Graph, list[fx.Node]]]:
    """The graph of ``fn(*args, **kwargs)`` with one placeholder per graph node among the arguments."""
    tracer = fx.Tracer()
    tracer.root = nn.Module()
    tracer.graph = fx.Graph(tracer_cls=fx.Tracer)
    tracer.tensor_attrs = {}
    inputs: list[fx.Node] = []

    def as_proxy(a):
        if isinstance(a, fx.Node):
            inputs.append(a)
            return tracer.create_proxy("placeholder", f"input_{len(inputs)}", (), {})
        return a

    proxy_args = map_aggregate(args, as_proxy)
    proxy_kwargs = map_aggregate(kwargs, as_proxy)
    try:
        out = fn(*proxy_args, **proxy_kwargs)
        tracer.create_node("output", "output", (tracer.create_arg(out),), {})
    except Exception:  # control flow on a traced value, int() of a size, anything symbolic tracing refuses
        return None
    return tracer.graph, inputs


def _same_value(result: Any, want: Any) -> bool:
    """Whether the traced result stands for the node's value ``want`` (shapes and dtypes; None for None)."""
    if result is None:
        return want is None
    if isinstance(result, fx.Node):
        have = result.meta.get("val", result.meta.get("example_value"))
        if isinstance(want, torch.Tensor):
            return isinstance(have, torch.Tensor) and have.shape == want.shape and have.dtype == want.dtype
        return False
    if isinstance(result, (tuple, list)) and isinstance(want, (tuple, list)) and len(result) == len(want):
        return all(_same_value(r, w) for r, w in zip(result, want))
    return False


def _substitute(node: fx.Node, result: Any) -> bool:
    """Point node's users at ``result`` (a node, None, or a tuple read through getitem); False if it cannot."""
    if isinstance(result, fx.Node):
        node.replace_all_uses_with(result)
        return True
    if result is None:
        for user in list(node.users):
            user.args = map_arg(user.args, lambda x: None if x is node else x)
            user.kwargs = map_arg(user.kwargs, lambda x: None if x is node else x)
        return True
    users = list(node.users)
    if not all(u.op == "call_function" and u.target is operator.getitem and u.args[0] is node
               and isinstance(u.args[1], int) for u in users):
        return False
    if not all(isinstance(result[u.args[1]], fx.Node) for u in users):
        return False
    for user in users:
        user.replace_all_uses_with(result[user.args[1]])
        node.graph.erase_node(user)
    return True


def _erase(added: list[fx.Node]) -> None:
    for new in reversed(added):
        if not new.users:
            new.graph.erase_node(new)
