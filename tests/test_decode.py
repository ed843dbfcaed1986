"""generate() through a CompiledModule (the capture path) with transformers' dynamic KV cache, under each policy.

Tiny decoders from configs with random weights. ``exact`` must give the original model's greedy tokens; ``local``
the tokens of the original model run with the equivalent window+sinks mask (a custom attention function
registered with transformers, below); the bounded ``SinkWindowCache`` the tokens of the unbounded cache; and no
generate may capture more than three times (prefill, first decode step, the step Dynamo makes dynamic).
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attncc  # noqa: E402
from attncc.errors import AttnccError, AttnccWarning  # noqa: E402
from attncc.kv_cache import SinkWindowCache  # noqa: E402

PROMPT = 24
WINDOW, SINKS = 8, 2
LOCAL = f"local(window={WINDOW}, sinks={SINKS})"


def _tiny(family: str, attn: str = "sdpa", **extra):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, attn_implementation=attn, **extra)
    torch.manual_seed(0)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()


def _prompt() -> torch.Tensor:
    return torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))


def _generate(model, new: int, prompt: int = PROMPT, **kwargs) -> torch.Tensor:
    return model.generate(_prompt()[:, :prompt], max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)


def window_sinks_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The reference for ``local(window=WINDOW, sinks=SINKS)``: plain softmax attention where the query at
    position p (the last queries of the keys: bottom-right) sees keys ``p - WINDOW .. p`` and the first SINKS."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    nq, nk = query.shape[2], key.shape[2]
    p = torch.arange(nk - nq, nk)[:, None]
    j = torch.arange(nk)[None, :]
    keep = (j <= p) & ((j >= p - WINDOW) | (j < SINKS))
    scores = (query @ key.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    out = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1) @ value
    return out.transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register("attncc_test_window_sinks", window_sinks_attention)


def _window_reference(family: str, model) -> torch.nn.Module:
    reference = _tiny(family, attn="attncc_test_window_sinks")
    reference.load_state_dict(model.state_dict())
    return reference


@pytest.mark.parametrize("family,new", [("llama", 64), ("qwen2", 16)])
def test_exact_generate_gives_the_original_tokens(family, new):
    model = _tiny(family)
    cm = attncc.compile(model, "exact")
    got = _generate(cm, new)
    assert torch.equal(got, _generate(model, new))
    assert 1 <= cm.capture_count <= 3
    decode = [s for s in cm.report().sites if s.q_len == 1]
    assert decode and all(s.variant == "exact" for s in decode)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_local_generate_gives_the_window_reference_tokens(attn):
    model = _tiny("llama", attn=attn)
    cm = attncc.compile(model, LOCAL)
    new = 64 if attn == "sdpa" else 12  # eager: the mask is a tensor every step (a residual the variant gathers)
    got = _generate(cm, new)
    assert torch.equal(got, _generate(_window_reference("llama", model), new))
    assert not torch.equal(got, _generate(model, new))  # the window really cuts: a test that can fail
    assert cm.capture_count <= 3
    decode = [s for s in cm.report().sites if s.q_len == 1]
    assert decode and all(s.variant == LOCAL for s in decode)


def test_local_generate_from_a_prompt_shorter_than_the_window():
    """The decode graphs are captured while the cache is shorter than the window (the band reaches every key)
    and reused, dynamic in the cache length, after it grows past it."""
    model = _tiny("llama")
    cm = attncc.compile(model, LOCAL)
    got = _generate(cm, 16, prompt=4)
    assert torch.equal(got, _generate(_window_reference("llama", model), 16, prompt=4))
    assert cm.capture_count <= 3


def test_bounded_cache_gives_the_unbounded_tokens_and_stays_bounded():
    """Eviction is exact for the local policy: the tokens of the window reference (the unbounded run gives
    those too, test_local_generate_gives_the_window_reference_tokens)."""
    model = _tiny("llama")
    unbounded = _generate(_window_reference("llama", model), 64)
    cm = attncc.compile(model, LOCAL)
    cache = SinkWindowCache(window=WINDOW, sinks=SINKS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.24 prefers cache= to past_key_values=
        got = _generate(cm, 64, past_key_values=cache)
    assert torch.equal(got, unbounded)
    assert cache.get_seq_length() == PROMPT + 63  # positions keep counting (the last token is not fed back)
    assert all(layer.keys.shape[-2] == SINKS + WINDOW for layer in cache.layers)
    assert cm.capture_count <= 3


def test_bounded_cache_layer_keeps_sinks_and_window():
    cache = SinkWindowCache(window=3, sinks=2)
    rows = torch.arange(10.0).view(1, 1, 10, 1)
    keys, _ = cache.update(rows[:, :, :4], rows[:, :, :4], 0)
    assert keys.flatten().tolist() == [0, 1, 2, 3]
    keys, _ = cache.update(rows[:, :, 4:6], rows[:, :, 4:6], 0)
    assert keys.flatten().tolist() == [0, 1, 2, 3, 4, 5]  # every key this call's queries may see
    assert cache.layers[0].keys.flatten().tolist() == [0, 1, 3, 4, 5]  # sinks + the last 3
    assert cache.get_seq_length() == 6
    assert cache.get_mask_sizes(1, 0) == (6, 1)
    with pytest.raises(AttnccError, match="window"):
        SinkWindowCache(window=0)


@pytest.mark.parametrize("policy", ["linear(window=4)"])  # plain linear: test_decode_alignment
def test_decode_step_equals_recomputing_the_whole_sequence(policy):
    """Each decode step (one query against the KV cache) gives the logits of running the policy over the whole
    sequence again (a causal prefill) at that position: linear continues its state (computed from the cache),
    local attends the same window and sinks."""
    model = _tiny("llama")
    cached, recomputed = attncc.compile(model, policy), attncc.compile(model, policy, measure_error=False)
    ids = torch.cat([_prompt(), torch.randint(0, 128, (1, 2), generator=torch.Generator().manual_seed(2))], 1)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        cached(ids[:, :PROMPT], past_key_values=cache)
        for t in range(PROMPT, ids.shape[1]):
            step = cached(ids[:, t:t + 1], past_key_values=cache).logits[0, -1]
            whole = recomputed(ids[:, :t + 1]).logits[0, -1]
            torch.testing.assert_close(step, whole, rtol=1e-5, atol=1e-5)
    assert cached.capture_count <= 3
    decode = [s for s in cached.report().sites if s.q_len == 1]
    assert decode and all(s.variant.startswith(policy.split("(")[0]) for s in decode), cached.report()


def test_topk_generate_selects_blocks_of_the_cache():
    """topk in decode: the query row picks key blocks of the cache (its own, the sink block, the best others);
    measured, not exact: its error against exact attention is in the report."""
    model = _tiny("llama")
    cm = attncc.compile(model, "topk(block=4, k=2)")
    _generate(cm, 6)
    assert cm.capture_count <= 3
    decode = [s for s in cm.report().sites if s.q_len == 1]
    assert decode and all(s.variant == "topk(block=4, k=2, decode=True)" and s.rel_l2 is not None and s.rel_l2 > 0
                          for s in decode)


@pytest.mark.parametrize("policy", ["block_sparse(pattern=radial(window=2), block=16)"])
def test_variants_without_decode_run_exact_and_say_so(policy):
    model = _tiny("llama")
    cm = attncc.compile(model, policy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _generate(cm, 4)
    assert torch.equal(got, _generate(model, 4))
    decode = [s for s in cm.report().sites if s.q_len == 1]
    assert decode and all(s.variant == "exact" and "does not apply" in s.reason for s in decode)
    assert any(issubclass(w.category, AttnccWarning) and "decode site" in str(w.message) for w in caught)


@pytest.mark.parametrize("policy", ["exact", LOCAL])
def test_chunked_prefill_gives_the_full_sequence_logits(policy):
    """A second prompt chunk against the cache (Nq < Nk with transformers' explicit bottom-right causal mask,
    which mask analysis keeps as a tensor) gives the logits of the whole sequence at those positions: the
    original model's for exact, the window reference's for local."""
    model = _tiny("llama")
    reference = model if policy == "exact" else _window_reference("llama", model)
    cm = attncc.compile(model, policy)
    ids = _prompt()
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        cm(ids[:, :16], past_key_values=cache)
        chunk = cm(ids[:, 16:], past_key_values=cache).logits
        whole = reference(ids).logits[:, 16:]
    torch.testing.assert_close(chunk, whole, rtol=1e-5, atol=1e-5)
    chunk_sites = [s for s in cm.report().sites if s.q_len != s.kv_len]
    assert chunk_sites and all(s.variant == policy for s in chunk_sites)
