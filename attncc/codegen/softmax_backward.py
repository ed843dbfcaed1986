"""Backward kernels of the online-softmax family (FlashAttention-2 style), generated per call like the forward.

:func:`softmax_backward` is the entry point: given q, k, v, the forward output ``out`` and its gradient
``grad_out``, the call's :class:`ScoreMods` and the forward's visit (:mod:`attncc.codegen.visits`), it returns
the gradients of q, k, v, of a bias (the full ``dS``, reduced by the caller) and of learned sink logits.

Three generated kernels share one module (one :class:`BackwardPlan`):

1. ``softmax_bwd_stats`` (one program per query block): the row log-sum-exp ``lse`` (log2 units, sinks
   included) by one pass of ``q K^T`` over the visited key blocks, and ``delta = rowsum(dO * O)``. The forward
   kernels do not return the LSE; recomputing it here costs one ``q K^T`` product per visited block (about 1/7
   of the backward's matrix work) and keeps the forward unchanged and ``torch.compile``-able (the op returns
   one tensor, and its schema is fixed).
2. ``softmax_bwd_dkdv`` (one program per key block of one (batch, kv head)): iterates the query heads of its
   kv head (GQA: their contributions are summed) and, for each, the query blocks that visit this key block —
   the *transposed* layout for block layouts, built in torch from the forward layout by
   :func:`pack_layout_rows` — accumulating ``dV += P^T dO`` and ``dK += dS^T q * scale``.
3. ``softmax_bwd_dq`` (one program per query block): its visited key blocks, ``dQ += dS k * scale``; it also
   writes ``dS`` to a ``[B, Hq, Nq, Nk]`` float32 buffer when a bias needs a gradient.

With ``s`` the score after softcap and bias, ``P = exp(s - lse)``, ``dP = dO V^T``, ``dS = P * (dP - delta)``;
softcap multiplies by its tanh derivative ``1 - tanh^2`` before the scale. A learned sink is one more
softmax entry with no value: ``dsink[h] = -sum_rows P_sink * delta`` (computed in torch from lse and delta).

Every visited (query block, key block) pair applies all element tests (sequence bounds, causality, band,
the user's mask, the visit's predicate in partial layout entries): simpler than the forward's masked/unmasked
loop split, at some cost in the inner loop (see the module's report in the commit history).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from attncc.codegen.source import interpreting, launch, load_kernel
from attncc.codegen.visits import BandVisit, DenseVisit, LayoutVisit
from attncc.codegen.writer import SourceWriter, next_power_of_2, torch_to_triton_dtype
from attncc.errors import AttnccError
from attncc.util import LOG2E, cdiv
from attncc.variants.base import ScoreMods

GENERATOR_VERSION = 1
KERNELS = ("softmax_bwd_stats", "softmax_bwd_dq", "softmax_bwd_dkdv")
M_INIT = -1.0e30
"""Initial running max of the LSE pass (finite: a fully hidden block adds exactly 0, never ``inf - inf``)."""


@dataclass(frozen=True)
class Hook:
    """A visit hook (predicate or token map) as the plan records it: what the generated source depends on."""

    code: str
    scalars: tuple[str, ...] = ()
    tensors: tuple[str, ...] = ()
    descriptor: str = "{}"


@dataclass(frozen=True)
class BackwardPlan:
    """Every choice the generator makes; ``dataclasses.asdict`` of it is the kernels' cache descriptor."""

    dtype: str
    d: int
    block_d: int
    dv: int
    block_dv: int
    group: int
    """Hq // Hkv: the dK/dV program sums this many query heads."""
    causal: bool
    softcap: bool
    bias: Optional[tuple[bool, bool]]
    """None, or whether the bias (broadcast to ``[B, Hq, Nq, Nk]``) varies along (queries, keys): only those
    dims are indexed (a key-padding mask is one ``[1, BLOCK_N]`` row per block, not a pointer tile)."""
    mask: Optional[tuple[bool, bool]]
    """Like ``bias``, for the bool mask."""
    sinks: bool
    dbias: bool
    """Write dS (float32 ``[B, Hq, Nq, Nk]``) for the bias gradient."""
    visit: str
    """``"dense"``, ``"band"`` or ``"layout"``."""
    band_prefix: bool = False
    band_globals: bool = False
    predicate: Optional[Hook] = None
    token_map: Optional[Hook] = None
    layout: str = ""
    dot_f32: bool = False
    """Cast dot operands to float32 (the interpreter's bf16 ``tl.dot`` is wrong)."""
    dot_precision: Optional[str] = None

    def descriptor(self) -> dict:
        return {"family": "softmax_backward", "version": GENERATOR_VERSION, **dataclasses.asdict(self)}


# ------------------------------------------------------------------------------------------ the generator


def kernel_params(plan: BackwardPlan) -> list[str]:
    """The runtime arguments every kernel of the module takes, in order (each kernel reads what it needs)."""
    names = ["Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "Lse", "Delta"]
    names += ["Bias"] if plan.bias else []
    names += ["Mask"] if plan.mask else []
    names += ["Sinks"] if plan.sinks else []
    names += ["DBias"] if plan.dbias else []
    names += ["LayQ", "LayK"] if plan.visit == "layout" else []
    names += ["KTok"] if plan.token_map is not None else []
    names += list(plan.predicate.tensors) if plan.predicate is not None else []
    for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv"):
        names += [f"stride_{t}b", f"stride_{t}h", f"stride_{t}n"]
    for t, on in (("bias", plan.bias), ("mask", plan.mask)):
        names += [f"stride_{t}_b", f"stride_{t}_h", f"stride_{t}_q", f"stride_{t}_k"] if on else []
    if plan.visit == "layout":
        names += ["stride_lq_b", "stride_lq_h", "stride_lq_m", "WQ", "stride_lk_b", "stride_lk_h", "stride_lk_m",
                  "WK", "LAY_GROUP"]
    names += ["H", "NQ", "NK", "NQV", "NKV", "sm_scale", "qk_scale"]
    names += ["tanh_scale", "cap_log2"] if plan.softcap else []
    names += ["LEFT", "RIGHT", "PREFIX", "GLOBALS"] if plan.visit == "band" else []
    scalars = list(plan.predicate.scalars) if plan.predicate is not None else []
    scalars += [s for s in (plan.token_map.scalars if plan.token_map else ()) if s not in scalars]
    return names + scalars


def generate_source(plan: BackwardPlan) -> str:
    """The Triton module text holding the three backward kernels of ``plan``."""
    w = SourceWriter()
    w.line(f'"""Generated by attncc.codegen.softmax_backward (visit={plan.visit}, dtype={plan.dtype}, '
           f'd={plan.d}, dv={plan.dv})."""')
    w.line("import triton")
    w.line("import triton.language as tl")
    for name, body in (("softmax_bwd_stats", _emit_stats), ("softmax_bwd_dq", _emit_dq),
                       ("softmax_bwd_dkdv", _emit_dkdv)):
        w.line()
        w.line()
        w.line("@triton.jit")
        with w.block(f"def {name}("):
            for param in kernel_params(plan) + ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"]:
                w.line(f"{param},")
        w.line("):")
        w._depth += 1
        body(w, plan)
        w._depth -= 1
    return w.text()


def _dot_args(plan: BackwardPlan) -> str:
    return f', input_precision="{plan.dot_precision}"' if plan.dot_precision else ""


def _dot_dtype(plan: BackwardPlan) -> str:
    return "tl.float32" if plan.dot_f32 else plan.dtype


def _load(plan: BackwardPlan, pointer: str, mask: Optional[str]) -> str:
    text = f"tl.load({pointer}, mask={mask}, other=0.0)" if mask else f"tl.load({pointer})"
    return f"{text}.to(tl.float32)" if plan.dot_f32 else text


def _dmask(plan: BackwardPlan, axis: str, transposed: bool = False) -> Optional[str]:
    """The head-dim load mask (``axis`` ``d`` or ``dv``) when the dim is padded to a power of two."""
    size, block = (plan.d, plan.block_d) if axis == "d" else (plan.dv, plan.block_dv)
    if size == block:
        return None
    # parenthesized: `&` binds tighter than `<` where callers combine it with other terms
    return f"(offs_{axis}[:, None] < {size})" if transposed else f"(offs_{axis}[None, :] < {size})"


def _emit_common_prologue(w: SourceWriter, plan: BackwardPlan) -> None:
    w.lines(f"""
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, {plan.block_d})
        offs_dv = tl.arange(0, {plan.block_dv})
    """)


def _emit_head_bases(w: SourceWriter, plan: BackwardPlan) -> None:
    """Per (batch, query head ``off_h``) base pointers of the query-side tensors, bias, mask and LSE rows."""
    w.lines("""
        Q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        DO_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
        row_base = (off_b * H + off_h).to(tl.int64) * NQ
    """)
    for prefix, on in (("bias", plan.bias), ("mask", plan.mask)):
        if on:
            w.line(f"{prefix}_base = {prefix.capitalize()} + off_b.to(tl.int64) * stride_{prefix}_b + "
                   f"off_h.to(tl.int64) * stride_{prefix}_h")


def _emit_kv_bases(w: SourceWriter) -> None:
    w.lines("""
        K_base = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
        V_base = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
    """)


def _emit_query_side(w: SourceWriter, plan: BackwardPlan) -> None:
    """From ``start_m``: ``q_pos``/``q_tok`` ``[BLOCK_M, 1]``, ``q_valid`` and the in-bounds row ``q_row``."""
    w.line("q_pos = (start_m + offs_m)[:, None]")
    if plan.token_map is not None:
        w.lines(plan.token_map.code)
        w.line("q_valid = q_ok & (q_pos < NQV)")
        w.line("q_row = tl.reshape(tl.where(q_valid, q_tok, 0), (BLOCK_M,))")
    else:
        w.line("q_tok = q_pos")
        w.line("q_valid = q_pos < NQ")
        w.line("q_row = tl.minimum(start_m + offs_m, NQ - 1)")


def _emit_key_side(w: SourceWriter, plan: BackwardPlan) -> None:
    """From ``start_n``: ``k_pos``/``k_tok`` ``[1, BLOCK_N]``, ``k_valid`` and the in-bounds row ``k_row``."""
    w.line("k_pos = (start_n + offs_n)[None, :]")
    if plan.token_map is not None:
        w.lines(plan.token_map.code)
        w.line("k_valid = k_ok & (k_pos < NKV)")
        w.line("k_row = tl.reshape(tl.where(k_valid, k_tok, 0), (BLOCK_N,))")
    else:
        w.line("k_tok = k_pos")
        w.line("k_valid = k_pos < NK")
        w.line("k_row = tl.minimum(start_n + offs_n, NK - 1)")


def _emit_scores(w: SourceWriter, plan: BackwardPlan, qk: str, predicate: bool) -> None:
    """``s`` [BLOCK_M, BLOCK_N] (log2 units; hidden = -inf) from the raw products ``qk``, and ``vis`` (the
    elements visible). Leaves ``th`` (tanh of the capped score) for the softcap derivative."""
    if plan.softcap:
        w.lines(f"""
            t = tl.exp2(-tl.abs({qk}) * tanh_scale)
            th = (1.0 - t) / (1.0 + t)
            s = tl.where({qk} < 0.0, -th, th) * cap_log2
        """)
    else:
        w.line(f"s = {qk} * qk_scale")
    if plan.bias:
        w.line(f"s = s + tl.load({_operand_pointer('bias', plan.bias)}).to(tl.float32) * {LOG2E}")
    terms = ["q_valid", "k_valid"]
    if plan.causal:
        terms.append("(k_tok <= q_tok)")
    if plan.visit == "band":
        band = "(k_tok >= q_tok - LEFT) & (k_tok <= q_tok + RIGHT)"
        if plan.band_prefix:
            band = f"({band}) | (k_tok < PREFIX)"
        if plan.band_globals:
            band = f"({band}) | (q_tok < GLOBALS)"
        terms.append(f"({band})")
    if plan.mask:
        terms.append(f"(tl.load({_operand_pointer('mask', plan.mask)}) != 0)")
    w.line(f"vis = {' & '.join(terms)}")
    if predicate and plan.predicate is not None:
        w.lines(plan.predicate.code)
        w.line("vis = vis & keep")
    w.line("s = tl.where(vis, s, float('-inf'))")


def _operand_pointer(prefix: str, pattern: tuple[bool, bool]) -> str:
    """Pointers of the bias or mask elements of this tile, indexing only the dims the operand varies along."""
    terms = [f"{prefix}_base"]
    if pattern[0]:
        terms.append(f"q_row[:, None].to(tl.int64) * stride_{prefix}_q")
    if pattern[1]:
        terms.append(f"k_row[None, :] * stride_{prefix}_k")
    return " + ".join(terms)


def _emit_dscores(w: SourceWriter, plan: BackwardPlan) -> None:
    """``p``, ``ds`` (dL/ds, natural units) and ``dqk`` (dL/d(q.k)) from ``s``, ``lse``, ``delta``, ``dp``."""
    w.lines("""
        ds = p * (dp - delta[:, None])
    """)
    if plan.softcap:
        w.line("dqk = ds * (1.0 - th * th) * sm_scale")
    else:
        w.line("dqk = ds * sm_scale")


def _emit_stats(w: SourceWriter, plan: BackwardPlan) -> None:
    _emit_row_program(w, plan)
    w.lines(f"""
        m_i = tl.full([BLOCK_M], {M_INIT}, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    """)

    def pair(predicate: bool) -> None:
        _emit_key_side(w, plan)
        w.line(f"kt = {_load(plan, 'K_base + offs_d[:, None] + k_row[None, :] * stride_kn', _dmask(plan, 'd', True))}")
        w.line(f"qk = tl.dot(q, kt{_dot_args(plan)})")
        _emit_scores(w, plan, "qk", predicate)
        w.lines("""
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        """)

    _emit_key_loops(w, plan, pair)
    if plan.sinks:
        w.lines(f"""
            sink = tl.load(Sinks + off_h).to(tl.float32) * {LOG2E}
            m_new = tl.maximum(m_i, sink)
            l_i = l_i * tl.exp2(m_i - m_new) + tl.exp2(sink - m_new)
            m_i = m_new
        """)
    dm = _dmask(plan, "dv")
    mask = f"q_valid{' & ' + dm if dm else ''}"
    w.lines(f"""
        # a row that saw no visible key keeps lse 0: its scores are all -inf, so P = 0 whatever lse is
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), 0.0)
        O_base = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
        o = tl.load(O_base + q_row[:, None] * stride_on + offs_dv[None, :], mask={mask}, other=0.0)
        do = tl.load(DO_base + q_row[:, None] * stride_don + offs_dv[None, :], mask={mask}, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        row_ok = tl.reshape(q_valid, (BLOCK_M,))
        tl.store(Lse + row_base + q_row, lse, mask=row_ok)
        tl.store(Delta + row_base + q_row, delta, mask=row_ok)
    """)


def _emit_row_program(w: SourceWriter, plan: BackwardPlan) -> None:
    """Prologue of a per-query-block program (stats, dq): ids, bases, the query side and the q tile."""
    w.lines(f"""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = pid_bh // H
        off_h = pid_bh % H
        off_hkv = off_h // {plan.group}
        start_m = pid_m * BLOCK_M
    """)
    _emit_common_prologue(w, plan)
    _emit_kv_bases(w)
    _emit_head_bases(w, plan)
    w.line("k_pos = offs_n[None, :]  # the token map computes both sides; the key side is recomputed per block")
    _emit_query_side(w, plan)
    w.line(f"q = {_load(plan, 'Q_base + q_row[:, None] * stride_qn + offs_d[None, :]', _dmask(plan, 'd'))}")


def _emit_dq(w: SourceWriter, plan: BackwardPlan) -> None:
    _emit_row_program(w, plan)
    dm = _dmask(plan, "dv")
    w.lines(f"""
        do = {_load(plan, 'DO_base + q_row[:, None] * stride_don + offs_dv[None, :]', dm)}
        lse = tl.load(Lse + row_base + q_row)
        delta = tl.load(Delta + row_base + q_row)
        dq = tl.zeros([BLOCK_M, {plan.block_d}], tl.float32)
    """)
    if plan.dbias:
        w.line("dbias_base = DBias + (off_b * H + off_h).to(tl.int64) * NQ * NK")
    dt = _dot_dtype(plan)

    def pair(predicate: bool) -> None:
        _emit_key_side(w, plan)
        w.line(f"kt = {_load(plan, 'K_base + offs_d[:, None] + k_row[None, :] * stride_kn', _dmask(plan, 'd', True))}")
        w.line(f"qk = tl.dot(q, kt{_dot_args(plan)})")
        _emit_scores(w, plan, "qk", predicate)
        w.line("p = tl.exp2(s - lse[:, None])")
        vt = _load(plan, "V_base + offs_dv[:, None] + k_row[None, :] * stride_vn", _dmask(plan, "dv", True))
        w.line(f"vt = {vt}")
        w.line(f"dp = tl.dot(do, vt{_dot_args(plan)})")
        _emit_dscores(w, plan)
        if plan.dbias:
            w.line("tl.store(dbias_base + q_row[:, None].to(tl.int64) * NK + k_row[None, :], ds, mask=vis)")
        w.line(f"dq = tl.dot(dqk.to({dt}), tl.trans(kt), dq{_dot_args(plan)})")

    _emit_key_loops(w, plan, pair)
    dm_store = _dmask(plan, "d")
    w.line("DQ_base = DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh")
    w.line(f"tl.store(DQ_base + q_row[:, None] * stride_dqn + offs_d[None, :], dq.to({plan.dtype}), "
           f"mask=q_valid{' & ' + dm_store if dm_store else ''})")


def _emit_dkdv(w: SourceWriter, plan: BackwardPlan) -> None:
    """One program per key block of one (batch, kv head): the query heads of the group, each over the query
    blocks that visit this key block."""
    w.lines("""
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        HKV = H // %d
        off_b = pid_bh // HKV
        off_hkv = pid_bh %% HKV
        start_n = pid_n * BLOCK_N
    """ % plan.group)
    _emit_common_prologue(w, plan)
    _emit_kv_bases(w)
    w.line("q_pos = offs_m[:, None]  # the token map computes both sides; the query side is recomputed per block")
    _emit_key_side(w, plan)
    w.line(f"k = {_load(plan, 'K_base + k_row[:, None] * stride_kn + offs_d[None, :]', _dmask(plan, 'd'))}")
    w.line(f"v = {_load(plan, 'V_base + k_row[:, None] * stride_vn + offs_dv[None, :]', _dmask(plan, 'dv'))}")
    w.lines(f"""
        dk = tl.zeros([BLOCK_N, {plan.block_d}], tl.float32)
        dv = tl.zeros([BLOCK_N, {plan.block_dv}], tl.float32)
    """)
    dt = _dot_dtype(plan)

    def pair(predicate: bool) -> None:
        _emit_query_side(w, plan)
        w.line(f"q = {_load(plan, 'Q_base + q_row[:, None] * stride_qn + offs_d[None, :]', _dmask(plan, 'd'))}")
        w.line(f"do = {_load(plan, 'DO_base + q_row[:, None] * stride_don + offs_dv[None, :]', _dmask(plan, 'dv'))}")
        w.lines(f"""
            lse = tl.load(Lse + row_base + q_row)
            delta = tl.load(Delta + row_base + q_row)
            qk = tl.dot(q, tl.trans(k){_dot_args(plan)})
        """)
        _emit_scores(w, plan, "qk", predicate)
        w.line("p = tl.exp2(s - lse[:, None])")
        w.line(f"dv = tl.dot(tl.trans(p.to({dt})), do, dv{_dot_args(plan)})")
        w.line(f"dp = tl.dot(do, tl.trans(v){_dot_args(plan)})")
        _emit_dscores(w, plan)
        w.line(f"dk = tl.dot(tl.trans(dqk.to({dt})), q, dk{_dot_args(plan)})")

    with w.block(f"for g in range(0, {plan.group}):"):
        w.line(f"off_h = off_hkv * {plan.group} + g")
        _emit_head_bases(w, plan)
        _emit_query_loops(w, plan, pair)
    dk_mask = "k_valid" if plan.token_map is None else "(k_pos < NKV)"
    if plan.token_map is not None:
        # key positions may repeat a token (halo copies): per-position rows, summed per token in torch
        w.line("k_at = tl.reshape(start_n + offs_n, (BLOCK_N,))")
        w.line("tl.store(KTok + k_at, tl.reshape(tl.where(k_valid, k_tok, -1), (BLOCK_N,)), "
               "mask=(k_at < NKV) & (pid_bh == 0))")
        row = "k_at"
    else:
        row = "k_row"
    dmk, dmv = _dmask(plan, "d"), _dmask(plan, "dv")
    w.lines(f"""
        DK_base = DK + off_b.to(tl.int64) * stride_dkb + off_hkv.to(tl.int64) * stride_dkh
        DV_base = DV + off_b.to(tl.int64) * stride_dvb + off_hkv.to(tl.int64) * stride_dvh
        tl.store(DK_base + {row}[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=tl.trans({dk_mask}){' & ' + dmk if dmk else ''})
        tl.store(DV_base + {row}[:, None] * stride_dvn + offs_dv[None, :], dv.to(DV.dtype.element_ty),
                 mask=tl.trans({dk_mask}){' & ' + dmv if dmv else ''})
    """)


# ---------------------------------------------------------------------------------------- the visit loops


def _emit_key_loops(w: SourceWriter, plan: BackwardPlan, pair) -> None:
    """The key blocks query block ``pid_m`` visits, calling ``pair(predicate)`` with ``start_n`` set."""
    if plan.visit == "dense":
        hi = "tl.minimum(start_m + BLOCK_M, NK)" if plan.causal else "NK"
        with w.block(f"for start_n in range(0, {hi}, BLOCK_N):"):
            pair(False)
        return
    if plan.visit == "band":
        # prefix (sink/global) key blocks left of the band, then the band; global query rows see every key
        w.lines("""
            band_lo = (tl.maximum(start_m - LEFT, 0) // BLOCK_N) * BLOCK_N
            band_hi = tl.minimum(start_m + BLOCK_M + RIGHT, NK)
            pre_end = tl.minimum(((PREFIX + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, band_lo)
        """)
        if plan.band_globals:
            everything = "tl.minimum(start_m + BLOCK_M, NK)" if plan.causal else "NK"
            w.lines(f"""
                band_lo = tl.where(start_m < GLOBALS, 0, band_lo)
                band_hi = tl.where(start_m < GLOBALS, {everything}, band_hi)
                pre_end = tl.where(start_m < GLOBALS, 0, pre_end)
            """)
        with w.block("for start_n in range(0, pre_end, BLOCK_N):"):
            pair(False)
        with w.block("for start_n in range(band_lo, band_hi, BLOCK_N):"):
            pair(False)
        return
    w.line("lay = LayQ + off_b.to(tl.int64) * stride_lq_b + (off_h // LAY_GROUP).to(tl.int64) * stride_lq_h "
           "+ pid_m.to(tl.int64) * stride_lq_m")
    _emit_layout_entries(w, plan, pair, "WQ", "start_n", "BLOCK_N", None)


def _emit_query_loops(w: SourceWriter, plan: BackwardPlan, pair) -> None:
    """The query blocks that visit key block ``pid_n``, calling ``pair(predicate)`` with ``start_m`` (and the
    query block index ``pid_m``, which predicates may read) set."""
    if plan.visit == "dense":
        lo = "(start_n // BLOCK_M) * BLOCK_M" if plan.causal else "0"
        with w.block(f"for start_m in range({lo}, NQ, BLOCK_M):"):
            w.line("pid_m = start_m // BLOCK_M")
            pair(False)
        return
    if plan.visit == "band":
        # query i sees key j when j - RIGHT <= i <= j + LEFT, or i < GLOBALS, or j < PREFIX (every row)
        w.lines("""
            band_lo = (tl.maximum(start_n - RIGHT, 0) // BLOCK_M) * BLOCK_M
            band_hi = tl.minimum(start_n + BLOCK_N + LEFT, NQ)
        """)
        if plan.band_prefix:
            w.lines("""
                band_lo = tl.where(start_n < PREFIX, 0, band_lo)
                band_hi = tl.where(start_n < PREFIX, NQ, band_hi)
            """)
        w.line("glob_end = tl.minimum(((GLOBALS + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, band_lo)")
        for lo, hi in (("0", "glob_end"), ("band_lo", "band_hi")):
            with w.block(f"for start_m in range({lo}, {hi}, BLOCK_M):"):
                w.line("pid_m = start_m // BLOCK_M")
                pair(False)
        return
    w.line("lay = LayK + off_b.to(tl.int64) * stride_lk_b + (off_h // LAY_GROUP).to(tl.int64) * stride_lk_h "
           "+ pid_n.to(tl.int64) * stride_lk_m")
    _emit_layout_entries(w, plan, pair, "WK", "start_m", "BLOCK_M", "pid_m")


def _emit_layout_entries(w: SourceWriter, plan: BackwardPlan, pair, width: str, start: str, block: str,
                         index: Optional[str]) -> None:
    """A packed layout row ``[n_partial, n, blocks (width), slots (width)]`` at ``lay``: partial entries
    (with the predicate), then the others."""
    w.line("n_partial = tl.load(lay)")
    w.line("n_all = tl.load(lay + 1)")
    for lo, hi, predicate in (("0", "n_partial", True), ("n_partial", "n_all", False)):
        if predicate and plan.predicate is None:
            continue  # the launcher marks no entry partial without a predicate
        with w.block(f"for i in range({lo}, {hi}):"):
            w.line("blk = tl.load(lay + 2 + i)")
            if index is not None:
                w.line(f"{index} = blk")
            w.line(f"{start} = tl.multiple_of(blk * {block}, {block})")
            if plan.predicate is not None:
                w.line(f"slot = tl.load(lay + 2 + {width} + i)")
            pair(predicate)


# -------------------------------------------------------------------------------------- layouts, packed


def pack_layout_rows(layout, bm: int, bn: int, transposed: bool, with_partial: bool) -> tuple[Tensor, int]:
    """A block layout's entries grouped per query block (``transposed`` False) or per key block (True).

    ``layout.kv_blocks`` ``[*lead, nQB, K]`` (lead of at most 2 dims). Returns int32 ``[L0, L1, nRows,
    2 + 2W]``: per row ``[n_partial, n, blocks (W), slots (W)]`` where ``blocks`` are the other side's block
    indices (partial entries first, each group ascending) and ``slots`` the entries' positions in the forward
    row (what predicates read); and W. ``with_partial`` False marks no entry partial.
    """
    kv = layout.kv_blocks
    lead = (1,) * (2 - (kv.dim() - 2)) + tuple(kv.shape[:-2])
    nqb, width = kv.shape[-2:]
    kv = kv.reshape(*lead, nqb, width)
    nkb = cdiv(layout.nk, bn)
    visited = kv >= 0
    if not with_partial:
        partial = torch.zeros_like(visited)
    elif layout.partial is None:
        partial = visited
    else:
        partial = layout.partial.reshape(kv.shape) & visited
    l0, l1, qb, slot = visited.nonzero(as_tuple=True)
    kb = kv[l0, l1, qb, slot]
    part = partial[l0, l1, qb, slot]
    head = l0 * lead[1] + l1
    rows, other, n_rows, n_other = ((head * nkb + kb, qb, nkb, nqb) if transposed else (head * nqb + qb, kb, nqb, nkb))
    total = lead[0] * lead[1] * n_rows
    order = torch.argsort((rows * 2 + (~part).long()) * n_other + other)
    rows, other, slot, part = rows[order], other[order], slot[order], part[order]
    counts = torch.bincount(rows, minlength=total)
    n_partial = torch.bincount(rows[part], minlength=total)
    w = max(1, int(counts.max())) if rows.numel() else 1
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    packed = torch.zeros(total, 2 + 2 * w, dtype=torch.int32, device=kv.device)
    packed[:, 0] = n_partial.to(torch.int32)
    packed[:, 1] = counts.to(torch.int32)
    packed[rows, 2 + col] = other.to(torch.int32)
    packed[rows, 2 + w + col] = slot.to(torch.int32)
    return packed.reshape(*lead, n_rows, 2 + 2 * w), w


def _layout_values(visit: LayoutVisit, bm: int, bn: int, hq: int, with_partial: bool) -> dict:
    layout = visit.layout_for(bm, bn)
    values = {}
    for name, transposed in (("q", False), ("k", True)):
        rows, width = pack_layout_rows(layout, bm, bn, transposed, with_partial)
        l0, l1, n_rows, row_len = rows.shape
        values.update({f"Lay{name.upper()}": rows, f"stride_l{name}_b": l1 * n_rows * row_len if l0 > 1 else 0,
                       f"stride_l{name}_h": n_rows * row_len if l1 > 1 else 0, f"stride_l{name}_m": row_len,
                       f"W{name.upper()}": width})
        values["LAY_GROUP"] = hq // l1 if l1 > 1 else 1
    return values


# ------------------------------------------------------------------------------------------- the launcher


class BackwardGrads(NamedTuple):
    """What :func:`softmax_backward` returns."""

    dq: Tensor
    """``[B, Hq, Nq, Dqk]`` in q's dtype."""
    dk: Tensor
    """``[B, Hkv, Nk, Dqk]`` in k's dtype (summed over the query heads of each kv head)."""
    dv: Tensor
    """``[B, Hkv, Nk, Dv]`` in v's dtype."""
    dscores: Optional[Tensor]
    """float32 ``[B, Hq, Nq, Nk]`` dL/d(score) (the bias gradient before reduction), when asked for."""
    dsinks: Optional[Tensor]
    """float32 ``[Hq]``, with ``mods.sinks``."""


def tile_sizes(visit, nq: int, nk: int, device: torch.device, head_dim: int = 64) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of the backward launches (one fixed config, no autotuning:
    the layout's block where it fixes the tile, else 64 x 64 on a GPU and up to 64 x 64 in the interpreter;
    8 warps for head dims above 64 or 128 x 128 tiles, where 4 spill in the dK/dV kernel)."""
    fixed = visit.block_sizes if isinstance(visit, LayoutVisit) else None
    if fixed is not None:
        bm, bn = fixed
    elif interpreting() or device.type != "cuda":
        bm, bn = min(64, next_power_of_2(nq)), min(64, next_power_of_2(nk))  # few, large tiles: fast there
    else:
        bm, bn = 64, 64  # 64 rows per warpgroup: the smallest wgmma M; larger tiles spill in dK/dV (see report)
    return bm, bn, 8 if bm * bn >= 128 * 128 or head_dim > 64 else 4, 2


MAX_LAYOUT_TILE = 64
"""Layout blocks larger than this (block_sparse / topk with block=128) are walked as sub-tiles of this size: a
128 x 128 dK/dV tile spills 840 bytes per thread on sm_90, a 64 x 64 one does not (docs/backward_kernels.md)."""


def refined_layout(layout, tile: int):
    """``layout`` (square blocks, a multiple of ``tile``) as the same visited pairs at ``tile x tile`` blocks:
    query block r becomes rows ``r*f .. r*f+f-1``, key block c becomes ``c*f .. c*f+f-1`` (``f = block/tile``),
    sub-blocks past the sequence dropped. Every entry is whole (``partial`` None is not used: callers refine
    only layouts without a predicate)."""
    from attncc.variants.blocks import BlockLayout

    f = layout.block_k // tile
    kv = layout.kv_blocks
    fine = (kv[..., None] * f + torch.arange(f, device=kv.device)).flatten(-2)
    fine = torch.where(kv.repeat_interleave(f, -1) >= 0, fine, -1)
    fine = torch.where(fine < cdiv(layout.nk, tile), fine, -1)
    fine = fine.repeat_interleave(f, -2)[..., :cdiv(layout.nq, tile), :]
    return BlockLayout(tile, tile, layout.nq, layout.nk, fine, None)


def _walkable(visit, max_tile: int):
    """``visit`` with layout blocks above ``max_tile`` refined (no predicate, no token map: their code reads
    the forward's block indices)."""
    if not isinstance(visit, LayoutVisit) or visit.block_sizes is None or visit.predicate is not None \
            or visit.token_map is not None:
        return visit
    bm, bn = visit.block_sizes
    if bm != bn or bm <= max_tile or bm % max_tile:
        return visit
    fine = refined_layout(visit.layout_for(bm, bn), max_tile)
    return dataclasses.replace(visit, layout_for=lambda m, n: fine, block_sizes=(max_tile, max_tile))


def softmax_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, grad_out: Tensor, mods: ScoreMods,
                     visit=DenseVisit(), *, bias_grad: bool = False,
                     max_tile: int = MAX_LAYOUT_TILE) -> BackwardGrads:
    """Gradients of softmax attention over ``visit`` (the forward's visit) by the generated backward kernels.

    q ``[B, Hq, Nq, Dqk]``, k ``[B, Hkv, Nk, Dqk]``, v ``[B, Hkv, Nk, Dv]``, ``out`` and ``grad_out``
    ``[B, Hq, Nq, Dv]``. ``mods``: scale, causal, softcap, bias, mask, sinks as in the forward (no dropout).
    ``bias_grad`` asks for ``dscores`` (float32 ``[B, Hq, Nq, Nk]``; reduce it to the bias's shape).
    ``max_tile``: larger blocks of a layout without hooks are walked as sub-tiles of this size.
    """
    b, hq, nq, d = q.shape
    _, hkv, nk, dv = v.shape
    if mods.dropout_p > 0:
        raise AttnccError("softmax_backward: attention dropout has no backward kernel")
    q, k, v, out, grad_out = (t.contiguous() for t in (q, k, v, out, grad_out))
    visit = _walkable(visit, max_tile)
    plan = _make_plan(q, d, dv, hq // hkv, mods, visit, bias_grad, nk)
    tm = plan.token_map is not None
    n_q_visit = visit.token_map.n_q_visit if tm else nq
    n_k_visit = visit.token_map.n_k_visit if tm else nk
    bm, bn, warps, stages = tile_sizes(visit, n_q_visit, n_k_visit, q.device, max(plan.block_d, plan.block_dv))
    kernels = {name: load_kernel(name, plan.descriptor(), lambda: generate_source(plan), q.device)
               for name in KERNELS}
    f32 = dict(dtype=torch.float32, device=q.device)
    lse, delta = torch.zeros(b * hq, nq, **f32), torch.zeros(b * hq, nq, **f32)
    dq = torch.zeros_like(q)
    if tm:  # per key position, summed per token below
        dk_pos, dv_pos = torch.zeros(b, hkv, n_k_visit, d, **f32), torch.zeros(b, hkv, n_k_visit, dv, **f32)
        k_tok = torch.full((n_k_visit,), -1, dtype=torch.int32, device=q.device)
    else:
        dk_pos, dv_pos, k_tok = torch.empty_like(k), torch.empty_like(v), None
    dscores = torch.zeros(b, hq, nq, nk, **f32) if bias_grad else None
    values = {"Q": q, "K": k, "V": v, "O": out, "DO": grad_out, "DQ": dq, "DK": dk_pos, "DV": dv_pos, "Lse": lse,
              "Delta": delta, "DBias": dscores, "KTok": k_tok, "H": hq, "NQ": nq, "NK": nk, "NQV": n_q_visit,
              "NKV": n_k_visit, "sm_scale": float(mods.scale), "qk_scale": float(mods.scale) * LOG2E}
    for name, t in (("q", q), ("k", k), ("v", v), ("o", out), ("do", grad_out), ("dq", dq), ("dk", dk_pos),
                    ("dv", dv_pos)):
        values.update({f"stride_{name}b": t.stride(0), f"stride_{name}h": t.stride(1), f"stride_{name}n": t.stride(2)})
    values.update(_score_values(mods, b, hq, nq, nk, q.device))
    values.update(_visit_values(plan, mods, visit, bm, bn, hq, nq, nk))
    if plan.sinks:
        values["Sinks"] = mods.sinks.reshape(-1).float().expand(hq).contiguous()
    args = [values[name] for name in kernel_params(plan)]
    options = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    rows = (cdiv(n_q_visit, bm), b * hq)
    launch(kernels["softmax_bwd_stats"], rows, *args, **options)
    launch(kernels["softmax_bwd_dq"], rows, *args, **options)
    launch(kernels["softmax_bwd_dkdv"], (cdiv(n_k_visit, bn), b * hkv), *args, **options)
    if tm:
        dk_out, dv_out = _sum_per_token(dk_pos, k_tok, nk, k.dtype), _sum_per_token(dv_pos, k_tok, nk, v.dtype)
    else:
        dk_out, dv_out = dk_pos, dv_pos
    dsinks = None
    if plan.sinks:
        # a sink is one more softmax entry without a value: dsink = -sum_rows P_sink * delta
        p_sink = torch.exp2(values["Sinks"].repeat(b)[:, None] * LOG2E - lse)
        dsinks = -(p_sink * delta).reshape(b, hq, nq).sum((0, 2))
    return BackwardGrads(dq, dk_out, dv_out, dscores, dsinks)


def _sum_per_token(per_position: Tensor, tokens: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    keep = tokens >= 0
    index = tokens[keep].long()
    summed = per_position.new_zeros(*per_position.shape[:2], n, per_position.shape[-1])
    return summed.index_add_(2, index, per_position[:, :, keep]).to(dtype)


def _pattern(t: Optional[Tensor], nq: int, nk: int) -> Optional[tuple[bool, bool]]:
    """Whether ``t`` (broadcastable to ``[.., Nq, Nk]``) varies along queries and along keys; None without it."""
    if t is None:
        return None
    shape = (1, 1) + tuple(t.shape)
    return shape[-2] != 1 and nq != 1, shape[-1] != 1 and nk != 1


def _make_plan(q: Tensor, d: int, dv: int, group: int, mods: ScoreMods, visit, bias_grad: bool,
               nk: int) -> BackwardPlan:
    interp = interpreting() or q.device.type != "cuda"
    common = dict(
        dtype=torch_to_triton_dtype(q.dtype), d=d, block_d=next_power_of_2(d), dv=dv, block_dv=next_power_of_2(dv),
        group=group, causal=bool(mods.causal), softcap=mods.softcap > 0, bias=_pattern(mods.bias, q.shape[2], nk),
        mask=_pattern(mods.mask, q.shape[2], nk), sinks=mods.sinks is not None,
        dbias=bool(bias_grad) and mods.bias is not None,
        dot_f32=interp and q.dtype == torch.bfloat16,
        # float32 on a GPU: three TF32 products (about float32 accuracy, on the tensor cores)
        dot_precision="tf32x3" if (q.dtype == torch.float32 and not interp) else None,
    )
    if isinstance(visit, DenseVisit):
        return BackwardPlan(visit="dense", **common)
    if isinstance(visit, BandVisit):
        return BackwardPlan(visit="band", band_prefix=max(visit.sinks, visit.globals) > 0,
                            band_globals=visit.globals > 0, **common)
    if not isinstance(visit, LayoutVisit):
        raise AttnccError(f"softmax_backward: unknown visit {type(visit).__name__}")
    pred, tm = visit.predicate, visit.token_map
    return BackwardPlan(
        visit="layout",
        predicate=None if pred is None else Hook(pred.code, tuple(pred.scalars), tuple(pred.tensors),
                                                 json.dumps(pred.descriptor, sort_keys=True)),
        token_map=None if tm is None else Hook(tm.code, tuple(tm.scalars), (),
                                               json.dumps(tm.descriptor, sort_keys=True)),
        layout=json.dumps(visit.descriptor, sort_keys=True), **common)


def _score_values(mods: ScoreMods, b: int, hq: int, nq: int, nk: int, device) -> dict:
    """Bias, mask (as bytes) and softcap arguments: operands expanded to ``[B, Hq, Nq, Nk]`` (stride 0 on
    broadcast dims)."""
    values = {}
    if mods.softcap < 0 or not math.isfinite(mods.softcap):
        raise AttnccError(f"softmax_backward: softcap must be a finite number >= 0, got {mods.softcap}")
    if mods.softcap > 0:
        values["tanh_scale"] = 2.0 * LOG2E * mods.scale / mods.softcap
        values["cap_log2"] = mods.softcap * LOG2E
    for name, t in (("bias", mods.bias), ("mask", mods.mask)):
        if t is None:
            continue
        t = t.to(device).reshape((1,) * (4 - t.dim()) + tuple(t.shape)).expand(b, hq, nq, nk)
        if name == "mask":
            t = t.view(torch.uint8)
        values[name.capitalize()] = t
        for axis, stride in zip("bhqk", t.stride()):
            values[f"stride_{name}_{axis}"] = stride
    return values


def _visit_values(plan: BackwardPlan, mods: ScoreMods, visit, bm: int, bn: int, hq: int, nq: int, nk: int) -> dict:
    if isinstance(visit, BandVisit):
        if nq != nk:
            raise AttnccError(f"softmax_backward: a band visit needs as many queries as keys, got {nq} and {nk}")
        return {"LEFT": min(visit.left, nk), "RIGHT": 0 if mods.causal else min(visit.right, nk),
                "PREFIX": min(max(visit.sinks, visit.globals), nk), "GLOBALS": min(visit.globals, nq)}
    if not isinstance(visit, LayoutVisit):
        return {}
    values = _layout_values(visit, bm, bn, hq, with_partial=plan.predicate is not None)
    for name in (plan.predicate.scalars + plan.predicate.tensors if plan.predicate else ()):
        values[name] = visit.tensors[name]
    for name in (plan.token_map.scalars if plan.token_map else ()):
        values[name] = visit.tensors[name]
    return values


__all__ = ["MAX_LAYOUT_TILE", "BackwardGrads", "BackwardPlan", "generate_source", "kernel_params",
           "pack_layout_rows", "refined_layout", "softmax_backward", "tile_sizes"]
