"""The linear variant (feature-map attention, chunked causal scan, sliding-window softmax hybrid) against its
dense oracle, exact attention in its degenerate limit, and its planning contract (validation, supports, cost)."""

from __future__ import annotations

import pytest
import sympy
import torch

from attncc.errors import AttnccError
from attncc.site import AttentionSite
from attncc.variants.base import ScoreMods
from attncc.variants.exact import dense_attention_cost
from attncc.variants.exact import reference as exact_reference
from attncc.variants.linear import LinearSpec, _linear_reference, feature_dim, feature_map
from attncc.variants.parse import parse_variant
from variant_helpers import LargestTensor, random_qkv, rel_rms


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The tensors here are small: with one intra-op thread the many small ops never wait on a descheduled
    second thread (4x faster on a busy 2-core machine). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _qkv(b, hq, hkv, nq, nk, d, dv=None, dtype=torch.float32, seed=0):
    return random_qkv(b, hq, hkv, nq, d, dv, dtype, seed, nk=nk)


def _mods(q, causal=False, mask=None):
    return ScoreMods(scale=ScoreMods.default_scale(q), causal=causal, mask=mask)





def _site(**kw):
    fields = dict(module="m", source="sdpa", q=None, k=None, v=None, output=None, batch=2, q_heads=4, kv_heads=2,
                  q_len=1024, kv_len=1024, head_dim=64, value_dim=64, dtype=torch.float32)
    fields.update(kw)
    return AttentionSite(**fields)


# -- forward against the dense oracle ------------------------------------------------------------------------

SPECS = [
    pytest.param(LinearSpec("elu", chunk=16), id="elu"),
    pytest.param(LinearSpec("relu", chunk=16), id="relu"),
    pytest.param(LinearSpec("taylor", chunk=16), id="taylor"),
    pytest.param(LinearSpec("elu", window=7, chunk=16), id="elu-w7"),
    pytest.param(LinearSpec("taylor", window=20, chunk=16), id="taylor-w20"),
    pytest.param(LinearSpec("relu", window=1, chunk=16), id="relu-w1"),
]
LENGTHS = [pytest.param(n, d, id=f"n{n}-d{d}") for n, d in ((1, 16), (63, 48), (100, 80), (257, 16))]
HEADS = [pytest.param(4, 2, id="gqa2"), pytest.param(4, 1, id="mqa")]
CAUSAL = [pytest.param(False, id="bidir"), pytest.param(True, id="causal")]


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("n,d", LENGTHS)
@pytest.mark.parametrize("spec", SPECS)
def test_forward_matches_reference_fp32(spec, n, d, hq, hkv, causal):
    q, k, v = _qkv(2, hq, hkv, n, n, d)
    mods = _mods(q, causal)
    out = spec.forward(q, k, v, mods)
    assert out.shape == (2, hq, n, d) and out.dtype == torch.float32
    torch.testing.assert_close(out, spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [16, 48, 80], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("fmap", ["elu", "relu", "taylor"])
def test_head_dims_with_distinct_value_dim(fmap, d):
    q, k, v = _qkv(1, 4, 2, 45, 45, d, dv=24)
    for spec in (LinearSpec(fmap, chunk=8), LinearSpec(fmap, window=6, chunk=8)):
        for causal in (False, True):
            mods = _mods(q, causal)
            torch.testing.assert_close(spec.forward(q, k, v, mods), spec.reference(q, k, v, mods),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 5, 30], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("nq,nk", [(37, 100), (100, 37), (1, 63), (63, 1)], ids=lambda x: str(x))
def test_cross_attention_matches_reference(nq, nk, window):
    # Nk > Nq + window puts keys past the last query into the right-of-window scan (its offset o > 0).
    q, k, v = _qkv(2, 4, 2, nq, nk, 16)
    spec = LinearSpec("elu", window=window, chunk=16)
    mods = _mods(q)
    torch.testing.assert_close(spec.forward(q, k, v, mods), spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 64, 1000])
def test_chunk_size_does_not_change_the_result(chunk):
    q, k, v = _qkv(1, 4, 2, 70, 70, 16)
    for window in (0, 9):
        for causal in (False, True):
            base = LinearSpec("elu", window=window, chunk=16).forward(q, k, v, _mods(q, causal))
            out = LinearSpec("elu", window=window, chunk=chunk).forward(q, k, v, _mods(q, causal))
            torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("spec", [LinearSpec("elu", chunk=16), LinearSpec("taylor", window=6, chunk=16),
                                  LinearSpec("relu", window=3, chunk=8)], ids=["elu", "taylor-w6", "relu-w3"])
def test_key_padding_mask(spec, causal):
    q, k, v = _qkv(3, 4, 2, 50, 50, 16)
    mask = torch.rand(3, 1, 1, 50, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[1] = False  # a batch element with every key masked: its rows are zeros
    mask[2, ..., 0] = False  # causal: row 0 of batch 2 sees no key
    mods = _mods(q, causal, mask)
    out = spec.forward(q, k, v, mods)
    torch.testing.assert_close(out, spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)
    assert torch.all(out[1] == 0)
    if causal:
        assert torch.all(out[2, :, 0] == 0)
    # one mask for every batch element, in the shorter shapes SDPA users write
    expected = spec.reference(q, k, v, _mods(q, causal, mask[2:3].expand(3, 1, 1, 50)))
    for other in (mask[2:3], mask[2:3, 0], mask[2, 0, 0]):
        torch.testing.assert_close(spec.forward(q, k, v, _mods(q, causal, other)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", CAUSAL)
def test_rows_whose_window_is_fully_masked_use_only_linear_terms(causal):
    q, k, v = _qkv(1, 4, 2, 40, 40, 16)
    mask = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    mask[..., 10:21] = False  # rows 12..20 see no key inside a 2-key window, only keys outside it
    spec = LinearSpec("elu", window=2, chunk=8)
    mods = _mods(q, causal, mask)
    out = spec.forward(q, k, v, mods)
    torch.testing.assert_close(out, spec.reference(q, k, v, mods), rtol=1e-5, atol=1e-5)
    linear_only = LinearSpec("elu").forward(q, k, v, ScoreMods(scale=1.0, causal=causal, mask=mask))
    if causal:  # keys 0..9 are all outside the window of rows 12..20, as in plain linear attention
        torch.testing.assert_close(out[:, :, 12:21], linear_only[:, :, 12:21], rtol=1e-5, atol=1e-5)


def test_relu_rows_without_overlap_are_zero_and_finite():
    q, k, v = _qkv(1, 2, 2, 20, 20, 16)
    q = -q.abs()  # relu(q) == 0: every phi(q).phi(k) is 0
    q.requires_grad_(True)
    out = LinearSpec("relu").forward(q, k, v, _mods(q, True))
    assert torch.all(out == 0)
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(grad).all()


def test_kv_batch_broadcasts_and_other_ranks_are_rejected():
    q, k, v = _qkv(2, 4, 2, 33, 33, 16)
    spec = LinearSpec("elu", window=4, chunk=8)
    out = spec.forward(q, k[:1], v[:1], _mods(q))
    torch.testing.assert_close(out, spec.forward(q, k[:1].expand_as(k), v[:1].expand_as(v), _mods(q)))
    with pytest.raises(AttnccError, match=r"\[B, H, N, D\]"):
        spec.forward(q[0], k[0], v[0], _mods(q))
    with pytest.raises(AttnccError, match="Hq % Hkv"):
        spec.forward(q[:, :3], k, v, _mods(q))


# -- the degenerate limit --------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("fmap", ["elu", "relu", "taylor"])
@pytest.mark.parametrize("n,window", [(1, 1), (63, 63), (100, 150), (257, 10**6)], ids=lambda x: str(x))
def test_window_covering_everything_is_exact_attention(n, window, fmap, causal):
    q, k, v = _qkv(2, 4, 2, n, n, 48)
    mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
    mask[1, ..., (n + 1) // 2:] = False  # exact attention gives NaN rows where every key is masked
    for m in (None, mask):
        out = LinearSpec(fmap, window=window, chunk=32).forward(q, k, v, _mods(q, causal, m))
        expected = exact_reference(q, k, v, mask=m, scale=ScoreMods.default_scale(q), causal=causal)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_window_covering_everything_is_exact_attention_cross():
    q, k, v = _qkv(1, 4, 1, 30, 90, 16)
    out = LinearSpec("elu", window=90, chunk=16).forward(q, k, v, _mods(q))
    torch.testing.assert_close(out, exact_reference(q, k, v), rtol=1e-5, atol=1e-5)


# -- precision and stability ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,causal", [
    pytest.param(LinearSpec("elu"), True, id="elu-causal"),
    pytest.param(LinearSpec("taylor", chunk=32), False, id="taylor-bidir"),
    pytest.param(LinearSpec("relu", window=16, chunk=32), True, id="relu-w16-causal"),
    pytest.param(LinearSpec("elu", window=16, chunk=32), False, id="elu-w16-bidir"),
])
def test_bf16_relative_rms(spec, causal):
    q, k, v = _qkv(2, 4, 2, 257, 257, 48, dtype=torch.bfloat16)
    out = spec.forward(q, k, v, _mods(q, causal))
    assert out.dtype == torch.bfloat16
    expected = spec.reference(q.float(), k.float(), v.float(), _mods(q, causal))
    assert rel_rms(out, expected) < 2e-2


def test_hybrid_is_stable_when_window_scores_are_far_below_the_linear_terms():
    # Window scores near -250: exp(-m) of the plain formula overflows float32, the shared stabilizer does not.
    g = torch.Generator().manual_seed(3)
    q = 10 + torch.rand(1, 2, 40, 16, generator=g)
    k = -1 - torch.rand(1, 2, 40, 16, generator=g)
    v = torch.randn(1, 2, 40, 16, generator=g)
    for causal in (False, True):
        mods = ScoreMods(scale=1.0, causal=causal)
        out = LinearSpec("elu", window=4, chunk=8).forward(q, k, v, mods)
        expected = _linear_reference(q.double(), k.double(), v.double(), None, "elu", 4, mods)
        assert torch.isfinite(out).all() and torch.isfinite(expected).all()
        assert not torch.isfinite(_linear_reference(q, k, v, None, "elu", 4, mods)).all()
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_taylor_features_give_the_second_order_expansion():
    g = torch.Generator().manual_seed(4)
    x, y = (torch.randn(5, 48, generator=g, dtype=torch.float64) for _ in range(2))
    fx, fy = feature_map(x, "taylor"), feature_map(y, "taylor")
    assert fx.shape[-1] == feature_dim("taylor", 48) == 1 + 48 + 48 * 49 // 2
    s = (x * y).sum(-1)
    torch.testing.assert_close((fx * fy).sum(-1), 1 + s + s * s / 2)


# -- backward -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,causal,nq,nk", [
    pytest.param(LinearSpec("elu", chunk=8), True, 37, 37, id="elu-causal"),
    pytest.param(LinearSpec("relu", chunk=8), False, 29, 37, id="relu-cross"),
    pytest.param(LinearSpec("taylor", chunk=8), True, 37, 37, id="taylor-causal"),
    pytest.param(LinearSpec("elu", window=5, chunk=8), True, 37, 37, id="elu-w5-causal"),
    pytest.param(LinearSpec("taylor", window=5, chunk=8), False, 29, 37, id="taylor-w5-cross"),
])
def test_gradients_match_reference(spec, causal, nq, nk):
    q, k, v = _qkv(2, 4, 2, nq, nk, 16)
    mask = torch.ones(2, 1, 1, nk, dtype=torch.bool)
    mask[0, ..., 3] = False
    mods = _mods(q, causal, mask)
    grad_out = torch.randn(2, 4, nq, 16, generator=torch.Generator().manual_seed(5))
    grads = []
    for fn in (spec.forward, spec.reference):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        grads.append(torch.autograd.grad(fn(*inputs, mods), inputs, grad_out))
    for got, want, name in zip(*grads, "qkv"):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


# -- never quadratic ------------------------------------------------------------------------------------------





@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("spec", [LinearSpec("elu", chunk=16), LinearSpec("taylor", chunk=32),
                                  LinearSpec("elu", window=8, chunk=16)], ids=["elu", "taylor", "elu-w8"])
def test_forward_never_builds_an_n_by_n_tensor(spec, causal):
    n = 2048
    q, k, v = _qkv(1, 1, 1, n, n, 16)
    with LargestTensor() as seen:
        spec.forward(q, k, v, _mods(q, causal, torch.ones(1, 1, 1, n, dtype=torch.bool)))
    assert seen.largest < n * n // 8


# -- the spec: validation, text, supports, cost ------------------------------------------------------------


def test_canonical_text_parses_back():
    for spec in (LinearSpec(), LinearSpec("relu", chunk=32), LinearSpec("taylor", window=64, chunk=128)):
        assert parse_variant(str(spec)) == spec
    assert str(LinearSpec("taylor", window=64)) == "linear(feature_map='taylor', window=64)"
    assert LinearSpec.exact is False


@pytest.mark.parametrize("kwargs,field", [
    pytest.param(dict(feature_map="softmax"), "feature_map", id="unknown-map"),
    pytest.param(dict(feature_map=None), "feature_map", id="map-none"),
    pytest.param(dict(window=-1), "window", id="negative-window"),
    pytest.param(dict(window=2.5), "window", id="float-window"),
    pytest.param(dict(window=True), "window", id="bool-window"),
    pytest.param(dict(chunk=0), "chunk", id="zero-chunk"),
    pytest.param(dict(chunk="64"), "chunk", id="str-chunk"),
])
def test_invalid_parameters_name_the_field(kwargs, field):
    with pytest.raises(AttnccError, match=f"^linear: {field} must be"):
        LinearSpec(**kwargs)
    if field == "feature_map":
        with pytest.raises(AttnccError, match="'elu', 'relu', 'taylor'"):
            LinearSpec(**kwargs)


@pytest.mark.parametrize("mods,match", [
    pytest.param(dict(bias=torch.zeros(1, 1, 8, 8)), "bias", id="bias"),
    pytest.param(dict(softcap=30.0), "softcap", id="softcap"),
    pytest.param(dict(mask=torch.ones(2, 1, 8, 8, dtype=torch.bool)), "key-padding", id="dense-mask"),
    pytest.param(dict(mask=torch.ones(2, 4, 1, 8, dtype=torch.bool)), "key-padding", id="per-head-mask"),
    pytest.param(dict(mask=torch.ones(2, 1, 1, 8)), "bool", id="float-mask"),
])
def test_forward_rejects_unsupported_mods(mods, match):
    q, k, v = _qkv(2, 4, 2, 8, 8, 16)
    with pytest.raises(AttnccError, match=match):
        LinearSpec().forward(q, k, v, ScoreMods(scale=0.25, **mods))


def test_forward_rejects_causal_cross_lengths():
    q, k, v = _qkv(1, 2, 2, 8, 12, 16)
    with pytest.raises(AttnccError, match="Nq == Nk"):
        LinearSpec().forward(q, k, v, ScoreMods(scale=0.25, causal=True))


@pytest.mark.parametrize("site", [
    pytest.param(_site(causal=True), id="self-causal"),
    pytest.param(_site(kind="cross", q_len=77, kv_len=256), id="cross-bidir"),
    pytest.param(_site(mask_residual="padding"), id="key-padding"),
    pytest.param(_site(causal=True, q_len="s0", kv_len="s0"), id="dynamic-causal"),
])
def test_supports_accepts(site):
    ok, reason = LinearSpec(window=16).supports(site)
    assert ok and "linear" in reason


@pytest.mark.parametrize("site,word", [
    pytest.param(_site(dropout_p=0.1), "dropout", id="dropout"),
    pytest.param(_site(softcap=50.0), "softcap", id="softcap"),
    pytest.param(_site(has_bias=True), "bias", id="bias"),
    pytest.param(_site(mask_residual="dense"), "dense", id="dense-mask"),
    pytest.param(_site(band=(128, 0)), "band", id="band"),
    pytest.param(_site(segments=True), "segment", id="segments"),
    pytest.param(_site(causal=True, q_len=1, kv_len=1024), "Nq == Nk", id="causal-decode"),
    pytest.param(_site(causal=True, q_len="s0", kv_len="s1"), "Nq == Nk", id="causal-dynamic-differ"),
])
def test_supports_declines_with_reason(site, word):
    ok, reason = LinearSpec().supports(site)
    assert not ok and word in reason


def test_cost_at_a_concrete_site():
    b, hq, hkv, n, d, c = 2, 4, 2, 1024, 64, 64
    site = _site(causal=True)
    cost = LinearSpec("elu", chunk=c).cost(site)
    # feature maps + building phi(k)^T [v, 1] + reading it per query + the [c, c] intra-chunk products +
    # the running sum of chunk states
    expected = (2 * b * (hq + hkv) * n * d + 2 * b * hkv * n * d * (d + 1) + 2 * b * hq * n * d * (d + 1)
                + 2 * b * hq * n * c * (d + d + 1) + b * hkv * (n // c) * d * (d + 1))
    assert cost["flops"] == expected
    assert cost["bytes"] == dense_attention_cost(site)["bytes"] == 4 * b * (hq + hkv) * n * 2 * d
    bidir = LinearSpec("elu").cost(_site())["flops"]
    assert bidir == 2 * b * (hq + hkv) * n * d + 2 * b * hkv * n * d * (d + 1) + 2 * b * hq * n * d * (d + 1)


@pytest.mark.parametrize("spec,n", [
    pytest.param(LinearSpec("elu"), 4096, id="elu-4k"),
    pytest.param(LinearSpec("relu", window=64), 4096, id="relu-w64-4k"),
    pytest.param(LinearSpec("taylor"), 16384, id="taylor-16k"),
    pytest.param(LinearSpec("taylor", window=64), 16384, id="taylor-w64-16k"),
])
def test_cost_is_below_dense_and_linear_in_n(spec, n):
    for causal in (False, True):
        site = _site(q_len=n, kv_len=n, causal=causal)
        flops = spec.cost(site)["flops"]
        assert flops < dense_attention_cost(site)["flops"]
        doubled = spec.cost(_site(q_len=2 * n, kv_len=2 * n, causal=causal))["flops"]
        assert doubled == pytest.approx(2 * flops, rel=1e-2)


def test_cost_orders_and_symbolic_sizes():
    site = _site(causal=True)
    elu, taylor, hybrid = (LinearSpec(*a).cost(site)["flops"] for a in (("elu",), ("taylor",), ("elu", 64)))
    assert elu < hybrid < taylor
    sym_site = _site(causal=True, q_len="s0", kv_len="s0")
    expr = LinearSpec("elu", window=64).cost(sym_site)["flops"]
    s0 = sympy.Symbol("s0", positive=True)
    assert expr.free_symbols == {s0}
    assert expr.subs(s0, 1024) == hybrid
