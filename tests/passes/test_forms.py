"""Hand-written attention forms: each is found, rewritten into one attncc op, and computes what it did before.

Every form is a tiny fp32 module; every form runs through both frontends (``fx`` symbolic_trace and
``dynamo``). Positive forms check the op count, that no softmax/SDPA is left, the outputs (relative L2 error
<= 1e-5) and the report fields; negative forms check that nothing is rewritten and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attncc
from attncc.passes import verify_graph
from forms_helpers import (
    ATTENTION_OP, FRONTENDS, B, D, H, N, assert_same_outputs, check_fields, compile_form, count_ops,
    count_softmax_like, keep_mask, op_nodes, qkv, rand, run_model,
)

SCALE = D ** -0.5
INF = float("inf")


# ----------------------------------------------------------------------------------------- module shells
# forward must have named parameters (fx.symbolic_trace does not take *args); the body is a plain function of
# (module, inputs...) so the forms below stay one-liners.


class QKV(nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v):
        return self.fn(self, q, k, v)


class QKVM(nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v, m):
        return self.fn(self, q, k, v, m)


def scores(q, k):
    return q @ k.transpose(-2, -1) * SCALE


# ------------------------------------------------------------------------------------------ module forms


class SdpaDropout(nn.Module):
    def __init__(self, p: float = 0.25):
        super().__init__()
        self.p = p

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)


class ExplicitDropoutModule(nn.Module):
    def __init__(self, p: float = 0.1):
        super().__init__()
        self.drop = nn.Dropout(p)

    def forward(self, q, k, v):
        return self.drop(scores(q, k).softmax(-1)) @ v


class SoftmaxModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, q, k, v):
        return self.softmax(scores(q, k)) @ v


class RelPosBias(nn.Module):
    """T5/Swin style: a learned [num_rel, H] table gathered by a relative-index buffer, plus an additive mask."""

    def __init__(self, n: int = N, heads: int = H):
        super().__init__()
        self.n, self.heads = n, heads
        self.table = nn.Parameter(torch.randn(2 * n - 1, heads, generator=torch.Generator().manual_seed(3)))
        pos = torch.arange(n)
        self.register_buffer("rel_index", pos[:, None] - pos[None, :] + n - 1)

    def forward(self, q, k, v, m):
        bias = self.table[self.rel_index.view(-1)].view(self.n, self.n, self.heads).permute(2, 0, 1).unsqueeze(0)
        s = q @ k.transpose(-2, -1) * SCALE
        s = s + bias
        s = s + m
        return s.softmax(dim=-1) @ v


class Gpt2Buffer(nn.Module):
    """GPT-2's causal buffer, sliced to the current lengths, applied with torch.where and a finfo.min tensor."""

    def __init__(self, max_len: int = 32, use_where: bool = True, narrow: bool = False):
        super().__init__()
        self.use_where, self.narrow = use_where, narrow
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)).view(
            1, 1, max_len, max_len), persistent=False)

    def forward(self, q, k, v):
        q_len, k_len = q.size(-2), k.size(-2)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)
        if self.narrow:  # fx.symbolic_trace cannot slice a real buffer with traced sizes; narrow it can
            causal = torch.narrow(torch.narrow(self.bias, 2, k_len - q_len, q_len), 3, 0, k_len)
        else:
            causal = self.bias[:, :, k_len - q_len:k_len, :k_len]
        if self.use_where:
            mask_value = torch.full([], torch.finfo(torch.float32).min, dtype=torch.float32)
            s = torch.where(causal, s, mask_value)
        else:
            s = s.masked_fill(~causal, float("-inf"))
        p = F.softmax(s, dim=-1)
        return torch.matmul(p, v)


class LinearAttention(nn.Module):
    """Queries from x, keys/values from ctx (cross attention) or from x too (self attention)."""

    def __init__(self, c: int = H * D, heads: int = H):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(c, c)
        self.k = nn.Linear(c, c)
        self.v = nn.Linear(c, c)
        self.o = nn.Linear(c, c)
        torch.manual_seed(0)
        for lin in (self.q, self.k, self.v, self.o):
            nn.init.normal_(lin.weight, std=c ** -0.5)

    def split(self, t):
        b, n, c = t.shape
        return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x, ctx):
        q, k, v = self.split(self.q(x)), self.split(self.k(ctx)), self.split(self.v(ctx))
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, d = out.shape
        return self.o(out.transpose(1, 2).reshape(b, n, h * d))


class LinearSelfExplicit(LinearAttention):
    def forward(self, x):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        out = (q @ k.transpose(-2, -1) * SCALE).softmax(-1) @ v
        b, h, n, d = out.shape
        return self.o(out.transpose(1, 2).reshape(b, n, h * d))


class LinearCrossExplicit(LinearAttention):
    def forward(self, x, ctx):
        q, k, v = self.split(self.q(x)), self.split(self.k(ctx)), self.split(self.v(ctx))
        out = (q @ k.transpose(-2, -1) * SCALE).softmax(-1) @ v
        b, h, n, d = out.shape
        return self.o(out.transpose(1, 2).reshape(b, n, h * d))


class HeadTemperature(nn.Module):
    """Swin v2 style: cosine scores times a learned per-head temperature ([H, 1, 1], moved onto q)."""

    def __init__(self, heads: int = H):
        super().__init__()
        init = torch.log(10 * torch.ones(heads, 1, 1)) + 0.1 * torch.arange(heads)[:, None, None]
        self.logit_scale = nn.Parameter(init)

    def forward(self, q, k, v):
        s = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        s = s * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        return s.softmax(dim=-1) @ v


class Alibi(nn.Module):
    """ALiBi: per-head slopes times key distance, added to the scores, plus a causal bool mask."""

    def __init__(self, n: int = N, heads: int = H):
        super().__init__()
        slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])
        pos = torch.arange(n)
        self.register_buffer("alibi", slopes[:, None, None] * (pos[None, :] - pos[:, None]).clamp(max=0)[None])
        self.register_buffer("causal", torch.ones(n, n, dtype=torch.bool).tril())

    def forward(self, q, k, v):
        s = scores(q, k) + self.alibi
        s = s.masked_fill(~self.causal, float("-inf"))
        return F.softmax(s, dim=-1) @ v


def repeat_kv(x, n_rep: int):
    b, hkv, n, d = x.shape
    return x[:, :, None, :, :].expand(b, hkv, n_rep, n, d).reshape(b, hkv * n_rep, n, d)


# ------------------------------------------------------------------------------------------- the forms

BASE = dict(kind="self", q_heads=H, kv_heads=H, q_len=N, kv_len=N, head_dim=D, value_dim=D, causal=False,
            mask="none", softcap=0.0, dropout_p=0.0)


@dataclass
class Form:
    id: str
    make: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    fields: dict = field(default_factory=dict)
    sites: int = 1
    frontends: tuple = FRONTENDS
    gone: tuple = ()
    """Further code fragments the rewrite must remove (e.g. the exp of a written-out softmax)."""

    def expected(self) -> dict:
        return {**BASE, **self.fields}


def _qkv():
    return qkv()


def _qkv_mask(mask):
    return lambda: (*qkv(), mask())


def _bh(t):  # [B, H, N, D] -> [B*H, N, D]
    return t.reshape(B * H, *t.shape[2:])


def _qkv3():
    return tuple(_bh(t) for t in qkv())


BH3 = dict(q_heads=1, kv_heads=1, layout="(bh)nd")
HQ, HKV = 8, 2

POSITIVE = [
    # 1-7: scaled_dot_product_attention
    Form("sdpa_plain", lambda: QKV(lambda s, q, k, v: F.scaled_dot_product_attention(q, k, v)), _qkv,
         dict(source="sdpa", scale=SCALE)),
    Form("sdpa_bool_mask", lambda: QKVM(lambda s, q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)),
         _qkv_mask(lambda: keep_mask(B, 1, N, N)), dict(mask="dense")),
    Form("sdpa_float_mask", lambda: QKVM(lambda s, q, k, v, m: F.scaled_dot_product_attention(q, k, v, m)),
         _qkv_mask(lambda: rand(B, 1, N, N, seed=5)), dict(mask="bias")),
    Form("sdpa_causal", lambda: QKV(lambda s, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
         _qkv, dict(causal=True, mask="causal")),
    Form("sdpa_scale", lambda: QKV(lambda s, q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3)), _qkv,
         dict(scale=0.3)),
    Form("sdpa_dropout_eval", lambda: SdpaDropout(0.25).eval(), _qkv, dict(dropout_p=0.0)),
    Form("sdpa_gqa", lambda: QKV(lambda s, q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)),
         lambda: qkv(hq=HQ, hkv=HKV), dict(q_heads=HQ, kv_heads=HKV)),
    # 8-9: explicit products
    Form("explicit_operator", lambda: QKV(lambda s, q, k, v: (q @ k.transpose(-2, -1) * SCALE).softmax(-1) @ v),
         _qkv, dict(source="explicit", scale=SCALE)),
    Form("explicit_torch_matmul", lambda: QKV(
        lambda s, q, k, v: torch.matmul(F.softmax(torch.matmul(q, k.mT) * SCALE, dim=-1), v)), _qkv),
    Form("bmm_3d", lambda: QKV(
        lambda s, q, k, v: torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * SCALE, dim=-1), v)),
         _qkv3, BH3),
    Form("matmul_3d", lambda: QKV(
        lambda s, q, k, v: torch.matmul(torch.matmul(q, k.transpose(1, 2)).mul(SCALE).softmax(dim=2), v)),
         _qkv3, BH3),
    # 10: baddbmm
    Form("baddbmm_3d", lambda: QKVM(lambda s, q, k, v, m: torch.bmm(
        torch.baddbmm(m, q, k.transpose(1, 2), beta=1, alpha=SCALE).softmax(-1), v)),
         lambda: (*_qkv3(), rand(B * H, N, N, seed=9)), dict(BH3, mask="bias", scale=SCALE)),
    # 11: einsum
    Form("einsum", lambda: QKV(lambda s, q, k, v: torch.einsum(
        "bhqk,bhkd->bhqd", (torch.einsum("bhqd,bhkd->bhqk", q, k) * SCALE).softmax(-1), v)), _qkv,
         dict(scale=SCALE)),
    Form("einsum_blhd", lambda: QKV(lambda s, q, k, v: torch.einsum(
        "bhqk,bkhd->bqhd", torch.einsum("bqhd,bkhd->bhqk", q * SCALE, k).softmax(-1), v)),
         lambda: tuple(t.transpose(1, 2).contiguous() for t in qkv())),
    # 12: keys stored pre-transposed
    Form("k_pretransposed", lambda: QKV(lambda s, q, kT, v: (q @ kT * SCALE).softmax(-1) @ v),
         lambda: (lambda q, k, v: (q, k.transpose(-2, -1).contiguous(), v))(*qkv())),
    # 13: channels-first q/k/v [B, H, D, N], output [B, H, Dv, N]
    Form("channels_first", lambda: QKV(
        lambda s, q, k, v: v @ (q.transpose(-2, -1) @ k * SCALE).softmax(-1).transpose(-2, -1)),
         lambda: tuple(t.transpose(-2, -1).contiguous() for t in qkv())),
    # 14: where the scale sits
    Form("scale_div", lambda: QKV(lambda s, q, k, v: (q @ k.transpose(-2, -1) / math.sqrt(D)).softmax(-1) @ v),
         _qkv, dict(scale=SCALE)),
    Form("scale_on_q", lambda: QKV(lambda s, q, k, v: ((q * SCALE) @ k.transpose(-2, -1)).softmax(-1) @ v),
         _qkv, dict(scale=SCALE)),
    Form("scale_split_qk", lambda: QKV(
        lambda s, q, k, v: ((q * D ** -0.25) @ (k * D ** -0.25).transpose(-2, -1)).softmax(-1) @ v), _qkv,
         dict(scale=SCALE)),
    # 15: learned relative position bias + additive mask
    Form("relpos_bias_and_mask", RelPosBias, _qkv_mask(lambda: rand(B, 1, 1, N, seed=4)), dict(mask="bias")),
    # 16: mask spellings
    Form("masked_fill_neg_inf", lambda: QKVM(
        lambda s, q, k, v, m: scores(q, k).masked_fill(~m, float("-inf")).softmax(-1) @ v),
         _qkv_mask(lambda: keep_mask(B, 1, N, N)), dict(mask="dense")),
    Form("masked_fill_eq_zero", lambda: QKVM(
        lambda s, q, k, v, m: scores(q, k).masked_fill(m == 0, -INF).softmax(-1) @ v),
         _qkv_mask(lambda: keep_mask(B, 1, N, N).long()), dict(mask="dense")),
    Form("masked_fill_finfo_min", lambda: QKVM(
        lambda s, q, k, v, m: scores(q, k).masked_fill(~m, torch.finfo(torch.float32).min).softmax(-1) @ v),
         _qkv_mask(lambda: keep_mask(B, 1, N, N)), dict(mask="dense")),
    Form("masked_fill_finfo_dtype_min", lambda: QKVM(
        lambda s, q, k, v, m: (lambda t: t.masked_fill(~m, torch.finfo(t.dtype).min))(scores(q, k)).softmax(-1) @ v),
         _qkv_mask(lambda: keep_mask(B, 1, N, N)), dict(mask="dense"), frontends=("dynamo",)),
    Form("where_neg_inf", lambda: QKVM(
        lambda s, q, k, v, m: torch.where(m, scores(q, k), float("-inf")).softmax(-1) @ v),
         _qkv_mask(lambda: keep_mask(1, 1, N, N)), dict(mask="dense")),
    Form("gpt2_buffer_slice_where", lambda: Gpt2Buffer(use_where=True), _qkv, dict(mask="dense"),
         frontends=("dynamo",)),
    Form("gpt2_buffer_slice_masked_fill", lambda: Gpt2Buffer(use_where=False), _qkv, dict(mask="dense"),
         frontends=("dynamo",)),
    Form("gpt2_buffer_narrow_where", lambda: Gpt2Buffer(use_where=True, narrow=True), _qkv, dict(mask="dense")),
    Form("gpt2_buffer_narrow_masked_fill", lambda: Gpt2Buffer(use_where=False, narrow=True), _qkv,
         dict(mask="dense")),
    Form("gpt2_buffer_kv_longer", lambda: Gpt2Buffer(use_where=False, narrow=True), lambda: qkv(nq=5, nk=N),
         dict(mask="dense", kind="cross", q_len=5)),
    Form("bert_extended_mask", lambda: QKVM(lambda s, q, k, v, m: (
        scores(q, k) + (1.0 - m[:, None, None, :]) * torch.finfo(torch.float32).min).softmax(-1) @ v),
         _qkv_mask(lambda: keep_mask(B, N)[:, :1].expand(B, N).float().contiguous()), dict(mask="bias")),
    # a constant causal buffer is read as structure where it is a constant (fx); Dynamo lifts buffers to inputs
    Form("alibi_causal", Alibi, _qkv, dict(mask="causal+bias", causal=True), frontends=("fx",)),
    Form("alibi_causal_lifted", Alibi, _qkv, dict(mask="dense+bias"), frontends=("dynamo",)),
    Form("per_head_temperature", HeadTemperature, _qkv, dict(scale=1.0)),
    Form("k_permute", lambda: QKV(lambda s, q, k, v: (q @ k.permute(0, 1, 3, 2) * SCALE).softmax(dim=3) @ v), _qkv,
         dict(scale=SCALE)),
    # 17: softcapping
    Form("tanh_softcap", lambda: QKV(
        lambda s, q, k, v: (2.0 * torch.tanh(scores(q, k) / 2.0)).softmax(-1) @ v), _qkv, dict(softcap=2.0)),
    # 18: softmax spellings
    Form("softmax_float_type_as", lambda: QKV(
        lambda s, q, k, v: torch.softmax(scores(q, k).float(), dim=-1).type_as(q) @ v), _qkv),
    Form("softmax_dtype_kwarg_to", lambda: QKV(
        lambda s, q, k, v: F.softmax(scores(q, k), dim=-1, dtype=torch.float32).to(q.dtype) @ v), _qkv),
    Form("softmax_module", SoftmaxModule, _qkv),
    Form("softmax_written_out", lambda: QKV(lambda s, q, k, v: (lambda t: (lambda e: e / e.sum(-1, keepdim=True))(
        torch.exp(t - t.amax(-1, keepdim=True))))(scores(q, k)) @ v), _qkv, gone=("exp(", "amax", "sum(")),
    # 19: dropout module on the probabilities (eval)
    Form("dropout_module_eval", lambda: ExplicitDropoutModule(0.1).eval(), _qkv, dict(dropout_p=0.0)),
    # 20: GQA / MQA
    Form("gqa_repeat_kv", lambda: QKV(
        lambda s, q, k, v: (q @ repeat_kv(k, HQ // HKV).transpose(-2, -1) * SCALE).softmax(-1)
        @ repeat_kv(v, HQ // HKV)), lambda: qkv(hq=HQ, hkv=HKV), dict(q_heads=HQ, kv_heads=HKV)),
    Form("gqa_repeat_interleave", lambda: QKV(
        lambda s, q, k, v: (q @ k.repeat_interleave(HQ // HKV, dim=1).transpose(-2, -1) * SCALE).softmax(-1)
        @ torch.repeat_interleave(v, HQ // HKV, dim=1)), lambda: qkv(hq=HQ, hkv=HKV), dict(q_heads=HQ, kv_heads=HKV)),
    Form("gqa_sdpa_repeat_kv", lambda: QKV(
        lambda s, q, k, v: F.scaled_dot_product_attention(q, repeat_kv(k, HQ // HKV), repeat_kv(v, HQ // HKV))),
         lambda: qkv(hq=HQ, hkv=HKV), dict(q_heads=HQ, kv_heads=HKV)),
    Form("mqa_broadcast", lambda: QKV(lambda s, q, k, v: scores(q, k).softmax(-1) @ v), lambda: qkv(hkv=1),
         dict(kv_heads=1)),
    # 21: cross attention and subsampled queries
    Form("cross_linear_sdpa", LinearAttention, lambda: (rand(B, 8, H * D, seed=1), rand(B, 14, H * D, seed=2)),
         dict(kind="cross", q_len=8, kv_len=14)),
    Form("cross_linear_explicit", LinearCrossExplicit,
         lambda: (rand(B, 8, H * D, seed=1), rand(B, 14, H * D, seed=2)), dict(kind="cross", q_len=8, kv_len=14)),
    Form("self_linear_explicit", LinearSelfExplicit, lambda: (rand(B, N, H * D, seed=1),), dict(kind="self")),
    Form("subsampled_queries", lambda: QKV(lambda s, q, k, v: scores(q[:, :, ::2], k).softmax(-1) @ v), _qkv,
         dict(kind="cross", q_len=N // 2)),
    # 22: value head dim differs
    Form("value_dim_differs", lambda: QKV(lambda s, q, k, v: scores(q, k).softmax(-1) @ v), lambda: qkv(dv=24),
         dict(value_dim=24)),
    Form("value_dim_differs_sdpa", lambda: QKV(lambda s, q, k, v: F.scaled_dot_product_attention(q, k, v)),
         lambda: qkv(dv=24), dict(value_dim=24)),
    # two sites in one graph
    Form("two_layers", lambda: QKV(lambda s, q, k, v: scores(F.scaled_dot_product_attention(q, k, v), k)
                                   .softmax(-1) @ v), _qkv, sites=2),
]


def _cases(forms):
    return [pytest.param(f, fe, id=f"{f.id}-{fe}") for f in forms for fe in f.frontends]


@pytest.mark.parametrize("form,frontend", _cases(POSITIVE))
def test_positive_form(form: Form, frontend: str):
    model = form.make()
    inputs = form.inputs()
    want = run_model(model, inputs)
    cm = compile_form(model, inputs, frontend)
    rep = cm.report()
    assert rep.frontend == frontend
    # (a) one op per site, (b) nothing of the original attention left
    assert count_ops(cm) == form.sites, cm.code()
    assert count_softmax_like(cm) == 0, cm.code()
    for fragment in form.gone:
        assert fragment not in cm.code()
    # (c) same outputs
    assert_same_outputs(run_model(cm, inputs), want)
    # (d) the report
    assert len(rep.sites) == form.sites and not rep.rejected, rep
    for site in rep.sites:
        assert site.variant == "exact"
    check_fields(rep.sites[-1], form.expected())
    for gm in cm.graph_modules:
        verify_graph(gm)


# ------------------------------------------------------------------------------------------- dropout (6, 19)


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("make", [SdpaDropout, ExplicitDropoutModule], ids=["sdpa", "dropout_module"])
def test_dropout_carried_in_training(make, frontend):
    model = make().train()
    p = model.p if isinstance(model, SdpaDropout) else model.drop.p
    inputs = qkv()
    cm = compile_form(model, inputs, frontend)
    rep = cm.report()
    assert len(rep.sites) == 1 and rep.sites[0].dropout_p == pytest.approx(p)
    (node,) = op_nodes(cm)
    assert node.kwargs["dropout_p"] == pytest.approx(p)
    assert count_softmax_like(cm) == 0
    out = run_model(cm, inputs)
    assert out.shape == (B, H, N, D) and torch.isfinite(out).all()
    # the same module in eval: no dropout, exact outputs
    model.eval()
    cm = compile_form(model, inputs, frontend)
    assert cm.report().sites[0].dropout_p == 0.0
    assert "dropout_p" not in op_nodes(cm)[0].kwargs
    assert_same_outputs(run_model(cm, inputs), run_model(model, inputs))


# ------------------------------------------------------------------------------------------ negative forms


class ReturnsProbs(nn.Module):
    def forward(self, q, k, v):
        attn = scores(q, k).softmax(-1)
        return attn @ v, attn


class Factorized(nn.Module):
    """Efficient-attention style: keys softmaxed over tokens, queries over channels, no N x N scores."""

    def forward(self, q, k, v):
        context = k.softmax(dim=-2).transpose(-2, -1) @ v
        return q.softmax(dim=-1) @ context


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(D, 10)

    def forward(self, x):
        return self.head(x).softmax(-1)


NEGATIVE = [
    ("probs_returned", ReturnsProbs, _qkv, "used elsewhere"),
    ("softmax_query_axis", lambda: QKV(lambda s, q, k, v: scores(q, k).softmax(dim=-2) @ v), _qkv,
     "not over the key axis"),
    ("softmax_query_axis_3d", lambda: QKV(lambda s, q, k, v: torch.bmm(scores(q, k).softmax(dim=1), v)), _qkv3,
     "not over the key axis"),
    ("factorized", Factorized, _qkv, None),
    ("head_mask_on_probs", lambda: QKVM(lambda s, q, k, v, m: (scores(q, k).softmax(-1) * m) @ v),
     _qkv_mask(lambda: rand(1, H, 1, 1, seed=2)), "applied to the attention probabilities"),
    ("probs_renormalized", lambda: QKV(
        lambda s, q, k, v: (lambda p: (p / (p.sum(-1, keepdim=True) + 1e-3)) @ v)(scores(q, k).softmax(-1))), _qkv,
     "applied to the attention probabilities"),
    ("probs_squared", lambda: QKV(lambda s, q, k, v: scores(q, k).softmax(-1).pow(2) @ v), _qkv,
     "applied to the attention probabilities"),
    ("scores_used_elsewhere", lambda: QKV(
        lambda s, q, k, v: (lambda t: t.softmax(-1) @ v + t.mean(-1, keepdim=True))(scores(q, k))), _qkv,
     "scores are used elsewhere"),
    ("scores_used_elsewhere_after_mask", lambda: QKVM(
        lambda s, q, k, v, m: (lambda t: t.softmax(-1) @ v + t.mean(-1, keepdim=True))(scores(q, k) + m)),
     _qkv_mask(lambda: rand(B, 1, N, N, seed=3)), "scores are used elsewhere"),
    ("classifier_softmax", Classifier, lambda: (rand(B, N, D),), ""),
]


@pytest.mark.parametrize("name,make,inputs,phrase,frontend",
                         [pytest.param(*case, fe, id=f"{case[0]}-{fe}") for case in NEGATIVE for fe in FRONTENDS])
def test_negative_form(name, make, inputs, phrase, frontend):
    model = make()
    inputs = inputs()
    want = run_model(model, inputs)
    cm = compile_form(model, inputs, frontend)
    rep = cm.report()
    assert count_ops(cm) == 0 and not rep.sites, cm.code()
    assert_same_outputs(run_model(cm, inputs), want, tol=0.0)
    if phrase == "":  # not attention at all: not even a near-miss
        assert not rep.rejected, rep.rejected
    elif phrase is not None:
        assert rep.rejected, "expected a near-miss entry"
        assert any(phrase in r.reason for r in rep.rejected), [r.reason for r in rep.rejected]


# ---------------------------------------------------------------------------------- policy and graph checks

SDPA_AND_EXPLICIT = [f for f in POSITIVE if f.id in ("sdpa_plain", "sdpa_causal", "sdpa_bool_mask",
                                                     "explicit_operator", "relpos_bias_and_mask", "gqa_repeat_kv",
                                                     "tanh_softcap", "channels_first")]


@pytest.mark.parametrize("form,frontend", _cases([f for f in POSITIVE if f.id in (
    "sdpa_plain", "sdpa_bool_mask", "explicit_operator", "relpos_bias_and_mask", "gqa_repeat_kv", "two_layers")]))
def test_policy_none_reports_same_sites(form, frontend):
    model = form.make()
    inputs = form.inputs()
    exact = compile_form(model, inputs, frontend).report()
    cm = compile_form(model, inputs, frontend, policy="none")
    none = cm.report()
    assert count_ops(cm) == 0
    assert count_softmax_like(cm) == form.sites
    assert len(none.sites) == len(exact.sites) == form.sites
    for a, b in zip(none.sites, exact.sites):
        assert a.variant == "none" and b.variant == "exact"
        for key in ("module", "kind", "causal", "mask", "q_heads", "kv_heads", "q_len", "kv_len", "head_dim",
                    "value_dim", "source", "layout", "scale", "softcap", "dropout_p"):
            assert getattr(a, key) == getattr(b, key), key
    assert_same_outputs(run_model(cm, inputs), run_model(model, inputs), tol=0.0)


@pytest.mark.parametrize("form,frontend", _cases(SDPA_AND_EXPLICIT))
def test_rewritten_code(form, frontend):
    model = form.make()
    inputs = form.inputs()
    cm = compile_form(model, inputs, frontend)
    code = cm.code()
    assert "torch.ops.attncc.attention" in code
    assert "softmax" not in code and "scaled_dot_product_attention" not in code
    for gm in cm.graph_modules:
        assert verify_graph(gm) is gm
        # no dead nodes: every call node's value is used (the op's output included)
        for node in gm.graph.nodes:
            if node.op in ("call_function", "call_method", "call_module"):
                assert node.users, f"dead node {node.format_node()}"


@pytest.mark.parametrize("form", [pytest.param(f, id=f.id) for f in SDPA_AND_EXPLICIT])
def test_fx_graph_composes_with_dynamo_and_export(form):
    model = form.make()
    inputs = form.inputs()
    want = run_model(model, inputs)
    cm = compile_form(model, inputs, "fx")
    (gm,) = cm.graph_modules
    torch._dynamo.reset()
    explained = torch._dynamo.explain(gm)(*inputs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    with torch.no_grad():
        compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
        assert_same_outputs(compiled(*inputs), want)
    exported = torch.export.export(gm, tuple(inputs))
    assert any(n.op == "call_function" and n.target is ATTENTION_OP for n in exported.graph.nodes)
    assert_same_outputs(exported.module()(*inputs), want)


@pytest.mark.parametrize("form", [pytest.param(f, id=f.id) for f in SDPA_AND_EXPLICIT[:4]])
def test_dynamo_frontend_with_aot_eager_backend(form):
    model = form.make()
    inputs = form.inputs()
    torch._dynamo.reset()
    cm = attncc.compile(model, "exact", example_inputs=inputs, frontend="dynamo", backend="aot_eager", strict=True)
    assert count_ops(cm) == 1
    assert_same_outputs(run_model(cm, inputs), run_model(model, inputs))
