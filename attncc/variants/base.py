"""What every variant family provides, and the inputs its attention functions receive.

A variant is a frozen dataclass spec (its parameters, validated in ``__post_init__``) with:

* ``supports(site) -> (bool, reason)``: whether it can replace this detected site, and why not;
* ``cost(site) -> {"flops": expr, "bytes": expr}``: sympy expressions of the site's sizes;
* ``forward(q, k, v, mods) -> out``: the efficient PyTorch path (never an N x N tensor where the variant is
  sub-quadratic);
* ``reference(q, k, v, mods) -> out``: the plain oracle tests compare against (dense masks allowed);
* ``str(spec)``: its canonical text, e.g. ``local(window=256, sinks=4)`` (parameters left at their default
  are omitted); parsing that text
  (``attncc.variants.parse_variant``) gives an equal spec. The op carries this text, so graphs stay readable
  and survive torch.compile and torch.export.

Tensors are in SDPA layout: q ``[B, Hq, Nq, Dqk]``, k ``[B, Hkv, Nk, Dqk]``, v ``[B, Hkv, Nk, Dv]`` with
``Hq % Hkv == 0`` (query head h reads key/value head ``h // (Hq // Hkv)``); the output is ``[B, Hq, Nq, Dv]``
in q's dtype.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import ClassVar, Optional, Union

import sympy
import torch
from torch import Tensor

from attncc.errors import AttnccError


@dataclass(frozen=True)
class ScoreMods:
    """What the model does to the plain scores ``q @ k^T * scale`` before softmax, besides the variant's own
    sparsity pattern. Every variant applies all of these that it supports (``supports`` declines the rest).

    Semantics (in this order)::

        s = (q @ k^T) * scale
        s = softcap * tanh(s / softcap)      if softcap > 0
        s = s + bias                         if bias is not None    (float, broadcastable to [B, Hq, Nq, Nk])
        s[~mask] = -inf                      if mask is not None    (bool, broadcastable to [B, Hq, Nq, Nk])
        s[j > i] = -inf                      if causal              (top-left aligned, SDPA's is_causal)
        p = softmax(s)                       or, with sinks: softmax(cat([s, sinks[h]], -1))[..., :-1]
        p = dropout(p, dropout_p)            if dropout_p > 0       (seeded by dropout_seed when given)

    ``attncc.variants.score_mods.apply_mods`` is this statement in torch (the steps before the softmax).
    """

    scale: float
    causal: bool = False
    softcap: float = 0.0
    bias: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    """Usually a key-padding mask ``[B, 1, 1, Nk]`` (what mask analysis leaves after taking out causal and
    band structure); may be any shape broadcastable to ``[B, Hq, Nq, Nk]``."""
    sinks: Optional[Tensor] = None
    """Learned sink logits, float ``[Hq]`` (gpt-oss): every row of query head h gets ``exp(sinks[h])`` in its
    softmax denominator and nothing in its output (a row with no visible key then returns zeros as well)."""
    dropout_p: float = 0.0
    """Dropout on the probabilities; only the exact variant supports it (the others raise)."""
    dropout_seed: Optional[Tensor] = None
    """int64 scalar tensor seeding the dropout draw, so backward replays the same mask (None: torch's RNG)."""

    @staticmethod
    def default_scale(q: Tensor) -> float:
        return 1.0 / math.sqrt(q.shape[-1])


def softmax_with_sink(s: Tensor, sink: Optional[Tensor]) -> Tensor:
    """``softmax(cat([s, sink], -1), -1)[..., :-1]`` without the copy: float scores ``s`` ``[..., Nk]`` and a
    sink logit per row (``sink`` broadcastable to ``s[..., :1]``); a plain softmax when ``sink`` is None.

    Differentiable in both (the shift ``m`` is detached: the value does not depend on it). Hidden scores may
    be ``-inf`` or any very negative number; a row with every score hidden gives zeros.
    """
    if sink is None:
        return torch.softmax(s, dim=-1)
    m = torch.maximum(s.amax(dim=-1, keepdim=True), sink).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    return e / (e.sum(dim=-1, keepdim=True) + torch.exp(sink - m))


def sink_rows(sinks: Optional[Tensor], *shape: int) -> Optional[Tensor]:
    """``sinks`` ``[Hq]`` (or ``[1]``) as float32 viewed to ``shape`` (e.g. ``(1, Hkv, 1, g, 1, 1)`` for a layout
    that splits query heads into kv heads and groups), to broadcast against scores; None stays None."""
    if sinks is None:
        return None
    sinks = sinks.float()
    if sinks.numel() == math.prod(shape):
        return sinks.reshape(shape)
    if sinks.numel() == 1:
        return sinks.reshape((1,) * len(shape))
    raise AttnccError(f"sinks of shape {tuple(sinks.shape)} are not one logit per query head ({math.prod(shape)})")


EXAMPLE_TOKENS = 19
"""The sequence length ``VariantSpec.examples`` are made for (odd, so that blocks and tiles end ragged)."""


class VariantSpec:
    """Base class of variant specs (subclasses are frozen dataclasses)."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    """True when the variant computes softmax attention exactly (the report measures no error to expect)."""
    listed: ClassVar[int] = 100
    """Where the family appears in lists of variants (error messages, ``VARIANTS``): lower first."""

    @classmethod
    def examples(cls) -> tuple["VariantSpec", ...]:
        """A few specs of this family that run on self-attention over ``EXAMPLE_TOKENS`` tokens (the contract
        tests, ``tests/variants/test_contract.py``, run every registered family's examples)."""
        return ()

    @classmethod
    def exact_limit(cls, n: int) -> Optional["VariantSpec"]:
        """A spec of this family that is exact softmax attention on ``n``-token self-attention (its degenerate
        limit: a window over every key, every block kept), or None where the family has none."""
        return None

    def supports(self, site) -> tuple[bool, str]:
        raise NotImplementedError

    def aligns_last_queries(self) -> bool:
        """True when calls with fewer queries than keys place the queries at the last positions (bottom-right:
        decode with a KV cache); the dispatch then runs a causal such call (SDPA's top-left ``is_causal``) on
        the fallback instead."""
        return False

    def specialize(self, site) -> Union["VariantSpec", str]:
        """The spec to run on ``site`` (what the site shows filled in), or why this variant cannot run there.

        The default takes the spec as it is, and declines a site the model already limits to a sliding
        window (``site.band``): a variant other than ``local`` cannot express that band. The reason is the
        variant's own (its ``supports``) where it declines the site anyway.
        """
        if getattr(site, "band", None) is None:
            return self
        supported, why = self.supports(site)
        return why if not supported else f"the model already limits this site to a window of {site.band[0] + 1} keys"

    def cost(self, site) -> dict[str, sympy.Expr]:
        raise NotImplementedError

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        raise NotImplementedError

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        raise NotImplementedError

    def measured_pairs(self, q: Tensor, k: Tensor, mods: ScoreMods) -> Optional[Tensor]:
        """The (query, key) pairs this variant actually scores on these inputs, float ``[B, Hq]`` per batch row
        and query head, counting only real queries and keys (padding = ``mods.mask`` of shape
        ``[B, 1, 1, Nk]``); a pooled entry counts as one pair. None (the default) where the variant does not
        measure it: its ``cost()`` then stands. Data-dependent variants override it; the report and the
        calibrator count ``2 * pairs * (D + Dv)`` as the attention FLOPs actually run."""
        return None

    def __str__(self) -> str:
        """Canonical text: the name and every parameter that differs from its default (``local(window=256)``);
        ``exact`` has none. ``parse_variant(str(spec)) == spec``."""
        args = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
            if f.init and (f.default is MISSING or getattr(self, f.name) != f.default)
        )
        return f"{self.name}({args})" if args else self.name

    def invalid(self, field_name: str, message: str) -> AttnccError:
        """The error for a bad parameter, naming the variant and the field: ``local: window must be ...``."""
        return AttnccError(f"{self.name}: {field_name} {message}")


def check_int(spec: VariantSpec, field_name: str, value, minimum: int = 0, allow_none: bool = False) -> None:
    """Raise ``spec.invalid`` unless ``value`` is an int >= minimum (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise spec.invalid(field_name, f"must be an integer >= {minimum}, got {value!r}")


def check_self_attention(spec: VariantSpec, q: Tensor, k: Tensor, v: Tensor) -> int:
    """N of ``[B, H, N, D]`` self-attention inputs (Nq == Nk, Hq a multiple of Hkv); an error naming the variant
    otherwise."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise AttnccError(f"{spec.name}: expects [B, H, N, D] tensors, got q {tuple(q.shape)}")
    if q.shape[-2] != k.shape[-2]:
        raise AttnccError(f"{spec.name}: needs as many queries as keys, got Nq={q.shape[-2]}, Nk={k.shape[-2]}")
    if q.shape[1] % k.shape[1] != 0:
        raise AttnccError(f"{spec.name}: query heads {q.shape[1]} are not a multiple of kv heads {k.shape[1]}")
    return q.shape[-2]


def check_decode_queries(spec: VariantSpec, q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int]:
    """``(Nq, Nk)`` of ``[B, H, N, D]`` self-attention inputs whose queries are the *last* ``Nq`` of the ``Nk``
    tokens (``Nq <= Nk``: decode with a KV cache, chunked prefill); an error naming the variant otherwise.

    Such calls are bottom-right aligned: query ``i`` sits at absolute position ``Nk - Nq + i``
    (``query_positions``), and a variant's pattern (window, diagonal blocks) is placed there.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise AttnccError(f"{spec.name}: expects [B, H, N, D] tensors, got q {tuple(q.shape)}")
    if q.shape[-2] > k.shape[-2]:
        raise AttnccError(f"{spec.name}: needs at most as many queries as keys (queries are the last tokens of "
                          f"the keys), got Nq={q.shape[-2]}, Nk={k.shape[-2]}")
    if q.shape[1] % k.shape[1] != 0:
        raise AttnccError(f"{spec.name}: query heads {q.shape[1]} are not a multiple of kv heads {k.shape[1]}")
    return q.shape[-2], k.shape[-2]


def query_positions(nq: int, nk: int, device=None) -> Tensor:
    """Absolute positions of ``nq`` queries that are the last of ``nk`` tokens (bottom-right alignment):
    ``nk - nq .. nk - 1``, int64 ``[nq]``."""
    return torch.arange(nk - nq, nk, device=device)


def gather_rows_keys(t: Optional[Tensor], q0: int, q1: int, keys: Tensor) -> Optional[Tensor]:
    """A bias or mask broadcastable to ``[B, Hq, Nq, Nk]`` restricted to query rows ``q0:q1`` and the key
    columns ``keys`` (int64 ``[K]``); broadcast dims of size 1 stay size 1. None stays None."""
    if t is None:
        return None
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t
    if t.shape[-2] != 1:
        t = t[..., q0:q1, :]
    if t.shape[-1] != 1:
        t = t.index_select(-1, keys.to(t.device))
    return t


def unapplied_site_features(spec: VariantSpec, site, band: bool, sinks: bool = True) -> str:
    """Why ``spec`` cannot replace ``site`` for what the site does besides plain scores: attention dropout, the
    model's segment mask, (when ``band``) its sliding-window band and (unless ``sinks``: the variant adds them
    to its softmax) learned sink logits, none of which the variant applies; '' when none of them is present."""
    if site.dropout_p > 0:
        return f"{spec.name} does not apply dropout (p={site.dropout_p})"
    if band and site.band is not None:
        return f"the model's sliding-window (band) mask is not applied by {spec.name}"
    if site.segments:
        return f"the model's segment (block-diagonal) mask is not applied by {spec.name}"
    if not sinks and getattr(site, "sink_logits", None) is not None:
        return f"learned sink logits: {spec.name} has no softmax denominator to add them to"
    return ""


def sym(value, name: str) -> sympy.Expr:
    """A site size as a sympy expression: an Integer where static, a positive Symbol where dynamic."""
    return sympy.Integer(value) if isinstance(value, int) else sympy.Symbol(str(value) or name, positive=True)


def site_sizes(site) -> dict[str, sympy.Expr]:
    """The site's sizes as sympy expressions: B, Hq, Hkv, Nq, Nk, D, Dv (and itemsize as an int)."""
    return {
        "B": sym(site.batch, "B"), "Hq": sym(site.q_heads, "Hq"), "Hkv": sym(site.kv_heads, "Hkv"),
        "Nq": sym(site.q_len, "Nq"), "Nk": sym(site.kv_len, "Nk"), "D": sym(site.head_dim, "D"),
        "Dv": sym(site.value_dim, "Dv"),
    }


def attention_cost(site, pairs: sympy.Expr) -> dict[str, sympy.Expr]:
    """FLOPs and bytes of softmax attention that scores ``pairs`` (query, key) pairs per (batch, head).

    FLOPs count 2 per multiply-add of ``q @ k^T`` and ``P @ v``; bytes count reading q, k, v and writing the
    output once (what a fused kernel moves).
    """
    s = site_sizes(site)
    itemsize = site.dtype.itemsize if getattr(site, "dtype", None) is not None else 4
    flops = 2 * s["B"] * s["Hq"] * pairs * (s["D"] + s["Dv"])
    bytes_ = itemsize * s["B"] * (s["Hq"] * s["Nq"] * (s["D"] + s["Dv"]) + s["Hkv"] * s["Nk"] * (s["D"] + s["Dv"]))
    return {"flops": flops, "bytes": bytes_}
