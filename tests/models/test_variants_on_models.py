"""Variants and mask analysis on real model code (transformers llama/mistral/bert, timm vit/swin).

Two kinds of checks per model:
  * degenerate limits through the whole pipeline: a variant whose pattern covers every key (local with a
    window >= N, topk with density 1, neighborhood with the kernel = the grid, linear hybrid with a window
    >= N) must reproduce the original model exactly — this exercises detection, mask analysis, planning (grid
    inference, model windows) and the op end to end;
  * real settings: the variant is applied to every site, the report shows fewer FLOPs and a measured error,
    and where the pattern can be written as a mask the model accepts (llama with a 4-D mask), the rewritten
    model equals the original model run with that mask.
"""

from __future__ import annotations

import pytest
import timm
import torch
from transformers import AutoConfig, AutoModel

import attncc

pytestmark = pytest.mark.slow

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def hf_model(model_type: str, attn: str = "sdpa", **extra):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, vocab_size=100, **extra)
    cfg._attn_implementation = attn
    return AutoModel.from_config(cfg).eval()


def text_inputs(n: int = 48, b: int = 2, pad: int = 9):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (b, n), generator=gen)
    am = torch.ones(b, n, dtype=torch.long)
    am[1, n - pad:] = 0
    return {"input_ids": ids, "attention_mask": am}


def hidden(out):
    return out.last_hidden_state


def valid(x, am):
    """Rows of real tokens only (padded positions carry no meaning in either model)."""
    return x[am.bool()]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_local_with_sinks_equals_the_model_with_that_mask(attn):
    model = hf_model("llama", attn, num_key_value_heads=2)
    inputs = text_inputs()
    n, window, sinks = inputs["input_ids"].shape[1], 8, 4
    cm = attncc.compile(model, f"local(window={window}, sinks={sinks})", inputs, strict=True)
    rep = cm.report()
    assert len(rep.sites) == 2
    for site in rep.sites:
        assert site.variant == f"local(window={window}, sinks={sinks})"
        assert site.mask == "causal+padding"
        assert site.flops_after < site.flops_before / 2
        assert site.rel_l2 is not None and site.rel_l2 > 0
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    pattern = (j <= i) & ((j >= i - window) | (j < sinks))
    mask4d = pattern[None, None] & inputs["attention_mask"].bool()[:, None, None, :]
    reference = hf_model("llama", "sdpa", num_key_value_heads=2)  # same seed, same weights; takes a bool 4-D mask
    with torch.no_grad():
        want = hidden(reference(input_ids=inputs["input_ids"], attention_mask=mask4d))
        have = hidden(cm(**inputs))
    am = inputs["attention_mask"]
    torch.testing.assert_close(valid(have, am), valid(want, am), **TOL)


def test_llama_local_degenerate_window_is_exact():
    model = hf_model("llama", num_key_value_heads=2)
    inputs = text_inputs()
    cm = attncc.compile(model, "local(window=1000)", inputs, strict=True)
    assert all(s.variant == "local(window=1000)" for s in cm.report().sites)
    with torch.no_grad():
        torch.testing.assert_close(valid(hidden(cm(**inputs)), inputs["attention_mask"]),
                                   valid(hidden(model(**inputs)), inputs["attention_mask"]), **TOL)


def test_llama_min_len_runs_exact_below_it_without_recapture():
    model = hf_model("llama", num_key_value_heads=2)
    inputs = text_inputs()
    cm = attncc.compile(model, attncc.Policy([attncc.Rule(variant="local(window=4)", min_len=1000)]), inputs,
                        strict=True)
    site = cm.report().sites[0]
    assert site.min_len == 1000 and site.variant == "local(window=4)"
    assert site.flops_after > site.flops_before / 2  # at 48 tokens it runs the exact causal fallback
    with torch.no_grad():
        torch.testing.assert_close(valid(hidden(cm(**inputs)), inputs["attention_mask"]),
                                   valid(hidden(model(**inputs)), inputs["attention_mask"]), **TOL)


def test_mistral_sliding_window_is_recognized_and_exact():
    model = hf_model("mistral", num_key_value_heads=2, sliding_window=16)
    inputs = text_inputs(n=64)
    cm = attncc.compile(model, "exact", inputs, strict=True)
    for site in cm.report().sites:
        assert site.mask == "causal+window 16+padding" and site.variant == "exact"
        assert site.flops_after < site.flops_before / 3
    assert "local(left=15, right=0)" in cm.code()
    with torch.no_grad():
        torch.testing.assert_close(valid(hidden(cm(**inputs)), inputs["attention_mask"]),
                                   valid(hidden(model(**inputs)), inputs["attention_mask"]), **TOL)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_linear(attn):
    model = hf_model("bert", attn)
    inputs = text_inputs()
    cm = attncc.compile(model, "linear", inputs, strict=True)
    for site in cm.report().sites:
        assert site.variant == "linear" and site.mask == "padding"
        assert 0 < site.rel_l2 < 1 and site.cosine > 0.5
    exact_hybrid = attncc.compile(model, "linear(window=1000)", inputs, strict=True)
    assert all(s.variant == "linear(window=1000)" for s in exact_hybrid.report().sites)
    with torch.no_grad():
        assert torch.isfinite(hidden(cm(**inputs))).all()
        torch.testing.assert_close(valid(hidden(exact_hybrid(**inputs)), inputs["attention_mask"]),
                                   valid(hidden(model(**inputs)), inputs["attention_mask"]), **TOL)


@pytest.mark.parametrize("model_type, extra", [("bert", {}), ("llama", {"num_key_value_heads": 2})],
                         ids=["bert", "llama-gqa-causal"])
def test_clustered_remainder_on_models(model_type, extra):
    """The remainder pooled by key cluster through the whole pipeline: as many clusters as keys puts every key
    in a cluster of its own (farthest-point seeds), so top-k keeping one block per query block is then exact;
    with 4 clusters it is an approximation, applied at every site with fewer FLOPs than exact."""
    model = hf_model(model_type, **extra)
    inputs = text_inputs()
    am = inputs["attention_mask"]
    exact = attncc.compile(model, "topk(block=8, k=1, remainder=True, clusters=64)", inputs, strict=True)
    assert all(s.variant == "topk(block=8, k=1, remainder=True, clusters=64)" for s in exact.report().sites)
    cm = attncc.compile(model, "topk(block=8, k=2, remainder=True, clusters=4)", inputs, strict=True)
    with torch.no_grad():
        want = valid(hidden(model(**inputs)), am)
        torch.testing.assert_close(valid(hidden(exact(**inputs)), am), want, **TOL)
        have = valid(hidden(cm(**inputs)), am)
    assert torch.isfinite(have).all() and not torch.allclose(have, want, **TOL)
    for site in cm.report().sites:
        assert site.variant == "topk(block=8, k=2, remainder=True, clusters=4)"
        assert site.rel_l2 is not None and 0 < site.rel_l2 < 1


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=112, depth=2).eval()
    return model, torch.randn(1, 3, 112, 112)


def test_vit_neighborhood_infers_the_patch_grid(vit):
    model, x = vit
    cm = attncc.compile(model, "neighborhood(kernel=3)", (x,), strict=True)
    for site in cm.report().sites:
        assert site.variant == "neighborhood(kernel=3, grid=(7, 7), globals=1)"
        assert site.flops_after < site.flops_before / 2 and site.rel_l2 > 0
    whole = attncc.compile(model, "neighborhood(kernel=7)", (x,), strict=True)  # kernel = grid: every key
    with torch.no_grad():
        torch.testing.assert_close(whole(x), model(x), **TOL)


def test_vit_topk(vit):
    model, x = vit
    cm = attncc.compile(model, "topk(density=0.5, block=8)", (x,), strict=True)
    for site in cm.report().sites:
        assert site.variant == "topk(block=8, density=0.5)" and site.rel_l2 > 0
    dense = attncc.compile(model, "topk(density=1.0, block=8)", (x,), strict=True)
    with torch.no_grad():
        assert torch.isfinite(cm(x)).all()
        torch.testing.assert_close(dense(x), model(x), **TOL)


def test_policy_rules_on_vit_layers(vit):
    model, x = vit
    policy = attncc.Policy([attncc.Rule(layers="0", variant="exact"),
                            attncc.Rule(variant="linear(feature_map='relu')")])
    rep = attncc.compile(model, policy, (x,), strict=True).report()
    assert [s.variant for s in rep.sites] == ["exact", "linear(feature_map='relu')"]
    assert "rule 1" in rep.sites[0].reason and "rule 2" in rep.sites[1].reason


def test_variant_that_does_not_apply_keeps_the_site_exact_with_a_reason():
    model = hf_model("llama", num_key_value_heads=2)
    inputs = text_inputs()
    rep = attncc.compile(model, "neighborhood(kernel=3)", inputs, strict=True).report()
    for site in rep.sites:
        assert site.variant == "exact" and "neighborhood does not apply" in site.reason


def test_swin_shifted_window_masks_run_exactly_by_region():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=112,
                              depths=(2, 2), num_heads=(3, 6), embed_dim=48).eval()
    x = torch.randn(2, 3, 112, 112)
    cm = attncc.compile(model, "exact", (x,), strict=True)
    masks = [s.mask for s in cm.report().sites]
    assert masks == ["bias", "segments+bias"] * 2, masks  # every second block shifts its windows
    assert "segments" in cm.code()
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), **TOL)


@pytest.mark.parametrize("policy, variant, reason", [
    ("local(window=4)", "local(left=4, right=0)", None),                      # narrower: intersected
    ("local(window=64)", "exact", "already narrower"),                        # wider than the model's window
    ("local(window=4, sinks=2)", "exact", "sinks/globals outside the model's own window"),
])
def test_local_on_a_model_with_its_own_window(policy, variant, reason):
    model = hf_model("mistral", num_key_value_heads=2, sliding_window=16)
    inputs = text_inputs(n=64)
    cm = attncc.compile(model, policy, inputs, strict=True)
    for site in cm.report().sites:
        assert site.variant == variant
        assert reason is None or reason in site.reason
    if variant == "exact":
        with torch.no_grad():
            torch.testing.assert_close(valid(hidden(cm(**inputs)), inputs["attention_mask"]),
                                       valid(hidden(model(**inputs)), inputs["attention_mask"]), **TOL)


@pytest.mark.parametrize("batch", [1, 2])
def test_llama_without_attention_mask_packs_documents_and_local_still_applies(batch):
    """transformers 5.x builds document ids from position_ids when traced (packed sequences), and compares
    position ids gathered per batch row for causality: the mask is read as documents + causal; the variant
    runs while every row is one document, and a packed batch runs the model's exact semantics."""
    model = hf_model("llama", "sdpa", num_key_value_heads=2)
    ids = torch.randint(0, 100, (batch, 40), generator=torch.Generator().manual_seed(3))
    window = 8
    cm = attncc.compile(model, f"local(window={window})", {"input_ids": ids, "use_cache": False}, strict=True)
    for site in cm.report().sites:
        assert site.mask == "segments+causal" and site.variant == f"local(window={window})"
        assert "packed with several documents run exact" in site.reason
    i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]
    mask4d = ((j <= i) & (j >= i - window))[None, None]
    with torch.no_grad():
        want = hidden(model(input_ids=ids, attention_mask=mask4d))
        have = hidden(cm(input_ids=ids, use_cache=False))
        torch.testing.assert_close(have, want, **TOL)
        packed = torch.cat([torch.arange(25), torch.arange(15)])[None].expand(batch, -1)
        want = hidden(model(input_ids=ids, position_ids=packed, use_cache=False))
        have = hidden(cm(input_ids=ids, position_ids=packed, use_cache=False))
    torch.testing.assert_close(have, want, **TOL)
