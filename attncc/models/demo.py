"""The built-in demo model: a small GPT-style causal LM in plain PyTorch.

`attncc demo` compiles this model. Its attention is written the way classic
GPT code (minGPT / nanoGPT) writes it, explicit matmul -> scale -> masked_fill
-> softmax -> dropout -> matmul, because that is the hand-written pattern the
compiler must find in unmodified models. Everything is traceable by
`torch.fx.symbolic_trace` and `torch.compile`: no Python control flow depends
on tensor values or shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from attncc.errors import AttnccError
from attncc.models.memory import available_memory_bytes, format_bytes
from attncc.models.zoo import LoadedModel


@dataclass
class DemoConfig:
    """Sizes of the demo model; the defaults give about 4.5M parameters."""

    vocab_size: int = 512
    hidden: int = 256
    heads: int = 4
    layers: int = 4
    max_len: int = 4096
    dropout: float = 0.0


def causal_mask(max_len: int) -> torch.Tensor:
    """Lower-triangular keep-mask, bool [1, 1, max_len, max_len] (True = may attend).

    bool rather than float so that max_len=4096 costs 16 MB, not 64 MB.
    """
    return torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)).view(1, 1, max_len, max_len)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection."""

    def __init__(self, cfg: DemoConfig, causal: torch.Tensor):
        super().__init__()
        if cfg.hidden % cfg.heads != 0:
            raise ValueError(f"hidden ({cfg.hidden}) must be divisible by heads ({cfg.heads})")
        self.heads = cfg.heads
        self.head_dim = cfg.hidden // cfg.heads
        self.hidden = cfg.hidden
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.resid_drop = nn.Dropout(cfg.dropout)
        # Not persistent: it is derived from max_len, so it has no place in a checkpoint.
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, hidden] -> [B, T, hidden]."""
        T = x.size(1)
        qkv = self.qkv(x)
        # Index the split instead of unpacking it: unpacking a fx Proxy depends on
        # bytecode inspection, indexing is recorded as plain getitem nodes.
        parts = qkv.split(self.hidden, dim=2)
        # unflatten/flatten instead of view(B, T, ...) keeps B and T out of the graph.
        q = parts[0].unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # [B, H, T, D]
        k = parts[1].unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        v = parts[2].unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # [B, H, T, T]
        # Classic GPT code writes self.causal[:, :, :T, :T]. narrow is the same slice, but
        # torch.fx.symbolic_trace does not proxy buffers, and a plain tensor cannot be
        # indexed by a traced T, whereas torch.narrow records a traced T as an argument.
        mask = self.causal.narrow(2, 0, T).narrow(3, 0, T)  # bool [1, 1, T, T]
        att = att.masked_fill(mask == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_drop(att)
        y = att @ v  # [B, H, T, D]

        y = y.transpose(1, 2).flatten(-2)  # [B, T, hidden]
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: hidden -> 4*hidden -> GELU -> hidden."""

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.hidden, 4 * cfg.hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * cfg.hidden, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, hidden] -> [B, T, hidden]."""
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: DemoConfig, causal: torch.Tensor):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.attn = CausalSelfAttention(cfg, causal)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, hidden] -> [B, T, hidden]."""
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class DemoGPT(nn.Module):
    """GPT-style causal LM: token + learned position embeddings, pre-LN blocks, LM head."""

    def __init__(self, cfg: DemoConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else DemoConfig()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.pos_emb = nn.Parameter(torch.randn(cfg.max_len, cfg.hidden) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)
        # One mask tensor shared by every block, so the model holds 16 MB of mask
        # at max_len=4096 however many layers it has.
        causal = causal_mask(cfg.max_len)
        self.blocks = nn.ModuleList([Block(cfg, causal) for _ in range(cfg.layers)])
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda() convert each registered buffer separately, which would give
        # every block its own copy of the mask; point them back at one tensor.
        super()._apply(fn, recurse)
        if len(self.blocks) > 0:
            shared = self.blocks[0].attn.causal
            for block in self.blocks[1:]:
                block.attn.causal = shared
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: int64 [B, T] with T <= max_len -> logits float [B, T, vocab_size]."""
        T = input_ids.size(1)
        x = self.tok_emb(input_ids) + self.pos_emb[:T]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def build_demo_model(seq_len: int = 512, batch: int = 1, seed: int = 0) -> LoadedModel:
    """Build the demo model in eval mode with deterministic random weights.

    Returns a LoadedModel whose example_inputs is `(input_ids,)`, input_ids int64
    [batch, seq_len] in [0, vocab_size). max_len grows past its 4096 default only
    when seq_len needs it.
    """
    cfg = DemoConfig()
    cfg.max_len = max(cfg.max_len, seq_len)
    check_demo_fits(cfg, seq_len, batch)
    torch.manual_seed(seed)
    model = DemoGPT(cfg).eval()
    input_ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    n_params = sum(p.numel() for p in model.parameters())
    description = (
        f"demo: DemoGPT ({cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} heads, "
        f"vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M params), input_ids [{batch}, {seq_len}]"
    )
    return LoadedModel(model=model, example_inputs=(input_ids,), description=description)


def demo_memory_bytes(cfg: DemoConfig, seq_len: int, batch: int) -> tuple[int, int]:
    """(causal mask, attention scores) bytes the demo needs at these sizes: the bool mask is
    ``max_len x max_len``; one layer's attention holds about two fp32 ``[batch, heads, T, T]`` score tensors at
    once (the scores and their masked / softmaxed copy)."""
    mask = cfg.max_len * cfg.max_len
    scores = 2 * 4 * batch * cfg.heads * seq_len * seq_len
    return mask, scores


def check_demo_fits(cfg: DemoConfig, seq_len: int, batch: int, available: int | None = None) -> None:
    """Raise AttnccError when the demo's mask and scores would not fit in the memory available (``available``
    bytes; default: what the host reports), so an oversized ``--seq-len`` is one line, not an allocator crash."""
    available = available_memory_bytes() if available is None else available
    if available is None:
        return
    mask, scores = demo_memory_bytes(cfg, seq_len, batch)
    if mask + scores > available:
        raise AttnccError(
            f"the demo at seq_len {seq_len}, batch {batch} needs about {format_bytes(mask + scores)} (causal mask "
            f"{format_bytes(mask)} + attention scores {format_bytes(scores)}), more than the "
            f"{format_bytes(available)} of memory available; use a smaller seq_len or batch")
