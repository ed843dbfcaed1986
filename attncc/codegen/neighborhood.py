"""Neighborhood attention (NATTEN semantics, 2-D and 3-D grids, global tokens) on the online-softmax kernels.

The kernel (:mod:`attncc.codegen.softmax`, layout visit) walks queries and keys in a *visit order* that
follows the grid instead of the row-major sequence, so a block of ``BLOCK_M`` queries is a compact grid tile
and its neighborhoods touch only a few compact key tiles (about ``tile + kernel - 1`` keys per axis instead
of whole grid rows). Nothing is copied: a :class:`~attncc.codegen.visits.TokenMap` turns visit positions
into token indices inside the kernel, and q/k/v are read in place.

Visit order for a block size ``B`` (queries use ``B = BLOCK_M``, keys ``B = BLOCK_N``):

* positions ``[0, GP)``, ``GP = ceil(G / B) * B``, are the ``G`` global tokens (then padding), so global
  tokens fill their own leading block(s);
* the grid follows in tiles of shape :func:`tile_shape` (``B`` positions, e.g. 8x8 for 64 on a 2-D grid,
  4x4x4 on a 3-D one), tiles in row-major order over the tile grid, positions row-major inside a tile;
* along an axis with dilation ``d`` the tiles run inside one dilation sub-sequence (positions ``r, r + d,
  r + 2d, ...``), because a query's window lies in its own sub-sequence;
* keys are laid out in up to two *copies* per axis: the tiling above and the same tiling shifted by half a
  tile (``2 ** rank`` copies on a grid where every axis has both). A query tile picks, per axis, the copy
  whose tiles cover its windows with fewer tiles: the windows of an 8-wide tile with kernel 7 span 14
  positions, which three aligned 8-wide key tiles cover but two shifted ones do (8x8 tiles, kernel 7: 4
  key tiles instead of 9). The copies cost nothing but visit positions (no data is copied);
* positions past the grid (tile padding, shifted tiles hanging over an axis end) map to no token.

The number of visit positions must not depend on the block size (the kernel is told it once), so it is the
largest one over :data:`BLOCK_SIZES`; the positions past a block size's own extent are padding (their query
blocks visit nothing and write nothing; their key blocks are never visited).

The layout (:meth:`NeighborhoodTiling.layout`) is computed per axis: a query tile's windows, on one axis,
cover one interval of its sub-sequence (window starts never decrease along the axis, and consecutive windows
overlap), met by a contiguous run of key tiles, and a key tile is visible to the query tile iff it meets
that interval on every axis (the pattern is a product over axes). An entry is full (no element test in the
kernel) iff the key tile lies, on every axis, inside the intersection of the tile's windows, so every query
sees every key. Global key blocks are visited by every query block; global query blocks visit every key
block (of the unshifted copy). Cost is ``O(query tiles x visited tiles)``: no ``N x N`` or ``tiles x
tiles`` tensor is built, except the global rows (one row of every key block).

The element predicate (:meth:`NeighborhoodTiling.predicate`) recomputes each token's grid coordinates from
its index and applies the per-axis window rule of :mod:`attncc.variants.neighborhood` (dilation residue,
stride group, clamped start), ORed with "either token is global".
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from attncc.codegen.registry import kernel_for
from attncc.codegen.visits import LayoutVisit, Predicate, TokenMap
from attncc.errors import AttnccError
from attncc.util import cdiv
from attncc.variants.base import ScoreMods, check_self_attention
from attncc.variants.blocks import BlockLayout
from attncc.variants.neighborhood import NeighborhoodSpec

BLOCK_SIZES = (16, 32, 64, 128)
"""Block sizes (BLOCK_M and BLOCK_N) the token map has tile shapes for: every size the kernel configs use."""


def tile_shape(block: int, sub_lengths: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[int, ...]:
    """The grid tile of ``block`` positions (a power of two) on axes whose dilation sub-sequences are
    ``sub_lengths`` long, for windows of ``kernel`` positions per axis.

    Of all power-of-two shapes, the one whose tiles cover the axes with the least key work: tiles per axis
    times the key region ``t + K - 1`` the windows of a tile span, multiplied over the axes (so tiles are
    about square for square kernels, flatter for flat ones, and do not overhang short axes). Ties go to the
    squarer shape, then to the longer last (contiguous) axis: 64 -> 8x8 and 128 -> 8x16 on a large 2-D
    grid with kernel 7; 64 -> 4x4x4 on a 32x32x32 grid with kernel 7, 2x4x8 on 16x32x32 with kernel (3, 7, 7).
    """
    rank = len(sub_lengths)
    exponent = block.bit_length() - 1
    best, best_key = None, None
    for exps in itertools.product(range(exponent + 1), repeat=rank):
        if sum(exps) != exponent:
            continue
        shape = tuple(1 << e for e in exps)
        tiles = math.prod(cdiv(m, t) for m, t in zip(sub_lengths, shape))
        region = math.prod(t + k - 1 for t, k in zip(shape, kernel))
        key = (tiles * region, max(shape), tuple(-t for t in reversed(shape)))
        if best_key is None or key < best_key:
            best, best_key = shape, key
    return best


@dataclass(frozen=True)
class AxisTiles:
    """One grid axis cut into tiles of ``tile`` positions inside each dilation sub-sequence.

    Sub-sequence ``r`` (axis positions ``r + d * x'``) has ``L_r = ceil((L - r) / d)`` positions ``x'``.
    Copy ``c`` cuts it into ``per_sub`` tiles, tile ``j`` holding ``x'`` in ``[j * tile - c * shift,
    (j + 1) * tile - c * shift)``; ``x'`` outside ``[0, L_r)`` is padding. Tile ``r * per_sub + j`` is the
    tile's coordinate along the axis (``count`` per copy).
    """

    length: int
    kernel: int
    dilation: int
    stride: int
    tile: int
    copies: int = 1

    @property
    def sub_max(self) -> int:
        """Length of the longest sub-sequence, ``ceil(L / d)``."""
        return cdiv(self.length, self.dilation)

    @property
    def shift(self) -> int:
        return self.tile // 2 if self.copies > 1 else 0

    @property
    def per_sub(self) -> int:
        return cdiv(self.sub_max + self.shift, self.tile)

    @property
    def count(self) -> int:
        return self.dilation * self.per_sub

    @property
    def padded(self) -> bool:
        """Whether some tile position lies outside its sub-sequence."""
        return self.copies > 1 or self.dilation * self.per_sub * self.tile != self.length

    def tiles(self) -> tuple[Tensor, Tensor, Tensor]:
        """Of the unshifted copy: per tile coordinate, its residue, first ``x'`` and count of real positions."""
        idx = torch.arange(self.count)
        residue = idx // self.per_sub
        x0 = (idx % self.per_sub) * self.tile
        sub_len = cdiv(self.length - residue, self.dilation)
        return residue, x0, (sub_len - x0).clamp(0, self.tile)

    def window_start(self, x: Tensor, sub_len: Tensor) -> Tensor:
        """First ``x'`` of the window of sub-sequence position ``x`` (the rule of the variant's docstring)."""
        k, s = self.kernel, self.stride
        return torch.minimum(((x // s) * s + s // 2 - k // 2).clamp_min(0), sub_len - k)


@dataclass(frozen=True)
class NeighborhoodTiling:
    """The visit order, layouts and element predicate of neighborhood attention on one grid.

    ``grid``/``kernel``/``dilation``/``stride`` are per-axis tuples (2 or 3 axes), ``globals`` the number of
    leading off-grid tokens; ``N = globals + prod(grid)`` tokens.
    """

    grid: tuple[int, ...]
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    globals: int = 0

    @staticmethod
    def of(spec: NeighborhoodSpec, grid: tuple[int, ...]) -> "NeighborhoodTiling":
        kernel, dilation, stride = spec.axes(len(grid))
        return NeighborhoodTiling(tuple(grid), kernel, dilation, stride, spec.globals)

    # ------------------------------------------------------------------------------------- visit order

    @property
    def rank(self) -> int:
        return len(self.grid)

    @property
    def n_tokens(self) -> int:
        return self.globals + math.prod(self.grid)

    def tile(self, block: int) -> tuple[int, ...]:
        """Tile shape of a block of ``block`` visit positions."""
        if block not in BLOCK_SIZES:
            raise AttnccError(f"neighborhood kernel: block size {block} has no tile shape (sizes {BLOCK_SIZES})")
        return tile_shape(block, tuple(cdiv(n, d) for n, d in zip(self.grid, self.dilation)), self.kernel)

    def axes(self, block: int, keys: bool) -> list[AxisTiles]:
        """Per-axis tiling of queries (``keys=False``) or keys at ``block``. Keys get a shifted copy along an
        axis whose tiles are at least 2 wide and shorter than its sub-sequences, unless the window is the
        whole sub-sequence (a shift cannot save a tile there)."""
        out = []
        for length, k, d, s, t in zip(self.grid, self.kernel, self.dilation, self.stride, self.tile(block)):
            sub_max = cdiv(length, d)
            copies = 2 if keys and t >= 2 and sub_max > t and k < sub_max else 1
            out.append(AxisTiles(length, k, d, s, t, copies))
        return out

    def global_positions(self, block: int) -> int:
        """Visit positions of the global tokens: ``globals`` rounded up to whole blocks."""
        return cdiv(self.globals, block) * block

    def n_visit_for(self, block: int, keys: bool) -> int:
        """Visit positions one block size really uses (global blocks + grid tiles of every copy)."""
        axes = self.axes(block, keys)
        copies = math.prod(ax.copies for ax in axes)
        return self.global_positions(block) + copies * math.prod(ax.count for ax in axes) * block

    @property
    def n_q_visit(self) -> int:
        """Query visit positions of the kernel (the same for every block size)."""
        return max(self.n_visit_for(block, False) for block in BLOCK_SIZES)

    @property
    def n_k_visit(self) -> int:
        """Key visit positions of the kernel (the same for every block size)."""
        return max(self.n_visit_for(block, True) for block in BLOCK_SIZES)

    def descriptor(self) -> dict:
        """Everything the layouts, token map and predicate depend on (JSON-able)."""
        return {"variant": "neighborhood", "grid": list(self.grid), "kernel": list(self.kernel),
                "dilation": list(self.dilation), "stride": list(self.stride), "globals": self.globals,
                "block_sizes": list(BLOCK_SIZES), "n_visit": [self.n_q_visit, self.n_k_visit], "key_copies": True}

    # --------------------------------------------------------------------------------------- token map

    def token_map(self) -> TokenMap:
        """The visit order as kernel code: ``q_tok``/``q_ok`` from ``q_pos`` and ``k_tok``/``k_ok`` from
        ``k_pos``, one compile-time branch per block size."""
        lines = []
        for side, size in (("q", "BLOCK_M"), ("k", "BLOCK_N")):
            for i, block in enumerate(BLOCK_SIZES):
                lines.append(f"{'if' if i == 0 else 'elif'} {size} == {block}:")
                lines += ["    " + line for line in self._side_code(side, block)]
        return TokenMap(code="\n".join(lines), n_q_visit=self.n_q_visit, n_k_visit=self.n_k_visit,
                        descriptor=self.descriptor())

    def _side_code(self, side: str, block: int) -> list[str]:
        """Statements mapping ``{side}_pos`` to ``{side}_tok``/``{side}_ok`` for blocks of ``block``."""
        pos, g = f"{side}_pos", self.globals
        axes = self.axes(block, keys=side == "k")
        gp = self.global_positions(block)
        per_copy = math.prod(ax.count for ax in axes)
        n_tiles = per_copy * math.prod(ax.copies for ax in axes)
        n_visit = self.n_k_visit if side == "k" else self.n_q_visit
        strides = [math.prod(self.grid[a + 1:]) for a in range(self.rank)]
        name = lambda what: f"nb_{side}_{what}"  # noqa: E731 (prefixed: never collides with kernel names)
        out = [f"{name('rel')} = {f'tl.maximum({pos} - {gp}, 0)' if gp else pos}",
               f"{name('tile')} = {name('rel')} // {block}",
               f"{name('off')} = {name('rel')} % {block}"]
        tile_index = name("tile")
        copy_c = ["0"] * self.rank
        if n_tiles > per_copy:
            out.append(f"{name('copy')} = {tile_index} // {per_copy}")
            out.append(f"{name('tin')} = {tile_index} % {per_copy}")
            copy_c = self._split(out, name("copy"), [ax.copies for ax in axes], name("cr"))
            tile_index = name("tin")
        # tile index -> tile coordinate per axis, offset -> coordinate inside the tile (row-major)
        tile_c = self._split(out, tile_index, [ax.count for ax in axes], name("tr"))
        off_c = self._split(out, name("off"), [ax.tile for ax in axes], name("or"))
        checks = [f"({name('tile')} < {n_tiles})"] if gp + n_tiles * block < n_visit else []
        token_terms = [self._axis_position(out, checks, name(f"x{a}"), ax, tile_c[a], off_c[a], copy_c[a],
                                           strides[a]) for a, ax in enumerate(axes)]
        grid_tok = " + ".join(([str(g)] if g else []) + token_terms)
        return out + _token_statements(side, pos, g, gp, grid_tok, checks, name("grid"))

    @staticmethod
    def _axis_position(out: list[str], checks: list[str], x: str, ax: AxisTiles, tile: str, offset: str,
                       copy: str, stride: int) -> str:
        """Emit ``x``, the position on one axis, from the axis's tile coordinate ``tile``, the coordinate
        ``offset`` inside the tile and the key copy ``copy``; add its bounds checks to ``checks``; return its
        term of the grid token index (``x * stride``)."""
        # position x' inside the dilation sub-sequence, then on the axis (x = residue + d * x')
        sub_tile = tile if ax.dilation == 1 else f"({tile} % {ax.per_sub})"
        terms = [f"{sub_tile} * {ax.tile}" if ax.per_sub > 1 else "", offset if ax.tile > 1 else ""]
        sub_pos = " + ".join(t for t in terms if t) or "0"
        if ax.copies > 1:
            sub_pos = f"{sub_pos} - {copy} * {ax.shift}"
        if ax.dilation > 1:
            residue = tile if ax.per_sub == 1 else f"({tile} // {ax.per_sub})"
            out.append(f"{x} = ({sub_pos}) * {ax.dilation} + {residue}")
        else:
            out.append(f"{x} = {sub_pos}")
        if ax.copies > 1:  # a shifted tile hangs over the axis start
            checks.append(f"({x} >= 0)")
        if ax.padded:
            checks.append(f"({x} < {ax.length})")
        return x if stride == 1 else f"{x} * {stride}"

    def _split(self, out: list[str], index: str, sizes: list[int], prefix: str) -> list[str]:
        """Emit the row-major split of ``index`` over ``sizes`` (last fastest); returns the per-axis
        expressions. The first axis takes the quotient unreduced: an index past ``prod(sizes)`` is a padding
        position, which the caller's ``tile < n_tiles`` check hides."""
        parts = ["0"] * len(sizes)
        rest = index
        for a in reversed(range(1, len(sizes))):
            if sizes[a] == 1:
                continue
            parts[a] = f"({rest} % {sizes[a]})"
            if math.prod(sizes[:a]) == 1:
                return parts  # the axes before this one have a single entry
            out.append(f"{prefix}{a} = {rest} // {sizes[a]}")
            rest = f"{prefix}{a}"
        parts[0] = rest if sizes[0] > 1 else "0"
        return parts

    # --------------------------------------------------------------------------------------- predicate

    def predicate(self) -> Predicate:
        """The per-element window test (used in partial layout entries only), from token indices."""
        g = self.globals
        strides = [math.prod(self.grid[a + 1:]) for a in range(self.rank)]
        lines = []
        for side in ("q", "k"):
            lines.append(f"nb_{side}g = tl.maximum({side}_tok - {g}, 0)" if g else f"nb_{side}g = {side}_tok")
        terms = []
        for a, (length, k, d, s) in enumerate(zip(self.grid, self.kernel, self.dilation, self.stride)):
            if d == 1 and k == length:
                continue  # the window is the whole axis
            for side in ("q", "k"):
                coord = f"nb_{side}g" if strides[a] == 1 else f"(nb_{side}g // {strides[a]})"
                if a > 0:
                    coord = f"{coord} % {length}"
                if d > 1:
                    lines.append(f"nb_{side}r{a} = ({coord}) % {d}")
                    lines.append(f"nb_{side}x{a} = ({coord}) // {d}")
                else:
                    lines.append(f"nb_{side}x{a} = {coord}")
            # window start in the sub-sequence: stride group start, centred, clamped into [0, L_r - K]
            offset = s // 2 - k // 2
            group = f"nb_qx{a}" if s == 1 else f"(nb_qx{a} // {s}) * {s}"
            start = f"{group} + {offset}" if offset > 0 else f"{group} - {-offset}" if offset < 0 else group
            last = f"({length} - nb_qr{a} + {d - 1}) // {d} - {k}" if d > 1 else f"{length - k}"
            lines.append(f"nb_start{a} = tl.minimum(tl.maximum({start}, 0), {last})")
            term = f"(nb_kx{a} >= nb_start{a}) & (nb_kx{a} < nb_start{a} + {k})"
            if d > 1:
                term += f" & (nb_kr{a} == nb_qr{a})"
            lines.append(f"nb_keep{a} = {term}")
            terms.append(f"nb_keep{a}")
        keep = " & ".join(terms) if terms else "(q_tok >= 0) & (k_tok >= 0)"
        if g:
            keep = f"({keep}) | (q_tok < {g}) | (k_tok < {g})"
        lines.append(f"keep = {keep}")
        return Predicate(name=f"neighborhood{self.rank}d", code="\n".join(lines), descriptor=self.descriptor())

    # ------------------------------------------------------------------------------------------ layout

    def layout(self, block_m: int, block_n: int, device=None) -> BlockLayout:
        """The key blocks each query block visits, over visit positions (``n_q_visit x n_k_visit``).

        ``kv_blocks`` int64 ``[ceil(n_q_visit / block_m), K]`` (increasing, ``-1`` padding at the end) and
        ``partial`` (False where every query of the block sees every key of the entry, and the entry holds
        no padding key).
        """
        return _layout(self, block_m, block_n, str(device) if device is not None else "cpu")


def _axis_visits(qa: AxisTiles, ka: AxisTiles) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One axis: for each query-tile coordinate, the key tiles its windows meet, in the better key copy.

    Returns ``copy`` ``[nq]`` (the key copy used), ``first`` ``[nq]`` (first key-tile coordinate),
    ``n_keys`` ``[nq]`` (how many; 0 for query tiles that are all padding) and ``full`` ``[nq, W]`` (the
    ``j``-th key tile lies in every window of the query tile on this axis).
    """
    residue, x0, count = qa.tiles()
    sub_len = cdiv(qa.length - residue, qa.dilation)
    last = x0 + (count - 1).clamp_min(0)
    # union of the tile's windows (starts never decrease, windows overlap) and their intersection
    lo, hi = qa.window_start(x0, sub_len), qa.window_start(last, sub_len) + qa.kernel
    inter_lo, inter_hi = qa.window_start(last, sub_len), qa.window_start(x0, sub_len) + qa.kernel
    tk = ka.tile
    shifts = torch.arange(ka.copies)[:, None] * ka.shift  # [copies, 1]
    j_lo, j_hi = (lo + shifts) // tk, (hi - 1 + shifts) // tk
    n_keys = torch.where(count > 0, j_hi - j_lo + 1, torch.zeros_like(count))  # [copies, nq]
    copy = n_keys.argmin(0)  # the first copy among the fewest tiles
    pick = copy[None, :]
    j_lo, n_keys, shift = j_lo.gather(0, pick)[0], n_keys.gather(0, pick)[0], copy * ka.shift
    width = max(1, int(n_keys.max()))
    key_x0 = (j_lo[:, None] + torch.arange(width)[None, :]) * tk - shift[:, None]
    full = (key_x0 >= inter_lo[:, None]) & (key_x0 + tk <= inter_hi[:, None])
    return copy, residue * ka.per_sub + j_lo, n_keys, full


def _token_statements(side: str, pos: str, g: int, gp: int, grid_tok: str, checks: list[str],
                      grid_flag: str) -> list[str]:
    """The statements that set ``{side}_ok`` and ``{side}_tok`` from the grid token index ``grid_tok`` and the
    bounds ``checks``: positions below ``gp`` are the ``g`` global tokens (``grid_flag`` says which side of
    ``gp`` a position is on), the others grid tokens."""
    if g:
        grid_ok = " & ".join([grid_flag] + checks)
        return [f"{grid_flag} = {pos} >= {gp}", f"{side}_ok = ({pos} < {g}) | ({grid_ok})",
                f"{side}_tok = tl.where({side}_ok, tl.where({grid_flag}, {grid_tok}, {pos}), 0)"]
    if checks:
        return [f"{side}_ok = {' & '.join(checks)}", f"{side}_tok = tl.where({side}_ok, {grid_tok}, 0)"]
    return [f"{side}_ok = {pos} >= 0", f"{side}_tok = {grid_tok}"]


def _key_tiles(axes: list[AxisTiles]) -> tuple[Tensor, Tensor]:
    """Tiles of the unshifted key copy that hold any token (indices, increasing) and whether each holds
    padding."""
    valid = torch.ones((), dtype=torch.bool)
    padded = torch.zeros((), dtype=torch.bool)
    for ax in axes:
        _, _, count = ax.tiles()
        valid = valid.unsqueeze(-1) & (count > 0)
        padded = padded.unsqueeze(-1) | (count < ax.tile)
    valid, padded = valid.reshape(-1), padded.reshape(-1)
    return valid.nonzero().flatten(), padded[valid]


@lru_cache(maxsize=64)
def _layout(tiling: NeighborhoodTiling, block_m: int, block_n: int, device: str) -> BlockLayout:
    q_axes, k_axes = tiling.axes(block_m, False), tiling.axes(block_n, True)
    n_qb = cdiv(tiling.n_q_visit, block_m)
    glob_q, glob_k = cdiv(tiling.globals, block_m), cdiv(tiling.globals, block_n)
    # Global key blocks: whole (not partial) when they hold no padding position.
    glob_blocks = torch.arange(glob_k)
    glob_partial = (glob_blocks + 1) * block_n > tiling.globals

    # Grid rows: the product over axes of each axis' run of key tiles (all in one key copy).
    # Tensors grow to [nq_0, ..., nq_a, W_0, ..., W_a] axis by axis.
    coord = torch.zeros((), dtype=torch.int64)
    copy = torch.zeros((), dtype=torch.int64)
    valid = torch.ones((), dtype=torch.bool)
    full = torch.ones((), dtype=torch.bool)
    for a, (qa, ka) in enumerate(zip(q_axes, k_axes)):
        axis_copy, first, n_keys, axis_full = _axis_visits(qa, ka)
        j = torch.arange(axis_full.shape[1])

        def place(t: Tensor, a=a) -> Tensor:  # [nq_a, W_a] -> this axis' query and slot dims
            return t.reshape(*([1] * a), t.shape[0], *([1] * a), t.shape[1])

        grow = lambda t: t.unsqueeze(a).unsqueeze(-1)  # noqa: E731
        coord = grow(coord) * ka.count + place(first[:, None] + j[None, :])
        copy = grow(copy) * ka.copies + place(axis_copy[:, None])
        valid = grow(valid) & place(j[None, :] < n_keys[:, None])
        full = grow(full) & place(axis_full)
    per_copy = math.prod(ka.count for ka in k_axes)
    block = glob_k + copy * per_copy + coord
    n_qt = math.prod(qa.count for qa in q_axes)
    block, valid, full = (torch.broadcast_to(t, coord.shape).reshape(n_qt, -1) for t in (block, valid, full))
    # Visited entries first; among them the order is already increasing (row-major over one copy's tiles).
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    valid = valid.gather(1, order)
    grid_blocks = torch.where(valid, block.gather(1, order), torch.full_like(block, -1))
    grid_partial = valid & ~full.gather(1, order)
    width = int(valid.sum(1).max())
    grid_blocks, grid_partial = grid_blocks[:, :width], grid_partial[:, :width]

    key_tiles, key_padded = _key_tiles(k_axes)
    every_block = torch.cat([glob_blocks, glob_k + key_tiles])
    every_partial = torch.cat([glob_partial, key_padded])
    k_width = max(1, glob_k + width, every_block.numel() if glob_q else 0)
    kv_blocks = torch.full((n_qb, k_width), -1, dtype=torch.int64)
    partial = torch.zeros((n_qb, k_width), dtype=torch.bool)
    if glob_q:  # global query rows see every key
        kv_blocks[:glob_q, :every_block.numel()] = every_block
        partial[:glob_q, :every_block.numel()] = every_partial
    rows = slice(glob_q, glob_q + n_qt)
    kv_blocks[rows, :glob_k] = glob_blocks
    partial[rows, :glob_k] = glob_partial
    kv_blocks[rows, glob_k:glob_k + width] = grid_blocks
    partial[rows, glob_k:glob_k + width] = grid_partial
    return BlockLayout(block_m, block_n, tiling.n_q_visit, tiling.n_k_visit, kv_blocks.to(device),
                       partial.to(device))


def flop_bound(tiling: NeighborhoodTiling, block_m: int, block_n: int) -> float:
    """The fraction of the kernel's tile work that is useful: the (query, key) pairs neighborhood attention
    scores (every grid query sees ``prod(kernel)`` keys) over the pairs the visited tiles compute
    (``block_m * block_n`` per layout entry). It bounds the achievable speed as a share of the FLOP bound.

    Why kernel 31 stays near 2/3 (stride 1): the keys a set of queries needs is the union of their windows,
    at least ``(t + k - 1)^2`` for ``t x t`` queries in 2-D (a square tile minimizes it), so a tile of 64
    queries (the least a wgmma warpgroup computes, 8x8) does at most ``k^2 / (8 + k - 1)^2`` useful work:
    67% at k = 31, 35% at 13, 25% at 7, whatever the tile shape or key tiling. 85% at k = 31 needs ``t <= 3``
    (9 queries per tile), below any tensor-core tile; only grid borders (clamped windows shared by several
    queries) or a stride (``stride=(8, 8)``: the queries of a tile share one window) raise it.
    """
    layout = tiling.layout(block_m, block_n)
    visited = int((layout.kv_blocks >= 0).sum()) * block_m * block_n
    useful = math.prod(tiling.grid) * math.prod(min(k, n) for k, n in zip(tiling.kernel, tiling.grid))
    return useful / visited if visited else 0.0


def neighborhood_visit(spec: NeighborhoodSpec, n: int, device=None) -> LayoutVisit:
    """The kernel visit of ``spec`` over ``n = globals + prod(grid)`` tokens: layouts (built on ``device``
    for each tile size the kernel tries), token map and element predicate."""
    tiling = NeighborhoodTiling.of(spec, spec.grid_for_run(n))
    return LayoutVisit(
        layout_for=lambda block_m, block_n: tiling.layout(block_m, block_n, device),
        predicate=tiling.predicate(), token_map=tiling.token_map(), descriptor=tiling.descriptor())


@kernel_for("neighborhood")
def neighborhood_attention(spec: NeighborhoodSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
    """Neighborhood attention of ``spec`` on the Triton kernels.

    q ``[B, Hq, N, Dqk]``, k ``[B, Hkv, N, Dqk]``, v ``[B, Hkv, N, Dv]`` with ``N = globals + prod(grid)``
    -> ``[B, Hq, N, Dv]`` in q's dtype. ``mods`` (scale, softcap, bias, mask, causal) apply on top of the
    pattern; a row with no visible key is zero.
    """
    from attncc.codegen.softmax import softmax_attention

    n = check_self_attention(spec, q, k, v)
    return softmax_attention(q, k, v, mods, neighborhood_visit(spec, n, q.device))


__all__ = ["BLOCK_SIZES", "AxisTiles", "NeighborhoodTiling", "flop_bound", "neighborhood_attention",
           "neighborhood_visit", "tile_shape"]
