"""A calibration's measurements -> the Plan the user keeps: per (module, head) the chosen variant, its predicted
error, time and FLOPs, and every candidate considered with why it was or was not chosen."""

from __future__ import annotations

import torch.nn as nn

from attncc.calibration.allocate import hull, Option
from attncc.calibration.auto import Calibration
from attncc.calibration.metrics import metric_name


def plan_from(model: nn.Module, calibration: Calibration):
    """The ``Plan`` of ``calibration`` for ``model``."""
    from attncc.calibration.plan import HeadChoice, Plan, model_fingerprint

    sites = {}
    for module, stats in calibration.stats.items():
        sites[module] = [_head_choice(calibration, module, head, HeadChoice) for head in range(stats.heads)]
    measured = dict(calibration.measured)
    measured["search"] = [{"budget": b, "measured": m} for b, m in calibration.searched]
    measured["sensitivity"] = dict(calibration.sensitivity)
    measured["calibration_seconds"] = round(calibration.seconds, 1)
    policy = calibration.policy
    return Plan(model=type(model).__name__, fingerprint=model_fingerprint(model), metric=metric_name(policy.metric),
                max_error=policy.max_error, target_len=calibration.target_len, sites=sites, measured=measured,
                notes=list(calibration.notes))


def _head_choice(calibration: Calibration, module: str, head: int, HeadChoice):
    stats = calibration.stats[module]
    costs, weight = calibration.costs[module], calibration.sensitivity[module]
    chosen = calibration.allocation.chosen[(module, head)]
    flops = {text: float(stats.flops(text)[head]) / max(1, stats.pair_matrix("exact").shape[0])
             for text in ["exact", *stats.errors]}
    time_s = costs if calibration.policy.cost == "time" else {}
    options = [Option(t, weight * float(stats.error_matrix(t)[:, head].mean()), costs[t]) for t in stats.errors]
    exact = Option("exact", 0.0, costs["exact"])
    staircase = {o.text for o in hull(options, exact)}
    considered = []
    for option in [exact, *options]:
        if option.text == chosen.text:
            why = "chosen"
        elif option.cost >= exact.cost and option.text != "exact":
            why = "slower than exact" if calibration.policy.cost == "time" else "no fewer FLOPs than exact"
        elif option.text not in staircase:
            why = "dominated: another candidate is cheaper for less error"
        elif option.error > chosen.error:
            why = "over budget"
        else:
            why = "safer but slower: the budget allowed a cheaper choice"
        considered.append({"variant": option.text, "error": option.error, "time_s": time_s.get(option.text),
                           "flops": flops[option.text], "why": why})
    for text, reason in stats.declined.items():
        considered.append({"variant": text, "error": None, "time_s": None, "flops": None,
                           "why": f"does not apply: {reason}"})
    return HeadChoice(variant=chosen.text, error=chosen.error, time_s=time_s.get(chosen.text, 0.0),
                      flops=flops[chosen.text], considered=considered)
