"""canonicalize's lowerings (``attncc.passes.canonicalize.LOWERINGS``), one unit test each: input graph -> canonical.

Each test traces a small module (with fx, or Dynamo where fx cannot trace it), canonicalizes the graph, and checks
the operations of the canonical graph (the spelling lowered is gone, the canonical one is there), that the
canonical graph computes what the module does, and that canonicalize left its input graph as it was. Where
``test_forms.py`` / ``test_forms_keywords.py`` has the form a lowering serves, the test uses that form.
``test_every_lowering_has_a_test`` fails when a lowering joins the table without a ``test_<name>`` here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from attncc.frontend import CallArgs, dynamo_capture, try_symbolic_trace
from attncc.passes.canonicalize import LOWERINGS, canonicalize
from attncc.passes.lower_torch_nn import UNLOWERED

from forms_helpers import QKV, B, D, H, N, qkv, rand, run_model
from test_forms import POSITIVE
from test_forms_keywords import KEYWORD_FORMS

SCALE = D ** -0.5
FORMS = {form.id: form for form in POSITIVE}
KEYWORD = {param.id: param.values for param in KEYWORD_FORMS}


def form(name: str):
    """(module, inputs) of a form of test_forms.py or test_forms_keywords.py."""
    if name in FORMS:
        return FORMS[name].make().eval(), FORMS[name].inputs()
    make, inputs, _ = KEYWORD[name]
    return make().eval(), inputs()


def ops(gm: fx.GraphModule) -> list[str]:
    """The graph's operations in order: function names, ``.method`` names, module class names."""
    names = []
    for node in gm.graph.nodes:
        if node.op == "call_function":
            names.append(getattr(node.target, "__name__", str(node.target)))
        elif node.op == "call_method":
            names.append("." + node.target)
        elif node.op == "call_module":
            names.append(type(gm.get_submodule(node.target)).__name__)
    return names


def calls(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and n.target == target]


def lowered(model: nn.Module, inputs: tuple, gm: fx.GraphModule = None) -> tuple[list[str], fx.GraphModule]:
    """(the traced graph's operations, the canonical graph), checked to compute what the model does."""
    gm = gm if gm is not None else try_symbolic_trace(model, CallArgs(tuple(inputs), {}))
    assert gm is not None
    before = ops(gm)
    canonical = canonicalize(gm)
    assert ops(gm) == before, "canonicalize changed its input graph"
    with torch.no_grad():
        got, want = canonical(*inputs), run_model(model, inputs)
    got = got[0] if isinstance(got, (tuple, list)) and not isinstance(want, (tuple, list)) else got
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return before, canonical


# ---------------------------------------------------------------------------------------- one per lowering
def test_attribute_val():
    # symbolic_trace records x.dtype as a getattr node; fake propagation may leave it without a value
    model = QKV(lambda q, k, v: torch.zeros_like(q, dtype=k.dtype) + q)
    gm = try_symbolic_trace(model, CallArgs(qkv(), {}))
    (read,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is getattr]
    del read.meta["val"]
    _, canonical = lowered(model, qkv(), gm)
    (read,) = [n for n in canonical.graph.nodes if n.op == "call_function" and n.target is getattr]
    assert read.meta["val"] == torch.float32


@torch.fx.wrap
def add_mask(scores, mask=None):
    return scores if mask is None else scores + mask


class WrappedHelper(nn.Module):
    def forward(self, q, k, v):
        return add_mask(q @ k.mT, k @ q.mT).softmax(-1) @ v


def test_inline_wrapped():
    before, canonical = lowered(WrappedHelper(), qkv())
    assert before == ["getattr", "matmul", "getattr", "matmul", "add_mask", ".softmax", "matmul"]
    assert ops(canonical) == ["getattr", "matmul", "getattr", "matmul", "add", ".softmax", "matmul"]


def test_positional():
    before, canonical = lowered(*form("sdpa_keywords"))
    (sdpa,) = calls(canonical, F.scaled_dot_product_attention)
    assert before == ops(canonical) == ["scaled_dot_product_attention"]
    # query=, key=, value=, attn_mask=, dropout_p= are positional parameters; scale is keyword-only
    assert [a.name for a in sdpa.args[:4]] == ["q", "k", "v", "m"] and sdpa.args[4:] == (0.0,)
    assert sdpa.kwargs == {"scale": 0.3}


class Mha(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(H * D, H, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_multihead_attention():
    model = Mha().eval()
    before, canonical = lowered(model, (rand(B, N, H * D),))
    assert "MultiheadAttention" in before
    assert "MultiheadAttention" not in ops(canonical) and "multi_head_attention_forward" not in ops(canonical)
    assert len(calls(canonical, F.scaled_dot_product_attention)) == 1


def test_flex_attention():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    model = QKV(lambda q, k, v: flex.flex_attention(q, k, v))
    graphs = []
    torch._dynamo.reset()
    with warnings.catch_warnings():  # flex_attention warns that it is not compiled (its eager path is meant)
        warnings.simplefilter("ignore")
        dynamo_capture(model, lambda gm, example: graphs.append(gm) or gm.forward)(*qkv())
        before, canonical = lowered(model, qkv(), graphs[0])
    assert "flex_attention" in before and "flex_attention" not in ops(canonical)
    (sdpa,) = calls(canonical, F.scaled_dot_product_attention)
    assert sdpa.kwargs["is_causal"] is False and sdpa.kwargs["scale"] == pytest.approx(SCALE)


def test_flex_attention_refused_says_why():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    model = QKV(lambda q, k, v: flex.flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s * 2))
    graphs = []
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamo_capture(model, lambda gm, example: graphs.append(gm) or gm.forward)(*qkv())
        _, canonical = lowered(model, qkv(), graphs[0])
    (call,) = [n for n in canonical.graph.nodes if "flex_attention" in str(n.target)]
    assert call.meta[UNLOWERED] == "FlexAttention call: score_mod is not carried yet"


class InPlaceDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1, inplace=True)

    def forward(self, q, k, v):
        return self.drop((q @ k.mT * SCALE).softmax(-1)) @ v


def test_keep_writes():
    # an in-place module: F.dropout in its place would drop the write, so no lowering below touches it
    before, canonical = lowered(InPlaceDropout().eval(), qkv())
    assert ops(canonical) == before == ["getattr", "matmul", "mul", ".softmax", "Dropout", "matmul"]


def test_softmax_module():
    before, canonical = lowered(*form("softmax_module"))
    assert "Softmax" in before and "Softmax" not in ops(canonical)
    (softmax,) = calls(canonical, F.softmax)
    assert softmax.kwargs == {"dim": -1}


def test_dropout_module():
    before, canonical = lowered(*form("dropout_module_eval"))
    assert "Dropout" in before and "Dropout" not in ops(canonical)
    (dropout,) = calls(canonical, F.dropout)
    assert dropout.kwargs == {"p": 0.1, "training": False}


class WithIdentity(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.Identity()

    def forward(self, q, k, v):
        return (self.norm(q) @ k.mT * SCALE).softmax(-1) @ v


def test_identity_module():
    before, canonical = lowered(WithIdentity(), qkv())
    assert before[0] == "Identity"
    assert ops(canonical) == before[1:]


def test_baddbmm():
    before, canonical = lowered(*form("baddbmm_3d"))
    assert before == [".transpose", "baddbmm", ".softmax", "bmm"]
    assert ops(canonical) == [".transpose", "matmul", "mul", "add", ".softmax", "bmm"]   # matmul * alpha + bias


def test_baddbmm_keywords():
    before, canonical = lowered(*form("baddbmm_function_keywords"))   # beta=0.5: the bias is scaled too
    assert before == [".transpose", "baddbmm", "softmax", "bmm"]
    assert ops(canonical) == [".transpose", "matmul", "mul", "mul", "add", "softmax", "bmm"]


def test_where_method():
    before, canonical = lowered(*form("where_method"))
    assert before == ["getattr", "matmul", "mul", ".where", ".softmax", "matmul"]
    assert ops(canonical) == ["getattr", "matmul", "mul", "where", ".softmax", "matmul"]
    (where,) = calls(canonical, torch.where)
    assert where.args[0].name == "m" and where.args[2] == float("-inf")


@pytest.mark.parametrize("name", ["einsum", "einsum_blhd", "einsum_ellipsis_list"])
def test_einsum(name):
    before, canonical = lowered(*form(name))
    assert before.count("einsum") == 2
    assert "einsum" not in ops(canonical) and ops(canonical).count("matmul") == 2


def test_flatten():
    def flattened(q, k, v):
        scores = (torch.flatten(q, 0, 1) @ k.flatten(0, 1).transpose(1, 2)).unflatten(0, (B, H))
        return scores.softmax(-1) @ v

    before, canonical = lowered(QKV(flattened), qkv())
    assert before == ["flatten", ".flatten", ".transpose", "matmul", ".unflatten", ".softmax", "matmul"]
    # each a reshape with the sizes of the dims it keeps read at run time
    assert ops(canonical) == [".size", ".size", ".reshape", ".size", ".size", ".reshape", ".transpose", "matmul",
                              ".size", ".size", ".reshape", ".softmax", "matmul"]


def test_written_softmax():
    before, canonical = lowered(*form("softmax_written_out"))
    assert before == [".transpose", "matmul", "mul", ".amax", "sub", "exp", ".sum", "truediv", "matmul"]
    assert ops(canonical) == [".transpose", "matmul", "mul", "softmax", "matmul"]
    (softmax,) = calls(canonical, F.softmax)
    assert softmax.args[0].name == "mul" and softmax.kwargs == {"dim": 3}


def test_softmax_dtype_read():
    model = QKV(lambda q, k, v: F.softmax(q @ k.mT, dim=-1, dtype=q.dtype) @ v)
    before, canonical = lowered(model, qkv())
    assert before == ["getattr", "matmul", "getattr", "softmax", "matmul"]   # k.mT, q.dtype
    assert ops(canonical) == ["getattr", "matmul", "softmax", "matmul"]       # the dtype read is gone
    (softmax,) = calls(canonical, F.softmax)
    assert softmax.args[1:] == (-1, 3, torch.float32)


def test_row_max_shift():
    model = QKV(lambda q, k, v: F.softmax((s := q @ k.mT) - s.amax(dim=-1, keepdim=True).detach(), dim=-1) @ v)
    before, canonical = lowered(model, qkv())
    assert before == ["getattr", "matmul", ".amax", ".detach", "sub", "softmax", "matmul"]
    assert ops(canonical) == ["getattr", "matmul", "softmax", "matmul"]
    (softmax,) = calls(canonical, F.softmax)
    assert softmax.args[0].name == "matmul"


def test_every_lowering_has_a_test():
    names = [rule.name for sweep in LOWERINGS for rule in sweep]
    assert len(names) == len(set(names))
    untested = [name for name in names if f"test_{name}" not in globals()]
    assert not untested, f"lowerings without a test_<name>: {untested}"
