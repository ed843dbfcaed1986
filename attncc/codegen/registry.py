"""The kernel registry: variant name -> the Triton kernel that runs it and what calls it covers.

A kernel family declares itself next to its launcher (thunder's executor-checker style)::

    @kernel_for("topk", covers=topk_covers)
    def topk_attention(spec, q, k, v, mods) -> Tensor: ...

``covers(spec, q, k, v, mods) -> str`` says '' when the kernel runs this call and otherwise why not (a block
size the tiles cannot take, ...); the runtime then runs the variant's PyTorch path. Checks every kernel
shares (rank, dtypes, head layout, empty sequences) are the runtime's (``attncc.runtime.triton_backend``),
not each family's. Discovery imports every module of ``attncc.codegen`` the first time a kernel is looked
up; the runtime does that only when the Triton backend runs, so importing attncc never needs Triton.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

from attncc.errors import AttnccError
from attncc.variants.registry import import_modules_of

KernelRun = Callable[..., Tensor]
"""``run(spec, q, k, v, mods) -> out``: q ``[B, Hq, Nq, Dqk]``, k ``[B, Hkv, Nk, Dqk]``, v ``[B, Hkv, Nk, Dv]``
-> ``[B, Hq, Nq, Dv]``."""

Covers = Callable[..., str]
"""``covers(spec, q, k, v, mods) -> ''`` when the kernel runs the call, else the reason it does not."""


@dataclass(frozen=True)
class Kernel:
    """The kernel of one variant family: ``run`` it on the calls ``covers`` accepts."""

    variant: str
    run: KernelRun
    covers: Covers


def covers_every_call(spec, q: Tensor, k: Tensor, v: Tensor, mods) -> str:
    """The ``covers`` of a kernel that runs every call the runtime's shared checks pass."""
    return ""


_KERNELS: dict[str, Kernel] = {}


def kernel_for(variant: str, covers: Covers = covers_every_call) -> Callable[[KernelRun], KernelRun]:
    """Decorator: ``run`` is the kernel of the variant named ``variant`` (returned unchanged)."""

    def register(run: KernelRun) -> KernelRun:
        taken = _KERNELS.get(variant)
        if taken is not None and taken.run.__qualname__ != run.__qualname__:
            raise AttnccError(f"kernel_for: variant {variant!r} already has the kernel {taken.run.__qualname__}")
        _KERNELS[variant] = Kernel(variant, run, covers)
        return run

    return register


def unregister_kernel(variant: str) -> None:
    """Remove the kernel of ``variant`` (nothing happens when it has none)."""
    _KERNELS.pop(variant, None)


def kernel(variant: str) -> Optional[Kernel]:
    """The kernel registered for the variant named ``variant``; None when it has none (its PyTorch path runs)."""
    discover()
    return _KERNELS.get(variant)


def discover() -> None:
    """Import every module of the ``attncc.codegen`` package once, so each family's decorator has run."""
    import_modules_of("attncc.codegen")


__all__ = ["Kernel", "covers_every_call", "discover", "kernel", "kernel_for", "unregister_kernel"]
