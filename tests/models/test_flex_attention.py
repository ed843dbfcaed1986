"""FlexAttention under attncc: models calling flex_attention run (they used to crash: dead-code removal dropped the
vmap levels Dynamo records around create_block_mask), give the original's outputs, and every call is either a
site (no score_mod and no block_mask, or a causal block_mask: lowered to SDPA) or reported with its reason.

fx.symbolic_trace cannot trace flex_attention (it checks tensor properties), so ``auto`` captures with Dynamo.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import attncc

flex = pytest.importorskip("torch.nn.attention.flex_attention")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "passes"))  # forms_helpers
from forms_helpers import assert_same_outputs, compile_form, count_ops, count_softmax_like, run_model  # noqa: E402

B, HQ, HKV, N, D = 2, 4, 2, 128, 16


def causal_score_mod(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, score, -float("inf"))


def causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window_mask_mod(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 32)


class Flex(nn.Module):
    """One flex_attention call, as ``mode`` says."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, q, k, v):
        if self.mode == "plain":
            return flex.flex_attention(q, k, v)
        if self.mode == "gqa":
            return flex.flex_attention(q, k, v, enable_gqa=True)
        if self.mode == "score_mod":
            return flex.flex_attention(q, k, v, score_mod=causal_score_mod)
        if self.mode == "lse":
            out, lse = flex.flex_attention(q, k, v, return_lse=True)
            return out + lse[..., None]
        mask_mod = causal_mask_mod if self.mode == "causal_block_mask" else sliding_window_mask_mod
        block_mask = flex.create_block_mask(mask_mod, None, None, q.shape[-2], k.shape[-2], device="cpu")
        return flex.flex_attention(q, k, v, block_mask=block_mask)


def inputs(mode):
    gen = torch.Generator().manual_seed(0)
    kv_heads = HKV if mode == "gqa" else HQ
    return (torch.randn(B, HQ, N, D, generator=gen), torch.randn(B, kv_heads, N, D, generator=gen),
            torch.randn(B, kv_heads, N, D, generator=gen))


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():  # flex_attention warns that it is not compiled (its eager path is meant)
        warnings.simplefilter("ignore")
        yield


# mode: (site fields, or None when the call is reported instead, with this reason)
CASES = {
    "plain": (dict(causal=False, mask="none", kv_heads=HQ), None),
    "gqa": (dict(causal=False, kv_heads=HKV), None),
    "causal_block_mask": (dict(causal=True, mask="causal"), None),
    "score_mod": (None, "FlexAttention call: score_mod is not carried yet"),
    "lse": (None, "FlexAttention call: its logsumexp is used"),
    "window_block_mask": (None, "FlexAttention call: a block_mask other than none or causal is not carried yet"),
}


# auto falls back to Dynamo for every mode (fx cannot trace flex_attention): one auto run shows that
RUNS = [(mode, "dynamo") for mode in CASES] + [("plain", "auto"), ("causal_block_mask", "auto")]


@pytest.mark.parametrize("mode, frontend", RUNS)
def test_flex_attention(mode, frontend):
    site_fields, reason = CASES[mode]
    model = Flex(mode)
    args = inputs(mode)
    want = run_model(model, args)
    torch._dynamo.reset()  # compile_form resets for "dynamo" only; Dynamo would remember other cases' shapes
    cm = compile_form(model, args, frontend)
    report = cm.report()
    assert report.frontend == "dynamo"
    assert_same_outputs(run_model(cm, args), want)
    if site_fields is None:
        assert count_ops(cm) == 0
        assert [r.reason for r in report.rejected] == [reason]
    else:
        assert count_ops(cm) == 1 and count_softmax_like(cm) == 0, cm.code()
        assert not report.rejected
        site = report.sites[0]
        assert site.scale == pytest.approx(D ** -0.5)
        for key, value in site_fields.items():
            assert getattr(site, key) == value, (key, getattr(site, key))


def test_fx_frontend_says_it_cannot_trace():
    with pytest.raises(attncc.AttnccError, match="cannot trace"):
        attncc.compile(Flex("plain"), "exact", example_inputs=inputs("plain"), frontend="fx")


@pytest.mark.slow
def test_transformers_llama_with_flex_attention():
    """transformers builds the block mask from the inputs: each layer's call runs untouched and is reported."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="flex_attention").eval()
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    want = run_model(model, {"input_ids": ids}).logits
    torch._dynamo.reset()
    cm = compile_form(model, {"input_ids": ids}, "auto")
    assert_same_outputs(run_model(cm, {"input_ids": ids}).logits, want)
    # (FlexAttention cannot run under attncc's eager count of attention outside the graphs: said as a '' line)
    rejected = [r for r in cm.report().rejected if not r.reason.startswith("could not check")]
    assert [r.module for r in rejected] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(r.reason.startswith("FlexAttention call: ") for r in rejected)
