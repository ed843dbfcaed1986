"""Dead-code removal that never changes what a graph computes: the one every attncc pass uses.

``fx.Graph.eliminate_dead_code`` removes any node without users that ``Node.is_impure`` does not flag, and
that check knows nothing of ``call_method`` nodes: ``k[..., :n].copy_(a)`` (no users, a write through a view)
is "dead" to it, and the tensor reaches later code uninitialized. Here a node goes only when it has no users
and no side effects (``effects.has_side_effects``), plus one more case: an in-place write whose target is
memory this graph allocated and nothing reads any more (the scores of a rewritten attention that the model
masked with ``scores.masked_fill_(...)``), since keeping such a write would keep the whole computation of
the tensor it writes alive for nothing.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from attncc.passes.effects import Aliases, _is_fresh, _is_inplace_name, _is_view, has_side_effects, written_nodes

_RANDOM_WRITES = {"bernoulli_", "normal_", "uniform_", "random_", "exponential_", "geometric_", "cauchy_",
                  "log_normal_"}


def remove_dead_code(graph: fx.Graph) -> bool:
    """Remove from ``graph`` (in place) every node whose removal cannot change the program; True if any went.

    A node goes when nothing uses its result and it has no side effects, or when it only writes, in place,
    memory allocated inside the graph that no remaining node reads. Graph bodies of higher-order ops (child
    GraphModules the graph reads with ``get_attr``) are cleaned the same way.
    """
    changed = False
    while True:
        changed |= _remove_unused_pure_nodes(graph)
        if not _remove_unread_writes(graph):
            break
        changed = True
    owner = graph.owning_module
    if owner is not None:
        bodies = {n.target for n in graph.nodes if n.op == "get_attr"}
        for name, child in owner.named_children():
            if name in bodies and isinstance(child, fx.GraphModule) and remove_dead_code(child.graph):
                child.recompile()
                changed = True
    return changed


def is_side_effect(node: fx.Node) -> bool:
    """Whether an unused ``node`` must stay: what ``effects.has_side_effects`` says, and any call that returns
    nothing (its recorded value is None, or Dynamo recorded none), which can only be there for its effect
    (Dynamo's ``_vmap_increment_nesting`` ... ``_vmap_decrement_nesting`` around a FlexAttention call)."""
    if has_side_effects(node):
        return True
    if node.op != "call_function" or getattr(node.target, "__module__", None) in ("_operator", "operator"):
        return False  # a method or a Python operator always returns a value: no value recorded means no meta
    return node.meta.get("val", node.meta.get("example_value")) is None


def _remove_unused_pure_nodes(graph: fx.Graph) -> bool:
    removed = False
    for node in reversed(list(graph.nodes)):  # users before their inputs, so chains go in one sweep
        if not node.users and not is_side_effect(node):
            graph.erase_node(node)
            removed = True
    return removed


def _is_plain_write(node: fx.Node) -> bool:
    """An unused in-place write with no effect besides the write itself (no RNG, no module state)."""
    if node.users or node.op not in ("call_function", "call_method"):
        return False
    written = written_nodes(node)
    if not written:
        return False
    if node.op == "call_method":
        return _is_inplace_name(node.target) and node.target not in _RANDOM_WRITES
    target = node.target
    if target is operator.setitem or target in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
        return True
    if node.kwargs.get("inplace") is not None:
        return False  # F.dropout(x, inplace=True) and friends: may draw random numbers
    if getattr(target, "_nondeterministic_seeded", False) or getattr(target, "__name__", "") in _RANDOM_WRITES:
        return False
    return _is_inplace_name(getattr(target, "__name__", "")) or "out" in node.kwargs or isinstance(
        target, torch._ops.OpOverload)


def _remove_unread_writes(graph: fx.Graph) -> bool:
    """Erase unused in-place writes into graph-allocated memory that no node reads; True if any went.

    A write goes when every root of its target (``effects.Aliases``) is a fresh allocation nobody reads. That
    memory can only be reached forward from its allocation: through views and writes (which return aliases
    and pass the question on to their own users); any other use, the graph output included, reads it.
    """
    writes = [n for n in graph.nodes if _is_plain_write(n)]
    if not writes:
        return False
    aliases = Aliases(graph)
    target_roots = {w: frozenset().union(*(aliases.roots(t) for t in written_nodes(w))) for w in writes}
    # only memory the graph allocates itself can be unread; inputs and attributes outlive the call
    fresh = {r for roots in target_roots.values() for r in roots if isinstance(r, fx.Node) and _is_fresh(r)}
    unread = {r for r in fresh if not _is_read(r)}
    removed = False
    for w, roots in target_roots.items():
        if roots and roots <= unread:
            graph.erase_node(w)
            removed = True
    return removed


def _is_read(allocation: fx.Node) -> bool:
    """Whether any node reads the memory ``allocation`` made (looked for forward through views and writes)."""
    seen = {allocation}
    stack = [allocation]
    while stack:
        node = stack.pop()
        for user in node.users:
            passes_on = user.op != "output" and (
                _is_view(user) or (node in (written_nodes(user) or ()) and node not in _other_inputs(user, node)))
            if not passes_on:
                return True
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return False


def _other_inputs(node: fx.Node, target: fx.Node) -> list[fx.Node]:
    """The inputs of ``node`` besides one use of ``target`` as the written argument (``x.add_(x)`` reads x)."""
    inputs = [a for a in node.args if isinstance(a, fx.Node)]
    if inputs and inputs[0] is target and node.kwargs.get("out") is not target:
        inputs = inputs[1:]
    nested = [n for a in node.args if isinstance(a, (tuple, list)) for n in a if isinstance(n, fx.Node)]
    kw = [v for k, v in node.kwargs.items() if isinstance(v, fx.Node) and k != "out"]
    return inputs + nested + kw
