"""The vertical-slash variant: the gathered forward against its dense-mask oracle (every ScoreMods field, GQA,
odd lengths, decode), its exact limits, what the selection picks on planted patterns, the pairs it measures,
and its planning contract (validation, text, supports, cost)."""

from __future__ import annotations

import pytest
import sympy
import torch

from attncc.errors import AttnccError
from attncc.site import AttentionSite
from attncc.variants.base import ScoreMods
from attncc.variants.exact import ExactSpec, dense_attention_cost
from attncc.variants.parse import parse_variant
from attncc.variants.vertical_slash import VerticalSlashSpec, estimation_rows, real_query_rows
from variant_helpers import LargestTensor, random_qkv

TIGHT = dict(rtol=1e-5, atol=1e-5)


def _site(**fields):
    base = dict(module="m", source="sdpa", q=None, k=None, v=None, output=None, batch=2, q_heads=4, kv_heads=2,
                q_len=100, kv_len=100, head_dim=16, value_dim=16, dtype=torch.float32)
    base.update(fields)
    return AttentionSite(**base)


def _padding(b: int, n: int, real: list[int]) -> torch.Tensor:
    keep = torch.zeros(b, 1, 1, n, dtype=torch.bool)
    for i, count in enumerate(real):
        keep[i, ..., :count] = True
    return keep


def _mods(kind: str, b: int, hq: int, n: int, nk: int = None, causal: bool = False) -> ScoreMods:
    nk = n if nk is None else nk
    gen = torch.Generator().manual_seed(11)
    fields = {
        "plain": {},
        "padding": {"mask": _padding(b, nk, [nk] + [max(1, nk - nk // 3)] * (b - 1))},
        "softcap": {"softcap": 3.0},
        "sinks": {"sinks": torch.randn(hq, generator=gen)},
        "bias+padding": {"bias": torch.randn(1, hq, n, nk, generator=gen),
                         "mask": _padding(b, nk, [nk] + [max(1, nk // 2)] * (b - 1))},
        "dense mask": {"mask": torch.rand(b, 1, n, nk, generator=gen) > 0.3},
    }[kind]
    return ScoreMods(scale=0.3, causal=causal, **fields)


MOD_KINDS = ["plain", "padding", "softcap", "sinks", "bias+padding", "dense mask"]


@pytest.mark.parametrize("n", [1, 63, 100])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kind", MOD_KINDS)
def test_forward_equals_reference(n, causal, kind):
    q, k, v = random_qkv(2, 4, 2, n, 16, seed=n)  # GQA: 4 query heads on 2 kv heads
    mods = _mods(kind, 2, 4, n, causal=causal)
    specs = [VerticalSlashSpec(vertical=5, slash=7, last_q=8), VerticalSlashSpec(vertical=1, slash=3, last_q=64)]
    for spec in specs if n == 100 else specs[:1]:
        torch.testing.assert_close(spec.forward(q, k, v, mods), spec.reference(q, k, v, mods), **TIGHT)


@pytest.mark.parametrize("nq", [1, 7])
@pytest.mark.parametrize("kind", ["plain", "padding", "sinks"])
def test_decode_queries_are_the_last_tokens(nq, kind):
    """Fewer queries than keys: forward equals the oracle, and the main diagonal is placed at the query's own
    position (the last keys), bottom-right."""
    nk = 40
    q, k, v = random_qkv(2, 4, 2, nq, 16, seed=3, nk=nk)
    mods = _mods(kind, 2, 4, nq, nk=nk)
    spec = VerticalSlashSpec(vertical=3, slash=4, last_q=4)
    torch.testing.assert_close(spec.forward(q, k, v, mods), spec.reference(q, k, v, mods), **TIGHT)
    keep = spec.keep(spec.select(q, k, mods), nq, nk)
    rows = torch.arange(nq)
    assert keep[:, :, rows, nk - nq + rows].all()  # the main diagonal: each query's own position
    assert keep[..., 0].all()  # the sink column


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["plain", "padding", "softcap", "sinks", "bias+padding"])
def test_exact_limits(causal, kind):
    """``vertical >= N`` keeps every column and ``slash >= 2N - 1`` every diagonal: both are exact attention."""
    n = 37
    q, k, v = random_qkv(2, 4, 2, n, 16, seed=5)
    mods = _mods(kind, 2, 4, n, causal=causal)
    want = ExactSpec().reference(q, k, v, mods)
    for spec in (VerticalSlashSpec(vertical=n, slash=1, last_q=2), VerticalSlashSpec(vertical=1, slash=2 * n - 1),
                 VerticalSlashSpec.exact_limit(n)):
        torch.testing.assert_close(spec.forward(q, k, v, mods), want, **TIGHT)


def _planted(n: int, column: int, offset: int):
    """q, k (scale 1) where every query gives key ``column`` and key ``i - offset`` the same large score (8),
    and every other key a small random one: unit random directions in dims 0..15 match a query to the key on
    its diagonal, dim 16 (shared by all queries) to the column."""
    gen = torch.Generator().manual_seed(9)
    r = torch.randn(1, 2, n, 16, generator=gen)
    r = r / r.norm(dim=-1, keepdim=True)
    q = torch.cat([r, torch.ones(1, 2, n, 1), torch.zeros(1, 2, n, 15)], dim=-1)
    k = torch.zeros(1, 2, n, 32)
    positions = torch.arange(n)
    source = positions + offset  # key j sits on the diagonal of query j + offset
    ok = (source >= 0) & (source < n)
    k[:, :, positions[ok], :16] = 8 * r[:, :, source[ok]]
    k[:, :, column] = 0
    k[:, :, column, 16] = 8
    return q, k, torch.randn(1, 2, n, 32, generator=gen)


@pytest.mark.parametrize("causal, offset", [(True, 5), (False, 5), (False, -3)])
def test_selection_finds_a_planted_column_and_diagonal(causal, offset):
    n, column = 96, 41
    q, k, _ = _planted(n, column, offset)
    spec = VerticalSlashSpec(vertical=2, slash=2, last_q=16)
    sel = spec.select(q, k, ScoreMods(scale=1.0, causal=causal))
    assert sel.columns.tolist() == [[[0, column]] * 2]  # the sink and the planted column, per head
    assert sorted(sel.offsets[0, 0].tolist()) == sorted([0, offset])  # the main diagonal and the planted one


def test_gradients_match_the_reference():
    n = 29
    q, k, v = random_qkv(2, 4, 2, n, 8, seed=6)
    weight = torch.randn(2, 4, n, 8)
    gen = torch.Generator().manual_seed(2)
    bias = torch.randn(1, 4, n, n, generator=gen)
    sinks = torch.randn(4, generator=gen)
    spec = VerticalSlashSpec(vertical=4, slash=5, last_q=6)
    grads = []
    for fn in (spec.forward, spec.reference):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias, sinks)]
        mods = ScoreMods(scale=0.35, causal=True, bias=leaves[3], sinks=leaves[4], mask=_padding(2, n, [n, 20]))
        out = fn(*leaves[:3], mods)
        grads.append(torch.autograd.grad((out * weight).sum(), leaves))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_forward_builds_no_n_by_n_tensor():
    """The largest tensor is the gathered diagonal keys and values, ``O(N * slash * (D + Dv))``, or the estimate,
    ``O(last_q * N)``."""
    b, h, n, d = 1, 2, 1024, 8
    q, k, v = random_qkv(b, h, h, n, d, seed=7)
    mods = ScoreMods(scale=0.25, causal=True, mask=_padding(b, n, [900]))
    with torch.no_grad(), LargestTensor() as probe:
        VerticalSlashSpec(vertical=8, slash=8, last_q=32).forward(q, k, v, mods)
    assert probe.largest <= b * h * n * 8 * (d + d) < b * h * n * n // 4, probe.largest


def test_estimation_rows_skip_padding():
    real = torch.tensor([[True] * 10, [True] * 6 + [False] * 4])
    rows, valid = estimation_rows(real, 10, 4, spread=False, device="cpu")
    assert rows.tolist() == [[6, 7, 8, 9], [2, 3, 4, 5]] and valid.all()
    rows, valid = estimation_rows(real, 10, 4, spread=True, device="cpu")
    assert rows[0].tolist() == [1, 4, 6, 9] and rows[1].tolist() == [0, 2, 3, 5] and valid.all()
    rows, valid = estimation_rows(real, 10, 8, spread=False, device="cpu")
    assert valid[1].tolist() == [False, False] + [True] * 6 and rows[1, 2:].tolist() == [0, 1, 2, 3, 4, 5]
    assert real_query_rows(_padding(2, 10, [10, 6]), 3, 10).tolist() == [[True] * 3, [False] * 3]


@pytest.mark.parametrize("causal", [False, True])
def test_measured_pairs_count_visible_selected_pairs_of_real_tokens(causal):
    n = 50
    q, k, v = random_qkv(2, 4, 2, n, 16, seed=8)
    mask = _padding(2, n, [n, 31])
    spec = VerticalSlashSpec(vertical=6, slash=5, last_q=8)
    mods = ScoreMods(scale=0.3, causal=causal, mask=mask)
    keep = spec.keep(spec.select(q, k, mods), n, n) & mask
    if causal:
        keep = keep & torch.ones(n, n, dtype=torch.bool).tril()
    real_rows = mask[:, 0, 0, :][:, None, :, None]
    want = (keep & real_rows).sum(dim=(-2, -1)).float()
    torch.testing.assert_close(spec.measured_pairs(q, k, mods), want)
    assert (want[1] < want[0]).all()  # padding counts nowhere
    unmasked = spec.measured_pairs(q, k, ScoreMods(scale=0.3, causal=causal))
    assert (unmasked <= n * 11).all() and (unmasked > n).all()


@pytest.mark.parametrize("kwargs, field", [
    ({"vertical": 0}, "vertical"), ({"slash": -1}, "slash"), ({"last_q": 0}, "last_q"),
    ({"vertical": 2.5}, "vertical"), ({"slash": True}, "slash"), ({"last_q": "8"}, "last_q"),
])
def test_parameter_errors_name_the_field(kwargs, field):
    with pytest.raises(AttnccError, match=f"vertical_slash: {field} must be an integer >= 1"):
        VerticalSlashSpec(**kwargs)


def test_text_parses_back():
    spec = parse_variant("vertical_slash(vertical=8, slash=4, last_q=16)")
    assert spec == VerticalSlashSpec(vertical=8, slash=4, last_q=16)
    assert str(spec) == "vertical_slash(vertical=8, slash=4, last_q=16)"
    assert parse_variant(str(VerticalSlashSpec())) == VerticalSlashSpec()


@pytest.mark.parametrize("fields, words", [
    ({"kind": "cross"}, "self-attention"),
    ({"q_len": 120}, "at most as many queries"),
    ({"causal": True, "q_len": 10}, "top-left"),
    ({"dropout_p": 0.1}, "dropout"),
    ({"segments": True}, "segment"),
])
def test_supports_declines_with_reasons(fields, words):
    supported, why = VerticalSlashSpec().supports(_site(**fields))
    assert not supported and words in why


def test_supports_causal_bidirectional_decode_and_sinks():
    spec = VerticalSlashSpec(vertical=8, slash=4, last_q=16)
    for fields in ({}, {"causal": True}, {"q_len": 1}, {"softcap": 5.0, "has_bias": True}):
        supported, why = spec.supports(_site(**fields))
        assert supported, why
    assert "8 key columns + 4 diagonals" in spec.supports(_site())[1]
    assert spec.aligns_last_queries()


def test_cost_counts_the_estimate_and_the_selected_pairs():
    spec = VerticalSlashSpec(vertical=64, slash=64, last_q=64)
    site = _site(q_len=4096, kv_len=4096, head_dim=64, value_dim=64, causal=True)
    flops = spec.cost(site)["flops"]
    want = 2 * 2 * 4 * 4096 * 128 * 128 + 2 * 2 * 4 * 64 * 4096 * 64
    assert flops == want and flops < dense_attention_cost(site)["flops"] / 10
    n = sympy.Symbol("n", positive=True)
    dynamic = spec.cost(_site(q_len=n, kv_len=n))["flops"]
    assert dynamic.free_symbols == {n}


@pytest.mark.slow
@pytest.mark.parametrize("model_type, mask, extra", [
    ("bert", "padding", {}),
    ("llama", "causal+padding", {"num_key_value_heads": 2}),
])
def test_applies_to_tiny_hf_models_with_a_measured_error(model_type, mask, extra):
    """A tiny BERT (bidirectional, padded) and a tiny Llama (causal, GQA, padded): every site runs the variant,
    the report shows fewer FLOPs and a measured error (the exact limit is the contract tests' and
    test_exact_limits')."""
    import attncc
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, vocab_size=100, **extra)
    cfg._attn_implementation = "sdpa"
    model = AutoModel.from_config(cfg).eval()
    n = 64
    ids = torch.randint(0, 100, (2, n), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, n, dtype=torch.long)
    am[1, n - 15:] = 0
    inputs = {"input_ids": ids, "attention_mask": am}
    torch._dynamo.reset()
    cm = attncc.compile(model, "vertical_slash(vertical=8, slash=8, last_q=16)", inputs, strict=True)
    report = cm.report()
    assert len(report.sites) == 2
    for site in report.sites:
        assert site.variant == "vertical_slash(vertical=8, slash=8, last_q=16)" and site.mask == mask
        assert site.flops_after < site.flops_before / 2
        # random weights attend almost uniformly, which 16 of 64 keys approximate poorly (local(window=15,
        # sinks=1) measured 1.02 / 0.71 on its first site at 96 tokens): the error is measured, not small
        assert site.rel_l2 is not None and 0 < site.rel_l2 < 2 and site.cosine > 0.5
    with torch.no_grad():
        assert torch.isfinite(cm(**inputs).last_hidden_state).all()


def test_the_attention_op_runs_it_and_sends_causal_decode_calls_to_the_fallback():
    import attncc

    q, k, v = random_qkv(1, 4, 2, 5, 16, nk=12, seed=8)
    text = "vertical_slash(vertical=3, slash=3, last_q=2)"
    spec = parse_variant(text)
    got = attncc.attention(q, k, v, variant=text)
    torch.testing.assert_close(got, spec.reference(q, k, v, ScoreMods(scale=16 ** -0.5)), **TIGHT)
    got = attncc.attention(q, k, v, variant=text, causal=True)  # SDPA's top-left is_causal: exact
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(got, want, **TIGHT)
