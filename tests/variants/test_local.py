"""The local variant (sliding window, sinks, global tokens): the banded forward against its dense oracle, the
window >= N limit against exact attention, every ScoreMods field, gradients, no N x N tensor, and its planning
contract (validation, canonical text, supports, cost)."""

from __future__ import annotations

import ast

import pytest
import sympy
import torch

from attncc.errors import AttnccError
from attncc.site import AttentionSite
from attncc.variants.base import ScoreMods
from attncc.variants.exact import dense_attention_cost
from attncc.variants.exact import reference as exact_reference
from attncc.variants import local as local_module
from attncc.variants.local import LocalSpec, local_attention
from attncc.variants.parse import parse_variant
from variant_helpers import LargestTensor, assert_gradients_match, random_qkv





def _site(**fields):
    base = dict(module="m", source="sdpa", q=None, k=None, v=None, output=None, batch=2, q_heads=8, kv_heads=8,
                q_len=1024, kv_len=1024, head_dim=64, value_dim=64, dtype=torch.float32)
    base.update(fields)
    return AttentionSite(**base)


SPECS = {
    "window5": LocalSpec(window=5),
    "left20-right3-sinks2": LocalSpec(left=20, right=3, sinks=2),
    "window16-globals3": LocalSpec(window=16, globals=3),
    "left70-sinks4-globals2": LocalSpec(left=70, right=0, sinks=4, globals=2),
}


# -- forward against the oracle ----------------------------------------------------------------------------


@pytest.mark.parametrize("n,d", [(1, 16), (63, 48), (100, 80), (257, 16)], ids=lambda x: str(x))
@pytest.mark.parametrize("heads", [(4, 2), (4, 1)], ids=lambda h: f"hq{h[0]}-hkv{h[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("spec_id", list(SPECS))
def test_forward_matches_reference(n, d, heads, causal, spec_id):
    spec = SPECS[spec_id]
    q, k, v = random_qkv(2, heads[0], heads[1], n, d, dv=d + 8)
    mods = ScoreMods(scale=d ** -0.5, causal=causal)
    out = spec.forward(q, k, v, mods)
    assert out.shape == (2, heads[0], n, d + 8) and out.dtype == torch.float32
    torch.testing.assert_close(out, spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


def test_reference_pattern_is_the_documented_one():
    spec = LocalSpec(left=2, right=1, sinks=1, globals=2)
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    keep = spec.keep(i, j, causal=False)
    expected = ((j >= i - 2) & (j <= i + 1)) | (j < 2) | (i < 2)
    assert torch.equal(keep, expected)
    # window=W is symmetric on bidirectional calls and left-only on causal ones
    assert LocalSpec(window=4).bounds(False) == (4, 4) and LocalSpec(window=4).bounds(True) == (4, 0)


@pytest.mark.parametrize("mask_kind", ["padding", "dense"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_forward_applies_every_mod(mask_kind, causal):
    b, hq, hkv, n = 2, 4, 2, 100
    q, k, v = random_qkv(b, hq, hkv, n, 16)
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(b, 1, 1, n, generator=gen) > 0.3 if mask_kind == "padding" else \
        torch.rand(b, hq, n, n, generator=gen) > 0.2
    bias = torch.randn(b, hq, n, n, generator=gen)
    spec = LocalSpec(window=9, sinks=3, globals=2)
    mods = ScoreMods(scale=0.3, causal=causal, softcap=2.5, bias=bias, mask=mask)
    torch.testing.assert_close(spec.forward(q, k, v, mods), spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


def test_rows_without_visible_keys_are_zero():
    q, k, v = random_qkv(1, 2, 2, 40, 16)
    mask = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    mask[..., 20:30] = False  # with a window of 2, queries 22..27 see only masked keys
    out = LocalSpec(window=2).forward(q, k, v, ScoreMods(scale=0.25, mask=mask))
    assert torch.count_nonzero(out[:, :, 22:28]) == 0
    assert torch.count_nonzero(out[:, :, 28]) > 0


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("spec", [LocalSpec(window=257), LocalSpec(left=300, right=400, sinks=3)],
                         ids=["window-n", "left-right-beyond-n"])
def test_window_covering_the_sequence_is_exact(causal, spec):
    q, k, v = random_qkv(1, 4, 2, 257, 48)
    out = spec.forward(q, k, v, ScoreMods(scale=0.2, causal=causal))
    torch.testing.assert_close(out, exact_reference(q, k, v, scale=0.2, causal=causal), rtol=1e-5, atol=1e-5)


def test_causal_band_reaching_back_to_zero_is_exact():
    q, k, v = random_qkv(1, 2, 2, 100, 16)
    out = LocalSpec(left=99, right=0).forward(q, k, v, ScoreMods(scale=0.25, causal=True))
    torch.testing.assert_close(out, exact_reference(q, k, v, scale=0.25, causal=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [1, 7, 64])
def test_block_size_does_not_change_the_result(block):
    q, k, v = random_qkv(1, 4, 2, 100, 16)
    mods = ScoreMods(scale=0.25, causal=False)
    out = local_attention(q, k, v, mods, left=11, right=4, prefix=3, globals_=1, block=block)
    expected = LocalSpec(left=11, right=4, sinks=3, globals=1).reference(q, k, v, mods)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_chunking_does_not_change_the_result(monkeypatch, grad):
    q, k, v = random_qkv(2, 4, 2, 257, 16)
    spec = LocalSpec(window=20, sinks=3, globals=1)
    mods = ScoreMods(scale=0.25, causal=True, mask=torch.rand(2, 1, 1, 257) > 0.2)
    monkeypatch.setattr(local_module, "CHUNK_FLOATS", 1)  # one query block per chunk
    with torch.set_grad_enabled(grad):
        out = spec.forward(q.requires_grad_(grad), k, v, mods)
    torch.testing.assert_close(out, spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_bf16_relative_rms(causal):
    q, k, v = random_qkv(1, 4, 2, 257, 80, dtype=torch.bfloat16)
    spec = LocalSpec(window=32, sinks=4)
    mods = ScoreMods(scale=80 ** -0.5, causal=causal)
    out = spec.forward(q, k, v, mods)
    assert out.dtype == torch.bfloat16
    ref = spec.reference(q.float(), k.float(), v.float(), mods)
    err = (out.float() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
    assert err < 2e-2


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_match_the_reference(causal):
    q, k, v = random_qkv(1, 4, 2, 37, 16)
    bias = torch.randn(1, 4, 37, 37)
    weight = torch.randn(1, 4, 37, 16, generator=torch.Generator().manual_seed(5))
    assert_gradients_match(LocalSpec(window=4, sinks=2, globals=1), q, k, v, bias, weight, scale=0.25,
                           causal=causal, softcap=3.0)





@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_never_builds_an_n_by_n_tensor(causal):
    n = 2048
    q, k, v = random_qkv(1, 1, 1, n, 16)
    mods = ScoreMods(scale=0.25, causal=causal, mask=torch.ones(1, 1, 1, n, dtype=torch.bool))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # run_tasks then stays on this thread, where the (thread-local) mode sees every op
    try:
        with LargestTensor() as probe:
            LocalSpec(window=32, sinks=4, globals=2).forward(q, k, v, mods)
    finally:
        torch.set_num_threads(threads)
    assert probe.largest < n * n / 8


# -- planning contract -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    (dict(window=4, left=2), "window"),
    (dict(), "window"),
    (dict(left=3), "right"),
    (dict(right=3), "left"),
    (dict(window=-1), "window"),
    (dict(window=True), "window"),
    (dict(window=2.5), "window"),
    (dict(window=8, sinks=-2), "sinks"),
    (dict(window=8, globals="1"), "globals"),
], ids=["window-and-left", "nothing", "left-only", "right-only", "negative", "bool", "float", "sinks", "globals"])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(AttnccError, match=rf"^local: {field}"):
        LocalSpec(**kwargs)


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_canonical_text_round_trips(spec):
    text = str(spec)
    assert text.startswith("local(") and "None" not in text
    assert parse_variant(text) == spec
    call = ast.parse(text, mode="eval").body
    assert LocalSpec(**{kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}) == spec


def test_intersect_band():
    assert LocalSpec(window=100, sinks=4).intersect_band(31, 0, causal=True) == LocalSpec(left=31, right=0)
    assert LocalSpec(left=8, right=50).intersect_band(31, 31) == LocalSpec(left=8, right=31)
    with pytest.raises(AttnccError, match="sinks/globals"):
        LocalSpec(window=8, sinks=4).intersect_band(31, 0, causal=True)


def test_supports():
    spec = LocalSpec(window=128)
    assert spec.supports(_site())[0]
    assert spec.supports(_site(causal=True, has_bias=True, softcap=30.0, mask_residual="dense"))[0]
    assert spec.supports(_site(q_len="s0", kv_len="s0"))[0]
    assert spec.supports(_site(band=(255, 0), causal=True))[0]
    for site, why in [
        (_site(kind="cross"), "cross"),
        (_site(kv_len=77), "as many queries as keys"),
        (_site(dropout_p=0.1), "dropout"),
        (_site(segments=True), "segment"),
    ]:
        ok, reason = spec.supports(site)
        assert not ok and why in reason


@pytest.mark.parametrize("spec,causal", [
    (LocalSpec(window=128), False), (LocalSpec(window=128), True),
    (LocalSpec(left=100, right=3, sinks=4, globals=2), False), (LocalSpec(left=100, right=0, sinks=4), True),
], ids=["window-bidir", "window-causal", "all-bidir", "sinks-causal"])
def test_cost_counts_the_visible_pairs(spec, causal):
    n = 300
    site = _site(q_len=n, kv_len=n, causal=causal)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    keep = spec.keep(i, j, causal) & ((j <= i) if causal else True)
    assert spec.pairs(site) == int(keep.sum())
    cost = spec.cost(site)
    assert cost["flops"] == 2 * 2 * 8 * int(keep.sum()) * 128
    assert cost["bytes"] == dense_attention_cost(site)["bytes"]


def test_cost_below_dense_and_symbolic():
    spec = LocalSpec(window=256)
    site = _site(q_len=8192, kv_len=8192)
    assert spec.cost(site)["flops"] < dense_attention_cost(site)["flops"] / 10
    dynamic = spec.cost(_site(q_len="s0", kv_len="s0"))["flops"]
    s0 = sympy.Symbol("s0", positive=True)
    assert dynamic.free_symbols == {s0}
    assert dynamic.subs(s0, 8192) == spec.cost(site)["flops"]


def test_forward_rejects_cross_shapes():
    # more queries than keys (fewer queries than keys are a decode call: tests/variants/test_decode_alignment.py)
    q, _, _ = random_qkv(1, 2, 2, 12, 16)
    k, v = torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    with pytest.raises(AttnccError, match="as many queries as keys"):
        LocalSpec(window=3).forward(q, k, v, ScoreMods(scale=0.25))
