"""Learned attention-sink logits: the score column a model concatenates before the softmax and drops after it.

gpt-oss (and StreamingLLM-style learned sinks) write::

    sink = sinks.reshape(1, -1, 1, 1).expand(B, -1, Nq, -1)        # sinks: [Hq] parameter
    p = softmax(cat([scores, sink], dim=-1), dim=-1)[..., :-1]      # drop the sink column
    out = p @ v

which is attention whose softmax denominator gains ``exp(sinks[h])`` and whose values gain nothing. The
detector asks :func:`sink_column` about the softmax input and :func:`slice_problem` about a slice of the
probabilities; both raise :class:`NotSinkForm` with the reason when the graph concatenates or slices along the
key axis in any other way (two score blocks, several columns, a column that varies by batch or query, a slice
that keeps the sink), so no such form is silently read as something else.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from attncc.passes import graph_ops as g

CAT = (torch.cat, torch.concat, torch.concatenate)
NARROW = (torch.narrow, torch.Tensor.narrow)
EXPAND_METHODS = {"expand", "expand_as", "broadcast_to"}


class NotSinkForm(Exception):
    """The graph concatenates or slices along the key axis in a way that is not a learned sink column."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class SinkColumn:
    """A learned sink column found at a softmax input ``cat([scores, column], dim=-1)``."""

    scores: fx.Node
    """The score block (what the usual score walk starts from)."""
    logits: fx.Node
    """The tensor the column is broadcast from: ``Hq`` values (one per query head, in head order) or one."""
    first: bool = False
    """True when the column comes before the scores (``cat([column, scores])``, dropped by ``[..., 1:]``)."""


def _nodes_in(args) -> list[fx.Node]:
    out = []
    for a in args:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(_nodes_in(a))
    return out


def cat_parts(node: Any) -> Optional[tuple[list, Any]]:
    """``(tensors, dim)`` when node is ``torch.cat(tensors, dim)``; else None."""
    if not g.is_call(node, CAT):
        return None
    parts = g.arg(node, 0, "tensors")
    if parts is None:
        parts = node.kwargs.get("tensors")
    return (list(parts), g.arg(node, 1, "dim", 0)) if isinstance(parts, (list, tuple)) else None


def sink_column(x: fx.Node, reaches_product) -> Optional[SinkColumn]:
    """The sink column of the softmax input ``x`` (casts and copies before it are looked through), None when
    ``x`` is no concatenation or one of things that are not attention scores (``reaches_product(node)`` says
    which are). Raises NotSinkForm for any other concatenation of the scores."""
    cat = x
    while (g.is_cast(cat) or g.is_identity(cat)) and len(cat.users) == 1:
        cat = cat.args[0]
    found = cat_parts(cat)
    if found is None or len(cat.users) != 1:
        return None
    parts, dim = found
    from_product = [p for p in parts if isinstance(p, fx.Node) and reaches_product(p)]
    if not from_product:
        return None  # not scores: a softmax over something else
    rank = g.ndim(cat)
    if not isinstance(dim, int) or rank < 1 or dim % rank != rank - 1:
        raise NotSinkForm(f"the attention scores are concatenated along dim {dim} before the softmax "
                          f"(only one learned sink column along the key axis is supported)")
    if len(parts) != 2 or len(from_product) != 1:
        raise NotSinkForm(
            f"the attention scores are concatenated with {len(parts) - 1} other block(s) along the key axis, "
            f"{len(from_product)} of them made by matrix products (only one learned sink column, a per-head "
            f"logit, is supported)")
    scores = from_product[0]
    column = parts[1] if parts[0] is scores else parts[0]
    if g.tensor_val(column) is None or g.tensor_val(scores) is None:
        raise NotSinkForm("a tensor of unknown shape is concatenated to the attention scores")
    width = g.shape(column)[-1]
    if width != 1:
        raise NotSinkForm(f"a block of {width} columns is concatenated to the attention scores (a learned sink "
                          f"is one column: one logit per head)")
    logits = per_head_source(column, g.shape(scores))
    return SinkColumn(scores=scores, logits=logits, first=parts[0] is column)


# ---------------------------------------------------------------------------- the per-head column


def per_head_source(column: fx.Node, score_shape: tuple) -> fx.Node:
    """The node whose ``Hq`` (or 1) values ``column`` broadcasts: column must equal that tensor's values along
    the head axis (dim -3 of 4-D scores), the same for every batch row and query. Raises NotSinkForm."""
    path = []
    cur = column
    while _is_broadcast_step(cur):
        path.append(cur)
        cur = cur.args[0]
    source = cur
    s = g.shape(source)
    if s is None or not all(isinstance(d, int) for d in s):
        raise NotSinkForm("the concatenated column is built from a tensor of unknown or dynamic shape")
    numel = math.prod(s)
    big = [i for i, d in enumerate(s) if d != 1]
    if numel != 1 and len(big) != 1:
        raise NotSinkForm(f"the concatenated column is built from a tensor of shape {tuple(s)} (a learned sink is "
                          f"one logit per head: a vector of Hq values)")
    axis = None if numel == 1 else big[0] - len(s)  # the head axis, counted from the right
    for node in reversed(path):
        axis = _axis_after(node, axis)
    out = g.shape(column)
    rank = len(score_shape)
    if len(out) != rank:
        raise NotSinkForm(f"the concatenated column has rank {len(out)}, the scores {rank}")
    if axis is not None:
        if rank != 4 or axis != -3 or out[-3] != score_shape[-3]:
            raise NotSinkForm(
                f"the concatenated column varies along dim {axis % len(out)} of the {rank}-D scores of shape "
                f"{tuple(score_shape)}; a learned sink varies along the head dim (1 of [B, Hq, Nq, Nk]) only")
    return source


def _is_broadcast_step(node: Any) -> bool:
    """A shape-only op a sink column is built through: casts, views, unsqueeze, None-indexing, expand."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if g.is_cast(node) or g.is_identity(node):
        return True
    if g.is_call(node, (torch.reshape, torch.unsqueeze, torch.broadcast_to),
                 g.VIEW_METHODS | EXPAND_METHODS | {"unsqueeze"}):
        return True
    return node.op == "call_function" and node.target is operator.getitem and _none_index(node.args[1]) is not None


def _none_index(index: Any) -> Optional[list]:
    """For an index made only of ``None``, ``:`` and ``...``: its entries as a list; else None."""
    items = list(index) if isinstance(index, tuple) else [index]
    if not all(i is None or i is Ellipsis or i == slice(None) for i in items):
        return None
    return items if sum(i is Ellipsis for i in items) <= 1 else None


def _axis_after(node: fx.Node, axis: Optional[int]) -> Optional[int]:
    """The head axis (from the right) of ``node``'s output, given that of its input; NotSinkForm where the op
    could mix heads with other dims."""
    src_shape, out_shape = g.shape(node.args[0]), g.shape(node)
    if axis is None or g.is_cast(node) or g.is_identity(node):
        return axis
    if g.is_call(node, (torch.broadcast_to,), EXPAND_METHODS):
        return axis  # broadcasting adds leading dims and widens size-1 dims: the head dim stays
    if g.is_call(node, (torch.reshape,), g.VIEW_METHODS):
        # a reshape keeps the values in order; the heads stay one axis when it is the only dim above 1
        if sum(d != 1 for d in src_shape) != 1 or sum(d != 1 for d in out_shape) != 1:
            raise NotSinkForm(f"the sink column is reshaped from {tuple(src_shape)} to {tuple(out_shape)} after "
                              f"being broadcast")
        return [i for i, d in enumerate(out_shape) if d != 1][0] - len(out_shape)
    if g.is_call(node, (torch.unsqueeze,), {"unsqueeze"}):
        dim = g.arg(node, 1, "dim")
        pos = len(src_shape) + axis
        dim = dim % len(out_shape)
        return (pos + 1 if dim <= pos else pos) - len(out_shape)
    return _axis_after_index(_none_index(node.args[1]), axis, src_shape, out_shape)


def _axis_after_index(items: list, axis: int, src_shape: tuple, out_shape: tuple) -> int:
    """The head axis (from the right) after ``x[items]``, an index of ``None``, ``:`` and ``...`` only."""
    named = sum(i is not None and i is not Ellipsis for i in items)
    full = []  # the index with `...` written out as the `:` it stands for
    for item in items:
        full.extend([slice(None)] * (len(src_shape) - named) if item is Ellipsis else [item])
    src_pos, out_pos, head = 0, 0, len(src_shape) + axis
    for item in full:
        if item is None:
            out_pos += 1
            continue
        if src_pos == head:
            return out_pos - len(out_shape)
        src_pos, out_pos = src_pos + 1, out_pos + 1
    return out_pos + head - src_pos - len(out_shape)  # trailing dims the index does not name


# ---------------------------------------------------------------------------- the slice after the softmax


def key_slice(node: Any) -> Optional[tuple[Optional[int], Optional[int]]]:
    """``(start, dropped)`` when node slices only its input's last dim (``p[..., :-1]``, ``p[:, :, :, 1:]``,
    ``p.narrow(-1, 0, n)``): the first position kept and how many columns are dropped (each None where the
    sizes are symbolic and it cannot be read); None for any other op."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src, out = g.shape(node.args[0]), g.shape(node)
    if src is None or out is None or not src or len(src) != len(out):
        return None
    if not all(g.same_size(a, b) for a, b in zip(src[:-1], out[:-1])):
        return None
    n = src[-1]
    if node.op == "call_function" and node.target is operator.getitem:
        start = _getitem_key_start(node, len(src), n)
    elif g.is_call(node, NARROW, {"narrow"}):
        dim, start = _static_int(g.arg(node, 1, "dim")), _static_int(g.arg(node, 2, "start"))
        if dim is None or dim % len(src) != len(src) - 1:
            return None
        start = _position(start, n)
    else:
        return None
    if start is False:
        return None
    return start, _difference(n, out[-1])


def _position(index: Optional[int], n: Any) -> Optional[int]:
    """A slice bound as a position from the start (None where it counts from a symbolic end)."""
    if index is None or index >= 0:
        return index
    return n + index if isinstance(n, int) else None


def _difference(a: Any, b: Any) -> Optional[int]:
    """``a - b`` for sizes: an int where both are, 1 where that is known symbolically, else None."""
    if isinstance(a, int) and isinstance(b, int):
        return a - b
    return 1 if g.same_size(a, b + 1) else None


def _static_int(x: Any) -> Optional[int]:
    """An int, or a node whose captured value is a plain int (symbolic_trace's ``k.shape[-2]``); else None."""
    if isinstance(x, fx.Node):
        x = g.val(x)
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _getitem_key_start(node: fx.Node, rank: int, n: Any):
    """The first kept position of ``x[..., a:b]`` / ``x[:, :, :, a:b]`` (None: unknown); False when the index
    is not a plain slice of the last dim."""
    items = list(node.args[1]) if isinstance(node.args[1], tuple) else [node.args[1]]
    if not items or not isinstance(items[-1], slice):
        return False
    lead = items[:-1]
    if not all(i is Ellipsis or i == slice(None) for i in lead) or sum(i is Ellipsis for i in lead) > 1:
        return False
    if Ellipsis not in lead and len(items) != rank:
        return False
    last = items[-1]
    if last.step not in (None, 1):
        return False
    start = 0 if last.start is None else _static_int(last.start)
    return False if start is None and last.start is not None else _position(start, n)


def slice_problem(node: fx.Node, column: Optional[SinkColumn], dropped: bool) -> str:
    """Why the key-axis slice ``node`` of the probabilities (see :func:`key_slice`) is not the drop of
    ``column``; '' when it is exactly that drop."""
    start, removed = key_slice(node)
    what = (f"the attention probabilities are sliced along the key axis (from position {start}, "
            f"{removed} column(s) dropped)")
    if column is None:
        return f"{what}, and no learned sink column was concatenated to the scores"
    if dropped:
        return f"{what} again after the sink column was dropped"
    want = 1 if column.first else 0
    if start != want or removed != 1:
        where = "first" if column.first else "last"
        return f"{what}, but the learned sink is the {where} column: only dropping exactly that column is supported"
    return ""
