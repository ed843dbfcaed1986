"""Lower the ATen calls of a ``torch.export`` graph to the torch-level calls the pass pipeline reads.

``torch.export`` records ATen overloads (``aten.matmul.default``, ``aten.softmax.int``, ``aten.index.Tensor`` ...),
while the detector and the mask analysis read the calls a model's source makes, as ``fx.symbolic_trace`` and Dynamo
record them (``torch.matmul``, ``F.softmax``, ``x[batch_idx, kv_idx]``, ``kv_idx <= q_idx``; see
``attncc.passes.graph_ops``). ``lower_aten`` rewrites each ATen call it has a row for into the torch call with the
same semantics (``aten.index.Tensor(x, [i, None, j])`` -> ``x[i, :, j]``, ``aten.slice.Tensor(x, 1, 0, n)`` ->
``x[:, 0:n]``), so the unchanged pipeline runs on exported graphs; calls without a row stay as they are (a
layer norm or an embedding needs no other spelling). Each node keeps its metadata (``val``, ``nn_module_stack``).

The table ``ATEN_LOWERINGS`` holds one ``AtenLowering(name, overloads, lower)`` per family of overloads;
``tests/passes/test_lower_aten.py`` has one test per row (and fails when a row has none). A row's ``lower`` may
decline a call (return None) where the torch call would mean something else (``aten.to`` with a non-strided
layout): that node stays ATen, which the pipeline reads as an unknown op, never as a different one.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from attncc.passes.graph_copy import copy_graph_module

aten = torch.ops.aten


IDENTITY = "identity"
"""``TorchCall.op`` of a call that returns its input unchanged (a slice of a whole dim): its uses read the input."""


class TorchCall(NamedTuple):
    """What an ATen node becomes: an fx node's ``op`` ("call_function" / "call_method", or ``IDENTITY``), target,
    args, kwargs."""

    op: str
    target: Any
    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class AtenLowering:
    """One family of ATen overloads and how to spell its calls at the torch level (None: keep the ATen call)."""

    name: str
    overloads: tuple
    lower: Callable[[fx.Node], Optional[TorchCall]]


def _function(fn: Callable) -> Callable[[fx.Node], TorchCall]:
    """Same arguments, a torch function (or operator) as the target."""
    return lambda node: TorchCall("call_function", fn, tuple(node.args), dict(node.kwargs))


def _method(name: str) -> Callable[[fx.Node], TorchCall]:
    """Same arguments, a ``Tensor`` method (``self`` first) as the target."""
    return lambda node: TorchCall("call_method", name, tuple(node.args), dict(node.kwargs))


def _without_defaults(kwargs: dict) -> Optional[dict]:
    """kwargs without the ones torch-level calls do not take, when they hold their defaults (``layout=strided``,
    ``pin_memory=False``); None when one does not (the call cannot be spelled at the torch level)."""
    kept = dict(kwargs)
    if kept.pop("layout", torch.strided) not in (torch.strided, None):
        return None
    if kept.pop("pin_memory", False) not in (False, None):
        return None
    return kept


def _factory(fn: Callable) -> Callable[[fx.Node], Optional[TorchCall]]:
    """``aten.arange``/``ones``/``zeros``/``full``: the torch factory, without the default layout/pin_memory."""

    def lower(node: fx.Node) -> Optional[TorchCall]:
        kwargs = _without_defaults(node.kwargs)
        return None if kwargs is None else TorchCall("call_function", fn, tuple(node.args), kwargs)

    return lower


def _new_ones(node: fx.Node) -> Optional[TorchCall]:
    kwargs = _without_defaults(node.kwargs)
    return None if kwargs is None else TorchCall("call_method", "new_ones", tuple(node.args), kwargs)


def _to(node: fx.Node) -> Optional[TorchCall]:
    """``aten.to.dtype(x, dtype)``, ``to.device(x, device, dtype)``, ``to.dtype_layout(x, dtype=, layout=,
    device=)`` -> ``x.to(...)`` (``Tensor.to`` takes no layout: a strided one is the default)."""
    kwargs = _without_defaults(node.kwargs)
    return None if kwargs is None else TorchCall("call_method", "to", tuple(node.args), kwargs)


def _softmax(node: fx.Node) -> TorchCall:
    """``aten.softmax.int(x, dim, dtype=None)`` -> ``torch.softmax(x, dim[, dtype])``."""
    x, dim, *rest = node.args
    dtype = rest[0] if rest else node.kwargs.get("dtype")
    return TorchCall("call_function", torch.softmax, (x, dim) if dtype is None else (x, dim, dtype), {})


def _internal_softmax(node: fx.Node) -> TorchCall:
    """``aten._softmax.default(x, dim, half_to_float)`` -> ``torch.softmax(x, dim[, torch.float32])``."""
    x, dim, half_to_float = node.args
    return TorchCall("call_function", torch.softmax, (x, dim, torch.float32) if half_to_float else (x, dim), {})


def _add_or_sub(fn: Callable, op: Callable) -> Callable[[fx.Node], TorchCall]:
    """``a + b`` / ``a - b`` (``torch.add``/``torch.sub`` where an ``alpha`` other than 1 is given)."""

    def lower(node: fx.Node) -> TorchCall:
        kwargs = dict(node.kwargs)
        if kwargs.pop("alpha", 1) != 1:
            return TorchCall("call_function", fn, tuple(node.args), dict(node.kwargs))
        return TorchCall("call_function", op, tuple(node.args), kwargs)

    return lower


def _binary(op: Callable) -> Callable[[fx.Node], Optional[TorchCall]]:
    """A two-operand ATen call without keywords -> ``op(a, b)`` (``operator.mul``, ``operator.le`` ...)."""

    def lower(node: fx.Node) -> Optional[TorchCall]:
        if node.kwargs or len(node.args) != 2:
            return None
        return TorchCall("call_function", op, tuple(node.args), {})

    return lower


_INT64_MAX = 2 ** 63 - 1


def _slice(node: fx.Node) -> Optional[TorchCall]:
    """``aten.slice.Tensor(x, dim, start, end, step)`` -> ``x[:, ..., start:end:step]`` (``end`` of INT64_MAX,
    export's "to the end", as None)."""
    x, dim, start, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[:5]
    if node.kwargs or not isinstance(dim, int):
        return None
    end = None if end == _INT64_MAX else end
    start = None if start == 0 else start
    if start is None and end is None and step == 1:  # x[:, :] (export writes one per dim of x[:, :, None])
        return TorchCall(IDENTITY, None, (x,), {})
    return TorchCall("call_function", operator.getitem, (x, _index_at(dim, slice(start, end, None if step == 1
                                                                                     else step))), {})


def _select(node: fx.Node) -> Optional[TorchCall]:
    """``aten.select.int(x, dim, i)`` -> ``x[:, ..., i]``."""
    x, dim, index = node.args
    if node.kwargs or not isinstance(dim, int):
        return None
    return TorchCall("call_function", operator.getitem, (x, _index_at(dim, index)), {})


def _index_at(dim: int, index: Any) -> tuple:
    """The indexing tuple that applies ``index`` at dimension ``dim`` (negative: counted from the end)."""
    if dim >= 0:
        return (slice(None),) * dim + (index,)
    return (Ellipsis, index) + (slice(None),) * (-dim - 1)


def _index(node: fx.Node) -> Optional[TorchCall]:
    """``aten.index.Tensor(x, [i, None, j])`` -> ``x[i, :, j]`` (a None entry leaves its dimension whole)."""
    x, indices = node.args
    if node.kwargs:
        return None
    index = tuple(slice(None) if i is None else i for i in indices)
    return TorchCall("call_function", operator.getitem, (x, index), {})


ATEN_LOWERINGS: tuple[AtenLowering, ...] = (
    # the attention computation itself
    AtenLowering("matmul", (aten.matmul.default,), _function(torch.matmul)),
    AtenLowering("bmm", (aten.bmm.default,), _function(torch.bmm)),
    AtenLowering("baddbmm", (aten.baddbmm.default,), _function(torch.baddbmm)),
    AtenLowering("softmax", (aten.softmax.int,), _softmax),
    AtenLowering("internal_softmax", (aten._softmax.default,), _internal_softmax),
    AtenLowering("sdpa", (aten.scaled_dot_product_attention.default,), _function(F.scaled_dot_product_attention)),
    AtenLowering("dropout", (aten.dropout.default,), _function(torch.dropout)),
    AtenLowering("linear", (aten.linear.default,), _function(F.linear)),
    # scaling, masks added to the scores, softcaps
    AtenLowering("mul", (aten.mul.Tensor, aten.mul.Scalar), _binary(operator.mul)),
    AtenLowering("div", (aten.div.Tensor, aten.div.Scalar), _binary(operator.truediv)),
    AtenLowering("add", (aten.add.Tensor, aten.add.Scalar), _add_or_sub(torch.add, operator.add)),
    AtenLowering("sub", (aten.sub.Tensor, aten.sub.Scalar), _add_or_sub(torch.sub, operator.sub)),
    AtenLowering("tanh", (aten.tanh.default,), _function(torch.tanh)),
    AtenLowering("where", (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar),
                 _function(torch.where)),
    AtenLowering("masked_fill", (aten.masked_fill.Scalar, aten.masked_fill.Tensor), _method("masked_fill")),
    # layouts: head split/merge, transposed keys, GQA repeats
    AtenLowering("transpose", (aten.transpose.int,), _method("transpose")),
    AtenLowering("permute", (aten.permute.default,), _method("permute")),
    AtenLowering("view", (aten.view.default, aten._unsafe_view.default), _method("view")),
    AtenLowering("reshape", (aten.reshape.default,), _method("reshape")),
    AtenLowering("expand", (aten.expand.default,), _method("expand")),
    AtenLowering("unsqueeze", (aten.unsqueeze.default,), _function(torch.unsqueeze)),
    AtenLowering("unbind", (aten.unbind.int,), _function(torch.unbind)),
    AtenLowering("split", (aten.split.Tensor,), _function(torch.split)),
    AtenLowering("flatten", (aten.flatten.using_ints,), _function(torch.flatten)),
    AtenLowering("unflatten", (aten.unflatten.int,), _function(torch.unflatten)),
    AtenLowering("narrow", (aten.narrow.default,), _function(torch.narrow)),
    AtenLowering("contiguous", (aten.contiguous.default,), _method("contiguous")),
    AtenLowering("clone", (aten.clone.default,), _method("clone")),
    AtenLowering("to", (aten.to.dtype, aten.to.device, aten.to.dtype_layout), _to),
    AtenLowering("slice", (aten.slice.Tensor,), _slice),
    AtenLowering("select", (aten.select.int,), _select),
    AtenLowering("index", (aten.index.Tensor,), _index),
    # how transformers builds masks: index comparisons, and-ed predicates, all-true starts
    AtenLowering("arange", (aten.arange.default, aten.arange.start, aten.arange.start_step), _factory(torch.arange)),
    AtenLowering("ones", (aten.ones.default,), _factory(torch.ones)),
    AtenLowering("zeros", (aten.zeros.default,), _factory(torch.zeros)),
    AtenLowering("full", (aten.full.default,), _factory(torch.full)),
    AtenLowering("new_ones", (aten.new_ones.default,), _new_ones),
    AtenLowering("le", (aten.le.Tensor, aten.le.Scalar), _binary(operator.le)),
    AtenLowering("lt", (aten.lt.Tensor, aten.lt.Scalar), _binary(operator.lt)),
    AtenLowering("ge", (aten.ge.Tensor, aten.ge.Scalar), _binary(operator.ge)),
    AtenLowering("gt", (aten.gt.Tensor, aten.gt.Scalar), _binary(operator.gt)),
    AtenLowering("eq", (aten.eq.Tensor, aten.eq.Scalar), _binary(operator.eq)),
    AtenLowering("ne", (aten.ne.Tensor, aten.ne.Scalar), _binary(operator.ne)),
    AtenLowering("and", (aten.__and__.Tensor, aten.bitwise_and.Tensor), _binary(operator.and_)),
    AtenLowering("logical_and", (aten.logical_and.default,), _binary(torch.logical_and)),
    AtenLowering("or", (aten.__or__.Tensor, aten.bitwise_or.Tensor), _binary(operator.or_)),
    AtenLowering("logical_not", (aten.logical_not.default,), _function(torch.logical_not)),
    AtenLowering("bitwise_not", (aten.bitwise_not.default,), _function(torch.bitwise_not)),
)
"""The ATen overloads ``lower_aten`` rewrites, one row per family; an overload appears in one row only."""

DROPPED_CHECKS = (aten._assert_tensor_metadata.default,)
"""Checks export records after a cast (dtype/device/layout of the cast's input); they have no result, and a use
of the probabilities would hide the softmax from the detector. Exporting the rewritten graph records them again
where they still apply."""

_BY_OVERLOAD: dict = {overload: row for row in ATEN_LOWERINGS for overload in row.overloads}


def lowering_for(node: fx.Node) -> Optional[AtenLowering]:
    """The row of ``ATEN_LOWERINGS`` that lowers ``node``'s call, or None."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    return _BY_OVERLOAD.get(node.target)


def lower_aten(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (an exported program's ``module()``) with every ATen call that has a row of
    ``ATEN_LOWERINGS`` spelled as the torch-level call; the input graph is left as it was.

    Example::

        ep = torch.export.export(model, (), {"input_ids": ids}, strict=False)
        gm = lower_aten(ep.module())      # aten.matmul.default -> torch.matmul, aten.index.Tensor -> x[i, j] ...
        result = attncc.passes.run_pipeline(gm, attncc.policy.as_policy("exact"))
    """
    result, _ = copy_graph_module(gm)
    for node in list(result.graph.nodes):
        if node.op == "call_function" and node.target in DROPPED_CHECKS and not node.users:
            result.graph.erase_node(node)
            continue
        row = lowering_for(node)
        call = row.lower(node) if row is not None else None
        if call is not None and call.op == IDENTITY:
            node.replace_all_uses_with(call.args[0])
            result.graph.erase_node(node)
        elif call is not None:
            node.op, node.target = call.op, call.target
            node.args, node.kwargs = call.args, call.kwargs
    result.graph.lint()
    result.recompile()
    return result
