"""Exact on model code the other model tests do not build: Qwen3, Phi-3, OLMo 2, ModernBERT (transformers, sdpa and
eager) and EVA-02, BEiT (timm: rotary embeddings, a relative-position bias). Each gives one exact site per layer,
no near-miss and the original's outputs (fp32, relative L2 error <= 1e-5)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import attncc

sys.path.insert(0, str(Path(__file__).parent))
from test_variants_on_models import hf_model, text_inputs, valid  # noqa: E402

pytestmark = pytest.mark.slow

TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
HF_MODELS = {
    "qwen3": dict(TOKENS, head_dim=16, num_key_value_heads=2),
    "phi3": dict(TOKENS),
    "olmo2": dict(TOKENS, num_key_value_heads=2),
    "modernbert": dict(TOKENS, cls_token_id=1, sep_token_id=2),
}


def _relative_error(have: torch.Tensor, want: torch.Tensor) -> float:
    return ((have - want).norm() / want.norm()).item()


def _assert_exact_sites(cm, layers: int) -> None:
    report = cm.report()
    assert [s.variant for s in report.sites] == ["exact"] * layers, report
    assert report.rejected == [], report


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", list(HF_MODELS))
def test_transformers_model_is_exact(model_type, attn):
    torch._dynamo.reset()
    model = hf_model(model_type, attn, **HF_MODELS[model_type])
    inputs = text_inputs(n=40)
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
        cm = attncc.compile(model, "exact", inputs, strict=True)
        have = cm(**inputs).last_hidden_state
    _assert_exact_sites(cm, model.config.num_hidden_layers)
    am = inputs["attention_mask"]
    assert _relative_error(valid(have, am), valid(want, am)) <= 1e-5


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "beit_base_patch16_224"])
def test_timm_model_is_exact(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=56, depth=2).eval()
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        cm = attncc.compile(model, "exact", (x,), strict=True)
        have = cm(x)
    _assert_exact_sites(cm, 2)
    assert _relative_error(have, want) <= 1e-5
