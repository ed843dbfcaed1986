"""Neighborhood attention on a token grid (NATTEN semantics), with off-grid global tokens.

``neighborhood(kernel=7, dilation=1, stride=1, grid=(H, W), globals=1)``: the sequence is ``globals`` leading
off-grid tokens (class, register, distillation tokens) followed by a 2-D ``(H, W)`` or 3-D ``(T, H, W)`` grid
in row-major order. ``kernel``, ``dilation`` and ``stride`` are ints (every axis) or per-axis tuples.

Per axis of length ``L`` with kernel ``K``, dilation ``d``, stride ``s``: positions split into ``d``
interleaved sub-sequences (``x mod d``). In a sub-sequence of length ``L_r``, position ``x' = x // d`` belongs
to stride group ``x' // s``, whose window starts at ``clamp(group * s + s // 2 - K // 2, 0, L_r - K)``; the
query attends sub-sequence positions ``[start, start + K)``. Every grid query so sees exactly ``K`` keys per
axis, windows shifting inward at borders; ``stride == kernel`` gives non-overlapping blocked windows (Swin,
HaloNet). A grid query attends the product of its per-axis windows, plus every global token; a global token
attends every token. ``K * d <= L`` is required on every axis (so ``K <= L_r`` for every sub-sequence) and
``1 <= s <= K`` (as NATTEN). The ScoreMods (bias, mask, softcap; causality if given) apply on top; a query
row with no visible key returns zeros.

``grid=None`` means "the site's grid": ``supports`` reads ``site.grid``/``site.grid_prefix`` (the planner then
fills ``grid`` and ``globals`` in); ``forward`` needs ``grid`` set.

The forward tiles the grid: queries go in tiles of ``t`` positions per axis (within one dilation
sub-sequence); each tile scores a key region holding all its queries' windows (``t + K - 1`` positions per
axis where undilated and unstrided) and masks per element with one additive term per axis. Where the tile
size divides the axis, the regions start evenly and are one overlapping strided view of the padded grid;
elsewhere they are strided slices. Work per query is ``prod(t + K - 1)`` pairs, never ``N x N``. Chunks of
tile rows run on ``blocks.run_tasks`` worker threads on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import ClassVar, Optional, Union

import sympy
import torch
from torch import Tensor

from attncc.errors import AttnccError
from attncc.util import cdiv
from attncc.variants.base import (
    ScoreMods, VariantSpec, attention_cost, check_int, check_self_attention, site_sizes, sink_rows,
    softmax_with_sink, unapplied_site_features,
)
from attncc.variants.blocks import DEAD, MASKED, dense_rows, gather_pairs, run_tasks
from attncc.variants.exact import masked_reference
from attncc.variants.registry import register_variant

Axes = Union[int, tuple[int, ...]]

CHUNK_FLOATS = 1 << 20
"""Scores per chunk of tiles (4 MB): cache-sized chunks keep the elementwise passes fast on CPU."""


@register_variant
@dataclass(frozen=True)
class NeighborhoodSpec(VariantSpec):
    """Neighborhood attention over a 2-D or 3-D token grid (see the module docstring)."""

    kernel: Axes = 7
    dilation: Axes = 1
    stride: Axes = 1
    grid: Optional[tuple[int, ...]] = None
    globals: int = 0

    name: ClassVar[str] = "neighborhood"
    listed: ClassVar[int] = 20

    @classmethod
    def examples(cls) -> tuple[VariantSpec, ...]:
        # EXAMPLE_TOKENS = 19 tokens: global tokens + grid
        return (cls(kernel=3, grid=(4, 4), globals=3), cls(kernel=(3, 3), dilation=(1, 2), grid=(3, 6), globals=1),
                cls(kernel=(1, 3, 3), stride=(1, 3, 2), grid=(2, 3, 3), globals=1))

    @classmethod
    def exact_limit(cls, n: int) -> VariantSpec:
        # a window over the whole 2 x 2 grid, and every other token global: each token sees all n
        return cls(kernel=2, grid=(2, 2), globals=n - 4)

    def __post_init__(self):
        for field_name in ("kernel", "dilation", "stride", "grid"):
            value = getattr(self, field_name)
            if isinstance(value, list):  # lists from YAML policies: canonical text shows tuples
                object.__setattr__(self, field_name, tuple(value))
        ranks = {self._axes_rank(field_name) for field_name in ("kernel", "dilation", "stride")}
        if self.grid is not None:
            self._check_grid_sizes()
            ranks.add(len(self.grid))
        ranks.discard(None)
        if len(ranks) > 1:
            raise self.invalid("kernel", f"dilation, stride and grid must have the same number of axes, got "
                                         f"kernel={self.kernel!r}, dilation={self.dilation!r}, "
                                         f"stride={self.stride!r}, grid={self.grid!r}")
        check_int(self, "globals", self.globals)
        rank = ranks.pop() if ranks else 2
        kernel, stride = _per_axis(self.kernel, rank), _per_axis(self.stride, rank)
        for axis, (k, s) in enumerate(zip(kernel, stride)):
            if s > k:
                raise self.invalid("stride", f"must be <= kernel on every axis (1 <= stride <= kernel), got "
                                             f"stride {s} > kernel {k} on axis {axis}")
        if self.grid is not None:
            problem = self._grid_problem(self.grid)
            if problem:
                raise self.invalid("kernel", problem)

    def _axes_rank(self, field_name: str) -> Optional[int]:
        """How many axes ``kernel``, ``dilation`` or ``stride`` gives (None for one int for every axis); an
        error unless it is an int >= 1 or a tuple of 2 or 3 of them."""
        value = getattr(self, field_name)
        if isinstance(value, tuple):
            if len(value) in (2, 3) and all(_is_int(x) and x >= 1 for x in value):
                return len(value)
        elif _is_int(value) and value >= 1:
            return None
        raise self.invalid(field_name, f"must be an integer >= 1 or a tuple of 2 or 3 of them, got {value!r}")

    def _check_grid_sizes(self) -> None:
        """An error unless ``grid`` is a tuple (H, W) or (T, H, W) of integers >= 1."""
        if not isinstance(self.grid, tuple) or len(self.grid) not in (2, 3) or not all(
            _is_int(x) and x >= 1 for x in self.grid
        ):
            raise self.invalid("grid", f"must be None or a tuple (H, W) or (T, H, W) of integers >= 1, "
                                       f"got {self.grid!r}")

    # ------------------------------------------------------------------------------------------ pattern

    def axes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(kernel, dilation, stride) per axis for a grid of ``rank`` axes."""
        return _per_axis(self.kernel, rank), _per_axis(self.dilation, rank), _per_axis(self.stride, rank)

    def _grid_problem(self, grid: tuple[int, ...]) -> str:
        """Why ``grid`` cannot run this kernel ('' when it can)."""
        for name in ("kernel", "dilation", "stride"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != len(grid):
                return f"{name} {value!r} has {len(value)} axes, the grid {grid!r} has {len(grid)}"
        kernel, dilation, _ = self.axes(len(grid))
        for axis, (length, k, d) in enumerate(zip(grid, kernel, dilation)):
            if k * d > length:
                return (f"kernel * dilation must be <= the grid size on every axis, got {k} * {d} > {length} on "
                        f"axis {axis} of grid {grid!r}")
        return ""

    def keep(self, n: int, device=None) -> Tensor:
        """The pattern as a dense ``[N, N]`` bool mask (for references and tests; O(N^2))."""
        grid = self.grid_for_run(n)
        kernel, dilation, stride = self.axes(len(grid))
        vis = torch.ones(1, 1, dtype=torch.bool, device=device)
        for length, k, d, s in zip(grid, kernel, dilation, stride):
            axis = axis_neighbors(length, k, d, s).to(device)
            vis = (vis[:, None, :, None] & axis[None, :, None, :]).reshape(vis.shape[0] * length, -1)
        keep = torch.ones(n, n, dtype=torch.bool, device=device)
        keep[self.globals:, self.globals:] = vis
        return keep

    def grid_for_run(self, n: int) -> tuple[int, ...]:
        """The grid of an ``n``-token call, or an error saying why this spec cannot run on ``n`` tokens."""
        if self.grid is None:
            raise AttnccError(f"{self.name}: grid must be set to run (the planner fills it from the site), e.g. "
                              f"neighborhood(kernel=7, grid=(14, 14))")
        if n != self.globals + math.prod(self.grid):
            raise AttnccError(f"{self.name}: {n} tokens do not match globals={self.globals} + grid {self.grid} "
                              f"= {self.globals + math.prod(self.grid)}")
        return self.grid

    # ----------------------------------------------------------------------------------------- contract

    def supports(self, site) -> tuple[bool, str]:
        """Bidirectional self-attention over a known token grid (``self.grid`` or ``site.grid``), without
        dropout or segment masks; bias, softcap, padding and dense masks are applied."""
        if site.kind != "self":
            return False, "neighborhood attention needs self-attention over grid tokens, this site is cross-attention"
        if site.causal:
            return False, "neighborhood attention is bidirectional, this site is causal"
        reason = unapplied_site_features(self, site, band=False)
        if reason:
            return False, reason
        grid, prefix = (self.grid, self.globals) if self.grid is not None else (site.grid, site.grid_prefix)
        if grid is None:
            return False, "the site's token grid is unknown (not a patch grid); give grid=(H, W) or (T, H, W)"
        if len(grid) not in (2, 3):
            return False, f"the token grid {grid} is not 2-D or 3-D"
        for length in (site.q_len, site.kv_len):
            if isinstance(length, int) and length != prefix + math.prod(grid):
                return False, f"{length} tokens are not {prefix} global tokens + grid {grid}"
        problem = self._grid_problem(tuple(grid))
        if problem:
            return False, problem
        kernel, _, _ = self.axes(len(grid))
        return True, f"neighborhood {'x'.join(map(str, kernel))} on grid {'x'.join(map(str, grid))}" + (
            f" + {prefix} global tokens" if prefix else "")

    def specialize(self, site) -> Union[VariantSpec, str]:
        """This spec on the site's token grid (``site.grid``, ``site.grid_prefix`` global tokens) where it names
        none; a model's sliding-window band declines it as for any variant (``VariantSpec.specialize``)."""
        spec = self
        if self.grid is None and site.grid is not None:
            spec = replace(self, grid=site.grid, globals=site.grid_prefix)
        return VariantSpec.specialize(spec, site)

    def pairs(self, site) -> sympy.Expr:
        """Visible (query, key) pairs per (batch, head): ``prod(kernel)`` per grid query, plus global rows and
        columns."""
        n = site_sizes(site)["Nq"]
        grid = self.grid if self.grid is not None else site.grid
        prefix = self.globals if self.grid is not None else site.grid_prefix
        rank = len(grid) if grid is not None else (len(self.kernel) if isinstance(self.kernel, tuple) else 2)
        window = math.prod(self.axes(rank)[0])
        return (n - prefix) * (window + prefix) + prefix * n

    def cost(self, site) -> dict[str, sympy.Expr]:
        """FLOPs and bytes of the visible pairs (see :meth:`pairs`)."""
        return attention_cost(site, self.pairs(site))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        """Tiled neighborhood attention: q ``[B, Hq, N, Dqk]``, k ``[B, Hkv, N, Dqk]``, v ``[B, Hkv, N, Dv]``
        with ``N = globals + prod(grid)`` -> ``[B, Hq, N, Dv]`` in q's dtype (float32 math). Differentiable."""
        n = check_self_attention(self, q, k, v)
        grid = self.grid_for_run(n)
        kernel, dilation, stride = self.axes(len(grid))
        return neighborhood_attention(q, k, v, mods, grid, kernel, dilation, stride, self.globals)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        """Dense float32 oracle with the pattern as an ``N x N`` mask; empty rows -> 0."""
        n = check_self_attention(self, q, k, v)
        return masked_reference(q, k, v, mods, self.keep(n, q.device))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _per_axis(value: Axes, rank: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,) * rank


def window_starts(length: int, kernel: int, stride: int) -> list[int]:
    """Window start of every position of one (undilated) sub-sequence of ``length`` positions."""
    return [min(max((x // stride) * stride + stride // 2 - kernel // 2, 0), length - kernel) for x in range(length)]


def axis_neighbors(length: int, kernel: int, dilation: int, stride: int) -> Tensor:
    """``[L, L]`` bool: query position x sees key position y on one axis (the plain definition)."""
    vis = torch.zeros(length, length, dtype=torch.bool)
    for r in range(dilation):
        sub = list(range(r, length, dilation))
        for xs, start in zip(sub, window_starts(len(sub), kernel, stride)):
            vis[xs, sub[start:start + kernel]] = True
    return vis


@dataclass(frozen=True)
class _AxisTiles:
    """One axis cut into tiles of ``tile`` queries, each inside one dilation sub-sequence.

    Tile i's queries are axis positions ``q_start[i] + step * (0 .. tile-1)`` and its key region (holding
    the windows of all its queries) ``k_start[i] + step * (0 .. region-1)``; both may run past the axis ends,
    which the caller pads by ``pad`` = (before, after). ``q_pos``/``k_pos`` (``[nT, tile]``/``[nT, region]``)
    give the positions, -1 outside the sub-sequence; ``bias`` ``[nT, tile, region]`` is 0 where the query sees
    the key, MASKED elsewhere. ``residues`` lists ``(first tile, sub-sequence length)`` per dilation residue.
    ``q_pad`` is the padding after the axis end the query slices need.
    """

    step: int
    tile: int
    region: int
    q_start: tuple[int, ...]
    k_start: tuple[int, ...]
    pad: tuple[int, int]
    q_pad: int
    residues: tuple[tuple[int, int], ...]
    q_pos: Tensor
    k_pos: Tensor
    bias: Tensor

    def to(self, device) -> "_AxisTiles":
        return _AxisTiles(self.step, self.tile, self.region, self.q_start, self.k_start, self.pad, self.q_pad,
                          self.residues, self.q_pos.to(device), self.k_pos.to(device), self.bias.to(device))


@lru_cache(maxsize=64)
def _axis_tiles(length: int, kernel: int, dilation: int, stride: int, tile: int, uniform: bool) -> _AxisTiles:
    """The tiling of one axis (see :class:`_AxisTiles`), on the CPU.

    ``uniform``: every region starts ``kernel // 2`` before its tile and spans ``tile + kernel - 1``, so the
    region starts step evenly and the regions are one strided view of the padded axis (no gather). Valid for
    ``dilation == stride == 1`` and ``tile`` dividing ``length`` with ``tile > kernel // 2`` (the clamped border
    windows then still fit); otherwise each region is the exact union of its tile's windows.
    """
    tiles, residues = [], []
    for r in range(dilation):
        sub_len = len(range(r, length, dilation))
        starts = window_starts(sub_len, kernel, stride)
        residues.append((len(tiles), sub_len))
        for t0 in range(0, sub_len, tile):
            t1 = min(sub_len, t0 + tile)
            lo, hi = (t0 - kernel // 2, t0 + tile - 1 - kernel // 2 + kernel) if uniform else \
                (starts[t0], starts[t1 - 1] + kernel)
            tiles.append((r, t0, t1, lo, hi, starts[t0:t1], sub_len))
    region = max(hi - lo for _, _, _, lo, hi, _, _ in tiles)
    q_pos = torch.full((len(tiles), tile), -1, dtype=torch.int64)
    k_pos = torch.full((len(tiles), region), -1, dtype=torch.int64)
    bias = torch.full((len(tiles), tile, region), MASKED)
    for i, (r, t0, t1, lo, _, win, sub_len) in enumerate(tiles):
        q_pos[i, :t1 - t0] = r + dilation * torch.arange(t0, t1)
        inside = torch.arange(lo, lo + region)
        inside = inside[(inside >= 0) & (inside < sub_len)]
        k_pos[i, inside - lo] = r + dilation * inside
        for a, w0 in enumerate(win):
            if not lo <= w0 <= lo + region - kernel:
                raise AssertionError(f"neighborhood tiling misses a window ({length=}, {kernel=}, {tile=})")
            bias[i, a, w0 - lo:w0 - lo + kernel] = 0.0
    q_start = tuple(r + dilation * t0 for r, t0, *_ in tiles)
    k_start = tuple(r + dilation * lo for r, _, _, lo, *_ in tiles)
    pad = (max(0, -min(k_start)), max(0, max(k_start) + dilation * (region - 1) + 1 - length))
    q_pad = max(0, max(q_start) + dilation * (tile - 1) + 1 - length)
    return _AxisTiles(dilation, tile, region, q_start, k_start, pad, q_pad, tuple(residues), q_pos, k_pos, bias)


def _tiling(length: int, kernel: int, dilation: int, stride: int, rank: int) -> _AxisTiles:
    """The tiling of one axis: uniform (gather-free) where a tile size allows it, else exact regions.

    Tiles of about 8 queries per axis on 2-D grids (4 on 3-D): fewer waste more key work per query
    (``t + K - 1`` keys per axis), more make the matmuls inefficient.
    """
    target = 4 if rank == 3 else 8
    if dilation == 1 and stride == 1:
        fits = [t for t in range(kernel // 2 + 1, length + 1) if length % t == 0]
        if fits:
            best = min(fits, key=lambda t: (abs(t - target) if t <= 2 * target else length, t))
            if best <= 2 * target:
                return _axis_tiles(length, kernel, 1, 1, best, True)
    return _axis_tiles(length, kernel, dilation, stride, max(1, min(length, target)), False)


def neighborhood_attention(
    q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods, grid: tuple[int, ...], kernel: tuple[int, ...],
    dilation: tuple[int, ...], stride: tuple[int, ...], globals_: int = 0, tiles: Optional[tuple[int, ...]] = None,
) -> Tensor:
    """Neighborhood attention over ``grid`` (tokens after ``globals_`` leading global tokens).

    q ``[B, Hq, N, Dqk]``, k ``[B, Hkv, N, Dqk]``, v ``[B, Hkv, N, Dv]``, ``N = globals_ + prod(grid)`` ->
    ``[B, Hq, N, Dv]`` in q's dtype. ``tiles`` overrides the queries per tile per axis.
    """
    b, hq, n, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g = hq // hkv
    rank = len(grid)
    dev = q.device
    if tiles is None:
        axes = [_tiling(length, kk, dd, ss, rank).to(dev) for length, kk, dd, ss in zip(grid, kernel, dilation, stride)]
    else:
        axes = [_axis_tiles(length, kk, dd, ss, min(tt, length), False).to(dev)
                for length, kk, dd, ss, tt in zip(grid, kernel, dilation, stride, tiles)]
    tiles = tuple(a.tile for a in axes)
    n_tiles = [len(a.q_start) for a in axes]
    regions = [a.region for a in axes]
    tile_q, tile_k = math.prod(tiles), math.prod(regions)
    strides = [math.prod(grid[i + 1:]) for i in range(rank)]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mods.bias, mods.sinks))
    need_tokens = mods.bias is not None or mods.mask is not None or mods.causal
    sink = sink_rows(mods.sinks, 1, hkv, 1, g, 1, 1)  # learned sink logits against s [B, Hkv, tiles, g, T, R]

    # Grids padded past each axis end so every tile's query and key slices are in bounds (padding is masked).
    qg = _pad_axes((q[:, :, globals_:].float() * mods.scale).reshape(b, hkv, g, *grid, d), axes, 3, "q")
    kg = _pad_axes(k[:, :, globals_:].float().reshape(b, hkv, *grid, d), axes, 2, "k")
    vg = _pad_axes(v[:, :, globals_:].float().reshape(b, hkv, *grid, dv), axes, 2, "k")
    k_pre, v_pre = k[:, :, :globals_].float().unsqueeze(2), v[:, :, :globals_].float().unsqueeze(2)

    per_tile_row = math.prod(n_tiles[1:]) * b * hq * tile_q * (tile_k + globals_)
    # Chunks of tile rows small enough for the cache, and at least one per worker thread where possible.
    step = max(1, min(CHUNK_FLOATS // per_tile_row, cdiv(n_tiles[0], torch.get_num_threads())))

    def tile_chunk(task) -> Tensor:
        """Tile rows [c0, c1) of the first axis -> outputs [B, Hkv, tiles, g, T, Dv]."""
        c0, c1 = task
        nt = (c1 - c0) * math.prod(n_tiles[1:])
        # [B, Hkv, g, nT0, t0, ..., D] -> [B, Hkv, tiles, g * T, D]: a group's heads share one key region.
        q_c = _slice_axes(qg, axes, "q", first=3, chunk=(c0, c1))
        q_c = q_c.permute(0, 1, *range(3, 3 + 2 * rank, 2), 2, *range(4, 4 + 2 * rank, 2), 3 + 2 * rank)
        q_c = q_c.reshape(b, hkv, nt, g * tile_q, d)
        k_c = _tiles_first(_slice_axes(kg, axes, "k", 2, (c0, c1)), rank).reshape(b, hkv, nt, tile_k, d)
        v_c = _tiles_first(_slice_axes(vg, axes, "k", 2, (c0, c1)), rank).reshape(b, hkv, nt, tile_k, dv)
        s = q_c @ k_c.transpose(-1, -2)  # [B, Hkv, tiles, g*T, R]
        if mods.softcap > 0:
            s = mods.softcap * torch.tanh(s / mods.softcap) if grad else s.div_(mods.softcap).tanh_().mul_(
                mods.softcap)
        # One additive visibility term per axis, broadcast over the others: O(tiles * t * R) per axis.
        s = s.view(b, hkv, c1 - c0, *n_tiles[1:], g, *tiles, *regions)
        for axis, ax in enumerate(axes):
            part = (ax.bias[c0:c1] if axis == 0 else ax.bias).view(
                _axis_view(rank, axis, c1 - c0 if axis == 0 else n_tiles[axis], tiles[axis], regions[axis]))
            s = s + part if grad else s.add_(part)
        s = s.reshape(b, hkv, nt, g, tile_q, tile_k)
        if need_tokens:
            q_sel = [axes[0].q_pos[c0:c1]] + [a.q_pos for a in axes[1:]]
            k_sel = [axes[0].k_pos[c0:c1]] + [a.k_pos for a in axes[1:]]
            q_pos = _grid_tokens(q_sel, strides, globals_).reshape(nt, tile_q).clamp_min(0)
            k_pos = _grid_tokens(k_sel, strides, globals_).reshape(nt, tile_k).clamp_min(0)
            s = _tile_mods(s, mods, q_pos, k_pos, hkv, g)
        if globals_:
            sp = (q_c @ k_pre.transpose(-1, -2)).view(b, hkv, nt, g, tile_q, globals_)
            if mods.softcap > 0:
                sp = mods.softcap * torch.tanh(sp / mods.softcap)
            if need_tokens:
                sp = _prefix_mods(sp, mods, q_pos, globals_, hkv, g)
            s = torch.cat([sp, s], dim=-1)
        p = softmax_with_sink(s, sink)
        if mods.mask is not None:
            p = p * (s.amax(-1, keepdim=True) > DEAD)
        p = p.view(b, hkv, nt, g * tile_q, -1)
        if globals_:
            o = p[..., :globals_] @ v_pre + p[..., globals_:] @ v_c
        else:
            o = p @ v_c
        return o.view(b, hkv, nt, g, tile_q, dv)

    outs = run_tasks(tile_chunk, [(c0, min(n_tiles[0], c0 + step)) for c0 in range(0, n_tiles[0], step)], dev)
    out = torch.cat(outs, dim=2).view(b, hkv, *n_tiles, g, *tiles, dv)
    # [B, Hkv, nT..., g, t..., Dv] -> [B, Hq, nT0 * t0, ...]; then each axis back in position order.
    out = out.permute(0, 1, 2 + rank, *[i for a in range(rank) for i in (2 + a, 3 + rank + a)], 3 + 2 * rank)
    out = out.reshape(b, hq, *[nt_ * t for nt_, t in zip(n_tiles, tiles)], dv)
    for axis, ax in enumerate(axes):
        out = _unslice_axis(out, ax, grid[axis], dim=2 + axis)
    out = out.reshape(b, hq, n - globals_, dv)
    if globals_:
        out = torch.cat([dense_rows(q, k, v, mods, globals_), out], dim=2)
    return out.to(q.dtype)


def _pad_axes(x: Tensor, axes: list[_AxisTiles], first: int, which: str) -> Tensor:
    """Zero-pad grid axis ``first + a`` for the query (``which="q"``) or key slices of ``axes[a]``."""
    for axis, ax in enumerate(axes):
        pad = (0, ax.q_pad) if which == "q" else ax.pad
        if pad != (0, 0):
            dim = first + axis
            parts = []
            for size in pad:
                shape = list(x.shape)
                shape[dim] = size
                parts.append(x.new_zeros(shape))
            x = torch.cat([parts[0], x, parts[1]], dim=dim)
    return x


def _slice_axes(x: Tensor, axes: list[_AxisTiles], which: str, first: int, chunk: tuple[int, int]) -> Tensor:
    """Each tile's queries (``which="q"``) or key region (``"k"``) along every (padded) grid axis: axis ``a``
    at ``first + a`` becomes ``(nT_a, P_a)``. Evenly spaced starts give one overlapping strided view (no
    copy); others are strided slices stacked. The first axis takes tiles ``chunk[0]:chunk[1]`` only."""
    for axis, ax in enumerate(axes):
        dim = first + 2 * axis
        starts = ax.q_start if which == "q" else ax.k_start
        size = ax.tile if which == "q" else ax.region
        if axis == 0:
            starts = starts[chunk[0]:chunk[1]]
        starts = [s + (0 if which == "q" else ax.pad[0]) for s in starts]
        gaps = {b - a for a, b in zip(starts, starts[1:])}
        # one view needs one positive gap: tiles that share their key region (a kernel as wide as its axis) stack
        if ax.step == 1 and len(gaps) <= 1 and 0 not in gaps:
            gap = gaps.pop() if gaps else 1
            x = x.narrow(dim, starts[0], gap * (len(starts) - 1) + size).unfold(dim, size, gap).movedim(-1, dim + 1)
            continue
        span = ax.step * (size - 1) + 1
        lead = (slice(None),) * dim
        x = torch.stack([x.narrow(dim, s, span)[lead + (slice(None, None, ax.step),)] for s in starts], dim=dim)
    return x


def _unslice_axis(out: Tensor, ax: _AxisTiles, length: int, dim: int) -> Tensor:
    """Undo the query tiling of one axis: ``dim`` holds ``nT * t`` (tile, slot) rows, residue by residue;
    returns the ``length`` positions in axis order."""
    t = ax.tile
    if ax.step == 1:
        return out.narrow(dim, 0, length)
    longest = cdiv(length, ax.step)
    parts = []
    for first_tile, sub_len in ax.residues:
        part = out.narrow(dim, first_tile * t, sub_len)
        if sub_len < longest:
            shape = list(part.shape)
            shape[dim] = longest - sub_len
            part = torch.cat([part, part.new_zeros(shape)], dim=dim)
        parts.append(part)
    # Position x = r + step * x': interleave the residues' sub-sequences.
    return torch.stack(parts, dim=dim + 1).flatten(dim, dim + 1).narrow(dim, 0, length)


def _tiles_first(x: Tensor, rank: int) -> Tensor:
    """``[B, H, nT0, P0, nT1, P1, ..., D]`` -> ``[B, H, nT0, nT1, ..., P0, P1, ..., D]``."""
    return x.permute(0, 1, *range(2, 2 + 2 * rank, 2), *range(3, 3 + 2 * rank, 2), 2 + 2 * rank)


def _tile_mods(s: Tensor, mods: ScoreMods, q_pos: Tensor, k_pos: Tensor, hkv: int, g: int) -> Tensor:
    """Bias, mask and causality at each tile's (query, key-region) pairs; s ``[B, Hkv, tiles, g, T, R]``."""
    nt, tile_q = q_pos.shape
    tile_k = k_pos.shape[1]
    if mods.bias is not None:
        s = s + gather_pairs(mods.bias, q_pos, k_pos.view(1, 1, nt, 1, tile_k), hkv, g).float()
    keep = None
    if mods.mask is not None:
        keep = gather_pairs(mods.mask, q_pos, k_pos.view(1, 1, nt, 1, tile_k), hkv, g)
    if mods.causal:
        causal = (k_pos[:, None, :] <= q_pos[:, :, None]).view(1, 1, nt, 1, tile_q, tile_k)
        keep = causal if keep is None else keep & causal
    return s if keep is None else s.masked_fill(~keep, MASKED)


def _prefix_mods(sp: Tensor, mods: ScoreMods, q_pos: Tensor, prefix: int, hkv: int, g: int) -> Tensor:
    """Bias, mask and causality on the global-key columns ``[B, Hkv, tiles, g, T, prefix]``."""
    nt, tile_q = q_pos.shape
    pre = torch.arange(prefix, device=sp.device).view(1, 1, 1, 1, prefix)
    if mods.bias is not None:
        sp = sp + gather_pairs(mods.bias, q_pos, pre, hkv, g).float()
    keep = None
    if mods.mask is not None:
        keep = gather_pairs(mods.mask, q_pos, pre, hkv, g)
    if mods.causal:
        causal = (pre.view(1, prefix) <= q_pos.view(nt, tile_q, 1)).view(1, 1, nt, 1, tile_q, prefix)
        keep = causal if keep is None else keep & causal
    return sp if keep is None else sp.masked_fill(~keep, MASKED)


def _axis_view(rank: int, axis: int, n_tiles: int, tile: int, region: int) -> list[int]:
    """Shape putting one axis' ``[nT, t, R]`` term into scores ``[B, Hkv, nT..., g, t..., R...]``."""
    shape = [1] * (2 + rank + 1 + 2 * rank)
    shape[2 + axis] = n_tiles
    shape[2 + rank + 1 + axis] = tile
    shape[2 + rank + 1 + rank + axis] = region
    return shape


def _grid_tokens(per_axis: list[Tensor], strides: list[int], offset: int) -> Tensor:
    """Token index of every combination of per-axis positions ``[nT_a, P_a]``, laid out as
    ``[nT_0, ..., nT_{r-1}, P_0, ..., P_{r-1}]``; -1 where any axis position is padding."""
    rank = len(per_axis)
    tok = None
    bad = None
    for axis, pos in enumerate(per_axis):
        shape = [1] * (2 * rank)
        shape[axis], shape[rank + axis] = pos.shape
        term = pos.view(shape)
        tok = term * strides[axis] if tok is None else tok + term * strides[axis]
        bad = (term < 0) if bad is None else bad | (term < 0)
    return torch.where(bad, torch.full_like(tok, -1), tok + offset)


__all__ = ["NeighborhoodSpec", "axis_neighbors", "neighborhood_attention", "window_starts"]
