"""Attention spelled with keyword arguments: every operand read whether passed by position or by name.

diffusers' attention dispatch calls ``F.scaled_dot_product_attention(query=q, key=k, value=v, ...)``, BLOOM
calls ``alibi.baddbmm(batch1=q, batch2=k, beta=, alpha=)``; canonicalize moves keywords that name positional
parameters into place, so the detector reads one form. Each form runs through both frontends and must give
one op, no softmax/SDPA left, and the original outputs (fp32, relative L2 <= 1e-5).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attncc import AttnccWarning

from forms_helpers import (
    QKV, QKVM, FRONTENDS, compile_exactly, B, D, H, N, assert_same_outputs, compile_form, count_ops, keep_mask, op_nodes,
    qkv, rand, run_model,
)

SCALE = D ** -0.5


def _bh(t):  # [B, H, N, D] -> [B*H, N, D]
    return t.reshape(B * H, *t.shape[2:])


def _qkv3():
    return tuple(_bh(t) for t in qkv())


def _with_mask(make_inputs, mask):
    return lambda: (*make_inputs(), mask())


def _sdpa_keywords(q, k, v, m):
    return F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=m, dropout_p=0.0, scale=0.3)


def _baddbmm_method(q, k, v, bias):
    return torch.bmm(bias.baddbmm(batch1=q, batch2=k.transpose(1, 2), beta=1.0, alpha=0.25).softmax(-1), v)


def _baddbmm_function_keywords(q, k, v, bias):
    scores = torch.baddbmm(input=bias, batch1=q, batch2=k.transpose(1, 2), beta=0.5, alpha=SCALE)
    return torch.bmm(torch.softmax(scores, dim=-1), v)


def _matmul_keywords(q, k, v):
    scores = torch.matmul(input=q, other=torch.transpose(k, dim0=-2, dim1=-1)) * SCALE
    return torch.matmul(input=F.softmax(input=scores, dim=-1), other=v)


def _bmm_keywords(q, k, v):
    scores = torch.bmm(input=q, mat2=k.transpose(1, 2)).mul(other=SCALE)
    return torch.bmm(input=scores.softmax(dim=-1), mat2=v)


def _softmax_dtype_keyword(q, k, v):
    return torch.softmax(q @ k.mT * SCALE, dim=-1, dtype=torch.float32) @ v


def _method_keywords(q, k, v, m):
    scores = q.matmul(other=k.transpose(dim0=-2, dim1=-1)).div(other=math.sqrt(D))
    return scores.masked_fill(mask=~m, value=float("-inf")).softmax(dim=-1).matmul(other=v)


def _where_keywords(q, k, v, m):
    scores = torch.where(condition=m, input=q @ k.mT * SCALE, other=torch.tensor(float("-inf")))
    return F.dropout(input=scores.softmax(dim=-1), p=0.1, training=False) @ v


def _where_method(q, k, v, m):
    return (q @ k.mT * SCALE).where(m, float("-inf")).softmax(-1) @ v


def _einsum_ellipsis_list(q, k, v):
    scores = torch.einsum("...qd,...kd->...qk", [q, k]) * SCALE
    return torch.einsum("...qk,...kd->...qd", [scores.softmax(-1), v])


def _softmax_float_type_as_scores(q, k, v):
    scores = q @ k.transpose(-2, -1) * SCALE
    return F.softmax(scores.float(), dim=-1).type_as(scores) @ v


KEYWORD_FORMS = [
    pytest.param(lambda: QKVM(_sdpa_keywords), _with_mask(qkv, lambda: keep_mask(B, 1, N, N)),
                 dict(source="sdpa", scale=0.3), id="sdpa_keywords"),
    pytest.param(lambda: QKV(lambda q, k, v: F.scaled_dot_product_attention(query=q, key=k, value=v, is_causal=True)),
                 qkv, dict(source="sdpa", causal=True), id="sdpa_keywords_causal"),
    pytest.param(lambda: QKV(lambda q, k, v: F.scaled_dot_product_attention(query=q, key=k, value=v,
                                                                             enable_gqa=True)),
                 lambda: qkv(hq=8, hkv=2), dict(q_heads=8, kv_heads=2), id="sdpa_keywords_gqa"),
    pytest.param(lambda: QKVM(_baddbmm_method), _with_mask(_qkv3, lambda: rand(B * H, 1, N, seed=3)),
                 dict(scale=0.25, layout="(bh)nd"), id="baddbmm_method_keywords"),
    pytest.param(lambda: QKVM(_baddbmm_function_keywords), _with_mask(_qkv3, lambda: rand(B * H, N, N, seed=4)),
                 dict(scale=SCALE), id="baddbmm_function_keywords"),
    pytest.param(lambda: QKV(_matmul_keywords), qkv, dict(scale=SCALE), id="matmul_transpose_softmax_keywords"),
    pytest.param(lambda: QKV(_bmm_keywords), _qkv3, dict(scale=SCALE), id="bmm_mul_keywords"),
    pytest.param(lambda: QKV(_softmax_dtype_keyword), qkv, dict(scale=SCALE), id="softmax_dtype_keyword"),
    pytest.param(lambda: QKVM(_method_keywords), _with_mask(qkv, lambda: keep_mask(B, 1, N, N)),
                 dict(scale=SCALE), id="method_keywords"),
    pytest.param(lambda: QKVM(_where_keywords), _with_mask(qkv, lambda: keep_mask(1, 1, N, N)),
                 dict(scale=SCALE), id="where_dropout_keywords"),
    pytest.param(lambda: QKVM(_where_method), _with_mask(qkv, lambda: keep_mask(B, 1, N, N)),
                 dict(scale=SCALE), id="where_method"),
    pytest.param(lambda: QKV(_einsum_ellipsis_list), qkv, dict(scale=SCALE), id="einsum_ellipsis_list"),
    pytest.param(lambda: QKV(_softmax_float_type_as_scores), qkv, dict(scale=SCALE), id="softmax_float_type_as"),
]


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("make,inputs,fields", KEYWORD_FORMS)
def test_keyword_form_is_one_exact_site(make, inputs, fields, frontend):
    model, inputs = make(), inputs()
    site = compile_exactly(model, inputs, frontend).report().sites[0]
    for key, value in fields.items():
        assert getattr(site, key) == (pytest.approx(value) if isinstance(value, float) else value), key


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_sdpa_keywords_reach_the_op(frontend):
    """The op gets what the keywords said: the mask, the scale and causality (not SDPA's defaults)."""
    model = QKV(lambda q, k, v: F.scaled_dot_product_attention(query=q, key=k, value=v, is_causal=True, scale=0.3))
    cm = compile_form(model, qkv(), frontend)
    (node,) = op_nodes(cm)
    assert node.kwargs["scale"] == pytest.approx(0.3) and node.kwargs["causal"] is True


def _bf16_softmax_float_type_as(q, k, v):
    scores = q @ k.transpose(-2, -1) * SCALE
    return F.softmax(scores.float(), dim=-1).type_as(scores) @ v


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_softmax_in_float_cast_back_with_type_as_bf16(frontend):
    """``F.softmax(x.float(), dim=-1).type_as(x)`` in bf16: type_as reads only x's dtype, so x does not escape."""
    model = QKV(_bf16_softmax_float_type_as)
    inputs = tuple(t.bfloat16() for t in qkv())
    cm = compile_form(model, inputs, frontend)
    rep = cm.report()
    assert count_ops(cm) == 1 and len(rep.sites) == 1 and not rep.rejected
    got, want = run_model(cm, inputs), run_model(model, inputs)
    assert got.dtype == want.dtype == torch.bfloat16
    assert_same_outputs(got.float(), want.float(), tol=2e-2)


NEAR_MISSES = [
    pytest.param(lambda q, k, v: torch.softmax(input=q @ k.mT * SCALE, dim=-2) @ v, "not over the key axis",
                 id="softmax_keyword_dim_query_axis"),
    pytest.param(lambda q, k, v: torch.div(q @ k.mT, 2.0, rounding_mode="floor").softmax(-1) @ v,
                 "divided with rounding", id="div_rounding_mode"),
    pytest.param(lambda q, k, v: (lambda s: torch.matmul(input=s.softmax(dim=-1), other=v) + s.mean(-1, True))(
        q @ k.mT), "read by Tensor.mean", id="scores_read_by_mean_keywords"),
]


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("fn,phrase", NEAR_MISSES)
def test_keyword_near_miss_is_refused_with_reason(fn, phrase, frontend):
    model, inputs = QKV(fn), qkv()
    want = run_model(model, inputs)
    with pytest.warns(AttnccWarning) as said:
        cm = compile_form(model, inputs, frontend)
    rep = cm.report()
    assert count_ops(cm) == 0 and not rep.sites
    assert any(phrase in r.reason for r in rep.rejected), [r.reason for r in rep.rejected]
    assert any(phrase in str(w.message) for w in said)
    assert_same_outputs(run_model(cm, inputs), want, tol=0.0)
