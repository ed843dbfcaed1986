"""One test per rule of the detector's rule tables: the score chain (``SCORE_RULES``), the probabilities
(``PROBABILITY_RULES``) and the contracted axis (``AXIS_RULES``).

Each case is the smallest graph of the form the rule serves, taken from the form tests where one is there
(``test_forms``, ``test_forms_refused``, ``test_forms_keywords``, ``test_sinks``), written here where none is.
The graph is traced with fx and canonicalized as the pipeline does; the test walks from its softmax and checks
that the rule fired and what it produced (the score steps, the q multipliers, or the reason it refused). The
axis rules are checked on one op each: which rule reads it and which input axis it maps the output axis to.
A rule added to a table without a case here fails ``test_every_rule_has_a_case``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import test_forms
import test_forms_keywords
import test_forms_refused
import test_sinks
from attncc.frontend import CallArgs, dynamo_capture, try_symbolic_trace
from attncc.passes import graph_ops as g
from attncc.passes.canonicalize import canonicalize
from attncc.passes.detect import AXIS_RULES, PROBABILITY_RULES, SCORE_RULES, Decline
from attncc.passes.detect.axis import axis_input
from attncc.passes.detect.probabilities import walk_probabilities
from attncc.passes.detect.reading import reaches_product
from attncc.passes.detect.score_chain import walk_scores
from attncc.passes.sink_logits import sink_column
from forms_helpers import QKV, QKVM, B, D, H, N, keep_mask, qkv, rand

SCALE = D ** -0.5
INF = float("inf")
FMIN = torch.finfo(torch.float32).min


@dataclass
class Case:
    """A form and what the rule under test must make of it."""

    make: Callable[[], torch.nn.Module]
    inputs: Callable[[], tuple]
    steps: tuple = ()
    """The chain's score steps as (kind, value) in program order; value None: only the kind is checked."""
    q_multipliers: tuple = ()
    """The kinds ('mul'|'div') of the q multipliers."""
    refused: str = ""
    """A phrase of the reason the rule refuses with ('' when it reads the op)."""
    frontend: str = "fx"
    """How the graph is captured: fx's symbolic_trace, or Dynamo (for what fx cannot trace)."""


def form(form_id: str, **expected) -> Case:
    """A positive form of ``test_forms.POSITIVE`` by id."""
    (f,) = [f for f in test_forms.POSITIVE if f.id == form_id]
    return Case(f.make, f.inputs, **expected)


def param(params: list, param_id: str):
    """The function of a ``pytest.param(fn, ...)`` of a form table by id."""
    (p,) = [p for p in params if p.id == param_id]
    return p.values[0]


def _mask_inputs():
    return (*qkv(), keep_mask(B, 1, N, N))


def canonical_softmax(case: Case) -> fx.Node:
    """The softmax node of the case's form, captured (fx or Dynamo) and canonicalized as the pipeline does."""
    if case.frontend == "fx":
        gm = try_symbolic_trace(case.make(), CallArgs.from_example(case.inputs()))
    else:
        graphs = []
        torch._dynamo.reset()
        dynamo_capture(case.make(), lambda gm, example_inputs: graphs.append(gm) or gm.forward)(*case.inputs())
        (gm,) = graphs
    assert gm is not None
    (softmax,) = [n for n in canonicalize(gm).graph.nodes if g.is_softmax(n)]
    return softmax


def _index_fill(q, k, v, m):
    s = q @ k.transpose(-2, -1) * SCALE
    s[~m] = -INF
    return s.softmax(-1) @ v


# ---------------------------------------------------------------------------------------- score chain

SCORE_CASES = {
    "cast": form("softmax_float_type_as", steps=(("scale", SCALE),)),
    "rounding_divide": Case(lambda: QKV(param(test_forms_keywords.NEAR_MISSES, "div_rounding_mode")), qkv,
                            refused="divided with rounding"),
    "softcap": form("tanh_softcap", steps=(("scale", SCALE), ("softcap", 2.0))),
    "scale": form("scale_div", steps=(("scale", 1 / math.sqrt(D)),)),
    "q_scale": form("per_head_temperature", steps=(("qscale", None),), q_multipliers=("mul",)),
    # a full [B, H, N, N] factor (no form: refused)
    "tensor_factor": Case(lambda: QKVM(lambda q, k, v, m: (q @ k.mT * m).softmax(-1) @ v),
                          lambda: (*qkv(), rand(B, H, N, N, seed=3)), refused="multiplied by a full tensor"),
    # a number added to every score (no form: the softmax does not change)
    "constant_term": Case(lambda: QKV(lambda q, k, v: (q @ k.mT * SCALE + 3.0).softmax(-1) @ v), qkv,
                          steps=(("scale", SCALE),)),
    "bias": form("relpos_bias_and_mask", steps=(("scale", SCALE), ("add", 1.0), ("add", 1.0))),
    "masked_fill": form("masked_fill_neg_inf", steps=(("scale", SCALE), ("fill", -INF))),
    # `s[~m] = -inf` (no form; Dynamo records operator.setitem, fx cannot trace it)
    "index_fill": Case(lambda: QKVM(_index_fill), lambda: (*qkv(), keep_mask(B, H, N, N)),
                       steps=(("scale", SCALE), ("fill", -INF)), frontend="dynamo"),
    "where_keep": form("where_neg_inf", steps=(("scale", SCALE), ("keep", -INF))),
    # the condition says where to fill (no form)
    "where_fill": Case(lambda: QKVM(lambda q, k, v, m: torch.where(~m, -INF, q @ k.mT * SCALE).softmax(-1) @ v),
                       _mask_inputs, steps=(("scale", SCALE), ("fill", -INF))),
    "floor": Case(lambda: QKVM(param(test_forms_refused.EXACT, "clamp_torch_max_finfo_min")), _mask_inputs,
                  steps=(("scale", SCALE), ("add", 1.0))),
    "reshape": Case(lambda: QKVM(param(test_forms_refused.EXACT, "bloom_style_probs_viewed_back")), _mask_inputs,
                    steps=(("scale", SCALE), ("add", 1.0), ("reshape", None), ("add", 1.0))),
    "concatenation": Case(test_sinks.ScaledAfterCat, qkv, refused="concatenated with another block"),
}


def _kinds_and_values(steps) -> list:
    return [(s.kind, s.value) for s in steps]


def _assert_steps(steps, expected) -> None:
    assert len(steps) == len(expected), _kinds_and_values(steps)
    for step, (kind, value) in zip(steps, expected):
        assert step.kind == kind, _kinds_and_values(steps)
        if value is not None:
            assert step.value == pytest.approx(value), _kinds_and_values(steps)


@pytest.mark.parametrize("rule", list(SCORE_CASES))
def test_score_rule(rule: str):
    case = SCORE_CASES[rule]
    softmax = canonical_softmax(case)
    if case.refused:
        with pytest.raises(Decline) as refused:
            walk_scores(softmax.args[0], softmax)
        assert refused.value.rule == rule
        assert case.refused in refused.value.reason
        return
    chain = walk_scores(softmax.args[0], softmax)
    assert chain is not None and g.is_matmul(chain.product)
    assert rule in chain.rules, chain.rules
    _assert_steps(chain.steps, case.steps)
    assert tuple(kind for kind, _ in chain.q_multipliers) == case.q_multipliers


def test_a_softmax_over_no_product_is_no_chain():
    """A classifier's softmax: no rule reads the linear layer, and nothing from a product flows in."""
    softmax = canonical_softmax(Case(test_forms.Classifier, lambda: (rand(B, N, D),)))
    assert walk_scores(softmax.args[0], softmax) is None


# ---------------------------------------------------------------------------------------- probabilities


@dataclass
class ProbabilityCase:
    make: Callable[[], torch.nn.Module]
    inputs: Callable[[], tuple]
    transposed: bool = False
    dropout_p: float = 0.0
    views: int = 0
    refused: str = ""


def _sink_of(softmax: fx.Node):
    return sink_column(softmax.args[0], reaches_product)


class _TrainingDropout(torch.nn.Module):
    """``F.dropout(p, 0.1, training=True)`` on the probabilities (BERT in training)."""

    def forward(self, q, k, v):
        return F.dropout((q @ k.mT * SCALE).softmax(-1), p=0.1, training=True) @ v


PROBABILITY_CASES = {
    "sink_kept": ProbabilityCase(test_sinks.SinkNotDropped, qkv, refused="sink column is not dropped"),
    "product": ProbabilityCase(form("explicit_operator").make, qkv),
    "transposed_product": ProbabilityCase(form("channels_first").make, form("channels_first").inputs,
                                          transposed=True),
    "sink_drop": ProbabilityCase(test_sinks.SharedSink, qkv),
    "view": ProbabilityCase(lambda: QKVM(param(test_forms_refused.EXACT, "bloom_style_probs_viewed_back")),
                            _mask_inputs, views=1),
    "dropout": ProbabilityCase(_TrainingDropout, qkv, dropout_p=0.1),
    "cast": ProbabilityCase(form("softmax_dtype_kwarg_to").make, qkv),
}


@pytest.mark.parametrize("rule", list(PROBABILITY_CASES))
def test_probability_rule(rule: str):
    case = PROBABILITY_CASES[rule]
    softmax = canonical_softmax(Case(case.make, case.inputs))
    sink = _sink_of(softmax)
    if case.refused:
        with pytest.raises(Decline, match=case.refused):
            walk_probabilities(softmax, sink)
        return
    path = walk_probabilities(softmax, sink)
    assert rule in path.rules, path.rules
    assert g.is_matmul(path.output)
    assert path.transposed == case.transposed
    assert path.dropout_p == pytest.approx(case.dropout_p)
    assert len(path.views) == case.views
    assert path.sink_dropped == (sink is not None)


# ---------------------------------------------------------------------------------------- contracted axis


class _XY(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, y):
        return self.fn(x, y)


# rule: (the op, x's shape, y's shape, the output axis asked, the input ("x"/"y") and axis it comes from)
AXIS_CASES = {
    # heads split from features: [B, N, C] viewed as [B, N, H, D] (every multi-head projection)
    "reshape": (lambda x, y: x.view(2, 12, 4, 4), (2, 12, 16), (1,), 2, ("x", 2)),
    "permute": (lambda x, y: x.permute(0, 2, 1, 3), (2, 3, 4, 5), (1,), 1, ("x", 2)),
    "last_two_swap": (lambda x, y: x.transpose(-2, -1), (2, 3, 4, 5), (1,), 3, ("x", 2)),
    "transpose": (lambda x, y: x.transpose(1, 2), (2, 3, 4, 5), (1,), 1, ("x", 2)),
    "unsqueeze": (lambda x, y: x.unsqueeze(1), (2, 3, 4), (1,), 2, ("x", 1)),
    # ViT's `q, k, v = qkv.unbind(0)`
    "split_part": (lambda x, y: x.unbind(0)[1], (3, 2, 4), (1,), 0, ("x", 1)),
    "index": (lambda x, y: x[:, None], (2, 3), (1,), 2, ("x", 1)),
    # XCiT's channel attention (test_channel_attention): the columns of a product come from its right operand
    "product": (lambda x, y: x @ y, (2, 3, 4), (4, 5), 2, ("y", -1)),
    "concatenation": (lambda x, y: torch.cat([x, y], 1), (2, 3), (2, 4), 0, ("x", 0)),
    "expand": (lambda x, y: x.expand(2, 3, 4), (1, 3, 4), (1,), 1, ("x", 1)),
    "same_shape": (lambda x, y: torch.tanh(x), (2, 3), (1,), 1, ("x", 1)),
}


@pytest.mark.parametrize("rule", list(AXIS_CASES))
def test_axis_rule(rule: str):
    fn, x_shape, y_shape, ax, (name, in_axis) = AXIS_CASES[rule]
    x, y = rand(*x_shape), rand(*y_shape, seed=1)
    gm = try_symbolic_trace(_XY(fn), CallArgs.from_example((x, y)))
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    node = out.args[0]
    assert next(r for r in AXIS_RULES if r.matches(node)).name == rule
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    assert axis_input(node, ax, g.ndim(node)) == (placeholders[name], in_axis)


# ---------------------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("table,cases", [(SCORE_RULES, SCORE_CASES), (PROBABILITY_RULES, PROBABILITY_CASES),
                                         (AXIS_RULES, AXIS_CASES)], ids=["score_chain", "probabilities", "axis"])
def test_every_rule_has_a_case(table, cases):
    names = [rule.name for rule in table]
    assert len(set(names)) == len(names), "rule names must be unique"
    assert set(names) == set(cases), f"rules without a case: {set(names) - set(cases)}; " \
                                     f"cases without a rule: {set(cases) - set(names)}"
