"""Vertical-slash attention in Triton: exact online-softmax attention over the key columns and diagonals a
``vertical_slash`` spec chooses for each (batch, query head).

The selection runs in torch (:meth:`VerticalSlashSpec.select`, on the device: ``O(last_q * Nk)`` scores per
head); this kernel does the attention. One program per (block of ``BLOCK_M`` query rows, batch x query head):

1. the columns: ``BLOCK_N`` chosen key indices at a time, their key rows gathered into a ``[D, BLOCK_N]`` tile,
   scored with ``tl.dot`` and folded into the running max / denominator / output (FlashAttention's online
   softmax); their value rows likewise;
2. the diagonals, one offset ``o`` at a time: each row ``i`` of the block reads the one key ``position(i) - o``
   (a gathered ``[BLOCK_M, D]`` tile, a row-wise dot), skipped where it lies outside the sequence or is one
   of the columns (each key once, as in the torch path);
3. learned sink logits join the denominator last; a row with no visible key stores zeros.

Causality (top-left, SDPA's ``is_causal``: key ``<= row``), a key-padding mask (``[B|1, 1, 1, Nk]``), softcapping
and GQA (query head h reads kv head ``h // g``) are applied in the kernel; fewer queries than keys place the
queries at the last positions (bottom-right), as the torch path does. A bias, or a mask with a query or head
dim, is gathered at the pairs by the PyTorch path instead (``covers`` says so). Forward only: calls that need
gradients run the PyTorch path (the runtime's dispatch decides that).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attncc.codegen.registry import kernel_for
from attncc.codegen.source import interpreting, launch, load_kernel
from attncc.codegen.writer import next_power_of_2, torch_to_triton_dtype
from attncc.util import cdiv
from attncc.variants.base import ScoreMods
from attncc.variants.vertical_slash import VerticalSlashSpec

MAX_HEAD_DIM = 256
"""Head dims above this keep too many registers per row: the PyTorch path runs them."""

_SOURCE = '''
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): exact limits at both ends (exp overflows to inf -> 1, underflows to 0 -> -1)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def vertical_slash_fwd(Q, K, V, Out, Cols, Offs, IsCol, KeyMask, Sinks,
                       HQ, G, NQ, NK, NV, NS, scale, softcap,
                       sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, s_key_mask_b,
                       D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                       KEY_MASK: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // HQ
    h = bh % HQ
    hk = h // G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < NQ
    positions = rows + (NK - NQ)  # the queries are the last NQ tokens
    d = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None].to(tl.int64) * sqn + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DVP], dtype=tl.float32)

    # 1. the chosen columns, BLOCK_N at a time
    for c0 in range(0, NV, BLOCK_N):
        c = c0 + tl.arange(0, BLOCK_N)
        c_ok = c < NV
        col = tl.load(Cols + bh * NV + c, mask=c_ok, other=0).to(tl.int64)
        kt = tl.load(k_base + col[None, :] * skn + d[:, None], mask=c_ok[None, :] & (d[:, None] < D),
                     other=0.0).to(tl.float32)
        s = tl.dot(q, kt{DOT_ARGS}) * scale
        if SOFTCAP:
            s = softcap * _tanh(s / softcap)
        keep = row_ok[:, None] & c_ok[None, :]
        if CAUSAL:
            keep = keep & (col[None, :] <= rows[:, None])
        if KEY_MASK:
            visible = tl.load(KeyMask + b * s_key_mask_b + col, mask=c_ok, other=0)
            keep = keep & (visible != 0)[None, :]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + col[:, None] * svn + dv[None, :], mask=c_ok[:, None] & (dv[None, :] < DV),
                     other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, vt{DOT_ARGS})
        m_i = m_new

    # 2. the chosen diagonals, one offset at a time: row i reads key position(i) - offset
    for si in range(0, NS):
        offset = tl.load(Offs + bh * NS + si)
        key = positions - offset
        keep = row_ok & (key >= 0) & (key < NK)
        key_c = tl.where(keep, key, 0).to(tl.int64)
        again = tl.load(IsCol + bh * NK + key_c, mask=keep, other=1)
        keep = keep & (again == 0)  # a column already counted it
        if CAUSAL:
            keep = keep & (key <= rows)
        if KEY_MASK:
            keep = keep & (tl.load(KeyMask + b * s_key_mask_b + key_c, mask=keep, other=0) != 0)
        kr = tl.load(k_base + key_c[:, None] * skn + d[None, :], mask=keep[:, None] & (d[None, :] < D),
                     other=0.0).to(tl.float32)
        s = tl.sum(q * kr, 1) * scale
        if SOFTCAP:
            s = softcap * _tanh(s / softcap)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        l_i = l_i * alpha + p
        vr = tl.load(v_base + key_c[:, None] * svn + dv[None, :], mask=keep[:, None] & (dv[None, :] < DV),
                     other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + p[:, None] * vr
        m_i = m_new

    # 3. learned sink logits: one more denominator term, no value
    if SINKS:
        sink = tl.load(Sinks + h).to(tl.float32)
        m_new = tl.maximum(m_i, sink)
        alpha = tl.exp(m_i - m_new)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha + tl.exp(sink - m_new)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(Out + b * sob + h * soh + rows[:, None].to(tl.int64) * son + dv[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < DV))
'''


def _key_mask(mask, batch: int, nk: int):
    """A key-padding mask ``[B|1, 1, 1, Nk]`` (any rank broadcasting to it) as uint8 ``[B|1, Nk]``; None for any
    other shape (the PyTorch path gathers it at the pairs)."""
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[2] != 1 or m.shape[0] not in (1, batch):
        return None
    return m.reshape(m.shape[0], m.shape[3]).expand(m.shape[0], nk).bool().to(torch.uint8).contiguous()


def _covers(spec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> str:
    """'' when the kernel runs this call; otherwise why the PyTorch path does."""
    if q.device.type != "cuda" and not interpreting():
        return f"{q.device} tensors (the kernel needs CUDA, or TRITON_INTERPRET=1)"
    if q.shape[-2] > k.shape[-2]:
        return f"more queries than keys (Nq={q.shape[-2]}, Nk={k.shape[-2]})"
    if mods.bias is not None:
        return "an additive bias: the PyTorch path gathers it at the chosen pairs"
    if mods.mask is not None and _key_mask(mods.mask, q.shape[0], k.shape[-2]) is None:
        return f"a mask of shape {tuple(mods.mask.shape)} (the kernel reads key-padding masks [B, 1, 1, Nk])"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head dims {q.shape[-1]}/{v.shape[-1]} above {MAX_HEAD_DIM}"
    return ""


@kernel_for("vertical_slash", covers=_covers)
def vertical_slash_attention(spec: VerticalSlashSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
    """Select in torch, attend in Triton. q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``, v ``[B, Hkv, Nk, Dv]`` ->
    ``[B, Hq, Nq, Dv]`` in q's dtype (a query that sees no key gets zeros)."""
    batch, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    sel = spec.select(q, k, mods)
    columns = sel.columns.to(torch.int32).contiguous()
    offsets = sel.offsets.to(torch.int32).contiguous()
    is_column = sel.is_column.to(torch.uint8).contiguous()
    key_mask = _key_mask(mods.mask, batch, nk) if mods.mask is not None else None
    sinks = mods.sinks.reshape(-1).float().expand(hq).contiguous() if mods.sinks is not None else None
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(batch, hq, nq, dv, dtype=q.dtype, device=q.device)

    fp32_gpu = q.dtype == torch.float32 and not interpreting()
    desc = {"family": "vertical_slash", "dtype": torch_to_triton_dtype(q.dtype),
            "dot_args": ', input_precision="ieee"' if fp32_gpu else ""}
    kernel = load_kernel("vertical_slash_fwd", desc, lambda: _SOURCE.replace("{DOT_ARGS}", desc["dot_args"]),
                         q.device)
    block_m = 16 if interpreting() or nq <= 16 else 64
    block_n = 16 if interpreting() else 32
    grid = (cdiv(nq, block_m), batch * hq)
    placeholder = columns  # any tensor stands in for an absent optional input (its flag is off)
    launch(kernel, grid, q, k, v, out, columns, offsets, is_column,
           key_mask if key_mask is not None else placeholder, sinks if sinks is not None else placeholder,
           hq, hq // hkv, nq, nk, columns.shape[-1], offsets.shape[-1], float(mods.scale), float(mods.softcap),
           q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
           v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
           (key_mask.stride(0) if key_mask is not None and key_mask.shape[0] > 1 else 0),
           D=d, DP=next_power_of_2(d), DV=dv, DVP=next_power_of_2(dv), BLOCK_M=block_m, BLOCK_N=block_n,
           CAUSAL=bool(mods.causal), KEY_MASK=key_mask is not None, SOFTCAP=mods.softcap > 0,
           SINKS=sinks is not None)
    return out


__all__ = ["vertical_slash_attention"]
