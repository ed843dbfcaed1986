"""The score chain: from a softmax back to the product ``q @ k^T``, as an ordered table of rules.

Each op between the product and the softmax is read by the first rule of :data:`SCORE_RULES` whose predicate
holds. Its handler returns a :class:`Back`: the node that carries the scores into the op, and the score steps
(``site.ScoreStep``) and q multipliers the op stands for; or it raises :class:`NotCarried` when the op is
spelled in a way attncc does not carry. The walk (:func:`walk_scores`) collects what the handlers return and
which rules applied; an op no rule reads, or one a handler refuses, declines the site when its operands come
from a product (it is attention), and otherwise ends the walk with nothing (a softmax over something else).

The same idea as tinygrad's ``PatternMatcher([(UPat, fn), ...])`` and Inductor's pattern table with
``extra_check``: a new spelling is a new row here and a test in ``tests/passes/test_detect_rules.py``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from attncc.passes import graph_ops as g
from attncc.passes.detect.decline import Decline, describe_uses, op_name
from attncc.passes.detect.reading import chain_operand, const_value, is_scalar_like, reaches_product, value_users
from attncc.passes.effects import written_nodes
from attncc.passes.sink_logits import cat_parts
from attncc.site import ScoreStep


@dataclass(frozen=True)
class Back:
    """What one op of the score chain stands for, read from the softmax side."""

    scores: fx.Node
    """The node that carries the scores into the op."""
    steps: tuple[ScoreStep, ...] = ()
    """The score steps the op applies (none for a cast, or for a constant added to every score)."""
    q_multipliers: tuple[tuple[str, fx.Node], ...] = ()
    """``('mul'|'div', tensor)`` factors of the scores that move onto q."""


class NotCarried(Exception):
    """Raised by a rule's handler: the op is spelled in a way attncc does not carry (reason None: say which op)."""

    def __init__(self, reason: Optional[str] = None):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Rule:
    """One spelling of one score-chain op: ``step(node)`` is called for the first rule whose ``matches(node)``."""

    name: str
    matches: Callable[[fx.Node], bool]
    step: Callable[[fx.Node], Back]


# ------------------------------------------------------------------------------------------ operands


@dataclass(frozen=True)
class _Binary:
    """``scores (op) other`` for a multiplication/division or an addition/subtraction."""

    scores: fx.Node
    other: Any
    inverse: bool
    """A division or subtraction (then the scores must be the left operand)."""


_MUL = (g.MUL, {"mul", "__mul__", "mul_"})
_DIV = (g.DIV, {"div", "__truediv__", "div_"})
_ADD = (g.ADD, {"add", "__add__", "add_"})
_SUB = (g.SUB, {"sub", "__sub__", "sub_"})


def _binary(node: fx.Node, forward: tuple, inverse: tuple) -> Optional[_Binary]:
    """The scores and the other operand of ``node``, a call of ``forward`` or ``inverse`` ((functions, method
    names)); None for another op or when it cannot be told which operand carries the scores."""
    is_inverse = g.is_call(node, *inverse)
    if not is_inverse and not g.is_call(node, *forward):
        return None
    i = chain_operand(node, (0,) if is_inverse else (0, 1))
    return None if i is None else _Binary(node.args[i], node.args[1 - i], is_inverse)


def _factor(node: fx.Node) -> Optional[_Binary]:
    """``scores * other`` or ``scores / other`` (true division)."""
    if node.kwargs.get("rounding_mode") is not None:
        return None
    return _binary(node, _MUL, _DIV)


def _constant_factor(node: fx.Node) -> Optional[tuple[_Binary, float]]:
    """``scores * c`` or ``scores / c`` with c known at compile time: the operands and c."""
    f = _factor(node)
    c = const_value(f.other) if f is not None else None
    return (f, c) if c is not None else None


def _term(node: fx.Node) -> Optional[_Binary]:
    """``scores + other`` or ``scores - other`` (alpha 1)."""
    if len(node.args) < 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    return _binary(node, _ADD, _SUB)


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


def _softcap(node: fx.Node) -> Optional[tuple[fx.Node, float]]:
    """``c * tanh(s / c)``: (s, c)."""
    found = _constant_factor(node)
    if found is None or found[0].inverse:
        return None
    inner = _softcap_inner(found[0].scores, found[1])
    return (inner, found[1]) if inner is not None else None


def _is_where(node: fx.Node) -> bool:
    return g.is_call(node, (torch.where,), {"where"}) and len(node.args) == 3


def _is_floor(node: fx.Node) -> bool:
    """``torch.max(s, t)`` / ``torch.maximum`` / ``clamp(s, min=c)`` / ``clamp_min``: a lower bound on s."""
    if _is_max(node):
        return len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], fx.Node) \
            and g.tensor_val(node.args[1]) is not None
    if g.is_call(node, (torch.clamp, torch.clip), {"clamp", "clip"}):
        return g.arg(node, 2, "max") is None and len(node.args) >= 2
    return g.is_call(node, (torch.clamp_min,), {"clamp_min"}) and len(node.args) >= 2


def _is_max(node: fx.Node) -> bool:
    return g.is_call(node, (torch.max, torch.maximum, torch.fmax), {"max", "maximum", "fmax"})


def _is_setitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.setitem and len(node.args) == 3


# ------------------------------------------------------------------------------------------ handlers


def _pass_through(node: fx.Node) -> Back:
    return Back(node.args[0])


def _refuse_rounding(node: fx.Node) -> Back:
    raise NotCarried("the scores are divided with rounding")


def _step_softcap(node: fx.Node) -> Back:
    inner, cap = _softcap(node)
    return Back(inner, (ScoreStep("softcap", value=cap),))


def _step_scale(node: fx.Node) -> Back:
    f, c = _constant_factor(node)
    return Back(f.scores, (ScoreStep("scale", value=(1.0 / c) if f.inverse else c),))


def _step_q_scale(node: fx.Node) -> Back:
    f = _factor(node)
    return Back(f.scores, (ScoreStep("qscale"),), (("div" if f.inverse else "mul", f.other),))


def _refuse_tensor_factor(node: fx.Node) -> Back:
    raise NotCarried("the scores are multiplied by a full tensor")


def _step_constant_term(node: fx.Node) -> Back:
    return Back(_term(node).scores)  # adding a constant to every score does not change the softmax


def _step_bias(node: fx.Node) -> Back:
    t = _term(node)
    return Back(t.scores, (ScoreStep("add", node=t.other, value=-1.0 if t.inverse else 1.0),))


def _step_masked_fill(node: fx.Node) -> Back:
    value = const_value(g.arg(node, 2, "value"))
    if value is None:
        raise NotCarried("masked_fill with a value that is not a compile-time constant")
    return Back(node.args[0], (ScoreStep("fill", node=g.arg(node, 1, "mask"), value=value),))


def _step_index_fill(node: fx.Node) -> Back:
    """``s[m] = v``: masked_fill when m is a bool tensor of the scores' own shape and v a constant."""
    target, index, value = node.args
    c = const_value(value)
    it = g.tensor_val(index) if isinstance(index, fx.Node) else None
    if c is None or it is None or it.dtype != torch.bool or g.shape(index) != g.shape(target):
        raise NotCarried("the scores are assigned to by an index attncc does not read")
    return Back(target, (ScoreStep("fill", node=index, value=c),))


def _where_value(x: Any) -> float:
    value = const_value(x)
    if value is None:
        raise NotCarried("torch.where with a fill value that is not a compile-time constant")
    return value


def _step_where_keep(node: fx.Node) -> Back:
    cond, scores, other = node.args
    return Back(scores, (ScoreStep("keep", node=cond, value=_where_value(other)),))


def _step_where_fill(node: fx.Node) -> Back:
    cond, other, scores = node.args
    return Back(scores, (ScoreStep("fill", node=cond, value=_where_value(other)),))


def _step_floor(node: fx.Node) -> Back:
    """A lower bound on the scores at the lowest finite value of their dtype (OPT and CodeGen clamp
    ``max(s, finfo.min)`` so that rows masked with -inf stay finite) changes only scores that are -inf, to
    that value: a row with any finite score has the same softmax (both give 0 weight there), and a row whose
    every score is -inf is a fully masked row, whose output attncc leaves undefined as for every fully masked
    row (README, Mask structure). So the bound is carried as nothing; a higher bound changes the softmax."""
    i = chain_operand(node, (0, 1) if _is_max(node) else (0,))
    if i is None:
        raise NotCarried()
    chain, floor = node.args[i], const_value(node.args[1 - i])
    scores = g.tensor_val(chain)
    if floor is None:
        raise NotCarried("the scores are clamped below by a value that is not a compile-time constant")
    if scores is None or not scores.dtype.is_floating_point or floor > torch.finfo(scores.dtype).min:
        raise NotCarried(f"the scores are clamped below at {floor:g} (only a clamp at the dtype's lowest value "
                         "leaves the softmax unchanged)")
    return Back(chain)


def _step_reshape(node: fx.Node) -> Back:
    src = node.args[0]
    before, after = g.shape(src), g.shape(node)
    if before is None or after is None or len(before) < 2 or len(after) < 2 or before[-2:] != after[-2:]:
        raise NotCarried("the scores are reshaped across their query/key axes")
    return Back(src, (ScoreStep("reshape", node=node),))


def _refuse_concatenation(node: fx.Node) -> Back:
    raise NotCarried("the scores are concatenated with another block before further score operations (only a "
                     "learned sink column right before the softmax is supported)")


# ------------------------------------------------------------------------------------------ the table

SCORE_RULES: tuple[Rule, ...] = (
    # `s.float()` / `.to(q.dtype)` / `.contiguous()` / eval-mode dropout: the values pass unchanged (Llama's upcast)
    Rule("cast", lambda n: g.is_cast(n) or g.is_identity(n), _pass_through),
    # `s // d`, `torch.div(s, d, rounding_mode="floor")`: not a scale; refused
    Rule("rounding_divide", lambda n: (g.is_call(n, *_MUL) or g.is_call(n, *_DIV))
         and n.kwargs.get("rounding_mode") is not None, _refuse_rounding),
    # `cap * torch.tanh(s / cap)`: logit softcapping (Gemma 2, Grok)
    Rule("softcap", lambda n: _softcap(n) is not None, _step_softcap),
    # scale by a Python float or a constant tensor: `scores / math.sqrt(d)` (BERT), `s * d ** -0.5` (ViT)
    Rule("scale", lambda n: _constant_factor(n) is not None, _step_scale),
    # a per-head or per-batch factor, moved onto q: Swin v2's `s * logit_scale.exp()`, a traced `head_dim ** -0.5`
    Rule("q_scale", lambda n: (f := _factor(n)) is not None and is_scalar_like(f.other), _step_q_scale),
    # `s * w` with a full [.., Nq, Nk] tensor: refused
    Rule("tensor_factor", lambda n: _factor(n) is not None, _refuse_tensor_factor),
    # `s + 1.0`: a number added to every score, which the softmax ignores
    Rule("constant_term", lambda n: (t := _term(n)) is not None and not isinstance(t.other, fx.Node)
         and g.scalar_constant(t.other) is not None, _step_constant_term),
    # `s + bias`, `s - m`: relative-position bias (T5, Swin), ALiBi, BERT's extended additive mask
    Rule("bias", lambda n: (t := _term(n)) is not None and isinstance(t.other, fx.Node), _step_bias),
    # `s.masked_fill(~mask, finfo.min)`, also in place (`s.masked_fill_(m, -inf)`): HF encoders, GPT-2 variants
    Rule("masked_fill", lambda n: g.is_call(n, (torch.masked_fill, torch.Tensor.masked_fill),
                                            {"masked_fill", "masked_fill_"}), _step_masked_fill),
    # `s[m] = -inf` (Dynamo records operator.setitem): a masked_fill by a bool index
    Rule("index_fill", _is_setitem, _step_index_fill),
    # `torch.where(mask, s, finfo.min)`: GPT-2's causal buffer
    Rule("where_keep", lambda n: _is_where(n) and reaches_product(n.args[1]) and not reaches_product(n.args[2]),
         _step_where_keep),
    # `torch.where(masked, -inf, s)`: the same with the condition saying where to fill
    Rule("where_fill", lambda n: _is_where(n) and reaches_product(n.args[2]) and not reaches_product(n.args[1]),
         _step_where_fill),
    # `torch.max(s, finfo.min)` / `s.clamp(min=finfo.min)`: OPT and CodeGen keep masked rows finite
    Rule("floor", _is_floor, _step_floor),
    # `s.view(B, H, N, N)` around the mask (BLOOM, Falcon, MPT: [B*H, N, N] scores)
    Rule("reshape", lambda n: g.is_call(n, (torch.reshape,), g.VIEW_METHODS), _step_reshape),
    # `torch.cat([scores, other])` before more score ops: refused (a sink column is read by sink_logits)
    Rule("concatenation", lambda n: cat_parts(n) is not None, _refuse_concatenation),
)


def first_rule(node: fx.Node) -> Optional[Rule]:
    """The first rule of :data:`SCORE_RULES` that reads ``node``, None when none does."""
    return next((rule for rule in SCORE_RULES if rule.matches(node)), None)


# ------------------------------------------------------------------------------------------ the walk


@dataclass(frozen=True)
class ScoreChain:
    """The product the scores come from and what the ops up to the softmax do, in program order."""

    product: fx.Node
    steps: tuple[ScoreStep, ...]
    q_multipliers: tuple[tuple[str, fx.Node], ...]
    rules: tuple[str, ...]
    """The name of the rule that read each op of the chain, in program order."""


def walk_scores(x: fx.Node, softmax: fx.Node) -> Optional[ScoreChain]:
    """Walk back from the softmax input ``x`` to the product of q and k, reading each op by its rule.

    Returns None when ``x`` is not fed by attention scores; raises Decline when it is, in a way attncc does not
    rewrite. Besides the next node of the chain (``reader``), a score tensor may be used by in-place writes that
    nothing uses and that run before the reader: Dynamo and fx record ``s.masked_fill_(m, v); softmax(s)``
    that way. Those are score steps too, applied in program order before the reader.
    """
    read: list[tuple[str, Back]] = []  # collected backwards, reversed at the end
    cur, reader = x, softmax
    while True:
        users = value_users(cur)
        if reader not in users:  # the step skipped nodes (softcap's tanh and divide): no writers there
            reader = users[0] if len(users) == 1 else None
        others = [u for u in users if u is not reader]
        if others:
            writes = _read_writes(cur, reader, others, softmax, read)
            if writes is None:
                return None
            read.extend(writes)
        if g.is_matmul(cur):
            read.reverse()
            return ScoreChain(cur, tuple(s for _, back in read for s in back.steps),
                              tuple(m for _, back in read for m in back.q_multipliers),
                              tuple(name for name, _ in read))
        step = read_op(cur, softmax)
        if step is None:
            return None
        read.append(step)
        cur, reader = step[1].scores, cur


def read_op(node: fx.Node, softmax: fx.Node) -> Optional[tuple[str, Back]]:
    """The rule that reads ``node`` and what it returned; None when node is not a score op of attention
    (no rule, or refused, and nothing from a product flows into it). Raises Decline for attention."""
    rule = first_rule(node)
    try:
        if rule is None:
            raise NotCarried()
        return rule.name, rule.step(node)
    except NotCarried as refused:
        operands = [a for a in node.args if isinstance(a, fx.Node)]
        operands += [x for a in node.args if isinstance(a, (list, tuple)) for x in a if isinstance(x, fx.Node)]
        if any(reaches_product(a, depth=6) for a in operands):
            raise Decline(refused.reason or f"unsupported operation {op_name(node)} between the scores and the "
                          "softmax", softmax, rule.name if rule is not None else "") from None
        return None


def _read_writes(cur: fx.Node, reader: Optional[fx.Node], others: list[fx.Node], softmax: fx.Node,
                 read: list) -> Optional[list[tuple[str, Back]]]:
    """The score steps of unused in-place writes of ``cur`` before ``reader`` (backwards, like the walk); None
    when ``others`` are not only such writes and the softmax is no attention; Decline when it is."""
    writers = _writers_before(cur, reader, others) if reader is not None else None
    if writers is None:
        # also when the first node before the softmax (a scale or bias, no step recorded yet) is the
        # one shared: it is still fed by the product, so this is attention whose scores escape
        if any(back.steps for _, back in read) or g.is_matmul(cur) or reaches_product(cur):
            raise Decline(f"the attention scores are used elsewhere besides the softmax ({describe_uses(others)})",
                          softmax)
        return None
    found = []
    for writer in reversed(writers):
        step = read_op(writer, softmax)
        if step is None:
            return None
        if step[1].scores is not cur:
            raise Decline(f"in-place {op_name(writer)} changes the attention scores in a way attncc does not read",
                          softmax)
        found.append(step)
    return found


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
