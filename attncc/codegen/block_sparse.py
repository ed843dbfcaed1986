"""Static block-sparse attention on the online-softmax kernels: the layout a ``block_sparse`` spec visits.

Named patterns (bigbird, radial, power) are block formulas: their layout comes straight from the pattern at
``block``-sized tiles (``O(nQB * K)``), every visited block is whole, and only the causal diagonal and the
sequence end need element masks. A ``mask_mod`` pattern is an arbitrary Python predicate that no kernel can
run: its layout is found by evaluating the predicate (as the PyTorch path does), and the element bits of the
partially visible blocks, only those, are packed into a tensor the kernel reads (``mask_tiles``).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from attncc.codegen.registry import kernel_for
from attncc.codegen.visits import block_fits_tiles
from attncc.util import cdiv
from attncc.variants.base import ScoreMods
from attncc.variants.block_sparse import BlockSparseSpec, MaskModPattern, mask_mod_layout, named_blocks, pack_blocks
from attncc.variants.blocks import BlockLayout

TILE_PREDICATE = "\n".join([
    "tile_id = tl.load(tile_index + pid_m * tile_index_stride + slot)",
    "keep = tl.load(mask_tiles + tile_id * (tile_b * tile_b) + (q_pos % tile_b) * tile_b + (k_pos % tile_b)) != 0",
])
"""Element bits of a partial block: ``tile_index[pid_m, slot]`` names its ``tile_b x tile_b`` tile."""


def named_layout(spec: BlockSparseSpec, nq: int, nk: int, causal: bool, device: torch.device) -> BlockLayout:
    """The visited blocks of a named pattern, global rows included, with the causal diagonal (and the partial
    last key block) marked partial. ``kv_blocks`` is ``[nQB, K]``."""
    return _named_layout(spec, nq, nk, causal, str(device))


@lru_cache(maxsize=32)
def _named_layout(spec: BlockSparseSpec, nq: int, nk: int, causal: bool, device: str) -> BlockLayout:
    b = spec.block
    nqb, nkb = cdiv(nq, b), cdiv(nk, b)
    blocks = named_blocks(spec.pattern, nqb, nkb, causal, "cpu")
    g = min(spec.pattern.global_rows, nqb)
    if g:
        every = pack_blocks(torch.arange(nkb).expand(g, nkb), g, nkb, causal)
        width = max(blocks.shape[1], every.shape[1])
        blocks = torch.cat([torch.nn.functional.pad(every, (0, width - every.shape[1]), value=-1),
                            torch.nn.functional.pad(blocks[g:], (0, width - blocks.shape[1]), value=-1)])
    q_block = torch.arange(nqb)[:, None]
    partial = (blocks >= 0) & ((causal & (blocks == q_block)) | ((blocks == nkb - 1) & (nk % b != 0)))
    return BlockLayout(b, b, nq, nk, blocks.to(device), partial.to(device))


@lru_cache(maxsize=16)
def mask_mod_tiles(spec: BlockSparseSpec, nq: int, nk: int, causal: bool, device: str):
    """Layout of a mask_mod pattern plus the element bits of its partial blocks.

    Returns ``(layout, mask_tiles, tile_index)``: ``mask_tiles`` int8 ``[P * block * block]`` for the ``P``
    partial entries, ``tile_index`` int32 ``[nQB, K]`` (the tile of each partial entry, -1 elsewhere).
    """
    pattern: MaskModPattern = spec.pattern
    b = spec.block
    layout = mask_mod_layout(pattern, nq, nk, b, causal, device)
    partial = layout.partial if layout.partial is not None else layout.kv_blocks >= 0
    rows, slots = partial.nonzero(as_tuple=True)
    tile_index = torch.full(partial.shape, -1, dtype=torch.int32, device=device)
    tile_index[rows, slots] = torch.arange(rows.numel(), dtype=torch.int32, device=device)
    offsets = torch.arange(b, device=device)
    q_idx = (rows[:, None, None] * b + offsets[None, :, None]).clamp(max=nq - 1)
    k_idx = (layout.kv_blocks[rows, slots][:, None, None] * b + offsets[None, None, :]).clamp(max=nk - 1)
    keep = torch.as_tensor(pattern.keep(causal)(q_idx, k_idx), device=device).expand(rows.numel(), b, b)
    tiles = keep.to(torch.int8).reshape(-1)
    if tiles.numel() == 0:
        tiles = torch.zeros(1, dtype=torch.int8, device=device)
    return layout, tiles, tile_index


def _block_sparse_covers(spec, q: Tensor, k: Tensor, v: Tensor, mods) -> str:
    """'' when the kernel runs this call: a power-of-two block >= 16 and as many queries as keys (the variant
    defines no decode call; its PyTorch path says why)."""
    if q.shape[-2] != k.shape[-2]:
        return f"fewer queries than keys (Nq={q.shape[-2]}, Nk={k.shape[-2]})"
    return block_fits_tiles(spec, q, k, v, mods)


@kernel_for("block_sparse", covers=_block_sparse_covers)
def block_sparse_attention(spec: BlockSparseSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
    """Block-sparse attention of ``spec`` on the Triton kernels. q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``,
    v ``[B, Hkv, Nk, Dv]`` -> ``[B, Hq, Nq, Dv]``."""
    from attncc.codegen.softmax import softmax_attention

    return softmax_attention(q, k, v, mods, block_sparse_visit(spec, q, k, mods))


def block_sparse_visit(spec: BlockSparseSpec, q: Tensor, k: Tensor, mods: ScoreMods):
    """The ``LayoutVisit`` of ``spec`` for a call with q ``[B, Hq, Nq, D]`` and k ``[B, Hkv, Nk, D]``: the named
    pattern's block layout, or a ``mask_mod``'s layout with the bits of its partial tiles as a predicate. The
    forward kernel and the backward kernels (``backward_visits``) visit the same blocks."""
    from attncc.codegen.softmax import LayoutVisit, Predicate

    nq, nk, b = q.shape[-2], k.shape[-2], spec.block
    descriptor = {"variant": str(spec), "causal": mods.causal}
    if isinstance(spec.pattern, MaskModPattern):
        layout, tiles, tile_index = mask_mod_tiles(spec, nq, nk, mods.causal, str(q.device))
        predicate = Predicate(name="mask_tiles", code=TILE_PREDICATE, scalars=("tile_index_stride", "tile_b"),
                              tensors=("mask_tiles", "tile_index"))
        # causality is folded into the pattern's predicate; the kernel still applies it (cheaply) on top
        return LayoutVisit(
            layout_for=lambda bm, bn: layout, predicate=predicate, descriptor=descriptor, block_sizes=(b, b),
            tensors={"mask_tiles": tiles, "tile_index": tile_index, "tile_index_stride": tile_index.shape[1],
                     "tile_b": b})
    layout = named_layout(spec, nq, nk, mods.causal, q.device)
    return LayoutVisit(layout_for=lambda bm, bn: layout, descriptor=descriptor, block_sizes=(b, b))
