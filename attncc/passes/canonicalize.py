"""Canonicalize: rewrite the many spellings of attention's pieces into one form the detector matches.

- ``nn.MultiheadAttention`` modules and ``F.multi_head_attention_forward`` calls become their SDPA
  decomposition (``lower_torch_nn``); FlexAttention calls with no score_mod and a full or causal block mask
  become SDPA (``lower_flex_attention``);
- ``x.dtype`` / ``x.device`` nodes get the ``meta['val']`` symbolic_trace's fake propagation leaves out;
- a call of a plain Python function (a ``torch.fx.wrap``-ed helper such as timm's ``maybe_add_mask``, which
  symbolic tracing keeps as one opaque node) is replaced by the graph of that function, traced with the
  node's arguments, when it traces;
- keyword arguments that name positional parameters become positional (``F.scaled_dot_product_attention(
  query=q, key=k, value=v)``, ``torch.matmul(input=a, other=b)``), so every pass reads operands by position;
- ``nn.Softmax`` / ``nn.Dropout`` / ``nn.Identity`` modules become ``F.softmax`` / ``F.dropout`` / nothing;
- ``torch.baddbmm(bias, a, b, beta=, alpha=)`` (also ``bias.baddbmm(...)``) becomes
  ``matmul(a, b) * alpha + bias * beta``, and ``x.where(cond, y)`` becomes ``torch.where(cond, x, y)``;
- ``flatten`` / ``unflatten`` of leading (batch, head) dims become ``reshape`` (with the sizes read at run time),
  the one spelling of a view the score chain carries;
- a two-operand ``einsum`` that is a batched matrix product (``...`` batch dims included) becomes permutes and
  ``torch.matmul``;
- the written-out ("safe") softmax ``exp(x - max(x)) / sum(exp(x - max(x)))`` becomes ``F.softmax``.
- ``softmax(x - max(x))`` (the row max subtracted before the softmax, as gpt-oss does) becomes ``softmax(x)``;
- ``softmax(x, dtype=y.dtype)`` gets the dtype itself (symbolic_trace records the read as a node, which made
  ``y`` look "used elsewhere"; gpt-oss writes ``dtype=combined_logits.dtype``).

Each of these is one named ``Lowering(name, applies, lower)`` in the ordered table ``LOWERINGS`` (at the end of
this file), grouped in sweeps over the graph; ``tests/passes/test_canonicalize.py`` has one test per lowering.

Casts, scale placement, mask spellings, GQA repeats and transposed layouts are read by the detector through
``graph_ops`` predicates instead of being rewritten here: each has one predicate, so the matcher still sees one
form. The pass is pure: it returns a new GraphModule and leaves its input untouched.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from attncc.passes.dead_code import remove_dead_code
from attncc.passes.effects import has_side_effects, writes
from attncc.passes.fake_eval import copy_meta, fill_val
from attncc.passes.graph_copy import copy_graph_module
from attncc.passes.graph_ops import arg, is_call, is_softmax, ndim, positional_call, shape, softmax_dim, tensor_val
from attncc.passes.inline import inline_call, is_wrapped_function
from attncc.passes.lower_flex_attention import is_flex_attention, lower_flex_attention
from attncc.passes.lower_torch_nn import is_multihead_attention, lower_multihead_attention


@dataclass(frozen=True)
class Lowering:
    """One spelling canonicalize rewrites: ``applies(gm, node)`` selects the node, ``lower(gm, node)`` rewrites
    it in place (leaving it as it is where a closer look finds a form it does not handle)."""

    name: str
    applies: Callable[[fx.GraphModule, fx.Node], bool]
    lower: Callable[[fx.GraphModule, fx.Node], None]


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a canonicalized copy of ``gm`` (same submodules, new graph); every node keeps ``meta['val']``.

    Runs the sweeps of ``LOWERINGS`` in order; in a sweep, each node gets the first lowering that applies."""
    result, _ = copy_graph_module(gm)
    graph = result.graph
    for sweep in LOWERINGS:
        for node in list(graph.nodes):
            lowering = next((rule for rule in sweep if rule.applies(result, node)), None)
            if lowering is not None:
                lowering.lower(result, node)
    remove_dead_code(graph)
    graph.lint()
    result.recompile()
    return result


def _calls(functions=(), methods=()) -> Callable[[fx.GraphModule, fx.Node], bool]:
    return lambda gm, node: is_call(node, functions, methods)


def _module_of_type(kind: type) -> Callable[[fx.GraphModule, fx.Node], bool]:
    return lambda gm, node: node.op == "call_module" and isinstance(gm.get_submodule(node.target), kind)


def _reads_attribute_without_val(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is getattr and "val" not in node.meta


def _calls_wrapped_function(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_function" and is_wrapped_function(node.target)


def _is_call_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method")


def _make_positional(gm: fx.GraphModule, node: fx.Node) -> None:
    normalized = positional_call(node)
    if normalized is not None:
        node.args, node.kwargs = normalized


def _writes_in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    return has_side_effects(node)


def _leave(gm: fx.GraphModule, node: fx.Node) -> None:
    """An in-place module or a call with ``out=``: its lowered spelling would drop the write."""


def _on_node(rewrite: Callable[[fx.Node], None]) -> Callable[[fx.GraphModule, fx.Node], None]:
    return lambda gm, node: rewrite(node)


def _fill_attribute_val(node: fx.Node) -> None:
    """``x.dtype`` / ``x.device`` under symbolic_trace: FakeTensorProp records no value for them, so a pass that
    evaluates a node reading one (``zeros_like(m, dtype=x.dtype)``) would see None; the attribute of x's value
    is that value."""
    source, name = node.args[0], node.args[1]
    value = tensor_val(source)
    if value is not None and isinstance(name, str) and name in ("dtype", "device", "layout"):
        node.meta["val"] = getattr(value, name)


def _insert(node: fx.Node, op: str, target, args, kwargs=None) -> fx.Node:
    with node.graph.inserting_before(node):
        new = node.graph.create_node(op, target, tuple(args), dict(kwargs or {}))
    copy_meta(node, new)
    fill_val(new)
    return new


def _replace(node: fx.Node, new: fx.Node) -> None:
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def _lower_softmax_module(gm: fx.GraphModule, node: fx.Node) -> None:
    module = gm.get_submodule(node.target)
    if module.dim is not None:
        _replace(node, _insert(node, "call_function", F.softmax, (node.args[0],), {"dim": module.dim}))


def _lower_dropout_module(gm: fx.GraphModule, node: fx.Node) -> None:
    module = gm.get_submodule(node.target)
    _replace(node, _insert(node, "call_function", F.dropout, (node.args[0],),
                           {"p": module.p, "training": module.training}))


def _lower_identity_module(gm: fx.GraphModule, node: fx.Node) -> None:
    node.replace_all_uses_with(node.args[0])
    node.graph.erase_node(node)


def _lower_baddbmm(node: fx.Node) -> None:
    if len(node.args) != 3:  # a spelling positional_call could not complete (``out=``...)
        return
    bias, a, b = node.args
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    if set(node.kwargs) - {"beta", "alpha"} or isinstance(beta, fx.Node) or isinstance(alpha, fx.Node):
        return
    scores = _insert(node, "call_function", torch.matmul, (a, b))
    if alpha != 1:
        scores = _insert(node, "call_function", operator.mul, (scores, alpha))
    if beta != 0:
        term = bias if beta == 1 else _insert(node, "call_function", operator.mul, (bias, beta))
        scores = _insert(node, "call_function", operator.add, (scores, term))
    _replace(node, scores)


def _lower_where_method(node: fx.Node) -> None:
    """``x.where(cond, y)`` is ``torch.where(cond, x, y)``: one spelling for the matchers."""
    if len(node.args) != 3 or node.kwargs:
        return
    x, cond, other = node.args
    _replace(node, _insert(node, "call_function", torch.where, (cond, x, other)))


def _lower_flatten(node: fx.Node) -> None:
    """``x.flatten(0, 1)`` -> ``x.reshape(-1, x.size(2), x.size(3))``; ``x.unflatten(0, (B, H))`` ->
    ``x.reshape(B, H, x.size(1), x.size(2))``, where only dims before the last two change (so a matrix of
    scores stays whole); other flattens are left as they are."""
    x = node.args[0]
    rank = ndim(x)
    if rank < 3:
        return
    if is_call(node, (torch.flatten,), {"flatten"}):
        start, end = arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1)
        if not isinstance(start, int) or not isinstance(end, int):
            return
        start, end = start % rank, end % rank
        if end > rank - 3 or start > end:
            return
        kept_before, new, kept_after = range(start), [-1], range(end + 1, rank)
    else:
        dim, sizes = arg(node, 1, "dim"), arg(node, 2, "sizes")
        if not isinstance(dim, int) or not isinstance(sizes, (tuple, list)) or dim % rank > rank - 3:
            return
        dim %= rank
        kept_before, new, kept_after = range(dim), list(sizes), range(dim + 1, rank)
    shape = [_insert(node, "call_method", "size", (x, i)) for i in kept_before] + new
    shape += [_insert(node, "call_method", "size", (x, i)) for i in kept_after]
    _replace(node, _insert(node, "call_method", "reshape", (x, *shape)))


def _expand_ellipsis(equation: str, ranks: list[int]) -> Optional[str]:
    """``'...qd,...kd->...qk'`` with operand ranks [4, 4] -> ``'ABqd,ABkd->ABqk'`` (fresh capital labels for
    the dims ``...`` stands for); None when the operands' ``...`` cover different numbers of dims."""
    eq = equation.replace(" ", "")
    if "..." not in eq:
        return eq
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != len(ranks):
        return None
    counts = {rank - len(labels.replace("...", "")) for labels, rank in zip(ins, ranks) if "..." in labels}
    if len(counts) != 1:
        return None
    n = counts.pop()
    fresh = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq)
    if n < 0 or n > len(fresh):
        return None
    dots = fresh[:n]
    return ",".join(labels.replace("...", dots) for labels in ins) + "->" + out.replace("...", dots)


def _two_operand_labels(equation: str) -> Optional[tuple[str, str, str]]:
    """(labels of operand 1, of operand 2, of the output) of an explicit two-operand equation with no repeated
    label in any term; None for anything else."""
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != 2 or any(len(set(term)) != len(term) for term in (*ins, out)):
        return None
    return ins[0], ins[1], out


def _parse_bmm_einsum(equation: str) -> Optional[tuple[str, str, str, str, str, str]]:
    """For 'b h q d, b h k d -> b h q k'-like equations: (in1, in2, out, batch, free1+contract, contract+free2)."""
    terms = _two_operand_labels(equation)
    if terms is None:
        return None
    a, b, out = terms
    contract = [c for c in a if c in b and c not in out]
    batch = [c for c in out if c in a and c in b]
    free_a = [c for c in a if c not in b]
    free_b = [c for c in b if c not in a]
    if len(contract) != 1 or len(free_a) != 1 or len(free_b) != 1:
        return None
    if set(a) != set(batch + free_a + contract) or set(b) != set(batch + free_b + contract):
        return None
    if sorted(out) != sorted(batch + free_a + free_b):
        return None
    # the product comes out as batch + free_a + free_b; _lower_einsum permutes it to ``out`` when the equation
    # orders its output differently (e.g. 'bhqk,bkhd->bqhd', attention written in [B, N, H, D] layout)
    return a, b, out, "".join(batch), free_a[0] + contract[0], contract[0] + free_b[0]


def _permute_to(node: fx.Node, x: fx.Node, have: str, want: str) -> fx.Node:
    if have == want:
        return x
    perm = [have.index(c) for c in want]
    if perm == list(range(len(want) - 2)) + [len(want) - 1, len(want) - 2]:
        return _insert(node, "call_method", "transpose", (x, -2, -1))
    return _insert(node, "call_method", "permute", (x, *perm))


def _lower_einsum(node: fx.Node) -> None:
    equation = node.args[0]
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(equation, str) or len(operands) != 2:
        return
    equation = _expand_ellipsis(equation, [ndim(x) for x in operands])
    parsed = _parse_bmm_einsum(equation) if equation is not None else None
    if parsed is None:
        return
    a_labels, b_labels, out, batch, a_tail, b_tail = parsed
    a = _permute_to(node, operands[0], a_labels, batch + a_tail)
    b = _permute_to(node, operands[1], b_labels, batch + b_tail)
    product = _insert(node, "call_function", torch.matmul, (a, b))
    _replace(node, _permute_to(node, product, batch + a_tail[0] + b_tail[1], out))


def _is_keepdim_reduction(node, fns, methods, src) -> Optional[int]:
    """The reduced dim if node is a keepdim reduction (amax/max/sum) of src over one dim."""
    if not is_call(node, fns, methods) or node.args[0] is not src:
        return None
    dim = arg(node, 1, "dim")
    keepdim = arg(node, 2, "keepdim", False)
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    if not isinstance(dim, int) or keepdim is not True:
        return None
    return dim % ndim(src)


def _row_max_dim(node, x) -> Optional[int]:
    d = _is_keepdim_reduction(node, (torch.amax,), {"amax"}, x)
    if d is not None:
        return d
    # x.max(dim, keepdim=True)[0]  /  .values
    if node.op == "call_function" and node.target in (operator.getitem, getattr):
        if node.args[1] in (0, "values"):
            return _is_keepdim_reduction(node.args[0], (torch.max,), {"max"}, x)
    return None


def _fold_written_softmax(exp_node: fx.Node) -> None:
    """``exp(x - rowmax(x)) / sum(exp(x - rowmax(x)), keepdim=True)`` (or without the max) -> ``F.softmax(x)``."""
    inner = exp_node.args[0]
    x, max_dim = _without_row_max(inner)
    normalized = _normalization(exp_node)
    if normalized is None:
        return
    sum_dim, div = normalized
    if max_dim is not None and max_dim != sum_dim:
        return
    if tensor_val(div) is None or tensor_val(x) is None or tensor_val(div).dtype != tensor_val(x).dtype:
        return
    # F.softmax(x) goes where the division was: an in-place write after the pattern first read x would change it
    reads = {exp_node, inner}
    if x is not inner:  # the row max: ``amax(x)`` or ``x.max(dim)[0]``
        reads |= {inner.args[1], *inner.args[1].all_input_nodes}
    if _writes_after_first_read(x, reads, div):
        return
    _replace(div, _insert(div, "call_function", F.softmax, (x,), {"dim": sum_dim}))


def _without_row_max(inner) -> tuple:
    """(x, the dim of the row max) for ``x - rowmax(x)``; (inner, None) for anything else."""
    if is_call(inner, (operator.sub, torch.sub), {"sub"}) and isinstance(inner.args[1], fx.Node):
        dim = _row_max_dim(inner.args[1], inner.args[0])
        if dim is not None:
            return inner.args[0], dim
    return inner, None


def _normalization(exp_node: fx.Node) -> Optional[tuple[int, fx.Node]]:
    """(the summed dim, the division) when ``e = exp_node`` is used only as ``e / e.sum(dim, keepdim=True)``."""
    sums = [u for u in exp_node.users if _is_keepdim_reduction(u, (torch.sum,), {"sum"}, exp_node) is not None]
    if len(sums) != 1:
        return None
    total = sums[0]
    divs = [u for u in exp_node.users if is_call(u, (operator.truediv, torch.div), {"div"})
            and u.args[0] is exp_node and u.args[1] is total]
    if len(divs) != 1 or set(exp_node.users) != {total, divs[0]} or len(total.users) != 1:
        return None
    return _is_keepdim_reduction(total, (torch.sum,), {"sum"}, exp_node), divs[0]


def _drop_row_max_shift(softmax: fx.Node) -> None:
    """``softmax(x - rowmax(x))`` -> ``softmax(x)``: a per-row constant does not change a softmax (which
    subtracts the row max itself). The subtraction and the max then go dead, so the scores ``x`` reach the
    softmax with no other user, as the detector expects."""
    shifted = softmax.args[0] if softmax.args else None
    if not is_call(shifted, (operator.sub, torch.sub), {"sub"}) or len(shifted.args) != 2 or shifted.kwargs:
        return
    x, row_max = shifted.args
    if not isinstance(x, fx.Node) or not isinstance(row_max, fx.Node) or shape(shifted) != shape(x):
        return
    if is_call(row_max, (torch.detach,), {"detach"}):
        row_max = row_max.args[0]
    dim, softmax_over = _row_max_dim(row_max, x), softmax_dim(softmax)
    if dim is None or not isinstance(softmax_over, int) or dim != softmax_over % ndim(x):
        return
    if tensor_val(shifted).dtype != tensor_val(x).dtype:
        return
    softmax.replace_input_with(shifted, x)


def _fold_dtype_read(softmax: fx.Node) -> None:
    """A softmax's ``dtype=y.dtype`` (a ``getattr`` node, as keyword or, once keywords are made positional, as
    an argument) -> the dtype itself, as captured (the graph is specialized to its dtypes already: its values
    carry them)."""

    def constant(a):
        if (isinstance(a, fx.Node) and a.op == "call_function" and a.target is getattr and a.args[1] == "dtype"
                and tensor_val(a.args[0]) is not None):
            return tensor_val(a.args[0]).dtype
        return a

    softmax.args = tuple(constant(a) for a in softmax.args)
    softmax.kwargs = {k: constant(v) for k, v in softmax.kwargs.items()}


def _writes_after_first_read(x: fx.Node, reads: set, end: fx.Node) -> bool:
    """Whether a node after the first of ``reads`` that uses ``x`` and before ``end`` writes a tensor in place."""
    node, reading = x.next, False
    while node is not end and node.op != "root":
        if node in reads and x in node.all_input_nodes:
            reading = True
        elif reading and writes(node):
            return True
        node = node.next
    return False


LOWERINGS: tuple[tuple[Lowering, ...], ...] = (
    # x.dtype / x.device under symbolic_trace carry no meta['val'] (zeros_like(m, dtype=x.dtype) needs it)
    (Lowering("attribute_val", _reads_attribute_without_val, _on_node(_fill_attribute_val)),),
    # torch.fx.wrap-ed helpers kept opaque by symbolic_trace (timm's maybe_add_mask): their traced graph
    (Lowering("inline_wrapped", _calls_wrapped_function, _on_node(inline_call)),),
    # SDPA(query=q, key=k, value=v), torch.matmul(input=a, other=b): operands by position for every pass
    (Lowering("positional", _is_call_node, _make_positional),),
    (
        # nn.MultiheadAttention modules, F.multi_head_attention_forward (torch.nn Transformer layers, ViT-B)
        Lowering("multihead_attention", is_multihead_attention, lower_multihead_attention),
        # Dynamo's flex_attention higher-order op with no score_mod and a full or causal block mask
        Lowering("flex_attention", lambda gm, node: is_flex_attention(node), lower_flex_attention),
        # an in-place module or a call with out=: left as it is, so no rule below drops its write
        Lowering("keep_writes", _writes_in_place, _leave),
        # nn.Softmax(dim) modules (timm's Swin, hand-written attention modules) -> F.softmax
        Lowering("softmax_module", _module_of_type(nn.Softmax), _lower_softmax_module),
        # nn.Dropout on the probabilities (HF BERT/ViT, timm) -> F.dropout(p, training)
        Lowering("dropout_module", _module_of_type(nn.Dropout), _lower_dropout_module),
        # nn.Identity (timm's q_norm / k_norm with qk_norm off) -> its input
        Lowering("identity_module", _module_of_type(nn.Identity), _lower_identity_module),
        # torch.baddbmm(bias, q, kT, beta=, alpha=) (BLOOM, HF GPT-2 reorder_and_upcast) -> matmul * alpha + bias
        Lowering("baddbmm", _calls((torch.baddbmm, torch.Tensor.baddbmm), {"baddbmm"}), _on_node(_lower_baddbmm)),
        # scores.where(keep, -inf) (method spelling) -> torch.where(keep, scores, -inf)
        Lowering("where_method", _calls((torch.Tensor.where,), {"where"}), _on_node(_lower_where_method)),
        # einsum('bhqd,bhkd->bhqk', q, k), '...qd,...kd->...qk' (lucidrains-style code) -> permutes + matmul
        Lowering("einsum", _calls((torch.einsum,)), _on_node(_lower_einsum)),
        # x.flatten(0, 1) / x.unflatten(0, (B, H)) of leading dims (3-D [B*H, N, D] attention code) -> reshape
        Lowering("flatten", _calls((torch.flatten, torch.unflatten), {"flatten", "unflatten"}),
                 _on_node(_lower_flatten)),
    ),
    # exp(x - amax(x)) / sum(exp(...)): the written-out safe softmax (hand-written and educational code)
    (Lowering("written_softmax", _calls((torch.exp,), {"exp"}), _on_node(_fold_written_softmax)),),
    # softmax(x, dtype=y.dtype): gpt-oss's dtype=combined_logits.dtype read made y look used elsewhere
    (Lowering("softmax_dtype_read", lambda gm, node: is_softmax(node), _on_node(_fold_dtype_read)),),
    # softmax(x - rowmax(x)): gpt-oss subtracts the row max before its softmax
    (Lowering("row_max_shift", lambda gm, node: is_softmax(node), _on_node(_drop_row_max_shift)),),
)
"""canonicalize's sweeps over the graph, in order. Within a sweep the first lowering that applies to a node
rewrites it; a later sweep sees what earlier ones produced (the softmax folds run after the modules became
F.softmax, positional arguments hold before any lowering reads operands)."""
