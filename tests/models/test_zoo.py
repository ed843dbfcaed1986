"""Model specs: the demo model, tiny transformers/timm models, factory files, and the errors for bad specs."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import torch.fx

from attncc.errors import AttnccError
from attncc.models import LoadedModel, build_demo_model, load_model


def _run(loaded: LoadedModel):
    with torch.no_grad():
        if isinstance(loaded.example_inputs, dict):
            return loaded.model(**loaded.example_inputs)
        return loaded.model(*loaded.example_inputs)


# ------------------------------------------------------------------ demo


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return build_demo_model(seq_len=16, batch=2)


def test_demo_builds_and_runs(demo):
    (ids,) = demo.example_inputs
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert not demo.model.training
    logits = _run(demo)
    assert logits.shape == (2, 16, demo.model.cfg.vocab_size)
    assert torch.isfinite(logits).all()
    assert "demo" in demo.description


def test_demo_is_deterministic_and_causal(demo):
    again = build_demo_model(seq_len=16, batch=2)
    assert torch.equal(again.example_inputs[0], demo.example_inputs[0])
    assert torch.equal(_run(again), _run(demo))
    # Changing the last token must not change earlier positions' logits.
    ids = demo.example_inputs[0].clone()
    ids[:, -1] = (ids[:, -1] + 1) % demo.model.cfg.vocab_size
    with torch.no_grad():
        changed = demo.model(ids)
    assert torch.allclose(changed[:, :-1], _run(demo)[:, :-1])
    assert not torch.allclose(changed[:, -1], _run(demo)[:, -1])


def test_demo_mask_is_one_small_shared_buffer(demo):
    masks = [block.attn.causal for block in demo.model.blocks]
    assert masks[0].dtype == torch.bool and masks[0].shape == (1, 1, 4096, 4096)
    assert all(m is masks[0] for m in masks)
    assert not any("causal" in k for k in demo.model.state_dict())  # persistent=False
    moved = build_demo_model(seq_len=8).model.to(torch.float64)
    assert all(b.attn.causal is moved.blocks[0].attn.causal for b in moved.blocks)
    assert moved.blocks[0].attn.causal.dtype == torch.bool


def test_demo_symbolic_trace_matches(demo):
    gm = torch.fx.symbolic_trace(demo.model)
    assert any(n.op == "call_function" and n.target is torch.nn.functional.softmax for n in gm.graph.nodes)
    assert torch.equal(gm(*demo.example_inputs), _run(demo))
    # The traced graph is not specialised to the example length.
    short = demo.example_inputs[0][:, :5]
    assert torch.equal(gm(short), demo.model(short))


def test_demo_torch_compile_matches(demo):
    torch._dynamo.reset()
    compiled = torch.compile(demo.model, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(*demo.example_inputs)
    assert torch.allclose(out, _run(demo), atol=1e-6, rtol=1e-6)


def test_demo_spec_uses_seq_len_and_batch():
    loaded = load_model("demo", seq_len=8, batch=3)
    assert loaded.example_inputs[0].shape == (3, 8)


# ------------------------------------------------------------------ transformers


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5", "vit"])
def test_hf_tiny_models_run(arch, attn):
    loaded = load_model(f"hf:{arch}", seq_len=16, attn=attn)
    assert isinstance(loaded.example_inputs, dict)
    assert sum(p.numel() for p in loaded.model.parameters()) < 1_000_000
    assert not loaded.model.training
    assert loaded.model.config._attn_implementation == attn
    out = _run(loaded)
    hidden = out.last_hidden_state
    if arch == "vit":
        assert set(loaded.example_inputs) == {"pixel_values"}
        assert loaded.example_inputs["pixel_values"].shape == (1, 3, 32, 32)
        assert hidden.shape == (1, 17, 64)  # 16 patches + cls
    else:
        assert loaded.example_inputs["input_ids"].shape == (1, 16)
        assert loaded.example_inputs["use_cache"] is False
        assert hidden.shape == (1, 16, 64)
    if arch == "t5":
        assert loaded.example_inputs["decoder_input_ids"].shape == (1, 16)


def test_hf_llama_is_grouped_query():
    cfg = load_model("hf:llama", seq_len=8).model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (2, 16, 128)


def test_hf_sequence_longer_than_default_positions():
    loaded = load_model("hf:bert", seq_len=600)
    assert _run(loaded).last_hidden_state.shape == (1, 600, 64)


def test_hf_local_directory(tmp_path):
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model(
        "bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99
    )
    AutoModel.from_config(cfg).save_pretrained(tmp_path / "tiny_bert")
    loaded = load_model(f"hf:{tmp_path / 'tiny_bert'}", seq_len=12, batch=2, attn="sdpa")
    ids = loaded.example_inputs["input_ids"]
    assert ids.shape == (2, 12) and int(ids.max()) < 99
    assert _run(loaded).last_hidden_state.shape == (2, 12, 32)


# ------------------------------------------------------------------ timm


def test_timm_model_runs():
    loaded = load_model("timm:vit_tiny_patch16_224", seq_len=999, batch=1)
    (x,) = loaded.example_inputs
    assert x.shape == (1, 3, 224, 224)
    assert "seq_len is ignored" in loaded.description
    assert _run(loaded).shape == (1, 1000)


# ------------------------------------------------------------------ factory files


def _write(tmp_path, body: str):
    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_factory_file(tmp_path):
    path = _write(
        tmp_path,
        """
        from dataclasses import dataclass
        import torch

        @dataclass
        class Sizes:  # dataclasses need the module registered in sys.modules
            d: int = 8

        def make():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(Sizes().d, 4), torch.nn.Dropout(0.5))
            return model, (torch.randn(2, Sizes().d),)
        """,
    )
    loaded = load_model(f"{path}:make")
    assert not loaded.model.training
    assert _run(loaded).shape == (2, 4)
    assert torch.equal(_run(loaded), _run(loaded))  # eval mode: dropout is off


@pytest.mark.parametrize(
    "body, match",
    [
        ("import torch\ndef make():\n    return torch.nn.Linear(2, 2)\n", "returned only a model"),
        ("def make():\n    return 3\n", r"must return \(model, example_inputs\)"),
        ("raise ImportError('boom')\n", "importing .* failed: ImportError: boom"),
    ],
)
def test_factory_mistakes(tmp_path, body, match):
    path = _write(tmp_path, body)
    with pytest.raises(AttnccError, match=match):
        load_model(f"{path}:make")


# ------------------------------------------------------------------ bad specs


@pytest.mark.parametrize(
    "spec, match",
    [
        ("gpt-5", "unrecognised model spec 'gpt-5'; accepted forms: demo, timm:NAME, hf:"),
        ("timm:vit_tiny_patch16", "timm has no model named 'vit_tiny_patch16'; did you mean .*vit_tiny_patch16_224"),
        ("hf:lama", "unknown transformers model type 'lama'; did you mean llama.*known types include .*gpt2"),
        ("hf:./no/such/dir", "no such directory: ./no/such/dir"),
        ("no/such/file.py:make", "no such file: no/such/file.py"),
        ("model.py", "names a file but no factory"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(AttnccError, match=match) as info:
        load_model(spec)
    assert "\n" not in str(info.value)


def test_missing_factory_function(tmp_path):
    path = _write(tmp_path, "def other():\n    pass\n")
    with pytest.raises(AttnccError, match="defines no 'make'"):
        load_model(f"{path}:make")


def test_bad_attn_and_sizes():
    with pytest.raises(AttnccError, match="unknown attention implementation 'flash'"):
        load_model("hf:llama", attn="flash")
    with pytest.raises(AttnccError, match="seq_len must be a positive integer"):
        load_model("demo", seq_len=0)


@pytest.mark.parametrize("spec, package", [("timm:vit_tiny_patch16_224", "timm"), ("hf:llama", "transformers")])
def test_missing_optional_dependency(monkeypatch, spec, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` raise ImportError
    with pytest.raises(AttnccError, match=f"need the {package} package"):
        load_model(spec)
