"""Backend choice for the attncc ops: the torch path everywhere today (Triton kernels come with codegen/)."""

from __future__ import annotations

import os

from attncc.errors import AttnccError

BACKENDS = ("torch",)


def selected_backend() -> str:
    """The backend ``ATTNCC_BACKEND`` forces, or 'torch' (the only one built so far)."""
    name = os.environ.get("ATTNCC_BACKEND", "torch").strip().lower() or "torch"
    if name not in BACKENDS:
        raise AttnccError(f"ATTNCC_BACKEND={name!r} is not available: choose one of {', '.join(BACKENDS)}")
    return name
