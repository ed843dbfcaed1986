"""Side effects in captured graphs: which nodes write tensors in place, which tensor they write, what may alias.

A captured graph is not purely functional. ``k = x.new_empty(...); k[..., :n].copy_(a)`` is recorded as a
``copy_`` node nobody uses, writing through a ``getitem`` view; Dynamo records ``x[i] = y`` as
``operator.setitem``, ``x += y`` as ``operator.iadd``, ``torch.add(a, b, out=c)`` as a call whose result nobody
reads; and Dynamo lets later code read the tensor *before* an in-place call (``s.masked_fill_(m, v);
softmax(s)`` reads the node ``s``, and the ``masked_fill_`` node has no users). Such a node's effect is only
visible through aliasing, so a pass that removes "unused" nodes or reads a node's value from its definition
must ask this module first.

Aliasing is answered conservatively with *roots*: every tensor value gets the set of places its memory may
come from. A node that surely allocates (a factory, arithmetic, a matrix product ...) is its own root; a view
or anything not known to allocate may share memory with its tensor inputs, so it carries their roots too;
an in-place call returns (an alias of) what it writes; each graph input and each module attribute is a root
of its own. Two values can share memory only if their roots intersect.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, Hashable, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from attncc.util import getattr_path

_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.setitem, operator.delitem,
}
_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
                    "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
                    "__setitem__", "__delitem__"}
_EFFECT_METHODS = {"backward", "retain_grad", "register_hook", "record_stream"}
"""Tensor methods with an effect besides their result that do not follow the trailing-underscore rule."""

# Calls whose result is always a new tensor (never a view or the input itself). Anything not listed is
# assumed to possibly alias its inputs, which is the safe direction for every question asked here.
_FRESH_FUNCTIONS = {
    torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint, torch.randperm,
    torch.arange, torch.linspace, torch.logspace, torch.eye, torch.tensor, torch.scalar_tensor,
    torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like, torch.rand_like, torch.randn_like,
    torch.randint_like, torch.empty_strided, torch.clone, torch.cat, torch.concat, torch.concatenate,
    torch.stack, torch.matmul, torch.bmm, torch.mm, torch.baddbmm, torch.addmm, torch.einsum, torch.outer,
    F.linear, torch._C._nn.linear, torch.softmax, F.softmax, torch.log_softmax, F.log_softmax,
    torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.tanh, torch.sigmoid, torch.abs, torch.neg,
    torch.where, torch.masked_fill, torch.add, torch.sub, torch.mul, torch.div, torch.true_divide,
    torch.pow, torch.tril, torch.triu, torch.cumsum, torch.sum, torch.mean, torch.amax, torch.amin,
    torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge, torch.logical_and, torch.logical_or,
    torch.logical_not, torch.bitwise_and, torch.bitwise_or, torch.bitwise_not, torch.repeat_interleave,
    F.gelu, F.silu, F.layer_norm, F.embedding, F.scaled_dot_product_attention,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
    operator.pow, operator.neg, operator.matmul, operator.and_, operator.or_, operator.xor, operator.invert,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
}
_FRESH_METHODS = {
    "new_empty", "new_zeros", "new_ones", "new_full", "new_tensor", "new_empty_strided", "clone",
    "add", "sub", "mul", "div", "true_divide", "pow", "neg", "matmul", "bmm", "mm", "softmax", "log_softmax",
    "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "abs", "masked_fill", "where", "tril", "triu",
    "cumsum", "sum", "mean", "amax", "amin", "repeat", "repeat_interleave",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "bitwise_not",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "__matmul__", "__rmatmul__", "__neg__", "__pow__", "__and__", "__rand__", "__or__", "__ror__",
    "__invert__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
}


# ------------------------------------------------------------------------------------------------- effects


def _name(target: Any) -> str:
    """A call target's bare name: ``add_`` for ``Tensor.add_``, ``torch.ops.aten.add_`` and ``aten.add_.Tensor``."""
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", "") or ""


def _is_inplace_name(name: str) -> bool:
    """PyTorch's convention: a trailing underscore (``add_``, ``masked_fill_``, ``relu_``) mutates the input."""
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__") and name.strip("_") != "")


_SIGNATURES: dict[Any, Optional[inspect.Signature]] = {}


def _signature(target: Any) -> Optional[inspect.Signature]:
    try:
        if target not in _SIGNATURES:
            try:
                _SIGNATURES[target] = inspect.signature(target)
            except (TypeError, ValueError):
                _SIGNATURES[target] = None
        return _SIGNATURES[target]
    except TypeError:  # unhashable target
        return None


def _is_python_builtin(target: Any) -> bool:
    """``operator.and_`` / ``operator.not_`` follow Python's naming, not PyTorch's trailing-underscore rule."""
    return getattr(target, "__module__", None) in ("_operator", "operator", "builtins")


def _inplace_flag(node: fx.Node) -> bool:
    """``inplace=True`` passed to a Python function that has such a parameter (``F.relu(x, inplace=True)``)."""
    if node.kwargs.get("inplace") is True:
        return True
    target = node.target
    if node.op != "call_function" or not callable(target) or isinstance(target, torch._ops.OpOverload):
        return False
    signature = _signature(target)
    if signature is None or "inplace" not in signature.parameters:
        return False
    try:
        bound = signature.bind(*node.args, **node.kwargs)
    except TypeError:
        return False
    return bound.arguments.get("inplace") is True


def _module(node: fx.Node) -> Optional[nn.Module]:
    owner = node.graph.owning_module
    try:
        return owner.get_submodule(node.target) if owner is not None else None
    except AttributeError:
        return None


def _module_has_effects(node: fx.Node) -> bool:
    module = _module(node)
    if module is None:
        return True  # cannot tell: keep it
    if getattr(module, "_is_impure", False) or getattr(module, "inplace", False) is True:
        return True
    # batch norm in training mode updates its running statistics, a write nobody in the graph reads
    return isinstance(module, nn.modules.batchnorm._NormBase) and module.training and module.track_running_stats


def _out_arg(node: fx.Node) -> Any:
    return node.kwargs.get("out") if node.op in ("call_function", "call_method") else None


def _mutable_schema(target: Any) -> bool:
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = getattr(target, "default", None)
    schema = getattr(target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def written_nodes(node: fx.Node) -> Optional[tuple[fx.Node, ...]]:
    """The graph tensors ``node`` writes in place: ``()`` when it writes none; ``None`` when it writes something
    this module cannot name (an in-place module, an op mutating several or non-leading arguments)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return ()
    first = node.args[0] if node.args else None
    out = _out_arg(node)
    if out is not None:
        return (out,) if isinstance(out, fx.Node) else None
    if node.op == "call_module":
        if getattr(_module(node), "inplace", False) is True:
            return (first,) if isinstance(first, fx.Node) else None
        return None if _module_has_effects(node) else ()
    if node.op == "call_method":
        if _is_inplace_name(node.target):
            return (first,) if isinstance(first, fx.Node) else None
        return ()
    target = node.target
    if target in _INPLACE_OPERATORS or _inplace_flag(node) or (
            _is_inplace_name(_name(target)) and not _is_python_builtin(target)):
        return (first,) if isinstance(first, fx.Node) else None
    if _mutable_schema(target):
        return _schema_written(target, node)
    return ()


def _schema_written(target: Any, node: fx.Node) -> Optional[tuple[fx.Node, ...]]:
    """For an aten op with a mutable schema: the positional arguments its schema marks as written."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = target.default
    written = []
    for position, argument in enumerate(target._schema.arguments):
        info = argument.alias_info
        if info is None or not info.is_write:
            continue
        value = node.args[position] if position < len(node.args) else node.kwargs.get(argument.name)
        if not isinstance(value, fx.Node):
            return None  # a list of tensors (foreach ops) or something we cannot follow
        written.append(value)
    return tuple(written)


def writes(node: fx.Node) -> bool:
    """Whether ``node`` writes any tensor in place (known or not)."""
    w = written_nodes(node)
    return w is None or len(w) > 0


def has_side_effects(node: fx.Node) -> bool:
    """Whether removing ``node`` could change the program even when nothing uses its result.

    True for graph inputs and outputs, in-place writes (``copy_``, ``add_``, any ``Tensor.xxx_``,
    ``operator.setitem`` / ``iadd``, aten ops with a mutable schema, ``out=``, ``inplace=True``), in-place or
    stateful modules, and whatever ``torch.fx.Node.is_impure`` says (asserts, grad-mode switches, random aten ops).
    """
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "get_attr":
        return False
    if node.op == "call_module":
        return _module_has_effects(node)
    if writes(node):
        return True
    if node.op == "call_method":
        return node.target in _EFFECT_METHODS
    return node.is_impure()


# ------------------------------------------------------------------------------------------------- aliasing


def _is_fresh(node: fx.Node) -> bool:
    """Whether ``node`` surely returns newly allocated memory (not a view, not its input)."""
    if node.op == "call_function":
        try:
            return node.target in _FRESH_FUNCTIONS
        except TypeError:  # unhashable target
            return False
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    return False


def _is_scalar_value(node: fx.Node) -> bool:
    """A node whose value is a number or a size (never tensor memory)."""
    value = node.meta.get("val", node.meta.get("example_value"))
    return isinstance(value, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool, torch.Size))


class Aliases:
    """Memoized alias roots of the nodes of one graph (the graph must not change while this is used)."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self._roots: dict[fx.Node, frozenset] = {}
        self._written: Optional[frozenset] = None

    def roots(self, node: Any) -> frozenset:
        """Where ``node``'s memory may come from: fresh allocations, graph inputs and module attributes."""
        if not isinstance(node, fx.Node):
            return frozenset()
        if node in self._roots:
            return self._roots[node]
        # iterative post-order: long chains of views would overflow Python's recursion
        stack = [node]
        while stack:
            cur = stack[-1]
            pending = [p for p in self._sources(cur) if p not in self._roots]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            if cur not in self._roots:
                self._roots[cur] = self._own_roots(cur)
        return self._roots[node]

    def _sources(self, node: fx.Node) -> list[fx.Node]:
        """The nodes whose memory ``node``'s value may share."""
        if node.op in ("placeholder", "get_attr") or _is_scalar_value(node):
            return []
        written = written_nodes(node)
        if written:
            return list(written)
        if _is_fresh(node):
            return []
        return [n for n in node.all_input_nodes if not _is_scalar_value(n)]

    def _own_roots(self, node: fx.Node) -> frozenset:
        if _is_scalar_value(node):
            return frozenset()
        if node.op == "placeholder":
            return frozenset({node})
        if node.op == "get_attr":
            return frozenset({("attr", _attr_identity(node))})
        written = written_nodes(node)
        if written:  # an in-place call returns (a view of) what it wrote
            return frozenset().union(*(self._roots[w] for w in written))
        if _is_fresh(node):
            return frozenset({node})
        # a view, or a call not known to allocate: it may be any of its inputs, or new memory
        own = frozenset({node}) if not _is_view(node) else frozenset()
        return own.union(*(self._roots[n] for n in self._sources(node)))

    def written_roots(self) -> frozenset:
        """The roots of every tensor some node of the graph writes in place (a node writing something it
        does not name makes every input of it count as written)."""
        if self._written is None:
            roots: set[Hashable] = set()
            for node in self.graph.nodes:
                if writes(node):
                    roots |= _written_roots_of(self, node)
            self._written = frozenset(roots)
        return self._written

    def is_written(self, node: Any) -> bool:
        """Whether some in-place write in the graph may change ``node``'s memory (before or after it is read)."""
        written = self.written_roots()
        return bool(written) and bool(self.roots(node) & written)

    def overlap(self, a: Any, b: Any) -> bool:
        return bool(self.roots(a) & self.roots(b))


_VIEW_METHODS = {"view", "view_as", "expand", "expand_as", "transpose", "permute", "unsqueeze", "squeeze",
                 "narrow", "select", "split", "chunk", "unbind", "t", "unflatten", "movedim", "swapaxes",
                 "swapdims", "diagonal", "as_strided", "unfold", "detach", "real", "imag", "__getitem__"}
_VIEW_FUNCTIONS = {operator.getitem, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze, torch.narrow,
                   torch.select, torch.split, torch.chunk, torch.unbind, torch.t, torch.movedim, torch.swapaxes,
                   torch.swapdims, torch.diagonal, torch.as_strided, torch.detach, torch.broadcast_to}


def _is_view(node: fx.Node) -> bool:
    """A call that returns a view of its first input (never new memory): it needs no root of its own."""
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        try:
            return node.target in _VIEW_FUNCTIONS
        except TypeError:
            return False
    return False


def _attr_identity(node: fx.Node) -> Hashable:
    """One root per tensor object: two ``get_attr`` nodes of the same (or a tied) tensor share it."""
    obj: Any = getattr_path(node.graph.owning_module, str(node.target))
    return id(obj) if isinstance(obj, torch.Tensor) else str(node.target)


def tensor_writers(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    """The nodes among ``nodes`` that write a tensor in place."""
    return [n for n in nodes if writes(n)]


def _written_roots_of(aliases: Aliases, node: fx.Node) -> frozenset:
    written = written_nodes(node)
    if written is None:  # writes something it does not name: any input, or its own result
        return frozenset().union(aliases.roots(node), *(aliases.roots(n) for n in node.all_input_nodes))
    return frozenset().union(*(aliases.roots(w) for w in written))


def writes_confined(aliases: Aliases, nodes: set[fx.Node]) -> bool:
    """Whether evaluating ``nodes`` alone (in program order) reproduces their values and touches nothing else:
    no write outside ``nodes`` may change their memory, and each write among them changes only memory that
    one of ``nodes`` allocated (never a graph input or a module's tensor)."""
    inside = frozenset().union(*(aliases.roots(n) for n in nodes))
    for node in aliases.graph.nodes:
        if not writes(node):
            continue
        roots = _written_roots_of(aliases, node)
        if node in nodes:
            if not all(isinstance(r, fx.Node) and r in nodes and _is_fresh(r) for r in roots):
                return False
        elif roots & inside:
            return False
    return True


def may_be_written(node: fx.Node) -> bool:
    """Whether an in-place write anywhere in the graph may change the memory ``node`` holds.

    A local answer for constants read off their definition (``torch.full((), -inf)``, a one-element buffer):
    it follows ``node`` forward through its views, in-place results and every call that may return it, and
    starts from every ``get_attr`` of the same tensor too.
    """
    starts = [node]
    if node.op == "get_attr":
        identity = _attr_identity(node)
        starts += [n for n in node.graph.nodes if n.op == "get_attr" and n is not node
                   and _attr_identity(n) == identity]
    seen = set(starts)
    stack = list(starts)
    while stack:
        current = stack.pop()
        for user in current.users:
            written = written_nodes(user)
            if written is None or current in written:
                return True
            if user not in seen and not _is_fresh(user) and not _is_scalar_value(user):
                seen.add(user)
                stack.append(user)
    return False
