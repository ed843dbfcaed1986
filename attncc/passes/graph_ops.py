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
TRANSPOSE_METHODS = {"transpose", "transpose_", "mT", "permute", "swapaxes", "swapdims"}
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


def transposed_last_two(node: Any) -> Optional[fx.Node]:
    """If node swaps only the last two dims of its input, that input; else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    # Dynamo records the ``x.mT`` property as a call of the aten op itself (not getattr)
    if node.op == "call_function" and node.target in (torch.ops.aten.mT, torch.ops.aten.mT.default):
        return node.args[0]
    if node.op == "call_function" and node.target in (torch.transpose, torch.swapaxes, torch.swapdims):
        src, dims = node.args[0], node.args[1:3]
    elif node.op == "call_method" and node.target in ("transpose", "swapaxes", "swapdims"):
        src, dims = node.args[0], node.args[1:3]
    elif (node.op == "call_method" and node.target == "permute") or (
        node.op == "call_function" and node.target is torch.permute
    ):
        src = node.args[0]
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        rank = ndim(src)
        if rank < 2 or len(dims) != rank:
            return None
        norm = [d % rank for d in dims]
        expect = list(range(rank - 2)) + [rank - 1, rank - 2]
        return src if norm == expect else None
    else:
        return None
    rank = ndim(src)
    if rank < 2 or len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return None
    return src if sorted(d % rank for d in dims) == [rank - 2, rank - 1] else None


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
