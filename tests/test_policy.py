"""Policy: rule grammar, first match wins, files, and errors that name the rule, the field and the choices."""

import json

import pytest

import attncc
from attncc.errors import AttnccError
from attncc.policy import Policy, Rule, as_policy, layer_index
from attncc.site import AttentionSite


def site(module="model.layers.3.self_attn", kind="self", causal=True, **kw):
    return AttentionSite(module=module, source="sdpa", q=None, k=None, v=None, output=None, kind=kind, causal=causal,
                         **kw)


def test_string_policy_applies_to_every_site():
    policy = Policy("local(window=256, sinks=4)")
    decision = policy.decide(site())
    assert decision.variant == "local(window=256, sinks=4)"
    assert decision.min_len == 0
    assert str(policy) == "local(window=256, sinks=4)"
    assert policy.rewrites


def test_none_policy_does_not_rewrite():
    assert not Policy("none").rewrites
    assert as_policy(None) == Policy("exact")


def test_first_matching_rule_wins():
    policy = attncc.Policy([
        attncc.Rule(match="*.layers.0.*", variant="exact"),
        attncc.Rule(kind="cross", variant="none"),
        {"layers": "2-5", "causal": True, "variant": "local(window=64)", "min_len": 128},
        attncc.Rule(variant="topk(density=0.25)"),
    ])
    assert policy.decide(site("model.layers.0.self_attn")).variant == "exact"
    assert policy.decide(site("dec.layers.1.cross", kind="cross")).variant == "none"
    d = policy.decide(site("model.layers.3.self_attn"))
    assert (d.variant, d.min_len) == ("local(window=64)", 128)
    assert "rule 3" in d.reason
    assert policy.decide(site("model.layers.3.self_attn", causal=False)).variant == "topk(density=0.25)"
    assert policy.decide(site("model.layers.9.self_attn")).variant == "topk(density=0.25)"


def test_unmatched_site_runs_exact():
    policy = Policy([Rule(match="encoder.*", variant="local(window=8)")])
    d = policy.decide(site("decoder.layers.0.attn"))
    assert d.variant == "exact" and "no rule matched" in d.reason


def test_layer_index_is_first_integer_of_the_module_path():
    assert layer_index("model.layers.12.self_attn") == 12
    assert layer_index("encoder.block.0.layer.1.SelfAttention") == 0
    assert layer_index("attn") is None
    assert not Rule(layers=0).matches(site("attn"))


@pytest.mark.parametrize("rule, message", [
    ({"variant": "local(window=256)", "kindd": "self"}, "rule 1: unknown field 'kindd'; valid fields are variant, match"),
    ({"variant": "local(window=256)", "kind": "selfish"}, "rule 1: field 'kind' must be one of 'self', 'cross'"),
    ({"variant": "lcoal(window=256)"}, "rule 1: field 'variant': unknown variant 'lcoal': valid variants are exact, local"),
    ({"variant": "local(windw=256)"}, "local: unknown parameter 'windw'; valid parameters are window"),
    ({"variant": "local(window=256)", "layers": "3-1"}, "rule 1: field 'layers' must be an index"),
    ({"variant": "local(window=256)", "min_len": -1}, "rule 1: field 'min_len' must be an integer >= 0"),
    ({"variant": "local(window=256)", "causal": "yes"}, "rule 1: field 'causal' must be true or false"),
    ({"match": "*"}, "rule 1: field 'variant' is required"),
    ({"variant": "local(256)"}, "local: give parameters by name"),
    ({"variant": "local(window=__import__('os'))"}, "local: window must be a literal"),
])
def test_bad_rules_name_rule_field_and_choices(rule, message):
    with pytest.raises(AttnccError) as err:
        Policy([rule, "exact"])
    assert message in str(err.value)


@pytest.mark.parametrize("rules, message", [
    ("local(windw=256)", "valid parameters are window, left, right, sinks, globals"),
    ("local(window=-3)", "local: window must be"),
    ("block_sparse(pattern=nope(x=1))", "valid patterns are bigbird"),
    (["exact", "local(windw=256)"], "rule 2: field 'variant': local: unknown parameter 'windw'"),
], ids=["parameter", "value", "pattern", "rule-parameter"])
def test_parameter_errors_name_only_that_fields_choices(rules, message):
    """'none' is a choice for the variant name only; a wrong parameter must not end in "(or 'none')"."""
    with pytest.raises(AttnccError) as err:
        Policy(rules)
    assert message in str(err.value) and "none" not in str(err.value)


@pytest.mark.parametrize("rules, where", [("fastest", "policy 'fastest'"), (["exact", "fastest"], "rule 2")])
def test_unknown_variant_lists_none_among_the_variants(rules, where):
    with pytest.raises(AttnccError) as err:
        Policy(rules)
    assert str(err.value).startswith(f"{where}")
    assert "unknown variant 'fastest': valid variants are exact, local" in str(err.value)
    assert str(err.value).endswith("or 'none' (detect and report only)")


def test_bad_parameter_value_names_the_field():
    with pytest.raises(AttnccError, match="local: .*window"):
        Policy("local(window=-3)")


def test_yaml_and_json_files(tmp_path):
    yaml_file = tmp_path / "rules.yaml"
    yaml_file.write_text("rules:\n  - match: '*.self_attn'\n    variant: local(window=256, sinks=4)\n    min_len: 2048\n"
                         "  - variant: exact\n")
    policy = as_policy(str(yaml_file))
    assert policy.decide(site()).variant == "local(window=256, sinks=4)"
    assert policy.decide(site()).min_len == 2048
    json_file = tmp_path / "rules.json"
    json_file.write_text(json.dumps([{"kind": "self", "variant": "topk(density=0.125)"}]))
    assert Policy.from_file(json_file).decide(site()).variant == "topk(density=0.125)"


@pytest.mark.parametrize("text, message", [
    ("rules: [", "is not valid YAML"),
    ("- variant: local(window=-1)\n", "policy file .*window"),
    ("42\n", "expected a list of rules"),
])
def test_bad_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(AttnccError, match=message):
        as_policy(str(path))


def test_missing_file():
    with pytest.raises(AttnccError, match="cannot read policy file"):
        as_policy("/nonexistent/rules.yaml")


# ------------------------------------------------------------------------------------------------ per-head rules

def test_per_head_rules_give_the_heads_text():
    policy = Policy([Rule(heads=[0, 1], variant="local(window=8)"), Rule(heads="3", variant="topk(block=16, density=0.5)"),
                     Rule(variant="exact")])
    d = policy.decide(site(q_heads=4, kv_heads=2))
    assert d.variant == ("heads(groups=(('local(window=8)', (0, 1)), ('exact', (2,)), "
                         "('topk(block=16, density=0.5)', (3,))))")
    assert attncc.variants.heads.HeadsSpec.of(["local(window=8)"] * 2 + ["exact", "topk(block=16, density=0.5)"]) \
        == attncc.variants.parse.parse_variant(d.variant)
    assert "heads 0-1 rule 1 (heads 0-1): local(window=8)" in d.reason and "head 2 rule 3" in d.reason
    assert "heads 0-1" in str(policy)


def test_per_head_rules_that_agree_give_the_plain_variant_and_unmatched_heads_run_exact():
    policy = Policy([Rule(heads=[0, 1], variant="local(window=8)"), Rule(heads=[2, 3], variant="local(window=8)")])
    assert policy.decide(site(q_heads=4, kv_heads=4)).variant == "local(window=8)"
    d = Policy([Rule(heads=[0], variant="local(window=8)")]).decide(site(q_heads=2, kv_heads=2))
    assert d.variant == "heads(groups=(('local(window=8)', (0,)), ('exact', (1,))))"
    assert "head 1 no rule matched: exact" in d.reason
    # heads of a rule whose selector does not match the site do not count
    d = Policy([Rule(match="enc.*", heads=[0], variant="local(window=8)")]).decide(site(q_heads=2))
    assert d.variant == "exact"


def test_a_rule_naming_heads_the_site_lacks_is_loud():
    policy = Policy([Rule(heads=[0, 7], variant="local(window=8)")])
    with pytest.warns(UserWarning, match=r"names head 7, which model.layers.3.self_attn does not have \(4 query heads\)"):
        d = policy.decide(site(q_heads=4, kv_heads=4))
    assert d.variant == "heads(groups=(('local(window=8)', (0,)), ('exact', (1, 2, 3))))"
    assert "does not have (4 query heads)" in d.reason


def test_none_for_some_heads_and_a_variant_for_others_is_an_error():
    policy = Policy([Rule(heads=[0], variant="none"), Rule(variant="local(window=8)")])
    with pytest.raises(AttnccError, match=r"leaves some heads alone \('none'\) and rewrites others.*'exact' instead"):
        policy.decide(site(q_heads=2, kv_heads=2))
    policy = Policy([Rule(heads=[0], variant="local(window=8)", min_len=64), Rule(variant="topk(density=0.5)")])
    with pytest.raises(AttnccError, match="different min_len"):
        policy.decide(site(q_heads=2, kv_heads=2))


@pytest.mark.parametrize("heads, message", [
    ([0, 0], "lists head 0 twice"), ([-1], "field 'heads' must be query head indices"),
    ("2-1", "field 'heads' must be"), ([], "field 'heads' must be"), (True, "field 'heads' must be"),
])
def test_bad_heads_name_the_field(heads, message):
    with pytest.raises(AttnccError, match=message):
        Rule(heads=heads, variant="local(window=8)")


def test_a_rule_with_heads_cannot_name_a_per_head_variant():
    with pytest.raises(AttnccError, match="cannot be per-head"):
        Rule(heads=[0], variant="heads(groups=(('local(window=8)', (0,)),))")


def test_heads_in_yaml_and_json_files(tmp_path):
    yaml_file = tmp_path / "rules.yaml"
    yaml_file.write_text("- {heads: '0-1', variant: 'local(window=8)'}\n- {variant: exact}\n")
    json_file = tmp_path / "rules.json"
    json_file.write_text(json.dumps([{"heads": [0, 1], "variant": "local(window=8)"}, {"variant": "exact"}]))
    for path in (yaml_file, json_file):
        policy = as_policy(str(path))
        assert policy.rules[0].heads == (0, 1)
        assert policy.decide(site(q_heads=4, kv_heads=2)).variant == \
            "heads(groups=(('local(window=8)', (0, 1)), ('exact', (2, 3))))"
