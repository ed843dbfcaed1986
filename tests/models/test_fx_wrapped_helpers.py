"""``torch.fx.wrap``-ed helpers between the scores and the softmax are inlined on the fx frontend.

symbolic_trace keeps a wrapped function as one opaque ``call_function`` node (timm's ``maybe_add_mask`` and
``resolve_self_attn_mask`` on the non-fused attention path), which made every ViT-family site refused on fx
while Dynamo, tracing through them, found it. canonicalize now traces such a function again with the node's
arguments and splices its operations in; a helper that does not trace (control flow on a tensor) stays a
node, and the site is refused naming it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "passes"))
from forms_helpers import (  # noqa: E402
    FRONTENDS, compile_exactly, B, D, N, assert_same_outputs, compile_form, count_ops, count_softmax_like, keep_mask, qkv,
    run_model,
)

SCALE = D ** -0.5


@torch.fx.wrap
def add_bias(scores, bias=None):
    return scores if bias is None else scores + bias


@torch.fx.wrap
def mask_bias(mask, dtype, causal: bool = False):
    """A helper returning None or a tensor depending on its constant arguments (timm's resolve_self_attn_mask)."""
    if causal:
        return None
    return torch.zeros_like(mask, dtype=dtype).masked_fill(~mask, float("-inf"))


@torch.fx.wrap
def scale_and_add(scores, bias, scale: float):
    return (scores * scale).add(bias)


@torch.fx.wrap
def size_dependent_bias(scores, bias):
    if scores.shape[-1] > 4:  # control flow on a size: symbolic tracing cannot follow it (fake tensors can)
        return scores + bias
    return scores


class WrappedHelpers(nn.Module):
    def forward(self, q, k, v, m):
        scores = q @ k.transpose(-2, -1) * SCALE
        scores = add_bias(scores, mask_bias(m, q.dtype))
        scores = add_bias(scores, None)
        return scores.softmax(-1) @ v


class WrappedScale(nn.Module):
    def forward(self, q, k, v, m):
        scores = scale_and_add(q @ k.transpose(-2, -1), torch.where(m, 0.0, -1e9), SCALE)
        return scores.softmax(-1) @ v


class WrappedSizeDependent(nn.Module):
    def forward(self, q, k, v, m):
        scores = size_dependent_bias(q @ k.transpose(-2, -1) * SCALE, torch.where(m, 0.0, -1e9))
        return scores.softmax(-1) @ v


def _inputs():
    return (*qkv(), keep_mask(B, 1, N, N))


def test_wrapped_helpers_are_call_function_nodes_under_fx():
    graph = fx.symbolic_trace(WrappedHelpers()).graph
    assert {n.target for n in graph.nodes if n.op == "call_function"} >= {add_bias, mask_bias}


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("make", [WrappedHelpers, WrappedScale], ids=["helpers", "scale_inside_helper"])
def test_wrapped_helpers_are_inlined(make, frontend):
    cm = compile_exactly(make(), _inputs(), frontend)
    rep = cm.report()
    assert rep.sites[0].scale == pytest.approx(SCALE)
    assert "add_bias" not in cm.code() and "scale_and_add" not in cm.code()


def test_untraceable_helper_is_left_and_named():
    model, inputs = WrappedSizeDependent(), _inputs()
    want = run_model(model, inputs)
    cm = compile_form(model, inputs, "fx")
    rep = cm.report()
    assert count_ops(cm) == 0 and not rep.sites
    assert any("size_dependent_bias" in r.reason for r in rep.rejected), rep.rejected
    assert_same_outputs(run_model(cm, inputs), want, tol=0.0)


@pytest.fixture
def timm_vit_unfused():
    """A tiny timm ViT built with fused attention off: its blocks take the maybe_add_mask path."""
    import timm
    import timm.layers

    before = timm.layers.use_fused_attn()
    timm.layers.set_fused_attn(False)
    try:
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=10)
    finally:
        timm.layers.set_fused_attn(before)
    assert not any(block.attn.fused_attn for block in model.blocks)
    return model.eval()


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_timm_vit_unfused_attention_found(timm_vit_unfused, frontend):
    model = timm_vit_unfused
    inputs = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)
    want = run_model(model, inputs)
    if frontend == "fx":
        traced_targets = {getattr(n.target, "__name__", "") for n in fx.symbolic_trace(model).graph.nodes}
        assert "maybe_add_mask" in traced_targets  # what the fx frontend sees before canonicalize
    cm = compile_form(model, inputs, frontend)
    rep = cm.report()
    assert [s.module for s in rep.sites] == ["blocks.0.attn", "blocks.1.attn"] and not rep.rejected, rep
    assert all(s.kind == "self" and s.q_len == 5 for s in rep.sites)
    assert count_ops(cm) == 2 and count_softmax_like(cm) == 0
    assert_same_outputs(run_model(cm, inputs), want)
