"""apply_mods against a hand-written statement of each step of ScoreMods' semantics, and of their order."""

from __future__ import annotations

import torch

from attncc.variants.base import ScoreMods
from attncc.variants.score_mods import apply_mods, modified_scores, visible_pairs

NQ, NK = 5, 7
INF = float("-inf")


def _scores():
    return torch.randn(2, 3, NQ, NK, generator=torch.Generator().manual_seed(0))


def test_scale_only():
    s = _scores()
    assert torch.equal(apply_mods(s, ScoreMods(scale=0.5)), s * 0.5)


def test_softcap_after_scale():
    s = _scores()
    assert torch.equal(apply_mods(s, ScoreMods(scale=0.5, softcap=2.0)), 2.0 * torch.tanh((s * 0.5) / 2.0))


def test_bias_after_softcap_in_float32():
    s = _scores()
    bias = torch.randn(1, 3, NQ, NK).half()
    want = 2.0 * torch.tanh((s * 0.5) / 2.0) + bias.float()
    got = apply_mods(s, ScoreMods(scale=0.5, softcap=2.0, bias=bias))
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_mask_hides_with_minus_infinity():
    s = _scores()
    mask = torch.rand(2, 1, NQ, NK, generator=torch.Generator().manual_seed(1)) > 0.4
    assert torch.equal(apply_mods(s, ScoreMods(scale=1.0, mask=mask)), s.masked_fill(~mask, INF))


def test_causal_is_top_left_aligned():
    s = _scores()
    rows, cols = torch.arange(NQ)[:, None], torch.arange(NK)[None, :]
    assert torch.equal(apply_mods(s, ScoreMods(scale=1.0, causal=True)), s.masked_fill(cols > rows, INF))


def test_every_step_in_order():
    s = _scores()
    bias = torch.randn(NQ, NK)
    mask = torch.rand(1, 1, 1, NK, generator=torch.Generator().manual_seed(2)) > 0.3
    want = s * 0.3
    want = 4.0 * torch.tanh(want / 4.0)
    want = want + bias
    want = want.masked_fill(~mask, INF)
    want = want.masked_fill(torch.arange(NK)[None, :] > torch.arange(NQ)[:, None], INF)
    got = apply_mods(s, ScoreMods(scale=0.3, softcap=4.0, bias=bias, mask=mask, causal=True))
    assert torch.equal(got, want)


def test_query_positions_of_a_block_of_rows():
    """Rows 3..4 of the scores, scored alone, see the keys rows 3..4 of the whole matrix see."""
    s = _scores()
    whole = apply_mods(s, ScoreMods(scale=1.0, causal=True))
    block = apply_mods(s[..., 3:5, :], ScoreMods(scale=1.0, causal=True), torch.arange(3, 5), torch.arange(NK))
    assert torch.equal(block, whole[..., 3:5, :])


def test_visible_pairs_and_modified_scores_compose_to_apply_mods():
    s = _scores()
    mask = torch.rand(2, 3, NQ, NK, generator=torch.Generator().manual_seed(3)) > 0.5
    mods = ScoreMods(scale=0.7, softcap=1.5, bias=torch.randn(NQ, NK), mask=mask, causal=True)
    keep = visible_pairs(mods, torch.arange(NQ), torch.arange(NK))
    assert torch.equal(apply_mods(s, mods), modified_scores(s, mods).masked_fill(~keep, INF))
    assert visible_pairs(ScoreMods(scale=1.0), torch.arange(NQ), torch.arange(NK)) is None


def test_dropout_is_not_a_score_step():
    s = _scores()
    assert torch.equal(apply_mods(s, ScoreMods(scale=0.5, dropout_p=0.5)), s * 0.5)
