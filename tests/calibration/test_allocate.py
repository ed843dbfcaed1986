"""The allocator: convex staircases per head and the greedy that spends the budget on the best savings first."""

from __future__ import annotations

import itertools
import random

import pytest

from attncc.calibration.allocate import Option, allocate, hull

EXACT = Option("exact", 0.0, 10.0)


def test_hull_drops_options_no_cheaper_than_exact_and_dominated_ones():
    options = [Option("slow", 0.1, 12.0), Option("a", 1.0, 6.0), Option("worse_a", 2.0, 7.0),
               Option("b", 3.0, 2.0)]
    assert [o.text for o in hull(options, EXACT)] == ["exact", "a", "b"]


def test_hull_keeps_only_the_convex_steps():
    # "mid" saves 1 for 1 error, then "far" saves 8 for 1 more: the straight step exact -> far saves more per error
    options = [Option("mid", 1.0, 9.0), Option("far", 2.0, 1.0)]
    assert [o.text for o in hull(options, EXACT)] == ["exact", "far"]


def test_allocate_zero_budget_keeps_everything_exact_and_infinite_takes_the_cheapest():
    items = {h: (EXACT, [Option("a", 1.0, 6.0), Option("b", 3.0, 2.0)]) for h in range(4)}
    assert {o.text for o in allocate(items, 0.0).chosen.values()} == {"exact"}
    everything = allocate(items, float("inf"))
    assert {o.text for o in everything.chosen.values()} == {"b"}
    assert everything.cost == pytest.approx(8.0) and everything.exact_cost == pytest.approx(40.0)


def test_allocate_spends_the_budget_on_the_best_saving_per_error_first():
    items = {"cheap_to_approximate": (EXACT, [Option("a", 0.1, 1.0)]),
             "sensitive": (EXACT, [Option("a", 5.0, 1.0)])}
    result = allocate(items, 1.0)
    assert result.chosen["cheap_to_approximate"].text == "a" and result.chosen["sensitive"].text == "exact"
    assert result.error == pytest.approx(0.1)


def test_allocate_stays_within_budget_and_is_near_the_best_choice_on_random_instances():
    rng = random.Random(0)
    for _ in range(30):
        items = {}
        for head in range(4):
            options = [Option(f"v{i}", rng.uniform(0, 1), rng.uniform(0, 12)) for i in range(3)]
            items[head] = (EXACT, options)
        budget = rng.uniform(0, 2)
        result = allocate(items, budget)
        assert result.error <= budget + 1e-12
        assert all(o.cost <= EXACT.cost for o in result.chosen.values())
        best = min(sum(c.cost for c in combo) for combo in itertools.product(*[[EXACT, *o] for _, o in items.values()])
                   if sum(c.error for c in combo) <= budget)
        # optimal up to one step of one head (the LP relaxation's bound): at most the largest single saving
        largest_step = max(EXACT.cost - min([EXACT, *o], key=lambda x: x.cost).cost for _, o in items.values())
        assert best - 1e-9 <= result.cost <= best + largest_step
