"""``attncc.auto(max_error=...)`` and ``attncc.calibrate(model, auto, data)``: the fastest mix of variants per site
and head whose measured end-to-end error stays within the budget.

Calibration, on the user's batches (each padded to the length she cares about):

1. **Per-head errors** (``errors.ErrorCollector``): one pass per batch with every site exact upstream; at each
   site every candidate of the menu runs on the same inputs, and each head's error is measured where it enters
   the residual stream (through the output projection), per sample.
2. **Sensitivity per site**: one pass per site in which only that site runs a probe candidate on all heads; the
   end-to-end error (the metric, at the model's output) over the site's own projected error is how much an
   error there costs downstream (the last layer of MiniLM costs 5-10x the others).
3. **Cost**: predicted seconds of each candidate at ``target_len`` from the time model (measured once on this
   machine and cached, ``attncc.calibration.timing``), or FLOPs (``cost="flops"``). A candidate predicted slower
   than exact is never chosen.
4. **Allocation** (``allocate.allocate``): per head, the cheapest option whose sensitivity-weighted errors sum
   within the budget; then the plan is **run end to end** on the calibration data, and the budget given to the
   allocator is searched (doubling, then bisection) for the largest one whose measured error stays within
   ``safety * max_error`` — the prediction ranks options, the measurement decides.

The result is a ``Plan``: a variant per (module, head), why, and the measured errors (calibration data and the
held-out batches, when given). ``attncc.compile(model, plan)`` runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from attncc import progress as display
from attncc.calibration.allocate import Allocation, Option, allocate
from attncc.calibration.errors import ErrorCollector, SiteStats, candidate_pairs, real_pairs
from attncc.calibration.interpreter import SiteVisit, hooked
from attncc.calibration.metrics import Metric, metric_function, metric_name
from attncc.errors import AttnccError
from attncc.frontend import CallArgs

COSTS = ("time", "flops")
STATISTICS = ("mean", "worst")

METRIC_POWER = {"cosine": 1.0, "logits_kl": 1.0, "rel_l2": 0.5}
"""How each metric grows with a small squared error at a site: ``1 - cos`` and KL are quadratic in a small
perturbation (linear in its square), the relative L2 error is linear in it. Allocation adds errors in the
units where they add: ``error ** (1 / power)``."""


@dataclass(frozen=True)
class AutoPolicy:
    """A policy that is calibrated before it runs: see ``attncc.auto``."""

    max_error: float = 0.01
    metric: Union[str, Metric] = "cosine"
    target_len: Optional[int] = None
    menu: Optional[tuple[str, ...]] = None
    cost: str = "time"
    safety: float = 0.75
    statistic: str = "mean"

    def __post_init__(self) -> None:
        if isinstance(self.max_error, bool) or not isinstance(self.max_error, (int, float)) or not self.max_error > 0:
            raise AttnccError(f"auto: max_error must be a number > 0, got {self.max_error!r}")
        metric_function(self.metric)
        if self.target_len is not None and (isinstance(self.target_len, bool) or not isinstance(self.target_len, int)
                                            or self.target_len < 1):
            raise AttnccError(f"auto: target_len must be a positive integer, got {self.target_len!r}")
        if self.cost not in COSTS:
            raise AttnccError(f"auto: cost must be one of {', '.join(COSTS)}, got {self.cost!r}")
        if self.statistic not in STATISTICS:
            raise AttnccError(f"auto: statistic must be one of {', '.join(STATISTICS)}, got {self.statistic!r}")
        if not 0 < self.safety <= 1:
            raise AttnccError(f"auto: safety must be in (0, 1], got {self.safety!r}")
        if self.menu is not None:
            object.__setattr__(self, "menu", _checked_menu(self.menu))

    @property
    def power(self) -> float:
        return METRIC_POWER.get(self.metric, 1.0) if isinstance(self.metric, str) else 1.0

    def __str__(self) -> str:
        return f"auto(max_error={self.max_error:g}, metric={metric_name(self.metric)}, cost={self.cost})"


def auto(max_error: float = 0.01, metric: Union[str, Metric] = "cosine", target_len: Optional[int] = None,
         menu: Optional[Sequence[str]] = None, cost: str = "time", safety: float = 0.75,
         statistic: str = "mean") -> AutoPolicy:
    """A policy choosing, per site and head, the fastest variant whose end-to-end error stays within ``max_error``.

    Args:
        max_error: the budget, in the metric's units, for the whole model (not per site).
        metric: ``"cosine"`` (1 - cosine of the mean-pooled output over real tokens), ``"rel_l2"``,
            ``"logits_kl"``, or ``fn(output, reference, batch) -> Tensor[B]``.
        target_len: the sequence length the plan is for (time is predicted there); default: the calibration
            batches' length.
        menu: candidate variant texts; default ``default_menu(target_len)``.
        cost: ``"time"`` (measured on this machine, cached) or ``"flops"`` (attention FLOPs actually run).
        safety: the plan's measured calibration error is held under ``safety * max_error``, leaving room for
            inputs it was not calibrated on (on MiniLM, texts it never saw erred 13-31% more than the 16 it was
            calibrated on: 0.75 keeps their mean within the budget).
        statistic: ``"mean"`` or ``"worst"`` calibration sample is what must stay within the budget.

    Use it with ``attncc.calibrate(model, attncc.auto(...), data=[batch, ...]) -> Plan``, then
    ``attncc.compile(model, plan)``.
    """
    return AutoPolicy(float(max_error) if isinstance(max_error, int) and not isinstance(max_error, bool) else max_error,
                      metric, target_len, tuple(menu) if menu is not None else None, cost, safety, statistic)


def default_menu(target_len: int) -> list[str]:
    """The candidates ``auto`` considers at ``target_len`` tokens: local windows with sinks (narrow ones also with
    a remainder pooled by position or by key cluster), top-k over 8-token blocks by density and by softmax mass,
    plain, with a remainder pooled per 32 keys, or pooled by k-means cluster of the keys, vertical-slash, and
    linear attention (which enters a plan only where it is cheaper than exact and within budget).

    Why these, measured on all-MiniLM-L6-v2 at 512 tokens: 8-token selection blocks erred 2-10x less than
    16-token ones at the same density; a remainder pooled per 32 keys costs a quarter of one pooled per 8 for
    nearly the same error; pooling by key cluster halved the error of positional pools at the cheap end (the
    last layer's broad heads); candidates no plan chose at any budget were left out (each costs calibration
    time)."""
    n = max(1, target_len)
    menu = []
    for window in (8, 16, 32, 64, 128):
        if 2 * window + 1 >= n:
            continue
        menu.append(f"local(window={window}, sinks=4)")
        if window <= 16:
            menu.extend(f"local(window={window}, sinks=4, remainder=True, remainder_block={block})"
                        for block in ((32, 64) if window == 8 else (64,)) if 4 * block <= n)
            menu.append(f"local(window={window}, sinks=4, remainder=True, remainder_block=8, clusters=8)")
    if n >= 64:
        coarse = ", remainder_block=32" if n >= 128 else ""
        for density in (0.03125, 0.0625, 0.125, 0.25):
            if density * n < 8:
                continue
            if density >= 0.0625:
                menu.append(f"topk(block=8, density={density})")
                menu.append(f"topk(block=8, density={density}, remainder=True, clusters=16)")
            if density in (0.0625, 0.125):
                menu.append(f"topk(block=8, density={density}, remainder=True{coarse})")
            if density <= 0.0625:
                menu.append(f"topk(block=8, density={density}, remainder=True, clusters=8)")
        for threshold in (0.3, 0.5, 0.7):
            menu.append(f"topk(block=8, threshold={threshold}, remainder=True, clusters=16)")
        for threshold in (0.8, 0.9, 0.95):
            menu.append(f"topk(block=8, threshold={threshold}, remainder=True{coarse})")
    for columns in (32, 64):
        if 4 * columns < n:
            menu.append(f"vertical_slash(vertical={columns}, slash={columns})")
    menu.append("linear")
    return [text for text in menu if _parses(text)]


def _parses(text: str) -> bool:
    from attncc.variants.parse import parse_variant

    try:
        parse_variant(text)
    except AttnccError:
        return False
    return True


def _checked_menu(menu) -> tuple[str, ...]:
    from attncc.variants.parse import parse_variant

    if isinstance(menu, str) or not all(isinstance(t, str) for t in menu) or not menu:
        raise AttnccError("auto: menu must be a non-empty list of variant texts such as 'local(window=64)'")
    for text in menu:
        try:
            parse_variant(text)
        except AttnccError as error:
            raise AttnccError(f"auto: menu entry {text!r}: {error}") from None
    return tuple(menu)


# ------------------------------------------------------------------------------------------------ calibration

@dataclass
class Calibration:
    """Everything calibration measured, before it becomes a Plan."""

    policy: AutoPolicy
    target_len: int
    stats: dict[str, SiteStats]
    sensitivity: dict[str, float]
    costs: dict[str, dict[str, float]]
    """module -> run text (and 'exact') -> predicted cost of one head (seconds or FLOPs)."""
    allocation: Allocation
    budget: float
    measured: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    searched: list[tuple[float, float]] = field(default_factory=list)
    """(allocator budget, measured calibration error) of every plan tried."""
    seconds: float = 0.0

    def choice(self, module: str) -> list[str]:
        """The variant text of each head of ``module``."""
        stats = self.stats[module]
        return [self.allocation.chosen[(module, h)].text for h in range(stats.heads)]


def calibrate(model: nn.Module, policy: Union[AutoPolicy, float], data: Sequence[Any],
              held_out: Optional[Sequence[Any]] = None, progress: bool = True):
    """Calibrate ``policy`` (an ``attncc.auto(...)``) on ``model`` with the batches ``data`` and return the Plan.

    ``data`` and ``held_out``: lists of batches as the model takes them (a tensor, a tuple of arguments, or a
    dict of keyword arguments such as a tokenizer's output), padded to the length the plan is for. The model runs
    in eval mode while calibrating (its mode is restored). Returns ``attncc.calibration.plan.Plan``.
    """
    calibration = run_calibration(model, policy, data, held_out, progress)
    from attncc.calibration.build import plan_from

    return plan_from(model, calibration)


def run_calibration(model: nn.Module, policy: Union[AutoPolicy, float], data: Sequence[Any],
                    held_out: Optional[Sequence[Any]] = None, progress: bool = True) -> Calibration:
    """``calibrate`` without building the Plan: the measurements and the allocation."""
    policy = policy if isinstance(policy, AutoPolicy) else auto(max_error=policy)
    if not isinstance(data, (list, tuple)) or not data:
        raise AttnccError("calibrate: data must be a non-empty list of batches (what the model takes)")
    started = time.perf_counter()
    with _eval_mode(model), (contextlib.nullcontext() if progress else display.quiet()):
        session = Calibrator(model, policy, list(data))
        calibration = session.run()
        if held_out:
            held = Calibrator(model, policy, list(held_out), compiled=session.compiled)
            calibration.measured["held_out"] = held.measure(calibration)
    calibration.seconds = time.perf_counter() - started
    return calibration


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class Calibrator:
    """One calibration: the compiled model (exact policy), the batches and their reference outputs."""

    def __init__(self, model: nn.Module, policy: AutoPolicy, batches: list, compiled=None):
        import attncc

        self.model, self.policy, self.batches = model, policy, batches
        self._measured = None
        self.metric = metric_function(policy.metric)
        self.compiled = compiled if compiled is not None else attncc.compile(model, "exact", measure_error=False)
        with torch.no_grad():
            self.references = [_call(model, b) for b in batches]

    def menu_for(self, site) -> list[str]:
        """The candidates for ``site``: the policy's menu, or the default one at the target (else the site's)
        length."""
        if self.policy.menu:
            return list(self.policy.menu)
        return default_menu(self.policy.target_len or (site.kv_len if isinstance(site.kv_len, int) else 512))

    # ------------------------------------------------------------------------------------------ the steps
    def measurements(self) -> tuple[dict[str, SiteStats], dict[str, float], dict[str, dict[str, float]], int]:
        """Per-head errors, sensitivities and costs of every candidate (measured once per calibrator):
        ``(stats, sensitivity, costs, target_len)``."""
        if self._measured is not None:
            return self._measured
        with display.steps("calibrating: per-head errors", total=len(self.batches)) as step:
            collector = ErrorCollector(self.menu_for)
            for batch in self.batches:
                with hooked(self.compiled, collector):
                    _call(self.compiled, batch)
                step.advance(f"batch of {_rows(batch)}")
        stats = collector.stats
        if not stats:
            raise AttnccError("calibrate: attncc found no attention site to calibrate in this model "
                              "(see attncc.compile(model).report())")
        target_len = self.policy.target_len or max(_site_length(s) for s in stats.values())
        self._measured = (stats, self.sensitivity(stats), self.costs(stats, target_len), target_len)
        return self._measured

    def run(self, max_error: Optional[float] = None) -> Calibration:
        """The calibrated allocation for ``max_error`` (default: the policy's)."""
        policy = self.policy if max_error is None else dataclasses.replace(self.policy, max_error=max_error)
        stats, sensitivity, costs, target_len = self.measurements()
        calibration = Calibration(policy, target_len, stats, sensitivity, costs, Allocation(), 0.0)
        self.search(calibration)
        calibration.measured["calibration"] = self.measure(calibration)
        return calibration

    def sensitivity(self, stats: dict[str, SiteStats]) -> dict[str, float]:
        """module -> end-to-end error (allocation units) per unit of the site's summed projected error."""
        result = {}
        with display.steps("calibrating: sensitivity per site", total=len(stats)) as step:
            for module, site in stats.items():
                probe = _probe(site)
                if probe is None:
                    result[module] = 0.0
                    continue
                measured = self.errors_with({module: [probe] * site.heads})[0]
                own = site.error_matrix(probe).sum(1)
                result[module] = float(self._units(measured).sum() / own.sum().clamp_min(1e-300))
                step.advance(module)
        return result

    def costs(self, stats: dict[str, SiteStats], target_len: int) -> dict[str, dict[str, float]]:
        """module -> text -> predicted cost of one head at ``target_len`` (seconds, or FLOPs per sample)."""
        costs: dict[str, dict[str, float]] = {}
        if self.policy.cost == "flops":
            for module, site in stats.items():
                samples = site.pair_matrix("exact").shape[0]
                costs[module] = {text: float(site.flops(text).mean()) / samples
                                 for text in ["exact", *site.errors]}
            return costs
        from attncc.calibration.timing import TimeModel

        with display.steps("calibrating: timing candidates", total=len(stats)) as step:
            for module, site in stats.items():
                shape = _shape(site, target_len)
                timer = TimeModel(_device(self.model))
                costs[module] = {text: timer.per_head_seconds(text, shape, 1) for text in ["exact", *site.errors]}
                step.advance(module)
        return costs

    def search(self, calibration: Calibration) -> None:
        """Find the largest allocator budget whose plan's measured calibration error stays within
        ``safety * max_error``; leaves that allocation on ``calibration``."""
        policy = calibration.policy
        target = policy.safety * policy.max_error
        units = target ** (1.0 / policy.power)
        items = self.items(calibration)
        tried: dict[float, tuple[Allocation, float]] = {}

        def attempt(budget: float) -> bool:
            allocation = allocate(items, budget)
            measured = self.statistic(self.errors_with(_assignment(calibration.stats, allocation))[0])
            tried[budget] = (allocation, measured)
            calibration.searched.append((budget, measured))
            return measured <= target

        with display.steps("calibrating: fitting the plan to the budget", total=None) as step:
            low, high = 0.0, None
            budget = units
            for _ in range(5):  # grow while it fits, shrink while it does not
                step.advance(f"budget {budget:.3g}")
                if attempt(budget):
                    low = budget
                    if high is not None:
                        break
                    budget *= 2
                else:
                    high = budget
                    if low > 0:
                        break
                    budget /= 2
            for _ in range(3):  # bisect between the best that fit and the first that did not
                if high is None or low <= 0 or high / low < 1.15:
                    break
                middle = math.sqrt(low * high)
                step.advance(f"budget {middle:.3g}")
                if attempt(middle):
                    low = middle
                else:
                    high = middle
        if low > 0:
            calibration.allocation, calibration.budget = tried[low][0], low
        else:
            calibration.allocation, calibration.budget = allocate(items, 0.0), 0.0
            calibration.notes.append(f"no approximation kept the measured error within {target:.3g} "
                                     f"(safety {policy.safety:g} x max_error): every head stays exact")
        if all(option.text == "exact" for option in calibration.allocation.chosen.values()):
            calibration.notes.extend(_why_all_exact(calibration))

    def items(self, calibration: Calibration) -> dict[tuple[str, int], tuple[Option, list[Option]]]:
        """Per (module, head): the exact option and the candidates, in allocation units and predicted cost."""
        items = {}
        for module, site in calibration.stats.items():
            costs, weight = calibration.costs[module], calibration.sensitivity[module]
            means = {text: site.error_matrix(text).mean(0) for text in site.errors}
            for head in range(site.heads):
                exact = Option("exact", 0.0, costs["exact"])
                options = [Option(text, weight * float(means[text][head]), costs[text]) for text in site.errors]
                items[(module, head)] = (exact, options)
        return items

    # ---------------------------------------------------------------------------------------- measurement
    def errors_with(self, assignment: dict[str, list[str]]) -> tuple[Tensor, float, float]:
        """``(errors, flops, exact_flops)``: the metric per sample (float64 ``[samples]``) with ``assignment``
        (module -> text per head; other sites exact), and the attention FLOPs it ran and exact would have run at
        the assigned sites, over real tokens."""
        hook = _Composer(assignment)
        errors = []
        with hooked(self.compiled, hook):
            for batch, reference in zip(self.batches, self.references):
                errors.append(self.metric(_call(self.compiled, batch), reference, batch).double().cpu())
        return torch.cat(errors), hook.flops, hook.exact_flops

    def measure(self, calibration: Calibration) -> dict[str, Any]:
        """The plan's measured end-to-end error on these batches (mean, worst, samples) and the attention FLOPs
        it ran against exact's, over real tokens."""
        errors, flops, exact_flops = self.errors_with(_assignment(calibration.stats, calibration.allocation))
        return {"mean": float(errors.mean()), "worst": float(errors.max()), "samples": int(errors.numel()),
                "metric": metric_name(calibration.policy.metric), "flops": flops, "exact_flops": exact_flops,
                "flops_saving": exact_flops / flops if flops > 0 else None}

    def statistic(self, errors: Tensor) -> float:
        return float(errors.max() if self.policy.statistic == "worst" else errors.mean())

    def _units(self, errors: Tensor) -> Tensor:
        return errors.clamp_min(0) ** (1.0 / self.policy.power)


class _Composer:
    """Site hook: each head of an assigned module takes the output of its variant (other heads exact); counts
    the attention FLOPs the assignment runs and exact would run there (real tokens only)."""

    def __init__(self, assignment: dict[str, list[str]]):
        self.assignment = assignment
        self.flops = 0.0
        self.exact_flops = 0.0

    def __call__(self, visit: SiteVisit) -> Optional[Tensor]:
        per_head = self.assignment.get(visit.module)
        if not per_head:
            return None
        call = visit.call()
        per_pair = 2.0 * (call.q.shape[-1] + call.v.shape[-1])
        exact_pairs = real_pairs(visit)
        self.exact_flops += per_pair * float(exact_pairs.sum())
        if all(text == "exact" for text in per_head):
            self.flops += per_pair * float(exact_pairs.sum())
            return None
        out = visit.exact.clone()
        for text in sorted(set(per_head)):
            heads = [h for h, t in enumerate(per_head) if t == text]
            pairs = exact_pairs if text == "exact" else candidate_pairs(visit, text, exact_pairs)
            self.flops += per_pair * float(pairs[:, heads].sum())
            if text == "exact":
                continue
            candidate = visit.run(text)
            if out.dim() == 4:
                out[:, heads] = candidate[:, heads].to(out.dtype)
            else:
                out = candidate.to(out.dtype)
        return out


def _assignment(stats: dict[str, SiteStats], allocation: Allocation) -> dict[str, list[str]]:
    return {module: [allocation.chosen[(module, h)].text for h in range(site.heads)] for module, site in stats.items()}


def _probe(site: SiteStats) -> Optional[str]:
    """The candidate whose summed error sits in the middle of the site's candidates (a perturbation in the
    range the plan will use); None when no candidate changes anything."""
    ranked = sorted((float(site.error_matrix(t).sum()), t) for t in site.errors)
    ranked = [(e, t) for e, t in ranked if e > 0]
    if not ranked:
        return None
    return ranked[len(ranked) // 2][1]


def _why_all_exact(calibration: Calibration) -> list[str]:
    slower = all(calibration.costs[m][t] >= calibration.costs[m]["exact"]
                 for m, s in calibration.stats.items() for t in s.errors)
    if slower:
        what = "predicted slower than exact" if calibration.policy.cost == "time" else "no cheaper than exact"
        return [f"every candidate variant is {what} at {calibration.target_len} tokens on this machine: "
                f"every site stays exact"]
    return ["every site stays exact: no candidate fits the error budget"]


def _shape(site: SiteStats, target_len: int):
    from attncc.calibration.timing import AttentionShape

    s = site.site
    kv_len = target_len if s.kind == "self" or not isinstance(s.kv_len, int) else s.kv_len
    kv_heads = s.kv_heads if isinstance(s.kv_heads, int) else site.heads
    return AttentionShape(batch=1, q_heads=site.heads, kv_heads=kv_heads,
                          q_len=target_len, kv_len=kv_len, head_dim=site.dims[0], value_dim=site.dims[1],
                          causal=bool(s.causal), dtype=str(s.dtype).replace("torch.", "") if s.dtype else "float32",
                          padding=0.0)


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _call(model, batch):
    call = CallArgs.from_example(batch)
    with torch.no_grad():
        return model(*call.args, **call.kwargs)


def _first_tensor(batch) -> Optional[Tensor]:
    call = CallArgs.from_example(batch)
    for value in [*call.args, *call.kwargs.values()]:
        if isinstance(value, Tensor):
            return value
    return None


def _site_length(site: SiteStats) -> int:
    n = site.site.kv_len
    return n if isinstance(n, int) else 1


def _rows(batch) -> int:
    t = _first_tensor(batch)
    return int(t.shape[0]) if t is not None and t.dim() >= 1 else 1
