"""Small helpers several layers use, each written once: ceil division, log2(e), a mask-expression join for
generated Triton source, rows of a score-shaped tensor, and a dotted attribute lookup."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

LOG2E = 1.4426950408889634
"""log2(e): ``exp(x) == exp2(x * LOG2E)`` (the kernels use the cheaper exp2)."""


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers (``b > 0``), exactly (no float rounding): the number of size-b blocks that
    cover a items."""
    return -(-a // b)


def all_of(*masks: Optional[str]) -> Optional[str]:
    """Triton source of ``m1 & m2 & ...`` over the mask expressions given (None ones skipped), each in
    parentheses when there are several; None when there is none."""
    present = [m for m in masks if m]
    return " & ".join(f"({m})" for m in present) if len(present) > 1 else (present[0] if present else None)


def rows_of(t: Optional[Tensor], start: int, stop: int) -> Optional[Tensor]:
    """Query rows ``[start, stop)`` of a tensor broadcastable to scores ``[..., Nq, Nk]`` (bias, mask); one with a
    size-1 row dim (or fewer than 2 dims) broadcasts and is returned as is, as is None."""
    if t is None or t.dim() < 2 or t.shape[-2] == 1:
        return t
    return t[..., start:stop, :]


def getattr_path(obj: Any, target: str) -> Any:
    """``obj.a.b.c`` for ``target = "a.b.c"`` (a ``get_attr`` node's target on its module); None when a part is
    missing or None."""
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
