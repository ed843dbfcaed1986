"""The calibration plan: its JSON file (round trip, bad files as one clear line), its policy (one rule per named
site, nothing else), the model check (another architecture refused before capture; other weights or dtype
warned about), the report's plan section, and a reload in a fresh process giving identical outputs.

(Named test_plan_file.py: tests/passes/test_plan.py has the basename test_plan.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import attncc
from attncc.calibration.plan import (HeadChoice, Plan, PlanPolicy, escape_glob, model_dtype, model_fingerprint,
                                   per_head_variant, weights_digest)
from attncc.errors import AttnccError, AttnccWarning
from attncc.policy import as_policy
from tiny_attention_model import build

HERE = Path(__file__).parent


def choice(variant: str, error: float = 0.001) -> HeadChoice:
    return HeadChoice(variant, error, 1e-4, 1e6, [
        {"variant": "exact", "error": 0.0, "time_s": 2e-4, "flops": 4e6, "why": "slower than chosen"},
        {"variant": variant, "error": error, "time_s": 1e-4, "flops": 1e6, "why": "chosen"}])


def plan_for(model, sites: dict) -> Plan:
    return Plan(type(model).__name__, model_fingerprint(model), "cosine", 0.01, 64, sites,
                {"calibration": {"mean": 0.002, "worst": 0.004, "texts": 2}}, ["a note"],
                dtype=model_dtype(model), weights=weights_digest(model))


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


def test_save_load_round_trip(tmp_path):
    model, _ = build()
    plan = plan_for(model, {"layers.0": [choice("local(window=8)")] * 4, "layers.1": [choice("exact", 0.0)] * 4})
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan
    text = path.read_text()
    data = json.loads(text)
    assert list(data)[:9] == ["attncc_plan", "model", "fingerprint", "metric", "max_error", "target_len", "sites",
                              "measured", "notes"]
    assert data["attncc_plan"] == 1 and data["model"] == "TinyModel"
    assert data["sites"]["layers.0"][3]["head"] == 3 and data["sites"]["layers.0"][3]["variant"] == "local(window=8)"
    assert '\n  "sites": {' in text  # indented, human-readable
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temp file left


def test_save_never_overwrites_silently(tmp_path):
    model, _ = build()
    path = tmp_path / "plan.json"
    path.write_text("mine")
    plan = plan_for(model, {"layers.0": [choice("exact", 0.0)] * 4})
    with pytest.raises(AttnccError, match="exists"):
        plan.save(path)
    assert path.read_text() == "mine"
    plan.save(path, overwrite=True)
    assert Plan.load(path) == plan


@pytest.mark.parametrize("content, says", [
    (None, "cannot read plan file"),
    ("{not json", "is not valid JSON"),
    ('[{"variant": "exact"}]', "not an attncc plan"),
    ('{"attncc_plan": 2, "model": "M"}', "plan format version 2"),
    ('{"attncc_plan": 1, "model": "M", "fingerprint": "f", "metric": "cosine", "max_error": 0.01}',
     "missing field 'sites'"),
    ('{"attncc_plan": 1, "model": "M", "fingerprint": "f", "metric": "cosine", "max_error": 0.01, '
     '"sites": {"a": [{"head": 0, "variant": "exact", "error": "low", "time_s": 1, "flops": 1}]}}',
     "site 'a' entry 0: field 'error' must be a finite number"),
    ('{"attncc_plan": 1, "model": "M", "fingerprint": "f", "metric": "cosine", "max_error": 0.01, '
     '"sites": {"a": [{"head": 1, "variant": "exact", "error": 0, "time_s": 1, "flops": 1}]}}',
     "heads 0..0 in order"),
])
def test_a_bad_plan_file_is_one_clear_line(tmp_path, content, says):
    path = tmp_path / "plan.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AttnccError) as error:
        Plan.load(path)
    assert says in one_line(error) and str(path) in str(error.value)


def test_a_plan_for_another_model_is_refused_before_capture():
    model, x = build()
    other, _ = build(hidden=64)
    plan = plan_for(other, {"layers.0": [choice("local(window=8)")] * 4})
    with pytest.raises(AttnccError) as error:
        attncc.compile(model, plan, example_inputs=(x,))
    text = one_line(error)
    assert "calibrated for TinyModel" in text and "not this model" in text and plan.fingerprint[:12] in text
    assert "same class, other parameter names or shapes" in text


def test_the_fingerprint_is_the_architecture_not_the_weights():
    model, _ = build(seed=0)
    retrained, _ = build(seed=1)
    assert model_fingerprint(model) == model_fingerprint(retrained)
    assert model_fingerprint(model) == model_fingerprint(build(seed=0)[0].half())
    assert model_fingerprint(model) != model_fingerprint(build(hidden=64)[0])
    plan = plan_for(model, {"layers.0": [choice("local(window=8)")] * 4})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan.check_model(model)
    assert not caught
    with pytest.warns(AttnccWarning, match="calibrated on other weights"):
        plan.check_model(retrained)
    with pytest.warns(AttnccWarning, match="measured with float32 weights; this model has float16"):
        plan.check_model(build()[0].half())


def test_rules_match_only_the_named_module():
    model, _ = build()
    plan = plan_for(model, {"layers.0": [choice("local(window=8)")] * 4, "odd[1]*?": [choice("exact", 0.0)] * 4})
    policy = plan.to_policy()
    assert isinstance(policy, PlanPolicy) and policy.plan is plan
    assert [rule.match for rule in policy.rules] == ["layers.0", "odd[[]1][*][?]"]

    def site(module):
        return SimpleNamespace(module=module, layer=None, kind="self", causal=False)

    assert policy.decide(site("layers.0")).variant == "local(window=8)"
    assert "4 head(s) local(window=8)" in policy.decide(site("layers.0")).reason
    assert policy.decide(site("odd[1]*?")).variant == "exact"
    for other in ("layers.00", "layers.0.inner", "model.layers.0", "layers.1", "odd1xy", "odd[1]ab"):
        decision = policy.decide(site(other))
        assert decision.variant == "exact" and decision.reason.startswith("not in the plan"), other


def test_per_head_variant_text():
    assert per_head_variant(["local(window=8)"] * 3) == "local(window=8)"
    assert per_head_variant(["exact", "exact", "topk(block=16, density=0.25)", "exact"]) == (
        "heads(groups=(('exact', (0, 1, 3)), ('topk(block=16, density=0.25)', (2,))))")
    assert escape_glob("a.b") == "a.b"


def test_a_plan_whose_heads_differ_needs_the_heads_variant():
    model, _ = build()
    plan = plan_for(model, {"layers.0": [choice("exact", 0.0), choice("local(window=8)")] * 2})
    from attncc.variants import variant_classes

    if "heads" in variant_classes():
        assert plan.to_policy().rules[0].variant.startswith("heads(")
    else:  # until the per-head family is registered, the rule cannot be built: an error, never a silent choice
        with pytest.raises(AttnccError, match="unknown variant 'heads'"):
            plan.to_policy()


def test_compiling_from_a_plan_reports_the_plan(tmp_path):
    model, x = build()
    plan = plan_for(model, {"layers.0": [choice("local(window=8)")] * 4})
    path = tmp_path / "plan.json"
    plan.save(path)
    cm = attncc.compile(model, str(path), example_inputs=(x,))
    report = cm.report()
    assert [s.variant for s in report.sites] == ["local(window=8)", "exact"]
    assert report.sites[1].reason.startswith("not in the plan")
    assert report.sites[0].cosine is not None and report.sites[0].cosine < 1  # the approximation, measured
    data = json.loads(json.dumps(report.to_dict()))
    assert data["plan"]["fingerprint"] == plan.fingerprint
    assert [(h["module"], h["head"], h["variant"]) for h in data["plan"]["heads"]] == [
        ("layers.0", h, "local(window=8)") for h in range(4)]
    assert data["plan"]["heads"][0]["considered"][0]["why"] == "slower than chosen"
    assert data["plan"]["measured"]["calibration"]["worst"] == 0.004
    assert data["plan"]["predicted_speedup"] == pytest.approx(2.0)
    text = " ".join(report.render(width=250).split())
    assert "plan for TinyModel: cosine error <= 0.01 at 64 tokens, predicted attention speedup 2.00x" in text
    assert "exact: 0.0e+00, 0.2 ms, slower than chosen; local(window=8): 1.0e-03, 0.1 ms, chosen" in text
    assert "calibration │ 0.002 │ 0.004 │ 2" in text and "held-out │ not measured" in text
    assert "plan note: a note" in text


def test_a_rules_json_file_is_still_a_policy(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text('[{"match": "layers.0", "variant": "local(window=8)"}]')
    policy = as_policy(str(path))
    assert not isinstance(policy, PlanPolicy) and policy.rules[0].variant == "local(window=8)"
    model, _ = build()
    plan = plan_for(model, {"layers.0": [choice("local(window=8)")] * 4})
    assert as_policy(plan).plan is plan


def test_a_reloaded_plan_gives_identical_outputs_in_a_fresh_process(tmp_path):
    model, x = build()
    plan = plan_for(model, {"layers.0": [choice("local(window=8)")] * 4, "layers.1": [choice("local(window=16)")] * 4})
    path = tmp_path / "plan.json"
    plan.save(path)
    here = attncc.compile(model, plan, example_inputs=(x,))(x)
    assert not torch.allclose(here, model(x))  # the plan changed something
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(HERE)!r})
        import attncc
        from attncc.calibration.plan import Plan
        from tiny_attention_model import build
        model, x = build()
        cm = attncc.compile(model, Plan.load({str(path)!r}), example_inputs=(x,))
        torch.save(cm(x), {str(tmp_path / 'out.pt')!r})
        print(sorted(s.variant for s in cm.report().sites))
    """)
    root = str(Path(attncc.__file__).resolve().parent.parent)  # this checkout's attncc, in the new process too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['local(window=16)', 'local(window=8)']"
    assert torch.equal(torch.load(tmp_path / "out.pt"), here)
