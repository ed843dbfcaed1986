"""Real models on the Triton backend (kernels in Triton's CPU interpreter here, on the GPU where there is one):
every variant's kernels give the same model outputs as the PyTorch path, through the whole pipeline."""

from __future__ import annotations

import pytest
import timm
import torch
from transformers import AutoConfig, AutoModel

import attncc

pytestmark = pytest.mark.slow

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
"""Where the models run: the GPU's kernels where there is one, else the kernels in Triton's interpreter."""


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "cache"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _run_both(model, policy, inputs, monkeypatch):
    """(torch backend output, triton backend output, report) of the compiled model on ``inputs``."""
    model = model.to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()} if isinstance(inputs, dict) else \
        tuple(x.to(DEVICE) for x in inputs)
    call = (lambda m: m(**inputs)) if isinstance(inputs, dict) else (lambda m: m(*inputs))
    outs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("ATTNCC_BACKEND", backend)
        cm = attncc.compile(model, policy, inputs, strict=True, measure_error=False)
        with torch.no_grad():
            out = call(cm)
        outs[backend] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    return outs["torch"], outs["triton"], cm.report()


def _llama():
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=1, vocab_size=100)
    cfg._attn_implementation = "sdpa"
    return AutoModel.from_config(cfg).eval()


def _text(n=40, pad=7):
    ids = torch.randint(0, 100, (2, n), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, n, dtype=torch.long)
    am[1, n - pad:] = 0
    return {"input_ids": ids, "attention_mask": am}


@pytest.mark.parametrize("policy", ["exact", "local(window=8, sinks=2)", "topk(block=16, density=0.5)",
                                    "block_sparse(pattern=radial(window=1), block=16)", "linear(window=8)"])
def test_llama_gqa_on_triton_equals_torch_path(policy, monkeypatch):
    inputs = _text()
    want, have, rep = _run_both(_llama(), policy, inputs, monkeypatch)
    assert all(s.variant != "exact" or policy == "exact" for s in rep.sites)
    am = inputs["attention_mask"].bool()
    torch.testing.assert_close(have[am], want[am], rtol=1e-4, atol=1e-4)


def test_vit_neighborhood_on_triton_equals_torch_path(monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=112, depth=2).eval()
    x = torch.randn(1, 3, 112, 112)
    want, have, rep = _run_both(model, "neighborhood(kernel=3)", (x,), monkeypatch)
    assert {s.variant for s in rep.sites} == {"neighborhood(kernel=3, grid=(7, 7), globals=1)"}
    torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)


def test_bert_bidirectional_padding_on_triton(monkeypatch):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("bert", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, vocab_size=100)
    cfg._attn_implementation = "sdpa"
    model = AutoModel.from_config(cfg).eval()
    inputs = _text()
    for policy in ("exact", "local(window=4, globals=1)"):
        want, have, _ = _run_both(model, policy, inputs, monkeypatch)
        am = inputs["attention_mask"].bool()
        torch.testing.assert_close(have[am], want[am], rtol=1e-4, atol=1e-4)
