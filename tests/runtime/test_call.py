"""AttentionCall: the op's fields defined once, and the op built from them."""

from __future__ import annotations

import torch

from attncc.runtime.call import DIFFERENTIABLE, FIELD_NAMES, AttentionCall
from attncc.runtime.dispatch import run_attention
from attncc.runtime.ops import attention_op  # noqa: F401  (importing registers torch.ops.attncc)
from attncc.variants.exact import reference

OP = torch.ops.attncc.attention.default

SCHEMA = (
    "attncc::attention(Tensor q, Tensor k, Tensor v, Tensor? bias=None, Tensor? mask=None, float scale=1., "
    "bool causal=False, float softcap=0., float dropout_p=0., Tensor? dropout_seed=None, str variant=\"exact\", "
    "str fallback=\"exact\", SymInt min_len=0, Tensor? segments=None, float segment_fill=0., Tensor? sinks=None) "
    "-> Tensor"
)
"""The schema graphs and exported programs hold: it must never change (append fields, with defaults, only)."""


def _qkv(b=2, h=4, n=9, d=8, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, n, d, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def test_schema_is_unchanged():
    assert str(OP._schema) == SCHEMA


def test_fields_are_the_schema_arguments_in_order():
    assert FIELD_NAMES == tuple(a.name for a in OP._schema.arguments)
    assert tuple(AttentionCall.op_signature().parameters) == FIELD_NAMES
    assert DIFFERENTIABLE == ("q", "k", "v", "bias", "sinks")


def test_op_arguments_keep_only_what_differs_from_the_defaults():
    q, k, v = _qkv()
    args, kwargs = AttentionCall(q, k, v, scale=0.5, causal=True, variant="exact", min_len=0).op_arguments()
    assert args == (q, k, v)
    assert kwargs == {"scale": 0.5, "causal": True}
    assert AttentionCall(q, k, v).op_arguments() == ((q, k, v), {})


def test_call_round_trips_through_the_op():
    q, k, v = _qkv()
    bias = torch.randn(1, 4, 9, 9)
    call = AttentionCall(q, k, v, bias=bias, scale=0.3, causal=True, softcap=2.0)
    args, kwargs = call.op_arguments()
    out = OP(*args, **kwargs)
    torch.testing.assert_close(out, run_attention(call))
    torch.testing.assert_close(out, reference(q, k, v, bias=bias, scale=0.3, causal=True, softcap=2.0),
                               rtol=1e-5, atol=1e-5)


def test_saved_tensors_and_options_rebuild_the_call():
    q, k, v = _qkv()
    seed = torch.tensor(7)
    call = AttentionCall(q, k, v, scale=0.25, dropout_p=0.1, dropout_seed=seed, variant="local(window=4)",
                         min_len=16, segment_fill=-1.0)
    again = AttentionCall.from_saved(call.tensors(), call.options())
    for name in FIELD_NAMES:
        assert getattr(again, name) is getattr(call, name) or getattr(again, name) == getattr(call, name), name


def test_grads_are_in_schema_order():
    a, b = torch.zeros(1), torch.ones(1)
    grads = AttentionCall.grads({"q": a, "sinks": b})
    assert len(grads) == len(FIELD_NAMES)
    assert grads[0] is a and grads[FIELD_NAMES.index("sinks")] is b
    assert all(g is None for i, g in enumerate(grads) if i not in (0, FIELD_NAMES.index("sinks")))


def test_backward_gives_one_grad_per_differentiable_input():
    q, k, v = _qkv(requires_grad=True)
    bias = torch.randn(1, 4, 9, 9, requires_grad=True)
    sinks = torch.randn(4, requires_grad=True)
    out = OP(q, k, v, bias=bias, scale=0.35, causal=True, sinks=sinks)
    got = torch.autograd.grad(out.square().sum(), (q, k, v, bias, sinks))
    want = torch.autograd.grad(
        reference(q, k, v, bias=bias, scale=0.35, causal=True, sinks=sinks).square().sum(), (q, k, v, bias, sinks))
    for name, g, w in zip(("q", "k", "v", "bias", "sinks"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


def test_backward_without_sinks_omitted_from_the_call():
    q, k, v = _qkv(requires_grad=True)
    out = OP(q, k, v, scale=0.35)  # sinks, the last argument, not passed at all
    got = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(reference(q, k, v, scale=0.35).sum(), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_only_some_inputs_need_grad():
    q, k, v = _qkv()
    q.requires_grad_(True)
    bias = torch.randn(1, 4, 9, 9)  # not differentiated: no gradient computed for it
    (gq,) = torch.autograd.grad(OP(q, k, v, bias=bias, scale=0.35).sum(), (q,))
    (wq,) = torch.autograd.grad(reference(q, k, v, bias=bias, scale=0.35).sum(), (q,))
    torch.testing.assert_close(gq, wq, rtol=1e-4, atol=1e-5)
