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
    try:  # the class forward: the instance's may be routed through attncc while capturing
        params = list(inspect.signature(type(model).forward).parameters.values())[1:]
    except (TypeError, ValueError, IndexError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    given = {p.name for p in params[: len(call.args)]} | set(call.kwargs)
    if not set(call.kwargs) <= {p.name for p in params}:
        return None
    concrete = {p.name: p.default for p in params if p.name not in given and p.default is not p.empty}
    if any(p.name not in given and p.default is p.empty for p in params):
        return None
    buffers = list(model.buffers())
    with torch.no_grad():
        saved = [b.detach().clone() for b in buffers]  # tracing runs a buffer's in-place update once
    try:
        # traces into nn.Transformer* containers with PyTorch's fused fast path off (see torch_nn_capture)
        gm = symbolic_trace(model, concrete_args=concrete or None)
        propagate_fake_values(gm, call)
    except Exception:
        return None
    finally:
        _restore(buffers, saved)
    return gm if traced_like_the_model(model, gm, call) else None


def _restore(buffers: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(buffers, saved):
            buffer.copy_(value)


def traced_like_the_model(model: nn.Module, gm: fx.GraphModule, call: CallArgs) -> bool:
    """Whether the traced graph computes what the model's forward computes on ``call``: the same outputs and the
    same buffer updates (same random seed for both; buffers restored afterwards).

    ``fx.symbolic_trace`` silently loses writes it cannot record: ``view += b`` on a slice is traced as
    ``view = view + b`` (a Proxy has no ``__iadd__``), and ``self.buf.add_(1)`` runs once at trace time and is
    not in the graph. Such a graph must not stand in for the model.
    """
    buffers = list(model.buffers())
    with torch.no_grad():
        saved = [b.detach().clone() for b in buffers]

    def run(fn) -> tuple[Any, list[torch.Tensor]]:
        _restore(buffers, saved)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            out = fn()
        return out, [b.detach().clone() for b in buffers]

    try:
        with torch.no_grad():
            want = run(lambda: type(model).forward(model, *call.args, **call.kwargs))
            got = run(lambda: gm(*placeholder_values(gm, call)))
    except Exception:
        return False
    finally:
        _restore(buffers, saved)
    return _same_values(want, got)


def _same_values(a: Any, b: Any) -> bool:
    from torch.utils._pytree import tree_flatten

    flat_a, spec_a = tree_flatten(a)
    flat_b, spec_b = tree_flatten(b)
    if spec_a != spec_b or len(flat_a) != len(flat_b):
        return False
    for x, y in zip(flat_a, flat_b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or not torch.allclose(x, y, rtol=1e-5, atol=1e-6,
                                                                              equal_nan=True):
                return False
        elif x is not y:
            try:
                if bool(x != y):
                    return False
            except Exception:  # a value that does not compare: cannot tell, so not the same
                return False
    return True


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
    """The class forward of ``model``, bound to it, wrapped by ``torch.compile`` with a backend that passes each
    captured graph to ``on_graph``.

    ``on_graph(gm, example_inputs)`` returns the callable Dynamo runs in the graph's place. The class forward (not
    ``model.__call__``) is compiled because the compiled module runs the model's own ``__call__``, hooks and all,
    with the instance's ``forward`` routed here.

    Every call runs in ``torch_nn_capture.capture_context()`` (PyTorch's fused transformer fast path off), so
    Dynamo records (and its guards keep) the decomposed attention of PyTorch's own transformer modules.
    """
    compiled = torch.compile(type(model).forward.__get__(model), backend=on_graph, dynamic=None)

    def run(*args, **kwargs):
        with capture_context():
            return compiled(*args, **kwargs)

    return run


RECOMPILE_LIMIT = 256
"""Dynamo's cache entries per function attncc allows while it runs a model: each ``attncc.compile`` is a new
backend, so compiling models that share code (every instance of a transformers class, one model compiled with
several policies) adds entries to the same functions; at Dynamo's default (8) the ninth would silently run the
original model."""


def run_captured(compiled: Callable, args: tuple, kwargs: dict) -> Any:
    """Call a ``dynamo_capture`` result with room for many attncc compiles, and failing loudly (AttnccError)
    instead of Dynamo's silent fallback to the original code when its recompile limit is still reached."""
    from torch._dynamo import config

    patch = {}
    for name, floor in (("recompile_limit", RECOMPILE_LIMIT), ("cache_size_limit", RECOMPILE_LIMIT),
                        ("accumulated_recompile_limit", 16 * RECOMPILE_LIMIT),
                        ("accumulated_cache_size_limit", 16 * RECOMPILE_LIMIT)):
        if hasattr(config, name) and getattr(config, name) < floor:
            patch[name] = floor
    # a float attribute (an attention module's scaling) that differs between two models of one class would
    # become a run-time graph input at the second compile: keep floats constants, as they are in one model
    if hasattr(config, "specialize_float"):
        patch["specialize_float"] = True
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(config, name) and not getattr(config, "suppress_errors", False):
            patch[name] = True
            break
    try:
        with config.patch(patch):
            return compiled(*args, **kwargs)
    except Exception as error:
        if type(error).__name__ not in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit"):
            raise
        from attncc.errors import AttnccError

        raise AttnccError("Dynamo's recompile limit was reached for this model, so it would run with its attention "
                          "unchanged; call torch._dynamo.reset() or raise torch._dynamo.config.recompile_limit") from error
