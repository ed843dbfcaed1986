"""Reading FX nodes the same way whatever the source spelled: functions, methods, operators and modules.

Dynamo graphs call ``torch.matmul``, ``operator.matmul`` or ``Tensor.softmax``; symbolic_trace graphs add
``call_module`` nodes. The predicates here answer "is this a matmul / transpose / cast ..." for all of them,
and read ``node.meta['val']`` (a tensor or FakeTensor) for shapes.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

MATMUL = {torch.matmul, operator.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm}
MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax}
SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
DROPOUT = {F.dropout, torch.dropout, torch.nn.functional.dropout1d, torch.nn.functional.dropout2d}
MUL = {operator.mul, torch.mul, torch.Tensor.mul, operator.imul}
DIV = {operator.truediv, torch.div, torch.true_divide, torch.Tensor.div, operator.itruediv}
ADD = {operator.add, torch.add, torch.Tensor.add, operator.iadd}
SUB = {operator.sub, torch.sub, torch.Tensor.sub, operator.isub}
CAST_METHODS = {"to", "float", "half", "bfloat16", "double", "type", "type_as"}
IDENTITY_METHODS = {"contiguous", "clone"}
VIEW_METHODS = {"view", "reshape"}


def val(node: Any) -> Any:
    """The example value (tensor/FakeTensor) of a node, or the constant itself for non-nodes."""
    if isinstance(node, fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return node


def tensor_val(node: Any) -> Optional[torch.Tensor]:
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def shape(node: Any) -> Optional[tuple]:
    t = tensor_val(node)
    return tuple(t.shape) if t is not None else None


def ndim(node: Any) -> int:
    t = tensor_val(node)
    return t.dim() if t is not None else -1


def is_call(node: Any, functions=(), methods=()) -> bool:
    """Whether node calls one of ``functions`` (call_function) or ``methods`` (call_method names)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# Positional-or-keyword parameters of the calls the passes read, in order; keyword-only ones (SDPA's scale and
# enable_gqa, baddbmm's beta/alpha, add's alpha, div's rounding_mode) are not listed and stay keywords. Methods
# are keyed by name and list ``self`` first (a ``call_method`` node holds the tensor in args[0]).
_TWO = ("input", "other")
POSITIONAL_PARAMETERS: dict[Any, tuple[str, ...]] = {
    torch.matmul: _TWO, torch.bmm: ("input", "mat2"), torch.baddbmm: ("input", "batch1", "batch2"),
    F.softmax: ("input", "dim", "_stacklevel", "dtype"), torch.softmax: ("input", "dim", "dtype"),
    torch.special.softmax: ("input", "dim", "dtype"),
    F.scaled_dot_product_attention: ("query", "key", "value", "attn_mask", "dropout_p", "is_causal"),
    torch._C._nn.scaled_dot_product_attention: ("query", "key", "value", "attn_mask", "dropout_p", "is_causal"),
    torch.masked_fill: ("input", "mask", "value"), torch.where: ("condition", "input", "other"),
    torch.transpose: ("input", "dim0", "dim1"), torch.swapdims: ("input", "dim0", "dim1"),
    torch.swapaxes: ("input", "axis0", "axis1"), torch.permute: ("input", "dims"),
    F.dropout: ("input", "p", "training", "inplace"), torch.dropout: ("input", "p", "train"),
    torch.mul: _TWO, torch.div: _TWO, torch.true_divide: _TWO, torch.add: _TWO, torch.sub: _TWO,
    torch.max: _TWO, torch.maximum: _TWO, torch.clamp: ("input", "min", "max"), torch.clamp_min: ("input", "min"),
    torch.tanh: ("input",), torch.exp: ("input",), torch.amax: ("input", "dim", "keepdim"),
    torch.sum: ("input", "dim", "keepdim"), torch.reshape: ("input", "shape"), torch.unsqueeze: ("input", "dim"),
    torch.repeat_interleave: ("input", "repeats", "dim"), torch.unbind: ("input", "dim"),
    torch.eq: _TWO, torch.ne: _TWO, torch.lt: _TWO, torch.le: _TWO, torch.gt: _TWO, torch.ge: _TWO,
    torch.logical_and: _TWO, torch.logical_or: _TWO, torch.logical_not: ("input",),
    torch.bitwise_and: _TWO, torch.bitwise_or: _TWO,
    F.linear: ("input", "weight", "bias"), torch._C._nn.linear: ("input", "weight", "bias"),
    torch.addmm: ("input", "mat1", "mat2"),
}
_SELF_OTHER = ("self", "other")
METHOD_PARAMETERS: dict[str, tuple[str, ...]] = {
    "matmul": _SELF_OTHER, "bmm": ("self", "mat2"), "baddbmm": ("self", "batch1", "batch2"),
    "softmax": ("self", "dim", "dtype"), "masked_fill": ("self", "mask", "value"),
    "masked_fill_": ("self", "mask", "value"), "where": ("self", "condition", "other"),
    "transpose": ("self", "dim0", "dim1"), "swapdims": ("self", "dim0", "dim1"), "swapaxes": ("self", "axis0", "axis1"),
    "mul": _SELF_OTHER, "div": _SELF_OTHER, "add": _SELF_OTHER, "sub": _SELF_OTHER, "mul_": _SELF_OTHER,
    "div_": _SELF_OTHER, "add_": _SELF_OTHER, "sub_": _SELF_OTHER, "maximum": _SELF_OTHER,
    "clamp": ("self", "min", "max"), "clamp_min": ("self", "min"), "amax": ("self", "dim", "keepdim"),
    "sum": ("self", "dim", "keepdim"), "unsqueeze": ("self", "dim"), "repeat_interleave": ("self", "repeats", "dim"),
    "unbind": ("self", "dim"), "type_as": _SELF_OTHER, "eq": _SELF_OTHER, "ne": _SELF_OTHER, "lt": _SELF_OTHER,
    "le": _SELF_OTHER, "gt": _SELF_OTHER, "ge": _SELF_OTHER, "logical_and": _SELF_OTHER, "logical_or": _SELF_OTHER,
    "bitwise_and": _SELF_OTHER, "bitwise_or": _SELF_OTHER,
}


def positional_parameters(node: fx.Node) -> Optional[tuple[str, ...]]:
    """The positional-or-keyword parameter names of node's call (``self`` first for methods), None if unknown."""
    if node.op == "call_method":
        return METHOD_PARAMETERS.get(node.target)
    if node.op == "call_function":
        try:
            names = POSITIONAL_PARAMETERS.get(node.target)
        except TypeError:  # an unhashable target
            return None
        if names is None and getattr(node.target, "__objclass__", None) in (torch.Tensor, torch._C.TensorBase):
            names = METHOD_PARAMETERS.get(node.target.__name__)  # torch.Tensor.softmax called as a function
        return names
    return None


def positional_call(node: fx.Node) -> Optional[tuple[tuple, dict]]:
    """node's (args, kwargs) with every keyword that names a positional parameter moved into args, as far as
    the parameters are given without a gap (``F.softmax(input=x, dim=-1)`` -> ``(x, -1), {}``); None when that
    changes nothing. Passes then read operands by position whatever the model spelled."""
    names = positional_parameters(node)
    if names is None or not node.kwargs:
        return None
    args, kwargs = list(node.args), dict(node.kwargs)
    for name in names[len(args):]:
        if name not in kwargs:
            break
        args.append(kwargs.pop(name))
    if len(args) == len(node.args):
        return None
    return tuple(args), kwargs


def same_size(a: Any, b: Any) -> bool:
    """Equality of two sizes that may be SymInts, without adding guards where it cannot be known."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except Exception:  # pragma: no cover - very old torch
        return str(a) == str(b)


def is_matmul(node: Any) -> bool:
    return is_call(node, MATMUL, MATMUL_METHODS)


def is_softmax(node: Any) -> bool:
    return is_call(node, SOFTMAX, {"softmax"})


def is_sdpa(node: Any) -> bool:
    return is_call(node, SDPA)


def is_dropout(node: Any) -> bool:
    return is_call(node, DROPOUT, {"dropout"})


def softmax_dim(node: fx.Node) -> Any:
    return arg(node, 1, "dim")


SWAP_FUNCTIONS = (torch.transpose, torch.swapaxes, torch.swapdims)
SWAP_METHODS = {"transpose", "swapaxes", "swapdims"}


def transposed_last_two(node: Any) -> Optional[fx.Node]:
    """If node swaps only the last two dims of its input, that input; else None."""
    if not isinstance(node, fx.Node):
        return None
    if _is_mT(node):
        return node.args[0]
    if is_call(node, SWAP_FUNCTIONS, SWAP_METHODS):
        return node.args[0] if _swaps_last_two(ndim(node.args[0]), node.args[1:3]) else None
    if is_call(node, (torch.permute,), {"permute"}):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return node.args[0] if _permutes_last_two(ndim(node.args[0]), dims) else None
    return None


def _is_mT(node: fx.Node) -> bool:
    """``x.mT``: a getattr, or under Dynamo a call of the aten op itself."""
    if node.op != "call_function":
        return False
    return (node.target is getattr and node.args[1] == "mT") or node.target in (torch.ops.aten.mT,
                                                                                   torch.ops.aten.mT.default)


def _swaps_last_two(rank: int, dims: tuple) -> bool:
    """Whether ``transpose(d0, d1)`` of a rank-``rank`` tensor swaps its last two dims."""
    if rank < 2 or len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return False
    return sorted(d % rank for d in dims) == [rank - 2, rank - 1]


def _permutes_last_two(rank: int, dims) -> bool:
    """Whether ``permute(*dims)`` of a rank-``rank`` tensor swaps its last two dims and keeps the others."""
    if rank < 2 or len(dims) != rank:
        return False
    return [d % rank for d in dims] == list(range(rank - 2)) + [rank - 1, rank - 2]


def is_cast(node: Any) -> bool:
    """A dtype conversion that keeps the shape (``.float()``, ``.to(dtype)``, ``.type_as(x)`` ...)."""
    if not isinstance(node, fx.Node):
        return False
    ok = (node.op == "call_method" and node.target in CAST_METHODS) or (
        node.op == "call_function" and node.target in (torch.Tensor.to, torch.Tensor.float, torch.Tensor.type_as)
    )
    if not ok or not node.args:
        return False
    src, out = tensor_val(node.args[0]), tensor_val(node)
    return src is not None and out is not None and out.shape == src.shape and out.device == src.device


def is_identity(node: Any) -> bool:
    """Ops that leave values unchanged: contiguous, clone, and eval-mode dropout."""
    if is_call(node, (torch.clone,), IDENTITY_METHODS):
        return True
    if is_dropout(node):
        return dropout_probability(node) == 0.0
    return False


def dropout_probability(node: fx.Node) -> float:
    """p of a dropout node, 0 when it is in eval mode (training=False)."""
    if node.op == "call_method":
        p, training = arg(node, 1, "p", 0.5), arg(node, 2, "training", True)
    elif node.target is torch.dropout:
        p, training = arg(node, 1, "p", 0.5), arg(node, 2, "train", True)
    else:
        p, training = arg(node, 1, "p", 0.5), arg(node, 2, "training", True)
    if isinstance(training, fx.Node) or isinstance(p, fx.Node):
        return float("nan")  # decided at run time: not something we can carry
    return float(p) if training else 0.0


def scalar_constant(x: Any) -> Optional[float]:
    """A Python number, or a node whose value is a 0-dim constant we can read; else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


def module_path(node: fx.Node) -> str:
    """The name ``named_modules()`` gives the module a node was computed in ('' for the root).

    The frontend sets it by module identity (``attncc.module_names``); a module the model does not contain (one
    made during forward) keeps Dynamo's source string, made readable.
    """
    from attncc.module_names import META_KEY, readable_source

    if META_KEY in node.meta:
        return node.meta[META_KEY]
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return readable_source(list(stack.values())[-1][0])
