"""attncc.auto / calibrate on real model code: per-head choices within a measured end-to-end budget."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

import attncc
from attncc.calibration.auto import Calibrator, auto, default_menu, run_calibration
from attncc.errors import AttnccError

pytestmark = pytest.mark.slow

MENU = ("local(window=4, sinks=1)", "topk(block=8, density=0.5)", "topk(block=8, density=0.25)")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_bert():
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("bert", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, vocab_size=100)
    return AutoModel.from_config(cfg).eval()


def batch(seed: int, n: int = 48, b: int = 2, pad: int = 7):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, n - pad:] = 0
    return {"input_ids": torch.randint(0, 100, (b, n), generator=gen), "attention_mask": mask}


@pytest.fixture(scope="module")
def calibrator():
    torch._dynamo.reset()
    return Calibrator(tiny_bert(), auto(max_error=0.05, cost="flops", menu=MENU), [batch(1), batch(2)])


def test_a_generous_budget_approximates_heads_and_its_measured_error_stays_within(calibrator):
    result = calibrator.run(0.05)
    chosen = [option.text for option in result.allocation.chosen.values()]
    assert len(chosen) == 2 * 4 and set(chosen) - {"exact"}, chosen
    measured = result.measured["calibration"]
    assert measured["mean"] <= 0.75 * 0.05 and measured["samples"] == 4
    assert measured["flops_saving"] > 1.0
    assert all(value > 0 for value in result.sensitivity.values())
    assert all(stats.projected for stats in result.stats.values())


def test_a_tighter_budget_never_runs_fewer_flops(calibrator):
    loose, tight = calibrator.run(0.05), calibrator.run(0.005)
    assert tight.measured["calibration"]["mean"] <= 0.75 * 0.005
    assert tight.measured["calibration"]["flops_saving"] <= loose.measured["calibration"]["flops_saving"] + 1e-9


def test_a_budget_nothing_fits_keeps_every_head_exact_and_says_so(calibrator):
    result = calibrator.run(1e-12)
    assert {option.text for option in result.allocation.chosen.values()} == {"exact"}
    assert result.notes and "exact" in result.notes[-1]


def test_calibration_restores_the_models_training_mode():
    model = tiny_bert().train()
    run_calibration(model, auto(max_error=0.05, cost="flops", menu=MENU[:1]), [batch(1)], progress=False)
    assert model.training


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_error=0), "max_error must be a number > 0"),
    (dict(metric="mse"), "metric must be one of"),
    (dict(cost="speed"), "cost must be one of time, flops"),
    (dict(menu=["local(window=-1)"]), "menu entry"),
    (dict(target_len=-3), "target_len must be a positive integer"),
])
def test_auto_refuses_bad_settings_with_one_clear_line(kwargs, message):
    with pytest.raises(AttnccError, match=message):
        auto(**kwargs)


def test_calibrate_refuses_empty_data():
    with pytest.raises(AttnccError, match="data must be a non-empty list"):
        run_calibration(tiny_bert(), auto(), [])


def test_the_default_menu_fits_the_length():
    short, long = default_menu(48), default_menu(4096)
    assert all("window=128" not in text for text in short)
    assert any(text.startswith("topk(block=8") for text in long) and "linear" in long


def test_where_every_candidate_is_slower_than_exact_every_site_stays_exact_and_the_plan_says_so(monkeypatch):
    import timm

    from attncc.calibration.timing import TimeModel

    def slower_than_exact(self, text, shape, heads):  # what a CPU says of every variant at ViT lengths
        return 1.0 if text == "exact" else 1.5

    monkeypatch.setattr(TimeModel, "per_head_seconds", slower_than_exact)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=1).eval()
    plan = attncc.calibrate(vit, attncc.auto(max_error=0.5, menu=["local(window=4)", "topk(block=8, density=0.5)"]),
                            data=[torch.randn(2, 3, 32, 32)], progress=False)
    choices = [choice for heads in plan.sites.values() for choice in heads]
    assert choices and {choice.variant for choice in choices} == {"exact"}
    assert any("slower than exact" in note for note in plan.notes), plan.notes
    assert all(c["why"] == "slower than exact" for choice in choices for c in choice.considered
               if c["variant"] != "exact" and c["error"] is not None)
    report = attncc.compile(vit, plan, torch.randn(1, 3, 32, 32)).report()
    assert {s.variant for s in report.sites} == {"exact"} and "slower than exact" in report.render()
