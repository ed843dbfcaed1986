"""Dynamic top-k block selection on the GPU: the :class:`BlockLayout` a ``topk`` spec visits, built by Triton
kernels so top-k attention never leaves the device and never builds an ``Nq x Nk`` tensor.

The selection is exactly :meth:`TopKSpec.select` (see :mod:`attncc.variants.topk` for its definition), in
four generated kernels, each specialized for its call (block, head dim, causality, mask, selection rule):

1. ``topk_pool``: the float32 mean of each block of q and of k (the ragged last block averages its real rows);
2. ``topk_mask_blocks`` (only with ``mods.mask``): whether any / all elements of each (query block, key block)
   of the mask are True, kept at size 1 along the mask's broadcast dims (a key-padding mask costs ``O(Nk)``);
3. ``topk_scores``: ``pooled_q @ pooled_k^T * scale`` for every block pair (GQA: a query head against the
   pooled keys of its kv head), ``-inf`` where the key block is not allowed (entirely in the future, or
   entirely masked). Float32 with IEEE products (no TF32), so the ranking matches the PyTorch selection;
4. ``topk_select``: per query block, the forced blocks (sinks and local diagonal) plus the best of the rest,
   written as ascending block indices padded with ``-1``, and the ``partial`` flag of each entry.

Ranking without a sort: each score becomes an int64 key (its float bits mapped to an order-preserving
integer, times the padded row width, plus a tie-break that prefers the lower block index), so all keys of a
row are distinct. The ``m``-th largest key is then found bit by bit, from the top: a candidate threshold is
kept when at least ``m`` keys reach it (one vectorized count per bit, ~41 steps for 512 key blocks). The
``threshold`` rule searches the same way for the lowest key whose higher-ranked softmax mass is still below
the threshold. This is exact, needs neither ``tl.sort`` nor a per-row ``k`` known at compile time (``tl.topk``
takes a constexpr power-of-two ``k`` and returns values only), and costs ``O(bits * nKB)`` per row.

Memory is ``O(B * Hq * nQB * nKB)`` for the block scores (like the PyTorch selection), plus the pooled q and k.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from attncc.codegen.autotune import Config, choose, length_bucket
from attncc.codegen.registry import kernel_for
from attncc.codegen.source import interpreting, launch, load_kernel
from attncc.codegen.visits import block_fits_tiles
from attncc.codegen.writer import SourceWriter, next_power_of_2, torch_to_triton_dtype
from attncc.errors import AttnccError
from attncc.util import cdiv
from attncc.variants.base import ScoreMods
from attncc.variants.blocks import BlockLayout
from attncc.variants.remainder import pool_blocks as pool_real_blocks, real_keys, real_queries
from attncc.variants.topk import TopKSpec

HEADER = ["import triton", "import triton.language as tl", ""]


def _kernel_writer() -> SourceWriter:
    """A writer holding the imports every kernel module starts with, ready for ``@triton.jit``."""
    w = SourceWriter()
    for line in HEADER:
        w.line(line)
    return w


def _pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1; ``next_power_of_2`` floors at 16 for ``tl.dot`` tiles)."""
    return 1 << max(0, int(n) - 1).bit_length()


# ---------------------------------------------------------------------------------------------- pooling


def _pool_source(desc: dict) -> str:
    w = _kernel_writer()
    w.line("@triton.jit")
    with w.block("def topk_pool(x, out, n, heads, stride_b, stride_h, stride_n, stride_d, ROWS: tl.constexpr):"):
        w.lines(f"""
            # One program per (block, batch * head): out[bh, blk, :] = mean of rows [blk * BLOCK, ...) of x.
            blk = tl.program_id(0)
            bh = tl.program_id(1).to(tl.int64)
            base = x + (bh // heads) * stride_b + (bh % heads) * stride_h
            start = blk * {desc['block']}
            rows = tl.arange(0, ROWS)
            cols = tl.arange(0, {desc['d_pad']})
            acc = tl.zeros([{desc['d_pad']}], dtype=tl.float32)
        """)
        with w.block(f"for r0 in range(0, {desc['block']}, ROWS):"):
            w.line("pos = start + r0 + rows")
            terms = ["(pos < n)[:, None]"]  # the ragged last block of the sequence
            if desc["row_mask"]:  # a block that ROWS does not divide
                terms.append(f"(r0 + rows < {desc['block']})[:, None]")
            if desc["d_pad"] != desc["d"]:
                terms.append(f"(cols < {desc['d']})[None, :]")
            w.line("ptrs = base + pos[:, None].to(tl.int64) * stride_n + cols[None, :] * stride_d")
            w.line(f"tile = tl.load(ptrs, mask={' & '.join(terms)}, other=0.0).to(tl.float32)")
            w.line("acc += tl.sum(tile, axis=0)")
        w.lines(f"""
            count = tl.minimum(n - start, {desc['block']}).to(tl.float32)
            nb = tl.num_programs(0)
        """)
        store_mask = f", mask=cols < {desc['d']}" if desc["d_pad"] != desc["d"] else ""
        w.line(f"tl.store(out + (bh * nb + blk) * {desc['d']} + cols, acc / count{store_mask})")
    return w.text()


def pool_blocks(x: Tensor, block: int) -> Tensor:
    """Float32 mean of each ``block`` of rows: x ``[B, H, N, D]`` (any strides) -> ``[B, H, ceil(N / block), D]``.

    The ragged last block averages its real rows (as :meth:`TopKSpec.select` pools).
    """
    batch, heads, n, d = x.shape
    nb = cdiv(n, block)
    out = torch.empty(batch, heads, nb, d, dtype=torch.float32, device=x.device)
    block_p2 = _pow2(block)
    desc = {"family": "topk_pool", "dtype": torch_to_triton_dtype(x.dtype), "block": block, "d": d,
            "d_pad": next_power_of_2(d), "row_mask": block_p2 != block}
    kernel = load_kernel("topk_pool", desc, lambda: _pool_source(desc), x.device)
    # Whole blocks per step read best; the interpreter is fastest with the fewest (largest) steps too.
    rows = sorted({min(block_p2, r) for r in (64, 32)}, reverse=True)
    configs = [Config.of(4, 1, ROWS=r) for r in rows] + [Config.of(8, 1, ROWS=rows[0])]

    def run(config: Config) -> None:
        launch(kernel, (nb, batch * heads), x, out, n, heads, *x.stride(), **config.launch_kwargs())

    run(choose({"entry": "topk_pool", **desc}, length_bucket(n), configs, run, x.device))
    return out


# ------------------------------------------------------------------------------------------ mask blocks


def _mask_source(desc: dict) -> str:
    w = _kernel_writer()
    w.line("@triton.jit")
    with w.block("def topk_mask_blocks(mask, any_out, all_out, mq, mk, rows_per_block, keys_per_block, mkb, heads,"
                 " stride_b, stride_h, stride_q, stride_k, ROWS: tl.constexpr, KB_TILE: tl.constexpr,"
                 " KEYS: tl.constexpr):"):
        w.lines("""
            # One program per (mask query block, KB_TILE mask key blocks, mask batch * head).
            qb = tl.program_id(0)
            kt = tl.program_id(1) * KB_TILE + tl.arange(0, KB_TILE)
            bh = tl.program_id(2).to(tl.int64)
            base = mask + (bh // heads) * stride_b + (bh % heads) * stride_h
            c = tl.arange(0, KEYS)
            key = kt[:, None] * keys_per_block + c[None, :]
            # Elements past Nq / Nk are outside the attention: they neither make a block visible nor partial.
            key_ok = (c[None, :] < keys_per_block) & (key < mk)
            r = tl.arange(0, ROWS)
            any_acc = tl.zeros([KB_TILE], dtype=tl.int32)
            all_acc = tl.full([KB_TILE], 1, dtype=tl.int32)
        """)
        with w.block("for r0 in range(0, rows_per_block, ROWS):"):
            w.lines("""
                q = qb * rows_per_block + r0 + r
                ok = (((r0 + r < rows_per_block) & (q < mq))[:, None, None]) & key_ok[None, :, :]
                ptrs = base + q[:, None, None].to(tl.int64) * stride_q + key[None, :, :].to(tl.int64) * stride_k
                v = (tl.load(ptrs, mask=ok, other=0) != 0).to(tl.int32)
                any_acc = tl.maximum(any_acc, tl.max(tl.max(tl.where(ok, v, 0), axis=2), axis=0))
                all_acc = tl.minimum(all_acc, tl.min(tl.min(tl.where(ok, v, 1), axis=2), axis=0))
            """)
        w.lines("""
            out = (bh * tl.num_programs(0) + qb) * mkb + kt
            tl.store(any_out + out, any_acc.to(tl.int8), mask=kt < mkb)
            tl.store(all_out + out, all_acc.to(tl.int8), mask=kt < mkb)
        """)
    return w.text()


def mask_blocks(mask: Tensor, block: int, shape: tuple[int, int, int, int]) -> tuple[Tensor, Tensor]:
    """Whether any / all elements of each ``block x block`` tile of a bool mask are True.

    ``mask`` broadcasts to ``shape = (B, Hq, Nq, Nk)``; returns two bool tensors ``[b, h, nQB or 1, nKB or 1]``
    (``b``/``h`` are 1 or B/Hq as in the mask; dims along which the mask broadcasts, size 1 or stride 0, stay
    size 1). Elements past Nq / Nk do not count.
    """
    if mask.dim() > 4 or any(s not in (1, t) for s, t in zip(mask.shape[::-1], shape[::-1])):
        raise AttnccError(f"topk: the score mask {tuple(mask.shape)} does not broadcast to {tuple(shape)}")
    m = mask[(None,) * (4 - mask.dim())]
    # An expanded view (stride 0) holds one value along that dim: read it once.
    m = m[tuple(slice(0, 1) if st == 0 else slice(None) for st in m.stride())]
    if m.dtype != torch.bool:
        m = m != 0
    mb, mh, mq, mk = m.shape
    rows_per_block = block if mq > 1 else 1
    keys_per_block = block if mk > 1 else 1
    mqb, mkb = cdiv(mq, rows_per_block), cdiv(mk, keys_per_block)
    any_out = torch.empty(mb, mh, mqb, mkb, dtype=torch.int8, device=m.device)
    all_out = torch.empty_like(any_out)
    keys = _pow2(keys_per_block)
    rows = min(_pow2(rows_per_block), max(1, 4096 // (keys * 8)))
    kb_tile = min(_pow2(mkb), max(1, 2048 // (keys * rows)))
    desc = {"family": "topk_mask_blocks"}
    kernel = load_kernel("topk_mask_blocks", desc, lambda: _mask_source(desc), m.device)
    grid = (mqb, cdiv(mkb, kb_tile), mb * mh)
    launch(kernel, grid, m.view(torch.int8), any_out, all_out, mq, mk, rows_per_block, keys_per_block, mkb, mh,
           *m.stride(), ROWS=rows, KB_TILE=kb_tile, KEYS=keys)
    return any_out.view(torch.bool), all_out.view(torch.bool)


def _broadcast_strides(t: Optional[Tensor]) -> tuple[int, int, int, int]:
    """Strides of a ``[b, h, qb, kb]`` block tensor, 0 along its size-1 (broadcast) dims."""
    if t is None:
        return (0, 0, 0, 0)
    return tuple(0 if size == 1 else st for size, st in zip(t.shape, t.stride()))


# ------------------------------------------------------------------------------------------ block scores


def _scores_source(desc: dict) -> str:
    w = _kernel_writer()
    block, d, d_pad = desc["block"], desc["d"], desc["d_pad"]
    w.line("@triton.jit")
    with w.block("def topk_scores(pooled_q, pooled_k, scores, mask_any, nqb, nkb, nq, q_heads, group, scale,"
                 " m_sb, m_sh, m_sq, m_sk, BQ: tl.constexpr, BK: tl.constexpr):"):
        w.lines(f"""
            # One program per (BQ query blocks, BK key blocks, batch * query head).
            rq = tl.program_id(0) * BQ + tl.arange(0, BQ)
            rk = tl.program_id(1) * BK + tl.arange(0, BK)
            bh = tl.program_id(2).to(tl.int64)
            b = bh // q_heads
            h = bh % q_heads
            kv_bh = b * (q_heads // group) + h // group  # GQA: query head h reads kv head h // group
            cols = tl.arange(0, {d_pad})
        """)
        col_mask = f" & (cols < {d})[None, :]" if d_pad != d else ""
        w.lines(f"""
            a = tl.load(pooled_q + (bh * nqb + rq)[:, None] * {d} + cols[None, :],
                        mask=(rq < nqb)[:, None]{col_mask}, other=0.0)
            c = tl.load(pooled_k + (kv_bh * nkb + rk)[:, None] * {d} + cols[None, :],
                        mask=(rk < nkb)[:, None]{col_mask}, other=0.0)
            # IEEE float32 products (not TF32): the ranking must match the float32 PyTorch selection.
            s = tl.dot(a, tl.trans(c), input_precision="ieee") * scale
            inside = (rq < nqb)[:, None] & (rk < nkb)[None, :]
        """)
        allowed = []
        if desc["causal"]:
            # a key block is allowed when its first key is not after the block's last real query
            w.line(f"allowed = rk[None, :] * {block} <= tl.minimum((rq[:, None] + 1) * {block}, nq) - 1")
            allowed.append("allowed")
        if desc["mask"]:
            w.lines("""
                m_ptrs = mask_any + b * m_sb + h * m_sh + rq[:, None] * m_sq + rk[None, :] * m_sk
                visible = tl.load(m_ptrs, mask=inside, other=0) != 0  # some element of the block pair is kept
            """)
            allowed.append("visible")
        if allowed:
            w.line(f"s = tl.where({' & '.join(allowed)}, s, float('-inf'))")
        w.line("tl.store(scores + (bh * nqb + rq)[:, None] * nkb + rk[None, :], s, mask=inside)")
    return w.text()


SCORE_PRODUCTS_PER_4_WARPS = 65536
"""Most ``BQ * BK * D_pad`` of a spill-free ``topk_scores`` tile at 4 warps on sm_90."""


def scores_descriptor(block: int, d: int, causal: bool, mask: bool) -> dict:
    """The cache descriptor of the ``topk_scores`` kernel (determines its source)."""
    return {"family": "topk_scores", "block": block, "d": d, "d_pad": next_power_of_2(d), "causal": bool(causal),
            "mask": bool(mask)}


def score_configs(desc: dict, nqb: int, nkb: int, gpu: bool) -> list[Config]:
    """The ``topk_scores`` configs the autotuner times for ``nqb x nkb`` block pairs (``gpu``: the GPU list,
    else the interpreter's)."""
    # Tiles no larger than the block grid; two fp32 tiles of a wide head must fit in shared memory.
    widest = 32 if desc["d_pad"] > 128 else 64
    tiles = [t for t in (16, 32, 64) if t <= widest]
    bq_opts = [t for t in tiles if t <= max(16, next_power_of_2(nqb))]
    bk_opts = [t for t in tiles if t <= max(16, next_power_of_2(nkb))]
    configs = [Config.of(4, 1, BQ=bq, BK=bk) for bq in bq_opts for bk in bk_opts]
    if gpu:
        # The IEEE float32 product runs on FMA units with the whole [BQ, BK] x D work in registers: past
        # 64K multiply-adds per 4 warps it spills (sm_90: 0.2-6.8 KB per thread at D = 128), so larger tiles
        # are not offered.
        configs = [c for c in configs if c["BQ"] * c["BK"] * desc["d_pad"] <= SCORE_PRODUCTS_PER_4_WARPS]
    if gpu:
        configs.reverse()  # on a GPU the largest tiles are the likely winners: try them first
    return configs


def block_scores(pooled_q: Tensor, pooled_k: Tensor, nq: int, block: int, scale: float, causal: bool,
                 mask_any: Optional[Tensor] = None) -> Tensor:
    """Pooled block scores with the disallowed pairs at ``-inf``.

    pooled_q ``[B, Hq, nQB, D]``, pooled_k ``[B, Hkv, nKB, D]`` (contiguous float32, from :func:`pool_blocks`),
    ``mask_any`` bool ``[b, h, nQB|1, nKB|1]`` (from :func:`mask_blocks`) -> float32 ``[B, Hq, nQB, nKB]``:
    ``pooled_q . pooled_k * scale``; ``-inf`` where ``causal`` puts the whole key block after the query block's
    last query (``nq`` queries), or ``mask_any`` is False.
    """
    batch, hq, nqb, d = pooled_q.shape
    hkv, nkb = pooled_k.shape[1], pooled_k.shape[2]
    scores = torch.empty(batch, hq, nqb, nkb, dtype=torch.float32, device=pooled_q.device)
    desc = scores_descriptor(block, d, causal, mask_any is not None)
    kernel = load_kernel("topk_scores", desc, lambda: _scores_source(desc), pooled_q.device)
    configs = score_configs(desc, nqb, nkb, gpu=not interpreting())
    m = mask_any.view(torch.int8) if mask_any is not None else scores
    m_strides = _broadcast_strides(mask_any)

    def run(config: Config) -> None:
        grid = (cdiv(nqb, config["BQ"]), cdiv(nkb, config["BK"]), batch * hq)
        launch(kernel, grid, pooled_q, pooled_k, scores, m, nqb, nkb, nq, hq, hq // hkv, float(scale), *m_strides,
               **config.launch_kwargs())

    run(choose({"entry": "topk_scores", **desc}, length_bucket(nkb * block), configs, run, pooled_q.device))
    return scores


# --------------------------------------------------------------------------------------------- selection


def _select_source(desc: dict) -> str:
    w = _kernel_writer()
    block, sinks, local = desc["block"], desc["sinks"], desc["local"]
    w.line("@triton.jit")
    with w.block("def topk_select(scores, kv_blocks, partial, mask_all, nqb, nkb, nk, q_heads, kept, width,"
                 " m_sb, m_sh, m_sq, m_sk, ROWS: tl.constexpr, KB_PAD: tl.constexpr, KEY_BITS: tl.constexpr):"):
        w.lines("""
            # One program per (ROWS query blocks, batch * query head); each row is loaded whole.
            qb = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
            bh = tl.program_id(1).to(tl.int64)
            kb = tl.arange(0, KB_PAD)[None, :]
            row = bh * nqb + qb
            row_ok = (qb < nqb)[:, None]
            s = tl.load(scores + row[:, None] * nkb + kb, mask=row_ok & (kb < nkb), other=float('-inf'))
            allowed = s > float('-inf')
            kept_row = tl.load(kept + bh // q_heads)  # the batch row's k/density budget (padding blocks not counted)
            # Order-preserving integer of the float bits, then the lower block index first among equal scores:
            # every key of a row is distinct, so "the m largest keys" is an exact set.
            bits = s.to(tl.int32, bitcast=True).to(tl.int64)
            key = tl.where(bits >= 0, bits + 2147483648, -1 - bits) * KB_PAD + (KB_PAD - 1 - kb)
        """)
        forced_terms = []
        if local == 1:
            forced_terms.append("(kb == qb[:, None])")
        elif local > 1:
            forced_terms.append(f"((kb <= qb[:, None]) & (kb > qb[:, None] - {local}))")
        if sinks > 0:
            forced_terms.append(f"(kb < {sinks})")
        if forced_terms:
            w.line(f"forced = ({' | '.join(forced_terms)}) & allowed")
        if desc["rule"] == "count":
            _select_by_count(w, bool(forced_terms))
        else:
            _select_by_mass(w, bool(forced_terms), desc["threshold"])
        w.lines("""
            # Kept blocks go to ascending slots (their rank among the kept), the rest of the row is -1 padding.
            keep_n = keep.to(tl.int32)
            count = tl.sum(keep_n, axis=1)
            slot = tl.cumsum(keep_n, axis=1) - 1
            kb_full = tl.broadcast_to(kb, [ROWS, KB_PAD])
            tl.store(kv_blocks + row[:, None] * width + slot, kb_full.to(tl.int64), mask=keep)
        """)
        # Element masks are still needed in the ragged last key block, on the causal diagonal, and where the
        # mask is not all True inside the block pair.
        w.line(f"part = tl.broadcast_to((kb + 1) * {block} > nk, [ROWS, KB_PAD])")
        if desc["causal"]:
            w.line("part = part | (kb >= qb[:, None])")
        if desc["mask"]:
            w.lines("""
                b = bh // q_heads
                h = bh % q_heads
                m_ptrs = mask_all + b * m_sb + h * m_sh + qb[:, None] * m_sq + kb * m_sk
                part = part | (tl.load(m_ptrs, mask=keep, other=1) == 0)
            """)
        w.lines("""
            tl.store(partial + row[:, None] * width + slot, part.to(tl.int8), mask=keep)
            pad = row_ok & (kb >= count[:, None]) & (kb < width)
            tl.store(kv_blocks + row[:, None] * width + kb_full, tl.full([ROWS, KB_PAD], -1, tl.int64), mask=pad)
            tl.store(partial + row[:, None] * width + kb_full, tl.zeros([ROWS, KB_PAD], tl.int8), mask=pad)
        """)
    return w.text()


def _select_by_count(w: SourceWriter, has_forced: bool) -> None:
    """``keep``: the forced blocks plus the ``kept - #forced`` best other allowed blocks."""
    if has_forced:
        w.lines("""
            cand = allowed & ~forced
            budget = kept_row - tl.sum(forced.to(tl.int32), axis=1)
        """)
    else:
        w.lines("""
            cand = allowed
            budget = tl.zeros([ROWS], tl.int32) + kept_row
        """)
    w.lines("""
        want = tl.minimum(tl.maximum(budget, 0), tl.sum(cand.to(tl.int32), axis=1))
        key = tl.where(cand, key, -1)
        # cut = the want-th largest key: the largest value that at least `want` keys reach, bit by bit.
        cut = tl.zeros([ROWS], dtype=tl.int64)
        for i in range(KEY_BITS):
            trial = cut | (tl.full([ROWS], 1, tl.int64) << (KEY_BITS - 1 - i))
            reached = tl.sum((key >= trial[:, None]).to(tl.int32), axis=1)
            cut = tl.where(reached >= want, trial, cut)
        chosen = cand & (key >= cut[:, None]) & (want[:, None] > 0)
    """)
    w.line("keep = forced | chosen" if has_forced else "keep = chosen")


def _select_by_mass(w: SourceWriter, has_forced: bool, threshold: float) -> None:
    """``keep``: the forced blocks, then the fewest best other blocks whose softmax mass, added to the forced
    blocks' mass, reaches ``threshold`` (a block is kept when the mass ranked above it, forced blocks first, is
    below the threshold)."""
    w.lines("""
        top = tl.max(s, axis=1)
        top = tl.where(top > float('-inf'), top, 0.0)  # a row with nothing allowed has no mass anywhere
        e = tl.where(allowed, tl.exp(s - top[:, None]), 0.0)
        z = tl.sum(e, axis=1)
        p = e / tl.where(z > 0, z, 1.0)[:, None]
    """)
    if has_forced:
        w.lines("""
            cand = allowed & ~forced
            forced_mass = tl.sum(tl.where(forced, p, 0.0), axis=1)
        """)
    else:
        w.lines("""
            cand = allowed
            forced_mass = tl.zeros([ROWS], dtype=tl.float32)
        """)
    w.lines(f"""
        key = tl.where(cand, key, -1)
        # cut = the largest key value whose mass at or above it (plus the forced mass) still reaches the
        # threshold; the keys at or above cut are exactly those with less than the threshold ranked above them.
        cut = tl.zeros([ROWS], dtype=tl.int64)
        for i in range(KEY_BITS):
            trial = cut | (tl.full([ROWS], 1, tl.int64) << (KEY_BITS - 1 - i))
            mass = forced_mass + tl.sum(tl.where(key >= trial[:, None], p, 0.0), axis=1)
            cut = tl.where(mass >= {float(threshold)!r}, trial, cut)
        chosen = cand & (key >= cut[:, None])
    """)
    w.line("keep = forced | chosen" if has_forced else "keep = chosen")


def select_blocks(spec: TopKSpec, scores: Tensor, nk: int, causal: bool,
                  mask_all: Optional[Tensor] = None, budget: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The key blocks each query block keeps, from block scores.

    scores float32 ``[B, Hq, nQB, nKB]`` (from :func:`block_scores`, ``-inf`` where not allowed), ``mask_all``
    bool ``[b, h, nQB|1, nKB|1]`` (from :func:`mask_blocks`) -> ``kv_blocks`` int64 ``[B, Hq, nQB, K]``
    (ascending, ``-1`` padding last) and ``partial`` bool of the same shape. ``K`` is the most blocks a row can
    keep (``k``/``density``: the budget or the forced count; ``threshold``: nKB), known without reading the
    scores back to the host. ``budget`` int32 ``[B]``: each batch row's k/density budget (``TopKSpec.budget``:
    blocks of padding only not counted); None: ``spec.blocks_kept(nKB)`` for every row.
    """
    batch, hq, nqb, nkb = scores.shape
    if spec.threshold is None:
        width = min(nkb, max(spec.blocks_kept(nkb), spec.local + spec.sinks))
    else:
        width = nkb
    if budget is None:
        budget = torch.full((batch,), spec.blocks_kept(nkb), dtype=torch.int32, device=scores.device)
    kept = budget.to(device=scores.device, dtype=torch.int32).expand(batch).contiguous()
    kv_blocks = torch.empty(batch, hq, nqb, width, dtype=torch.int64, device=scores.device)
    partial = torch.empty(batch, hq, nqb, width, dtype=torch.int8, device=scores.device)
    desc = {"family": "topk_select", "block": spec.block, "sinks": spec.sinks, "local": spec.local,
            "rule": "count" if spec.threshold is None else "mass", "threshold": spec.threshold,
            "causal": bool(causal), "mask": mask_all is not None}
    kernel = load_kernel("topk_select", desc, lambda: _select_source(desc), scores.device)
    kb_pad = _pow2(nkb)
    key_bits = 32 + int(math.log2(kb_pad))
    # Several rows per program share each reduction's synchronization; the row tile stays within registers.
    configs = [Config.of(w, 1, ROWS=max(1, min(_pow2(nqb), elems // kb_pad)))
               for w, elems in ((4, 2048), (8, 4096))]
    m = mask_all.view(torch.int8) if mask_all is not None else scores
    m_strides = _broadcast_strides(mask_all)

    def run(config: Config) -> None:
        grid = (cdiv(nqb, config["ROWS"]), batch * hq)
        launch(kernel, grid, scores, kv_blocks, partial, m, nqb, nkb, nk, hq, kept, width, *m_strides,
               KB_PAD=kb_pad, KEY_BITS=key_bits, **config.launch_kwargs())

    run(choose({"entry": "topk_select", **desc}, length_bucket(nkb * spec.block), configs, run, scores.device))
    return kv_blocks, partial.view(torch.bool)


# ------------------------------------------------------------------------------------------- entry points


def _check_inputs(spec: TopKSpec, q: Tensor, k: Tensor, v: Optional[Tensor] = None) -> None:
    if not isinstance(spec, TopKSpec):
        raise AttnccError(f"topk kernels: expected a TopKSpec, got {type(spec).__name__}")
    tensors = (q, k) if v is None else (q, k, v)
    if any(t.dim() != 4 for t in tensors):
        raise AttnccError(f"topk kernels: expected [B, H, N, D] tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1] or q.shape[1] % k.shape[1] != 0:
        raise AttnccError(f"topk kernels: q {tuple(q.shape)} and k {tuple(k.shape)} do not match (same batch "
                          f"and head dim, query heads a multiple of kv heads)")
    if v is not None and v.shape[:3] != k.shape[:3]:
        raise AttnccError(f"topk kernels: v {tuple(v.shape)} does not match k {tuple(k.shape)}")
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise AttnccError("topk kernels: empty query or key sequence")
    if any(t.device != q.device for t in tensors):
        raise AttnccError("topk kernels: q, k and v must be on the same device")
    for t in tensors:
        torch_to_triton_dtype(t.dtype)


def topk_layout(spec: TopKSpec, q: Tensor, k: Tensor, mods: ScoreMods) -> BlockLayout:
    """The blocks :meth:`TopKSpec.select` keeps, as a layout built on the device.

    q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]`` -> :class:`BlockLayout` at ``block_q = block_k = spec.block``
    with ``kv_blocks`` int64 ``[B, Hq, nQB, K]`` (ascending, ``-1`` padding last) and ``partial`` True where
    element masking is still needed (causal diagonal blocks, the ragged last key block, blocks where
    ``mods.mask`` is not all True). Bias, softcap and dropout do not enter the selection.
    """
    _check_inputs(spec, q, k)
    batch, hq, nq, _ = q.shape
    nk = k.shape[-2]
    block = spec.block
    mask_any = mask_all = None
    if mods.mask is not None:
        mask_any, mask_all = mask_blocks(mods.mask.to(q.device), block, (batch, hq, nq, nk))
    keys = real_keys(mods.mask, nk)
    if keys is None:
        pooled_q, pooled_k = pool_blocks(q, block), pool_blocks(k, block)
    else:  # a key-padding mask: the block means of the selection leave padding out (as TopKSpec.select does)
        queries = real_queries(keys, nq, nk, self_attention=nq == nk)
        pooled_q = pool_real_blocks(q, block, queries).contiguous()
        pooled_k = pool_real_blocks(k, block, keys).expand(batch, k.shape[1], -1, -1).contiguous()
    scores = block_scores(pooled_q, pooled_k, nq, block, mods.scale, mods.causal, mask_any)
    budget = spec.budget(None if keys is None else keys.to(q.device), nk).reshape(-1)
    kv_blocks, partial = select_blocks(spec, scores, nk, mods.causal, mask_all, budget)
    return BlockLayout(block, block, nq, nk, kv_blocks, partial)


def _topk_covers(spec, q: Tensor, k: Tensor, v: Tensor, mods) -> str:
    """'' when the kernels run this call: a power-of-two block >= 16, no decode alignment (``decode=True``
    with Nq < Nk places query blocks bottom-right: the PyTorch path does that; the kernels align top-left), and
    no pooled remainder (the attention kernel has no pooled entries; the PyTorch path adds them)."""
    if spec.remainder:
        return "remainder=True: the pooled remainder entries run on the PyTorch path (no kernel adds them yet)"
    if spec.decode and q.shape[-2] != k.shape[-2]:
        return f"fewer queries than keys (Nq={q.shape[-2]}, Nk={k.shape[-2]}): the PyTorch path aligns them bottom-right"
    return block_fits_tiles(spec, q, k, v, mods)


@kernel_for("topk", covers=_topk_covers)
def topk_attention(spec: TopKSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
    """Top-k block-sparse attention on the Triton kernels: select on the device, then online-softmax attention
    over the selected blocks. q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``, v ``[B, Hkv, Nk, Dv]`` ->
    ``[B, Hq, Nq, Dv]`` in q's dtype (a query that sees no key gets zeros)."""
    from attncc.codegen.softmax import softmax_attention
    from attncc.codegen.visits import LayoutVisit

    _check_inputs(spec, q, k, v)
    layout = topk_layout(spec, q, k, mods)
    visit = LayoutVisit(layout_for=lambda block_m, block_n: layout, descriptor={"variant": str(spec)},
                        block_sizes=(spec.block, spec.block))
    return softmax_attention(q, k, v, mods, visit)


__all__ = ["block_scores", "mask_blocks", "pool_blocks", "select_blocks", "topk_attention", "topk_layout"]
