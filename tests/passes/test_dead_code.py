"""Dead-code removal keeps what a graph runs for its effect: in-place writes whose result is unused (the tensor
is), and calls that return nothing (Dynamo's vmap levels around FlexAttention's create_block_mask)."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from attncc.passes.dead_code import is_side_effect
from forms_helpers import FRONTENDS, assert_same_outputs, compile_form, count_ops, qkv, run_model


class InPlaceMask(nn.Module):
    """``scores.masked_fill_(mask, -inf)`` with its result unused: the scores tensor itself is masked."""

    def forward(self, q, k, v, mask):
        scores = q @ k.transpose(-2, -1)
        scores.masked_fill_(mask, float("-inf"))
        return scores.softmax(-1) @ v


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_unused_in_place_mask_is_kept(frontend):
    """Removing the masked_fill_ gave unmasked attention (silently wrong); now the in-place fill is read as the
    site's mask step: one op, the model's output, nothing refused."""
    q, k, v = qkv()
    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).triu(1)
    inputs = (q, k, v, mask)
    cm = compile_form(InPlaceMask(), inputs, frontend)
    assert_same_outputs(run_model(cm, inputs), run_model(InPlaceMask(), inputs))
    assert count_ops(cm) == 1
    assert cm.report().rejected == []


def test_side_effect_predicate():
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.zeros(2)

    def call(op, target, *args):
        node = graph.create_node(op, target, (x, *args))
        node.meta["val"] = torch.zeros(2)
        return node

    assert is_side_effect(call("call_method", "masked_fill_", x, 0.0))
    assert is_side_effect(call("call_function", torch.Tensor.add_, x))
    assert is_side_effect(call("call_function", torch.relu_))
    assert is_side_effect(call("call_function", operator.iadd, x))
    assert is_side_effect(call("call_function", torch.ops.aten.add_.Tensor, x))
    assert not is_side_effect(call("call_function", operator.and_, x))  # `&`, not in place
    assert not is_side_effect(call("call_function", torch.add, x))
    assert not is_side_effect(call("call_method", "__add__", x))
    returns_nothing = graph.create_node("call_function", torch._functorch.predispatch._vmap_decrement_nesting, ())
    assert is_side_effect(returns_nothing)  # no recorded value: only there for its effect
