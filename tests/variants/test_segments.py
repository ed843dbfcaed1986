"""Region masks (Swin's shifted windows): exact against a dense additive mask, with and without mixed windows."""

import pytest
import torch

from attncc.variants.exact import reference
from attncc.variants.segments import region_bias, segment_attention


def labels_for(n_windows: int, n: int, mixed: list[int]) -> torch.Tensor:
    labels = torch.zeros(n_windows, n, dtype=torch.int64)
    for w in mixed:  # windows holding several regions: tokens split in three runs
        labels[w, n // 3:] = 1
        labels[w, 2 * n // 3:] = 2
    return labels


@pytest.mark.parametrize("mixed", [[], [1], [0, 2, 3]], ids=["uniform", "one-mixed", "three-mixed"])
@pytest.mark.parametrize("fill", [-100.0, float("-inf")])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_dense_additive_mask(mixed, fill, batch):
    torch.manual_seed(0)
    n_windows, heads, n, d = 4, 2, 49, 16
    rows = batch * n_windows
    q, k, v = (torch.randn(rows, heads, n, d) for _ in range(3))
    bias = torch.randn(1, heads, n, n)
    labels = labels_for(n_windows, n, mixed)
    out = segment_attention(q, k, v, labels, fill, bias, None, 0.25, False, 0.0, 0.0, None)
    dense = region_bias(labels.repeat(batch, 1), fill, torch.float32)   # [rows, 1, n, n]
    want = reference(q, k, v, bias=bias + dense, scale=0.25)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_region_bias_values():
    labels = torch.tensor([[0, 0, 1]])
    b = region_bias(labels, -100.0, torch.float32)[0, 0]
    assert b.tolist() == [[0, 0, -100], [0, 0, -100], [-100, -100, 0]]


@pytest.mark.parametrize("causal", [False, True])
def test_documents_skip_other_documents_exactly(causal):
    torch.manual_seed(0)
    b, h, n, d = 2, 2, 300, 16
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    labels = torch.zeros(b, n, dtype=torch.int64)
    labels[0, 100:] = 1
    labels[0, 230:] = 2
    out = segment_attention(q, k, v, labels, float("-inf"), None, None, 0.25, causal, 0.0, 0.0, None)
    keep = labels[:, None, :, None] == labels[:, None, None, :]
    want = reference(q, k, v, mask=keep, scale=0.25, causal=causal)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
