"""rewrite_sites on small hand-made graphs and hand-made sites (no detection): what the op node receives."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from attncc.passes.rewrite import ATTENTION_OP, rewrite_sites
from attncc.site import AttentionSite
from attncc.variants.parse import parse_variant

B, H, N, D = 2, 4, 8, 16


class Plain(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


class Transposed(torch.nn.Module):
    """Channels-first output: ``v^T @ p^T`` is ``out^T`` ``[B, H, D, N]``."""

    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1)
        return v.transpose(-2, -1) @ p.transpose(-2, -1)


class WithSinks(torch.nn.Module):
    def forward(self, q, k, v, sinks):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v + 0 * sinks.sum()


def _traced(module: torch.nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
    gm = fx.symbolic_trace(module)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*(mode.from_tensor(t) for t in inputs))
    return gm


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _output_value(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]


def _ops(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is ATTENTION_OP]


def _qkv(d_v: int = D):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, d_v,
                                                                                                     generator=g)


def _site(gm: fx.GraphModule, output: fx.Node, **fields) -> AttentionSite:
    q, k, v = _placeholders(gm)[:3]
    return AttentionSite(module="", source="explicit", q=q, k=k, v=v, output=output, scale=0.25, **fields)


def test_exact_site_passes_only_the_scale():
    inputs = _qkv()
    gm = _traced(Plain(), *inputs)
    out = rewrite_sites(gm, [_site(gm, _output_value(gm))]).graph_module
    (op,) = _ops(out)
    assert [a.name for a in op.args] == ["q", "k", "v"]
    assert dict(op.kwargs) == {"scale": 0.25}
    torch.testing.assert_close(out(*inputs), gm(*inputs), rtol=1e-5, atol=1e-5)


def test_kwargs_only_where_not_default():
    inputs = _qkv()
    gm = _traced(Plain(), *inputs)
    site = _site(gm, _output_value(gm), causal=True, spec=parse_variant("local(window=4)"),
                 fallback=parse_variant("exact"), min_len=0, softcap=0.0, dropout_p=0.0)
    (op,) = _ops(rewrite_sites(gm, [site]).graph_module)
    assert dict(op.kwargs) == {"scale": 0.25, "causal": True, "variant": "local(window=4)"}


def test_unchanged_sites_are_skipped_and_input_graph_is_not_touched():
    inputs = _qkv()
    gm = _traced(Plain(), *inputs)
    before = str(gm.graph)
    out = rewrite_sites(gm, [_site(gm, _output_value(gm), variant="none")]).graph_module
    assert _ops(out) == [] and str(gm.graph) == before


def test_output_transposed_gets_a_transpose_after_the_op():
    inputs = _qkv()
    gm = _traced(Transposed(), *inputs)
    out = rewrite_sites(gm, [_site(gm, _output_value(gm), output_transposed=True)]).graph_module
    (op,) = _ops(out)
    (user,) = op.users
    assert user.op == "call_method" and user.target == "transpose" and user.args[1:] == (-2, -1)
    torch.testing.assert_close(out(*inputs), gm(*inputs), rtol=1e-5, atol=1e-5)


def test_shape_mismatch_is_undone_with_its_reason():
    """A site whose output node is the probabilities ``[B, H, N, N]`` while the op returns ``[B, H, N, 2D]``."""
    inputs = _qkv(d_v=2 * D)
    gm = _traced(Plain(), *inputs)
    site = _site(gm, _node(gm, "softmax"))
    out, (ran,) = rewrite_sites(gm, [site])
    assert _ops(out) == []
    assert site.variant != "none"  # the given site is unchanged: the returned one says what ran
    assert ran.variant == "none" and ran.spec is None
    assert ran.reason == f"rewritten output shape {(B, H, N, 2 * D)} differs from the original {(B, H, N, N)}"
    assert str(out.graph) == str(gm.graph)  # what the rewrite emitted is gone again
    torch.testing.assert_close(out(*inputs), gm(*inputs))


def _sinks_site(sinks: torch.Tensor):
    inputs = (*_qkv(), sinks)
    gm = _traced(WithSinks(), *inputs)
    add = _output_value(gm)
    matmul = next(a for a in add.args if isinstance(a, fx.Node) and a.target is not torch.mul)
    site = _site(gm, matmul, sink_logits=_placeholders(gm)[3], q_heads=H)
    return rewrite_sites(gm, [site]).graph_module


def test_one_shared_sink_logit_becomes_one_per_query_head():
    (op,) = _ops(_sinks_site(torch.randn(1)))
    sinks = op.kwargs["sinks"]
    assert sinks.target == "expand" and sinks.args[1] == H
    assert sinks.args[0].target == "reshape" and sinks.args[0].args[1:] == (-1,)


def test_per_head_sink_logits_are_flattened():
    (op,) = _ops(_sinks_site(torch.randn(1, H, 1, 1)))
    sinks = op.kwargs["sinks"]
    assert sinks.target == "reshape" and sinks.args[1:] == (-1,) and sinks.args[0].name == "sinks"
