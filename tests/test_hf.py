"""attncc.hf: attn_implementation="attncc" for transformers models, checked against the original model and against
the capture path (attncc.compile) under the same policy. Tiny configs, random weights, no hub."""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attncc  # noqa: E402
import attncc.hf  # noqa: E402
from attncc.hf.mask import MaskStructure, read_mask_function, structured_mask  # noqa: E402
from transformers import (  # noqa: E402
    AttentionInterface, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, BartConfig, BertConfig, DynamicCache, Gemma2Config, GptOssConfig,
    LlamaConfig, MistralConfig,
)
from transformers import masking_utils as mu  # noqa: E402

VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def llama_config(**extra):
    # GQA: 4 query heads share 2 key/value heads
    return LlamaConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=256, **extra)


def mistral_config():
    return MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=8, max_position_embeddings=256)


def gemma2_config():
    # layer 0 slides over 8 keys, layer 1 is global; logits softcapping on every layer
    return Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=8, sliding_window=8, max_position_embeddings=256)


def bert_config():
    return BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128)


def pair(config, auto=AutoModelForCausalLM, original="sdpa"):
    """(original model, the same weights with attn_implementation='attncc'); each gets its own config copy
    (transformers writes the implementation into the config object it is given)."""
    if not attncc.hf.is_registered():
        attncc.hf.register("exact")  # from_config checks that the implementation exists
    torch.manual_seed(0)
    ref = auto.from_config(copy.deepcopy(config), attn_implementation=original).eval()
    model = auto.from_config(copy.deepcopy(config), attn_implementation="attncc").eval()
    model.load_state_dict(ref.state_dict())
    return ref, model


def inputs(batch=2, n=32, pad=5):
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, n))
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[-1, :pad] = 0  # left padding on the last row
    return {"input_ids": ids, "attention_mask": mask}


def out(model, batch):
    with torch.no_grad():
        result = model(**batch)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def valid(x, batch):
    """Rows of real tokens only: a padded query's output is not defined the same way by every implementation."""
    return x[batch["attention_mask"].bool()]


def assert_close(a, b, tol=1e-5):
    err = ((a - b).norm() / b.norm()).item()
    assert err <= tol, f"rel. error {err:.3g} > {tol}"


@pytest.fixture(autouse=True)
def clean_registration():
    attncc.hf.unregister()
    yield
    attncc.hf.unregister()


# -- registration -------------------------------------------------------------------------------------------------


def test_register_is_idempotent_reversible_and_leaves_sdpa_and_eager_alone():
    sdpa, eager = AttentionInterface._global_mapping["sdpa"], mu.AttentionMaskInterface._global_mapping["eager"]
    assert "attncc" not in AttentionInterface._global_mapping
    attncc.hf.register("exact")
    attncc.hf.register("exact")
    assert AttentionInterface._global_mapping["attncc"] is attncc.hf.attncc_attention
    assert mu.AttentionMaskInterface._global_mapping["attncc"] is attncc.hf.structured_mask
    assert AttentionInterface._global_mapping["sdpa"] is sdpa
    assert mu.AttentionMaskInterface._global_mapping["eager"] is eager
    attncc.hf.unregister()
    attncc.hf.unregister()
    assert "attncc" not in AttentionInterface._global_mapping
    assert "attncc" not in mu.AttentionMaskInterface._global_mapping
    with attncc.hf.registered("local(window=8)"):
        assert attncc.hf.is_registered()
    assert not attncc.hf.is_registered() and "attncc" not in AttentionInterface._global_mapping


def test_sdpa_model_outputs_unchanged_while_registered():
    ref, _ = pair(llama_config())
    attncc.hf.unregister()
    batch = inputs()
    before = out(ref, batch)
    with attncc.hf.registered("local(window=4)"):
        assert torch.equal(out(ref, batch), before)


def test_bad_policy_is_one_error_at_register_time():
    with pytest.raises(attncc.AttnccError, match=r"unknown variant 'lokal'") as err:
        attncc.hf.register("lokal(window=8)")
    assert "\n" not in str(err.value)
    assert not attncc.hf.is_registered()


def test_unregistered_model_call_fails_loudly():
    attncc.hf.register("exact")
    _, model = pair(llama_config())
    attncc.hf.unregister()
    with pytest.raises(KeyError, match="attncc"):
        out(model, inputs())


# -- the mask interface hands over structure ---------------------------------------------------------------------


def test_mask_functions_read_as_structure():
    assert read_mask_function(mu.causal_mask_function) == (True, None)
    assert read_mask_function(mu.bidirectional_mask_function) == (False, None)
    assert read_mask_function(mu.sliding_window_causal_mask_function(8)) == (True, (7, 0))
    assert read_mask_function(mu.sliding_window_bidirectional_mask_function(3)) == (False, (3, 3))
    packed = mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(torch.zeros(1, 4, dtype=int)))
    assert read_mask_function(packed) is None
    assert read_mask_function(mu.or_masks(mu.causal_mask_function, mu.bidirectional_mask_function)) is None


def test_structured_mask_is_padding_not_n_by_n():
    pad = torch.tensor([[True] * 6, [False] * 3 + [True] * 3])
    s = structured_mask(batch_size=2, q_length=1, kv_length=4, q_offset=5, kv_offset=2,
                        mask_function=mu.sliding_window_causal_mask_function(4), attention_mask=pad)
    assert isinstance(s, MaskStructure) and s.dense is None
    assert (s.causal, s.band, s.q_offset, s.kv_offset) == (True, (3, 0), 5, 2)
    assert s.padding.shape == (2, 4) and s.padding.tolist() == [[True] * 4, [False, True, True, True]]


def test_unreadable_mask_function_is_carried_dense_with_its_reason():
    fn = mu.or_masks(mu.causal_mask_function, lambda b, h, q, kv: kv == 0)
    s = structured_mask(batch_size=1, q_length=4, kv_length=4, mask_function=fn)
    expected = mu.sdpa_mask(batch_size=1, q_length=4, kv_length=4, mask_function=fn, allow_is_causal_skip=False)
    assert torch.equal(s.dense, expected) and "not causal" in s.describe()


# -- same results as the original and as the capture path ----------------------------------------------------------


def assert_matches_capture_path(ref, model, policy):
    """``model`` (attn_implementation='attncc' under ``policy``) gives ``attncc.compile(ref, policy)``'s outputs on a
    padded batch, and under exact also the original's."""
    batch = inputs()
    attncc.hf.register(policy)
    got = out(model, batch)
    captured = out(attncc.compile(ref, policy, example_inputs=batch), batch)
    assert_close(valid(got, batch), valid(captured, batch))
    if policy == "exact":
        assert_close(valid(got, batch), valid(out(ref, batch), batch))


@pytest.mark.parametrize("policy", ["exact", "local(window=8)"])
def test_llama_gqa_equals_capture_path(policy):
    ref, model = pair(llama_config())
    assert_matches_capture_path(ref, model, policy)
    rep = attncc.hf.report(model)
    assert [m.module for m in rep.modules] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(dict(m.runs) == {policy: 1} for m in rep.modules)
    assert all(m.masks == ["causal+padding"] for m in rep.modules)


@pytest.mark.parametrize("policy", ["exact", "local(window=8)"])
def test_bert_with_padding_equals_capture_path(policy):
    ref, model = pair(bert_config(), auto=AutoModel)
    assert_matches_capture_path(ref, model, policy)
    rep = attncc.hf.report(model)
    assert len(rep.modules) == 2 and all(m.masks == ["padding"] and dict(m.runs) == {policy: 1} for m in rep.modules)


@pytest.mark.parametrize("config", [mistral_config, gemma2_config], ids=["mistral", "gemma2"])
@pytest.mark.parametrize("policy", ["exact", "local(window=4)"])
def test_model_sliding_window_equals_capture_path(config, policy):
    # eager: Gemma 2's logit softcapping is not supported by sdpa; the capture path compiles the same model
    ref, model = pair(config(), original="eager")
    assert_matches_capture_path(ref, model, policy)
    first = attncc.hf.report(model).modules[0]
    assert first.masks == ["causal+window 8+padding"]
    assert list(first.runs) == (["local(left=7, right=0)"] if policy == "exact" else ["local(left=4, right=0)"])


def test_policy_rules_select_modules_by_layer_and_name():
    policy = attncc.Policy([attncc.Rule(layers="1", variant="local(window=4)"),
                            attncc.Rule(match="*.self_attn", variant="exact")])
    ref, model = pair(llama_config())
    batch = inputs()
    attncc.hf.register(policy)
    got = out(model, batch)
    assert_close(valid(got, batch), valid(out(attncc.compile(ref, policy, example_inputs=batch), batch), batch))
    runs = {m.module: dict(m.runs) for m in attncc.hf.report(model).modules}
    assert runs == {"model.layers.0.self_attn": {"exact": 1}, "model.layers.1.self_attn": {"local(window=4)": 1}}


def test_from_pretrained_with_attn_implementation(tmp_path):
    ref, _ = pair(llama_config())
    ref.save_pretrained(tmp_path)
    attncc.hf.register("exact")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="attncc").eval()
    batch = inputs()
    assert model.config._attn_implementation == "attncc"
    assert_close(valid(out(model, batch), batch), valid(out(ref, batch), batch))


def test_caller_4d_float_mask_is_carried_and_said():
    ref, model = pair(llama_config())
    n = 16
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (1, n))
    bias = torch.randn(1, 1, n, n).tril()  # arbitrary additive mask
    bias = bias.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    attncc.hf.register("exact")
    with pytest.warns(attncc.AttnccWarning, match="4-D torch.float32 attention mask"):
        got = out(model, {"input_ids": ids, "attention_mask": bias})
    assert_close(got, out(ref, {"input_ids": ids, "attention_mask": bias}))
    assert any("4-D" in note for note in attncc.hf.report(model).modules[0].notes)


def gpt_oss_config():
    # learned sink logits (s_aux) on every layer, a sliding window on every other one
    return GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                        num_experts_per_tok=1, sliding_window=8, max_position_embeddings=256)


def test_learned_sinks_and_softcap_are_carried_exactly():
    for config in (gpt_oss_config, gemma2_config):
        ref, model = pair(config(), original="eager")
        batch = inputs()
        with warnings.catch_warnings():
            warnings.simplefilter("error", attncc.AttnccWarning)  # nothing left out
            got = out(model, batch)
        assert_close(valid(got, batch), valid(out(ref, batch), batch))


@pytest.mark.parametrize("config", [llama_config, mistral_config], ids=["llama", "mistral"])
def test_chunked_prefill_with_cache_equals_one_pass(config):
    """Queries fewer than keys, several of them (8 new tokens after 12 cached): causality and the window are
    aligned at the cache's end."""
    _, model = pair(config())
    attncc.hf.register("exact")
    torch.manual_seed(5)
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        cache = DynamicCache(config=model.config)
        first = model(input_ids=ids[:, :12], past_key_values=cache, use_cache=True).logits
        second = model(input_ids=ids[:, 12:], past_key_values=cache, use_cache=True).logits
    assert_close(torch.cat([first, second], dim=1), whole)
    assert any("[8, 20] mask" in mask or "[8, 15] mask" in mask for mask in attncc.hf.report(model).modules[0].masks)


def test_training_gradients_equal_original():
    ref, model = pair(llama_config())
    attncc.hf.register("exact")
    batch = inputs()
    grads = []
    for m in (ref, model):
        m.train()
        m.zero_grad()
        m(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert_close(grads[1], grads[0])


# -- generate() with the dynamic KV cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [llama_config, mistral_config, gemma2_config], ids=["llama", "mistral", "gemma2"])
def test_generate_exact_tokens_equal_original(config):
    ref, model = pair(config(), original="eager")
    attncc.hf.register("exact")
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        got = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert torch.equal(got, expected)
    runs = attncc.hf.report(model).modules[0].runs
    assert sum(runs.values()) == 32  # one prefill and 31 decode steps, every one through the op


@pytest.mark.parametrize("config", [llama_config, gemma2_config], ids=["llama", "gemma2"])
def test_generate_exact_static_cache_equals_original(config):
    # generate builds a static cache's masks in advance (a dict per layer type for Gemma 2) and hands them back
    ref, model = pair(config(), original="eager")
    attncc.hf.register("exact")
    ids = inputs(batch=1, n=10)["input_ids"]
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kwargs), ref.generate(ids, **kwargs))


def test_generate_exact_left_padded_batch_equals_original():
    ref, model = pair(llama_config())
    attncc.hf.register("exact")
    batch = inputs(n=10, pad=4)
    with torch.no_grad():
        expected = ref.generate(**batch, max_new_tokens=16, do_sample=False)
        got = model.generate(**batch, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, expected)


def test_generate_local_equals_recomputing_without_cache():
    """Decode under local(window=8, sinks=2) (Nq=1 against the cache, bottom-right) gives the tokens of recomputing
    the whole sequence at every step (Nq == Nk, no cache) under the same policy, with the dynamic cache and with
    the bounded cache that keeps only the sinks and the window."""
    from attncc.kv_cache import SinkWindowCache

    ref, model = pair(llama_config())
    attncc.hf.register("local(window=8, sinks=2)")
    torch.manual_seed(4)
    ids = torch.randint(0, VOCAB, (1, 12))
    expected = ids
    with torch.no_grad():
        for _ in range(16):
            logits = model(input_ids=expected, use_cache=False).logits
            expected = torch.cat([expected, logits[:, -1:].argmax(-1)], dim=1)
        got = model.generate(ids, max_new_tokens=16, do_sample=False)
        bounded = model.generate(ids, max_new_tokens=16, do_sample=False, cache=SinkWindowCache(window=8, sinks=2))
        original = ref.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, expected)
    assert torch.equal(bounded, expected)
    assert not torch.equal(original, expected), "the window must cut something, or this test proves nothing"


def test_report_and_warning_for_policy_none():
    _, model = pair(llama_config())
    attncc.hf.register("none")
    batch = inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out(model, batch)
        out(model, batch)
    said = [w for w in caught if issubclass(w.category, attncc.AttnccWarning)]
    assert len(said) == 2  # once per module, not once per call
    assert "policy says 'none'" in str(attncc.hf.report(model))


def test_training_dropout_is_applied_and_keeps_the_site_exact():
    """Attention dropout in training reaches the op (outputs change); local does not apply dropout, so the plan
    keeps the module exact and says why."""
    _, model = pair(llama_config(attention_dropout=0.3))
    attncc.hf.register("local(window=4)")
    batch = inputs()
    with torch.no_grad():
        evaluated = out(model, batch)
        model.train()
        torch.manual_seed(6)
        trained = out(model, batch)
    assert not torch.allclose(trained, evaluated)
    first = attncc.hf.report(model).modules[0]
    assert dict(first.runs) == {"local(window=4)": 1, "exact": 1}
    assert any("does not apply dropout" in reason for reason in first.reasons)


def test_unknown_argument_is_warned_once_and_reported():
    attncc.hf.register("exact")
    module = torch.nn.Module()  # a standalone module: no enclosing model names it
    q = torch.randn(1, 2, 4, 8)
    with pytest.warns(attncc.AttnccWarning, match="'cu_seq_lens_q' is not an attention argument"):
        got, weights = attncc.hf.attncc_attention(module, q, q, q, None, cu_seq_lens_q=torch.tensor([0, 4]))
    assert weights is None and got.shape == (1, 4, 2, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2)
    assert_close(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error", attncc.AttnccWarning)
        attncc.hf.attncc_attention(module, q, q, q, None, cu_seq_lens_q=torch.tensor([0, 4]))


def test_report_is_json():
    import json

    _, model = pair(llama_config())
    out(model, inputs())
    data = json.loads(json.dumps(attncc.hf.report(model).to_dict()))
    assert data["modules"][0] == {"module": "model.layers.0.self_attn", "layer": 0, "runs": {"exact": 1},
                                  "reasons": ["policy: exact"], "masks": ["causal+padding"], "notes": []}


def test_encoder_decoder_cross_attention_is_exact_and_said():
    """BART: one module class serves self- and cross-attention; cross calls (queries from the decoder, keys from
    the encoder) are planned as cross-attention, which local does not take."""
    config = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64)
    ref, model = pair(config, auto=AutoModelForSeq2SeqLM)
    batch = dict(inputs(n=16), decoder_input_ids=inputs(n=8)["input_ids"])
    for policy in ("exact", "local(window=4)"):
        attncc.hf.register(policy)
        got = out(model, batch)[:1]  # the unpadded row
        if policy == "exact":
            assert_close(got, out(ref, batch)[:1])
    cross = {m.module: m for m in attncc.hf.report(model).modules}["model.decoder.layers.0.encoder_attn"]
    assert dict(cross.runs) == {"exact": 2} and "padding" in cross.masks
    assert any("cross-attention" in reason for reason in cross.reasons)


def test_no_mask_takes_causality_and_sliding_window_from_the_arguments():
    """A model that builds no mask: causal from is_causal, the window from sliding_window (as flash attention
    takes it); one query after the keys (decode) sees the window's last keys."""
    attncc.hf.register("exact")
    module = torch.nn.Module()
    torch.manual_seed(7)
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    keep = torch.ones(6, 6, dtype=torch.bool).tril() & ~torch.ones(6, 6, dtype=torch.bool).tril(-3)  # window 3
    got, _ = attncc.hf.attncc_attention(module, q, k, v, None, is_causal=True, sliding_window=3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2)
    assert_close(got, expected)
    got, _ = attncc.hf.attncc_attention(module, q[:, :, -1:], k, v, None, is_causal=True, sliding_window=3)
    assert_close(got, expected[:, -1:])


def test_compile_refuses_a_model_loaded_with_attncc():
    _, model = pair(llama_config())
    with pytest.raises(attncc.AttnccError, match="attn_implementation='attncc'"):
        attncc.compile(model, "exact")
