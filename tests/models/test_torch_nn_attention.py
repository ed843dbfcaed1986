"""PyTorch's own attention modules: nn.MultiheadAttention, nn.TransformerEncoder[Layer], nn.TransformerDecoderLayer
and nn.Transformer, on both frontends.

fx.symbolic_trace keeps nn.MultiheadAttention as one module call and Dynamo records F.multi_head_attention_forward;
canonicalize lowers either to SDPA, so every attention becomes one attncc op (exact policy: outputs equal to
1e-5). The transformer containers are traced into with PyTorch's fused fast path off. What is not rewritten (the
attention weights returned, a fused fast-path op) is reported with the reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "passes"))  # forms_helpers
from forms_helpers import (  # noqa: E402
    FRONTENDS, assert_same_outputs, compile_form, count_ops, count_softmax_like, run_model,
)

E, HEADS = 16, 4
B, L, S = 2, 5, 7


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


def padding_mask(b=B, n=S):
    """Bool key padding mask (True = padded): the last two keys of the first row."""
    m = torch.zeros(b, n, dtype=torch.bool)
    m[0, -2:] = True
    return m


def bool_attn_mask(*shape, seed=0):
    """Bool attn_mask (True = not allowed) that keeps key 0 for every query."""
    m = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) > 0.7
    m[..., 0] = False
    return m


def causal_float_mask(n=L):
    return nn.Transformer.generate_square_subsequent_mask(n)


class MHA(nn.Module):
    """``self.mha(query, key, value, ...)[0]``: self attention passes x for all three."""

    def __init__(self, self_attention=True, separate_kv=False, call_kwargs=None, **mha_kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(E, HEADS, **mha_kwargs)
        self.self_attention, self.separate_kv = self_attention, separate_kv
        self.call_kwargs = call_kwargs or {}

    def forward(self, x, ctx, key_padding_mask, attn_mask):
        if self.self_attention:
            key = value = x
        elif self.separate_kv:
            key, value = ctx[..., :8], ctx[..., 8:]  # kdim=8, vdim=12 (ctx has 20 features)
        else:
            key = value = ctx
        return self.mha(x, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask, **self.call_kwargs)[0]


def mha_inputs(batch_first, self_attention, ctx_features=E, kpm=False, attn_mask=None, unbatched=False):
    """(x, ctx, key_padding_mask, attn_mask) for ``MHA``; keys are x (self attention) or ctx."""
    keys = L if self_attention else S
    if unbatched:
        return rand(L, E), rand(S, ctx_features, seed=1), (padding_mask(1, keys)[0] if kpm else None), attn_mask
    x = rand(B, L, E) if batch_first else rand(L, B, E)
    ctx = rand(B, S, ctx_features, seed=1) if batch_first else rand(S, B, ctx_features, seed=1)
    return x, ctx, (padding_mask(B, keys) if kpm else None), attn_mask


# name: (module kwargs, input kwargs, expected site fields)
MHA_CASES = {
    "self, batch_first, need_weights default (unused)": (
        dict(batch_first=True), dict(), dict(kind="self", mask="none", causal=False)),
    "self, seq-first, key_padding_mask": (
        dict(batch_first=False), dict(kpm=True), dict(kind="self", mask="padding")),
    "cross, batch_first, key_padding_mask + bool attn_mask": (
        dict(batch_first=True, self_attention=False), dict(kpm=True, attn_mask=bool_attn_mask(L, S)),
        dict(kind="cross", mask="dense")),
    "cross, seq-first, float attn_mask": (
        dict(batch_first=False, self_attention=False), dict(attn_mask=rand(L, S, seed=3)),
        dict(kind="cross", mask="bias")),
    # PyTorch warns (deprecated mix); under Dynamo the warning was a graph break after which nothing was captured
    "cross, batch_first, bool key_padding_mask + float attn_mask": (
        dict(batch_first=True, self_attention=False), dict(kpm=True, attn_mask=rand(L, S, seed=5)),
        dict(kind="cross", mask="bias")),
    "cross, batch_first, 3-D bool attn_mask + key_padding_mask": (
        dict(batch_first=True, self_attention=False),
        dict(kpm=True, attn_mask=bool_attn_mask(B * HEADS, L, S, seed=2)), dict(kind="cross")),
    "kdim/vdim, batch_first, key_padding_mask": (
        dict(batch_first=True, self_attention=False, separate_kv=True, kdim=8, vdim=12),
        dict(kpm=True, ctx_features=20), dict(kind="cross", mask="padding")),
    "kdim/vdim, seq-first": (
        dict(batch_first=False, self_attention=False, separate_kv=True, kdim=8, vdim=12),
        dict(ctx_features=20), dict(kind="cross")),
    "is_causal with its causal mask (need_weights=False)": (
        dict(batch_first=True, call_kwargs=dict(is_causal=True, need_weights=False)),
        dict(attn_mask=causal_float_mask()), dict(kind="self", causal=True, mask="causal")),
    "is_causal with need_weights=True: the mask applies": (
        dict(batch_first=True, call_kwargs=dict(is_causal=True)), dict(attn_mask=causal_float_mask()),
        dict(kind="self", causal=False)),
    "bias_k/bias_v and add_zero_attn with both masks": (
        dict(batch_first=False, self_attention=False, add_bias_kv=True, add_zero_attn=True),
        dict(kpm=True, attn_mask=bool_attn_mask(L, S, seed=4)), dict(kind="cross")),
    "unbatched input with key_padding_mask": (
        dict(self_attention=False), dict(unbatched=True, kpm=True), dict(kind="cross", q_heads=HEADS)),
}


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_becomes_one_op(case, frontend):
    module_kwargs, input_kwargs, expected = MHA_CASES[case]
    model = MHA(**module_kwargs).eval()
    inputs = mha_inputs(module_kwargs.get("batch_first", False), module_kwargs.get("self_attention", True),
                        **input_kwargs)
    want = run_model(model, inputs)
    cm = compile_form(model, inputs, frontend)
    assert count_ops(cm) == 1, cm.code()
    assert count_softmax_like(cm) == 0
    assert_same_outputs(run_model(cm, inputs), want)
    site = cm.report().sites[0]
    assert site.module == "mha"
    assert site.q_heads == HEADS and site.head_dim == E // HEADS
    for key, value in expected.items():
        assert getattr(site, key) == value, (key, getattr(site, key))
    assert not cm.report().rejected


class ReturnsWeights(nn.Module):
    def __init__(self, average=True):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.average = average

    def forward(self, x):
        out, weights = self.mha(x, x, x, average_attn_weights=self.average)
        return out + weights.sum() if self.average else (out, weights)


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("average", [True, False])
def test_returned_weights_are_reported(frontend, average):
    model = ReturnsWeights(average).eval()
    x = rand(B, L, E)
    want = run_model(model, (x,))
    cm = compile_form(model, (x,), frontend)
    assert count_ops(cm) == 0
    assert_same_outputs(run_model(cm, (x,)), want)
    rejected = cm.report().rejected
    assert [r.reason for r in rejected] == ["the attention probabilities are returned (need_weights=True)"]
    assert rejected[0].module == "mha"


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_parameters_stay_shared(frontend):
    """The rewritten graph reads the module's own parameters: an update after compiling is seen (no copy)."""
    model = MHA(batch_first=True, self_attention=False).eval()
    inputs = mha_inputs(True, False, kpm=True)
    cm = compile_form(model, inputs, frontend)
    with torch.no_grad():
        model.mha.in_proj_weight.mul_(1.5)
        model.mha.out_proj.bias.add_(0.25)
    assert_same_outputs(run_model(cm, inputs), run_model(model, inputs))


def test_gradients_reach_the_module_parameters():
    model = MHA(batch_first=True, self_attention=False).train()
    inputs = mha_inputs(True, False, kpm=True)
    cm = compile_form(model, inputs, "fx")
    grads = []
    for run in (model, cm):
        model.zero_grad()
        run(*inputs).square().sum().backward()
        grads.append([p.grad.clone() for p in (model.mha.in_proj_weight, model.mha.out_proj.weight)])
    for got, want in zip(grads[1], grads[0]):
        assert_same_outputs(got, want)


# ---------------------------------------------------------------------------------- transformer containers


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x, padding):
        return self.encoder(x, src_key_padding_mask=padding)


class DecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerDecoderLayer(E, HEADS, 32, dropout=0.0, batch_first=True)

    def forward(self, x, memory, causal):
        return self.layer(x, memory, tgt_mask=causal)


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.transformer = nn.Transformer(E, HEADS, 1, 1, 32, dropout=0.0, batch_first=True)

    def forward(self, src, tgt, causal):
        return self.transformer(src, tgt, tgt_mask=causal)


CONTAINERS = {
    # name: (model, inputs, site modules in order, kinds)
    "encoder (2 layers, key padding)": (
        Encoder, (rand(B, S, E), padding_mask()), ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"],
        ["self", "self"]),
    "decoder layer (self + cross)": (
        DecoderLayer, (rand(B, L, E), rand(B, S, E, seed=1), causal_float_mask()),
        ["layer.self_attn", "layer.multihead_attn"], ["self", "cross"]),
    "transformer": (
        Transformer, (rand(B, S, E), rand(B, L, E, seed=1), causal_float_mask()),
        ["transformer.encoder.layers.0.self_attn", "transformer.decoder.layers.0.self_attn",
         "transformer.decoder.layers.0.multihead_attn"], ["self", "self", "cross"]),
}


CONTAINER_RUNS = [
    *[("encoder (2 layers, key padding)", frontend, train) for frontend in FRONTENDS for train in (False, True)],
    *[("decoder layer (self + cross)", frontend, False) for frontend in FRONTENDS],
    *[("transformer", frontend, False) for frontend in (*FRONTENDS, "auto")],
]


@pytest.mark.parametrize("name, frontend, train", CONTAINER_RUNS,
                         ids=[f"{n.split()[0]}-{f}-{'train' if t else 'eval'}" for n, f, t in CONTAINER_RUNS])
def test_transformer_modules(name, frontend, train):
    """Eval mode would take PyTorch's fused fast path (torch._transformer_encoder_layer_fwd) without attncc's
    capture context; train mode (dropout 0) is the plain path. Both become one op per attention."""
    factory, inputs, modules, kinds = CONTAINERS[name]
    model = factory().train(train)
    want = run_model(model, inputs)
    torch._dynamo.reset()  # compile_form resets for "dynamo" only
    cm = compile_form(model, inputs, frontend)
    report = cm.report()
    assert report.frontend == ("dynamo" if frontend == "dynamo" else "fx")
    assert count_ops(cm) == len(modules), cm.code()
    assert count_softmax_like(cm) == 0
    assert [s.module for s in report.sites] == modules
    assert [s.kind for s in report.sites] == kinds
    assert not report.rejected
    assert_same_outputs(run_model(cm, inputs), want)
    if name.startswith("encoder"):
        assert {s.mask for s in report.sites} == {"padding"}
    assert torch.backends.mha.get_fastpath_enabled()  # attncc's capture context restored it


# ------------------------------------------------------------------------------------- fused fast paths


class CallsFusedMHA(nn.Module):
    """Calls PyTorch's fused MHA kernel directly: attention attncc cannot see into."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(E, HEADS, batch_first=True)

    def forward(self, x):
        m = self.mha
        return torch._native_multi_head_attention(x, x, x, E, HEADS, m.in_proj_weight, m.in_proj_bias,
                                                  m.out_proj.weight, m.out_proj.bias, None, False)[0]


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_fused_fast_path_op_is_reported(frontend):
    model = CallsFusedMHA().eval()
    x = rand(B, L, E)
    want = run_model(model, (x,))
    cm = compile_form(model, (x,), frontend)
    assert count_ops(cm) == 0
    assert_same_outputs(run_model(cm, (x,)), want)
    reasons = [r.reason for r in cm.report().rejected]
    assert len(reasons) == 1 and reasons[0].startswith("PyTorch's fused transformer fast path"), reasons


class QuantizableMHA(nn.Module):
    """torch.ao's quantizable MultiheadAttention: a subclass with its own forward (fx keeps it as one module)."""

    def __init__(self):
        super().__init__()
        from torch.ao.nn.quantizable import MultiheadAttention

        torch.manual_seed(0)
        self.mha = MultiheadAttention(E, HEADS, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x)[0]


def test_multihead_attention_subclass_with_its_own_forward_is_reported():
    model = QuantizableMHA().eval()
    x = rand(B, L, E)
    cm = compile_form(model, (x,), "fx")
    assert count_ops(cm) == 0
    assert_same_outputs(run_model(cm, (x,)), run_model(model, (x,)))
    assert [(r.module, r.reason) for r in cm.report().rejected] == [
        ("mha", "MultiheadAttention (a MultiheadAttention with its own forward) is not decomposed")]
