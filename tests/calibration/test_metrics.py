"""End-to-end error metrics: per sample, padding never counts."""

from __future__ import annotations

import pytest
import torch

from attncc.calibration.metrics import cosine_error, logits_kl_error, metric_function, rel_l2_error
from attncc.errors import AttnccError


def test_padding_positions_do_not_change_any_metric():
    torch.manual_seed(0)
    ref = torch.randn(2, 6, 8)
    out = ref + 0.1 * torch.randn(2, 6, 8)
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])}
    garbage = out.clone()
    garbage[1, 3:] = 1e3  # padded positions of row 1
    for metric in (cosine_error, rel_l2_error, logits_kl_error):
        assert torch.allclose(metric(out, ref, batch), metric(garbage, ref, batch)), metric.__name__
        assert metric(ref, ref, batch).abs().max() < 1e-12


def test_cosine_is_of_the_mean_pooled_embedding():
    ref = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    out = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # tokens swapped: the same mean, cosine 1
    assert float(cosine_error(out, ref, {})) == pytest.approx(0.0, abs=1e-12)
    assert float(rel_l2_error(out, ref, {})) > 1.0


def test_unknown_metric_is_one_clear_error():
    with pytest.raises(AttnccError, match="metric must be one of cosine, rel_l2, logits_kl"):
        metric_function("mse")
