"""The probabilities: from a softmax forward to its product with v, as an ordered table of rules.

The probabilities must have one reader at each step; the first rule of :data:`PROBABILITY_RULES` whose
predicate holds for it returns the walk one step further (or done, at the product with v). A reader no rule
takes declines the site: something is applied to the probabilities that the op would not do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.fx as fx

from attncc.passes import graph_ops as g
from attncc.passes.detect.decline import Decline, describe_uses, op_name
from attncc.passes.detect.reading import value_users
from attncc.passes.effects import written_nodes
from attncc.passes.sink_logits import SinkColumn, key_slice, slice_problem


@dataclass(frozen=True)
class ProbabilityPath:
    """Where the walk from the softmax stands, and what it found on the way."""

    softmax: fx.Node
    node: fx.Node
    """The node that holds the probabilities now."""
    sink: Optional[SinkColumn] = None
    """The learned sink column concatenated to the scores: exactly it must be sliced off on the way."""
    sink_dropped: bool = False
    dropout_p: float = 0.0
    views: tuple[fx.Node, ...] = ()
    """Views of the probabilities that keep their last two axes, in order."""
    output: Optional[fx.Node] = None
    """The product with v, once reached."""
    transposed: bool = False
    """The product is ``v @ p^T`` (channels-first)."""
    rules: tuple[str, ...] = ()
    """The name of the rule that read each step, in order."""

    def decline(self, reason: str) -> Decline:
        return Decline(reason, self.softmax)


@dataclass(frozen=True)
class ProbabilityRule:
    """One kind of reader of the probabilities: ``step(user, path)`` for the first rule whose ``matches`` holds."""

    name: str
    matches: Callable[[fx.Node, ProbabilityPath], bool]
    step: Callable[[fx.Node, ProbabilityPath], ProbabilityPath]


def _sink_kept(u: fx.Node, path: ProbabilityPath) -> bool:
    reaches_v = g.is_matmul(u) or g.transposed_last_two(u) is path.node
    return path.sink is not None and not path.sink_dropped and reaches_v


def _refuse_sink_kept(u: fx.Node, path: ProbabilityPath) -> ProbabilityPath:
    raise path.decline("the learned sink column is not dropped from the probabilities before the product with v")


def _is_product(u: fx.Node, path: ProbabilityPath) -> bool:
    return g.is_matmul(u) and u.args[0] is path.node and u.args[1] is not path.node


def _transposed_product(u: fx.Node, path: ProbabilityPath) -> Optional[fx.Node]:
    """``v @ p.transpose(-2, -1)``: the product, when ``u`` is that transpose."""
    if g.transposed_last_two(u) is not path.node or len(u.users) != 1:
        return None
    w = next(iter(u.users))
    return w if g.is_matmul(w) and w.args[1] is u and w.args[0] is not u else None


def _drop_sink(u: fx.Node, path: ProbabilityPath) -> ProbabilityPath:
    problem = slice_problem(u, path.sink, path.sink_dropped)
    if problem:
        raise path.decline(problem)
    return replace(path, node=u, sink_dropped=True)


def _is_view(u: fx.Node, path: ProbabilityPath) -> bool:
    return g.is_call(u, (torch.reshape,), g.VIEW_METHODS) and u.args[0] is path.node


def _view(u: fx.Node, path: ProbabilityPath) -> ProbabilityPath:
    before, after = g.shape(path.node), g.shape(u)
    if before is None or after is None or len(after) < 2 or tuple(before[-2:]) != tuple(after[-2:]):
        raise path.decline("the attention probabilities are reshaped across their query/key axes")
    return replace(path, node=u, views=path.views + (u,))


def _dropout(u: fx.Node, path: ProbabilityPath) -> ProbabilityPath:
    p = g.dropout_probability(u)
    if math.isnan(p):
        raise path.decline("dropout on the probabilities with a training flag known only at run time")
    return replace(path, node=u, dropout_p=1 - (1 - path.dropout_p) * (1 - p))


PROBABILITY_RULES: tuple[ProbabilityRule, ...] = (
    # gpt-oss: the sink column must go before the product with v (`probs[..., :-1] @ v`); refused otherwise
    ProbabilityRule("sink_kept", _sink_kept, _refuse_sink_kept),
    # `p @ v`, `torch.matmul(p, v)`, `torch.bmm(p, v)`: the end
    ProbabilityRule("product", _is_product, lambda u, path: replace(path, output=u)),
    # `v @ p.transpose(-2, -1)`: channels-first outputs [B, H, Dv, N] (the end)
    ProbabilityRule("transposed_product", lambda u, path: _transposed_product(u, path) is not None,
                    lambda u, path: replace(path, output=_transposed_product(u, path), transposed=True)),
    # gpt-oss: `probs[..., :-1]` drops the learned sink column
    ProbabilityRule("sink_drop", lambda u, path: key_slice(u) is not None, _drop_sink),
    # BLOOM/Falcon/MPT: probabilities [B, H, N, N] viewed back to [B*H, N, N] for the product with v
    ProbabilityRule("view", _is_view, _view),
    # `nn.Dropout` / `F.dropout(p, training=...)` on the probabilities (BERT): carried as the op's dropout_p
    ProbabilityRule("dropout", lambda u, path: g.is_dropout(u), _dropout),
    # `.to(v.dtype)` / `.type_as(q)` after a float32 softmax (Llama), `.contiguous()`
    ProbabilityRule("cast", lambda u, path: g.is_cast(u) or g.is_identity(u), lambda u, path: replace(path, node=u)),
)


def walk_probabilities(softmax: fx.Node, sink: Optional[SinkColumn] = None) -> ProbabilityPath:
    """Follow the probabilities of ``softmax`` to their product with v (``output`` of the result); with a
    learned ``sink`` column, exactly that column must be sliced off on the way. Raises Decline."""
    path = ProbabilityPath(softmax=softmax, node=softmax, sink=sink)
    while path.output is None:
        u = _single_reader(path)
        rule = next((r for r in PROBABILITY_RULES if r.matches(u, path)), None)
        if rule is None:
            raise path.decline(f"operation {op_name(u)} is applied to the attention probabilities")
        path = replace(rule.step(u, path), rules=path.rules + (rule.name,))
    return path


def _single_reader(path: ProbabilityPath) -> fx.Node:
    """The one node that reads the probabilities' values; Decline saying what else reads or changes them."""
    users = value_users(path.node)
    if len(users) == 1:
        return users[0]
    if not users:
        raise path.decline("the attention probabilities are never used")
    changed = [w for w in users if path.node in (written_nodes(w) or ())]
    if changed:
        names = ", ".join(sorted({op_name(w) for w in changed}))
        raise path.decline(f"in-place {names} changes the attention probabilities")
    # several users, none of them the product with v nor the graph output (e.g. renormalization
    # p / p.sum(-1)): say which operations, as for a single such user
    if not any(g.is_matmul(w) or w.op == "output" for w in users):
        names = ", ".join(sorted({op_name(w) for w in users}))
        raise path.decline(f"operations {names} are applied to the attention probabilities")
    raise path.decline(f"the attention probabilities are used elsewhere "
                       f"({describe_uses([w for w in users if not g.is_matmul(w)])})")
