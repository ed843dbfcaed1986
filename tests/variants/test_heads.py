"""Per-head variants (``heads(groups=...)``): each group's spec on its heads equals running that spec on each head
by itself (GQA with whole and split kv groups, per-head bias/mask/sinks), the text round-trips, errors name the
field, the cost is the groups' sum, planning and the Triton route, and a real Llama compiled with per-head rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import sympy
import torch

import attncc
from attncc.errors import AttnccError
from attncc.passes.plan import plan_site
from attncc.policy import Policy, Rule
from attncc.runtime.call import AttentionCall
from attncc.runtime.dispatch import run_attention
from attncc.site import AttentionSite
from attncc.variants import registered_variant
from attncc.variants.base import ScoreMods
from attncc.variants.exact import ExactSpec
from attncc.variants.heads import HeadsSpec, compact_variant_text, head_mods
from attncc.variants.parse import parse_variant
from variant_helpers import random_qkv

B, N, D = 2, 21, 8
TIGHT = dict(rtol=1e-5, atol=1e-6)
SPLIT = HeadsSpec(groups=(("local(window=3, sinks=1)", (1, 2)), ("topk(block=4, density=0.5)", (5,))))
"""6 query heads over 3 kv heads: heads 1 and 2 split kv heads 0 and 1, head 5 is half of kv head 2, the rest exact."""
WHOLE = HeadsSpec(groups=(("topk(block=4, k=2)", (2, 3)), ("local(window=4)", (0, 1))))
"""6 query heads over 3 kv heads: each group is the two query heads of one kv head (kv heads 1 and 0)."""
SPLIT_4 = HeadsSpec(groups=(("local(window=3, sinks=1)", (1, 2)), ("topk(block=4, k=2)", (3,))))
"""4 query heads over 2 kv heads, heads 0 exact."""


def per_head_loop(spec: HeadsSpec, q, k, v, mods: ScoreMods, run=lambda s, *a: s.forward(*a)):
    """What ``spec`` must equal: each query head by itself, with the plain spec its group names (exact for the
    unlisted heads), its own kv head and its own slices of bias, mask and sinks."""
    hq, g = q.shape[1], q.shape[1] // k.shape[1]
    plain = {h: parse_variant(text) for text, heads in spec.groups for h in heads}
    outs = []
    for h in range(hq):
        one = head_mods(mods, [h], hq)
        kv = slice(h // g, h // g + 1)
        outs.append(run(plain.get(h, ExactSpec()), q[:, h:h + 1], k[:, kv], v[:, kv], one))
    return torch.cat(outs, dim=1)


def padding(batch=B, n=N) -> torch.Tensor:
    keep = torch.ones(batch, 1, 1, n, dtype=torch.bool)
    keep[1, ..., -5:] = False
    return keep


def mods_cases(hq: int) -> dict[str, ScoreMods]:
    gen = torch.Generator().manual_seed(5)
    dense = torch.rand(B, hq, N, N, generator=gen) > 0.3
    dense[..., 0] = True
    return {
        "plain": ScoreMods(scale=D ** -0.5),
        "causal+padding": ScoreMods(scale=D ** -0.5, causal=True, mask=padding()),
        "per-head bias": ScoreMods(scale=D ** -0.5, bias=torch.randn(1, hq, N, N, generator=gen), mask=padding()),
        "per-head mask": ScoreMods(scale=D ** -0.5, mask=dense),
        "sinks+softcap": ScoreMods(scale=D ** -0.5, causal=True, softcap=4.0, sinks=torch.randn(hq, generator=gen)),
    }


@pytest.mark.parametrize("spec", [SPLIT, WHOLE], ids=["split kv groups", "whole kv groups"])
@pytest.mark.parametrize("case", list(mods_cases(6)))
def test_forward_equals_the_plain_specs_head_by_head(spec, case):
    q, k, v = random_qkv(B, 6, 3, N, D, seed=3)
    mods = mods_cases(6)[case]
    torch.testing.assert_close(spec.forward(q, k, v, mods), per_head_loop(spec, q, k, v, mods), **TIGHT)
    torch.testing.assert_close(spec.reference(q, k, v, mods),
                               per_head_loop(spec, q, k, v, mods, lambda s, *a: s.reference(*a)), **TIGHT)


def test_decode_calls_place_each_groups_queries_as_its_spec_does():
    """Fewer queries than keys (a decode step against a KV cache): each head as its plain spec would."""
    spec = HeadsSpec(groups=(("local(window=3, sinks=1)", (0, 3)), ("topk(block=4, k=2, decode=True)", (1,))))
    q, _, _ = random_qkv(B, 4, 2, 2, D, seed=8)
    _, k, v = random_qkv(B, 4, 2, N, D, seed=9)
    mods = ScoreMods(scale=D ** -0.5, mask=padding(), sinks=torch.randn(4))
    assert spec.aligns_last_queries()
    torch.testing.assert_close(spec.forward(q, k, v, mods), per_head_loop(spec, q, k, v, mods), **TIGHT)


def test_the_op_runs_heads_with_gradients_and_under_fake_tensors():
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 4, 2, N, D, seed=10))
    bias = torch.randn(1, 4, N, N, requires_grad=True)
    sinks = torch.randn(4, requires_grad=True)
    text = str(SPLIT_4)
    leaves = (q, k, v, bias, sinks)
    got = torch.autograd.grad(attncc.attention(q, k, v, variant=text, causal=True, bias=bias, sinks=sinks)
                              .square().sum(), leaves)
    mods = ScoreMods(scale=D ** -0.5, causal=True, bias=bias, sinks=sinks)
    want = torch.autograd.grad(per_head_loop(SPLIT_4, q, k, v, mods, lambda s, *a: s.reference(*a)).square().sum(),
                               leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    from torch._subclasses.fake_tensor import FakeTensorMode

    plain = [t.detach() for t in (q, k, v)]
    with FakeTensorMode() as mode:
        fake = torch.ops.attncc.attention.default(*(mode.from_tensor(t) for t in plain), scale=0.25, variant=text)
    assert fake.shape == q.shape


def test_whole_kv_groups_get_only_their_kv_heads_as_views_and_split_ones_one_kv_head_per_query_head():
    q, k, v = random_qkv(B, 6, 3, N, D, seed=1)
    seen = {}

    def record(spec, q_g, k_g, v_g, mods_g):
        seen[str(spec)] = (q_g.shape[1], k_g.shape[1], k_g.data_ptr(), k_g.is_contiguous())
        return spec.forward(q_g, k_g, v_g, mods_g)

    WHOLE.run_groups(q, k, v, ScoreMods(scale=1.0), record)
    assert seen["topk(block=4, k=2)"] == (2, 1, k[:, 1].data_ptr(), False)   # kv head 1, a view
    assert seen["local(window=4)"] == (2, 1, k[:, 0].data_ptr(), False)      # kv head 0, a view
    assert seen["exact"][:2] == (2, 1) and seen["exact"][2] == k[:, 2].data_ptr()
    seen.clear()
    SPLIT.run_groups(q, k, v, ScoreMods(scale=1.0), record)
    assert seen["local(window=3, sinks=1)"][:2] == (2, 2)   # heads 1, 2 read kv heads 0, 1: one each, gathered
    assert seen["topk(block=4, density=0.5)"][:2] == (1, 1)
    assert seen["exact"][:2] == (3, 3)                       # heads 0, 3, 4


def test_every_group_exact_is_exact_and_of_gives_the_plain_spec():
    q, k, v = random_qkv(B, 4, 2, N, D, seed=2)
    mods = ScoreMods(scale=D ** -0.5, causal=True, mask=padding())
    spec = HeadsSpec(groups=(("local(window=30)", (0, 3)), ("topk(block=4, density=1.0)", (1,))))
    torch.testing.assert_close(spec.forward(q, k, v, mods), ExactSpec().reference(q, k, v, mods), **TIGHT)
    assert HeadsSpec.of(["exact"] * 4) == ExactSpec()
    assert HeadsSpec.of(["local(window=8, sinks=0)", "local(window=8)"]) == parse_variant("local(window=8)")
    mixed = HeadsSpec.of(["topk(density=0.5)", "exact", "topk(density=0.5, block=64)", "local(window=2)"])
    assert str(mixed) == ("heads(groups=(('topk(density=0.5)', (0, 2)), ('exact', (1,)), "
                          "('local(window=2)', (3,))))")


def test_text_round_trips_and_is_canonical():
    text = "heads(groups=(('exact', (0, 1)), ('topk(block=16, density=0.25)', (2, 3))))"
    spec = parse_variant(text)
    assert isinstance(spec, HeadsSpec) and str(spec) == text and parse_variant(str(spec)) == spec
    messy = HeadsSpec(groups=[["topk(density=0.25, block=16)", [3, 2]], ("exact", 1), ("exact", (0,))])
    assert messy == spec and str(messy) == text
    for example in (SPLIT, WHOLE, *HeadsSpec.examples()):
        assert parse_variant(str(example)) == example
    assert compact_variant_text(text) == "heads: 0-1 exact, 2-3 topk(block=16, density=0.25)"
    assert compact_variant_text("local(window=8)") == "local(window=8)"


@pytest.mark.parametrize("groups, message", [
    ((("exact", (0, 1)), ("local(window=2)", (1,))), r"groups\[1\].*head 1 is listed twice"),
    ((("exact", (-1,)),), r"groups\[0\].*head indices must be integers >= 0, got -1"),
    ((("heads(groups=(('exact', (0,)),))", (1,)),), "nested heads"),
    ((("nope(x=1)", (0,)),), "unknown variant 'nope'"),
    ((("local(window=-3)", (0,)),), "local: window must be an integer >= 0"),
    ((("exact", ()),), "non-empty tuple of query head indices"),
    ((), "groups must be a non-empty tuple"),
    ("exact", "groups must be a non-empty tuple"),
])
def test_bad_groups_name_the_field(groups, message):
    with pytest.raises(AttnccError, match=message):
        HeadsSpec(groups=groups)


def test_a_head_past_the_calls_heads_is_an_error_naming_the_count():
    q, k, v = random_qkv(1, 4, 2, N, D)
    spec = HeadsSpec(groups=(("local(window=2)", (1, 4)),))
    with pytest.raises(AttnccError, match=r"head 4 does not exist: this call has 4 query heads"):
        spec.forward(q, k, v, ScoreMods(scale=1.0))
    assert spec.supports(site())[1] == "head 4 does not exist: the site has 4 query heads"


def site(**facts) -> AttentionSite:
    facts = {"batch": B, "q_heads": 4, "kv_heads": 2, "q_len": 512, "kv_len": 512, "head_dim": 64,
             "value_dim": 64, "scale": 0.125, "causal": True, "dtype": torch.float16, **facts}
    return AttentionSite(module="layers.0.attn", source="sdpa", q=None, k=None, v=None, output=None, **facts)


def test_cost_is_the_sum_of_the_groups_costs():
    spec = HeadsSpec(groups=(("local(window=16)", (0, 1)), ("topk(block=16, density=0.25)", (3,))))
    s = site()
    want = {key: parse_variant("local(window=16)").cost(s.replace(q_heads=2, kv_heads=1))[key]
            + parse_variant("topk(block=16, density=0.25)").cost(s.replace(q_heads=1, kv_heads=1))[key]
            + ExactSpec().cost(s.replace(q_heads=1, kv_heads=1))[key] for key in ("flops", "bytes")}
    got = spec.cost(s)
    assert sympy.simplify(got["flops"] - want["flops"]) == 0 and sympy.simplify(got["bytes"] - want["bytes"]) == 0
    assert got["flops"] < ExactSpec().cost(s)["flops"]


def test_supports_and_specialize_name_the_group_and_fill_in_the_site():
    spec = HeadsSpec(groups=(("local(window=8)", (2, 3)),))
    supported, why = spec.supports(site(kind="cross", causal=False))
    assert not supported and why.startswith("heads 2-3 (local(window=8)): local attention needs self-attention")
    assert spec.supports(site())[0] and "heads 2-3: sliding window of 8 keys left" in spec.supports(site())[1]
    assert not spec.supports(site(dropout_p=0.1))[0]
    assert not spec.supports(site(layout="(bh)nd"))[0]
    # a model band: the unlisted heads run the band (exact), topk declines it with the group named
    banded = site(band=(63, 0))
    assert str(spec.specialize(banded)) == \
        "heads(groups=(('local(left=63, right=0)', (0, 1)), ('local(left=8, right=0)', (2, 3))))"
    declined = HeadsSpec(groups=(("topk(block=16, density=0.5)", (1,)),)).specialize(banded)
    assert isinstance(declined, str) and declined.startswith("head 1 (topk(block=16, density=0.5)): ")
    # a window wider than the model's band: every head runs the band, the plain spec
    assert str(HeadsSpec(groups=(("local(window=100)", (0,)),)).specialize(banded)) == "local(left=63, right=0)"


def test_the_plan_runs_per_head_rules_and_keeps_a_site_exact_where_a_group_declines():
    policy = Policy([Rule(heads=[0, 1], variant="local(window=8)"), Rule(heads=[3], variant="topk(block=16, k=4)")])
    planned = plan_site(site(), policy)
    assert planned.variant == ("heads(groups=(('local(window=8)', (0, 1)), ('exact', (2,)), "
                               "('topk(block=16, k=4)', (3,))))")
    assert isinstance(planned.spec, HeadsSpec) and "per head: heads 0-1 rule 1" in planned.reason
    kept = plan_site(site(band=(63, 0)), policy)
    assert kept.variant == "exact" and kept.declined == "heads"
    assert "heads does not apply (head 3 (topk(block=16, k=4)): " in kept.reason


def test_a_per_head_spec_whose_heads_all_run_exact_is_planned_as_exact():
    planned = plan_site(site(), Policy("heads(groups=(('exact', (0, 2)),))"))
    assert planned.variant == "exact" and planned.spec == ExactSpec() and "every head runs exact" in planned.reason
    banded = plan_site(site(band=(15, 0)), Policy("heads(groups=(('local(window=100)', (1,)),))"))
    assert banded.variant == "exact" and str(banded.spec) == "local(left=15, right=0)"
    assert "already narrower" in banded.reason


@dataclass(frozen=True)
class CountingSpec(ExactSpec):
    """Exact attention that says it scores ``pairs`` pairs per head (a stand-in for a data-dependent variant)."""

    name: ClassVar[str] = "counting"
    exact: ClassVar[bool] = False
    pairs: int = 7

    def measured_pairs(self, q, k, mods):
        return torch.full((q.shape[0], q.shape[1]), float(self.pairs))


def test_measured_pairs_are_per_head():
    q, k, v = random_qkv(B, 4, 2, N, D)
    mods = ScoreMods(scale=1.0, causal=True, mask=padding())
    with registered_variant(CountingSpec):
        got = HeadsSpec(groups=(("counting(pairs=5)", (1, 2)),)).measured_pairs(q, k, mods)
    real = padding().reshape(B, N).float()
    exact = (real.cumsum(-1) * real).sum(-1)           # causal pairs among real tokens, per batch row
    want = torch.stack([exact, torch.full((B,), 5.0), torch.full((B,), 5.0), exact], dim=1)
    torch.testing.assert_close(got, want)
    if getattr(parse_variant("local(window=2)"), "measured_pairs", None) is None:  # local's cost() stands
        assert HeadsSpec(groups=(("local(window=2)", (1,)),)).measured_pairs(q, k, mods) is None


def test_triton_route_runs_each_groups_kernel_and_equals_the_torch_path(monkeypatch):
    pytest.importorskip("triton")
    import attncc.runtime.triton_backend as backend

    ran = []
    original = backend.triton_attention

    def spy(spec, *args):
        out = original(spec, *args)
        ran.append((str(spec), out is not None))
        return out

    monkeypatch.setattr(backend, "triton_attention", spy)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device) for t in random_qkv(1, 4, 2, 32, 16, seed=6))
    mask = torch.ones(1, 1, 1, 32, dtype=torch.bool, device=device)
    mask[..., -3:] = False
    text = "heads(groups=(('local(window=5)', (1, 2)), ('topk(block=16, k=1)', (3,))))"
    call = AttentionCall(q, k, v, mask=mask, scale=0.25, causal=True, variant=text,
                         sinks=torch.randn(4, device=device))
    monkeypatch.setenv("ATTNCC_BACKEND", "triton")
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    got = run_attention(call)
    assert sorted(ran) == [("exact", True), ("local(window=5)", True), ("topk(block=16, k=1)", True)]
    monkeypatch.setenv("ATTNCC_BACKEND", "torch")
    torch.testing.assert_close(got, run_attention(call), rtol=1e-4, atol=1e-5)


def test_report_table_renders_per_head_variants_compactly():
    from attncc.report import Report, SiteReport

    text = "heads(groups=(('local(window=8)', (0, 1)), ('exact', (2, 3))))"
    row = SiteReport(index=0, module="layers.0.attn", kind="self", causal=True, mask="causal", q_heads=4, kv_heads=2,
                     q_len=48, kv_len=48, head_dim=16, value_dim=16, variant=text, reason="per head")
    report = Report(sites=[row], frontend="dynamo", graphs=1, policy="p")
    assert "heads: 0-1 local(window=8), 2-3 exact" in report.render(width=250)
    assert report.to_dict()["sites"][0]["variant"] == text


# ------------------------------------------------------------------------------------------------ a real model

def llama(attn: str = "sdpa"):
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    cfg._attn_implementation = attn
    return AutoModel.from_config(cfg).eval()


@pytest.mark.slow
def test_llama_with_per_head_rules_equals_the_model_with_per_head_masks():
    """Heads 0-1 (kv head 0) run local(window=8), heads 2-3 exact: the model run with that per-head 4-D mask."""
    n, window = 48, 8
    ids = torch.randint(0, 100, (2, n), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, n, dtype=torch.long)
    am[1, -9:] = 0
    policy = attncc.Policy([attncc.Rule(heads=[0, 1], variant=f"local(window={window})"),
                            attncc.Rule(variant="exact")])
    cm = attncc.compile(llama(), policy, {"input_ids": ids, "attention_mask": am}, strict=True)
    text = f"heads(groups=(('local(window={window})', (0, 1)), ('exact', (2, 3))))"
    report = cm.report()
    assert [s.variant for s in report.sites] == [text]
    assert all(0 < s.rel_l2 and s.flops_after < s.flops_before for s in report.sites)
    rendered = report.render(width=250)
    assert f"heads: 0-1 local(window={window}), 2-3 exact" in rendered
    assert "per head: heads 0-1 rule 1 (heads 0-1): local(window=8); heads 2-3 rule 2 (every site): exact" in rendered
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    local, causal = (j <= i) & (j >= i - window), j <= i
    mask = torch.stack([local, local, causal, causal])[None] & am.bool()[:, None, None, :]   # [B, H, N, N]
    with torch.no_grad():
        want = llama()(input_ids=ids, attention_mask=mask).last_hidden_state
        have = cm(input_ids=ids, attention_mask=am).last_hidden_state
    real = am.bool()
    torch.testing.assert_close(have[real], want[real], rtol=1e-5, atol=1e-5)
