"""The backward of linear attention (``attncc.variants.linear``, no window; elu and relu feature maps) on
generated Triton kernels, in the chunk form of the forward (``attncc.codegen.linear``).

With ``w_ij = phi(q_i).phi(k_j)`` over the visible pairs, ``num_i = sum_j w_ij v_j``, ``den_i = sum_j w_ij``
and ``out_i = num_i / max(den_i, EPS)``, the output gradient ``g_i`` gives per query row

    gn_i = g_i / max(den_i, EPS)                         (the numerator's gradient, [Dv])
    gd_i = -(g_i . out_i) / den_i   where den_i >= EPS    (the denominator's, a scalar; 0 where clamped)

and, with ``dw_ij = gn_i . v_j + gd_i``:

    dphi(q_i) = sum_j dw_ij phi(k_j) = S_i gn_i + gd_i z_i          (S_i, z_i: the forward's states)
    dphi(k_j) = sum_i dw_ij phi(q_i) = R_j v_j + r_j     (R_j = sum_i phi(q_i) gn_i^T, r_j = sum_i gd_i phi(q_i))
    dv_j      = sum_i w_ij gn_i      = R_j^T phi(k_j)

over the queries that see key ``j``; ``dq = dphi(q) * phi'(q)``, ``dk = dphi(k) * phi'(k)`` (zero for masked
keys). Causal, each sum splits like the forward: the chunk's own causal ``[CHUNK, CHUNK]`` part plus a
state of the other chunks (earlier chunks' key states for dq; later chunks' query states, a reversed
prefix, for dk/dv). Bidirectional, the states are totals. Kernels:

* the forward's ``linear_chunk_state`` + ``linear_chunk_prefix`` (causal) or ``linear_state`` (bidirectional):
  ``S``, ``z``;
* ``linear_bwd_dq`` (grid ``(query chunks, B*Hq)``): the denominators again, ``gn``/``gd`` (kept in float32
  buffers for the next passes) and dq;
* ``linear_bwd_state`` (grid ``(query chunks, B*Hkv)``): each chunk's ``phi(Q)^T gn`` and ``phi(Q)^T gd``,
  summed over the query heads of a kv head; then the reversed exclusive prefix (causal) or the total;
* ``linear_bwd_dkdv`` (grid ``(key chunks, B*Hkv)``): dk and dv of a chunk of keys (GQA: the query heads of
  the group in a loop), float32, cast (and summed over the batch for batch-1 k/v) in torch; for large heads
  (``split_key_pass``) ``linear_bwd_dk`` and ``linear_bwd_dv`` instead, one accumulator each.

Programs take the whole ``Dv`` (``g . out`` needs every column); float16 operands are not rescaled (the
forward's range guards are not repeated here). Taylor features and the softmax window are not covered:
:func:`linear_attention_backward` raises for them (the autograd glue keeps the PyTorch path there).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attncc.codegen.autotune import Config
from attncc.codegen.linear import (_QKV_PARAMS, _Plan, _Run, _causal_mask, _check, _emit_heads, _feature, _masked,
                                   _module, _rows, _cols, _signature, _store_mask, plan_for,
                                   state_dtype)
from attncc.codegen.source import interpreting, launch, load_kernel
from attncc.codegen.writer import SourceWriter
from attncc.errors import AttnccError
from attncc.util import all_of, cdiv
from attncc.variants.base import ScoreMods
from attncc.variants.linear import EPS, LinearSpec, key_keep


def backward_covers(spec: LinearSpec, mods: ScoreMods) -> str:
    """'' when :func:`linear_attention_backward` takes this call, else why not (one sentence)."""
    if spec.window:
        return "the softmax window's backward is not generated (PyTorch path)"
    if spec.feature_map not in ("elu", "relu"):
        return f"the {spec.feature_map} feature map's backward is not generated (PyTorch path)"
    return ""


def linear_attention_backward(spec: LinearSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods, out: Tensor,
                              grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``linear_attention(spec, q, k, v, mods)`` (= ``out``, ``[B, Hq, Nq, Dv]``) for the output
    gradient ``grad_out`` (same shape): ``(dq, dk, dv)`` shaped and typed like q ``[B, Hq, Nq, D]``, k
    ``[B or 1, Hkv, Nk, D]`` and v ``[B or 1, Hkv, Nk, Dv]`` (batch-1 k/v get gradients summed over the batch).
    Raises AttnccError for what :func:`backward_covers` declines."""
    _check(spec, q, k, v, mods)
    why = backward_covers(spec, mods)
    if why:
        raise AttnccError(f"{spec}: {why}")
    bsz, hq, nq, d = q.shape
    nk, dvv = k.shape[2], v.shape[3]
    k_batch = k.shape[0]
    k, v = k.expand(bsz, *k.shape[1:]), v.expand(bsz, *v.shape[1:])
    keep = key_keep(spec, mods.mask, bsz, nk)
    if nq == 0 or nk == 0:
        return torch.zeros_like(q), torch.zeros_like(k[:k_batch]), torch.zeros_like(v[:k_batch])
    plan = plan_for(spec, q, v, mods, keep)
    run = _Run(plan, q, k, v, keep, spec.chunk)
    chunk = run.chunk if plan.causal else _bidirectional_chunk(max(nq, nk))
    grad_out, out = grad_out.contiguous(), out.contiguous()
    # the forward's key states: prefix per chunk (causal) or one total per kv head
    if plan.causal:
        flags = dict(reverse=False, lagged=False, rows_even=nq % chunk == 0, add_buffers=False, normalize=True)
        states = run._chunk_states(flags, lag=0)
        s, z = states["s"], states["z"]
    else:
        totals = run._state()
        s, z = totals["s"][:, None], totals["z"][:, None]  # [B*Hkv, 1, ...]: one slot
    f32 = dict(dtype=torch.float32, device=q.device)
    gn = torch.empty(bsz * hq, nq, plan.dv_pad, **f32)
    gd = torch.empty(bsz * hq, nq, **f32)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    q_chunks = cdiv(nq, chunk)
    bwd = _Kernels(plan, chunk, nq, nk, q.device)
    common = run._common_args()
    launch(bwd.load("linear_bwd_dq"), (q_chunks, bsz * hq), *common, s, z, out, grad_out, gn, gd, dq, hq,
           hq // run.hkv, nq, nk, s.shape[1], CHUNK=chunk, **bwd.config.launch_kwargs())
    # the query-side states of each chunk, then a reversed exclusive prefix (causal) or the total
    r_s = torch.empty(bsz * run.hkv, q_chunks, plan.d_pad, plan.dv_pad, dtype=state_dtype(plan), device=q.device)
    r_z = torch.empty(bsz * run.hkv, q_chunks, plan.d_pad, **f32)
    launch(bwd.load("linear_bwd_state"), (q_chunks, bsz * run.hkv), q, *q.stride(), gn, gd, r_s, r_z, hq,
           hq // run.hkv, nq, CHUNK=chunk, **bwd.config.launch_kwargs())
    # stored like the forward's states (bf16 for bf16 inputs: half the registers and bytes of the dk/dv pass)
    if plan.causal:
        run._prefix(r_s, r_s, reverse=True)
        run._prefix(r_z, r_z, reverse=True)
    else:
        r_s, r_z = r_s.float().sum(1, keepdim=True).to(r_s.dtype), r_z.sum(1, keepdim=True)
    dk = torch.empty(bsz, run.hkv, nk, d, **f32)
    dv = torch.empty(bsz, run.hkv, nk, dvv, **f32)
    for name in ("linear_bwd_dk", "linear_bwd_dv") if split_key_pass(plan) else ("linear_bwd_dkdv",):
        launch(bwd.load(name), (cdiv(nk, chunk), bsz * run.hkv), *common, r_s, r_z, gn, gd, dk, dv, hq,
               hq // run.hkv, nq, nk, r_s.shape[1], CHUNK=chunk, **bwd.config.launch_kwargs())
    if k_batch == 1 and bsz > 1:
        dk, dv = dk.sum(0, keepdim=True), dv.sum(0, keepdim=True)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _bidirectional_chunk(n: int) -> int:
    """Rows per program of the bidirectional passes (no causal product: any tile)."""
    return min(32 if interpreting() else 64, max(16, 1 << (max(1, n) - 1).bit_length()))


class _Kernels:
    """The three generated backward kernels of one plan (one module, loaded through the kernel cache)."""

    def __init__(self, plan: _Plan, chunk: int, nq: int, nk: int, device: torch.device):
        self.plan, self.device = plan, device
        self.flags = dict(q_even=nq % chunk == 0, k_even=nk % chunk == 0)
        # not tuned yet: 8 warps hold the [CHUNK, Dv] and [D, Dv] float32 tiles of D = Dv = 128
        self.config = Config.of(8, 2)

    def load(self, name: str):
        descriptor = self.plan.descriptor(name, backward=True, **self.flags)
        return load_kernel(name, descriptor, lambda: backward_source(self.plan, **self.flags), self.device)


# -- source generation ---------------------------------------------------------------------------------------


def _derivative(fmap: str, x: str) -> str:
    """``phi'(x)`` of a float32 tile (elu + 1: 1 above 0, exp(x) below; relu: 1 above 0)."""
    if fmap == "elu":
        return f"tl.where({x} > 0, 1.0, tl.exp({x}))"
    return f"tl.where({x} > 0, 1.0, 0.0)"


def _emit_phi(w: SourceWriter, plan: _Plan, out: str, x: str, mask: Optional[str]) -> None:
    """``{x}f`` (float32 copy of tile x) and ``out = phi(x)`` in the dot dtype, zero where ``mask`` is false."""
    w.line(f"{x}f = {x}.to(tl.float32)")
    phi = _feature(plan.fmap, f"{x}f")
    if mask:
        phi = f"tl.where({mask}, {phi}, 0.0)"
    w.line(f"{out} = ({phi}).to({plan.dot_dtype})")


def backward_source(plan: _Plan, q_even: bool, k_even: bool) -> str:
    """The module of ``linear_bwd_dq``, ``linear_bwd_state`` and ``linear_bwd_dkdv`` (or ``_dk`` and ``_dv``)
    for ``plan``."""
    w = SourceWriter()
    _emit_dq(w, plan, q_even)
    w.line()
    w.line()
    _emit_query_state(w, plan, q_even)
    for want in (("dk",), ("dv",)) if split_key_pass(plan) else (("dk", "dv"),):
        w.line()
        w.line()
        _emit_dkdv(w, plan, k_even, want)
    return _module(w)


def _emit_offsets(w: SourceWriter, plan: _Plan) -> tuple[Optional[str], Optional[str]]:
    w.line("offs_c = tl.arange(0, CHUNK)")
    w.line(f"offs_d = tl.arange(0, {plan.d_pad})")
    w.line(f"offs_v = tl.arange(0, {plan.dv_pad})")
    d_ok = v_ok = None
    if plan.d != plan.d_pad:
        d_ok = "d_ok"
        w.line(f"d_ok = offs_d < {plan.d}")
    if plan.dv != plan.dv_pad:
        v_ok = "v_ok"
        w.line(f"v_ok = offs_v < {plan.dv}")
    return d_ok, v_ok


def _tile(base: str, start: str, x: str, cols: str) -> str:
    """Pointers of rows ``start + offs_c`` (int64 chunk base, small int32 tile offsets) and columns ``cols``."""
    return (f"{base} + ({start}).to(tl.int64) * stride_{x}n + (offs_c[:, None] * stride_{x}n + "
            f"{cols}[None, :] * stride_{x}d)")


def _emit_key_tiles(w: SourceWriter, plan: _Plan, key: Optional[str], d_ok: Optional[str], v_ok: Optional[str]):
    """k (raw), ``fk = phi(k)`` (zero for masked keys and padded columns) and v of chunk ``t``'s keys."""
    w.line(f"k = tl.load({_tile('k_base', 't * CHUNK', 'k', 'offs_d')}{_masked(all_of(_rows(key), _cols(d_ok)))})")
    w.line(f"v = tl.load({_tile('v_base', 't * CHUNK', 'v', 'offs_v')}{_masked(all_of(_rows(key), _cols(v_ok)))})")
    _emit_phi(w, plan, "fk", "k", all_of(_rows(key), _cols(d_ok)))


def _emit_key_mask(w: SourceWriter, plan: _Plan, even: bool) -> Optional[str]:
    """``kpos`` of chunk ``t`` and the name of its mask (bounds and key padding; None: all real)."""
    w.line("kpos = t * CHUNK + offs_c")
    key = None
    if not even:
        key = "key_in" if plan.has_keep else "key_ok"
        w.line(f"{key} = kpos < NK")
    if plan.has_keep:
        w.line(f"key_ok = tl.load(keep_base + kpos * stride_mn{_masked(key, '0')}) != 0")
        key = "key_ok"
    return key


def _emit_dq(w: SourceWriter, plan: _Plan, even: bool) -> None:
    """``linear_bwd_dq``: denominators, gn/gd (stored for the key passes) and dq of one chunk of query rows."""
    params = _QKV_PARAMS, """
        S, Z, OUT, GRAD, GN, GD, DQ,
        HQ, GROUP, NQ, NK, SLOTS,
        CHUNK: tl.constexpr,
    """
    with _signature(w, "linear_bwd_dq", *params):
        w.line("t = tl.program_id(0)")
        w.line("pid_bh = tl.program_id(1)")
        _emit_heads(w, plan)
        d_ok, v_ok = _emit_offsets(w, plan)
        w.line("rows = t * CHUNK + offs_c")
        row_ok = None if even else "row_ok"
        if row_ok:
            w.line("row_ok = rows < NQ")
        q_mask = _masked(all_of(_rows(row_ok), _cols(d_ok)))
        w.line(f"q = tl.load({_tile('q_base', 't * CHUNK', 'q', 'offs_d')}{q_mask})")
        _emit_phi(w, plan, "fq", "q", None)
        w.line("slot = (b * (HQ // GROUP) + hk) * SLOTS + " + ("t" if plan.causal else "0"))
        w.line(f"state = tl.load(S + slot * {plan.d_pad * plan.dv_pad} + (offs_d[:, None] * {plan.dv_pad} + "
               f"offs_v[None, :]))")
        w.line(f"zsum = tl.load(Z + slot * {plan.d_pad} + offs_d)")
        w.line("den = tl.sum(fq.to(tl.float32) * zsum[None, :], 1)")
        if plan.causal:
            key = _emit_key_mask(w, plan, even)
            _emit_key_tiles(w, plan, key, d_ok, v_ok)
            w.line(f"visible = {_causal_mask(False)}")
            w.line(f"a = tl.where(visible, {plan.dot('fq', 'tl.trans(fk)')}, 0.0)")
            w.line("den += tl.sum(a, 1)")
        w.line("buf = pid_bh.to(tl.int64) * NQ + rows")
        tile = all_of(_rows(row_ok), _cols(v_ok))
        w.lines(f"""
            g = tl.load(GRAD + buf[:, None] * {plan.dv} + offs_v[None, :]{_masked(tile)}).to(tl.float32)
            o = tl.load(OUT + buf[:, None] * {plan.dv} + offs_v[None, :]{_masked(tile)}).to(tl.float32)
            # out = num / max(den, EPS): the clamp passes no gradient to den below EPS
            dd = tl.maximum(den, {EPS!r})
            gn = g / dd[:, None]
            gd = tl.where(den >= {EPS!r}, -tl.sum(g * o, 1) / dd, 0.0)
            tl.store(GN + buf[:, None] * {plan.dv_pad} + offs_v[None, :], gn{_store_mask(_rows(row_ok))})
            tl.store(GD + buf, gd{_store_mask(row_ok)})
        """)
        w.line(f"dfq = {plan.dot('gn', 'tl.trans(state)')} + gd[:, None] * zsum[None, :]")
        if plan.causal:
            w.line(f"dw = tl.where(visible, {plan.dot('gn', 'tl.trans(v)')} + gd[:, None], 0.0)")
            w.line(f"dfq += {plan.dot('dw', 'fk')}")
        w.line(f"dq = dfq * {_derivative(plan.fmap, 'qf')}")
        w.line(f"tl.store(DQ + buf[:, None] * {plan.d} + offs_d[None, :], dq.to({plan.dtype})"
               f"{_store_mask(all_of(_rows(row_ok), _cols(d_ok)))})")


def _emit_query_state(w: SourceWriter, plan: _Plan, even: bool) -> None:
    """``linear_bwd_state``: chunk t's ``phi(Q)^T gn`` and ``phi(Q)^T gd`` summed over a kv head's query heads."""
    params = """
        Q, stride_qb, stride_qh, stride_qn, stride_qd,
        GN, GD, RS, RZ,
        HQ, GROUP, NQ,
        CHUNK: tl.constexpr,
    """
    with _signature(w, "linear_bwd_state", params):
        w.line("t = tl.program_id(0)")
        w.line("pid_bh = tl.program_id(1)")
        w.line("b = (pid_bh // (HQ // GROUP)).to(tl.int64)")
        w.line("hk = (pid_bh % (HQ // GROUP)).to(tl.int64)")
        d_ok, _ = _emit_offsets(w, plan)
        w.line("rows = t * CHUNK + offs_c")
        row_ok = None if even else "row_ok"
        if row_ok:
            w.line("row_ok = rows < NQ")
        w.line(f"rs = tl.zeros([{plan.d_pad}, {plan.dv_pad}], dtype=tl.float32)")
        w.line(f"rz = tl.zeros([{plan.d_pad}], dtype=tl.float32)")
        with w.block("for gh in range(0, GROUP):"):
            w.line("h = hk * GROUP + gh")
            w.line("q_base = Q + b * stride_qb + h * stride_qh")
            w.line(f"q = tl.load({_tile('q_base', 't * CHUNK', 'q', 'offs_d')}"
                   f"{_masked(all_of(_rows(row_ok), _cols(d_ok)))})")
            _emit_phi(w, plan, "fq", "q", _cols(d_ok))
            w.line("buf = (b * HQ + h) * NQ + rows")
            w.line(f"gn = tl.load(GN + buf[:, None] * {plan.dv_pad} + offs_v[None, :]{_masked(_rows(row_ok))})")
            w.line(f"gd = tl.load(GD + buf{_masked(row_ok)})")
            w.line(f"rs += {plan.dot('tl.trans(fq)', 'gn')}")
            w.line("rz += tl.sum(fq.to(tl.float32) * gd[:, None], 0)")
        w.line("slot = pid_bh.to(tl.int64) * tl.num_programs(0) + t")
        w.line(f"tl.store(RS + slot * {plan.d_pad * plan.dv_pad} + (offs_d[:, None] * {plan.dv_pad} + "
               f"offs_v[None, :]), rs.to(RS.dtype.element_ty))")
        w.line(f"tl.store(RZ + slot * {plan.d_pad} + offs_d, rz)")


def split_key_pass(plan: _Plan) -> bool:
    """Whether dk and dv get a kernel each (``linear_bwd_dk``, ``linear_bwd_dv``) instead of one
    ``linear_bwd_dkdv``: at D = Dv = 128 the two float32 accumulators spill 432 bytes per thread at 8 warps
    (ptxas, sm_90); each alone fits, for twice the q/gn loads and the shared products computed twice."""
    return plan.d_pad + plan.dv_pad > 128


def _emit_dkdv(w: SourceWriter, plan: _Plan, even: bool, want: tuple[str, ...]) -> None:
    """``linear_bwd_dkdv`` (or, ``want`` one of them, ``linear_bwd_dk`` / ``linear_bwd_dv``): dk and dv (float32)
    of chunk t's keys: the later chunks' query state plus, causal, the chunk's own queries of every head of
    the group."""
    params = _QKV_PARAMS, """
        RS, RZ, GN, GD, DK, DV,
        HQ, GROUP, NQ, NK, SLOTS,
        CHUNK: tl.constexpr,
    """
    with _signature(w, "linear_bwd_" + "".join(want), *params):
        w.lines("""
            t = tl.program_id(0)
            pid_bh = tl.program_id(1)
            b = (pid_bh // (HQ // GROUP)).to(tl.int64)
            hk = (pid_bh % (HQ // GROUP)).to(tl.int64)
            k_base = K + b * stride_kb + hk * stride_kh
            v_base = V + b * stride_vb + hk * stride_vh
        """)
        if plan.has_keep:
            w.line("keep_base = KEEP + b * stride_mb")
        d_ok, v_ok = _emit_offsets(w, plan)
        key = _emit_key_mask(w, plan, even)
        _emit_key_tiles(w, plan, key, d_ok, v_ok)
        w.line("slot = pid_bh.to(tl.int64) * SLOTS + " + ("t" if plan.causal else "0"))
        w.line(f"rs = tl.load(RS + slot * {plan.d_pad * plan.dv_pad} + (offs_d[:, None] * {plan.dv_pad} + "
               f"offs_v[None, :]))")
        w.line(f"rz = tl.load(RZ + slot * {plan.d_pad} + offs_d)")
        if "dv" in want:
            w.line(f"dv = {plan.dot('fk', 'rs')}")
        if "dk" in want:
            w.line(f"dfk = {plan.dot('v', 'tl.trans(rs)')} + rz[None, :]")
        if plan.causal:
            w.line("# key row j sees the chunk's query column i >= j")
            w.line("seen = offs_c[None, :] >= offs_c[:, None]")
            w.line("rows = kpos")
            w.line("row_ok = rows < NQ")
            with w.block("for gh in range(0, GROUP):"):
                w.line("h = hk * GROUP + gh")
                w.line("q_base = Q + b * stride_qb + h * stride_qh")
                w.line(f"q = tl.load({_tile('q_base', 't * CHUNK', 'q', 'offs_d')}"
                       f"{_masked(all_of('row_ok[:, None]', _cols(d_ok)))})")
                _emit_phi(w, plan, "fq", "q", _cols(d_ok))
                w.line("buf = (b * HQ + h) * NQ + rows")
                w.line(f"gn = tl.load(GN + buf[:, None] * {plan.dv_pad} + offs_v[None, :], mask=row_ok[:, None], "
                       "other=0.0)")
                w.line("gd = tl.load(GD + buf, mask=row_ok, other=0.0)")
                if "dv" in want:
                    w.line(f"pt = tl.where(seen, {plan.dot('fk', 'tl.trans(fq)')}, 0.0)")
                    w.line(f"dv += {plan.dot('pt', 'gn')}")
                if "dk" in want:
                    w.line(f"dwt = tl.where(seen, {plan.dot('v', 'tl.trans(gn)')} + gd[None, :], 0.0)")
                    w.line(f"dfk += {plan.dot('dwt', 'fq')}")
        w.line("out_rows = pid_bh.to(tl.int64) * NK + kpos")
        in_bounds = _rows(None if even else "(kpos < NK)")
        if "dk" in want:
            dk = f"dfk * {_derivative(plan.fmap, 'kf')}"
            w.line(f"dk = tl.where({_rows(key)}, {dk}, 0.0)" if key else f"dk = {dk}")
            w.line(f"tl.store(DK + out_rows[:, None] * {plan.d} + offs_d[None, :], dk"
                   f"{_store_mask(all_of(in_bounds, _cols(d_ok)))})")
        if "dv" in want:
            w.line(f"tl.store(DV + out_rows[:, None] * {plan.dv} + offs_v[None, :], dv"
                   f"{_store_mask(all_of(in_bounds, _cols(v_ok)))})")
