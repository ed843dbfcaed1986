"""The exact variant: softmax attention with SDPA semantics, plus additive bias, bool mask and softcapping.

Semantics, for q ``[*batch, Nq, Dqk]``, k ``[*batch_kv, Nk, Dqk]``, v ``[*batch_kv, Nk, Dv]``::

    s = (q @ k^T) * scale
    s = softcap * tanh(s / softcap)            if softcap > 0
    s = s + bias                               if bias is given (broadcast to [*batch, Nq, Nk])
    s = s.masked_fill(~mask, -inf)             if mask is given (bool, True = attend)
    s = s.masked_fill(j > i, -inf)             if causal (top-left aligned, as SDPA's is_causal)
    p = softmax(s, -1)                         or, with learned sink logits sinks [Hq]:
    p = softmax(cat([s, sinks[h]], -1), -1)[..., :-1]     (one more term in each row's denominator)
    out = dropout(p, dropout_p) @ v

``batch_kv`` either broadcasts to ``batch`` or, for GQA, has ``Hkv`` heads where q has ``Hq = g * Hkv``;
query head ``h`` then reads key/value head ``h // g`` (SDPA's ``enable_gqa``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor

from attncc.util import rows_of
from attncc.variants.base import ScoreMods, VariantSpec, attention_cost, site_sizes, softmax_with_sink
from attncc.variants.score_mods import apply_mods, visible_pairs
from attncc.variants.registry import register_variant


@register_variant
@dataclass(frozen=True)
class ExactSpec(VariantSpec):
    """Exact softmax attention; no parameters. Masks the model already has (causal, sliding-window bands,
    padding, segments) are applied exactly; the structured ones skip the blocks they mask out."""

    name: ClassVar[str] = "exact"
    exact: ClassVar[bool] = True
    listed: ClassVar[int] = 0

    @classmethod
    def examples(cls) -> tuple[VariantSpec, ...]:
        return (cls(),)

    @classmethod
    def exact_limit(cls, n: int) -> VariantSpec:
        return cls()

    def supports(self, site) -> tuple[bool, str]:
        """Every detected site can run exactly."""
        return True, "exact softmax attention"

    def specialize(self, site) -> VariantSpec:
        """The site's exact form (:func:`exact_spec`): its model's band where it has one."""
        return exact_spec(site)

    def cost(self, site) -> dict[str, sympy.Expr]:
        """Attention FLOPs and bytes as sympy expressions of the site's sizes (2 FLOPs per multiply-add); a
        causal site scores only the pairs on or below the diagonal."""
        s = site_sizes(site)
        pairs = s["Nq"] * (s["Nq"] + 1) / 2 if site.causal else s["Nq"] * s["Nk"]
        return attention_cost(site, pairs)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        return exact_forward(q, k, v, mods)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        return reference(q, k, v, bias=mods.bias, mask=mods.mask, scale=mods.scale, causal=mods.causal,
                         softcap=mods.softcap, sinks=mods.sinks)


def exact_spec(site) -> VariantSpec:
    """The spec that runs ``site`` exactly: ``local(left=L, right=R)`` where the model's mask is the sliding
    window ``site.band == (L, R)`` (exact, and it skips the blocks outside the window), else ``exact``."""
    if getattr(site, "band", None) is not None:
        from attncc.variants.local import LocalSpec  # local imports this module (masked_reference)

        return LocalSpec(left=site.band[0], right=site.band[1])
    return ExactSpec()


def dense_attention_cost(site) -> dict[str, sympy.Expr]:
    """FLOPs and bytes of dense attention over every (query, key) pair: what a model's own attention code
    computes when it builds the full score matrix and masks it."""
    s = site_sizes(site)
    return attention_cost(site, s["Nq"] * s["Nk"])


def expand_kv_heads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Bring k and v to q's batch dims: broadcast, or keep grouped heads for GQA.

    Returns ``(q, k, v, gqa)``; with ``gqa`` True, k and v keep ``Hkv`` heads at dim -3 and q has a multiple.
    """
    bq, bk, bv = q.shape[:-2], k.shape[:-2], v.shape[:-2]
    if bq == bk == bv:
        return q, k, v, False
    if (
        len(bq) >= 1 and len(bq) == len(bk) == len(bv) and bk == bv and bk[-1] not in (1, bq[-1])
        and bq[-1] % bk[-1] == 0
    ):
        outer = torch.broadcast_shapes(bq[:-1], bk[:-1])
        q = q.expand(*outer, *q.shape[-3:])
        k = k.expand(*outer, *k.shape[-3:])
        v = v.expand(*outer, *v.shape[-3:])
        return q, k, v, True
    batch = torch.broadcast_shapes(bq, bk, bv)
    return q.expand(*batch, *q.shape[-2:]), k.expand(*batch, *k.shape[-2:]), v.expand(*batch, *v.shape[-2:]), False


def _repeat_gqa(q: Tensor, x: Tensor) -> Tensor:
    groups = q.shape[-3] // x.shape[-3]
    return x.repeat_interleave(groups, dim=-3)


def per_head(sinks: Optional[Tensor], trailing: int) -> Optional[Tensor]:
    """Learned sink logits ``[Hq]`` as float32 ``[Hq, 1 x trailing]``, aligned with the head dim of scores
    ``[..., Hq, Nq, Nk]`` (trailing=2) or of row values ``[..., Hq, Nq]`` (trailing=1); one shared logit
    (``[1]``) becomes a scalar."""
    if sinks is None:
        return None
    if sinks.numel() == 1:
        return sinks.float().reshape(())
    return sinks.float().reshape(-1, *(1,) * trailing)


def reference(
    q: Tensor, k: Tensor, v: Tensor, *, bias: Optional[Tensor] = None, mask: Optional[Tensor] = None,
    scale: Optional[float] = None, causal: bool = False, softcap: float = 0.0, sinks: Optional[Tensor] = None,
) -> Tensor:
    """The test oracle: plain float32 math with an explicit ``[*batch, Nq, Nk]`` score tensor (no dropout);
    learned ``sinks`` are concatenated as a score column and dropped after the softmax, as models write it."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q, k, v, gqa = expand_kv_heads(q, k, v)
    if gqa:
        k, v = _repeat_gqa(q, k), _repeat_gqa(q, v)
    mods = ScoreMods(scale=scale, causal=causal, softcap=softcap, bias=bias, mask=mask)
    s = apply_mods(q.float() @ k.float().transpose(-2, -1), mods)
    if sinks is not None:
        column = per_head(sinks, 2).expand(*s.shape[:-1], 1)
        return (torch.softmax(torch.cat([s, column], dim=-1), dim=-1)[..., :-1] @ v.float()).to(q.dtype)
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)


def masked_reference(q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods, keep: Optional[Tensor]) -> Tensor:
    """Plain float32 oracle: exact attention restricted to ``keep`` (bool, broadcastable to [B, Hq, Nq, Nk]).

    q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``, v ``[B, Hkv, Nk, Dv]`` -> ``[B, Hq, Nq, Dv]`` in q's dtype.
    Builds the full score matrix (it is the oracle). Rows with no visible key return zeros, with finite
    gradients (no NaN from softmax over an all -inf row). ``mods.sinks`` add ``exp(sink)`` to each row's
    denominator.
    """
    qe, ke, ve, gqa = expand_kv_heads(q, k, v)
    if gqa:
        g = qe.shape[-3] // ke.shape[-3]
        ke, ve = ke.repeat_interleave(g, dim=-3), ve.repeat_interleave(g, dim=-3)
    s = apply_mods(qe.float() @ ke.float().transpose(-2, -1), mods)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach()
    sink = per_head(mods.sinks, 2)
    if sink is not None:
        m = torch.maximum(m, sink.detach())
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - m)
    out = (p @ ve.float()) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.to(q.dtype)


def _dropout_keep(shape, p: float, seed: Tensor, device) -> Tensor:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return torch.rand(shape, generator=generator, device=device) >= p


def explicit_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], scale: float, causal: bool,
    softcap: float, dropout_p: float, dropout_seed: Optional[Tensor], query_chunk: int = 1024,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """Exact attention by explicit scores, a block of queries at a time (differentiable).

    Used where SDPA lacks the feature (softcapping, seeded dropout that backward must replay, learned sinks
    under autograd). Scores are materialized ``query_chunk`` rows at a time, so memory is
    ``O(query_chunk * Nk)`` per head.
    """
    sink = per_head(sinks, 2)
    q, k, v, gqa = expand_kv_heads(q, k, v)
    if gqa:
        k, v = _repeat_gqa(q, k), _repeat_gqa(q, v)
    nq, nk = q.shape[-2], k.shape[-2]
    keep_all = None
    if dropout_p > 0 and dropout_seed is not None:
        keep_all = _dropout_keep((*q.shape[:-2], nq, nk), dropout_p, dropout_seed, q.device)
    outs = []
    k_pos = torch.arange(nk, device=q.device)
    for start in range(0, nq, query_chunk):
        stop = min(nq, start + query_chunk)
        row_mods = ScoreMods(scale=scale, causal=causal, softcap=softcap, bias=rows_of(bias, start, stop),
                             mask=rows_of(mask, start, stop))
        s = apply_mods(q[..., start:stop, :].float() @ k.float().transpose(-2, -1), row_mods,
                       torch.arange(start, stop, device=q.device), k_pos)  # [*, Bq, Nk]
        p = softmax_with_sink(s, sink)
        if keep_all is not None:
            p = p * keep_all[..., start:stop, :] / (1.0 - dropout_p)
        elif dropout_p > 0:
            p = F.dropout(p, dropout_p, training=True)
        outs.append(p.to(v.dtype) @ v)
    return torch.cat(outs, dim=-2).to(q.dtype)


def combined_sdpa_mask(q: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], causal: bool, nk: int):
    """Fold bias, bool mask and causality into SDPA's single ``attn_mask`` (None when none applies)."""
    if bias is None and mask is None:
        return None
    keep = visible_pairs(ScoreMods(scale=1.0, causal=causal, mask=mask), torch.arange(q.shape[-2], device=q.device),
                         torch.arange(nk, device=q.device))
    if bias is None:
        return keep
    b = bias.to(q.dtype)
    return b if keep is None else b.masked_fill(~keep, float("-inf"))


def exact_forward(q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
    """``exact_attention`` under ``mods`` (dropout included): the exact variant's torch path."""
    return exact_attention(q, k, v, mods.bias, mods.mask, mods.scale, mods.causal, mods.softcap, mods.dropout_p,
                           mods.dropout_seed, mods.sinks)


def exact_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, mask: Optional[Tensor] = None,
    scale: Optional[float] = None, causal: bool = False, softcap: float = 0.0, dropout_p: float = 0.0,
    dropout_seed: Optional[Tensor] = None, sinks: Optional[Tensor] = None,
) -> Tensor:
    """The efficient torch path: SDPA (fused, never an N x N tensor without a mask) wherever it applies.

    Shapes as in the module docstring (``sinks``: ``[Hq]`` or ``[1]``); returns ``[*batch, Nq, Dv]`` in q's
    dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if sinks is not None:
        return _exact_with_sinks(q, k, v, bias, mask, scale, causal, softcap, dropout_p, dropout_seed, sinks)
    if softcap > 0 or (dropout_p > 0 and dropout_seed is not None):
        return explicit_attention(q, k, v, bias, mask, scale, causal, softcap, dropout_p, dropout_seed)
    q, k, v, gqa = expand_kv_heads(q, k, v)
    lengths = _prefix_key_lengths(q, k, mask) if causal and bias is None and dropout_p == 0 else None
    if lengths is not None:
        return _causal_per_batch(q, k, v, lengths, scale, gqa)
    attn_mask = combined_sdpa_mask(q, bias, mask, causal, k.shape[-2])
    if gqa:
        k, v = _repeat_gqa(q, k), _repeat_gqa(q, v)
    if v.dtype != q.dtype:
        v = v.to(q.dtype)
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal and attn_mask is None, scale=scale
    )


def _prefix_key_lengths(q: Tensor, k: Tensor, mask: Optional[Tensor]) -> Optional[list[int]]:
    """Per-batch key lengths when ``mask`` is a right-padding mask ``[B, 1, 1, Nk]`` (each row a run of True
    then False) on a 4-D self-attention shape; None for any other mask."""
    if mask is None or mask.dim() != 4 or q.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        return None
    if q.shape[-2] != k.shape[-2] or mask.shape[-1] != k.shape[-2] or mask.shape[0] not in (1, q.shape[0]):
        return None
    keep = mask[:, 0, 0, :]
    lengths = keep.sum(dim=-1)
    prefix = torch.arange(keep.shape[-1], device=keep.device)[None, :] < lengths[:, None]
    if not torch.equal(prefix, keep) or bool((lengths == 0).any()):
        return None
    return [int(n) for n in lengths.expand(q.shape[0]).tolist()]


def _causal_per_batch(q: Tensor, k: Tensor, v: Tensor, lengths: list[int], scale: float, gqa: bool) -> Tensor:
    """Causal attention with right padding, exactly, without a mask: batch row b only reads its first
    ``lengths[b]`` keys (the others are masked for every query), so SDPA's causal kernel skips them."""
    if gqa:
        k, v = _repeat_gqa(q, k), _repeat_gqa(q, v)
    k, v = k.to(q.dtype), v.to(q.dtype)
    if all(n == k.shape[-2] for n in lengths):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    rows = [
        F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, ..., :n, :], v[b:b + 1, ..., :n, :], is_causal=True,
                                       scale=scale)
        for b, n in enumerate(lengths)
    ]
    return torch.cat(rows, dim=0)


def _exact_with_sinks(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], scale: float, causal: bool,
    softcap: float, dropout_p: float, dropout_seed: Optional[Tensor], sinks: Tensor,
) -> Tensor:
    """Exact attention with learned sink logits.

    A row's softmax without the sink has denominator ``Z = exp(lse)`` (``lse``: the logsumexp of its scores);
    the sink makes it ``Z + exp(sink)`` and leaves the numerators alone, so every probability, hence the output,
    is the plain one times ``Z / (Z + exp(sink)) = 1 / (1 + exp(sink - lse)) = sigmoid(lse - sink)``. Without
    autograd, dropout or softcapping, one fused SDPA kernel that also returns ``lse`` gives the plain output and
    this rescales it; otherwise (or where no such kernel applies) explicit scores with the sink term run, a
    block of queries at a time.
    """
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias, sinks))
    fused = None
    if softcap == 0 and dropout_p == 0 and not needs_grad:
        fused = _sdpa_with_lse(q, k, v, bias, mask, scale, causal)
    if fused is None:
        return explicit_attention(q, k, v, bias, mask, scale, causal, softcap, dropout_p, dropout_seed, sinks=sinks)
    out, lse = fused
    keep = torch.sigmoid(lse.float() - per_head(sinks, 1))
    return (out.float() * keep[..., None]).to(q.dtype)


def _sdpa_with_lse(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], scale: float, causal: bool,
) -> Optional[tuple[Tensor, Tensor]]:
    """SDPA's output ``[B, H, Nq, Dv]`` and each row's float32 logsumexp ``[B, H, Nq]`` from the fused CPU kernel
    that returns it; None where it does not apply (ranks other than 4, other devices, shapes it refuses). On
    CUDA the Triton kernels carry sinks themselves, so only autograd/torch-backend calls reach this path, and
    they run the explicit one (no fused kernel's logsumexp convention there is relied on unverified)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.device.type != "cpu":
        return None
    q, k, v, gqa = expand_kv_heads(q, k, v)
    if gqa:
        k, v = _repeat_gqa(q, k), _repeat_gqa(q, v)
    k, v = k.to(q.dtype), v.to(q.dtype)
    nk, d, dv = k.shape[-2], q.shape[-1], v.shape[-1]
    if d != dv:  # these kernels want one head size: zero channels change neither scores nor outputs
        width = max(d, dv)
        q, k, v = F.pad(q, (0, width - d)), F.pad(k, (0, width - d)), F.pad(v, (0, width - dv))
    attn_mask = combined_sdpa_mask(q, bias, mask, causal, nk)
    if attn_mask is not None:  # an additive mask of q's dtype, 4-D (what the kernels accept)
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~attn_mask, float("-inf"))
        attn_mask = attn_mask.to(q.dtype).reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    is_causal = causal and attn_mask is None
    try:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale)
    except (RuntimeError, AttributeError):  # an older torch without it, or a shape it refuses
        return None
    return out[..., :dv], lse
