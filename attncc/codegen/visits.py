"""Which (query block, key block) pairs a softmax-attention kernel visits, and the hooks a visit adds.

The online-softmax kernel family (:mod:`attncc.codegen.softmax`) is one generator; what varies between the
variants is the set of key blocks each query block visits and the element-level keep-code inside partially
visible blocks:

* :class:`DenseVisit`: every key block (with ``mods.causal``, only the blocks up to the diagonal);
* :class:`BandVisit`: the blocks of a sliding-window band plus the sink/global prefix columns and the global
  query rows (``local``);
* :class:`LayoutVisit`: the blocks a :class:`attncc.variants.blocks.BlockLayout` lists (block-sparse,
  neighborhood, top-k), with an optional :class:`Predicate` applied in partial entries and an optional
  :class:`TokenMap` that tiles queries and keys in an order other than the sequence order.

Code hooks are Triton statements as text; everything they depend on besides their text goes into their
``descriptor`` (it becomes part of the kernel cache key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Union

if TYPE_CHECKING:
    from attncc.variants.blocks import BlockLayout


@dataclass(frozen=True)
class Predicate:
    """Element-level keep-code a visit applies inside partial blocks.

    ``code`` is Triton statements (no indentation) that assign ``keep`` (bool, ``[BLOCK_M, BLOCK_N]``).
    Available names: ``q_pos`` ``[BLOCK_M, 1]`` and ``k_pos`` ``[1, BLOCK_N]`` (int32 visit-order positions),
    ``q_tok`` ``[BLOCK_M, 1]`` and ``k_tok`` ``[1, BLOCK_N]`` (int32 token indices, see :class:`TokenMap`),
    ``off_b`` (batch index), ``off_h`` (query head index), ``pid_m`` (query block index), ``slot`` (index of
    the current entry in the layout row; layout visits only), ``BLOCK_M``/``BLOCK_N``, and every name listed
    in ``scalars`` / ``tensors``.
    """

    name: str
    """Short id, e.g. ``"neighborhood2d"`` (goes into the cache descriptor)."""
    code: str
    scalars: tuple[str, ...] = ()
    """Names of int32 runtime arguments the code reads (values in ``LayoutVisit.tensors``)."""
    tensors: tuple[str, ...] = ()
    """Names of pointer arguments the code reads (tensors in ``LayoutVisit.tensors``)."""
    descriptor: dict = field(default_factory=dict, hash=False)
    """Everything ``code`` depends on besides its text."""


@dataclass(frozen=True)
class TokenMap:
    """How visit-order positions map to token indices (default: identity).

    Lets a visit tile queries and keys in an order other than the sequence order (e.g. 2-D grid tiles for
    neighborhood attention) without copying q/k/v. ``code`` is Triton statements assigning ``q_tok``, ``q_ok``
    from ``q_pos`` (``[BLOCK_M, 1]``) and ``k_tok``, ``k_ok`` from ``k_pos`` (``[1, BLOCK_N]``); ``*_ok``
    (bool) is False for positions that map to no token (tile padding). The kernel runs the code once before
    its key loop (for the query side) and once per key block (for the key side), so it must compute both
    sides from ``q_pos`` and ``k_pos`` alone (plus ``scalars``).

    Positions at or past ``n_q_visit``/``n_k_visit`` are padding whatever the code says. Layout entries
    marked full (``partial`` False) must hold no other padding key position (``k_ok`` True for every position
    below ``n_k_visit``): the kernel skips every element-level test there.
    """

    code: str
    n_q_visit: int
    """Number of visit-order query positions (>= Nq when tiles pad)."""
    n_k_visit: int
    """Number of visit-order key positions (>= Nk when tiles pad)."""
    scalars: tuple[str, ...] = ()
    descriptor: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class DenseVisit:
    """Every key block (with ``mods.causal``: only key blocks up to the diagonal; mask arithmetic only on the
    diagonal and sequence-boundary blocks)."""


@dataclass(frozen=True)
class BandVisit:
    """Local band: key j is visible from query i iff ``i - left <= j <= i + right``, or ``j < sinks``, or
    ``j < globals``, or ``i < globals``. ``left``/``right`` are already resolved for causality (see
    ``LocalSpec.bounds``); ``mods.causal`` still applies on top. Self-attention only (Nq == Nk)."""

    left: int
    right: int
    sinks: int = 0
    globals: int = 0


@dataclass(frozen=True)
class LayoutVisit:
    """The key blocks a block layout lists for each query block.

    ``layout_for(block_m, block_n)`` returns the :class:`~attncc.variants.blocks.BlockLayout` at those tile
    sizes over visit-order positions (``nq``/``nk`` = ``token_map.n_q_visit``/``n_k_visit``, or Nq/Nk without
    a token map), so autotuning runs on the real layout of each config. Layout entries must list increasing
    block indices with the ``-1`` padding at the end of each row.
    """

    layout_for: Callable[[int, int], "BlockLayout"]
    predicate: Optional[Predicate] = None
    """Applied in entries whose ``partial`` flag is True (``mods`` apply everywhere they are needed)."""
    token_map: Optional[TokenMap] = None
    descriptor: dict = field(default_factory=dict, hash=False)
    """What ``layout_for`` and the predicate depend on (e.g. the spec text)."""
    block_sizes: Optional[tuple[int, int]] = None
    """When the layout's semantics fix the tile size (block_sparse with block=64): only configs with these
    ``(BLOCK_M, BLOCK_N)``."""
    tensors: dict = field(default_factory=dict, hash=False)
    """Name -> Tensor (pointer argument) or int (int32 argument) for the predicate's and token map's
    ``scalars``/``tensors``."""


Visit = Union[DenseVisit, BandVisit, LayoutVisit]


def block_fits_tiles(spec, q, k, v, mods) -> str:
    """The kernel ``covers`` of a variant with a ``block`` parameter that becomes the kernel's tile size
    (block_sparse, topk): '' when ``spec.block`` is a power of two >= 16, else why not."""
    if spec.block < 16 or spec.block & (spec.block - 1):
        return f"block {spec.block} is not a power of two >= 16 (kernel tiles are)"
    return ""


__all__ = ["BandVisit", "DenseVisit", "LayoutVisit", "Predicate", "TokenMap", "Visit", "block_fits_tiles"]

