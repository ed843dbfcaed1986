"""lower_aten's table (``attncc.passes.lower_aten.ATEN_LOWERINGS``), one test per row: ATen call -> torch call.

Each row has an example in ``EXAMPLES``: a function calling one of the row's ATen overloads directly, traced with
``fx.symbolic_trace`` (so the graph holds the overload, as an exported graph does). The test lowers it and checks
that the overload is gone, that the lowered graph computes what the ATen call computes, and that the input graph
is unchanged. ``test_every_row_has_an_example`` fails when a row joins the table without one.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from attncc.passes.lower_aten import ATEN_LOWERINGS, lower_aten

aten = torch.ops.aten
g = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=g)


def ints(*shape):
    return torch.randint(0, 4, shape, generator=g)


X, Y = rand(2, 3, 4), rand(2, 3, 4)
Q, K = rand(2, 3, 5, 4), rand(2, 3, 5, 4)
B = torch.rand(2, 3, 4, generator=g) > 0.5

EXAMPLES = {
    # row name: (function calling the ATen overload, inputs, the torch target the lowered graph must call)
    "matmul": (lambda a, b: aten.matmul.default(a, b.transpose(-1, -2)), (X, Y), torch.matmul),
    "bmm": (lambda a, b: aten.bmm.default(a, b.transpose(-1, -2)), (X, Y), torch.bmm),
    "baddbmm": (lambda a, b: aten.baddbmm.default(a[:, :, :3], a, b.transpose(-1, -2)), (X, Y), torch.baddbmm),
    "softmax": (lambda a: aten.softmax.int(a, -1, torch.float64), (X,), torch.softmax),
    "internal_softmax": (lambda a: aten._softmax.default(a, -1, False), (X,), torch.softmax),
    "sdpa": (lambda q, k: aten.scaled_dot_product_attention.default(q, k, k, None, 0.0, True), (Q, K),
             F.scaled_dot_product_attention),
    "dropout": (lambda a: aten.dropout.default(a, 0.0, False), (X,), torch.dropout),
    "linear": (lambda a, w: aten.linear.default(a, w[0]), (X, rand(1, 5, 4)), F.linear),
    "mul": (lambda a, b: aten.mul.Tensor(a, b), (X, Y), operator.mul),
    "div": (lambda a: aten.div.Scalar(a, 3.0), (X,), operator.truediv),
    "add": (lambda a, b: aten.add.Tensor(a, b, alpha=2), (X, Y), torch.add),
    "sub": (lambda a, b: aten.sub.Tensor(a, b), (X, Y), operator.sub),
    "tanh": (lambda a: aten.tanh.default(a), (X,), torch.tanh),
    "where": (lambda c, a: aten.where.ScalarOther(c, a, -1e9), (B, X), torch.where),
    "masked_fill": (lambda a, c: aten.masked_fill.Scalar(a, c, float("-inf")), (X, B), "masked_fill"),
    "transpose": (lambda a: aten.transpose.int(a, 1, 2), (X,), "transpose"),
    "permute": (lambda a: aten.permute.default(a, [2, 0, 1]), (X,), "permute"),
    "view": (lambda a: aten.view.default(a, [2, 12]), (X,), "view"),
    "reshape": (lambda a: aten.reshape.default(a, [6, 4]), (X,), "reshape"),
    "expand": (lambda a: aten.expand.default(a[:, :1], [2, 5, 4]), (X,), "expand"),
    "unsqueeze": (lambda a: aten.unsqueeze.default(a, 1), (X,), torch.unsqueeze),
    "unbind": (lambda a: aten.unbind.int(a, 0)[1], (X,), torch.unbind),
    "split": (lambda a: aten.split.Tensor(a, 2, 2)[1], (X,), torch.split),
    "flatten": (lambda a: aten.flatten.using_ints(a, 0, 1), (X,), torch.flatten),
    "unflatten": (lambda a: aten.unflatten.int(a, -1, [2, 2]), (X,), torch.unflatten),
    "narrow": (lambda a: aten.narrow.default(a, 2, 1, 2), (X,), torch.narrow),
    "contiguous": (lambda a: aten.contiguous.default(a.transpose(0, 1)), (X,), "contiguous"),
    "clone": (lambda a: aten.clone.default(a), (X,), "clone"),
    "to": (lambda a: aten.to.dtype_layout(a, dtype=torch.float64, layout=torch.strided, device="cpu"), (X,), "to"),
    "slice": (lambda a: aten.slice.Tensor(a, -1, 1, 9223372036854775807), (X,), operator.getitem),
    "select": (lambda a: aten.select.int(a, 1, 2), (X,), operator.getitem),
    "index": (lambda a, i: aten.index.Tensor(a, [None, i]), (X, torch.tensor([2, 0])), operator.getitem),
    # (factories sized by the input, so that tracing records them instead of running them)
    "arange": (lambda a: aten.arange.start(1, a.size(-1) + 1, device="cpu", pin_memory=False) + a, (X,),
               torch.arange),
    "ones": (lambda a: aten.ones.default([a.size(-1)], dtype=torch.bool, layout=torch.strided) & (a > 0), (X,),
             torch.ones),
    "zeros": (lambda a: aten.zeros.default([a.size(-1)], dtype=torch.float32) + a, (X,), torch.zeros),
    "full": (lambda a: aten.full.default([a.size(-1)], 2.5, pin_memory=False) * a, (X,), torch.full),
    "new_ones": (lambda a: aten.new_ones.default(a, [3], dtype=torch.bool, pin_memory=False), (X,), "new_ones"),
    "le": (lambda a, b: aten.le.Tensor(a, b), (X, Y), operator.le),
    "lt": (lambda a: aten.lt.Scalar(a, 0.5), (X,), operator.lt),
    "ge": (lambda a, b: aten.ge.Tensor(a, b), (X, Y), operator.ge),
    "gt": (lambda a: aten.gt.Scalar(a, 0.0), (X,), operator.gt),
    "eq": (lambda a, b: aten.eq.Tensor(a, b), (ints(3, 4), ints(3, 4)), operator.eq),
    "ne": (lambda a: aten.ne.Scalar(a, 1), (ints(3, 4),), operator.ne),
    "and": (lambda c, d: aten.__and__.Tensor(c, d), (B, ~B), operator.and_),
    "logical_and": (lambda c, d: aten.logical_and.default(c, d), (B, B.flip(0)), torch.logical_and),
    "or": (lambda c, d: aten.bitwise_or.Tensor(c, d), (B, B.flip(0)), operator.or_),
    "logical_not": (lambda c: aten.logical_not.default(c), (B,), torch.logical_not),
    "bitwise_not": (lambda c: aten.bitwise_not.default(c), (B,), torch.bitwise_not),
}

ROWS = {row.name: row for row in ATEN_LOWERINGS}


def traced(fn) -> fx.GraphModule:
    return fx.symbolic_trace(fn)


def targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_row(name):
    fn, inputs, torch_target = EXAMPLES[name]
    row = ROWS[name]
    gm = traced(fn)
    assert any(t in row.overloads for t in targets(gm)), f"the example of {name} calls none of its overloads"
    before = targets(gm)
    lowered = lower_aten(gm)
    assert targets(gm) == before, "lower_aten changed its input graph"
    assert not any(t in row.overloads for t in targets(lowered))
    assert torch_target in targets(lowered)
    torch.testing.assert_close(lowered(*inputs), fn(*inputs), rtol=0, atol=0)


def test_every_row_has_an_example():
    names = [row.name for row in ATEN_LOWERINGS]
    assert len(names) == len(set(names))
    overloads = [o for row in ATEN_LOWERINGS for o in row.overloads]
    assert len(overloads) == len(set(overloads)), "an overload in two rows"
    assert sorted(EXAMPLES) == sorted(names), f"rows without an example: {sorted(set(names) - set(EXAMPLES))}"


def test_whole_slice_is_its_input():
    # x[:, :, None] is exported as unsqueeze and one whole-dim slice per dim; the repeat_kv reader needs x itself
    gm = traced(lambda a: aten.slice.Tensor(aten.unsqueeze.default(a, 2), 1, 0, 9223372036854775807) * 2)
    lowered = lower_aten(gm)
    assert operator.getitem not in targets(lowered) and aten.slice.Tensor not in targets(lowered)
    torch.testing.assert_close(lowered(X), X.unsqueeze(2) * 2)


def test_add_with_alpha_one_is_the_operator():
    lowered = lower_aten(traced(lambda a, b: aten.add.Tensor(a, b)))
    assert operator.add in targets(lowered) and torch.add not in targets(lowered)


def test_to_with_another_layout_stays_aten():
    # Tensor.to takes no layout: a call asking for a sparse layout keeps its ATen spelling (read as unknown)
    gm = traced(lambda a: aten.to.dtype_layout(a, dtype=torch.float32, layout=torch.sparse_coo))
    assert aten.to.dtype_layout in targets(lower_aten(gm))


def test_metadata_checks_are_dropped():
    def checked(a):
        aten._assert_tensor_metadata.default(a, dtype=torch.float32)
        return a * 2

    gm = traced(checked)
    assert aten._assert_tensor_metadata.default in targets(gm)
    assert aten._assert_tensor_metadata.default not in targets(lower_aten(gm))


def test_exported_attention_is_found():
    """A torch.export graph of plain attention, lowered, is one exact site with its causal mask proven for every
    length (the sequence axis is dynamic)."""
    from attncc.module_names import ModuleNames
    from attncc.passes import run_pipeline
    from attncc.policy import as_policy

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            n = q.size(-2)
            keep = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
            scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~keep, float("-inf"))
            return scores.softmax(-1) @ v

    model = Attention()
    seq = torch.export.Dim.DYNAMIC
    ep = torch.export.export(model, (Q, K, K), dynamic_shapes=({2: seq}, {2: seq}, {2: seq}), strict=False)
    gm = lower_aten(ep.module())
    ModuleNames(model).annotate(gm)
    result = run_pipeline(gm, as_policy("exact"))
    (site,) = result.sites
    assert site.variant == "exact" and site.causal and not result.rejected
    for n in (5, 9):
        q, k = rand(2, 3, n, 4), rand(2, 3, n, 4)
        (out,) = result.graph_module(q, k, k)  # the flat outputs of the exported module
        torch.testing.assert_close(out, model(q, k, k), rtol=1e-5, atol=1e-6)
