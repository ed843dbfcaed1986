"""The contracted axis: does ``q @ k^T`` contract features (token attention) or tokens (channel attention)?

The axis q and k are contracted over is followed back, op by op, to the projection that made it. Each op is
read by the first rule of :data:`AXIS_RULES` that matches it; its handler says which input and which of its
axes the output axis comes from, or None where the walk cannot tell.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from attncc.passes import graph_ops as g
from attncc.site import AttentionSite

_LINEAR_FUNCTIONS = (torch._C._nn.linear, torch.nn.functional.linear)
_CONV_FUNCTIONS = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
                   torch.conv1d, torch.conv2d, torch.conv3d)
_SAME_AXIS_SPLITS = {"split", "chunk", "tensor_split", "split_with_sizes"}
_CAT = (torch.cat, torch.concat, torch.concatenate)

AxisInput = Optional[tuple[fx.Node, int]]
"""The input node and its axis an output axis comes from; None where the walk stops."""


def attention_axis(site: AttentionSite) -> str:
    """``'channels'`` when ``q @ k^T`` contracts the token axis of the activations q and k were projected from
    (XCiT's cross-covariance attention: q and k are ``[B, H, D, N]``, the scores ``[B, H, D, D]``), else
    ``'tokens'``. Decided by following the contracted axis of q and of k back to their projection (linear,
    addmm, matmul with a weight, convolution): its output-feature axis means token attention, any other axis
    channel attention. Where the walk cannot tell (q/k handed in from outside, an operation it does not
    follow, for q or for k), the site is taken for token attention, as before: both walks must say channels."""
    origins = {axis_origin(site.q, -2 if site.q_stored_transposed else -1),
               axis_origin(site.k, -2 if site.k_stored_transposed else -1)}
    return "channels" if origins == {"tokens"} else "tokens"


def axis_origin(node: Any, axis: int, depth: int = 64) -> Optional[str]:
    """Follow ``axis`` of node back to the projection that made it: 'features' for the projection's output
    feature axis, 'tokens' for another of its axes, None where the walk stops before one."""
    cur, ax = node, axis
    for _ in range(depth):
        if not isinstance(cur, fx.Node):
            return None
        rank = g.ndim(cur)
        if rank <= 0 or not -rank <= ax < rank:
            return None
        ax %= rank
        projection = projection_kind(cur)
        if projection is not None:
            feature_axis = rank - 1 if projection == "linear" else 1
            return "features" if ax == feature_axis else "tokens"
        step = axis_input(cur, ax, rank)
        if step is None:
            return None
        cur, ax = step
    return None


def projection_kind(node: fx.Node) -> Optional[str]:
    """'linear' (features on the last axis) or 'conv' (features on axis 1) for a projection node, else None."""
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        if isinstance(module, torch.nn.Linear):
            return "linear"
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            return "conv"
        return None
    if g.is_call(node, _LINEAR_FUNCTIONS + (torch.addmm,)):
        return "linear"
    if g.is_call(node, _CONV_FUNCTIONS):
        return "conv"
    if g.is_matmul(node) and len(node.args) >= 2:
        # activations [..., N, C] @ weight [C, C'] (a parameter: get_attr, or a placeholder where Dynamo lifted it)
        weight = node.args[1]
        if isinstance(weight, fx.Node) and g.ndim(weight) == 2 and (
                weight.op == "get_attr" or (weight.op == "placeholder" and g.ndim(node.args[0]) >= 3)):
            return "linear"
    return None


# ------------------------------------------------------------------------------------------ the rules


@dataclass(frozen=True)
class AxisRule:
    """One kind of op the axis walk goes through: ``step(node, ax, rank)`` for the first rule that matches."""

    name: str
    matches: Callable[[fx.Node], bool]
    step: Callable[[fx.Node, int, int], AxisInput]


def _through_reshape(node: fx.Node, ax: int, rank: int) -> AxisInput:
    src = node.args[0]
    before = g.shape(src)
    mapped = reshape_axis(before, g.shape(node), ax) if before is not None else None
    return (src, mapped) if mapped is not None else None


def _through_permute(node: fx.Node, ax: int, rank: int) -> AxisInput:
    dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
    ok = len(dims) == rank and all(isinstance(d, int) for d in dims)
    return (node.args[0], dims[ax] % rank) if ok else None


def _through_last_two_swap(node: fx.Node, ax: int, rank: int) -> AxisInput:
    swap = {rank - 1: rank - 2, rank - 2: rank - 1}
    return g.transposed_last_two(node), swap.get(ax, ax)


def _through_transpose(node: fx.Node, ax: int, rank: int) -> AxisInput:
    d0, d1 = node.args[1:3] if len(node.args) >= 3 else (None, None)
    if not isinstance(d0, int) or not isinstance(d1, int):
        return None
    d0, d1 = d0 % rank, d1 % rank
    return node.args[0], {d0: d1, d1: d0}.get(ax, ax)


def _through_unsqueeze(node: fx.Node, ax: int, rank: int) -> AxisInput:
    d = node.args[1] if len(node.args) > 1 else None
    if not isinstance(d, int) or d % rank == ax:
        return None
    return node.args[0], ax if ax < d % rank else ax - 1


def _is_split_part(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem and isinstance(
        g.val(node.args[0]), (tuple, list))


def _through_split_part(node: fx.Node, ax: int, rank: int) -> AxisInput:
    """``parts[i]`` of a split (same axes) or an unbind (one axis fewer)."""
    src = node.args[0]
    if not isinstance(src, fx.Node) or not src.args:
        return None
    whole = src.args[0]
    if g.is_call(src, (torch.unbind,), {"unbind"}):
        dim = g.arg(src, 1, "dim", 0)
        if not isinstance(dim, int):
            return None
        dim %= rank + 1
        return whole, ax if ax < dim else ax + 1
    if g.is_call(src, (torch.split, torch.chunk, torch.tensor_split), _SAME_AXIS_SPLITS):
        return whole, ax
    return None


def _through_index(node: fx.Node, ax: int, rank: int) -> AxisInput:
    """``x[index]`` with ints, slices, None and Ellipsis (advanced indexing stops the walk)."""
    src, index = node.args[0], node.args[1]
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (fx.Node, torch.Tensor, list, bool)) for i in items):
        return None
    out_axis = in_axis = 0
    for i in _full_index(items, g.ndim(src)):
        if isinstance(i, int):  # the input axis is indexed away
            in_axis += 1
            continue
        if out_axis == ax:  # None makes a new axis (no input axis); a slice keeps one
            return (src, in_axis) if i is not None else None
        out_axis += 1
        in_axis += i is not None
    return None


def _full_index(items: tuple, in_rank: int) -> list:
    """The basic index ``items`` with ``...`` written out and trailing ``:`` added up to ``in_rank`` axes."""
    explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
    full: list = []
    for i in items:
        full.extend([slice(None)] * (in_rank - explicit) if i is Ellipsis else [i])
    return full + [slice(None)] * (in_rank - sum(1 for i in full if i is not None))


def _through_product(node: fx.Node, ax: int, rank: int) -> AxisInput:
    a, b = node.args[:2]
    if ax == rank - 1:
        return b, -1
    return a, ax - rank  # rows and batch axes come from the left operand


def _through_cat(node: fx.Node, ax: int, rank: int) -> AxisInput:
    src = node.args[0]
    first = src[0] if isinstance(src, (list, tuple)) and src else None
    return (first, ax) if isinstance(first, fx.Node) and g.ndim(first) == rank else None


def _through_expand(node: fx.Node, ax: int, rank: int) -> AxisInput:
    return (node.args[0], ax) if g.ndim(node.args[0]) == rank else None


def _through_same_shape(node: fx.Node, ax: int, rank: int) -> AxisInput:
    out = g.tensor_val(node)
    for operand in list(node.args) + list(node.kwargs.values()):
        t = g.tensor_val(operand) if isinstance(operand, fx.Node) else None
        if t is not None and out is not None and t.shape == out.shape and t.dtype.is_floating_point:
            return operand, ax
    return None


AXIS_RULES: tuple[AxisRule, ...] = (
    # `x.view(B, N, H, D)`, `flatten(2)`: heads split from features, a conv's H and W flattened into tokens
    AxisRule("reshape", lambda n: g.is_call(n, (torch.reshape, torch.flatten, torch.unflatten),
                                            g.VIEW_METHODS | {"flatten", "unflatten"}), _through_reshape),
    # `x.permute(0, 2, 1, 3)`: [B, N, H, D] to [B, H, N, D]
    AxisRule("permute", lambda n: g.is_call(n, (torch.permute,), {"permute"}), _through_permute),
    # `k.transpose(-2, -1)`, `k.mT`
    AxisRule("last_two_swap", lambda n: g.transposed_last_two(n) is not None, _through_last_two_swap),
    # `x.transpose(1, 2)`: any other pair of axes
    AxisRule("transpose", lambda n: g.is_call(n, (torch.transpose, torch.swapaxes, torch.swapdims),
                                              {"transpose", "swapaxes", "swapdims"}), _through_transpose),
    # `x.unsqueeze(1)`
    AxisRule("unsqueeze", lambda n: g.is_call(n, (torch.unsqueeze,), {"unsqueeze"}), _through_unsqueeze),
    # `q, k, v = qkv.unbind(0)` (ViT), `qkv.chunk(3, dim=-1)`
    AxisRule("split_part", _is_split_part, _through_split_part),
    # `qkv[0]`, `x[:, :, None]`, `x[..., :d]`
    AxisRule("index", lambda n: n.op == "call_function" and n.target is operator.getitem, _through_index),
    # a product with a non-weight operand: rows and batch axes from the left, columns from the right
    AxisRule("product", lambda n: g.is_matmul(n) and len(n.args) >= 2, _through_product),
    # `torch.cat([past_k, k], dim=-2)`: a KV cache
    AxisRule("concatenation", lambda n: g.is_call(n, _CAT), _through_cat),
    # `k.expand(B, H, N, D)`
    AxisRule("expand", lambda n: g.is_call(n, (), {"expand", "expand_as"}), _through_expand),
    # elementwise and shape-keeping ops (casts, normalize, layer norm, dropout, scaling, rotary embeddings): the
    # same axis of the operand that already has the output's shape
    AxisRule("same_shape", lambda n: True, _through_same_shape),
)


def axis_input(node: fx.Node, ax: int, rank: int) -> AxisInput:
    """The input node and its axis that axis ``ax`` of node's output (of ``rank`` axes) comes from, or None."""
    if node.op not in ("call_function", "call_method", "call_module") or not node.args:
        return None
    rule = next(r for r in AXIS_RULES if r.matches(node))
    return rule.step(node, ax, rank)


def reshape_axis(before: tuple, after: tuple, ax: int) -> Optional[int]:
    """The axis of ``before`` that axis ``ax`` of ``after`` comes from in a reshape (the outermost where it
    merges several); None for a new size-1 axis or where sizes are symbolic."""
    if not all(isinstance(s, int) and s > 0 for s in (*before, *after)):
        return None
    i = j = 0
    while j < len(after):
        i0, j0 = i, j
        i, j = _next_group(before, after, i, j)
        if j is None:
            return None
        if j0 <= ax < j:
            return _group_source(before, after, ax, i0, i, j)
    return None


def _next_group(before: tuple, after: tuple, i: int, j: int) -> tuple[int, Optional[int]]:
    """The ends ``(i, j)`` of the smallest group of axes from ``before[i]`` and ``after[j]`` on with the same
    number of elements; j is None when the shapes do not split into such groups."""
    size_before = before[i] if i < len(before) else 1
    size_after = after[j]
    i, j = i + 1, j + 1
    while size_before != size_after:
        if size_before < size_after:
            if i >= len(before):
                return i, None
            size_before *= before[i]
            i += 1
        else:
            if j >= len(after):
                return i, None
            size_after *= after[j]
            j += 1
    return i, j


def _group_source(before: tuple, after: tuple, ax: int, i0: int, i: int, j: int) -> Optional[int]:
    """The input axis that output axis ``ax`` comes from, in the group of input axes ``[i0, i)`` that makes the
    group of output axes ending at ``j``.

    The axis is one input axis, a part of one (heads split from features), or several merged into one (a
    conv's H and W flattened into tokens): the outermost input axis whose elements it spans stands for it.
    Spans are element strides within the group, so a group that merges and splits at once ([N, B, E] viewed as
    [N, B*H, D]: D is part of E, not of B) maps each axis to the right input axis."""
    if after[ax] == 1:
        return None
    low = math.prod(after[ax + 1:j])
    high = low * after[ax]
    sources = [d for d in range(i0, min(i, len(before)))
               if before[d] != 1 and _spans_overlap(math.prod(before[d + 1:i]), before[d], low, high)]
    return sources[0] if sources else None


def _spans_overlap(stride: int, size: int, low: int, high: int) -> bool:
    """Whether an axis of ``size`` elements at ``stride`` covers any of the element strides ``[low, high)``."""
    return stride < high and low < stride * size
