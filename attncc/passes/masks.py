"""Mask analysis: recover the structure of the masks a model builds, so structured masks skip work exactly.

Models spell masks as tensors: HF transformers 5.x compares index tensors (``kv_idx <= q_idx``, ``kv_idx >
q_idx - window``) and indexes ``attention_mask[batch_idx, kv_idx]``; GPT-style code slices a ``tril`` buffer;
Swin adds a constant ``-100`` mask per window. This pass reads the graph that builds a site's mask and splits
the keep-predicate (True = attend) into an AND of factors:

* index comparisons ``a*j - a*i + c <= 0`` between the key index j and the query index i: a causal bound
  (``j <= i``) or a sliding-window band (``j >= i - left``), carried as ``site.causal`` / ``site.band``;
* comparisons that are always true for valid indices (``q_idx >= 0``): dropped;
* everything else stays a residual bool tensor (``site.keep_nodes``), evaluated exactly as the model does;
  one shaped ``[B, 1, 1, Nk]`` (per key, the same for every query: padding) is cheap to carry, which is what
  ``site.mask_residual`` tells the variants ('padding' vs 'dense').

Masks that do not depend on the inputs at all (buffers, ``arange``/``ones`` constructions) are evaluated once
here, at the captured shapes, and matched against the same structures (causal, band, segments).

Additive masks of the form ``where(keep, 0, c)`` with ``c`` -inf or below ``-1e30`` (HF's ``finfo.min``) are
read as bool masks: ``exp(c - m)`` is exactly 0 in float32/16, so nothing changes except rows masked
everywhere (where the model averages every value uniformly and attncc returns what its variant defines).
Nothing here is a heuristic on values seen at run time: a factor is only taken out when the graph proves it.

How it is organised: ``MaskInterpreter`` reads each node with the first rule of ``MASK_RULES`` (an ordered table of
``MaskRule(name, matches, evaluate)``, one per model spelling) that matches it; ``site_findings`` turns a site's
masks into a frozen ``attncc.site.MaskFacts`` or gives the one reason it keeps them as detected; ``analyze_masks``
returns each site with its facts (``site.with_masks``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Union

import torch
import torch.fx as fx

from attncc.passes import graph_ops as g
from attncc.passes.effects import Aliases, may_be_written, writes_confined
from attncc.site import AttentionSite, MaskFacts
from attncc.util import getattr_path

NEG_LARGE = -1e30
"""Additive fill values at or below this are masks (HF uses finfo(float32).min = -3.4e38)."""


# ------------------------------------------------------------------------------------- abstract values
@dataclass(frozen=True)
class Affine:
    """An integer tensor ``const + sum(coef * index[dim])``; dims are negative (right-aligned broadcasting)."""

    coeffs: tuple[tuple[int, int], ...]
    const: int
    ndim: int

    def terms(self) -> dict[int, int]:
        return dict(self.coeffs)

    @staticmethod
    def of(terms: dict[int, int], const: int, ndim: int) -> "Affine":
        return Affine(tuple(sorted((d, c) for d, c in terms.items() if c != 0)), int(const), ndim)

    def plus(self, other: "Affine", sign: int = 1) -> "Affine":
        terms = self.terms()
        for d, c in other.coeffs:
            terms[d] = terms.get(d, 0) + sign * c
        return Affine.of(terms, self.const + sign * other.const, max(self.ndim, other.ndim))


@dataclass(frozen=True)
class Atom:
    """The predicate ``affine <= 0``, computed by ``node`` (a bool tensor) in the graph."""

    expr: Affine
    node: fx.Node


@dataclass(frozen=True)
class Gathered:
    """``base[idx_0, idx_1, ...]`` where each index is a plain index along one broadcast dim: ``dims[a]`` is the
    (negative) dim of the result that axis ``a`` of ``base`` runs along."""

    base: fx.Node
    dims: tuple[int, ...]


@dataclass(frozen=True)
class Pred:
    """AND of atoms, document labels and residual bool nodes (True = attend); empty: always true.

    ``documents`` holds label tensors ``L`` ``[B, N]`` (input data) meaning ``L[b, i] == L[b, j]``.
    """

    atoms: tuple[Atom, ...] = ()
    residuals: tuple[fx.Node, ...] = ()
    documents: tuple[fx.Node, ...] = ()

    def and_(self, other: "Pred") -> "Pred":
        return Pred(self.atoms + other.atoms, self.residuals + other.residuals, self.documents + other.documents)


Value = Union[Affine, Pred, Gathered, None]

COMPARE = {
    operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt",
    torch.le: "le", torch.lt: "lt", torch.ge: "ge", torch.gt: "gt",
}
COMPARE_METHODS = {"le": "le", "lt": "lt", "ge": "ge", "gt": "gt", "__le__": "le", "__lt__": "lt",
                   "__ge__": "ge", "__gt__": "gt"}
AND_FUNCTIONS = (operator.and_, torch.logical_and, torch.bitwise_and)
AND_METHODS = {"__and__", "logical_and", "bitwise_and", "__rand__"}
PASS_METHODS = {"to", "bool", "expand", "expand_as", "contiguous", "clone"}


class MaskInterpreter:
    """Reads the subgraph that builds a mask as affine index expressions and predicates (memoized).

    Each node is read by the first rule of ``MASK_RULES`` that matches it (``fired`` records which); a node no
    rule reads has no value (None), and a bool node without one stays a residual, evaluated as the model does.
    A node some in-place write may change (``keep = ones(...); keep[:, n:] = False``) is not read from its
    definition: it stays a residual too.
    """

    def __init__(self, aliases: Optional[Aliases] = None):
        self.memo: dict[fx.Node, Value] = {}
        self.fired: dict[fx.Node, str] = {}
        """The name of the rule that computed each node's value (absent: no rule matched, or it is written)."""
        self.aliases = aliases

    def value(self, x) -> Value:
        """The abstract value of a node or constant argument: ``Affine`` (index arithmetic), ``Pred`` (a keep
        predicate), ``Gathered`` (an input tensor indexed by plain indices) or None (not understood)."""
        if isinstance(x, bool):
            return Pred() if x else None
        if isinstance(x, int):
            return Affine((), x, 0)
        if not isinstance(x, fx.Node):
            return None
        if x not in self.memo:
            written = self.aliases is not None and self.aliases.is_written(x)
            self.memo[x] = None if written else self._eval(x)
        return self.memo[x]

    def pred(self, node) -> Pred:
        """The predicate a bool node computes, with what is not understood kept as residual nodes."""
        v = self.value(node)
        if isinstance(v, Pred):
            return v
        return Pred(residuals=(node,))

    def _eval(self, node: fx.Node) -> Value:
        for rule in MASK_RULES:
            if rule.matches(self, node):
                self.fired[node] = rule.name
                return rule.evaluate(self, node)
        return None


# ------------------------------------------------------------------------------------ the rule table
@dataclass(frozen=True)
class MaskRule:
    """One spelling the interpreter reads: the first rule whose ``matches(interp, node)`` holds gives the node's
    value, ``evaluate(interp, node)`` (None where the operands turn out not to be understood)."""

    name: str
    matches: Callable[[MaskInterpreter, fx.Node], bool]
    evaluate: Callable[[MaskInterpreter, fx.Node], Value]


ADD_SUB_FUNCTIONS = (operator.add, torch.add, operator.sub, torch.sub)
ADD_SUB_METHODS = {"add", "sub", "__add__", "__sub__", "__radd__"}


def _is_arange(interp: MaskInterpreter, node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.arange


def _arange(interp: MaskInterpreter, node: fx.Node) -> Value:
    # a traced length (x.size(1)) only sets how far the index runs; the affine form does not depend on it
    args = [g.val(a) if isinstance(a, fx.Node) else a for a in node.args]
    if "start" in node.kwargs or "end" in node.kwargs or "step" in node.kwargs:
        return None
    # a symbolic length (torch.export with a dynamic sequence axis) is a length too; a symbolic start is not read
    if len(args) == 1 and isinstance(args[0], (int, torch.SymInt)):
        return Affine(((-1, 1),), 0, 1)
    if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], (int, torch.SymInt)):
        return Affine(((-1, 1),), args[0], 1)
    return None


def _is_add_sub(interp: MaskInterpreter, node: fx.Node) -> bool:
    return g.is_call(node, ADD_SUB_FUNCTIONS, ADD_SUB_METHODS)


def _add_sub(interp: MaskInterpreter, node: fx.Node) -> Value:
    a, b = interp.value(node.args[0]), interp.value(node.args[1] if len(node.args) > 1 else None)
    if isinstance(a, Affine) and isinstance(b, Affine) and node.kwargs.get("alpha", 1) == 1:
        sub = node.target in (operator.sub, torch.sub) or node.target in ("sub", "__sub__")
        return a.plus(b, -1 if sub else 1)
    return None


def _getitem_parts(interp: MaskInterpreter, node: fx.Node) -> Optional[tuple[Value, tuple]]:
    """(the indexed value, the index as a tuple) of ``base[index]``, or None for another node."""
    if not (node.op == "call_function" and node.target is operator.getitem):
        return None
    base, index = node.args
    return interp.value(base), index if isinstance(index, tuple) else (index,)


def _is_view_index(interp: MaskInterpreter, node: fx.Node) -> bool:
    parts = _getitem_parts(interp, node)
    return parts is not None and isinstance(parts[0], Affine) and all(
        i is None or i == slice(None) or i is Ellipsis for i in parts[1])


def _index_view(interp: MaskInterpreter, node: fx.Node) -> Value:
    v, index = _getitem_parts(interp, node)
    return _index_views(v, index)


def _is_affine_gather(interp: MaskInterpreter, node: fx.Node) -> bool:
    parts = _getitem_parts(interp, node)
    return parts is not None and isinstance(parts[0], Affine) and len(parts[1]) == parts[0].ndim and all(
        isinstance(i, fx.Node) for i in parts[1])


def _affine_gather(interp: MaskInterpreter, node: fx.Node) -> Value:
    """Substitute each index expression for its axis: ``position_ids[batch_idx, q_idx]`` with affine ids."""
    v, index = _getitem_parts(interp, node)
    indices = [interp.value(i) for i in index]
    if not all(isinstance(iv, Affine) for iv in indices):
        return None
    result = Affine((), v.const, max(iv.ndim for iv in indices))
    for axis, iv in enumerate(indices):
        coeff = v.terms().get(axis - v.ndim, 0)
        result = result.plus(Affine.of({d: c * coeff for d, c in iv.coeffs}, iv.const * coeff, iv.ndim))
    return result


def _is_tensor_gather(interp: MaskInterpreter, node: fx.Node) -> bool:
    parts = _getitem_parts(interp, node)
    return parts is not None and parts[0] is None and all(isinstance(i, fx.Node) for i in parts[1])


def _tensor_gather(interp: MaskInterpreter, node: fx.Node) -> Value:
    """``L[batch_idx, kv_idx]``: each index must be one plain index (coefficient 1, no offset) along one dim."""
    dims = []
    for i in _getitem_parts(interp, node)[1]:
        iv = interp.value(i)
        if not isinstance(iv, Affine) or iv.const != 0 or len(iv.coeffs) != 1 or iv.coeffs[0][1] != 1:
            return None
        dims.append(iv.coeffs[0][0])
    return Gathered(node.args[0], tuple(dims))


def _is_unsqueeze(interp: MaskInterpreter, node: fx.Node) -> bool:
    return g.is_call(node, (torch.unsqueeze,), {"unsqueeze"})


def _unsqueeze(interp: MaskInterpreter, node: fx.Node) -> Value:
    base = interp.value(node.args[0])
    if isinstance(base, Affine) and isinstance(node.args[1], int):
        dim = node.args[1] if node.args[1] >= 0 else base.ndim + 1 + node.args[1]
        return _insert_dims(base, [dim])
    return None


def _comparison(node: fx.Node) -> Optional[str]:
    """'le' / 'lt' / 'ge' / 'gt' for an ordering comparison node, else None."""
    if node.op == "call_function":
        return COMPARE.get(node.target)
    if node.op == "call_method":
        return COMPARE_METHODS.get(node.target)
    return None


def _is_compare(interp: MaskInterpreter, node: fx.Node) -> bool:
    return _comparison(node) is not None and len(node.args) == 2


def _compare_atom(interp: MaskInterpreter, node: fx.Node) -> Value:
    a, b = interp.value(node.args[0]), interp.value(node.args[1])
    if isinstance(a, Affine) and isinstance(b, Affine):
        return Pred(atoms=(Atom(_compare(a, b, _comparison(node)), node),))
    return None


def _is_equal(interp: MaskInterpreter, node: fx.Node) -> bool:
    return g.is_call(node, (operator.eq, torch.eq), {"eq", "__eq__"}) and len(node.args) == 2


def _same_document_pred(interp: MaskInterpreter, node: fx.Node) -> Value:
    a, b = interp.value(node.args[0]), interp.value(node.args[1])
    if isinstance(a, Gathered) and isinstance(b, Gathered) and _same_document(a, b):
        return Pred(documents=(a.base,))
    return None


def _is_and(interp: MaskInterpreter, node: fx.Node) -> bool:
    return g.is_call(node, AND_FUNCTIONS, AND_METHODS) and len(node.args) == 2


def _and(interp: MaskInterpreter, node: fx.Node) -> Value:
    return interp.pred(node.args[0]).and_(interp.pred(node.args[1]))


def _is_pass_through(interp: MaskInterpreter, node: fx.Node) -> bool:
    return g.is_call(node, (torch.Tensor.to,), PASS_METHODS) and bool(node.args)


def _pass_through(interp: MaskInterpreter, node: fx.Node) -> Value:
    """A predicate stays one through a cast to bool; an index through a cast between integer dtypes."""
    t, src = g.tensor_val(node), g.tensor_val(node.args[0])
    if t is not None and t.dtype != torch.bool and not _is_int(t):
        return None
    base = interp.value(node.args[0])
    if isinstance(base, Pred) and t is not None and t.dtype == torch.bool:
        return base
    if isinstance(base, Affine) and t is not None and _is_int(t) and src is not None and _is_int(src):
        return base
    return None


def _is_all_true(interp: MaskInterpreter, node: fx.Node) -> bool:
    t = g.tensor_val(node)
    if t is None or t.dtype != torch.bool:
        return False
    return g.is_call(node, (), {"new_ones"}) or (
        node.op == "call_function" and node.target in (torch.ones, torch.ones_like))


def _all_true(interp: MaskInterpreter, node: fx.Node) -> Value:
    return Pred()


MASK_RULES: tuple[MaskRule, ...] = (
    # torch.arange(n): HF transformers 5.x's batch_idx / q_idx / kv_idx and cache_position
    MaskRule("arange", _is_arange, _arange),
    # q_idx - window, kv_idx + offset: HF's sliding-window bound (Mistral, Gemma 2/3), cache offsets
    MaskRule("add_sub", _is_add_sub, _add_sub),
    # q_idx[:, None], arange(n)[None, None, :, None]: broadcasting views of an index (HF, GPT-style code)
    MaskRule("index_view", _is_view_index, _index_view),
    # position_ids[batch_idx, q_idx] with affine position ids (arange expanded over the batch)
    MaskRule("affine_gather", _is_affine_gather, _affine_gather),
    # attention_mask[batch_idx, kv_idx], document_ids[batch_idx, q_idx]: HF's padding and packed sequences
    MaskRule("tensor_gather", _is_tensor_gather, _tensor_gather),
    # arange(n).unsqueeze(0): index views spelled as unsqueeze (older HF code, hand-written causal masks)
    MaskRule("unsqueeze", _is_unsqueeze, _unsqueeze),
    # kv_idx <= q_idx, kv_idx > q_idx - window, q_idx >= 0: HF's causal / sliding / bound checks
    MaskRule("compare", _is_compare, _compare_atom),
    # doc[b, q_idx] == doc[b, kv_idx]: packed-sequence (document) masks
    MaskRule("same_document", _is_equal, _same_document_pred),
    # keep & (kv_idx <= q_idx) & padding: HF's and_masks of the mask functions
    MaskRule("and", _is_and, _and),
    # attention_mask.to(torch.bool), keep.expand(b, -1, n, n), .contiguous(): casts and views of a mask
    MaskRule("pass_through", _is_pass_through, _pass_through),
    # q_idx.new_ones((), dtype=torch.bool), torch.ones(..., dtype=bool): the all-true start of HF's mask
    MaskRule("all_true", _is_all_true, _all_true),
)
"""How the interpreter reads each spelling, tried in order; the first rule that matches a node decides."""


def _same_document(a: Gathered, b: Gathered) -> bool:
    """``L[b, q_idx] == L[b, kv_idx]`` for one 2-D label tensor L (either order)."""
    if a.base is not b.base or len(a.dims) != 2 or a.dims[0] != b.dims[0] or a.dims[0] in (-1, -2):
        return False
    t = g.tensor_val(a.base)
    return t is not None and t.dim() == 2 and {a.dims[1], b.dims[1]} == {-2, -1}


def _is_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _insert_dims(v: Affine, positions: list[int]) -> Affine:
    """Insert size-1 dims at (non-negative) output positions."""
    ndim = v.ndim + len(positions)
    old_positions = [p for p in range(ndim) if p not in positions]
    remap = {old - v.ndim: new - ndim for old, new in zip(range(v.ndim), old_positions)}
    return Affine.of({remap[d]: c for d, c in v.coeffs}, v.const, ndim)


def _index_views(v: Affine, index: tuple) -> Optional[Affine]:
    if sum(i is Ellipsis for i in index) > 1:
        return None
    if Ellipsis in index:
        at = index.index(Ellipsis)
        fill = v.ndim - sum(i is not None for i in index if i is not Ellipsis)
        index = index[:at] + (slice(None),) * fill + index[at + 1:]
    if sum(i is not None for i in index) > v.ndim:
        return None
    index = index + (slice(None),) * (v.ndim - sum(i is not None for i in index))
    positions = [p for p, i in enumerate(index) if i is None]
    return _insert_dims(v, positions)


def _compare(a: Affine, b: Affine, how: str) -> Affine:
    """The affine expression e with ``a <how> b  <=>  e <= 0``."""
    if how == "le":      # a - b <= 0
        expr = a.plus(b, -1)
    elif how == "lt":    # a - b + 1 <= 0 (integers)
        expr = a.plus(b, -1).plus(Affine((), 1, 0))
    elif how == "ge":    # b - a <= 0
        expr = b.plus(a, -1)
    else:                # gt: b - a + 1 <= 0
        expr = b.plus(a, -1).plus(Affine((), 1, 0))
    return expr


# ----------------------------------------------------------------------------------------- structure
@dataclass
class MaskStructure:
    """What a site's masks reduce to: bounds on ``j - i`` plus residual bool tensors."""

    right: Optional[int] = None
    """Keys ``j <= i + right`` (0: causal)."""
    left: Optional[int] = None
    """Keys ``j >= i - left``."""
    residuals: list[fx.Node] = field(default_factory=list)
    documents: list[fx.Node] = field(default_factory=list)
    unexplained: bool = False
    """A constant mask was found that is not a band: no structure can be taken out."""

    def tighten(self, left: Optional[int], right: Optional[int]) -> None:
        """AND the band ``i - left <= j <= i + right`` (None: unbounded on that side) into these bounds."""
        if right is not None:
            self.right = right if self.right is None else min(self.right, right)
        if left is not None:
            self.left = left if self.left is None else min(self.left, left)


def structure_of(pred: Pred) -> MaskStructure:
    """Turn atoms over the query (dim -2) and key (dim -1) indices into bounds on ``j - i``; atoms of any
    other form stay residual (their comparison node is applied as it is)."""
    out = MaskStructure(residuals=list(pred.residuals), documents=list(dict.fromkeys(pred.documents)))
    for atom in pred.atoms:
        terms = atom.expr.terms()
        c = atom.expr.const
        ci, cj = terms.pop(-2, 0), terms.pop(-1, 0)
        if not terms and ci <= 0 and cj <= 0 and c <= 0:
            continue  # -a*i - b*j + c <= 0 holds for every index >= 0 (e.g. q_idx >= 0)
        if not terms and cj == -ci and abs(cj) == 1:
            if cj == 1:   # j - i + c <= 0  ->  j <= i - c
                out.tighten(None, -c)
            else:         # i - j + c <= 0  ->  j >= i + c
                out.tighten(-c, None)
            continue
        out.residuals.append(atom.node)
    return out


# ------------------------------------------------------------------------------------ constant masks
def constant_value(gm: fx.GraphModule, node: fx.Node, max_elements: int = 1 << 26,
                   aliases: Optional[Aliases] = None) -> Optional[torch.Tensor]:
    """Evaluate ``node`` now if it depends on no graph input (only buffers/constants and static shapes) and no
    in-place write outside what builds it can change it (nor does building it write a module's tensors)."""
    t = g.tensor_val(node)
    if t is None or t.numel() > max_elements or any(not isinstance(s, int) for s in t.shape):
        return None
    order: list[fx.Node] = []
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op not in ("call_function", "call_method", "get_attr"):
            return None  # a placeholder (input data, or a Dynamo-lifted parameter that may change)
        if n.op == "call_function" and n.target in (torch.rand, torch.randn, torch.randint, torch.randperm):
            return None
        order.append(n)
        stack.extend(n.all_input_nodes)
    if not writes_confined(aliases or Aliases(gm.graph), seen):
        return None
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in sorted(order, key=_position(gm)):
        env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(env[node])
    try:
        with torch.no_grad():
            value = fx.GraphModule(gm, sub)()
    except Exception:  # constructing it needs something we do not have (device, a dynamic size): leave it
        return None
    return value if isinstance(value, torch.Tensor) else None


BOOL_OP_FUNCTIONS = {operator.eq: "eq", torch.eq: "eq", operator.ne: "ne", torch.ne: "ne",
                     operator.invert: "not", torch.logical_not: "not"}
BOOL_OP_NAMES = {"eq": "eq", "__eq__": "eq", "ne": "ne", "__ne__": "ne", "bool": "bool", "logical_not": "not",
                 "__invert__": "not"}
"""Elementwise ops a sliced buffer mask goes through (``tril[:T, :T] == 0``, ``~mask``, ``.bool()``)."""


def _bool_op(node: fx.Node) -> Optional[str]:
    """'eq' / 'ne' / 'bool' / 'not' for an elementwise bool op of ``node.args[0]``, else None."""
    if node.op == "call_function" and node.target in BOOL_OP_FUNCTIONS:
        return BOOL_OP_FUNCTIONS[node.target]
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return BOOL_OP_NAMES.get(name) if isinstance(name, str) else None


def _apply_bool_op(how: str, base: torch.Tensor, other) -> Optional[torch.Tensor]:
    if how in ("eq", "ne"):  # only against a scalar: anything else is not the same op on the whole buffer
        if not isinstance(other, (int, float, bool)):
            return None
        return base == other if how == "eq" else base != other
    return base.bool() if how == "bool" else ~base.bool()


def _is_top_left_slice(node: fx.Node) -> bool:
    """``x[:, :, :T, :T]`` / ``x[..., :T]`` / ``narrow(d, 0, T)``: a slice that starts at 0 on every dim."""
    if g.is_call(node, (torch.narrow,), {"narrow"}):
        return len(node.args) == 4 and node.args[2] == 0
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return all(i is Ellipsis or (isinstance(i, slice) and i.start in (None, 0) and i.step is None) for i in index)


def sliced_constant(gm: fx.GraphModule, node, aliases: Optional[Aliases] = None) -> Optional[torch.Tensor]:
    """For a mask that is a top-left slice of a buffer (``tril[:, :, :T, :T]``, ``narrow(2, 0, T)``), possibly
    compared with a scalar or negated, the same expression on the WHOLE buffer; None for anything else.

    A band ``i - left <= j <= i + right`` of the whole buffer is the same band in every top-left slice, so
    structure found on this value holds at every sequence length the graph will see.
    """
    if not isinstance(node, fx.Node):
        return None
    aliases = aliases or Aliases(gm.graph)
    if aliases.is_written(node):  # the buffer or a slice of it changed in place: not what it was built as
        return None
    if node.op == "get_attr":
        value = getattr_path(gm, node.target)
        return value if isinstance(value, torch.Tensor) else None
    if g.is_call(node, (torch.narrow,), {"narrow"}) or (
            node.op == "call_function" and node.target is operator.getitem):
        return sliced_constant(gm, node.args[0], aliases) if _is_top_left_slice(node) else None
    how = _bool_op(node)
    if how is None:
        return None
    base = sliced_constant(gm, node.args[0], aliases)
    if base is None:
        return None
    return _apply_bool_op(how, base, node.args[1] if len(node.args) > 1 else None)


def _position(gm: fx.GraphModule):
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: index[n]


def band_of(keep: torch.Tensor) -> Optional[tuple[Optional[int], Optional[int]]]:
    """``(left, right)`` when a constant ``[..., Nq, Nk]`` keep-mask (leading dims of size 1) is exactly the band
    ``i - left <= j <= i + right`` (None: unbounded on that side); None when it is anything else."""
    if keep.dtype != torch.bool or keep.dim() < 2 or any(s != 1 for s in keep.shape[:-2]):
        return None
    m = keep.reshape(keep.shape[-2:])
    nq, nk = m.shape
    if nq == 0 or nk == 0 or not bool(m.any(dim=1).all()):
        return None
    cols = torch.arange(nk)
    rows = torch.arange(nq)
    first = torch.where(m, cols, nk).min(dim=1).values
    last = torch.where(m, cols, -1).max(dim=1).values
    right_rows = last < nk - 1
    left_rows = first > 0
    right = int((last - rows)[right_rows][0]) if bool(right_rows.any()) else None
    left = int((rows - first)[left_rows][0]) if bool(left_rows.any()) else None
    j, i = cols[None, :], rows[:, None]
    expect = torch.ones(nq, nk, dtype=torch.bool)
    if right is not None:
        expect &= j <= i + right
    if left is not None:
        expect &= j >= i - left
    return (left, right) if bool(torch.equal(expect, m)) else None


# ---------------------------------------------------------------------------------------- the pass
def _large_negative(x) -> bool:
    c = x if isinstance(x, (int, float)) else None
    return c is not None and c <= NEG_LARGE


def _zero(x) -> bool:
    if isinstance(x, (int, float)):
        return x == 0
    t = g.tensor_val(x)
    if isinstance(x, fx.Node) and may_be_written(x):
        return False
    if isinstance(x, fx.Node) and x.op == "get_attr" and x.graph.owning_module is not None:
        value = getattr_path(x.graph.owning_module, x.target)
        return isinstance(value, torch.Tensor) and value.numel() == 1 and float(value) == 0.0
    if isinstance(x, fx.Node) and t is not None and t.numel() == 1 and x.op == "call_function" \
            and x.target in (torch.tensor, torch.zeros, torch.zeros_like) and not x.all_input_nodes:
        args = x.args
        return x.target is not torch.tensor or (len(args) >= 1 and args[0] in (0, 0.0))
    return False


def additive_as_keep(node) -> Optional[fx.Node]:
    """The bool keep-mask of an additive mask ``where(keep, 0, -big)`` / ``where(~keep, -big, 0)`` (as a node
    whose value is True where attending), or None when the term is a real bias."""
    if not g.is_call(node, (torch.where,), {"where"}) or len(node.args) != 3 or may_be_written(node):
        return None
    cond, a, b = node.args
    if g.tensor_val(cond) is None or g.tensor_val(cond).dtype != torch.bool:
        return None
    if _zero(a) and _large_negative(b):
        return cond
    return None


def analyze_masks(gm: fx.GraphModule, sites: list[AttentionSite]) -> list[AttentionSite]:
    """The sites with the structure of their masks recovered (``site.with_masks``); the given ones are unchanged.

    After it, a site's masks are: ``site.causal``, ``site.band``, the bool ``site.keep_nodes`` (ANDed) and
    whatever bias/fill steps remain in ``site.steps`` (or ``site.sdpa_mask`` when it was not understood).
    """
    interp = MaskInterpreter(Aliases(gm.graph))
    return [site.with_masks(mask_facts(gm, site, interp)) for site in sites]


def mask_facts(gm: fx.GraphModule, site: AttentionSite, interp: MaskInterpreter) -> MaskFacts:
    """What the site's masks are: the structure ``site_findings`` proves, or the masks as detected where it gives
    up; with the summary the variants read (``has_bias``, ``mask_residual``)."""
    found = site_findings(gm, site, interp)
    if not isinstance(found, MaskFacts):
        found = MaskFacts(tuple(site.steps), site.sdpa_mask, site.causal)
    return replace(found, has_bias=_has_bias(found), mask_residual=_residual_kind(found))


def site_findings(gm: fx.GraphModule, site: AttentionSite, interp: MaskInterpreter) -> Union[MaskFacts, str]:
    """What the site's masks reduce to, or why they are kept exactly as detected (the one way to give up)."""
    if any(step.kind == "reshape" for step in site.steps):
        windows = window_segments(gm, site.steps, interp.aliases)
        if windows is None:
            return "the scores are reshaped around something other than Swin's window mask"
        steps, labels, fill = windows
        return MaskFacts(tuple(steps), site.sdpa_mask, site.causal, segments=True, segment_labels=labels,
                         segment_fill=fill)
    sdpa_keep, sdpa_mask = _sdpa_keep(site.sdpa_mask)
    steps, terms = _partition(site.steps, lambda step: _keep_term(gm, step, interp.aliases))
    terms = ([sdpa_keep] if sdpa_keep is not None else []) + terms
    structure, residuals = _structure_of_terms(gm, terms, interp)
    reason = _unstructured(structure, site)
    if reason is not None:
        return reason
    causal = structure.right == 0
    band = (structure.left, 0) if causal and structure.left is not None else None
    document = structure.documents[0] if structure.documents else None
    return MaskFacts(tuple(steps), sdpa_mask, site.causal or causal, band, segments=document is not None,
                     segment_labels=document, keep_nodes=tuple(residuals))


def _partition(items, read: Callable) -> tuple[list, list]:
    """(the items ``read`` gives None for, the values it gives for the others), each in order."""
    kept, read_values = [], []
    for item in items:
        value = read(item)
        if value is None:
            kept.append(item)
        else:
            read_values.append(value)
    return kept, read_values


def _sdpa_keep(mask) -> tuple[Optional[fx.Node], Optional[fx.Node]]:
    """(the keep-mask an SDPA ``attn_mask`` is, the attn_mask left): a bool mask, or an additive one that is a
    bool mask in disguise (``where(keep, 0, -inf)``), becomes a keep term; a real bias stays."""
    if mask is None:
        return None, None
    keep = mask if _bool(mask) else additive_as_keep(mask)
    return (keep, None) if keep is not None else (None, mask)


def _structure_of_terms(gm: fx.GraphModule, terms: list, interp: MaskInterpreter):
    """(MaskStructure of the AND of the keep terms with constant bands folded in, the residual bool nodes).

    A constant residual (a buffer, a slice of one) is evaluated here and read as a band; one that is not a band
    sets ``structure.unexplained``."""
    pred = Pred()
    constants: list[torch.Tensor] = []
    for term in terms:
        if isinstance(term, tuple):
            constants.append(term[1])
        else:
            pred = pred.and_(interp.pred(term))
    structure = structure_of(pred)
    residuals, evaluated = _partition(structure.residuals, lambda node: _constant_keep(gm, node, interp.aliases))
    for value in constants + evaluated:
        band = band_of(value)
        if band is None:
            structure.unexplained = True
            break
        structure.tighten(*band)
    return structure, residuals


def _constant_keep(gm: fx.GraphModule, node: fx.Node, aliases: Optional[Aliases]) -> Optional[torch.Tensor]:
    """The value of a bool mask the inputs do not change: evaluated whole, or (a top-left slice of a buffer)
    the whole buffer when that is a band; None otherwise."""
    value = constant_value(gm, node, aliases=aliases)
    if value is None or value.dtype != torch.bool:
        whole = sliced_constant(gm, node, aliases)
        value = whole.bool() if whole is not None and band_of(whole.bool()) is not None else None
    return value if value is not None and value.dtype == torch.bool else None


def _unstructured(structure: MaskStructure, site: AttentionSite) -> Optional[str]:
    """Why the structure found cannot be carried (the tensors are kept as the model computes them), or None."""
    if structure.unexplained:
        return "a constant mask that is not a band"
    if structure.right is not None and structure.right != 0 or (structure.right is None and structure.left is not None):
        return "a band not anchored at the diagonal"
    if structure.left is not None and site.q_len != site.kv_len:
        # the bounds are in query-index terms (top-left); a window is carried bottom-right aligned for fewer
        # queries than keys (``attncc.variants.local``), so the tensors stay exact as the model computes them
        return "a window over fewer queries than keys"
    if len(structure.documents) > 1 or (structure.documents and site.q_len != site.kv_len):
        return "several document labels, or documents between sequences of different lengths"
    return None


def window_segments(gm: fx.GraphModule, steps: list,
                    aliases: Optional[Aliases] = None) -> Optional[tuple[list, torch.Tensor, float]]:
    """Swin's shifted-window mask: ``scores.view(B, nW, H, N, N) + mask[nW, 1, N, N]`` then back to
    ``[B*nW, H, N, N]``, where ``mask`` is a constant that is 0 between tokens of the same region and one fill
    value (timm: -100) between regions. Returns (the other steps, region labels ``[nW, N]``, fill value), or
    None when the steps are anything else.
    """
    grouped = _window_grouping(steps)
    if grouped is None:
        return None
    mask = constant_value(gm, steps[-2].node, aliases=aliases)
    while mask is not None and mask.dim() > 4 and mask.shape[0] == 1:
        mask = mask[0]
    if mask is None or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != grouped[1] \
            or tuple(mask.shape[-2:]) != tuple(grouped[-2:]):
        return None
    regions = region_labels(mask[:, 0].float())
    return None if regions is None else (steps[:-3], *regions)


def _window_grouping(steps: list) -> Optional[tuple]:
    """The grouped shape ``(B, nW, H, N, N)`` when the steps end in reshape, add (factor 1), reshape back."""
    kinds = [step.kind for step in steps]
    if kinds[-3:] != ["reshape", "add", "reshape"] or "reshape" in kinds[:-3] or steps[-2].value != 1.0:
        return None
    grouped, back = g.shape(steps[-3].node), g.shape(steps[-1].node)
    before = g.shape(steps[-3].node.args[0])
    if grouped is None or back is None or before is None or len(grouped) != 5 or tuple(back) != tuple(before):
        return None
    return grouped


def region_labels(m: torch.Tensor) -> Optional[tuple[torch.Tensor, float]]:
    """For an additive mask ``[nW, N, N]`` that is 0 within regions and one negative fill between them:
    (labels ``[nW, N]``, the first token of each token's region; the fill), else None."""
    fills = torch.unique(m[m != 0])
    if fills.numel() > 1 or (fills.numel() == 1 and float(fills[0]) >= 0):
        return None
    fill = float(fills[0]) if fills.numel() else float("-inf")
    same = m == 0
    n = m.shape[-1]
    labels = torch.where(same, torch.arange(n), n).min(dim=-1).values
    if not torch.equal(labels[:, :, None] == labels[:, None, :], same):
        return None
    return labels, fill


def _keep_term(gm: fx.GraphModule, step, aliases: Optional[Aliases] = None):
    """What a score step contributes as a keep-mask: a bool node (True = attend), ``("constant", tensor)`` for
    a constant mask evaluated here, or None when the step is not a mask (a bias, a small fill value)."""
    if step.kind == "add":
        return additive_as_keep(step.node) if step.value == 1.0 else None
    if step.kind not in ("keep", "fill") or not (step.value == float("-inf") or _large_negative(step.value)):
        return None
    if not _bool(step.node):
        return None
    if step.kind == "keep":
        return step.node
    return _negated_fill(gm, step.node, aliases)


def _negated_fill(gm: fx.GraphModule, drop: fx.Node, aliases: Optional[Aliases]):
    """The keep-mask of a fill mask ``drop`` (True = masked): ``keep`` of ``~keep``, or the negated constant."""
    if g.is_call(drop, (operator.invert, torch.logical_not, torch.bitwise_not),
                 {"__invert__", "logical_not", "bitwise_not"}) and _bool(drop.args[0]) \
            and not may_be_written(drop):  # ``drop = ~keep; drop[..., 0] = False``: not ~keep any more
        return drop.args[0]
    value = constant_value(gm, drop, aliases=aliases)
    if value is not None and value.dtype == torch.bool:
        return ("constant", ~value)
    whole = sliced_constant(gm, drop, aliases)
    if whole is not None and band_of(~whole.bool()) is not None:
        return ("constant", ~whole.bool())
    return None


def _bool(node) -> bool:
    t = g.tensor_val(node)
    return t is not None and t.dtype == torch.bool


def _has_bias(facts: MaskFacts) -> bool:
    """An additive float term reaches the scores: an add step, a finite fill, or an additive SDPA mask."""
    return any(s.kind == "add" or (s.kind in ("fill", "keep") and s.value != float("-inf")) for s in facts.steps) \
        or (facts.sdpa_mask is not None and not _bool(facts.sdpa_mask))


def _residual_kind(facts: MaskFacts) -> str:
    """'dense' when a mask is applied per query and key, 'padding' when only per key ``[B, 1, 1, Nk]``, else
    'none'."""
    dense = any(s.kind in ("fill", "keep", "reshape") for s in facts.steps) or (
        facts.sdpa_mask is not None and _bool(facts.sdpa_mask))
    padding = False
    for node in facts.keep_nodes:
        shape = g.shape(node)
        if shape is not None and len(shape) >= 2 and shape[-2] == 1 and (len(shape) < 3 or shape[-3] == 1):
            padding = True
        else:
            dense = True
    return "dense" if dense else ("padding" if padding else "none")
