"""Learned attention-sink logits (gpt-oss): found, carried by the op as ``sinks``, same outputs; near-misses
(other concatenations of the scores, slices that are not the drop of the sink column) are refused with the
reason. Every form runs through both frontends.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from forms_helpers import (
    FRONTENDS, B, D, H, N, assert_same_outputs, compile_form, count_ops, count_softmax_like, keep_mask, op_nodes,
    qkv, rand, run_model,
)

SCALE = D ** -0.5
HKV = 2


def sink_logits(heads: int = H) -> nn.Parameter:
    return nn.Parameter(torch.linspace(-1.5, 2.0, heads))  # large enough that dropping them would show


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, h, n, d = x.shape
    return x[:, :, None, :, :].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


class GptOss(nn.Module):
    """transformers' gpt-oss ``eager_attention_forward``, as written there (GQA, additive mask)."""

    def __init__(self):
        super().__init__()
        self.sinks = sink_logits()

    def forward(self, q, k, v, m):
        k, v = repeat_kv(k, H // HKV), repeat_kv(v, H // HKV)
        attn_weights = torch.matmul(q, k.transpose(2, 3)) * SCALE
        attn_weights = attn_weights + m
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        combined_logits = torch.cat([attn_weights, sinks], dim=-1)
        combined_logits = combined_logits - combined_logits.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined_logits, dim=-1, dtype=combined_logits.dtype)
        scores = probs[..., :-1]
        attn_weights = F.dropout(scores, p=0.0, training=self.training).to(v.dtype)
        return torch.matmul(attn_weights, v)


class Plain(nn.Module):
    """No max subtraction, indexed sink broadcast, the column dropped with narrow."""

    def __init__(self):
        super().__init__()
        self.sinks = sink_logits()

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * SCALE
        column = self.sinks[None, :, None, None].expand(q.shape[0], H, q.shape[2], 1)
        p = torch.cat([s, column], dim=-1).softmax(-1)
        return p.narrow(-1, 0, k.shape[-2]) @ v


class SinkFirst(nn.Module):
    """The sink column before the scores, dropped by ``[:, :, :, 1:]``; causal by masked_fill."""

    def __init__(self):
        super().__init__()
        self.sinks = sink_logits()

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * SCALE
        s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
        column = self.sinks.view(1, H, 1, 1).expand(B, H, N, 1)
        p = torch.softmax(torch.cat((column, s), dim=-1), dim=-1)
        return p[:, :, :, 1:] @ v


class SharedSink(nn.Module):
    """One learned logit shared by every head (a 0-d parameter)."""

    def __init__(self):
        super().__init__()
        self.sink = nn.Parameter(torch.tensor(0.75))

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * SCALE
        logits = torch.cat([s, self.sink.expand(B, H, N, 1)], dim=-1)
        return logits.softmax(-1)[..., :-1] @ v


POSITIVE = [
    ("gpt_oss", GptOss, lambda: (*qkv(hkv=HKV), keep_mask(1, 1, N, N).float().log())),
    ("plain_narrow", Plain, lambda: qkv()),
    ("sink_first_causal", SinkFirst, lambda: qkv()),
    ("shared_sink", SharedSink, lambda: qkv()),
]


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("name,make,inputs", POSITIVE, ids=[p[0] for p in POSITIVE])
def test_sink_logits_are_carried_by_the_op(name, make, inputs, frontend):
    model, args = make().eval(), inputs()
    want = run_model(model, args)
    cm = compile_form(model, args, frontend)
    assert count_ops(cm) == 1 and count_softmax_like(cm) == 0, cm.code()
    op = op_nodes(cm)[0]
    assert "sinks" in op.kwargs, op.kwargs
    assert cm.report().rejected == []
    assert_same_outputs(run_model(cm, args), want)


def test_the_sinks_matter():
    """The forms' outputs depend on the sink logits (so the tests above would see them dropped)."""
    model, args = GptOss().eval(), (*qkv(hkv=HKV), torch.zeros(1, 1, N, N))
    with_sinks = run_model(model, args)
    with torch.no_grad():
        model.sinks.fill_(-1e4)
    assert (run_model(model, args) - with_sinks).abs().max() > 1e-2


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_row_max_shift_without_sinks_is_read_as_the_softmax(frontend):
    """``softmax(s - s.amax(-1, keepdim=True))`` is the softmax of s (the shift is per row)."""

    class Shifted(nn.Module):
        def forward(self, q, k, v):
            s = q @ k.transpose(-2, -1) * SCALE
            return F.softmax(s - s.amax(dim=-1, keepdim=True).detach(), dim=-1) @ v

    model, args = Shifted(), qkv()
    cm = compile_form(model, args, frontend)
    assert count_ops(cm) == 1 and count_softmax_like(cm) == 0
    assert "sinks" not in op_nodes(cm)[0].kwargs
    assert_same_outputs(run_model(cm, args), run_model(model, args))


def test_sinks_through_the_public_function_and_gradients():
    """``attncc.attention(..., sinks=)`` equals softmax over the scores with the sink column; gradients flow to
    q, k, v and the sinks (backward through the op)."""
    import attncc

    q, k, v = (t.requires_grad_() for t in qkv(hkv=HKV))
    sinks = torch.linspace(-1.0, 1.0, H).requires_grad_()
    out = attncc.attention(q, k, v, causal=True, sinks=sinks)
    kk, vv = repeat_kv(k, H // HKV), repeat_kv(v, H // HKV)
    s = (q @ kk.transpose(-2, -1) * SCALE).masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    logits = torch.cat([s, sinks.view(1, H, 1, 1).expand(B, H, N, 1)], dim=-1)
    want = logits.softmax(-1)[..., :-1] @ vv
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    weight = rand(*want.shape, seed=5)
    got = torch.autograd.grad((out * weight).sum(), (q, k, v, sinks))
    expected = torch.autograd.grad((want * weight).sum(), (q, k, v, sinks))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------------------- near-misses


class TwoScoreBlocks(nn.Module):
    """Two key sets concatenated along the key axis (not a sink column)."""

    def forward(self, q, k, v):
        s = torch.cat([q @ k.transpose(-2, -1) * SCALE, q @ (2 * k).transpose(-2, -1) * SCALE], dim=-1)
        return s.softmax(-1) @ torch.cat([v, v], dim=-2)


class ScaledAfterCat(nn.Module):
    """The scale applied after the concatenation (so it divides the second block too)."""

    def forward(self, q, k, v):
        s = torch.cat([q @ k.transpose(-2, -1), q @ (2 * k).transpose(-2, -1)], dim=-1) * SCALE
        return s.softmax(-1) @ torch.cat([v, v], dim=-2)


class WrongColumnDropped(nn.Module):
    def __init__(self):
        super().__init__()
        self.sinks = sink_logits()

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * SCALE
        p = torch.cat([s, self.sinks.reshape(1, -1, 1, 1).expand(B, -1, N, -1)], dim=-1).softmax(-1)
        return p[..., 1:] @ v


class SinkNotDropped(nn.Module):
    """The sink column reaches the value product (v padded with a zero row): not the gpt-oss form."""

    def __init__(self):
        super().__init__()
        self.sinks = sink_logits()

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * SCALE
        p = torch.cat([s, self.sinks.reshape(1, -1, 1, 1).expand(B, -1, N, -1)], dim=-1).softmax(-1)
        return p @ torch.cat([v, torch.zeros_like(v[:, :, :1])], dim=-2)


class TwoColumns(nn.Module):
    def __init__(self):
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(H, 2))

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * SCALE
        p = torch.cat([s, self.sinks.reshape(1, H, 1, 2).expand(B, -1, N, -1)], dim=-1).softmax(-1)
        return p[..., :-2] @ v


class PerQueryColumn(nn.Module):
    """A learned logit per query position, not per head."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.linspace(-1.0, 1.0, N))

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * SCALE
        p = torch.cat([s, self.logits.view(1, 1, N, 1).expand(B, H, N, 1)], dim=-1).softmax(-1)
        return p[..., :-1] @ v


class ActivationColumn(nn.Module):
    """A column computed from the activations (one value per batch row, head and query)."""

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * SCALE
        p = torch.cat([s, q.mean(-1, keepdim=True)], dim=-1).softmax(-1)
        return p[..., :-1] @ v


class SliceWithoutSink(nn.Module):
    def forward(self, q, k, v):
        p = (q @ k.transpose(-2, -1) * SCALE).softmax(-1)
        return p[..., :-1] @ v[..., :-1, :]


NEGATIVE = [
    ("two_score_blocks", TwoScoreBlocks, "2 of them made by matrix products"),
    ("scaled_after_cat", ScaledAfterCat, "concatenated with another block before further score operations"),
    ("wrong_column_dropped", WrongColumnDropped,
     "(from position 1, 1 column(s) dropped), but the learned sink is the last"),
    ("sink_not_dropped", SinkNotDropped, "not dropped from the probabilities"),
    ("two_columns", TwoColumns, "a block of 2 columns"),
    ("per_query_column", PerQueryColumn, "varies along dim 2"),
    ("activation_column", ActivationColumn, "built from a tensor of shape (2, 4, 12, 1)"),
    ("slice_without_sink", SliceWithoutSink, "1 column(s) dropped), and no learned sink column was concatenated"),
]


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("name,make,reason", NEGATIVE, ids=[n[0] for n in NEGATIVE])
def test_near_misses_are_refused_with_the_reason(name, make, reason, frontend):
    model, args = make().eval(), qkv()
    want = run_model(model, args)
    cm = compile_form(model, args, frontend)
    assert count_ops(cm) == 0, cm.code()
    rejected = cm.report().rejected
    assert len(rejected) == 1 and reason in rejected[0].reason, rejected
    assert_same_outputs(run_model(cm, args), want)
