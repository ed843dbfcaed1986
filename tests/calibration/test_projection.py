"""Errors where they enter the residual stream: the output projection after each site, on real model code."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

import attncc
from attncc.calibration.interpreter import hooked

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _visits(model, inputs):
    """(visit, projection) of every site of ``model`` on ``inputs`` (compiled exact)."""
    seen = []

    def hook(visit):
        seen.append((visit, visit.projection()))
        return None

    compiled = attncc.compile(model, "exact", measure_error=False)
    with hooked(compiled, hook):
        with torch.no_grad():
            compiled(**inputs) if isinstance(inputs, dict) else compiled(inputs)
    return seen


def _check_head_errors(visit, projection, weight):
    """The Gram form equals projecting each head's error through its slice of the weight by hand."""
    torch.manual_seed(0)
    delta = torch.randn_like(visit.exact)
    b, h, n, dv = delta.shape
    got = projection.head_errors(delta, None)
    for head in range(h):
        by_hand = delta[:, head] @ weight[:, head * dv:(head + 1) * dv].T
        assert torch.allclose(got[:, head], by_hand.pow(2).sum((-1, -2)).double(), rtol=1e-4)


def test_bert_sites_feed_their_output_dense_layer():
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("bert", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, vocab_size=100)
    model = AutoModel.from_config(cfg).eval()
    ids = torch.randint(0, 100, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 20:] = 0
    seen = _visits(model, {"input_ids": ids, "attention_mask": mask})
    assert len(seen) == 2 and all(p is not None for _, p in seen)
    for layer, (visit, projection) in enumerate(seen):
        _check_head_errors(visit, projection, model.encoder.layer[layer].attention.output.dense.weight)
        rows = visit.query_rows()
        assert rows is not None and rows[1, 20:].sum() == 0 and rows[0].sum() == 24


def test_timm_vit_sites_feed_their_proj_layer():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    seen = _visits(model, torch.randn(1, 3, 32, 32))
    assert len(seen) == 2 and all(p is not None for _, p in seen)
    for layer, (visit, projection) in enumerate(seen):
        _check_head_errors(visit, projection, model.blocks[layer].attn.proj.weight)


class ScrambledHeads(nn.Module):
    """Attention whose output is laid out channel-major before the projection: head h is not columns h*Dv.."""

    def __init__(self, heads=2, dim=8):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, Dv]
        return self.proj(out.permute(0, 2, 3, 1).reshape(b, n, c))  # [B, N, Dv, H]: heads interleaved


class NonLinearAfter(ScrambledHeads):
    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(torch.relu(out.transpose(1, 2).reshape(b, n, c)))


@pytest.mark.parametrize("module", [ScrambledHeads, NonLinearAfter])
def test_no_projection_is_claimed_where_heads_do_not_map_to_column_slices(module):
    torch.manual_seed(0)
    seen = _visits(module().eval(), torch.randn(2, 10, 8))
    assert len(seen) == 1 and seen[0][1] is None
