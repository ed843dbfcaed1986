"""Spending an error budget across heads: the cheapest choice of one option per head whose summed predicted
error stays within the budget (a multiple-choice knapsack).

The method is the greedy on lower convex hulls (the LP relaxation of the multiple-choice knapsack, solved
exactly by taking upgrades in order of cost saved per error added): each head starts exact; its options,
cleared of those no cheaper than exact and of dominated ones, form a convex staircase from exact to its
cheapest option; the steps of all heads are taken best ratio first while they fit. It is optimal up to the one
step that does not fit, and the model has 50-1000 heads, each a small part of the budget, so that gap is small;
an exact dynamic program over a discretized budget would cost far more and gain little. Why not a single
global threshold per layer: heads of one layer differ as much as layers do (issue 12's measurements).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Hashable


@dataclass(frozen=True)
class Option:
    """One way to run one head: its predicted error (budget units) and cost (seconds or FLOPs)."""

    text: str
    error: float
    cost: float


@dataclass
class Allocation:
    """The chosen option per item and the totals."""

    chosen: dict[Hashable, Option] = field(default_factory=dict)
    error: float = 0.0
    cost: float = 0.0
    exact_cost: float = 0.0


def hull(options: list[Option], exact: Option) -> list[Option]:
    """``exact`` followed by the options on the lower convex hull of (error, cost) that are cheaper than exact,
    in increasing error and decreasing cost (each step saves less per unit of error than the one before)."""
    useful = sorted((o for o in options if o.cost < exact.cost and o.error >= 0), key=lambda o: (o.error, o.cost))
    frontier: list[Option] = [exact]
    for option in useful:
        if option.cost >= frontier[-1].cost:  # dominated: more error, no cheaper
            continue
        frontier.append(option)
    # keep the convex part: the saving per error must fall step by step
    convex: list[Option] = [frontier[0]]
    for option in frontier[1:]:
        while len(convex) >= 2 and _ratio(convex[-2], convex[-1]) <= _ratio(convex[-2], option):
            convex.pop()
        convex.append(option)
    return convex


def _ratio(a: Option, b: Option) -> float:
    """Cost saved per unit of error added going from ``a`` to ``b``."""
    de = b.error - a.error
    saved = a.cost - b.cost
    return float("inf") if de <= 0 else saved / de


def allocate(items: dict[Hashable, tuple[Option, list[Option]]], budget: float) -> Allocation:
    """The cheapest option per item (``{key: (exact option, other options)}``) whose errors sum to at most
    ``budget``."""
    staircases = {key: hull(options, exact) for key, (exact, options) in items.items()}
    position = {key: 0 for key in staircases}
    result = Allocation()
    for key, stairs in staircases.items():
        result.chosen[key] = stairs[0]
        result.cost += stairs[0].cost
        result.exact_cost += stairs[0].cost
    queue = [(-_ratio(stairs[0], stairs[1]), index, key) for index, (key, stairs) in enumerate(staircases.items())
             if len(stairs) > 1]
    heapq.heapify(queue)
    order = {key: index for index, key in enumerate(staircases)}
    while queue:
        _, _, key = heapq.heappop(queue)
        stairs, at = staircases[key], position[key]
        step_error = stairs[at + 1].error - stairs[at].error
        if result.error + step_error > budget:
            continue  # this head's next step does not fit; cheaper steps of other heads may
        position[key] = at + 1
        result.chosen[key] = stairs[at + 1]
        result.error += step_error
        result.cost -= stairs[at].cost - stairs[at + 1].cost
        if at + 2 < len(stairs):
            heapq.heappush(queue, (-_ratio(stairs[at + 1], stairs[at + 2]), order[key], key))
    # totals summed once at the end (not by increments) so they are exactly the chosen options' sums
    result.cost = sum(option.cost for option in result.chosen.values())
    result.error = sum(option.error for option in result.chosen.values())
    return result
