"""A two-layer model whose attention attncc captures with fx (4 heads of 8, hidden 32): the calibration tests'
model, importable by the fresh processes they start."""

from __future__ import annotations

import torch
import torch.nn as nn


VOCAB = 64


class SelfAttention(nn.Module):
    def __init__(self, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (hidden // self.heads) ** 0.5
        mixed = torch.softmax(scores, dim=-1) @ v
        return self.out(mixed.transpose(1, 2).reshape(batch, length, hidden))


class TinyModel(nn.Module):
    """Token ids int64 [B, N] in [0, 64) -> hidden states float32 [B, N, hidden]."""

    def __init__(self, hidden: int = 32, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.layers = nn.ModuleList([SelfAttention(hidden) for _ in range(layers)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)
        return x


def build(seed: int = 0, hidden: int = 32) -> tuple[TinyModel, torch.Tensor]:
    """The model (eval mode, seeded weights) and its input, token ids int64 [2, 64]."""
    torch.manual_seed(seed)
    model = TinyModel(hidden).eval()
    return model, torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))


def factory(seq_len: int = 64, batch: int = 1) -> tuple[TinyModel, tuple[torch.Tensor]]:
    """For model specs (``tiny_attention_model.py:factory``): the model and an input of ``seq_len`` tokens."""
    model, _ = build()
    return model, (torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(1)),)


def wide_factory() -> tuple[TinyModel, tuple[torch.Tensor]]:
    """Another architecture of the same class (hidden 64), for model specs."""
    model, ids = build(hidden=64)
    return model, (ids,)
