"""An SDPA scale computed in the graph (from a traced size under fx, a float graph input under Dynamo) is carried on
q: the site is rewritten exactly instead of refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from forms_helpers import FRONTENDS, assert_same_outputs, compile_form, count_ops, qkv, run_model


class ScaleFromSize(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5 * 0.5)


class ScaleFromItem(nn.Module):
    def __init__(self):
        super().__init__()
        self.scaling = nn.Parameter(torch.tensor(0.3), requires_grad=False)

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=self.scaling.item())


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("model", [ScaleFromSize, ScaleFromItem])
def test_run_time_scale_is_carried(model, frontend):
    if frontend == "fx" and model is ScaleFromItem:
        pytest.skip("fx.symbolic_trace cannot trace .item()")
    m, inputs = model(), qkv()
    want = run_model(m, inputs)
    cm = compile_form(m, inputs, frontend)
    assert count_ops(cm) == 1 and not cm.report().rejected, cm.code()
    assert_same_outputs(run_model(cm, inputs), want)
