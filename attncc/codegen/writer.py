"""Writing generated Triton source: an indenting line writer and the small conversions generators share."""

from __future__ import annotations

import contextlib
import textwrap
from typing import Iterator

import torch

from attncc.errors import AttnccError


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (and >= 16, the smallest tile ``tl.dot`` takes)."""
    return max(16, 1 << (max(1, int(n)) - 1).bit_length())


def torch_to_triton_dtype(dtype: torch.dtype) -> str:
    """The ``tl`` dtype name of a torch floating dtype, for generated source."""
    names = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16"}
    if dtype not in names:
        raise AttnccError(f"triton backend: unsupported dtype {dtype} (float32, float16 or bfloat16)")
    return names[dtype]


class SourceWriter:
    """Indented lines of generated Python: ``w.line("x = 1")``; ``with w.block("if c:"):`` indents."""

    def __init__(self):
        self._lines: list[str] = []
        self._depth = 0

    def line(self, text: str = "") -> None:
        self._lines.append(("    " * self._depth + text) if text else "")

    def lines(self, text: str) -> None:
        """Several lines at the current depth (common leading whitespace of ``text`` removed)."""
        for raw in textwrap.dedent(text).strip("\n").splitlines():
            self.line(raw)

    @contextlib.contextmanager
    def block(self, header: str) -> Iterator[None]:
        """``header`` (``for ...:``, ``if ...:``, ``def ...:``) and the lines written inside, one level deeper."""
        self.line(header)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"
