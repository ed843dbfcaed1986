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
sub-sequence), each tile reads the union of its queries' windows (at most ``t - 1 + K`` positions per axis,
gathered once per tile) and masks per element with one additive term per axis. Work per query is
``prod(t + K - 1)`` pairs, never ``N x N``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Optional, Union

import sympy
import torch
from torch import Tensor

from attncc.errors import AttnccError
from attncc.variants.base import ScoreMods, VariantSpec, attention_cost, check_int, site_sizes
from attncc.variants.blocks import DEAD, MASKED, dense_rows, gather_pairs
from attncc.variants.local import masked_reference

Axes = Union[int, tuple[int, ...]]

CHUNK_FLOATS = 1 << 21
"""Scores per chunk of tiles (8 MB): cache-sized chunks keep the elementwise passes fast on CPU."""


@dataclass(frozen=True)
class NeighborhoodSpec(VariantSpec):
    """Neighborhood attention over a 2-D or 3-D token grid (see the module docstring)."""

    kernel: Axes = 7
    dilation: Axes = 1
    stride: Axes = 1
    grid: Optional[tuple[int, ...]] = None
    globals: int = 0

    name: ClassVar[str] = "neighborhood"

    def __post_init__(self):
        for field_name in ("kernel", "dilation", "stride", "grid"):
            value = getattr(self, field_name)
            if isinstance(value, list):  # lists from YAML policies: canonical text shows tuples
                object.__setattr__(self, field_name, tuple(value))
        ranks = set()
        for field_name in ("kernel", "dilation", "stride"):
            value = getattr(self, field_name)
            if isinstance(value, tuple):
                if len(value) not in (2, 3) or not all(_is_int(x) and x >= 1 for x in value):
                    raise self.invalid(field_name, f"must be an integer >= 1 or a tuple of 2 or 3 of them, "
                                                   f"got {value!r}")
                ranks.add(len(value))
            elif not (_is_int(value) and value >= 1):
                raise self.invalid(field_name, f"must be an integer >= 1 or a tuple of 2 or 3 of them, got {value!r}")
        if self.grid is not None:
            if not isinstance(self.grid, tuple) or len(self.grid) not in (2, 3) or not all(
                _is_int(x) and x >= 1 for x in self.grid
            ):
                raise self.invalid("grid", f"must be None or a tuple (H, W) or (T, H, W) of integers >= 1, "
                                           f"got {self.grid!r}")
            ranks.add(len(self.grid))
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
        grid = self._grid_for_run(n)
        kernel, dilation, stride = self.axes(len(grid))
        vis = torch.ones(1, 1, dtype=torch.bool, device=device)
        for length, k, d, s in zip(grid, kernel, dilation, stride):
            axis = axis_neighbors(length, k, d, s).to(device)
            vis = (vis[:, None, :, None] & axis[None, :, None, :]).reshape(vis.shape[0] * length, -1)
        keep = torch.ones(n, n, dtype=torch.bool, device=device)
        keep[self.globals:, self.globals:] = vis
        return keep

    def _grid_for_run(self, n: int) -> tuple[int, ...]:
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
        if site.dropout_p > 0:
            return False, f"neighborhood does not apply dropout (p={site.dropout_p})"
        if site.segments:
            return False, "the model's segment (block-diagonal) mask is not applied by neighborhood"
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
        n = _check_inputs(self, q, k, v)
        grid = self._grid_for_run(n)
        kernel, dilation, stride = self.axes(len(grid))
        return neighborhood_attention(q, k, v, mods, grid, kernel, dilation, stride, self.globals)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        """Dense float32 oracle with the pattern as an ``N x N`` mask; empty rows -> 0."""
        n = _check_inputs(self, q, k, v)
        return masked_reference(q, k, v, mods, self.keep(n, q.device))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _per_axis(value: Axes, rank: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,) * rank


def _check_inputs(spec: VariantSpec, q: Tensor, k: Tensor, v: Tensor) -> int:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise AttnccError(f"{spec.name}: expects [B, H, N, D] tensors, got q {tuple(q.shape)}")
    if q.shape[-2] != k.shape[-2]:
        raise AttnccError(f"{spec.name}: needs as many queries as keys, got Nq={q.shape[-2]}, Nk={k.shape[-2]}")
    if q.shape[1] % k.shape[1] != 0:
        raise AttnccError(f"{spec.name}: query heads {q.shape[1]} are not a multiple of kv heads {k.shape[1]}")
    return q.shape[-2]


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


@lru_cache(maxsize=64)
def _axis_tiles(length: int, kernel: int, dilation: int, stride: int, tile: int):
    """One axis cut into tiles of ``tile`` queries of one dilation sub-sequence each.

    Returns CPU tensors ``(q_pos [nT, tile], k_pos [nT, R], bias [nT, tile, R])``: each tile's query positions
    and the positions of the union of their windows (``-1`` pads both), and the additive visibility term
    (0 where the query sees the key, MASKED elsewhere).
    """
    tiles = []
    for r in range(dilation):
        sub = list(range(r, length, dilation))
        starts = window_starts(len(sub), kernel, stride)
        for t0 in range(0, len(sub), tile):
            t1 = min(len(sub), t0 + tile)
            lo, hi = starts[t0], starts[t1 - 1] + kernel
            tiles.append((sub[t0:t1], sub[lo:hi], [(starts[x] - lo, starts[x] - lo + kernel) for x in range(t0, t1)]))
    region = max(len(keys) for _, keys, _ in tiles)
    q_pos = torch.full((len(tiles), tile), -1, dtype=torch.int64)
    k_pos = torch.full((len(tiles), region), -1, dtype=torch.int64)
    bias = torch.full((len(tiles), tile, region), MASKED)
    for i, (queries, keys, windows) in enumerate(tiles):
        q_pos[i, :len(queries)] = torch.tensor(queries)
        k_pos[i, :len(keys)] = torch.tensor(keys)
        for a, (w0, w1) in enumerate(windows):
            bias[i, a, w0:w1] = 0.0
    return q_pos, k_pos, bias


def _tile_size(kernel: int, length: int, rank: int) -> int:
    """Queries per tile per axis: small tiles waste less (each query scores ``(t + K - 1)`` keys per axis),
    large ones make better matmuls; about K/2, at least 4 (2 on 3-D grids), at most 8."""
    lo = 2 if rank == 3 else 4
    return max(1, min(length, max(lo, min(8, (kernel + 1) // 2))))


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
    tiles = tiles or tuple(_tile_size(kk, length, rank) for kk, length in zip(kernel, grid))
    axes = [
        tuple(t.to(dev) for t in _axis_tiles(length, kk, dd, ss, tt))
        for length, kk, dd, ss, tt in zip(grid, kernel, dilation, stride, tiles)
    ]
    q_axes, k_axes, bias_axes = [a[0] for a in axes], [a[1] for a in axes], [a[2] for a in axes]
    n_tiles = [a.shape[0] for a in q_axes]
    regions = [a.shape[1] for a in k_axes]
    tile_q, tile_k = math.prod(tiles), math.prod(regions)
    strides = [math.prod(grid[i + 1:]) for i in range(rank)]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mods.bias))
    need_tokens = mods.bias is not None or mods.mask is not None or mods.causal

    qg = (q[:, :, globals_:].float() * mods.scale).reshape(b, hq, *grid, d)
    kg = k[:, :, globals_:].float().reshape(b, hkv, *grid, d)
    vg = v[:, :, globals_:].float().reshape(b, hkv, *grid, dv)
    k_pre, v_pre = k[:, :, :globals_].float().unsqueeze(2), v[:, :, :globals_].float().unsqueeze(2)

    per_tile_row = math.prod(n_tiles[1:]) * b * hq * tile_q * (tile_k + globals_)
    step = max(1, CHUNK_FLOATS // per_tile_row)
    outs = []
    for c0 in range(0, n_tiles[0], step):
        c1 = min(n_tiles[0], c0 + step)
        nt = (c1 - c0) * math.prod(n_tiles[1:])
        q_sel = [q_axes[0][c0:c1]] + q_axes[1:]
        k_sel = [k_axes[0][c0:c1]] + k_axes[1:]
        # [B, Hkv, g, nT0, t0, ..., D] -> [B, Hkv, tiles, g * T, D]: a group's heads share one key region.
        q_c = _gather_axes(qg.view(b, hkv, g, *grid, d), q_sel, first=3)
        q_c = q_c.permute(0, 1, *range(3, 3 + 2 * rank, 2), 2, *range(4, 4 + 2 * rank, 2), 3 + 2 * rank)
        q_c = q_c.reshape(b, hkv, nt, g * tile_q, d)
        k_c = _tiles_first(_gather_axes(kg, k_sel, first=2), rank).reshape(b, hkv, nt, tile_k, d)
        v_c = _tiles_first(_gather_axes(vg, k_sel, first=2), rank).reshape(b, hkv, nt, tile_k, dv)
        s = q_c @ k_c.transpose(-1, -2)  # [B, Hkv, tiles, g*T, R]
        if mods.softcap > 0:
            s = mods.softcap * torch.tanh(s / mods.softcap) if grad else s.div_(mods.softcap).tanh_().mul_(
                mods.softcap)
        # One additive visibility term per axis, broadcast over the others: O(tiles * t * R) per axis.
        s = s.view(b, hkv, c1 - c0, *n_tiles[1:], g, *tiles, *regions)
        for axis, bias in enumerate(bias_axes):
            part = (bias[c0:c1] if axis == 0 else bias).view(
                _axis_view(rank, axis, c1 - c0 if axis == 0 else n_tiles[axis], tiles[axis], regions[axis]))
            s = s + part if grad else s.add_(part)
        s = s.reshape(b, hkv, nt, g, tile_q, tile_k)
        keep = None
        if need_tokens:
            q_pos = _grid_tokens(q_sel, strides, globals_).reshape(nt, tile_q).clamp_min(0)
            k_pos = _grid_tokens(k_sel, strides, globals_).reshape(nt, tile_k).clamp_min(0)
            if mods.bias is not None:
                s = s + gather_pairs(mods.bias, q_pos, k_pos.view(1, 1, nt, 1, tile_k), hkv, g).float()
            if mods.mask is not None:
                keep = gather_pairs(mods.mask, q_pos, k_pos.view(1, 1, nt, 1, tile_k), hkv, g)
            if mods.causal:
                causal = (k_pos[:, None, :] <= q_pos[:, :, None]).view(1, 1, nt, 1, tile_q, tile_k)
                keep = causal if keep is None else keep & causal
            if keep is not None:
                s = s.masked_fill(~keep, MASKED)
        if globals_:
            sp = (q_c @ k_pre.transpose(-1, -2)).view(b, hkv, nt, g, tile_q, globals_)
            if mods.softcap > 0:
                sp = mods.softcap * torch.tanh(sp / mods.softcap)
            if need_tokens:
                sp = _prefix_mods(sp, mods, q_pos, globals_, hkv, g)
            s = torch.cat([sp, s], dim=-1)
        p = torch.softmax(s, dim=-1)
        if mods.mask is not None:
            p = p * (s.amax(-1, keepdim=True) > DEAD)
        p = p.view(b, hkv, nt, g * tile_q, -1)
        if globals_:
            o = p[..., :globals_] @ v_pre + p[..., globals_:] @ v_c
        else:
            o = p @ v_c
        outs.append(o.view(b, hkv, nt, g, tile_q, dv))
    out = torch.cat(outs, dim=2).view(b, hkv, *n_tiles, g, *tiles, dv)
    # [B, Hkv, nT..., g, t..., Dv] -> [B, Hq, nT0 * t0, ...]; each axis read back in position order.
    out = out.permute(0, 1, 2 + rank, *[i for a in range(rank) for i in (2 + a, 3 + rank + a)], 3 + 2 * rank)
    out = out.reshape(b, hq, *[nt_ * t for nt_, t in zip(n_tiles, tiles)], dv)
    for axis, q_pos_axis in enumerate(q_axes):
        out = out.index_select(2 + axis, _inverse(q_pos_axis, grid[axis]))
    out = out.reshape(b, hq, n - globals_, dv)
    if globals_:
        out = torch.cat([dense_rows(q, k, v, mods, globals_), out], dim=2)
    return out.to(q.dtype)


def _gather_axes(x: Tensor, positions: list[Tensor], first: int) -> Tensor:
    """Gather grid axes ``first, first+1, ...`` of ``x`` at per-axis positions ``[nT_a, P_a]`` (-1 reads
    position 0: padding the caller masks). One ``index_select`` of whole slabs per axis, so the copies are
    contiguous. Returns ``x`` with each axis replaced by ``(nT_a, P_a)``."""
    for axis, pos in enumerate(positions):
        dim = first + 2 * axis
        x = x.index_select(dim, pos.clamp_min(0).reshape(-1))
        x = x.view(*x.shape[:dim], *pos.shape, *x.shape[dim + 1:])
    return x


def _tiles_first(x: Tensor, rank: int) -> Tensor:
    """``[B, H, nT0, P0, nT1, P1, ..., D]`` -> ``[B, H, nT0, nT1, ..., P0, P1, ..., D]``."""
    return x.permute(0, 1, *range(2, 2 + 2 * rank, 2), *range(3, 3 + 2 * rank, 2), 2 + 2 * rank)


def _inverse(q_pos: Tensor, length: int) -> Tensor:
    """For each axis position, its flat (tile * t + slot) index in a per-axis tiling ``q_pos [nT, t]``."""
    flat = q_pos.reshape(-1)
    real = flat >= 0
    inv = torch.empty(length, dtype=torch.int64, device=q_pos.device)
    inv[flat[real]] = torch.arange(flat.numel(), device=q_pos.device)[real]
    return inv


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
