"""Dead-code removal that keeps what a captured graph runs for its side effects.

``fx.Graph.eliminate_dead_code`` removes every unused call it does not know to be impure. Captured graphs hold
calls it does not know: Dynamo's graph around a FlexAttention call enters and leaves vmap levels
(``_vmap_increment_nesting`` ... ``_vmap_decrement_nesting``, unused results), and models mutate tensors in place
(``scores.masked_fill_(mask, -inf)`` whose result is never read, the tensor is). Removing those changes what the
graph computes (a vmap level never entered fails at run time; a skipped in-place fill gives silently wrong
values), so the passes remove only what is certainly pure.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx


def is_side_effect(node: fx.Node) -> bool:
    """Whether an unused ``node`` must stay: FX's own impure ops, in-place calls, and calls that return None.

    A call that returns nothing (its recorded value is None, or it has none: Dynamo records no
    ``example_value`` for such calls) can only be there for its effect.
    """
    if node.is_impure():
        return True
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    if _mutates_input(node):
        return True
    value = node.meta.get("val", node.meta.get("example_value"))
    return value is None


_INPLACE_OPERATORS = {getattr(operator, name) for name in (
    "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior", "ixor", "ilshift",
    "irshift")}


def _mutates_input(node: fx.Node) -> bool:
    """``x.masked_fill_(...)``, ``torch.relu_(x)``, ``aten.add_``, ``x += y``: PyTorch's trailing-underscore
    in-place ops and Python's in-place operators (``operator.and_`` is not one: it is ``&``)."""
    target = node.target
    if node.op == "call_method":
        return target.endswith("_") and not target.endswith("__")
    if node.op != "call_function":
        return False
    if target in _INPLACE_OPERATORS:
        return True
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return bool(target._schema.is_mutable) if isinstance(target, torch._ops.OpOverload) else \
            target.__name__.endswith("_")
    name = getattr(target, "__name__", "")
    module = getattr(target, "__module__", None) or ""
    is_torch = module.startswith("torch") or getattr(target, "__objclass__", None) is torch._C.TensorBase
    return is_torch and name.endswith("_") and not name.endswith("__")


def remove_dead_code(graph: fx.Graph) -> bool:
    """Remove unused nodes that are certainly pure (see ``is_side_effect``); True if the graph changed."""
    return graph.eliminate_dead_code(is_impure_node=is_side_effect)
