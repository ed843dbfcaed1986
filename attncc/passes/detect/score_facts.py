"""What a site's score steps amount to: leading scales folded into one factor, the softcap found, the biases,
masks and reshapes kept for the rewrite, and the orders the op cannot reproduce declined."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch.fx as fx

from attncc.passes.detect.decline import Decline
from attncc.site import ScoreStep

INF = float("inf")
_TERMS = ("add", "fill", "keep")


@dataclass(frozen=True)
class ScoreFacts:
    """The score steps of a site, folded."""

    scale: float = 1.0
    """The factor of ``q @ k^T`` (the operands' own scales times every scale step)."""
    softcap: float = 0.0
    steps: tuple[ScoreStep, ...] = ()
    """What the rewrite applies after scaling (biases, masks, reshapes), in program order."""
    masked: bool = False
    """A bias or mask was seen: later scales apply to it too."""


def fold_score_steps(steps: tuple[ScoreStep, ...], softmax: fx.Node, scale: float = 1.0) -> ScoreFacts:
    """Fold ``steps`` (program order) onto a product already scaled by ``scale``; Decline (at ``softmax``) for
    orders the op cannot reproduce: a rescale after a softcap, a softcap after a mask, a mask that is no large
    negative number, a negative factor after a mask."""
    facts = ScoreFacts(scale=scale)
    for step in steps:
        facts = _FOLDS.get(step.kind, _keep)(facts, step, softmax)
    return facts


def _scale(facts: ScoreFacts, step: ScoreStep, softmax: fx.Node) -> ScoreFacts:
    if facts.softcap:
        raise Decline("the scores are rescaled after a softcap", softmax)
    kept = facts.steps
    if facts.masked:
        # (s + bias) * c == s * c + bias * c: the terms so far take the factor (a mask's -inf stays -inf)
        if not step.value > 0:
            raise Decline(f"the scores are multiplied by {step.value:g} after a bias or mask (a factor that is not "
                          "positive turns masked scores into the largest)", softmax)
        kept = tuple(replace(s, value=s.value * step.value) if s.kind in _TERMS else s for s in kept)
    return replace(facts, scale=facts.scale * step.value, steps=kept)


def _q_scale(facts: ScoreFacts, step: ScoreStep, softmax: fx.Node) -> ScoreFacts:
    if facts.masked or facts.softcap:
        raise Decline("the scores are rescaled after a bias, mask or softcap", softmax)
    return facts  # the factor itself is carried on q (ScoreChain.q_multipliers)


def _softcap(facts: ScoreFacts, step: ScoreStep, softmax: fx.Node) -> ScoreFacts:
    if facts.masked or facts.softcap:
        raise Decline("softcapping after a bias or mask is not supported", softmax)
    return replace(facts, softcap=step.value)


def _keep(facts: ScoreFacts, step: ScoreStep, softmax: fx.Node) -> ScoreFacts:
    """A bias, mask or reshape: kept for the rewrite."""
    if step.kind in ("fill", "keep") and not (step.value == -INF or step.value <= -1e4):
        raise Decline(f"masked with the value {step.value} (not a large negative number)", softmax)
    return replace(facts, steps=facts.steps + (step,), masked=facts.masked or step.kind != "reshape")


_FOLDS: dict[str, Callable[[ScoreFacts, ScoreStep, fx.Node], ScoreFacts]] = {
    "scale": _scale, "qscale": _q_scale, "softcap": _softcap}
