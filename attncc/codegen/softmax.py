"""The online-softmax attention kernel family: one generator, specialized per site, FlashAttention-2 style.

:func:`softmax_attention` is the entry point. It reduces the call to a small frozen :class:`SoftmaxPlan`
(dtype, padded head dims, GQA group, causality, softcap, the broadcast pattern of bias and mask, the visit
kind and its code hooks), loads the kernel :func:`generate_source` writes for that plan through the kernel
cache, picks a launch config with :func:`attncc.codegen.autotune.choose` and launches it.

Kernel structure (one program per ``BLOCK_M`` queries of one (batch, query head); grid
``(cdiv(n_q, BLOCK_M), B * Hq)``):

* q is loaded once; K^T and V blocks are read in place through strides (GQA: query head ``h`` reads kv head
  ``h // group``), head dims that are not powers of two are padded with masked loads;
* scores live in log2 units: ``log2(e)`` is folded into the scale (and into bias and softcap), so the
  softmax uses ``exp2``; the running max ``m``, sum ``l`` and output ``acc`` are float32;
* each visit emits loops over key blocks in which mask arithmetic appears only where some element can be
  hidden (sequence boundary, causal diagonal, band edges, partial layout entries); the user's bias and mask
  are loaded in every block (as a ``BLOCK_N`` vector for a key-padding mask ``[B, 1, 1, Nk]``, hoisted out
  of the loop when they do not vary along keys);
* hidden scores are ``-inf`` and ``m`` starts at a finite ``-1e30``, so a hidden score contributes exactly 0
  and no ``inf - inf`` appears; a row that saw no visible key has ``l == 0`` and is written as zeros;
* learned sink logits (``mods.sinks``, one per query head) join after the last key block: ``m`` first moves
  to ``max(m, sink)`` (rescaling ``l`` and ``acc``), then ``l += exp2(sink - m)``; no value is added.

Score semantics are those of :class:`attncc.variants.base.ScoreMods` (scale, softcap, bias, mask, causal);
a row whose every visible score is below ``-1e30`` (a bias of ``-inf`` everywhere) is treated as empty.
"""

from __future__ import annotations

import dataclasses
import keyword
import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from attncc.codegen.autotune import Config, choose, length_bucket
from attncc.codegen.registry import kernel_for
from attncc.codegen.source import interpreting, launch, load_kernel, process_memo
from attncc.codegen.writer import SourceWriter, next_power_of_2, torch_to_triton_dtype
from attncc.codegen.visits import BandVisit, DenseVisit, LayoutVisit, Predicate, TokenMap
from attncc.errors import AttnccError
from attncc.util import LOG2E, all_of, cdiv
from attncc.variants.base import ScoreMods

KERNEL_NAME = "softmax_attention_fwd"
M_INIT = -1.0e30
"""Initial running max (log2 units): finite, so a block whose scores are all hidden (-inf) gives
``exp2(-inf - M_INIT) = 0`` instead of ``exp2(-inf + inf) = nan``."""

GENERATOR_VERSION = 2

FLOAT32_DOT_PRECISION = "tf32x3"
"""``input_precision`` of the dots of float32 inputs on a GPU. ``"ieee"`` runs on FMA units (no wgmma) and
spills; ``"tf32"`` alone errs ~4e-4 (relative rms of the attention output), beyond the exact policy's 1e-5;
``"tf32x3"`` (three TF32 products, fp32 accumulation) stays at the ieee error (emulated on the CPU:
``tests/codegen/test_sm90_readiness.py::test_tf32x3_keeps_float32_accuracy``)."""


# ----------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class HookCode:
    """A visit's code hook as the plan records it: only what the generated source depends on (a TokenMap's
    position counts are runtime arguments, so they are not here)."""

    name: str
    code: str
    scalars: tuple[str, ...] = ()
    tensors: tuple[str, ...] = ()
    descriptor: str = "{}"
    """The hook's descriptor as sorted JSON."""


@dataclass(frozen=True)
class SoftmaxPlan:
    """Every choice the generator makes; ``dataclasses.asdict(plan)`` is the kernel's cache descriptor."""

    dtype: str
    """``tl`` dtype of q, k, v and the output, e.g. ``"tl.bfloat16"``."""
    d: int
    block_d: int
    """Dqk padded (the sum of ``d_pieces``, or a power of two >= 16); loads are masked along it when
    ``block_d != d``."""
    dv: int
    block_dv: int
    group: int
    """Hq // Hkv (query heads per key/value head)."""
    causal: bool
    softcap: bool
    bias: Optional[tuple[bool, bool]]
    """None, or (varies along queries, varies along keys): which dims of the ``[B, Hq, Nq, Nk]``-broadcast
    bias are real (batch and head broadcasting need no code, only a zero stride)."""
    mask: Optional[tuple[bool, bool]]
    """Like ``bias``, for the bool mask."""
    visit: str
    """``"dense"``, ``"band"`` or ``"layout"``."""
    sinks: bool = False
    """Learned sink logits (one per query head) join each row's softmax denominator."""
    band_prefix: bool = False
    """Band visit: sink/global key columns exist."""
    band_globals: bool = False
    """Band visit: global query rows exist."""
    predicate: Optional[HookCode] = None
    """Layout visit: the element keep-code of partial entries."""
    token_map: Optional[HookCode] = None
    """Layout visit: the position -> token code."""
    layout: str = ""
    """Layout visit: its descriptor as sorted JSON (what ``layout_for`` depends on)."""
    dot_f32: bool = False
    """Cast dot operands to float32 (the interpreter's bf16 ``tl.dot`` is wrong)."""
    dot_precision: Optional[str] = None
    """``input_precision`` of float32 dots on a GPU (``"tf32x3"``: float32 accuracy on tensor cores)."""
    d_pieces: tuple[int, ...] = ()
    """Power-of-two widths (>= 16) the padded Dqk is split into, each its own tile and ``tl.dot`` (which
    takes power-of-two shapes only): ``(64, 16)`` for 80 pads to 80, not 128. Empty: one piece of
    ``block_d``."""
    dv_pieces: tuple[int, ...] = ()
    """Like ``d_pieces``, for Dv (the output accumulator is one tile per piece)."""
    scale_in_exp: bool = False
    """The scores stay raw (``q . k``) through masking and the row max, and the scale is applied once, in the
    FMA ``s * qk_scale - m`` inside exp2 (FlashAttention's form). Only without softcap and bias (they need
    scaled scores) and with a positive scale (``max(s) * scale`` is the max of the scaled scores only then,
    and ``-inf * scale`` stays ``-inf``)."""

    def descriptor(self) -> dict:
        """The JSON-able cache descriptor (determines the generated source completely)."""
        return {"family": "softmax_attention", "version": GENERATOR_VERSION, **dataclasses.asdict(self)}


# ------------------------------------------------------------------------------------------ the generator


def kernel_params(plan: SoftmaxPlan) -> list[str]:
    """Names of the kernel's runtime arguments, in order (the launcher passes values by these names)."""
    names = ["Q", "K", "V", "Out"]
    if plan.bias is not None:
        names.append("Bias")
    if plan.mask is not None:
        names.append("Mask")
    if plan.sinks:
        names.append("Sinks")
    if plan.visit == "layout":
        names.append("Layout")
    if plan.predicate is not None:
        names += list(plan.predicate.tensors)
    names += ["stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn",
              "stride_vb", "stride_vh", "stride_vn", "stride_ob", "stride_oh", "stride_on"]
    for prefix, pattern in (("bias", plan.bias), ("mask", plan.mask)):
        if pattern is not None:
            names += [f"stride_{prefix}_b", f"stride_{prefix}_h"]
            names += [f"stride_{prefix}_q"] if pattern[0] else []
            names += [f"stride_{prefix}_k"] if pattern[1] else []
    if plan.visit == "layout":
        names += ["stride_lay_b", "stride_lay_h", "stride_lay_m", "LAY_GROUP", "LAY_K", "NQV", "NKV"]
    names += ["H", "NQ", "NK", "qk_scale"]
    if plan.softcap:
        names += ["tanh_scale", "cap_log2"]
    if plan.visit == "band":
        names += ["LEFT", "RIGHT", "PREFIX", "GLOBALS"]
    if plan.predicate is not None:
        names += list(plan.predicate.scalars)
    if plan.token_map is not None:  # a scalar both hooks read is passed once
        names += [s for s in plan.token_map.scalars if plan.predicate is None or s not in plan.predicate.scalars]
    return names


def generate_source(plan: SoftmaxPlan) -> str:
    """The Triton module text of the kernel ``softmax_attention_fwd`` for ``plan``."""
    w = SourceWriter()
    w.line(f'"""Generated by attncc.codegen.softmax (visit={plan.visit}, dtype={plan.dtype}, d={plan.d}, '
           f'dv={plan.dv})."""')
    w.line("import triton")
    w.line("import triton.language as tl")
    w.line()
    w.line()
    w.line("@triton.jit")
    params = kernel_params(plan) + ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"]
    with w.block(f"def {KERNEL_NAME}("):
        for name in params:
            w.line(f"{name},")
    w.line("):")
    w._depth += 1  # the body of the function opened above
    _emit_prologue(w, plan)
    if plan.visit == "dense":
        _emit_dense_loops(w, plan)
    elif plan.visit == "band":
        _emit_band_loops(w, plan)
    else:
        _emit_layout_loop(w, plan)
    _emit_epilogue(w, plan)
    w._depth -= 1
    return w.text()


def _dot_args(plan: SoftmaxPlan) -> str:
    return f', input_precision="{plan.dot_precision}"' if plan.dot_precision else ""


def _emit_prologue(w: SourceWriter, plan: SoftmaxPlan) -> None:
    """Program ids, base pointers, the query tile, hoisted bias/mask rows and the softmax state."""
    if plan.causal and plan.visit != "band":
        # causal work grows with the query block: launch the heaviest blocks first (better tail balance)
        w.line("pid_m = tl.num_programs(0) - 1 - tl.program_id(0)")
    else:
        w.line("pid_m = tl.program_id(0)")
    w.lines(f"""
        pid_bh = tl.program_id(1)
        off_b = pid_bh // H
        off_h = pid_bh % H
        off_hkv = off_h // {plan.group}
        start_m = pid_m * BLOCK_M
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        # int64 batch/head offsets: B * H * N * D can exceed 2**31 elements
        Q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        K_base = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
        V_base = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
        O_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
        q_pos = start_m + offs_m[:, None]
    """)
    for name, pieces, padded in (("offs_d", plan.d_pieces, plan.block_d), ("offs_dv", plan.dv_pieces, plan.block_dv)):
        for suffix, start, width in _piece_spans(pieces, padded):
            w.line(f"{name}{suffix} = {f'{start} + ' if start else ''}tl.arange(0, {width})")
    if plan.token_map is not None:
        w.line("k_pos = offs_n[None, :]  # the token map computes both sides; only its query side is used here")
        w.lines(plan.token_map.code)
        w.lines("""
            q_ok = q_ok & (q_pos < NQV)
            q_row = tl.where(q_ok, q_tok, 0)
            q_store = q_ok
        """)
    else:
        # Rows past NQ read row NQ - 1 (in bounds, never stored) instead of a masked load.
        w.lines("""
            q_tok = q_pos
            q_row = tl.minimum(q_pos, NQ - 1)
            q_store = q_pos < NQ
        """)
    for suffix, start, width in _piece_spans(plan.d_pieces, plan.block_d):
        offs = f"offs_d{suffix}"
        dmask = f", mask={offs}[None, :] < {plan.d}, other=0.0" if start + width > plan.d else ""
        w.line(f"q{suffix} = tl.load(Q_base + q_row * stride_qn + {offs}[None, :]{dmask})")
        if plan.dot_f32:
            w.line(f"q{suffix} = q{suffix}.to(tl.float32)")
    for prefix, pattern in (("bias", plan.bias), ("mask", plan.mask)):
        if pattern is None:
            continue
        tensor = "Bias" if prefix == "bias" else "Mask"
        w.line(f"{prefix}_base = {tensor} + off_b.to(tl.int64) * stride_{prefix}_b + "
               f"off_h.to(tl.int64) * stride_{prefix}_h")
        if pattern[0]:  # int64: a full [.., Nq, Nk] operand can pass 2**31 elements per head
            w.line(f"{prefix}_base = {prefix}_base + q_row.to(tl.int64) * stride_{prefix}_q")
        if not pattern[1]:  # constant along keys: load once, outside the key loop
            w.line(f"{prefix}_hoisted = {_bias_or_mask_value(prefix, f'tl.load({prefix}_base)')}")
    w.lines(f"""
        m_i = tl.full([BLOCK_M], {M_INIT}, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    """)
    for suffix, _, width in _piece_spans(plan.dv_pieces, plan.block_dv):
        w.line(f"acc{suffix} = tl.zeros([BLOCK_M, {width}], tl.float32)")


def _bias_or_mask_value(prefix: str, loaded: str) -> str:
    if prefix == "bias":
        return f"{loaded}.to(tl.float32) * {LOG2E}"
    return f"{loaded} != 0"


def emit_key_block(w: SourceWriter, plan: SoftmaxPlan, masked: bool, keep_terms: list[str],
                   predicate: bool = False) -> None:
    """One key block at ``start_n``: load K^T, score, apply mods, hide, online-softmax update with V.

    Expects the prologue's names (``q``, ``q_pos``, ``q_tok``, ``q_row``, ``K_base``, ``V_base``, ``m_i``,
    ``l_i``, ``acc``, ...) and ``start_n`` (first visit-order key position of the block). ``masked`` is for
    blocks that may cross NK or hold tile padding: key loads are masked (without a token map) or read token 0
    for padding positions (with one), and padding keys are hidden. ``keep_terms`` are bool expressions of
    ``q_pos``/``k_pos``/``q_tok``/``k_tok`` ANDed into the keep-mask; ``predicate`` runs the plan's predicate
    code and ANDs its ``keep`` in too.
    """
    w.line("k_idx = start_n + offs_n")
    w.line("k_pos = k_idx[None, :]")
    terms = list(keep_terms)
    k_in = None  # name of the [BLOCK_N] in-bounds vector that key loads are masked with
    if plan.token_map is not None:
        w.lines(plan.token_map.code)
        w.line("k_ok = k_ok & (k_pos < NKV)")
        # A gather through the map; padding positions read token 0 (in bounds) and are hidden below (only in
        # masked blocks: full layout entries hold no padding, see TokenMap).
        w.line("k_row = tl.reshape(tl.where(k_ok, k_tok, 0), (BLOCK_N,))")
        if masked:
            terms.insert(0, "k_ok")
    else:
        w.line("k_tok = k_pos")
        w.line("k_row = k_idx")
        if masked:
            # masked loads (not clamped rows) keep the loads contiguous, hence vectorized
            w.line("k_in = k_idx < NK")
            k_in = "k_in"
    _emit_scores(w, plan, k_in)
    if predicate and plan.predicate is not None:
        w.lines(plan.predicate.code)
        terms.append("keep")
    if plan.mask is not None:
        if plan.mask[1]:
            load = _masked_load("mask_base + k_row[None, :] * stride_mask_k", k_in and f"{k_in}[None, :]", "0")
            terms.append(_bias_or_mask_value("mask", load))
        else:
            terms.append("mask_hoisted")
    if terms:
        # every term parenthesized: `&` binds tighter than comparisons in Python
        w.line(f"s = tl.where({' & '.join(_parenthesized(t) for t in terms)}, s, float('-inf'))")
    emit_online_softmax_update(w, plan, k_in)


def _masked_load(pointer: str, mask: Optional[str], other: str = "0.0") -> str:
    return f"tl.load({pointer}, mask={mask}, other={other})" if mask else f"tl.load({pointer})"


def _parenthesized(term: str) -> str:
    return term if term.isidentifier() else f"({term})"


def _emit_scores(w: SourceWriter, plan: SoftmaxPlan, k_in: Optional[str] = None) -> None:
    """``s`` [BLOCK_M, BLOCK_N] float32 in log2 units: q K^T * scale, softcap, + bias. Key loads are masked
    with ``k_in`` when given."""
    for suffix, start, width in _piece_spans(plan.d_pieces, plan.block_d):
        offs = f"offs_d{suffix}"
        dmask = f"{offs}[:, None] < {plan.d}" if start + width > plan.d else None
        load = _masked_load(f"K_base + {offs}[:, None] + k_row[None, :] * stride_kn",
                            all_of(dmask, k_in and f"{k_in}[None, :]"))
        w.line(f"kt{suffix} = {load}")
        if plan.dot_f32:
            w.line(f"kt{suffix} = kt{suffix}.to(tl.float32)")
        acc = ", qk" if start else ""  # the pieces of the head dim sum into one score tile
        w.line(f"qk = tl.dot(q{suffix}, kt{suffix}{acc}{_dot_args(plan)})")
    if plan.softcap:
        emit_softcap(w, "qk", "s")
    elif plan.scale_in_exp:
        w.line("s = qk  # raw scores: the scale is applied once, inside exp2 (see SoftmaxPlan.scale_in_exp)")
    else:
        w.line("s = qk * qk_scale")
    if plan.bias is not None:
        if plan.bias[1]:
            load = _masked_load("bias_base + k_row[None, :] * stride_bias_k", k_in and f"{k_in}[None, :]")
            w.line(f"s = s + {_bias_or_mask_value('bias', load)}")
        else:
            w.line("s = s + bias_hoisted")


def emit_softcap(w: SourceWriter, qk: str, out: str) -> None:
    """``out = softcap * tanh(qk * scale / softcap) * log2(e)`` from the runtime arguments ``tanh_scale``
    (``2 * log2(e) * scale / softcap``) and ``cap_log2`` (``softcap * log2(e)``).

    tanh through exp2 of a non-positive argument (portable: no libdevice; never overflows):
    ``tanh|x| = (1 - e^{-2|x|}) / (1 + e^{-2|x|})``.
    """
    w.lines(f"""
        t = tl.exp2(-tl.abs({qk}) * tanh_scale)
        th = (1.0 - t) / (1.0 + t)
        {out} = tl.where({qk} < 0.0, -th, th) * cap_log2
    """)


def emit_online_softmax_update(w: SourceWriter, plan: SoftmaxPlan, k_in: Optional[str] = None) -> None:
    """Fold the scores ``s`` (log2 units, hidden = -inf) of one key block into ``m_i``, ``l_i``, ``acc``,
    reading the block's V rows at ``k_row`` (loads masked with ``k_in`` when given)."""
    p_dtype = "tl.float32" if plan.dot_f32 else plan.dtype
    if plan.scale_in_exp:
        # raw scores: max(s) * scale is the max of the scaled scores (scale > 0), and s * scale - m is one FMA
        w.lines("""
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.exp2(s * qk_scale - m_new[:, None])
        """)
    else:
        w.lines("""
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
        """)
    w.lines("""
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
    """)
    spans = _piece_spans(plan.dv_pieces, plan.block_dv)
    if len(spans) > 1:
        w.line(f"p = p.to({p_dtype})")
    for suffix, start, width in spans:
        offs = f"offs_dv{suffix}"
        dmask = f"{offs}[None, :] < {plan.dv}" if start + width > plan.dv else None
        load = _masked_load(f"V_base + k_row[:, None] * stride_vn + {offs}[None, :]",
                            all_of(k_in and f"{k_in}[:, None]", dmask))
        w.line(f"acc{suffix} = acc{suffix} * alpha[:, None]")
        w.line(f"v{suffix} = {load}")
        if plan.dot_f32:
            w.line(f"v{suffix} = v{suffix}.to(tl.float32)")
        p = "p" if len(spans) > 1 else f"p.to({p_dtype})"
        w.line(f"acc{suffix} = tl.dot({p}, v{suffix}, acc{suffix}{_dot_args(plan)})")
    w.line("m_i = m_new")


def _causal_term(plan: SoftmaxPlan) -> list[str]:
    return ["k_tok <= q_tok"] if plan.causal else []


def _emit_loop(w: SourceWriter, plan: SoftmaxPlan, lo: str, hi: str, masked: bool, terms: list[str]) -> None:
    with w.block(f"for start_n in range({lo}, {hi}, BLOCK_N):"):
        w.line("start_n = tl.multiple_of(start_n, BLOCK_N)")
        emit_key_block(w, plan, masked, terms)


def _emit_dense_loops(w: SourceWriter, plan: SoftmaxPlan) -> None:
    """All key blocks; causal (top-left): only up to the diagonal, masking only blocks that cross it."""
    if plan.causal:
        w.lines("""
            # Blocks ending at or before the first query row (and inside NK) are visible to every row.
            hi = tl.minimum(start_m + BLOCK_M, NK)
            full_end = (tl.minimum(start_m + 1, NK) // BLOCK_N) * BLOCK_N
        """)
        _emit_loop(w, plan, "0", "full_end", False, [])
        _emit_loop(w, plan, "full_end", "hi", True, ["k_pos < NK", "k_pos <= q_pos"])
    else:
        w.line("full_end = (NK // BLOCK_N) * BLOCK_N")
        _emit_loop(w, plan, "0", "full_end", False, [])
        _emit_loop(w, plan, "full_end", "NK", True, ["k_pos < NK"])


def _emit_band_loops(w: SourceWriter, plan: SoftmaxPlan) -> None:
    """Key blocks meeting ``[start_m - LEFT, end_m - 1 + RIGHT]``, plus the prefix blocks before them; the
    blocks inside the band for every row of the query block need no mask. Global query rows see all keys.

    The launcher passes ``RIGHT = 0`` under causality, so the band is causal by itself; prefix columns past
    the diagonal still need the causal term.
    """
    band = "(k_pos >= q_pos - LEFT) & (k_pos <= q_pos + RIGHT)"
    if plan.band_prefix:
        band = f"({band}) | (k_pos < PREFIX)"
    if not plan.band_globals:
        _emit_band_rows(w, plan, band)
        return
    with w.block("if start_m < GLOBALS:"):
        w.line("# this block holds global query rows (they see every key): few blocks, all masked")
        # a name of its own: `hi` of the other branch may differ in type
        w.line(f"hi_all = {'tl.minimum(NK, start_m + BLOCK_M)' if plan.causal else 'NK'}")
        _emit_loop(w, plan, "0", "hi_all", True, ["k_pos < NK", f"({band}) | (q_pos < GLOBALS)"]
                   + _causal_term(plan))
    with w.block("else:"):
        _emit_band_rows(w, plan, band)


def _emit_band_rows(w: SourceWriter, plan: SoftmaxPlan, band: str) -> None:
    """The band loops of a query block without global rows: prefix blocks, then the band's masked left
    edge, its unmasked inside, its masked right edge."""
    w.lines("""
        end_m = tl.minimum(start_m + BLOCK_M, NK)
        lo = (tl.maximum(start_m - LEFT, 0) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M + RIGHT, NK)
        # [full_lo, full_hi): blocks inside every row's band (and inside NK)
        full_lo = tl.minimum(tl.maximum(((tl.maximum(end_m - 1 - LEFT, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N,
                                        lo), hi)
        full_hi = tl.maximum((tl.minimum(start_m + RIGHT + 1, NK) // BLOCK_N) * BLOCK_N, full_lo)
    """)
    if plan.band_prefix:
        w.lines("""
            # prefix (sink/global) key blocks left of the band; before start_m, so causality hides none
            pre_full = tl.minimum((PREFIX // BLOCK_N) * BLOCK_N, lo)
            pre_end = tl.minimum(((PREFIX + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo)
        """)
        _emit_loop(w, plan, "0", "pre_full", False, [])
        _emit_loop(w, plan, "pre_full", "pre_end", True, ["k_pos < PREFIX"])
    edge_terms = ["k_pos < NK", band] + (["k_pos <= q_pos"] if plan.causal and plan.band_prefix else [])
    _emit_loop(w, plan, "lo", "full_lo", True, edge_terms)
    _emit_loop(w, plan, "full_lo", "full_hi", False, [])
    _emit_loop(w, plan, "full_hi", "hi", True, edge_terms)


def _emit_layout_loop(w: SourceWriter, plan: SoftmaxPlan) -> None:
    """This query block's layout row ``[n_partial, n_edge, n_full, blocks (K), slots (K)]`` (see
    :func:`_convert_layout`), as three branch-free loops the compiler can each pipeline: full entries with no
    element test, edge entries (crossing the last key or the causal diagonal) with the bound and causal tests,
    partial entries with the predicate (only there: it may read per-entry data that only partial entries
    have) plus the bound and causal tests."""
    w.lines("""
        lay_row = Layout + off_b.to(tl.int64) * stride_lay_b + (off_h // LAY_GROUP).to(tl.int64) * stride_lay_h \\
            + pid_m.to(tl.int64) * stride_lay_m
        n_partial = tl.load(lay_row)
        n_edge = tl.load(lay_row + 1)
        n_full = tl.load(lay_row + 2)
    """)
    # With a token map, causality is on tokens and cannot be decided per block: it applies in every block.
    full_terms = _causal_term(plan) if plan.token_map is not None else []
    _emit_layout_group(w, plan, "lay_row + 3 + n_partial + n_edge", "n_full", False, full_terms)
    terms = _causal_term(plan)
    if plan.token_map is None:
        terms = ["k_pos < NK"] + (["k_pos <= q_pos"] if plan.causal else [])
    _emit_layout_group(w, plan, "lay_row + 3 + n_partial", "n_edge", True, terms)
    if plan.predicate is None and plan.token_map is None:
        return  # partial entries mean nothing without a predicate or tile padding: the launcher sends none
    _emit_layout_group(w, plan, "lay_row + 3", "n_partial", True, terms, predicate=plan.predicate is not None)


def _emit_layout_group(w: SourceWriter, plan: SoftmaxPlan, first: str, count: str, masked: bool,
                       terms: list[str], predicate: bool = False) -> None:
    """The loop over ``count`` layout entries starting at pointer ``first``.

    The next entry's block index (and slot) is loaded one iteration ahead (as FlexAttention does): loaded in
    the iteration that uses it, the 4-byte index joins the software pipeline's copy queue and each iteration
    waits for every outstanding copy (``cp.async.wait_group 0`` on sm_90), so K/V loads stop overlapping the
    math. Reading one entry past the group is in bounds: a row holds ``3 + 2 * LAY_K`` int32 and the groups
    fill at most its ``LAY_K`` block entries, so the index read past a group's last entry is still in the row
    (its value is never used); the slot read ahead is masked (slots end the row).
    """
    w.line(f"next_block = tl.load({first})")
    if predicate:
        w.line(f"next_slot = tl.load({first} + LAY_K)")
    with w.block(f"for i in range(0, {count}):"):
        w.line("start_n = tl.multiple_of(next_block * BLOCK_N, BLOCK_N)")
        w.line(f"next_block = tl.load({first} + i + 1)")
        if predicate:
            w.line("slot = next_slot")
            # masked: past the last partial entry's slot the row may end
            w.line(f"next_slot = tl.load({first} + LAY_K + i + 1, mask=i + 1 < {count}, other=0)")
        emit_key_block(w, plan, masked, terms, predicate=predicate)


def _emit_epilogue(w: SourceWriter, plan: SoftmaxPlan) -> None:
    spans = _piece_spans(plan.dv_pieces, plan.block_dv)
    if plan.sinks:
        # the learned sink: one more denominator term exp2(sink - m), after m moved to cover it (no overflow)
        w.lines(f"""
            sink = tl.load(Sinks + off_h).to(tl.float32) * {LOG2E}
            m_new = tl.maximum(m_i, sink)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.exp2(sink - m_new)
            m_i = m_new
        """)
        for suffix, _, _ in spans:
            w.line(f"acc{suffix} = acc{suffix} * alpha[:, None]")
    w.lines("""
        # a row that saw no visible key has l == 0 and acc == 0: it is written as zeros
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    """)
    for suffix, start, width in spans:
        offs = f"offs_dv{suffix}"
        dmask = f" & ({offs}[None, :] < {plan.dv})" if start + width > plan.dv else ""
        w.line(f"out = acc{suffix} / l_safe[:, None]")
        w.line(f"tl.store(O_base + q_row * stride_on + {offs}[None, :], out.to({plan.dtype}), mask=q_store{dmask})")


def _piece_spans(pieces: tuple[int, ...], padded: int) -> list[tuple[str, int, int]]:
    """``(name suffix, first column, width)`` of each piece of a head dim (one piece of ``padded`` when
    ``pieces`` is empty); the first piece has no suffix, so a one-piece kernel reads ``q``, ``acc``, ..."""
    spans, start = [], 0
    for j, width in enumerate(pieces or (padded,)):
        spans.append(("" if j == 0 else f"_p{j}", start, width))
        start += width
    return spans


def head_pieces(d: int) -> tuple[int, ...]:
    """The power-of-two tile widths (>= 16) a head dim of ``d`` is split into: ``d`` rounded up to a
    multiple of 16 when that is two powers of two (80 -> (64, 16), 96 -> (64, 32), 48 -> (32, 16), 160 ->
    (128, 32)), else one power of two (112 -> (128,): a third dot costs more than 16 padded columns save).
    ``tl.dot`` takes power-of-two shapes only, so this is the least padding two tiles allow."""
    padded = max(16, -(-d // 16) * 16)
    pieces = tuple(1 << bit for bit in reversed(range(padded.bit_length())) if padded >> bit & 1)
    return pieces if len(pieces) <= 2 else (next_power_of_2(d),)


# ------------------------------------------------------------------------------------------- the launcher


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods, visit=DenseVisit(), *,
                      config: Optional[Config] = None) -> Tensor:
    """Softmax attention with ``mods`` over the key blocks ``visit`` selects, as one Triton kernel.

    q ``[B, Hq, Nq, Dqk]``, k ``[B, Hkv, Nk, Dqk]``, v ``[B, Hkv, Nk, Dv]`` (``Hq % Hkv == 0``; any strides,
    copied only when the last dim is not contiguous) -> ``[B, Hq, Nq, Dv]`` in q's dtype. A query row with no
    visible key returns zeros. ``config`` forces a launch config (tests, benchmarks) instead of autotuning.
    """
    b, hq, nq, d, hkv, nk, dv = _check_shapes(q, k, v)
    if not isinstance(visit, (DenseVisit, BandVisit, LayoutVisit)):
        raise AttnccError(f"softmax_attention: visit must be DenseVisit, BandVisit or LayoutVisit, got "
                          f"{type(visit).__name__}")
    dtype = torch_to_triton_dtype(q.dtype)
    q, k, v = (_unit_last_stride(t) for t in (q, k.to(q.dtype), v.to(q.dtype)))
    bias, bias_pattern, mask, mask_pattern = _score_operands(mods, b, hq, nq, nk, q.device)

    n_q_visit, n_k_visit = nq, nk
    extra = {}
    if isinstance(visit, BandVisit):
        _check_band(visit, nq, nk)
    elif isinstance(visit, LayoutVisit):
        n_q_visit, n_k_visit, extra = _check_layout_visit(visit, nq, nk)
    plan = _make_plan(q, d, dv, hq // hkv, mods, bias_pattern, mask_pattern, visit, dtype)
    out_shape = (b, hq, nq, dv)
    # With a token map, rows are written where the map lands; zeros keep unmapped rows defined.
    out = (torch.zeros if plan.token_map is not None else torch.empty)(out_shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if nk == 0:
        return out.zero_()
    # Per-call Python work matters at short lengths (~150 us for descriptors, hashing and config lookup on a
    # slow host): a plan seen before at these sizes reuses its kernel and config directly.
    memo_key = (plan, nq, nk, n_q_visit, n_k_visit, getattr(visit, "block_sizes", None), q.device)
    memo = _LAUNCHES.get(memo_key)
    if memo is None:
        descriptor = plan.descriptor()
        kernel = load_kernel(KERNEL_NAME, descriptor, lambda: generate_source(plan), q.device)
    else:
        kernel, memo_config = memo

    values = _launch_values(plan, mods, visit, q, k, v, out, bias, mask)
    values.update(extra)
    names = kernel_params(plan)

    def layout_values(bm: int, bn: int) -> dict:
        return _layout_args(visit.layout_for(bm, bn), bm, bn, b, hq, hkv, n_q_visit, n_k_visit,
                            causal_positions=plan.causal and plan.token_map is None,
                            partial_matters=plan.predicate is not None or plan.token_map is not None)

    def run(cfg: Config) -> None:
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        call = dict(values)
        if isinstance(visit, LayoutVisit):
            call.update(layout_values(bm, bn))
        grid = (cdiv(n_q_visit, bm), b * hq)
        launch(kernel, grid, *[call[n] for n in names], **cfg.launch_kwargs())

    if config is None and memo is not None:
        config = memo_config
    elif config is None:
        configs = candidate_configs(plan, n_q_visit, n_k_visit, visit, shared_limit(q.device))
        config = choose(descriptor, length_bucket(nk), configs, run, q.device)
        _LAUNCHES[memo_key] = (kernel, config)
    run(config)
    return out


_LAUNCHES: dict = process_memo()
"""(plan, sizes, device) -> (kernel, chosen config), for this process."""


@kernel_for("exact")
def exact_kernel(spec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
    """The ``exact`` variant: every key block (up to the diagonal when causal). Shapes as in
    :func:`softmax_attention`."""
    return softmax_attention(q, k, v, mods, DenseVisit())


def local_covers(spec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> str:
    """'' when the band kernel runs this call: as many queries as keys. A decode call (Nq < Nk, queries at the
    last positions) runs the PyTorch path, which gathers only the window and sink keys of the cache; so does
    ``remainder=True`` (the band kernel has no pooled entries)."""
    if getattr(spec, "remainder", False):
        return "remainder=True: the pooled remainder entries run on the PyTorch path (no kernel adds them yet)"
    if q.shape[-2] != k.shape[-2]:
        return f"fewer queries than keys (Nq={q.shape[-2]}, Nk={k.shape[-2]}): the band kernel aligns queries " \
               f"with keys; the PyTorch path gathers the window of the cache"
    return ""


@kernel_for("local", covers=local_covers)
def local_kernel(spec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
    """The ``local`` variant (a :class:`~attncc.variants.local.LocalSpec`): the key blocks of its band plus
    its sink and global prefix. Shapes as in :func:`softmax_attention`."""
    left, right = spec.bounds(mods.causal)
    return softmax_attention(q, k, v, mods, BandVisit(left, right, spec.sinks, spec.globals))


def _score_operands(mods: ScoreMods, b: int, hq: int, nq: int, nk: int, device) -> tuple:
    """``(bias, bias_pattern, mask, mask_pattern)``: the call's bias and mask as the kernel reads them (see
    ``_score_operand``; the mask as bytes), after checking softcap, bias and mask dtypes."""
    if mods.softcap < 0 or not math.isfinite(mods.softcap):
        raise AttnccError(f"softmax_attention: softcap must be a finite number >= 0, got {mods.softcap}")
    bias, bias_pattern = _score_operand(mods.bias, "bias", b, hq, nq, nk, device)
    mask, mask_pattern = _score_operand(mods.mask, "mask", b, hq, nq, nk, device)
    if bias is not None and not bias.dtype.is_floating_point:
        raise AttnccError(f"softmax_attention: bias must be a floating tensor, got {bias.dtype}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise AttnccError(f"softmax_attention: mask must be a bool tensor, got {mask.dtype}")
        mask = mask.view(torch.uint8)  # Triton reads bytes; != 0 gives the bool back
    return bias, bias_pattern, mask, mask_pattern


def _launch_values(plan: SoftmaxPlan, mods: ScoreMods, visit, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                   bias: Optional[Tensor], mask: Optional[Tensor]) -> dict:
    """The kernel's runtime arguments by name (tensors, sizes, strides, scales, band bounds), except those of
    a layout visit (``_layout_args``, per launch config)."""
    hq, nq, nk = q.shape[1], q.shape[2], k.shape[2]
    values = {"Q": q, "K": k, "V": v, "Out": out, "H": hq, "NQ": nq, "NK": nk, "qk_scale": float(mods.scale) * LOG2E}
    if plan.sinks:
        values["Sinks"] = _sink_vector(mods.sinks, hq, q.device)
    values.update(_strides("q", q) | _strides("k", k) | _strides("v", v) | _strides("o", out))
    for name, tensor in (("bias", bias), ("mask", mask)):
        if tensor is not None:
            values[name.capitalize()] = tensor
            values[f"stride_{name}_b"], values[f"stride_{name}_h"] = tensor.stride(0), tensor.stride(1)
            values[f"stride_{name}_q"], values[f"stride_{name}_k"] = tensor.stride(2), tensor.stride(3)
    if plan.softcap:
        values["tanh_scale"] = 2.0 * LOG2E * mods.scale / mods.softcap
        values["cap_log2"] = mods.softcap * LOG2E
    if isinstance(visit, BandVisit):
        prefix = min(max(visit.sinks, visit.globals), nk)
        values.update(LEFT=min(visit.left, nk), RIGHT=0 if mods.causal else min(visit.right, nk),
                      PREFIX=prefix, GLOBALS=min(visit.globals, nq))
    return values


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, ...]:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise AttnccError(f"softmax_attention: expects [B, H, N, D] tensors, got q {tuple(q.shape)}, "
                          f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, hq, nq, d = q.shape
    _, hkv, nk, dv = v.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[1] != hkv or k.shape[2] != nk or k.shape[3] != d:
        raise AttnccError(f"softmax_attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} "
                          f"do not match (q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv])")
    if hkv == 0 or hq % hkv != 0:
        raise AttnccError(f"softmax_attention: query heads {hq} are not a multiple of kv heads {hkv}")
    if q.device != k.device or q.device != v.device:
        raise AttnccError("softmax_attention: q, k and v must be on the same device")
    if q.device.type != "cuda" and not interpreting():
        raise AttnccError(f"softmax_attention: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got "
                          f"{q.device}")
    return b, hq, nq, d, hkv, nk, dv


def _sink_vector(sinks, hq: int, device) -> Tensor:
    """Learned sink logits as the contiguous float32 ``[Hq]`` vector the kernel indexes by query head."""
    if not isinstance(sinks, Tensor) or sinks.numel() not in (1, hq) or not sinks.is_floating_point():
        raise AttnccError(f"softmax_attention: sinks must be a float tensor of {hq} values (one per query head), got "
                          f"{type(sinks).__name__} {tuple(getattr(sinks, 'shape', ()))}")
    if sinks.device != device:
        raise AttnccError(f"softmax_attention: sinks are on {sinks.device}, q on {device}")
    return sinks.reshape(-1).float().expand(hq).contiguous()


def _unit_last_stride(t: Tensor) -> Tensor:
    """``t`` itself when its last dim is contiguous (the kernel reads rows through the other strides)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _strides(prefix: str, t: Tensor) -> dict:
    return {f"stride_{prefix}b": t.stride(0), f"stride_{prefix}h": t.stride(1), f"stride_{prefix}n": t.stride(2)}


def _score_operand(t: Optional[Tensor], what: str, b: int, hq: int, nq: int, nk: int, device):
    """``t`` expanded to ``[B, Hq, Nq, Nk]`` (a view: broadcast dims get stride 0) and which of the query and
    key dims it really varies along; (None, None) without one."""
    if t is None:
        return None, None
    if not isinstance(t, Tensor):
        raise AttnccError(f"softmax_attention: {what} must be a tensor, got {type(t).__name__}")
    if t.device != device:
        raise AttnccError(f"softmax_attention: {what} is on {t.device}, q on {device}")
    if t.dim() > 4:
        raise AttnccError(f"softmax_attention: {what} of shape {tuple(t.shape)} does not broadcast to "
                          f"[B, Hq, Nq, Nk] = {[b, hq, nq, nk]}")
    shape = (1,) * (4 - t.dim()) + tuple(t.shape)
    t = t.reshape(shape)
    try:
        t = t.expand(b, hq, nq, nk)
    except RuntimeError:
        raise AttnccError(f"softmax_attention: {what} of shape {tuple(shape)} does not broadcast to "
                          f"[B, Hq, Nq, Nk] = {[b, hq, nq, nk]}") from None
    # A dim of size 1 (broadcast or genuinely 1 long) needs no per-element index: stride 0 is equivalent.
    rows, cols = shape[2] != 1 and nq != 1, shape[3] != 1 and nk != 1
    return t, (rows, cols)


def _check_band(visit: BandVisit, nq: int, nk: int) -> None:
    for name in ("left", "right", "sinks", "globals"):
        value = getattr(visit, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise AttnccError(f"softmax_attention: BandVisit.{name} must be an integer >= 0, got {value!r}")
    if nq != nk:
        raise AttnccError(f"softmax_attention: a band visit needs as many queries as keys, got Nq={nq}, Nk={nk}")


def _check_layout_visit(visit: LayoutVisit, nq: int, nk: int) -> tuple[int, int, dict]:
    """(n_q_visit, n_k_visit, the predicate's and token map's argument values)."""
    tm, pred = visit.token_map, visit.predicate
    if tm is not None:
        if tm.n_q_visit < nq or tm.n_k_visit < nk:
            raise AttnccError(f"softmax_attention: token map covers {tm.n_q_visit} x {tm.n_k_visit} positions, "
                              f"fewer than the {nq} x {nk} tokens")
        n_q_visit, n_k_visit = tm.n_q_visit, tm.n_k_visit
    else:
        n_q_visit, n_k_visit = nq, nk
    wanted = list(pred.scalars + pred.tensors) if pred is not None else []
    wanted += list(tm.scalars) if tm is not None else []
    reserved = set(_RESERVED)
    values = {}
    for name in wanted:
        if not name.isidentifier() or keyword.iskeyword(name) or name in reserved:
            raise AttnccError(f"softmax_attention: hook argument name {name!r} is not a free identifier")
        if name not in visit.tensors:
            raise AttnccError(f"softmax_attention: the visit's hooks read {name!r}, missing from LayoutVisit.tensors")
        values[name] = visit.tensors[name]
    if pred is not None:
        for name in pred.tensors:
            if not isinstance(values[name], Tensor):
                raise AttnccError(f"softmax_attention: predicate tensor {name!r} must be a Tensor")
        for name in pred.scalars:
            if not isinstance(values[name], int):
                raise AttnccError(f"softmax_attention: predicate scalar {name!r} must be an int")
    if visit.block_sizes is not None and (len(visit.block_sizes) != 2 or min(visit.block_sizes) < 16):
        raise AttnccError(f"softmax_attention: block_sizes must be two tile sizes >= 16, got {visit.block_sizes}")
    return n_q_visit, n_k_visit, values


_RESERVED = {
    # kernel arguments
    "Q", "K", "V", "Out", "Bias", "Mask", "Sinks", "Layout", "H", "NQ", "NK", "NQV", "NKV", "LAY_GROUP", "LAY_K",
    "qk_scale", "tanh_scale", "cap_log2", "LEFT", "RIGHT", "PREFIX", "GLOBALS", "BLOCK_M", "BLOCK_N",
    "tl", "triton",
    # kernel locals (a hook argument of the same name would be overwritten)
    "q", "k", "v", "s", "p", "qk", "kt", "t", "th", "acc", "m_i", "l_i", "m_new", "alpha", "keep", "out", "sink",
    "l_safe", "q_pos", "k_pos", "q_tok", "k_tok", "q_ok", "k_ok", "q_row", "k_row", "k_idx", "k_in",
    "q_store", "start_m", "start_n", "pid_m", "pid_bh", "off_b", "off_h", "off_hkv", "offs_m", "offs_n",
    "offs_d", "offs_dv", "offs_d_p1", "offs_dv_p1", "q_p1", "kt_p1", "v_p1", "acc_p1", "Q_base", "K_base",
    "V_base", "O_base", "bias_base", "mask_base", "bias_hoisted", "mask_hoisted", "slot", "i", "lay_row",
    "next_block", "next_slot", "n_partial", "n_edge", "n_full", "hi", "lo", "hi_all",
    "end_m", "full_end", "full_lo", "full_hi", "pre_full", "pre_end",
}


def _json_text(d: dict) -> str:
    import json

    try:
        return json.dumps(d, sort_keys=True)
    except TypeError:
        raise AttnccError(f"softmax_attention: a visit descriptor must be JSON-able, got {d!r}") from None


def _make_plan(q: Tensor, d: int, dv: int, group: int, mods: ScoreMods, bias_pattern, mask_pattern, visit,
               dtype: str) -> SoftmaxPlan:
    return make_plan(q.dtype, d, dv, group, mods, bias_pattern, mask_pattern, visit,
                     gpu=not interpreting() and q.device.type == "cuda")


def _split(pieces: tuple[int, ...]) -> tuple[int, ...]:
    """``SoftmaxPlan.d_pieces`` of a split: empty for one piece (the plan then reads as before splits)."""
    return pieces if len(pieces) > 1 else ()


def make_plan(q_dtype: torch.dtype, d: int, dv: int, group: int, mods: ScoreMods, bias_pattern=None,
              mask_pattern=None, visit=DenseVisit(), *, gpu: bool) -> SoftmaxPlan:
    """The plan of a call with inputs of ``q_dtype``, head dims ``d``/``dv``, ``group`` query heads per kv
    head, ``mods`` and ``visit``, for a GPU (``gpu``) or the interpreter. ``bias_pattern``/``mask_pattern``:
    see :class:`SoftmaxPlan` (None without a bias / mask). Needs no tensors (the readiness check plans
    kernels it only compiles)."""
    interp = not gpu
    common = dict(
        dtype=torch_to_triton_dtype(q_dtype), d=d, block_d=sum(head_pieces(d)), dv=dv,
        block_dv=sum(head_pieces(dv)), d_pieces=_split(head_pieces(d)), dv_pieces=_split(head_pieces(dv)),
        group=group,
        causal=bool(mods.causal), softcap=mods.softcap > 0, bias=bias_pattern, mask=mask_pattern,
        sinks=mods.sinks is not None,
        dot_f32=interp and q_dtype == torch.bfloat16,
        dot_precision=FLOAT32_DOT_PRECISION if (q_dtype == torch.float32 and not interp) else None,
        scale_in_exp=mods.softcap <= 0 and bias_pattern is None and mods.scale > 0,
    )
    if isinstance(visit, DenseVisit):
        return SoftmaxPlan(visit="dense", **common)
    if isinstance(visit, BandVisit):
        return SoftmaxPlan(visit="band", band_prefix=max(visit.sinks, visit.globals) > 0,
                           band_globals=visit.globals > 0, **common)
    pred, tm = visit.predicate, visit.token_map
    return SoftmaxPlan(
        visit="layout",
        predicate=None if pred is None else HookCode(pred.name, pred.code, tuple(pred.scalars), tuple(pred.tensors),
                                                     _json_text(pred.descriptor)),
        token_map=None if tm is None else HookCode("token_map", tm.code, tuple(tm.scalars), (),
                                                   _json_text(tm.descriptor)),
        layout=_json_text(visit.descriptor), **common)


_LAYOUT_ARGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
"""BlockLayout -> {call shape: kernel arguments}: a layout reused across calls (the usual case: variants
cache theirs) is converted once, not by a dozen small device ops per call. Layouts are immutable."""


def _layout_args(layout, bm: int, bn: int, b: int, hq: int, hkv: int, n_q_visit: int, n_k_visit: int,
                 causal_positions: bool, partial_matters: bool) -> dict:
    """The layout as the kernel reads it (memoized per layout object, see :func:`_convert_layout`)."""
    from attncc.variants.blocks import BlockLayout

    if not isinstance(layout, BlockLayout):
        raise AttnccError(f"softmax_attention: layout_for must return a BlockLayout, got {type(layout).__name__}")
    key = (bm, bn, b, hq, hkv, n_q_visit, n_k_visit, causal_positions, partial_matters)
    per_layout = _LAYOUT_ARGS.setdefault(layout, {})
    if key not in per_layout:
        per_layout[key] = _convert_layout(layout, *key)
    return per_layout[key]


def _convert_layout(layout, bm: int, bn: int, b: int, hq: int, hkv: int, n_q_visit: int, n_k_visit: int,
                    causal_positions: bool, partial_matters: bool) -> dict:
    """The layout as the kernel reads it, plus its strides (0 on broadcast dims).

    Each row becomes int32 ``[n_partial, n_edge, n_full, blocks (K), slots (K)]``: the visited key blocks
    grouped as partial (``partial_matters``: there is a predicate or tile padding to apply), edge (crossing
    the last visit position or, with ``causal_positions``, the causal diagonal) and full, each group in its
    row order; ``slots`` are the entries' indices in the original row (the predicate's ``slot``). With
    ``causal_positions``, blocks wholly above the diagonal are dropped (causality hides them entirely).
    """
    if (layout.block_q, layout.block_k, layout.nq, layout.nk) != (bm, bn, n_q_visit, n_k_visit):
        raise AttnccError(
            f"softmax_attention: layout_for({bm}, {bn}) returned a layout of blocks {layout.block_q}x"
            f"{layout.block_k} over {layout.nq}x{layout.nk} positions, expected {bm}x{bn} over "
            f"{n_q_visit}x{n_k_visit}")
    kv = layout.kv_blocks
    lead = tuple(kv.shape[:-2])
    lead = (1,) * (2 - len(lead)) + lead
    if lead[0] not in (1, b) or lead[1] not in (1, hq, hkv):
        raise AttnccError(f"softmax_attention: layout lead {tuple(kv.shape[:-2])} does not broadcast to "
                          f"(B={b}, Hq={hq}) (head size may be Hkv={hkv})")
    nqb, width = kv.shape[-2:]
    kv = kv.reshape(*lead, nqb, width)
    visited = kv >= 0
    if not partial_matters:
        partial = torch.zeros_like(visited)
    elif layout.partial is None:
        partial = visited
    else:
        partial = layout.partial.reshape(kv.shape) & visited
    start_n = kv.clamp_min(0) * bn
    edge = start_n + bn > n_k_visit
    if causal_positions:
        q_start = (torch.arange(nqb, device=kv.device) * bm)[:, None]
        q_last = (q_start + bm - 1).clamp_max(n_q_visit - 1)
        visited = visited & (start_n <= q_last)
        partial = partial & visited
        edge = edge | (start_n + bn - 1 > q_start)
    edge = edge & visited & ~partial
    full = visited & ~partial & ~edge
    # group 0: partial, 1: edge, 2: full, 3: not visited; a stable sort keeps each group in row order
    group = torch.full_like(kv, 3, dtype=torch.int8)
    group = group.masked_fill(full, 2).masked_fill(edge, 1).masked_fill(partial, 0)
    order = torch.sort(group, dim=-1, stable=True).indices
    counts = [mask.sum(-1, keepdim=True) for mask in (partial, edge, full)]
    rows = torch.cat([*counts, kv.clamp_min(0).gather(-1, order), order], dim=-1).to(torch.int32).contiguous()
    return {
        "Layout": rows,
        "stride_lay_b": rows.stride(0) if lead[0] > 1 else 0,
        "stride_lay_h": rows.stride(1) if lead[1] > 1 else 0,
        "stride_lay_m": rows.shape[-1],
        # query head h reads layout head h // LAY_GROUP (1: per query head; Hq/Hkv: per kv head)
        "LAY_GROUP": hq // lead[1] if lead[1] > 1 else 1,
        "LAY_K": width,
        "NQV": n_q_visit, "NKV": n_k_visit,
    }


# ------------------------------------------------------------------------------------------ launch configs


SHARED_BYTES_DEFAULT = 227 * 1024
"""Shared memory a block may use when the device cannot be asked (H100's opt-in limit)."""


def shared_bytes(plan: SoftmaxPlan, block_m: int, block_n: int, num_stages: int) -> int:
    """Shared memory the compiled kernel needs (exact for Triton 3.8 on sm90 without bias or mask): the q tile
    plus ``num_stages`` pipelined K and V tiles; the band kernel with global rows keeps a second set of
    pipeline buffers for its global-row branch. Bias and mask tiles that vary along queries and keys are
    pipelined too (counted as float32 / bytes for every stage: an upper bound)."""
    item = 4 if plan.dtype == "tl.float32" else 2
    sets = 2 if plan.band_globals else 1
    per_stage = block_n * (plan.block_d + plan.block_dv) * item
    for pattern, pair_bytes in ((plan.bias, 4), (plan.mask, 1)):
        if pattern is not None and pattern[1]:
            per_stage += (block_m if pattern[0] else 1) * block_n * pair_bytes
    # tf32x3 keeps the q tile twice (its high and low TF32 parts)
    q_tiles = 2 if plan.dot_precision == "tf32x3" else 1
    return sets * num_stages * per_stage + q_tiles * block_m * plan.block_d * item


def shared_limit(device: torch.device) -> int:
    """The most shared memory one block of ``device`` may use (opt-in limit on CUDA)."""
    if device.type == "cuda" and not interpreting():
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "shared_memory_per_block_optin", 0) or SHARED_BYTES_DEFAULT)
    return SHARED_BYTES_DEFAULT


def _tile_table(plan: SoftmaxPlan, visit) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, warps, stages) candidates by head dim and dtype, likeliest winners first, none that
    spills on sm_90 (``python -m attncc.codegen.readiness`` compiles them all and shows the figures)."""
    head = max(plan.block_d, plan.block_dv)
    if plan.dtype == "tl.float32":  # tf32x3: three products and two q tiles per dot, so smaller tiles
        if head <= 64:
            return [(128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (64, 32, 4, 4)]
        if head <= 128:  # every tile tried spills 64-80 bytes here (see readiness.KNOWN_SPILLS)
            return [(64, 16, 4, 3), (64, 32, 4, 3), (128, 16, 8, 3)]
        return [(64, 16, 4, 2), (64, 16, 4, 1)]
    if head <= 64:
        return [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 3)]
    if head <= 128:
        # 128x64 with 4 warps spills at head dims above 64: not offered. 128x128 with 8 warps pipelines
        # 3 stages (224 KB of shared memory at 128) where the visit's code leaves the registers for it.
        table = [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)]
        if isinstance(visit, DenseVisit):
            table.insert(2, (128, 128, 8, 3))
        return table
    return [(64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2), (128, 64, 8, 2)]


def candidate_configs(plan: SoftmaxPlan, n_q: int, n_k: int, visit=DenseVisit(),
                      smem_limit: int = SHARED_BYTES_DEFAULT, gpu: Optional[bool] = None) -> list[Config]:
    """The pruned configs :func:`choose` times: tiles no larger than the problem (and the band), fewer and
    smaller tiles for large head dims, none needing more than ``smem_limit`` bytes of shared memory; in the
    interpreter one small tile (timings mean nothing there, and small tiles keep it fast). ``gpu`` forces the
    GPU list (True) or the interpreter's (False); None: whichever this process runs."""
    cap_m, cap_n = next_power_of_2(n_q), next_power_of_2(n_k)
    if isinstance(visit, BandVisit):
        cap_n = min(cap_n, max(32, next_power_of_2(visit.left + visit.right + 1)))
    fixed = visit.block_sizes if isinstance(visit, LayoutVisit) else None
    if not (gpu if gpu is not None else not interpreting()):
        bm, bn = fixed or (min(32, cap_m), min(32, cap_n))
        return [Config.of(4, 2, BLOCK_M=bm, BLOCK_N=bn)]
    if fixed is not None:
        table = [(*fixed, w, s) for w, s in ((4, 3), (8, 3), (4, 2), (8, 2))]
    else:
        table = [(min(bm, cap_m), min(bn, cap_n), w, s) for bm, bn, w, s in _tile_table(plan, visit)]
    configs: list[Config] = []
    for bm, bn, warps, stages in table:
        cfg = Config.of(warps, stages, BLOCK_M=bm, BLOCK_N=bn)
        if cfg not in configs and shared_bytes(plan, bm, bn, stages) <= smem_limit:
            configs.append(cfg)
    if not configs:  # nothing fits: the smallest tiles without pipelining
        bm, bn, _, _ = min(table, key=lambda row: row[0] * row[1])
        configs.append(Config.of(4, 1, BLOCK_M=bm, BLOCK_N=bn))
    return configs


__all__ = [
    "BandVisit", "DenseVisit", "LayoutVisit", "Predicate", "SoftmaxPlan", "TokenMap", "candidate_configs",
    "emit_key_block", "emit_online_softmax_update", "emit_softcap", "exact_kernel", "generate_source",
    "kernel_params", "local_kernel", "make_plan", "shared_bytes", "softmax_attention",
]
