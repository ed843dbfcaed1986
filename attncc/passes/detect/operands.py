"""q, k and v of a site: read off the two products, with constant scales, transposes and GQA head repeats
folded away; and whether q and k come from the same activations (self or cross attention)."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from attncc.passes import graph_ops as g
from attncc.passes.detect.reading import const_value


@dataclass(frozen=True)
class Operands:
    """The nodes the op reads as q, k, v, how they are stored, and the scale folded out of them."""

    q: fx.Node
    k: fx.Node
    v: fx.Node
    q_stored_transposed: bool = False
    k_stored_transposed: bool = False
    v_stored_transposed: bool = False
    scale: float = 1.0
    """The product of the constant factors peeled off q and k (``(q * c) @ k^T``)."""


def choose_operands(a: fx.Node, b: fx.Node, v: fx.Node, transposed: bool) -> Operands:
    """q/k/v from ``scores = a @ b`` and the value product (``p @ v``, or ``v @ p^T`` when ``transposed``),
    folding scale muls and transposes."""
    q, cq = peel_mul_scale(a)
    src = g.transposed_last_two(q)
    q_t = src is not None and len(q.users) == 1
    if q_t:
        q = src
    kt, ck = peel_mul_scale(b)
    k = g.transposed_last_two(kt)
    if k is not None:
        k2, ck2 = peel_mul_scale(k)
        k, ck = (k2, ck * ck2) if k2 is not k else (k, ck)
    k_t = k is None
    if k_t:
        k = kt
    vv = g.transposed_last_two(v) if transposed else None
    v_t = transposed and vv is None
    if vv is not None:
        v = vv
    return Operands(q, peel_repeat_kv(k), peel_repeat_kv(v), q_t, k_t, v_t, cq * ck)


def peel_mul_scale(x: fx.Node) -> tuple[fx.Node, float]:
    """``x = y * c`` (or ``y / c``) with a constant c and no other user of x: return (y, c)."""
    if isinstance(x, fx.Node) and len(x.users) == 1 and g.is_call(x, g.MUL | g.DIV, {"mul", "div"}) \
            and x.kwargs.get("rounding_mode") is None:
        is_div = g.is_call(x, g.DIV, {"div"})
        for i in ((0,) if is_div else (0, 1)):
            c = const_value(x.args[1 - i])
            if c is not None and isinstance(x.args[i], fx.Node) and g.shape(x.args[i]) == g.shape(x):
                return x.args[i], (1.0 / c if is_div else c)
    return x, 1.0


def peel_repeat_kv(x: fx.Node) -> fx.Node:
    """``repeat_kv`` (``x[:, :, None].expand(B, Hkv, g, N, D).reshape(B, Hkv*g, N, D)``) or
    ``repeat_interleave(g, dim=1)`` of a 4-D ``x``: return x, which the op reads as grouped heads (GQA)."""
    if g.is_call(x, (torch.repeat_interleave,), {"repeat_interleave"}):
        return _interleaved_source(x) or x
    if not g.is_call(x, (torch.reshape,), g.VIEW_METHODS) or not g.is_call(x.args[0], (), {"expand"}):
        return x
    src = _head_unsqueezed_source(x.args[0].args[0])
    if src is None or g.ndim(src) != 4:
        return x
    s_src, s_out = g.shape(src), g.shape(x)
    if s_out is None or len(s_out) != 4 or s_src[0] != s_out[0] or s_src[2:] != s_out[2:]:
        return x
    return src


def _interleaved_source(x: fx.Node) -> Optional[fx.Node]:
    """``src.repeat_interleave(g, dim=1)`` of a 4-D src: src."""
    src, reps, dim = x.args[0], g.arg(x, 1, "repeats"), g.arg(x, 2, "dim")
    if g.ndim(src) == 4 and isinstance(reps, int) and isinstance(dim, int) and dim % 4 == 1:
        return src
    return None


def _head_unsqueezed_source(inner: Any) -> Optional[fx.Node]:
    """``src.unsqueeze(2)`` or ``src[:, :, None]`` (a new axis after the heads): src."""
    if g.is_call(inner, (torch.unsqueeze,), {"unsqueeze"}) and g.arg(inner, 1, "dim") in (2, -3):
        return inner.args[0]
    if not (isinstance(inner, fx.Node) and inner.op == "call_function" and inner.target is operator.getitem):
        return None
    index = inner.args[1]
    if isinstance(index, tuple) and len(index) >= 3 and index[2] is None and all(
            i == slice(None) for i in index[:2]) and all(i == slice(None) or i is Ellipsis for i in index[3:]):
        return inner.args[0]
    return None


# ------------------------------------------------------------------------------------------ self or cross


def projection_source(x: Any, depth: int = 24) -> Any:
    """The activation a q/k tensor was projected from (the input of the nearest linear/addmm/matmul)."""
    cur = x
    for _ in range(depth):
        if not isinstance(cur, fx.Node) or cur.op in ("placeholder", "get_attr"):
            return cur
        if cur.op == "call_module":
            return cur.args[0] if cur.args else cur
        if g.is_call(cur, (torch._C._nn.linear, torch.nn.functional.linear)):
            return cur.args[0]
        if g.is_call(cur, (torch.addmm,)):
            return cur.args[1]
        if g.is_matmul(cur):
            return cur.args[0]
        if g.is_call(cur, (torch.cat, torch.concat, torch.concatenate)):
            parts = cur.args[0]
            cur = parts[-1] if isinstance(parts, (list, tuple)) and parts else None
            continue
        tensors = [a for a in cur.args if isinstance(a, fx.Node) and isinstance(g.val(a), (torch.Tensor, tuple, list))]
        if not tensors:
            return cur
        cur = tensors[0]
    return cur


def same_source(q: fx.Node, k: fx.Node, q_stored_transposed: bool, k_stored_transposed: bool) -> bool:
    """Whether q and k are projected from the same activations (self attention)."""
    sq, sk = projection_source(q), projection_source(k)
    if sq is sk:
        return True
    both_inputs = all(isinstance(s, fx.Node) and s.op == "placeholder" for s in (sq, sk))
    if not both_inputs:
        return False
    # q and k handed in from outside: only their lengths can tell
    qs, ks = g.shape(q), g.shape(k)
    if not qs or not ks or len(qs) < 2 or len(ks) < 2:
        return False
    # the sequence axis is the last one of a node that holds q^T / k^T (keys stored pre-transposed,
    # channels-first layouts), not dim -2
    return g.same_size(qs[-1] if q_stored_transposed else qs[-2], ks[-1] if k_stored_transposed else ks[-2])
