"""Reading the operands of the ops around a softmax: compile-time constants, which operand carries the scores,
and which users read a node's values (not just its dtype or shape)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.fx as fx

from attncc.passes import graph_ops as g
from attncc.passes.effects import may_be_written
from attncc.passes.sink_logits import cat_parts


def const_value(x: Any) -> Optional[float]:
    """A scalar we can read at compile time: a number, or a node building a one-element constant tensor."""
    c = g.scalar_constant(x)
    if c is not None or not isinstance(x, fx.Node):
        return c
    if may_be_written(x):  # ``c = torch.full((), -inf); c.fill_(0)``: not the value it was built with
        return None
    if x.op == "call_function" and x.target in (torch.full, torch.full_like) and len(x.args) >= 2:
        return g.scalar_constant(x.args[1])
    if x.op == "call_function" and x.target in (torch.tensor, torch.scalar_tensor, torch.as_tensor) and x.args:
        return g.scalar_constant(x.args[0])
    if x.op == "get_attr":
        return _one_element_attribute(x)
    if g.is_cast(x):
        return const_value(x.args[0])
    return None


def _one_element_attribute(node: fx.Node) -> Optional[float]:
    """The value of a real one-element tensor attribute (a buffer like ``self.scale``), else None."""
    obj = node.graph.owning_module
    try:
        for part in node.target.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        return None
    if isinstance(obj, torch.Tensor) and obj.numel() == 1 and not isinstance(obj, torch._subclasses.FakeTensor):
        return float(obj.item())
    return None


def is_scalar_like(x: Any) -> bool:
    """A tensor whose last two dims are 1: a per-batch/per-head multiplier that can move from scores to q; or
    a number computed in the graph (``head_dim ** -0.5`` from a traced size)."""
    if isinstance(x, fx.Node) and isinstance(g.val(x), (int, float, torch.SymInt, torch.SymFloat)) \
            and not isinstance(g.val(x), bool):
        return True
    s = g.shape(x)
    return s is not None and (len(s) < 2 or (s[-1] == 1 and s[-2] == 1))


def reaches_product(node: Any, depth: int = 8) -> bool:
    """Whether node is, or is fed through score-chain-like ops by, a matrix product (bounded search)."""
    if not isinstance(node, fx.Node) or depth < 0:
        return False
    if g.is_matmul(node):
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    tensor_args = [a for a in node.args if isinstance(a, fx.Node) and g.tensor_val(a) is not None]
    if cat_parts(node) is not None:  # torch.cat([...]): its tensors come in a list
        tensor_args = [a for a in cat_parts(node)[0] if isinstance(a, fx.Node)]
    return any(reaches_product(a, depth - 1) for a in tensor_args[:2])


def chain_operand(node: fx.Node, candidates) -> Optional[int]:
    """Index among ``candidates`` (arg positions) of the operand carrying the scores; None if ambiguous."""
    hits = [i for i in candidates if i < len(node.args) and reaches_product(node.args[i])]
    if len(hits) == 1:
        return hits[0]
    if len(hits) == 2:  # both sides come from products (e.g. scores + a bias made by a product): take the wider
        shapes = [g.shape(node.args[i]) for i in hits]
        if shapes[0] is not None and shapes[1] is not None and shapes[0] != shapes[1]:
            return hits[0] if math.prod(map(as_int, shapes[0])) >= math.prod(map(as_int, shapes[1])) else hits[1]
        return hits[0]
    return None


def as_int(x) -> int:
    """A size as an int; a symbolic size that cannot be read counts as very large."""
    try:
        return int(x)
    except Exception:
        return 2**31


_METADATA_ATTRIBUTES = {"dtype", "shape", "device", "ndim", "is_cuda", "layout"}


def value_users(node: fx.Node) -> list[fx.Node]:
    """node's users that read its values; those that read only its dtype, shape or device (``type_as(x)``,
    ``.to(x.dtype)``, ``x.size(-1)``) do not make the scores escape."""
    return [u for u in node.users if not _reads_metadata_only(u, node)]


def _reads_metadata_only(user: fx.Node, node: fx.Node) -> bool:
    if user.op == "call_function" and user.target is getattr:
        return user.args[0] is node and user.args[1] in _METADATA_ATTRIBUTES
    if user.op == "call_method" and user.target in ("size", "dim", "type_as", "to", "new_zeros", "new_empty",
                                                    "new_ones", "new_full"):
        positions = [i for i, a in enumerate(user.args) if a is node]
        if node in user.kwargs.values():
            return False
        if user.target in ("size", "dim") or user.target.startswith("new_"):
            return positions == [0]
        return bool(positions) and 0 not in positions  # x.type_as(node), x.to(node): node's dtype/device only
    return False
