"""Detect: find every attention computation in a canonicalized graph and describe it as an AttentionSite.

Two spellings are matched. ``scaled_dot_product_attention`` calls are read off their arguments. Everything
else is anchored at a softmax: walking back from it through the score chain (casts, scale, biases, masks,
softcapping, reshapes) must reach a matrix product ``A @ B`` (the scores), and walking forward through casts
and dropout must reach a product with the values. What does not fit but clearly is attention is returned as a
RejectedSite with the reason (and logged as a warning); a softmax that is not fed by a product (a router, a
classifier) is ignored. Each site also says which axis its softmax runs over (``axis``: tokens, or feature
channels for cross-covariance attention), found by following the contracted axis back to the projection.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

from attncc.passes import graph_ops as g
from attncc.passes.sink_logits import NotSinkForm, SinkColumn, cat_parts, key_slice, sink_column, slice_problem
from attncc.passes.opaque_attention import opaque_attention_reason
from attncc.passes.effects import Aliases, may_be_written, written_nodes, writes
from attncc.site import AttentionSite, RejectedSite, ScoreStep

INF = float("inf")


class Decline(Exception):
    """Raised inside the matcher when a softmax turns out to be attention that cannot be rewritten."""

    def __init__(self, reason: str, node: Optional[fx.Node] = None):
        super().__init__(reason)
        self.reason = reason
        self.node = node


def detect_sites(gm: fx.GraphModule, graph_index: int = 0) -> tuple[list[AttentionSite], list[RejectedSite]]:
    """All attention sites of ``gm`` in program order, and the near-misses with their reasons.

    ``gm`` must be canonicalized (``passes.canonicalize``) with ``meta['val']`` on every node.
    """
    sites: list[AttentionSite] = []
    rejected: list[RejectedSite] = []
    writes_check = _WritesCheck(gm.graph)
    for node in gm.graph.nodes:
        try:
            if g.is_sdpa(node):
                site = _sdpa_site(node)
            elif g.is_softmax(node):
                site = _explicit_site(node)
            else:
                reason = opaque_attention_reason(node)  # fused kernels, FlexAttention, MHA left whole
                if reason is not None:
                    rejected.append(RejectedSite(_module_of(node), reason, node, graph_index))
                continue
            if site is not None:
                writes_check.check(site, node)
        except Decline as decline:
            anchor = decline.node or node
            rejected.append(RejectedSite(_module_of(anchor), decline.reason, anchor, graph_index))
            continue
        if site is not None:
            site.graph_index = graph_index
            site.kind = "self" if _same_source(site) else "cross"
            site.axis = attention_axis(site)
            sites.append(site)
    return sites, rejected


# ----------------------------------------------------------------------------------------------- helpers


def _module_of(node: fx.Node) -> str:
    return g.module_path(node)


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
        try:
            t = _get_attr(x)
        except AttributeError:
            return None
        if isinstance(t, torch.Tensor) and t.numel() == 1 and not isinstance(t, torch._subclasses.FakeTensor):
            return float(t.item())
    if g.is_cast(x):
        return const_value(x.args[0])
    return None


def _get_attr(node: fx.Node):
    obj = node.graph.owning_module
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_scalar_tensor_like(x: Any) -> bool:
    """A tensor whose last two dims are 1: a per-batch/per-head multiplier that can move from scores to q; or
    a number computed in the graph (``head_dim ** -0.5`` from a traced size)."""
    if isinstance(x, fx.Node) and isinstance(g.val(x), (int, float, torch.SymInt, torch.SymFloat)) \
            and not isinstance(g.val(x), bool):
        return True
    s = g.shape(x)
    return s is not None and (len(s) < 2 or (s[-1] == 1 and s[-2] == 1))


def _reaches_product(node: Any, depth: int = 8) -> bool:
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
    return any(_reaches_product(a, depth - 1) for a in tensor_args[:2])


def _chain_arg(node: fx.Node, candidates) -> Optional[int]:
    """Index among ``candidates`` (arg positions) of the operand carrying the scores; None if ambiguous."""
    hits = [i for i in candidates if i < len(node.args) and _reaches_product(node.args[i])]
    if len(hits) == 1:
        return hits[0]
    if len(hits) == 2:  # both sides come from products (e.g. scores + a bias made by a product): take the wider
        shapes = [g.shape(node.args[i]) for i in hits]
        if shapes[0] is not None and shapes[1] is not None and shapes[0] != shapes[1]:
            return hits[0] if math.prod(map(_as_int, shapes[0])) >= math.prod(map(_as_int, shapes[1])) else hits[1]
        return hits[0]
    return None


def _as_int(x) -> int:
    try:
        return int(x)
    except Exception:
        return 2**31


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return f"module {node.target}"
    return getattr(node.target, "__name__", str(node.target))


# ------------------------------------------------------------------------------------------ score chain


@dataclass
class _Scores:
    product: fx.Node
    steps: list[ScoreStep] = field(default_factory=list)  # program order
    q_multipliers: list[tuple[str, fx.Node]] = field(default_factory=list)  # ('mul'|'div', tensor)


def _walk_scores(x: fx.Node, softmax: fx.Node) -> Optional[_Scores]:
    """Walk back from the softmax input to the product of q and k, recording what happens in between.

    Besides the next node of the chain (``reader``), a score tensor may be used by in-place writes that
    nothing uses and that run before the reader: Dynamo and fx record ``s.masked_fill_(m, v); softmax(s)``
    that way. Those are score steps too, applied in program order before the reader.
    """
    steps: list[ScoreStep] = []
    q_mults: list[tuple[str, fx.Node]] = []
    cur, reader = x, softmax
    while True:
        users = _value_users(cur)
        if reader not in users:  # the step skipped nodes (softcap's tanh and divide): no writers there
            reader = users[0] if len(users) == 1 else None
        others = [u for u in users if u is not reader]
        if others:
            writers = _writers_before(cur, reader, others) if reader is not None else None
            if writers is None:
                # also when the first node before the softmax (a scale or bias, no step recorded yet) is the
                # one shared: it is still fed by the product, so this is attention whose scores escape
                if steps or g.is_matmul(cur) or _reaches_product(cur):
                    raise Decline(f"the attention scores are used elsewhere besides the softmax "
                                  f"({_describe_uses(others)})", softmax)
                return None
            for writer in reversed(writers):  # steps are collected backwards, reversed at the end
                carried = _step_back(writer, steps, q_mults, softmax)
                if carried is None:
                    return None
                if carried is not cur:
                    raise Decline(f"in-place {_op_name(writer)} changes the attention scores in a way attncc "
                                  "does not read", softmax)
        if g.is_matmul(cur):
            steps.reverse()
            q_mults.reverse()
            return _Scores(cur, steps, q_mults)
        cur, reader = _step_back(cur, steps, q_mults, softmax), cur
        if cur is None:
            return None


def _writers_before(cur: fx.Node, reader: fx.Node, others: list[fx.Node]) -> Optional[list[fx.Node]]:
    """``others`` in program order if every one is an unused in-place write of ``cur`` itself that runs
    before ``reader``; None if any is something else (a reader of the scores, or a write after the chain
    moved on, which later aliases of ``cur`` would see)."""
    order: list[fx.Node] = []
    node = cur.next
    while node is not reader and node.op != "root":
        if node in others:
            order.append(node)
        node = node.next
    if len(order) != len(others):
        return None
    if any(w.users or written_nodes(w) != (cur,) for w in order):
        return None
    return order


_METADATA_ATTRIBUTES = {"dtype", "shape", "device", "ndim", "is_cuda", "layout"}


def _value_users(node: fx.Node) -> list[fx.Node]:
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


def _describe_uses(users: list[fx.Node]) -> str:
    """``"also read by Tensor.mean, returned from the graph"``: what else reads the scores (rejection reasons)."""
    names = sorted({"returned from the graph" if u.op == "output" else f"read by {_op_name(u)}" for u in users})
    return "also " + ", ".join(names) if names else "also read elsewhere"


def _step_back(node: fx.Node, steps: list[ScoreStep], q_mults, softmax: fx.Node) -> Optional[fx.Node]:
    """Record the step ``node`` applies to the scores and return the node that carries the scores into it."""
    if g.is_cast(node) or g.is_identity(node):
        return node.args[0]
    if g.is_call(node, g.MUL | g.DIV, {"mul", "div", "__mul__", "__truediv__", "mul_", "div_"}):
        is_div = g.is_call(node, g.DIV, {"div", "__truediv__", "div_"})
        if node.kwargs.get("rounding_mode") is not None:
            return _unsupported(node, softmax, "the scores are divided with rounding")
        i = _chain_arg(node, (0, 1) if not is_div else (0,))
        if i is None:
            return _unsupported(node, softmax)
        other = node.args[1 - i]
        c = const_value(other)
        if c is not None:
            softcap = _softcap_inner(node.args[i], c) if not is_div else None
            if softcap is not None:
                steps.append(ScoreStep("softcap", value=c))
                return softcap
            steps.append(ScoreStep("scale", value=(1.0 / c) if is_div else c))
            return node.args[i]
        if _is_scalar_tensor_like(other):
            q_mults.append(("div" if is_div else "mul", other))
            steps.append(ScoreStep("qscale"))
            return node.args[i]
        return _unsupported(node, softmax, "the scores are multiplied by a full tensor")
    if g.is_call(node, g.ADD | g.SUB, {"add", "sub", "__add__", "__sub__", "add_", "sub_"}):
        is_sub = g.is_call(node, g.SUB, {"sub", "__sub__", "sub_"})
        if len(node.args) < 2 or node.kwargs.get("alpha", 1) != 1:
            return _unsupported(node, softmax)
        i = _chain_arg(node, (0, 1) if not is_sub else (0,))
        if i is None:
            return _unsupported(node, softmax)
        other = node.args[1 - i]
        if not isinstance(other, fx.Node):
            c = g.scalar_constant(other)
            if c is None:
                return _unsupported(node, softmax)
            return node.args[i]  # adding a constant to every score does not change the softmax
        steps.append(ScoreStep("add", node=other, value=-1.0 if is_sub else 1.0))
        return node.args[i]
    if g.is_call(node, (torch.masked_fill, torch.Tensor.masked_fill), {"masked_fill", "masked_fill_"}):
        value = const_value(g.arg(node, 2, "value"))
        if value is None:
            return _unsupported(node, softmax, "masked_fill with a value that is not a compile-time constant")
        steps.append(ScoreStep("fill", node=g.arg(node, 1, "mask"), value=value))
        return node.args[0]
    if node.op == "call_function" and node.target is operator.setitem and len(node.args) == 3:
        # ``s[m] = v`` (Dynamo only): masked_fill when m is a bool tensor of the scores' own shape
        target, index, value = node.args
        c = const_value(value)
        it = g.tensor_val(index) if isinstance(index, fx.Node) else None
        if c is None or it is None or it.dtype != torch.bool or g.shape(index) != g.shape(target):
            return _unsupported(node, softmax, "the scores are assigned to by an index attncc does not read")
        steps.append(ScoreStep("fill", node=index, value=c))
        return target
    if g.is_call(node, (torch.where,), {"where"}) and len(node.args) == 3:
        cond, a, b = node.args
        if _reaches_product(a) and not _reaches_product(b):
            value = const_value(b)
            kind, chain = "keep", a
        elif _reaches_product(b) and not _reaches_product(a):
            value = const_value(a)
            kind, chain = "fill", b
        else:
            return _unsupported(node, softmax)
        if value is None:
            return _unsupported(node, softmax, "torch.where with a fill value that is not a compile-time constant")
        steps.append(ScoreStep(kind, node=cond, value=value))
        return chain
    if _is_floor(node):
        return _step_back_floor(node, softmax)
    if g.is_call(node, (torch.reshape,), g.VIEW_METHODS):
        src = node.args[0]
        before, after = g.shape(src), g.shape(node)
        if before is None or after is None or len(before) < 2 or len(after) < 2 or before[-2:] != after[-2:]:
            return _unsupported(node, softmax, "the scores are reshaped across their query/key axes")
        steps.append(ScoreStep("reshape", node=node))
        return src
    if cat_parts(node) is not None:
        return _unsupported(node, softmax, "the scores are concatenated with another block before further score "
                                           "operations (only a learned sink column right before the softmax is "
                                           "supported)")
    return _unsupported(node, softmax)


def _is_floor(node: fx.Node) -> bool:
    """``torch.max(s, t)`` / ``torch.maximum`` / ``clamp(s, min=c)`` / ``clamp_min``: a lower bound on s."""
    if g.is_call(node, (torch.max, torch.maximum, torch.fmax), {"max", "maximum", "fmax"}):
        return len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], fx.Node) \
            and g.tensor_val(node.args[1]) is not None
    if g.is_call(node, (torch.clamp, torch.clip), {"clamp", "clip"}):
        return g.arg(node, 2, "max") is None and len(node.args) >= 2
    return g.is_call(node, (torch.clamp_min,), {"clamp_min"}) and len(node.args) >= 2


def _step_back_floor(node: fx.Node, softmax: fx.Node) -> Optional[fx.Node]:
    """A lower bound on the scores at the lowest finite value of their dtype (OPT and CodeGen clamp
    ``max(s, finfo.min)`` so that rows masked with -inf stay finite) changes only scores that are -inf, to
    that value: a row with any finite score has the same softmax (both give 0 weight there), and a row whose
    every score is -inf is a fully masked row, whose output attncc leaves undefined as for every fully masked
    row (README, Mask structure). So the bound is carried as nothing; a higher bound changes the softmax."""
    is_max = g.is_call(node, (torch.max, torch.maximum, torch.fmax), {"max", "maximum", "fmax"})
    i = _chain_arg(node, (0, 1) if is_max else (0,))
    if i is None:
        return _unsupported(node, softmax)
    chain, floor = node.args[i], const_value(node.args[1 - i])
    scores = g.tensor_val(chain)
    if floor is None:
        return _unsupported(node, softmax, "the scores are clamped below by a value that is not a compile-time "
                                           "constant")
    if scores is None or not scores.dtype.is_floating_point or floor > torch.finfo(scores.dtype).min:
        return _unsupported(node, softmax, f"the scores are clamped below at {floor:g} (only a clamp at the "
                                           "dtype's lowest value leaves the softmax unchanged)")
    return chain


def _softcap_inner(x: fx.Node, cap: float) -> Optional[fx.Node]:
    """If ``x`` is ``tanh(s / cap)`` (or ``tanh(s * (1/cap))``) with single users, return s."""
    if not (g.is_call(x, (torch.tanh,), {"tanh"}) and len(x.users) == 1):
        return None
    inner = x.args[0]
    if not isinstance(inner, fx.Node) or len(inner.users) != 1:
        return None
    if g.is_call(inner, g.DIV, {"div"}):
        c = const_value(inner.args[1])
        ok = c is not None and math.isclose(c, cap, rel_tol=1e-6)
    elif g.is_call(inner, g.MUL, {"mul"}):
        c = const_value(inner.args[1])
        ok = c is not None and math.isclose(c * cap, 1.0, rel_tol=1e-6)
    else:
        return None
    return inner.args[0] if ok else None


def _unsupported(node: fx.Node, softmax: fx.Node, reason: Optional[str] = None) -> None:
    """A score-chain op attncc does not carry: report it if it is clearly applied to attention scores."""
    operands = [a for a in node.args if isinstance(a, fx.Node)]
    operands += [x for a in node.args if isinstance(a, (list, tuple)) for x in a if isinstance(x, fx.Node)]  # cat
    if any(_reaches_product(a, depth=6) for a in operands):
        raise Decline(reason or f"unsupported operation {_op_name(node)} between the scores and the softmax", softmax)
    return None


# ------------------------------------------------------------------------------------ operand peeling


def _peel_mul_scale(x: fx.Node) -> tuple[fx.Node, float]:
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
        src, reps = x.args[0], g.arg(x, 1, "repeats")
        dim = g.arg(x, 2, "dim")
        if g.ndim(src) == 4 and isinstance(reps, int) and isinstance(dim, int) and dim % 4 == 1:
            return src
        return x
    if not g.is_call(x, (torch.reshape,), g.VIEW_METHODS):
        return x
    expanded = x.args[0]
    if not g.is_call(expanded, (), {"expand"}):
        return x
    inner = expanded.args[0]
    src = None
    if g.is_call(inner, (torch.unsqueeze,), {"unsqueeze"}) and g.arg(inner, 1, "dim") in (2, -3):
        src = inner.args[0]
    elif inner.op == "call_function" and inner.target is operator.getitem:
        index = inner.args[1]
        if isinstance(index, tuple) and len(index) >= 3 and index[2] is None and all(
            i == slice(None) for i in index[:2]
        ) and all(i == slice(None) or i is Ellipsis for i in index[3:]):
            src = inner.args[0]
    if src is None or g.ndim(src) != 4:
        return x
    s_src, s_out = g.shape(src), g.shape(x)
    if s_out is None or len(s_out) != 4 or s_src[0] != s_out[0] or s_src[2:] != s_out[2:]:
        return x
    return src


def _projection_source(x: Any, depth: int = 24) -> Any:
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


def _same_source(site: AttentionSite) -> bool:
    q, k = site.q, site.k
    sq, sk = _projection_source(q), _projection_source(k)
    if sq is sk:
        return True
    both_inputs = all(isinstance(s, fx.Node) and s.op == "placeholder" for s in (sq, sk))
    if both_inputs:  # q and k handed in from outside: only their lengths can tell
        qs, ks = g.shape(q), g.shape(k)
        if not qs or not ks or len(qs) < 2 or len(ks) < 2:
            return False
        # the sequence axis is the last one of a node that holds q^T / k^T (keys stored pre-transposed,
        # channels-first layouts), not dim -2
        return g.same_size(qs[-1] if site.q_stored_transposed else qs[-2],
                           ks[-1] if site.k_stored_transposed else ks[-2])
    return False


# ------------------------------------------------------------------------------------- contracted axis


def attention_axis(site: AttentionSite) -> str:
    """``'channels'`` when ``q @ k^T`` contracts the token axis of the activations q and k were projected from
    (XCiT's cross-covariance attention: q and k are ``[B, H, D, N]``, the scores ``[B, H, D, D]``), else
    ``'tokens'``. Decided by following the contracted axis of q and of k back to their projection (linear,
    addmm, matmul with a weight, convolution): its output-feature axis means token attention, any other axis
    channel attention. Where the walk cannot tell (q/k handed in from outside, an operation it does not
    follow, for q or for k), the site is taken for token attention, as before: both walks must say channels."""
    origins = {_axis_origin(site.q, -2 if site.q_stored_transposed else -1),
               _axis_origin(site.k, -2 if site.k_stored_transposed else -1)}
    return "channels" if origins == {"tokens"} else "tokens"


_LINEAR_FUNCTIONS = (torch._C._nn.linear, torch.nn.functional.linear)
_CONV_FUNCTIONS = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
                   torch.conv1d, torch.conv2d, torch.conv3d)
_SAME_AXIS_SPLITS = {"split", "chunk", "tensor_split", "split_with_sizes"}


def _axis_origin(node: Any, axis: int, depth: int = 64) -> Optional[str]:
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
        projection = _projection_kind(cur)
        if projection is not None:
            feature_axis = rank - 1 if projection == "linear" else 1
            return "features" if ax == feature_axis else "tokens"
        step = _axis_input(cur, ax, rank)
        if step is None:
            return None
        cur, ax = step
    return None


def _projection_kind(node: fx.Node) -> Optional[str]:
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


def _axis_input(node: fx.Node, ax: int, rank: int) -> Optional[tuple[fx.Node, int]]:
    """The input node and its axis that axis ``ax`` of node's output comes from, or None."""
    if node.op not in ("call_function", "call_method", "call_module") or not node.args:
        return None
    src = node.args[0]
    if g.is_call(node, (torch.reshape, torch.flatten, torch.unflatten), g.VIEW_METHODS | {"flatten", "unflatten"}):
        before = g.shape(src)
        mapped = _reshape_axis(before, g.shape(node), ax) if before is not None else None
        return (src, mapped) if mapped is not None else None
    if g.is_call(node, (torch.permute,), {"permute"}):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return (src, dims[ax] % rank) if len(dims) == rank and all(isinstance(d, int) for d in dims) else None
    if g.transposed_last_two(node) is not None:
        swap = {rank - 1: rank - 2, rank - 2: rank - 1}
        return g.transposed_last_two(node), swap.get(ax, ax)
    if g.is_call(node, (torch.transpose, torch.swapaxes, torch.swapdims), {"transpose", "swapaxes", "swapdims"}):
        d0, d1 = node.args[1:3] if len(node.args) >= 3 else (None, None)
        if not isinstance(d0, int) or not isinstance(d1, int):
            return None
        d0, d1 = d0 % rank, d1 % rank
        return src, {d0: d1, d1: d0}.get(ax, ax)
    if g.is_call(node, (torch.unsqueeze,), {"unsqueeze"}):
        d = node.args[1] if len(node.args) > 1 else None
        if not isinstance(d, int) or d % rank == ax:
            return None
        return src, ax if ax < d % rank else ax - 1
    if node.op == "call_function" and node.target is operator.getitem:
        return _getitem_axis_input(node, ax, rank)
    if g.is_matmul(node) and len(node.args) >= 2:
        a, b = node.args[:2]
        if ax == rank - 1:
            return b, -1
        return a, ax - rank  # rows and batch axes come from the left operand
    # elementwise and shape-keeping ops (casts, normalize, layer norm, dropout, scaling, rotary embeddings):
    # the axis is the same axis of the operand that already has the output's shape
    if g.is_call(node, (torch.cat, torch.concat, torch.concatenate)):
        first = src[0] if isinstance(src, (list, tuple)) and src else None
        return (first, ax) if isinstance(first, fx.Node) and g.ndim(first) == rank else None
    if g.is_call(node, (), {"expand", "expand_as"}):
        return (src, ax) if g.ndim(src) == rank else None
    out = g.tensor_val(node)
    for operand in list(node.args) + list(node.kwargs.values()):
        t = g.tensor_val(operand) if isinstance(operand, fx.Node) else None
        if t is not None and out is not None and t.shape == out.shape and t.dtype.is_floating_point:
            return operand, ax
    return None


def _getitem_axis_input(node: fx.Node, ax: int, rank: int) -> Optional[tuple[fx.Node, int]]:
    """``parts[i]`` of a split/unbind, or ``x[index]`` with ints, slices, None and Ellipsis."""
    src, index = node.args[0], node.args[1]
    if isinstance(g.val(src), (tuple, list)):
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
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, fx.Node) or isinstance(i, torch.Tensor) or isinstance(i, (list, bool)) for i in items):
        return None  # advanced indexing
    in_rank = g.ndim(src)
    explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list = []
    for i in items:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (in_rank - explicit))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (in_rank - sum(1 for i in expanded if i is not None)))
    out_axis = in_axis = 0
    for i in expanded:
        if i is None:
            if out_axis == ax:
                return None
            out_axis += 1
        elif isinstance(i, int):
            in_axis += 1
        else:
            if out_axis == ax:
                return src, in_axis
            out_axis += 1
            in_axis += 1
    return None


def _reshape_axis(before: tuple, after: tuple, ax: int) -> Optional[int]:
    """The axis of ``before`` that axis ``ax`` of ``after`` comes from in a reshape (the outermost where it
    merges several); None for a new size-1 axis or where sizes are symbolic."""
    if not all(isinstance(s, int) and s > 0 for s in (*before, *after)):
        return None
    i = j = 0
    while j < len(after):
        i0, j0 = i, j
        size_before = before[i] if i < len(before) else 1
        i += 1
        size_after = after[j]
        j += 1
        while size_before != size_after:
            if size_before < size_after:
                if i >= len(before):
                    return None
                size_before *= before[i]
                i += 1
            else:
                if j >= len(after):
                    return None
                size_after *= after[j]
                j += 1
        if j0 <= ax < j:
            # the axis is one input axis, a part of one (heads split from features), or several merged into one
            # (a conv's H and W flattened into tokens): the outermost input axis whose elements it spans stands
            # for it. Spans are element strides within the group, so a group that merges and splits at once
            # ([N, B, E] viewed as [N, B*H, D]: D is part of E, not of B) maps each axis to the right input axis.
            if after[ax] == 1:
                return None
            low = math.prod(after[ax + 1:j])
            high = low * after[ax]
            sources = [d for d in range(i0, min(i, len(before)))
                       if before[d] != 1 and _spans_overlap(math.prod(before[d + 1:i]), before[d], low, high)]
            return sources[0] if sources else None
    return None


def _spans_overlap(stride: int, size: int, low: int, high: int) -> bool:
    """Whether an axis of ``size`` elements at ``stride`` covers any of the element strides ``[low, high)``."""
    return stride < high and low < stride * size


# ------------------------------------------------------------------------------------------- sites


def _describe(site: AttentionSite) -> AttentionSite:
    """Fill sizes, layout and dtype of a site from its q/k/v values."""
    q, k, v = g.tensor_val(site.q), g.tensor_val(site.k), g.tensor_val(site.v)
    qs = list(q.shape)
    ks = list(k.shape)
    vs = list(v.shape)
    if site.k_stored_transposed:
        ks[-2], ks[-1] = ks[-1], ks[-2]
    if site.v_stored_transposed:
        vs[-2], vs[-1] = vs[-1], vs[-2]
    if site.q_stored_transposed:
        qs[-2], qs[-1] = qs[-1], qs[-2]

    def dim(x):
        return x if isinstance(x, int) else str(x)

    site.q_len, site.head_dim = dim(qs[-2]), dim(qs[-1])
    site.kv_len, site.value_dim = dim(ks[-2]), dim(vs[-1])
    rank = len(qs)
    if rank == 4:
        site.layout, site.batch, site.q_heads, site.kv_heads = "bhnd", dim(qs[0]), dim(qs[1]), dim(ks[1])
    elif rank == 3:
        site.layout, site.batch, site.q_heads, site.kv_heads = "(bh)nd", dim(qs[0]), 1, 1
    else:
        site.layout = f"{rank}-d"
        site.batch = dim(math.prod(qs[:-2])) if all(isinstance(s, int) for s in qs[:-2]) else "?"
    site.dtype = q.dtype
    return site


def _sdpa_site(node: fx.Node) -> AttentionSite:
    q, k, v = (g.arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    attn_mask = g.arg(node, 3, "attn_mask")
    dropout_p = g.arg(node, 4, "dropout_p", 0.0)
    is_causal = g.arg(node, 5, "is_causal", False)
    scale = g.arg(node, 6, "scale", None)
    for name, value in (("dropout_p", dropout_p), ("is_causal", is_causal)):
        if isinstance(value, fx.Node):
            raise Decline(f"scaled_dot_product_attention with a run-time {name}", node)
    q_multipliers = []
    if isinstance(scale, fx.Node):
        # a scale computed in the graph (from a size under fx, a float input under Dynamo): carried on q
        if not isinstance(g.val(scale), (int, float, torch.SymInt, torch.SymFloat)) and not (
                g.tensor_val(scale) is not None and g.tensor_val(scale).numel() == 1):
            raise Decline("scaled_dot_product_attention with a run-time scale that is not a number", node)
        q_multipliers, scale = [("mul", scale)], 1.0
    if scale is None:
        scale = 1.0 / math.sqrt(_as_int(g.shape(q)[-1]))
    site = AttentionSite(
        module=_module_of(node), source="sdpa", q=q, k=peel_repeat_kv(k), v=peel_repeat_kv(v), output=node,
        scale=float(scale), causal=bool(is_causal), dropout_p=float(dropout_p), sdpa_mask=attn_mask,
        q_multipliers=q_multipliers,
    )
    if attn_mask is not None:
        mv = g.tensor_val(attn_mask)
        site.mask_kind = "bool" if mv is not None and mv.dtype == torch.bool else "additive"
    return _describe(site)


def _explicit_site(softmax: fx.Node) -> Optional[AttentionSite]:
    x = softmax.args[0]
    if not isinstance(x, fx.Node) or g.tensor_val(x) is None:
        return None
    sink = _sink_column(x, softmax)
    if sink is not None:
        x = sink.scores
    scores = _walk_scores(x, softmax)
    if scores is None:
        return None
    rank = g.ndim(x)
    dim = g.softmax_dim(softmax)
    if not isinstance(dim, int):
        raise Decline("softmax over a dimension only known at run time", softmax)
    if dim % rank != rank - 1:
        raise Decline(f"softmax is not over the key axis (dim={dim} of a rank-{rank} score tensor)", softmax)
    product = scores.product
    if g.shape(product)[:-2] != g.shape(x)[:-2] and not any(s.kind == "reshape" for s in scores.steps):
        raise Decline("the scores change shape before the softmax", softmax)
    if g.shape(product) != g.shape(x) and g.shape(product)[-2:] != g.shape(x)[-2:]:
        raise Decline("the scores change shape before the softmax", softmax)
    out, transposed, dropout_p, prob_views = _walk_probabilities(softmax, sink)
    if prob_views:
        # BLOOM/Falcon/MPT: scores [B*H, N, N] viewed to [B, H, N, N] for the mask and softmax, probabilities viewed
        # back for the product with v. Softmax works on the last axis, so the view back is the same whether it
        # comes before or after it: carry it as the last score step (the rewrite reshapes the terms with it).
        if g.shape(prob_views[-1]) != g.shape(product):
            raise Decline(f"the attention probabilities are reshaped to {tuple(g.shape(prob_views[-1]))}, not back "
                          f"to the shape of the scores' product {tuple(g.shape(product))}", softmax)
        scores.steps.extend(ScoreStep("reshape", node=view) for view in prob_views)
    elif any(s.kind == "reshape" for s in scores.steps) and g.shape(product) != g.shape(x):
        raise Decline("the scores are reshaped and not restored before the softmax", softmax)

    a, b = product.args[0], product.args[1]
    v_node = out.args[1] if not transposed else out.args[0]

    site = AttentionSite(module=_module_of(product), source="explicit", q=a, k=b, v=v_node, output=out,
                         output_transposed=transposed, dropout_p=dropout_p,
                         sink_logits=sink.logits if sink is not None else None)
    _set_operands(site, a, b, v_node, transposed)
    _set_score_steps(site, scores, softmax)
    return _describe(site)


def _sink_column(x: fx.Node, softmax: fx.Node) -> Optional[SinkColumn]:
    """The learned sink column concatenated to the scores at the softmax input ``x`` (gpt-oss), if any; a
    concatenation of the scores that is not one is declined with the reason."""
    try:
        return sink_column(x, _reaches_product)
    except NotSinkForm as refused:
        raise Decline(refused.reason, softmax) from None


def _walk_probabilities(softmax: fx.Node, sink: Optional[SinkColumn] = None
                        ) -> tuple[fx.Node, bool, float, list[fx.Node]]:
    """Follow the probabilities to their product with v: (that product, channels-first?, dropout p, the views
    of the probabilities on the way that keep their last two axes, in order). With a learned ``sink`` column,
    exactly that column must be sliced off on the way."""
    cur, dropout_p, views = softmax, 0.0, []
    dropped = False  # the sink column was sliced off
    while True:
        users = _value_users(cur)
        if len(users) != 1:
            if not users:
                raise Decline("the attention probabilities are never used", softmax)
            changed = [w for w in users if cur in (written_nodes(w) or ())]
            if changed:
                names = ", ".join(sorted({_op_name(w) for w in changed}))
                raise Decline(f"in-place {names} changes the attention probabilities", softmax)
            # several users, none of them the product with v nor the graph output (e.g. renormalization
            # p / p.sum(-1)): say which operations, as for a single such user below
            if not any(g.is_matmul(w) or w.op == "output" for w in users):
                names = ", ".join(sorted({_op_name(w) for w in users}))
                raise Decline(f"operations {names} are applied to the attention probabilities", softmax)
            raise Decline("the attention probabilities are used elsewhere "
                          f"({_describe_uses([w for w in users if not g.is_matmul(w)])})", softmax)
        u = users[0]
        if sink is not None and not dropped and (g.is_matmul(u) or g.transposed_last_two(u) is cur):
            raise Decline("the learned sink column is not dropped from the probabilities before the product "
                          "with v", softmax)
        if g.is_matmul(u) and u.args[0] is cur and u.args[1] is not cur:
            return u, False, dropout_p, views
        if g.transposed_last_two(u) is cur and len(u.users) == 1:
            w = next(iter(u.users))
            if g.is_matmul(w) and w.args[1] is u and w.args[0] is not u:
                return w, True, dropout_p, views
        if key_slice(u) is not None:  # dropping the learned sink column (gpt-oss: probs[..., :-1])
            problem = slice_problem(u, sink, dropped)
            if problem:
                raise Decline(problem, softmax)
            dropped, cur = True, u
            continue
        if g.is_call(u, (torch.reshape,), g.VIEW_METHODS) and u.args[0] is cur:
            before, after = g.shape(cur), g.shape(u)
            if before is None or after is None or len(after) < 2 or tuple(before[-2:]) != tuple(after[-2:]):
                raise Decline("the attention probabilities are reshaped across their query/key axes", softmax)
            views.append(u)
            cur = u
            continue
        if g.is_dropout(u):
            p = g.dropout_probability(u)
            if math.isnan(p):
                raise Decline("dropout on the probabilities with a training flag known only at run time", softmax)
            dropout_p = 1 - (1 - dropout_p) * (1 - p)
            cur = u
            continue
        if g.is_cast(u) or g.is_identity(u):
            cur = u
            continue
        raise Decline(f"operation {_op_name(u)} is applied to the attention probabilities", softmax)


def _set_operands(site: AttentionSite, a: fx.Node, b: fx.Node, v: fx.Node, transposed: bool) -> None:
    """Choose q/k/v nodes from ``scores = a @ b`` and the value product, folding scale muls and transposes."""
    site.q_stored_transposed = site.k_stored_transposed = site.v_stored_transposed = False
    q, cq = _peel_mul_scale(a)
    src = g.transposed_last_two(q)
    if src is not None and len(q.users) == 1:
        q, site.q_stored_transposed = src, True
    kt, ck = _peel_mul_scale(b)
    k = g.transposed_last_two(kt)
    if k is not None:
        k2, ck2 = _peel_mul_scale(k)
        k, ck = (k2, ck * ck2) if k2 is not k else (k, ck)
    else:
        k, site.k_stored_transposed = kt, True
    site.scale *= cq * ck
    if transposed:
        vv = g.transposed_last_two(v)
        if vv is not None:
            v = vv
        else:
            site.v_stored_transposed = True
    site.q, site.k, site.v = q, peel_repeat_kv(k), peel_repeat_kv(v)


def _set_score_steps(site: AttentionSite, scores: _Scores, softmax: fx.Node) -> None:
    """Fold leading scales into site.scale, find softcapping, keep the rest for the rewrite; reject odd orders."""
    seen_mask = False
    kept: list[ScoreStep] = []
    for step in scores.steps:
        if step.kind == "scale":
            if site.softcap:
                raise Decline("the scores are rescaled after a softcap", softmax)
            if seen_mask:
                # (s + bias) * c == s * c + bias * c: the terms so far take the factor (a mask's -inf stays -inf)
                if not step.value > 0:
                    raise Decline(f"the scores are multiplied by {step.value:g} after a bias or mask (a factor "
                                  "that is not positive turns masked scores into the largest)", softmax)
                for earlier in kept:
                    if earlier.kind in ("add", "fill", "keep"):
                        earlier.value *= step.value
            site.scale *= step.value
        elif step.kind == "qscale":
            if seen_mask or site.softcap:
                raise Decline("the scores are rescaled after a bias, mask or softcap", softmax)
        elif step.kind == "softcap":
            if seen_mask or site.softcap:
                raise Decline("softcapping after a bias or mask is not supported", softmax)
            site.softcap = step.value
        else:
            if step.kind in ("fill", "keep") and not (step.value == -INF or step.value <= -1e4):
                raise Decline(f"masked with the value {step.value} (not a large negative number)", softmax)
            seen_mask = seen_mask or step.kind != "reshape"
            kept.append(step)
    site.steps = kept
    site.q_multipliers = scores.q_multipliers
    kinds = {s.kind for s in kept}
    has_bool = any(s.kind in ("fill", "keep") and s.value == -INF for s in kept)
    has_add = "add" in kinds or any(s.kind in ("fill", "keep") and s.value != -INF for s in kept)
    site.mask_kind = {(False, False): "none", (True, False): "bool", (False, True): "additive",
                      (True, True): "bool+additive"}[(has_bool, has_add)]


# ------------------------------------------------------------------------------------ in-place writes


class _WritesCheck:
    """Refuses a site when an in-place write could make the rewritten op read different values.

    The op is inserted at the site's output and reads q, k, v, the masks and biases there; the model read each
    of them earlier, where the site first consumed it (the score product, a mask step, the projection of q
    ...). A write into the memory of one of those tensors between that first use and the output would be seen
    by the op and not by the model. Writes before the first use (keys assembled by slice assignment, a cache
    updated in place) are seen by both and are fine.
    """

    def __init__(self, graph: fx.Graph):
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.writers = [n for n in graph.nodes if writes(n)]
        self.aliases = Aliases(graph) if self.writers else None

    def check(self, site: AttentionSite, anchor: fx.Node) -> None:
        if not self.writers:
            return
        reads = _values_read(site)
        first = min(self.order[r] for r in reads)
        end = self.order[site.output]
        between = [w for w in self.writers if first < self.order[w] < end]
        if not between:
            return
        consumers = self._consumers_before(site.output, first)
        for r in reads:
            uses = [self.order[u] for u in r.users if u in consumers or _folded_write(u, r, consumers)]
            start = min(uses) if uses else self.order[r]
            for w in between:
                if self.order[w] <= start:
                    continue
                written = written_nodes(w)
                if written is None or any(self.aliases.overlap(t, r) for t in written):
                    raise Decline(f"in-place {_op_name(w)} may change {r.name} after the attention read it and "
                                  "before its output (the rewritten op would read the changed value)", anchor)

    def _consumers_before(self, output: fx.Node, first: int) -> set[fx.Node]:
        """The output and the nodes it is computed from, back to position ``first``."""
        seen = {output}
        stack = [output]
        while stack:
            for n in stack.pop().all_input_nodes:
                if n not in seen and self.order[n] >= first:
                    seen.add(n)
                    stack.append(n)
        return seen


def _folded_write(node: fx.Node, value: fx.Node, consumers: set[fx.Node]) -> bool:
    """Whether ``node`` reads ``value`` as an unused in-place write of a tensor the output is computed from:
    a score step the detector read off a write nobody uses (``s.masked_fill_(m, v)`` reads m where it runs)."""
    written = written_nodes(node) or ()
    return not node.users and value not in written and any(t in consumers for t in written)


def _values_read(site: AttentionSite) -> list[fx.Node]:
    """Every node whose value the rewritten op reads or may read: q, k, v, multipliers, the mask and bias
    nodes, and what those are computed from (mask analysis may hand the op a part of a mask instead)."""
    direct = [site.q, site.k, site.v, *(f for _, f in site.q_multipliers), site.sdpa_mask,
              *(s.node for s in site.steps)]
    reads = [n for n in direct if isinstance(n, fx.Node)]
    masks = [n for n in (site.sdpa_mask, *(s.node for s in site.steps if s.kind != "reshape"))
             if isinstance(n, fx.Node)]
    seen = set(reads)
    while masks:
        for n in masks.pop().all_input_nodes:
            if n not in seen:
                seen.add(n)
                reads.append(n)
                masks.append(n)
    return reads
