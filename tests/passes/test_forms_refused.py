"""Attention forms the detector used to refuse: each is now rewritten exactly, or refused with a reason that
names what is in the way.

- the probabilities viewed back before the product with v (BLOOM, Falcon, MPT eager: scores ``[B*H, N, N]``
  viewed to ``[B, H, N, N]`` for mask and softmax, probabilities viewed back): exact;
- ``max(scores, finfo.min)`` / ``clamp(min=finfo.min)`` before the softmax (old OPT, CodeGen): carried as
  nothing (it only turns -inf into finfo.min, which changes fully masked rows only); a higher bound: refused;
- scores reshaped to ``[B, H, N, N]`` for a per-head mask and restored before the softmax (``view``/``reshape``,
  or ``unflatten``/``flatten``): exact;
- a scale after the bias ``(q @ k^T + bias) * c``: folded into the scale and the bias; a negative one: refused;
- scores that escape (returned, or read by something else): refused, naming the other use; relative-position
  terms added to the scores (Transformer-XL's ``AC + BD``) are an additive bias: exact.

transformers' BLOOM itself is in tests/models/test_keyword_and_view_models.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attncc import AttnccWarning

from forms_helpers import (
    QKVM, FRONTENDS, compile_exactly, B, D, H, N, assert_same_outputs, compile_form, count_ops, keep_mask, qkv, rand,
    run_model,
)

SCALE = D ** -0.5
FMIN = torch.finfo(torch.float32).min
REL_BIAS = rand(1, H, N, N, seed=8)
REL_POSITIONS = rand(N, D, seed=9)


def _inputs(mask_shape=(B, 1, N, N)):
    return lambda: (*qkv(), keep_mask(*mask_shape))


def _bloom_style(q, k, v, m):
    """BLOOM's eager attention: baddbmm with ALiBi on [B*H, N, N], viewed to 4-D for the mask and the softmax."""
    q3, k3, v3 = (t.reshape(B * H, N, D) for t in (q, k, v))
    alibi = torch.arange(N).view(1, 1, N).expand(B * H, 1, N) * 0.1
    scores = alibi.baddbmm(batch1=q3, batch2=k3.transpose(-1, -2), beta=1.0, alpha=SCALE)
    weights = scores.view(B, H, N, -1) + torch.where(m, 0.0, FMIN)
    probs = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(probs.view(B * H, N, -1), v3)


def _probs_viewed_back_after_dropout(q, k, v, m):
    q3, k3, v3 = (t.reshape(B * H, N, D) for t in (q, k, v))
    scores = torch.bmm(q3, k3.transpose(1, 2)).view(B, H, N, N) * SCALE
    probs = F.dropout(scores.masked_fill(~m, float("-inf")).softmax(-1), p=0.1, training=False)
    return torch.bmm(probs.reshape(-1, N, N), v3)


def _clamp_max_tensor(q, k, v, m):
    scores = q @ k.transpose(-1, -2) * SCALE + torch.where(m, 0.0, FMIN)
    return torch.max(scores, torch.tensor(FMIN)).softmax(-1) @ v


def _clamp_maximum_neg_inf_mask(q, k, v, m):
    scores = (q @ k.transpose(-1, -2) * SCALE).masked_fill(~m, float("-inf"))
    return torch.maximum(scores, torch.tensor(FMIN)).softmax(-1) @ v


def _clamp_min_keyword(q, k, v, m):
    scores = q @ k.transpose(-1, -2) * SCALE + torch.where(m, 0.0, FMIN)
    return torch.clamp(scores, min=FMIN).softmax(-1) @ v


def _per_head_mask_view_and_restore(q, k, v, m):
    q3, k3, v3 = (t.reshape(B * H, N, D) for t in (q, k, v))
    scores = torch.bmm(q3, k3.transpose(1, 2)) * SCALE
    head_mask = torch.where(m, 0.0, -1e9)[:1].expand(1, H, N, N) * torch.linspace(1, 2, H).view(1, H, 1, 1)
    scores = (scores.view(B, H, N, N) + head_mask).reshape(-1, N, N)
    return torch.bmm(scores.softmax(-1), v3)


def _per_head_mask_unflatten_and_flatten(q, k, v, m):
    q3, k3, v3 = (torch.flatten(t, 0, 1) for t in (q, k, v))
    scores = torch.bmm(q3, k3.transpose(1, 2)) * SCALE
    scores = (scores.unflatten(0, (B, H)) + REL_BIAS).flatten(0, 1).masked_fill(~m.flatten(0, 1), float("-inf"))
    return torch.bmm(scores.softmax(-1), v3)


def _scale_after_bias(q, k, v, m):
    return ((q @ k.transpose(-1, -2) + torch.where(m, 0.0, -1e4)) * SCALE).softmax(-1) @ v


def _scale_after_bias_and_fill(q, k, v, m):
    scores = (q @ k.transpose(-1, -2) + REL_BIAS).masked_fill(~m, float("-inf")) / (D ** 0.5)
    return scores.softmax(-1) @ v


def _transformer_xl_rel_terms(q, k, v, m):
    """``AC + BD``: content scores plus a relative-position product of q (a bias that depends on q)."""
    rel = REL_POSITIONS
    ac = q @ k.transpose(-1, -2)
    bd = (q + 0.5) @ rel.transpose(0, 1)
    return ((ac + bd) * SCALE).masked_fill(~m, float("-inf")).softmax(-1) @ v


EXACT = [
    pytest.param(_bloom_style, _inputs(), id="bloom_style_probs_viewed_back"),
    pytest.param(_probs_viewed_back_after_dropout, _inputs(), id="probs_reshaped_back_after_dropout"),
    pytest.param(_clamp_max_tensor, _inputs(), id="clamp_torch_max_finfo_min"),
    pytest.param(_clamp_maximum_neg_inf_mask, _inputs(), id="clamp_maximum_after_neg_inf_fill"),
    pytest.param(_clamp_min_keyword, _inputs(), id="clamp_min_keyword"),
    pytest.param(_per_head_mask_view_and_restore, _inputs(), id="scores_viewed_and_restored"),
    pytest.param(_per_head_mask_unflatten_and_flatten, _inputs((B, H, N, N)), id="scores_unflattened_and_flattened"),
    pytest.param(_scale_after_bias, _inputs(), id="scale_after_bias"),
    pytest.param(_scale_after_bias_and_fill, _inputs(), id="scale_after_bias_and_fill"),
    pytest.param(_transformer_xl_rel_terms, _inputs(), id="relative_position_terms"),
]


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("fn,inputs", EXACT)
def test_form_is_rewritten_exactly(fn, inputs, frontend):
    compile_exactly(QKVM(fn), inputs(), frontend)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_scale_after_bias_folds_into_scale(frontend):
    cm = compile_form(QKVM(_scale_after_bias), _inputs()(), frontend)
    assert cm.report().sites[0].scale == pytest.approx(SCALE)


def _clamp_above_finfo_min(q, k, v, m):
    return torch.clamp(q @ k.transpose(-1, -2) * SCALE, min=-1.0).softmax(-1) @ v


def _clamp_by_tensor(q, k, v, m):
    return torch.maximum(q @ k.transpose(-1, -2) * SCALE, m.float() - 2.0).softmax(-1) @ v


def _negative_scale_after_mask(q, k, v, m):
    return ((q @ k.transpose(-1, -2)).masked_fill(~m, -1e4) * -0.5).softmax(-1) @ v


def _scores_returned_with_rel_terms(q, k, v, m):
    scores = q @ k.transpose(-1, -2) * SCALE + (q @ REL_POSITIONS.transpose(0, 1))
    return scores.softmax(-1) @ v, scores


def _probs_viewed_to_other_batch(q, k, v, m):
    probs = (q @ k.transpose(-1, -2) * SCALE).softmax(-1)
    return torch.bmm(probs.view(B * H, N, N), v.reshape(B * H, N, D))


REFUSED = [
    pytest.param(_clamp_above_finfo_min, "clamped below at -1", id="clamp_above_finfo_min"),
    pytest.param(_clamp_by_tensor, "clamped below by a value that is not a compile-time constant",
                 id="clamp_by_tensor"),
    pytest.param(_negative_scale_after_mask, "multiplied by -0.5 after a bias or mask", id="negative_scale_after_mask"),
    pytest.param(_scores_returned_with_rel_terms, "also returned from the graph", id="scores_returned"),
    pytest.param(_probs_viewed_to_other_batch, "not back to the shape of the scores' product",
                 id="probs_viewed_to_another_batch_layout"),
]


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("fn,phrase", REFUSED)
def test_form_is_refused_with_reason(fn, phrase, frontend):
    model, inputs = QKVM(fn), _inputs()()
    want = run_model(model, inputs)
    with pytest.warns(AttnccWarning) as said:
        cm = compile_form(model, inputs, frontend)
    rep = cm.report()
    assert count_ops(cm) == 0 and not rep.sites, cm.code()
    assert any(phrase in r.reason for r in rep.rejected), [r.reason for r in rep.rejected]
    assert any(phrase in str(w.message) for w in said)
    assert_same_outputs(run_model(cm, inputs), want, tol=0.0)
