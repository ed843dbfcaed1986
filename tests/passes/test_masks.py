"""Mask analysis: causal, sliding-window and padding structure recovered from the graph, exactly."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attncc
from attncc.passes.masks import band_of


class IndexMaskAttention(nn.Module):
    """Builds its mask as transformers 5.x does: index comparisons and attention_mask[batch_idx, kv_idx]."""

    def __init__(self, causal=True, window=None, padding=True, explicit=False, dim=32, heads=2):
        super().__init__()
        self.causal, self.window, self.padding, self.explicit, self.heads = causal, window, padding, explicit, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.scale = (dim // heads) ** -0.5

    def forward(self, x, attention_mask):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        batch_idx = torch.arange(b)[:, None, None, None]
        q_idx = torch.arange(n)[None, None, :, None]
        kv_idx = torch.arange(n)[None, None, None, :]
        keep = q_idx.new_ones((), dtype=torch.bool)
        keep = keep & (q_idx >= 0)
        if self.causal:
            keep = keep & (kv_idx <= q_idx)
        if self.window is not None:
            keep = keep & (kv_idx > q_idx - self.window)
        if self.padding:
            keep = keep & attention_mask.to(torch.bool)[batch_idx, kv_idx]
        keep = keep.expand(b, -1, n, n)
        if not self.explicit:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        additive = torch.where(keep, torch.tensor(0.0), torch.finfo(torch.float32).min)
        att = (q @ k.transpose(-2, -1)) * self.scale + additive
        return att.softmax(-1) @ v


def inputs(n=40, b=2):
    torch.manual_seed(0)
    x = torch.randn(b, n, 32)
    am = torch.ones(b, n, dtype=torch.long)
    am[1, n - 7:] = 0
    return x, am


@pytest.mark.parametrize("frontend", ["fx", "dynamo"])
@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("causal, window, padding, mask", [
    (True, None, True, "causal+padding"),
    (True, 8, True, "causal+window 8+padding"),
    (True, None, False, "causal"),
    (False, None, True, "padding"),
    (False, None, False, "none"),
])
def test_index_masks_become_structure(frontend, explicit, causal, window, padding, mask):
    torch._dynamo.reset()
    model = IndexMaskAttention(causal, window, padding, explicit).eval()
    x, am = inputs()
    cm = attncc.compile(model, "exact", (x, am), frontend=frontend, strict=True)
    site = cm.report().sites[0]
    assert site.mask == mask
    assert site.causal == causal
    code = cm.code()
    assert "arange" not in code or padding, "the index arithmetic of a structural mask is gone"
    with torch.no_grad():
        torch.testing.assert_close(cm(x, am), model(x, am), rtol=1e-5, atol=1e-5)
        x2, am2 = inputs(n=23, b=2)
        if frontend == "fx":  # the same fx graph serves another length: the structure does not depend on it
            torch.testing.assert_close(cm(x2, am2), model(x2, am2), rtol=1e-5, atol=1e-5)


def test_window_runs_as_exact_band_and_costs_less():
    model = IndexMaskAttention(True, 8, False).eval()
    x, am = inputs(n=64)
    cm = attncc.compile(model, "exact", (x, am), strict=True)
    site = cm.report().sites[0]
    assert site.variant == "exact"
    assert "local(left=7, right=0)" in cm.code()
    assert site.flops_after < site.flops_before / 3


class TrilBufferAttention(nn.Module):
    """GPT-style: a tril buffer sliced to the length (narrow), masked_fill(mask == 0, -inf)."""

    def __init__(self, max_len=128, band=None):
        super().__init__()
        keep = torch.ones(max_len, max_len, dtype=torch.bool).tril()
        if band is not None:
            keep = keep.triu(-band)
        self.register_buffer("mask", keep.view(1, 1, max_len, max_len).to(torch.uint8))
        self.qkv = nn.Linear(32, 96)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * 0.25
        m = self.mask.narrow(2, 0, n).narrow(3, 0, n)
        att = att.masked_fill(m == 0, float("-inf"))
        return att.softmax(-1) @ v


@pytest.mark.parametrize("band, mask", [(None, "causal"), (5, "causal+window 6")])
def test_tril_buffer_is_causal_at_every_length(band, mask):
    model = TrilBufferAttention(band=band).eval()
    x = torch.randn(2, 50, 32)
    cm = attncc.compile(model, "exact", (x,), frontend="fx", strict=True)
    assert cm.report().sites[0].mask == mask
    with torch.no_grad():
        for n in (50, 17, 128):
            x = torch.randn(1, n, 32)
            torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-5)


class OddMaskAttention(nn.Module):
    """A mask attncc cannot explain (keys at even distance): it must stay a dense tensor, still exact."""

    def forward(self, q, k, v):
        n = q.shape[-2]
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=((i - j) % 2) == 0)


def test_unexplained_mask_stays_dense_and_exact():
    q, k, v = (torch.randn(1, 2, 20, 16) for _ in range(3))
    model = OddMaskAttention()
    cm = attncc.compile(model, "exact", (q, k, v), frontend="dynamo", strict=True)
    site = cm.report().sites[0]
    assert site.mask == "dense" and not site.causal
    torch.testing.assert_close(cm(q, k, v), model(q, k, v))
    torch._dynamo.reset()


def test_band_of():
    n = 10
    keep = torch.ones(n, n, dtype=torch.bool).tril()
    assert band_of(keep) == (None, 0)
    assert band_of(keep.triu(-3)) == (3, 0)
    assert band_of(torch.ones(n, n, dtype=torch.bool)) == (None, None)
    odd = keep.clone()
    odd[5, 2] = False
    assert band_of(odd) is None
    assert band_of(keep.view(1, 1, n, n).expand(2, 1, n, n)) is None


class DocumentMaskAttention(nn.Module):
    """Packed sequences: a token attends (causally) only within its document, doc ids computed from the
    input as transformers does for packed batches (cumsum of document starts)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)

    def forward(self, x, starts):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
        docs = starts.cumsum(-1)                                   # [B, N] document id per token
        bi = torch.arange(b)[:, None, None, None]
        qi = torch.arange(n)[None, None, :, None]
        ki = torch.arange(n)[None, None, None, :]
        keep = (ki <= qi) & (docs[bi, qi] == docs[bi, ki])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def test_document_masks_become_segments_and_stay_exact():
    torch._dynamo.reset()
    model = DocumentMaskAttention().eval()
    x = torch.randn(2, 150, 32)
    starts = torch.zeros(2, 150, dtype=torch.long)
    starts[0, [40, 90]] = 1
    starts[1, 7] = 1
    cm = attncc.compile(model, "exact", (x, starts), frontend="dynamo", strict=True)
    site = cm.report().sites[0]
    assert site.mask == "segments+causal"
    with torch.no_grad():
        torch.testing.assert_close(cm(x, starts), model(x, starts), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
