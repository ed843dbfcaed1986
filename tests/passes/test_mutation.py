"""In-place writes survive attncc: tensors built by slice assignment, ``out=``, ``index_put_`` ... compute what
they did, attention whose keys are assembled in place is rewritten, and in-place steps on the scores are read
as steps or refused with a reason.

Each module runs through ``attncc.compile(..., "exact")`` on both frontends where both can capture it
(``fx.symbolic_trace`` cannot trace ``x[i] = y``: those forms run on Dynamo, and the fx spelling of
``operator.setitem`` is checked on a hand-built graph through the pipeline).
"""

from __future__ import annotations

import operator
from typing import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import attncc
from attncc.frontend import CallArgs, propagate_fake_values
from attncc.passes import run_pipeline
from attncc.passes.dead_code import remove_dead_code
from attncc.policy import as_policy
from forms_helpers import (
    QKVM, FRONTENDS, all_nodes, assert_same_outputs, compile_form, count_ops, keep_mask, qkv, rand, run_model,
)

SCALE = 16 ** -0.5


def _equal(got, want) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- mutation forms


class Fn(nn.Module):
    """A module around a function of (module, a, b) so the forms below stay short."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(rand(8, 8, seed=5))
        self.register_buffer("scratch", torch.zeros(2, 8))

    def forward(self, a, b):
        return self.fn(self, a, b)


def _slice_copy(s, a, b):
    out = a.new_empty(a.shape[0], 16)
    out[:, :8].copy_(a)
    out[:, 8:].copy_(b)
    return out + 0


def _setitem(s, a, b):
    out = a.new_zeros(a.shape[0], 16)
    out[:, :8] = a
    out[:, 8:] = b
    return out + 0


def _index_put(s, a, b):
    out = a.new_zeros(4, 8)
    out.index_put_((torch.tensor([3, 1]),), b)
    return out * 2


def _masked_fill_buffer(s, a, b):
    scratch = s.scratch.clone()
    scratch.masked_fill_(a > 0, 3.0)
    return scratch + b


def _out_kwarg(s, a, b):
    c = torch.empty_like(a)
    torch.add(a, b, out=c)
    return c * 2


def _zero_then_add(s, a, b):
    t = a * 1.0
    t.zero_()
    t.add_(b)
    return t + 1


def _fill_then_add(s, a, b):
    t = a * 1.0
    t.fill_(2.0)
    return t + b


def _parameter_view(s, a, b):
    w = s.weight * 1.0
    w[:, :2].mul_(0.0)        # in place through a view of a parameter-derived tensor
    w.t()[0].add_(1.0)        # and through a view of a view
    return a @ w + b


def _iadd_on_view(s, a, b):
    out = a.new_zeros(a.shape[0], 16)
    half = out[:, 8:]
    half += b                 # Dynamo: operator.iadd on a view, result unused
    return out + a.sum()


MUTATIONS = [
    pytest.param(_slice_copy, FRONTENDS, id="slice_copy"),
    pytest.param(_setitem, ("dynamo",), id="setitem"),
    pytest.param(_index_put, FRONTENDS, id="index_put_"),
    pytest.param(_masked_fill_buffer, FRONTENDS, id="masked_fill_buffer"),
    pytest.param(_out_kwarg, FRONTENDS, id="out_kwarg"),
    pytest.param(_zero_then_add, FRONTENDS, id="zero_then_add_"),
    pytest.param(_fill_then_add, FRONTENDS, id="fill_then_add"),
    pytest.param(_parameter_view, FRONTENDS, id="parameter_view"),
    pytest.param(_iadd_on_view, FRONTENDS, id="iadd_on_view"),
]


# torch.fx.symbolic_trace itself loses two writes (a Proxy has no __iadd__, so `view += b` is traced as
# `view = view + b`; a buffer is a plain tensor while tracing, so `self.count.add_(1)` runs once at trace time):
# the frontend compares the traced graph with the model on the example inputs and does not use such a graph.


@pytest.mark.parametrize("fn,frontends", MUTATIONS)
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_in_place_writes_are_kept(fn, frontends, frontend, request):
    if frontend not in frontends:
        pytest.skip("fx.symbolic_trace cannot trace item assignment")
    model = Fn(fn)
    inputs = (rand(2, 8, seed=1), rand(2, 8, seed=2))
    want = run_model(model, inputs)
    if frontend == "fx" and fn is _iadd_on_view:  # fx.symbolic_trace loses it: attncc says so, and auto uses Dynamo
        with pytest.raises(attncc.AttnccError, match="symbolic_trace cannot trace this model faithfully"):
            compile_form(model, inputs, frontend)
        cm = compile_form(model, inputs, "auto")
        assert cm.report().frontend == "dynamo"
        _equal(run_model(cm, inputs), want)
        return
    cm = compile_form(model, inputs, frontend)
    assert cm.report().frontend == frontend
    _equal(run_model(cm, inputs), want)


class Counter(nn.Module):
    """Updates its own buffer in place and discards the result (``num_batches_tracked``-style)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))

    def forward(self, a, b):
        self.count.add_(1.0)
        return a + b


@pytest.mark.parametrize("frontend", ["auto", "dynamo"])
def test_in_place_update_of_a_module_buffer_is_kept(frontend):
    model = Counter()
    inputs = (rand(2, 8, seed=1), rand(2, 8, seed=2))
    cm = compile_form(model, inputs, frontend)  # the capture runs the model once
    run_model(cm, inputs)
    assert float(model.count) == 2.0
    assert cm.report().frontend == "dynamo"  # fx.symbolic_trace loses the buffer update: not used


def test_fx_frontend_refuses_a_trace_that_loses_a_buffer_update():
    with pytest.raises(attncc.AttnccError, match="symbolic_trace cannot trace this model faithfully"):
        compile_form(Counter(), (rand(2, 8, seed=1), rand(2, 8, seed=2)), "fx")


def _setitem_graph() -> fx.GraphModule:
    """``out = a.new_zeros(2, 16); out[:, :8] = a; out[:, 8:] = b; return out + 0`` as fx spells it."""
    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    out = graph.call_method("new_zeros", (a, 2, 16))
    graph.call_function(operator.setitem, (out, (slice(None), slice(None, 8)), a))
    graph.call_function(operator.setitem, (out, (slice(None), slice(8, None)), b))
    graph.output(graph.call_function(operator.add, (out, 0)))
    return fx.GraphModule(nn.Module(), graph)


def test_setitem_in_an_fx_graph_is_kept_by_the_pipeline():
    gm = _setitem_graph()
    inputs = (rand(2, 8, seed=1), rand(2, 8, seed=2))
    propagate_fake_values(gm, CallArgs(inputs, {}))
    result = run_pipeline(gm, as_policy("exact"), verify=True)
    _equal(result.graph_module(*inputs), gm(*inputs))
    assert sum(n.target is operator.setitem for n in result.graph_module.graph.nodes) == 2


def test_remove_dead_code_on_an_aten_graph():
    """make_fx spells writes as aten OpOverloads (``aten.copy_.default``): their mutable schema keeps them."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(a, b):
        out = a.new_empty(2, 16)
        out[:, :8].copy_(a)
        out[:, 8:].copy_(b)
        return out * 1

    inputs = (rand(2, 8, seed=1), rand(2, 8, seed=2))
    gm = make_fx(f)(*inputs)
    remove_dead_code(gm.graph)
    gm.recompile()
    _equal(gm(*inputs), f(*inputs))


def test_remove_dead_code_drops_writes_nobody_reads():
    """A write into memory the graph allocated that nothing reads goes (with what it kept alive); a write into
    an input, or one a later read sees, stays."""
    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    unread = graph.call_function(operator.mul, (a, 2.0))
    graph.call_method("add_", (unread, 1.0))            # nothing reads `unread`: dead
    read = graph.call_function(operator.mul, (a, 3.0))
    graph.call_method("add_", (read, 1.0))              # `read` is returned: kept
    graph.call_method("mul_", (b, 2.0))                 # writes the caller's tensor: kept
    graph.output((read,))
    gm = fx.GraphModule(nn.Module(), graph)
    remove_dead_code(gm.graph)
    gm.recompile()
    kept = [(n.op, n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert kept == [(("call_function", operator.mul)), ("call_method", "add_"), ("call_method", "mul_")]
    a_value, b_value = torch.ones(2), torch.ones(2)
    (out,) = gm(a_value, b_value)
    _equal(out, torch.full((2,), 4.0))
    _equal(b_value, torch.full((2,), 2.0))


# ---------------------------------------------------------------------------------------------- attention

NOPE, ROPE = 12, 4


class MlaAttention(nn.Module):
    """Keys assembled in place as DeepSeek-V2/V3's ``expand_kv`` does: nope and rope parts written into a
    ``new_empty`` tensor (``copy_`` into slices, or ``k[...] = part``), the rope part shared by all heads."""

    def __init__(self, setitem: bool = False):
        super().__init__()
        self.setitem = setitem

    def forward(self, q, k_nope, k_rope, v):
        k = k_nope.new_empty(k_nope.shape[0], k_nope.shape[1], k_nope.shape[2], NOPE + ROPE)
        if self.setitem:
            k[..., :NOPE] = k_nope
            k[..., NOPE:] = k_rope
        else:
            k[..., :NOPE].copy_(k_nope)
            k[..., NOPE:].copy_(k_rope.expand(-1, k_nope.shape[1], -1, -1))
        return torch.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1) @ v


def _mla_inputs():
    q = rand(2, 4, 10, NOPE + ROPE, seed=1)
    k_nope = rand(2, 4, 10, NOPE, seed=2)
    k_rope = rand(2, 1, 10, ROPE, seed=3)
    v = rand(2, 4, 10, 8, seed=4)
    return q, k_nope, k_rope, v


@pytest.mark.parametrize("frontend,setitem", [("fx", False), ("dynamo", False), ("dynamo", True)],
                         ids=["copy_-fx", "copy_-dynamo", "setitem-dynamo"])
def test_keys_assembled_by_slice_writes(frontend, setitem):
    model = MlaAttention(setitem)
    inputs = _mla_inputs()
    want = run_model(model, inputs)
    cm = compile_form(model, inputs, frontend)
    assert count_ops(cm) == 1, cm.code()
    assert not cm.report().rejected
    assert_same_outputs(run_model(cm, inputs), want)


def _masked_fill_unassigned(q, k, v, m):
    s = q @ k.transpose(-2, -1) * SCALE
    s.masked_fill_(~m, float("-inf"))       # XLM / Flaubert style: the result is not used, s is
    return torch.softmax(s, -1) @ v


def _masked_fill_assigned(q, k, v, m):
    s = q @ k.transpose(-2, -1)
    s = s.mul_(SCALE).masked_fill_(~m, float("-inf"))
    return torch.softmax(s, -1) @ v


def _iadd_bias(q, k, v, m):
    s = q @ k.transpose(-2, -1) * SCALE
    s += m.float() * 0.5                    # Dynamo: operator.iadd (fx: a plain add)
    return torch.softmax(s, -1) @ v


def _v_written_before_output(q, k, v, m):
    vv = v * 1.0
    p = torch.softmax(q @ k.transpose(-2, -1) * SCALE, -1)
    vv.add_(1.0)                            # the model's product with v sees this; so does the op
    return p @ vv


def _built_keep_mask(q, k, v, m):
    keep = q.new_ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
    keep[:, 7:].fill_(False)                # the mask is not what `new_ones` built
    s = (q @ k.transpose(-2, -1) * SCALE).masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v


def _built_bias(q, k, v, m):
    bias = q.new_zeros(q.shape[-2], k.shape[-2])
    bias[:, :5].add_(-1e9)
    return torch.softmax(q @ k.transpose(-2, -1) * SCALE + bias, -1) @ v


def _mask_built_then_fill_unassigned(q, k, v, m):
    drop = ~m
    drop[..., 0].fill_(False)               # written before the scores' masked_fill_ reads it: both see it
    s = q @ k.transpose(-2, -1) * SCALE
    s.masked_fill_(drop, float("-inf"))
    return torch.softmax(s, -1) @ v


def _additive_mask_then_written(q, k, v, m):
    bias = torch.where(m, 0.0, float("-inf"))
    bias[..., 0].fill_(0.0)                 # key 0 is attended everywhere: the mask is not `m` any more
    return torch.softmax(q @ k.transpose(-2, -1) * SCALE + bias, -1) @ v


SCORE_STEPS = [
    pytest.param(_masked_fill_unassigned, id="masked_fill_unassigned"),
    pytest.param(_masked_fill_assigned, id="mul_masked_fill_assigned"),
    pytest.param(_iadd_bias, id="iadd_bias"),
    pytest.param(_v_written_before_output, id="v_written_before_output"),
    pytest.param(_built_keep_mask, id="keep_mask_built_in_place"),
    pytest.param(_built_bias, id="bias_built_in_place"),
    pytest.param(_mask_built_then_fill_unassigned, id="mask_built_then_masked_fill_unassigned"),
    pytest.param(_additive_mask_then_written, id="additive_mask_then_written"),
]


def _qkvm():
    q, k, v = qkv()
    return q, k, v, keep_mask(2, 4, 12, 12)


@pytest.mark.parametrize("fn", SCORE_STEPS)
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_in_place_score_steps_are_read(fn, frontend):
    model = QKVM(fn)
    inputs = _qkvm()
    want = run_model(model, inputs)
    cm = compile_form(model, inputs, frontend)
    assert count_ops(cm) == 1, cm.code()
    assert not cm.report().rejected
    assert_same_outputs(run_model(cm, inputs), want)
    # the scores are not computed any more: no in-place write on them is left behind
    assert not any(n.op == "call_method" and n.target == "masked_fill_" for n in all_nodes(cm)), cm.code()


def _probabilities_written(q, k, v, m):
    p = torch.softmax(q @ k.transpose(-2, -1) * SCALE, -1)
    p.masked_fill_(~m, 0.0)
    return p @ v


def _scores_also_returned(q, k, v, m):
    s = q @ k.transpose(-2, -1) * SCALE
    seen = s                                 # another name for the same tensor: it sees the write
    s.masked_fill_(~m, -1e9)
    return torch.softmax(s, -1) @ v, seen.sum()


def _keys_written_after_scores(q, k, v, m):
    kk = k * 1.0
    s = q @ kk.transpose(-2, -1) * SCALE
    kk.mul_(2.0)                             # the op would read the doubled keys at the output
    return torch.softmax(s, -1) @ v + kk.sum()


def _mask_written_after_use(q, k, v, m):
    keep = m.clone()
    s = (q @ k.transpose(-2, -1) * SCALE).masked_fill(~keep, float("-inf"))
    keep.fill_(True)                         # after the model applied it, before the output
    return torch.softmax(s, -1) @ v


def _written_softmax_then_write(q, k, v, m):
    s = q @ k.transpose(-2, -1) * SCALE
    e = torch.exp(s - s.amax(-1, keepdim=True))
    s.zero_()                                # a softmax folded at the division would read these zeros
    return (e / e.sum(-1, keepdim=True)) @ v


REFUSED = [
    pytest.param(_probabilities_written, "in-place Tensor.masked_fill_ changes the attention probabilities",
                 id="probabilities_written"),
    pytest.param(_scores_also_returned, "the attention scores are used elsewhere", id="scores_aliased"),
    pytest.param(_keys_written_after_scores, "in-place Tensor.mul_ may change", id="keys_written_after_scores"),
    pytest.param(_mask_written_after_use, "in-place Tensor.fill_ may change", id="mask_written_after_use"),
]


@pytest.mark.parametrize("fn,reason", REFUSED)
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_in_place_writes_that_change_what_the_op_reads_are_refused(fn, reason, frontend):
    model = QKVM(fn)
    inputs = _qkvm()
    want = run_model(model, inputs)
    cm = compile_form(model, inputs, frontend)
    rep = cm.report()
    assert count_ops(cm) == 0, cm.code()
    assert len(rep.rejected) == 1 and reason in rep.rejected[0].reason, rep.rejected
    assert_same_outputs(run_model(cm, inputs), want)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_written_softmax_is_not_folded_across_a_write(frontend):
    model = QKVM(_written_softmax_then_write)
    inputs = _qkvm()
    want = run_model(model, inputs)
    cm = compile_form(model, inputs, frontend)
    assert count_ops(cm) == 0, cm.code()
    _equal(run_model(cm, inputs), want)


# ---------------------------------------------------------------------------------------------- real model


def test_minicpm3_keys_assembled_in_place():
    """transformers' MiniCPM3 (DeepSeek-V2-style MLA) builds its keys with ``new_empty`` and two ``copy_`` into
    slices; before attncc kept those writes, its compiled outputs were ~6% off."""
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(
        "minicpm3", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding: no query row is masked everywhere (there the model averages all values)
    inputs = {"input_ids": ids, "attention_mask": mask}
    want = run_model(model, inputs).logits
    cm = compile_form(model, inputs, "dynamo")
    rep = cm.report()
    assert [s.module for s in rep.sites] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert not rep.rejected, rep.rejected
    assert count_ops(cm) == 2
    assert_same_outputs(run_model(cm, inputs).logits, want)
