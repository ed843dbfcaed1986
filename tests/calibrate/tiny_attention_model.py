"""A two-layer model whose attention attncc captures with fx (4 heads of 8, hidden 32): the calibration tests'
model, importable by the fresh processes they start."""

from __future__ import annotations

import torch
import torch.nn as nn


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
    def __init__(self, hidden: int = 32, layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList([SelfAttention(hidden) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def build(seed: int = 0, hidden: int = 32) -> tuple[TinyModel, torch.Tensor]:
    """The model (eval mode, seeded weights) and its input, float32 [2, 64, hidden]."""
    torch.manual_seed(seed)
    model = TinyModel(hidden).eval()
    return model, torch.randn(2, 64, hidden, generator=torch.Generator().manual_seed(1))
