"""Static block-sparse attention: a fixed pattern over ``block x block`` tiles of the score matrix.

``BlockSparseSpec(pattern=bigbird(window=3, globals=1, random=2, seed=0), block=64)`` reads as text
``block_sparse(pattern=bigbird(window=3, globals=1, random=2, seed=0), block=64)``. Query block ``i`` covers
queries ``[i * block, (i + 1) * block)`` and key block ``j`` keys ``[j * block, (j + 1) * block)``; a pattern
says which key blocks each query block visits, and inside a visited block every (query, key) pair is scored
(subject to the ScoreMods: causality, mask, bias, softcap). Patterns (``PATTERNS``, by the name the text uses):

* ``bigbird(window, globals, random, seed)`` (BigBird, Zaheer et al. 2020): key blocks within ``window``
  blocks either side of the query block, the first ``globals`` key blocks (global columns), ``random`` further
  key blocks per query block drawn deterministically from ``seed``; the first ``globals`` query blocks attend
  every key block (global rows).
* ``radial(window)`` (after Radial Attention, Li et al. 2025: density decaying with distance): with block
  distance ``d = |query block - key block|``, every block with ``d <= window``; beyond, band ``j >= 1`` holds
  ``window * 2**(j-1) < d <= window * 2**j`` and keeps the blocks with ``d % 2**j == 0``, i.e. every 2nd block
  in band 1, every 4th in band 2, ... About ``window * (2 + log2(n / window))`` blocks per query block.
* ``power(window, sinks)`` (after PowerAttention, 2025): key blocks at distance ``d <= window`` or ``d`` a
  power of two (1, 2, 4, 8, ...), plus the first ``sinks`` key blocks. About ``2 * (window + log2 n) + sinks``.
* ``mask_mod(name, key)``: a user predicate ``keep(q_idx, kv_idx) -> bool`` (FlexAttention's ``mask_mod``
  without batch and head) over broadcasting int64 index tensors; build one with ``mask_mod_pattern(fn)``.
  Inside a visited block the predicate is applied per element, so the result is exactly "attend where
  ``keep`` is True". A callable cannot be written as text, so the pattern is named by the callable's
  qualname and a key into a registry of this process: the text parses back only in the process that
  registered it (not portable across processes).

Named patterns are computed at block granularity from formulas (never from an element predicate), are
symmetric without causality, and under causality drop key blocks entirely in the future (the diagonal block
is partially visible). With ``window`` covering every block (or an always-True ``mask_mod``) the result
equals exact attention. A query that sees no key returns zeros.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import Callable, ClassVar, Optional

import sympy
import torch
from torch import Tensor

from attncc.errors import AttnccError
from attncc.util import cdiv, rows_of
from attncc.variants.base import (
    ScoreMods, VariantSpec, attention_cost, check_int, site_sizes, unapplied_site_features,
)
from attncc.variants.blocks import BlockLayout, block_sparse_attention, layout_from_keep
from attncc.variants.exact import masked_reference
from attncc.variants.registry import register_variant

# --------------------------------------------------------------------------------------------- patterns


class Pattern:
    """Base of block patterns: frozen dataclasses whose ``repr()`` is their canonical call text."""

    kind: ClassVar[str] = ""

    def __repr__(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.init)
        return f"{self.kind}({args})"

    def invalid(self, field_name: str, message: str) -> AttnccError:
        """The error for a bad pattern parameter: ``block_sparse: bigbird.window must be ...``."""
        return AttnccError(f"block_sparse: {self.kind}.{field_name} {message}")


class NamedPattern(Pattern):
    """A pattern given by a formula at block granularity."""

    global_rows: ClassVar[int] = 0
    """How many leading query blocks visit every allowed key block (BigBird's global rows)."""

    def blocks(self, nqb: int, nkb: int, causal: bool) -> Tensor:
        """Visited key blocks per query block: int64 ``[nqb, K]`` on the CPU, ascending, ``-1`` padding last.

        The first ``global_rows`` rows are left empty (all ``-1``): they visit every allowed key block, and
        listing that would widen every row to ``nKB`` entries. ``O(nqb * K)`` time and memory.
        """
        raise NotImplementedError

    def block_mask(self, nqb: int, nkb: int, causal: bool) -> Tensor:
        """The whole pattern as a bool ``[nqb, nkb]`` block grid, global rows included (references, tests)."""
        keep = blocks_to_keep(self.blocks(nqb, nkb, causal), nkb)
        g = min(self.global_rows, nqb)
        keep[:g] = True
        if causal:
            keep &= torch.ones(nqb, nkb, dtype=torch.bool).tril()
        return keep

    def approx_blocks_per_row(self, nkb: sympy.Expr) -> sympy.Expr:
        """About how many key blocks a (non-global) query block visits without causality, for dynamic sizes."""
        raise NotImplementedError


def _distance_blocks(nqb: int, nkb: int, causal: bool, distances: list[int], extra: Optional[Tensor] = None):
    """Key blocks at the given block distances from each query block (both sides unless causal).

    ``extra`` is an int64 ``[nqb, E]`` of further candidate blocks (``-1`` = none), merged in.
    """
    qb = torch.arange(nqb)[:, None]
    d = torch.tensor(sorted(set(distances)), dtype=torch.long)[None, :]
    cands = [qb - d] if causal else [qb - d, qb + d]
    if extra is not None:
        cands.append(extra)
    return pack_blocks(torch.cat(cands, dim=1), nqb, nkb, causal)


def pack_blocks(cand: Tensor, nqb: int, nkb: int, causal: bool) -> Tensor:
    """Candidates ``[nqb, C]`` -> valid, deduplicated, ascending per row, ``-1`` padding last, width trimmed."""
    qb = torch.arange(nqb)[:, None]
    bad = (cand < 0) | (cand >= nkb)
    if causal:
        bad |= cand > qb
    c = cand.masked_fill(bad, nkb).sort(dim=1).values
    dup = torch.zeros_like(c, dtype=torch.bool)
    dup[:, 1:] = c[:, 1:] == c[:, :-1]
    c = c.masked_fill(dup, nkb).sort(dim=1).values
    return _trim(c.masked_fill(c >= nkb, -1))


def _trim(blocks: Tensor) -> Tensor:
    """Drop padding columns no row needs (keeping at least one column)."""
    width = max(1, int((blocks >= 0).sum(dim=-1).max())) if blocks.numel() else 1
    return blocks[..., :width].contiguous()


@dataclass(frozen=True, repr=False)
class BigBirdPattern(NamedPattern):
    """BigBird: ``window`` neighbour blocks each side, ``globals`` global blocks (rows and columns) and
    ``random`` random key blocks per query block, drawn from ``seed`` among the blocks not already visited."""

    kind: ClassVar[str] = "bigbird"
    window: int = 3
    globals: int = 1
    random: int = 2
    seed: int = 0

    def __post_init__(self):
        for name in ("window", "globals", "random", "seed"):
            check_int(self, name, getattr(self, name))

    def blocks(self, nqb: int, nkb: int, causal: bool) -> Tensor:
        g = min(self.globals, nkb)
        extra = [torch.arange(g).expand(nqb, g)]
        if self.random > 0:
            extra.append(self._random(nqb, nkb, causal))
        window = list(range(min(self.window, max(nqb, nkb)) + 1))
        out = _distance_blocks(nqb, nkb, causal, window, torch.cat(extra, dim=1))
        out[: self.globals] = -1
        return _trim(out)

    def _random(self, nqb: int, nkb: int, causal: bool) -> Tensor:
        """``random`` distinct key blocks per query block (``-1`` where fewer are left), ``[nqb, random]``.

        Drawn among the allowed blocks that neither the window nor the global columns give (as BigBird does),
        without a ``[nqb, nkb]`` grid: those blocks are two ranges, ``[globals, lo)`` and ``(hi, last]``,
        so the j-th draw is an index into their concatenation, shifted past the earlier draws.
        """
        qb = torch.arange(nqb)
        last = qb if causal else torch.full_like(qb, nkb - 1)
        lo = torch.clamp(qb - self.window, min=self.globals)  # first window block past the globals
        hi = torch.minimum(qb + self.window, last)
        left = torch.clamp(lo - self.globals, min=0)
        count = left + torch.clamp(last - torch.maximum(hi, lo - 1), min=0)
        u = torch.rand(nqb, min(self.random, nkb), generator=torch.Generator().manual_seed(self.seed), dtype=torch.float64)
        chosen = []
        for j in range(u.shape[1]):
            # Uniform over the count - j indices not drawn yet, then step over the drawn ones (ascending).
            x = (u[:, j] * (count - j).clamp(min=0)).long()
            for s_ in torch.stack(chosen, 1).sort(dim=1).values.unbind(1) if chosen else ():
                x = x + (x >= s_).long()
            chosen.append(torch.where(count > j, x, torch.full_like(x, nkb + 1)))
        idx = torch.stack(chosen, dim=1)
        right_start = torch.maximum(hi, lo - 1)[:, None] + 1
        block = torch.where(idx < left[:, None], self.globals + idx, right_start + idx - left[:, None])
        return block.masked_fill(idx > nkb, -1)

    @property
    def global_rows(self) -> int:
        return self.globals

    def approx_blocks_per_row(self, nkb):
        return sympy.Min(nkb, 2 * self.window + 1 + self.globals + self.random)


def _radial_distances(window: int, nkb: int) -> list[int]:
    out = list(range(min(window, nkb - 1) + 1))
    j = 1
    while window * 2 ** (j - 1) + 1 < nkb:
        step = 2 ** j
        lo, hi = window * 2 ** (j - 1) + 1, min(window * 2 ** j, nkb - 1)
        out.extend(range(cdiv(lo, step) * step, hi + 1, step))
        j += 1
    return out


@dataclass(frozen=True, repr=False)
class RadialPattern(NamedPattern):
    """Radial: dense within ``window`` blocks; band ``j`` (``window*2**(j-1) < d <= window*2**j``) keeps every
    ``2**j``-th distance, so density halves each time the distance doubles (O(log n) blocks per row)."""

    kind: ClassVar[str] = "radial"
    window: int = 2

    def __post_init__(self):
        check_int(self, "window", self.window, minimum=1)

    def blocks(self, nqb: int, nkb: int, causal: bool) -> Tensor:
        return _distance_blocks(nqb, nkb, causal, _radial_distances(self.window, max(nqb, nkb)))

    def approx_blocks_per_row(self, nkb):
        w = self.window
        return sympy.Min(nkb, 2 * w + 1 + w * sympy.log(sympy.Max(nkb, w) / w, 2))


@dataclass(frozen=True, repr=False)
class PowerPattern(NamedPattern):
    """PowerAttention at block granularity: distances ``d <= window`` and ``d = 2**i``, plus ``sinks`` first
    key blocks; the receptive field doubles with each power, so log2(n) blocks reach the whole sequence."""

    kind: ClassVar[str] = "power"
    window: int = 1
    sinks: int = 1

    def __post_init__(self):
        check_int(self, "window", self.window)
        check_int(self, "sinks", self.sinks)

    def blocks(self, nqb: int, nkb: int, causal: bool) -> Tensor:
        n = max(nqb, nkb)
        dist = list(range(min(self.window, n) + 1)) + [2 ** i for i in range(max(1, n).bit_length())]
        sinks = torch.arange(min(self.sinks, nkb)).expand(nqb, min(self.sinks, nkb))
        return _distance_blocks(nqb, nkb, causal, dist, sinks)

    def approx_blocks_per_row(self, nkb):
        return sympy.Min(nkb, 2 * (self.window + sympy.log(sympy.Max(nkb, 1), 2)) + 1 + self.sinks)


_MASK_MODS: dict[int, Callable] = {}
_MASK_MOD_KEYS = itertools.count()
_MASK_MOD_LOCK = threading.Lock()


def mask_mod_pattern(fn: Callable[[Tensor, Tensor], Tensor]) -> "MaskModPattern":
    """The pattern of a predicate ``fn(q_idx, kv_idx) -> bool tensor`` (broadcasting int64 index tensors).

    The callable is kept in this process's registry (registering the same object again gives the same key),
    so ``str()`` of the pattern parses back here, but not in another process.
    """
    if not callable(fn):
        raise AttnccError(f"block_sparse: mask_mod must be a callable (q_idx, kv_idx) -> bool, got {fn!r}")
    with _MASK_MOD_LOCK:
        key = next((k for k, f in _MASK_MODS.items() if f is fn), None)
        if key is None:
            key = next(_MASK_MOD_KEYS)
            _MASK_MODS[key] = fn
    return MaskModPattern(name=_qualname(fn), key=key)


def _qualname(fn) -> str:
    return str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)


@dataclass(frozen=True, repr=False)
class MaskModPattern(Pattern):
    """A user predicate registered in this process (see ``mask_mod_pattern``); ``name`` is its qualname."""

    kind: ClassVar[str] = "mask_mod"
    name: str = ""
    key: int = -1

    def __post_init__(self):
        fn = _MASK_MODS.get(self.key) if isinstance(self.key, int) and not isinstance(self.key, bool) else None
        if fn is None:
            raise self.invalid(
                "key", f"must name a predicate registered in this process with mask_mod_pattern(fn), got "
                f"{self.key!r} (mask_mod patterns are not portable across processes)"
            )
        if self.name != _qualname(fn):
            raise self.invalid(
                "name", f"must be {_qualname(fn)!r} (the qualname of predicate {self.key}), got {self.name!r}"
            )

    @property
    def fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        return _MASK_MODS[self.key]

    def keep(self, causal: bool) -> Callable[[Tensor, Tensor], Tensor]:
        """The element predicate, with causality folded in so future blocks drop out of the layout."""
        fn = self.fn
        if not causal:
            return fn
        return lambda qi, ki: fn(qi, ki) & (ki <= qi)


PATTERNS: dict[str, type] = {
    "bigbird": BigBirdPattern, "radial": RadialPattern, "power": PowerPattern, "mask_mod": MaskModPattern,
}

# ----------------------------------------------------------------------------------------------- helpers


def block_keep_to_elements(block_keep: Tensor, block_q: int, block_k: int, nq: int, nk: int) -> Tensor:
    """Expand a block mask ``[..., nQB, nKB]`` to the element mask ``[..., Nq, Nk]`` (for references only)."""
    e = block_keep.repeat_interleave(block_q, dim=-2).repeat_interleave(block_k, dim=-1)
    return e[..., :nq, :nk]


def blocks_to_keep(kv_blocks: Tensor, nkb: int) -> Tensor:
    """Padded index lists ``[..., nQB, K]`` (``-1`` = none) -> bool block mask ``[..., nQB, nKB]``."""
    keep = torch.zeros(*kv_blocks.shape[:-1], nkb + 1, dtype=torch.bool, device=kv_blocks.device)
    keep.scatter_(-1, kv_blocks.masked_fill(kv_blocks < 0, nkb), True)
    return keep[..., :nkb]


@lru_cache(maxsize=64)
def named_blocks(pattern: NamedPattern, nqb: int, nkb: int, causal: bool, device: str) -> Tensor:
    """``pattern.blocks(nqb, nkb, causal)`` (int64 ``[nQB, K]``, ``-1`` padding) on ``device``, cached: the
    torch path and the kernels read the same lists."""
    return pattern.blocks(nqb, nkb, causal).to(device)


@lru_cache(maxsize=32)
def mask_mod_layout(pattern: MaskModPattern, nq: int, nk: int, block: int, causal: bool, device: str):
    """The :class:`BlockLayout` of ``block x block`` tiles a mask_mod predicate visits at these sizes (found by
    evaluating the predicate; cached), with its partially visible blocks marked."""
    return layout_from_keep(pattern.keep(causal), nq, nk, block, block, torch.device(device))


# ------------------------------------------------------------------------------------------------- spec


@register_variant
@dataclass(frozen=True)
class BlockSparseSpec(VariantSpec):
    """Static block-sparse attention with a named ``pattern`` (see ``PATTERNS``) over ``block``-sized tiles."""

    name: ClassVar[str] = "block_sparse"
    listed: ClassVar[int] = 30
    pattern: Optional[Pattern] = None
    """Required; None only so that a missing pattern is a clear error rather than a TypeError."""
    block: int = 64

    @classmethod
    def examples(cls) -> tuple[VariantSpec, ...]:
        return (cls(pattern=BigBirdPattern(window=1, globals=1, random=1), block=4),
                cls(pattern=RadialPattern(window=1), block=2), cls(pattern=PowerPattern(window=1, sinks=1), block=4))

    @classmethod
    def exact_limit(cls, n: int) -> VariantSpec:
        return cls(pattern=RadialPattern(window=n), block=4)  # every block within n blocks: all of them

    def __post_init__(self):
        if not isinstance(self.pattern, Pattern):
            raise self.invalid(
                "pattern", f"must be one of {', '.join(f'{n}(...)' for n in PATTERNS)}, got {self.pattern!r}"
            )
        check_int(self, "block", self.block, minimum=1)

    # ------------------------------------------------------------------------------------------ supports

    def supports(self, site) -> tuple[bool, str]:
        """Self-attention-shaped sites (Nq == Nk for named patterns) without dropout or band/segment masks."""
        reason = unapplied_site_features(self, site, band=True)
        if reason:
            return False, reason
        if isinstance(self.pattern, NamedPattern) and site.q_len != site.kv_len:
            return False, (
                f"pattern {self.pattern.kind} needs as many queries as keys (Nq={site.q_len}, Nk={site.kv_len})"
            )
        return True, f"static block-sparse pattern {self.pattern!r}"

    # ---------------------------------------------------------------------------------------------- cost

    def cost(self, site) -> dict[str, sympy.Expr]:
        """Attention cost over the visited blocks (every element of a visited block counts as scored, as a
        block kernel computes it); exact counts at static sizes, a formula for dynamic ones."""
        return attention_cost(site, self.pairs(site))

    def pairs(self, site) -> sympy.Expr:
        """(query, key) pairs scored per (batch, head) at the site's sizes."""
        b = self.block
        if isinstance(site.q_len, int) and isinstance(site.kv_len, int):
            nq, nk = site.q_len, site.kv_len
            if isinstance(self.pattern, MaskModPattern):
                layout = mask_mod_layout(self.pattern, nq, nk, b, bool(site.causal), "cpu")
                blocks = layout.kv_blocks
            else:
                blocks = named_blocks(self.pattern, cdiv(nq, b), cdiv(nk, b), bool(site.causal), "cpu")
            rows = torch.clamp(nq - torch.arange(blocks.shape[0]) * b, max=b)
            cols = torch.clamp(nk - blocks * b, max=b).masked_fill(blocks < 0, 0).sum(dim=1)
            g = min(getattr(self.pattern, "global_rows", 0), blocks.shape[0])
            if g:
                full = torch.full((g,), nk)
                cols[:g] = torch.clamp((torch.arange(g) + 1) * b, max=nk) if site.causal else full
            return sympy.Integer(int((rows * cols).sum()))
        s = site_sizes(site)
        nq, nk = s["Nq"], s["Nk"]
        if isinstance(self.pattern, MaskModPattern):
            return nq * nk  # unknown predicate at unknown sizes: the dense bound
        nkb = sympy.ceiling(nk / b)
        full = self.pattern.global_rows * b * nk
        return sympy.Min(nq * nk, nq * b * self.pattern.approx_blocks_per_row(nkb) + full)

    # ------------------------------------------------------------------------------------------- forward

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        """Block-sparse attention. q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``, v ``[B, Hkv, Nk, Dv]`` ->
        ``[B, Hq, Nq, Dv]`` in q's dtype; only visited blocks are computed (no N x N tensor)."""
        nq, nk, b = q.shape[-2], k.shape[-2], self.block
        device = str(q.device)
        if isinstance(self.pattern, MaskModPattern):
            layout = mask_mod_layout(self.pattern, nq, nk, b, mods.causal, device)
            return block_sparse_attention(q, k, v, layout, mods, keep=self.pattern.fn)
        nqb, nkb = cdiv(nq, b), cdiv(nk, b)
        blocks = named_blocks(self.pattern, nqb, nkb, mods.causal, device)
        out = block_sparse_attention(q, k, v, BlockLayout(b, b, nq, nk, blocks), mods)
        g = min(self.pattern.global_rows, nqb)
        if g == 0:
            return out
        # Global query rows visit every allowed key block: they run as their own short batch of rows (one
        # long list each) so the other rows keep short lists; their rows of `out` are empty and replaced.
        rows = min(nq, g * b)
        every = pack_blocks(torch.arange(nkb).expand(g, nkb), g, nkb, mods.causal).to(q.device)
        head_mods = replace(mods, bias=rows_of(mods.bias, 0, rows), mask=rows_of(mods.mask, 0, rows))
        head = block_sparse_attention(q[..., :rows, :], k, v, BlockLayout(b, b, rows, nk, every), head_mods)
        return torch.cat([head, out[..., rows:, :]], dim=-2)

    # ----------------------------------------------------------------------------------------- reference

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        """Float32 oracle with the pattern as a dense ``[Nq, Nk]`` mask; shapes as in ``forward``."""
        nq, nk, b = q.shape[-2], k.shape[-2], self.block
        if isinstance(self.pattern, MaskModPattern):
            rows, cols = torch.arange(nq, device=q.device)[:, None], torch.arange(nk, device=q.device)[None, :]
            keep = self.pattern.fn(rows, cols)
            keep = torch.as_tensor(keep, dtype=torch.bool, device=q.device).expand(nq, nk)
        else:
            grid = self.pattern.block_mask(cdiv(nq, b), cdiv(nk, b), mods.causal).to(q.device)
            keep = block_keep_to_elements(grid, b, b, nq, nk)
        return masked_reference(q, k, v, mods, keep)
