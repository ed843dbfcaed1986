"""The attncc op and its torch path against the plain reference (fla-style parametrized shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attncc
from attncc.errors import AttnccError
from attncc.variants.exact import reference

SHAPES = [
    # (B, Hq, Hkv, Nq, Nk, D, Dv)
    pytest.param(1, 2, 2, 1, 1, 16, 16, id="n1"),
    pytest.param(2, 4, 4, 63, 63, 48, 48, id="n63-d48"),
    pytest.param(1, 4, 1, 100, 100, 80, 80, id="mqa-n100-d80"),
    pytest.param(2, 8, 2, 37, 100, 16, 24, id="gqa4-cross-dv24"),
]


def _inputs(b, hq, hkv, nq, nk, d, dv, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, dv, generator=g).to(dtype)
    return q, k, v


def rel_rms(a, b):
    return ((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,dv", SHAPES)
def test_op_matches_reference_fp32(b, hq, hkv, nq, nk, d, dv, causal):
    q, k, v = _inputs(b, hq, hkv, nq, nk, d, dv)
    out = attncc.attention(q, k, v, causal=causal)
    assert out.shape == (b, hq, nq, dv)
    torch.testing.assert_close(out, reference(q, k, v, causal=causal), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_op_half_precision_relative_rms(dtype):
    q, k, v = _inputs(2, 4, 2, 63, 63, 48, 48, dtype)
    out = attncc.attention(q, k, v, causal=True)
    assert out.dtype == dtype
    assert rel_rms(out, reference(q.float(), k.float(), v.float(), causal=True)) < 2e-2


def test_bias_mask_and_softcap_match_reference():
    q, k, v = _inputs(2, 4, 4, 17, 23, 16, 16)
    bias = torch.randn(1, 4, 17, 23)
    mask = torch.rand(2, 1, 17, 23) > 0.3
    mask[..., 0] = True  # no fully masked rows
    for kwargs in (dict(bias=bias), dict(mask=mask), dict(bias=bias, mask=mask, softcap=3.0),
                   dict(bias=bias, mask=mask, causal=True)):
        torch.testing.assert_close(attncc.attention(q, k, v, **kwargs), reference(q, k, v, **kwargs),
                                   rtol=1e-5, atol=1e-5)


def test_matches_sdpa_semantics():
    q, k, v = _inputs(2, 8, 2, 33, 33, 16, 16)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(attncc.attention(q, k, v, causal=True, scale=0.3), expected, rtol=1e-5, atol=1e-5)


def test_three_dim_layout():
    q, k, v = (torch.randn(6, 9, 16) for _ in range(3))
    torch.testing.assert_close(attncc.attention(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(), dict(softcap=2.0), dict(causal=True)], ids=["plain", "softcap", "causal"])
def test_backward_matches_reference(kwargs):
    q, k, v = (t.requires_grad_() for t in _inputs(1, 4, 2, 19, 19, 16, 8))
    bias = torch.randn(1, 4, 19, 19, requires_grad=True)
    grads = torch.autograd.grad(attncc.attention(q, k, v, bias=bias, **kwargs).square().sum(), (q, k, v, bias))
    expected = torch.autograd.grad(reference(q, k, v, bias=bias, **kwargs).square().sum(), (q, k, v, bias))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_dropout_backward_replays_the_same_mask():
    # With v = I the output *is* the dropped-out probability matrix P_d, and d(sum(out * W))/dv = P_d^T @ W:
    # the gradient only matches if backward replays forward's dropout mask.
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    v = torch.eye(16).expand(1, 2, 16, 16).clone().requires_grad_()
    weight = torch.randn(1, 2, 16, 16)
    out = attncc.attention(q, k, v, dropout_p=0.5)
    assert (out == 0).any(), "dropout should zero some probabilities"
    (grad_v,) = torch.autograd.grad((out * weight).sum(), (v,))
    torch.testing.assert_close(grad_v, out.detach().transpose(-2, -1) @ weight, rtol=1e-5, atol=1e-6)


def test_op_is_a_custom_op_with_fake_impl():
    q, k, v = _inputs(1, 2, 2, 8, 8, 16, 16)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        out = torch.ops.attncc.attention.default(fq, fk, fv, scale=0.25)
    assert out.shape == (1, 2, 8, 16)
    torch.library.opcheck(torch.ops.attncc.attention.default, (q, k, v), {"scale": 0.25, "causal": True})


def test_compiles_without_graph_break():
    q, k, v = _inputs(1, 2, 2, 8, 8, 16, 16)
    explanation = torch._dynamo.explain(lambda q, k, v: attncc.attention(q, k, v, causal=True))(q, k, v)
    assert explanation.graph_break_count == 0


def test_bad_arguments_raise_clear_errors():
    q, k, v = _inputs(1, 2, 2, 8, 8, 16, 16)
    with pytest.raises(AttnccError, match="unknown variant"):
        attncc.attention(q, k, v, variant="nope")
    with pytest.raises(AttnccError, match="incompatible shapes"):
        attncc.attention(q, k[..., :8], v)


@pytest.mark.parametrize("lengths", [[40, 40], [40, 23], [1, 17]], ids=["full", "padded", "short"])
@pytest.mark.parametrize("hkv", [4, 2])
def test_causal_with_right_padding_runs_per_row_exactly(lengths, hkv):
    """Causal + a right-padding key mask [B, 1, 1, Nk] (what mask analysis leaves for HF decoders) takes the
    per-row path (no N x N mask); it must equal the dense reference on every query row."""
    torch.manual_seed(0)
    b, hq, n, d = len(lengths), 4, 40, 16
    q = torch.randn(b, hq, n, d)
    k, v = torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    keep = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    mask = keep[:, None, None, :]
    out = attncc.attention(q, k, v, causal=True, mask=mask)
    want = reference(q, k, v, mask=mask, causal=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
