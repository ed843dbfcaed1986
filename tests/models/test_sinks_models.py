"""A real model with learned attention sinks: transformers' gpt-oss (eager attention, one learned sink logit per
head, layers alternating sliding-window and full attention), tiny and random.

symbolic_trace cannot trace gpt-oss (its mixture-of-experts routing is data dependent), so it is captured by
Dynamo. Under "exact" every layer is rewritten with its sinks and the logits match; under a local policy the
sliding layer stays exact (its own window is narrower) and the full layer runs the local variant with its
sinks, the error measured; linear attention declines both layers because of the sinks.
"""

from __future__ import annotations

import pytest
import torch

import attncc

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

ATTN_OP = torch.ops.attncc.attention.default
WINDOW = 8


@pytest.fixture(scope="module")
def gpt_oss():
    transformers.logging.set_verbosity_error()
    config = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
        max_position_embeddings=256, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    assert config.layer_types == ["sliding_attention", "full_attention"]
    with torch.no_grad():
        for layer in model.model.layers:  # sinks large enough to matter (the init draws them near 0)
            layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, config.num_attention_heads))
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return model, {"input_ids": ids}, logits


def compile_model(model, inputs, policy):
    torch._dynamo.reset()
    return attncc.compile(model, policy, example_inputs=inputs, frontend="dynamo")


def ops(cm):
    return [n for gm in cm.graph_modules for n in gm.graph.nodes if n.op == "call_function" and n.target is ATTN_OP]


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_exact_rewrites_every_layer_with_its_sinks(gpt_oss):
    model, inputs, want = gpt_oss
    cm = compile_model(model, inputs, "exact")
    report = cm.report()
    assert report.rejected == []
    assert [s.module for s in report.sites] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert [s.mask for s in report.sites] == [f"causal+window {WINDOW}", "causal"]
    assert all(s.sinks for s in report.sites)
    assert len(ops(cm)) == 2 and all("sinks" in op.kwargs for op in ops(cm))
    with torch.no_grad():
        assert rel_err(cm(**inputs).logits, want) <= 1e-5


def test_local_policy_runs_with_sinks_and_measures_its_error(gpt_oss):
    model, inputs, want = gpt_oss
    cm = compile_model(model, inputs, f"local(window={WINDOW}, sinks=2)")
    with torch.no_grad():
        logits = cm(**inputs).logits
    sliding, full = cm.report().sites
    assert sliding.variant == "exact" and "already narrower" in sliding.reason
    assert full.variant == f"local(window={WINDOW}, sinks=2)"
    assert full.rel_l2 is not None and 0 < full.rel_l2 < 1
    assert torch.isfinite(logits).all() and rel_err(logits, want) < 0.5


def test_linear_declines_the_sinks(gpt_oss):
    model, inputs, want = gpt_oss
    cm = compile_model(model, inputs, "linear")
    for site in cm.report().sites:
        assert site.variant == "exact"
        assert "learned sink logits: linear attention has no softmax denominator" in site.reason
    with torch.no_grad():
        assert rel_err(cm(**inputs).logits, want) <= 1e-5
