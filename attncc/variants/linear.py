"""Linear attention: a kernel feature map in place of softmax, optionally with an exact softmax window.

``linear(feature_map='elu', window=0, chunk=64)``, for query ``i`` and the keys ``j`` it may see (``j <= i`` when
causal, all keys otherwise; keys a key-padding mask removes are dropped)::

    out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)

``phi`` is applied to q and k as given (no softmax scale; a model that wants ``exp(q.k * scale)`` approximated
folds the scale into q itself):

* ``'elu'``: ``elu(x) + 1`` (Katharopoulos et al., "Transformers are RNNs"); strictly positive.
* ``'relu'``: ``relu(x)``; a row can get an all-zero denominator (see "Empty rows" below).
* ``'taylor'``: ``[1, x, vec(x x^T) / sqrt(2)]``, so ``phi(q).phi(k) = 1 + q.k + (q.k)^2 / 2``, the 2nd-order
  Taylor expansion of ``exp(q.k)`` (Hedgehog, Based); always > 0. The forward keeps only the upper triangle of
  ``x x^T`` (``x_a^2 / sqrt(2)`` on the diagonal, ``x_a x_b`` for ``a < b``: the off-diagonal pairs carry the
  weight ``sqrt(2)`` of their two mirror entries), which gives the same dot product with ``1 + D + D(D+1)/2``
  features instead of ``1 + D + D^2``.

With ``window=W > 0`` it is the sliding-window hybrid of LoLCATs: keys inside the window of query ``i``
(causal: ``i - W < j <= i``; bidirectional: ``|i - j| < W``) get the softmax term ``exp(s_ij)`` with
``s_ij = q_i.k_j * scale`` (the softmax scale applies to these terms only), keys outside it the linear term,
and both share one denominator::

    out_i = (sum_in exp(s_ij) v_j + sum_out phi(q_i).phi(k_j) v_j) / (sum_in exp(s_ij) + sum_out phi(q_i).phi(k_j))

``window >= N`` therefore is exact softmax attention.

How it is computed (never an ``Nq x Nk`` tensor): bidirectional, ``S = sum_j phi(k_j)^T v_j`` (``[Df, Dv]``)
and ``z = sum_j phi(k_j)`` (``[Df]``) once over all keys. Causal, chunk by chunk (``chunk`` tokens, Lightning
Attention-2's form): within a chunk a ``[chunk, chunk]`` causal product, across chunks a running float32
``(S, z)`` of the earlier chunks (taylor's intra-chunk weights come straight from ``1 + s + s^2/2`` of the raw
``q.k``: ``D`` work per pair instead of ``Df``). The hybrid adds a banded softmax part (query blocks of
``chunk`` rows against key slabs of ``chunk + W - 1`` (causal) or ``chunk + 2W - 2`` keys) and takes the
outside keys through the same scan with the keys lagged by ``W`` (and, bidirectional, a second scan from the
end for the keys right of the window).

Empty rows: a query row with no visible key (every key masked, or all-zero relu features) returns zeros. The
denominator of a row without softmax terms is clamped below at ``EPS`` (``out = num / max(den, EPS)``); this
keeps relu rows whose features barely overlap from dividing by ~0 (and their gradients from exploding), and
leaves elu/taylor rows alone (their denominators are far above ``EPS`` unless nothing is visible). Rows with
softmax terms are never clamped, so the ``window >= N`` limit stays exact.

Supported score modifiers: scale (window terms only), causal (``Nq == Nk``), and a key-padding mask
broadcastable to ``[B, 1, 1, Nk]`` (applied by zeroing ``phi(k_j)`` and dropping ``j`` from the window).
Additive bias, softcapping and any other mask shape are declined by ``supports`` and rejected by ``forward``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, Optional

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor

from attncc.errors import AttnccError
from attncc.util import cdiv
from attncc.variants.base import ScoreMods, VariantSpec, attention_cost, check_int, site_sizes
from attncc.variants.registry import register_variant

FEATURE_MAPS = ("elu", "relu", "taylor")

EPS = 1e-6
"""Lower clamp of the denominator of rows without softmax terms (see the module docstring)."""

_STATE_BUDGET = 1 << 22
"""Float32 elements of states or features formed at once by a run of chunks or rows (16 MiB: bounds inference
memory; larger runs measured slower on CPU, as fresh large buffers cost page faults)."""

# FLOPs per feature the map costs, for cost(): elu is exp + add, relu a max, taylor a product and a weight.
_FEATURE_FLOPS = {"elu": 2, "relu": 1, "taylor": 2}


def feature_dim(feature_map: str, d):
    """Features per token for head dim ``d`` (an int or a sympy expression), as the forward computes them."""
    if feature_map == "taylor":
        return 1 + d + d * (d + 1) / 2 if not isinstance(d, int) else 1 + d + d * (d + 1) // 2
    return d


def feature_map(x: Tensor, kind: str) -> Tensor:
    """``phi(x)`` of the efficient path: ``[..., D]`` float -> ``[..., Df]`` (Df from ``feature_dim``)."""
    if kind == "elu":
        return F.elu(x).add_(1.0)  # in place: elu's backward reads its input, not its output
    if kind == "relu":
        return F.relu(x)
    # Order: 1, x, the diagonal x_a^2 / sqrt(2), then x_a * x_b for a < b, a block per a. Off-diagonal pairs
    # stand for both mirror entries of x x^T: weight sqrt(2) * (1 / sqrt(2)) = 1. Built feature-major
    # ([..., Df, N], returned as a transposed view) so every block is a contiguous, vectorized product; a
    # last-dim gather or last-dim slices are 2-10x slower on CPU. Matmuls take the transposed view as is.
    d = x.shape[-1]
    xt = x.transpose(-1, -2).contiguous()
    pieces = [xt.new_ones(*xt.shape[:-2], 1, xt.shape[-1]), xt, xt * xt * (1.0 / math.sqrt(2.0))]
    pieces += [xt[..., a:a + 1, :] * xt[..., a + 1:, :] for a in range(d - 1)]
    return torch.cat(pieces, dim=-2).transpose(-1, -2)


def _full_feature_map(x: Tensor, kind: str) -> Tensor:
    """``phi(x)`` by its definition (taylor with all ``D^2`` quadratic features); the oracle's version."""
    if kind != "taylor":
        return feature_map(x, kind)
    quad = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2.0)
    return torch.cat([x.new_ones(*x.shape[:-1], 1), x, quad], dim=-1)


@register_variant
@dataclass(frozen=True)
class LinearSpec(VariantSpec):
    """Linear attention with feature map ``feature_map``, an exact softmax window of ``window`` keys (0: none)
    and causal chunks of ``chunk`` tokens. Semantics and method in the module docstring."""

    name: ClassVar[str] = "linear"
    listed: ClassVar[int] = 50

    @classmethod
    def examples(cls) -> tuple[VariantSpec, ...]:
        return cls(), cls(feature_map="taylor", chunk=4), cls(feature_map="relu", window=3, chunk=4)

    @classmethod
    def exact_limit(cls, n: int) -> VariantSpec:
        return cls(window=n, chunk=4)  # every key inside the softmax window

    feature_map: str = "elu"
    window: int = 0
    chunk: int = 64
    decode: bool = False
    """The queries are the last ``Nq`` of the ``Nk`` tokens (bottom-right: query ``i`` at position
    ``Nk - Nq + i``), so the softmax window sits at that position; the plan sets it on self-attention sites
    with fewer queries than keys (decode with a KV cache) when there is a window (without one every
    bidirectional decode query already sees exactly its causal prefix, the whole cache)."""

    def __post_init__(self):
        if self.feature_map not in FEATURE_MAPS:
            choices = ", ".join(repr(f) for f in FEATURE_MAPS)
            raise self.invalid("feature_map", f"must be one of {choices}, got {self.feature_map!r}")
        check_int(self, "window", self.window, minimum=0)
        check_int(self, "chunk", self.chunk, minimum=1)
        if not isinstance(self.decode, bool):
            raise self.invalid("decode", f"must be True or False, got {self.decode!r}")

    def aligns_last_queries(self) -> bool:
        return self.decode

    def specialize(self, site):
        """The spec for ``site``: with a window, on self-attention with fewer queries than keys (decode),
        ``decode=True`` (the window at the queries' absolute positions); else as the default does."""
        spec = super().specialize(site)
        if isinstance(spec, LinearSpec) and spec.window and site.kind == "self" and site.q_len != site.kv_len:
            return replace(spec, decode=True)
        return spec

    # -- planning ----------------------------------------------------------------------------------------

    def supports(self, site) -> tuple[bool, str]:
        """Whether this spec can replace ``site``: self or cross attention, optional key padding; causal only
        with ``Nq == Nk``. Declines dropout, softcapping, additive bias, learned sink logits, dense/banded/segment
        masks."""
        if site.dropout_p > 0:
            return False, f"linear attention has no probabilities to drop out (dropout_p={site.dropout_p})"
        if site.softcap > 0:
            return False, f"softcapping (softcap={site.softcap}) has no counterpart in a feature map"
        if site.has_bias:
            return False, "an additive score bias cannot pass through the feature map"
        if site.sink_logits is not None:
            return False, "learned sink logits: linear attention has no softmax denominator to add them to"
        if site.mask_residual not in ("none", "padding"):
            return False, f"only a key-padding mask is supported, the site keeps a {site.mask_residual} mask"
        if site.band is not None:
            return False, f"the model's mask keeps a band {site.band}; linear attention reads every key"
        if site.segments:
            return False, "the model's mask is block-diagonal by segment; linear attention reads every key"
        if site.causal and site.q_len != site.kv_len:  # (top-left: decode calls are non-causal)
            return False, f"causal linear attention needs Nq == Nk, got Nq={site.q_len}, Nk={site.kv_len}"
        how = "chunked causal scan" if site.causal else "one key/value state"
        extra = f" plus a {self.window}-key softmax window" if self.window else ""
        return True, f"linear attention ({self.feature_map} features, {how}{extra})"

    def cost(self, site) -> dict[str, sympy.Expr]:
        """FLOPs (2 per multiply-add) and bytes of the forward as sympy expressions of the site's sizes.

        Counts the feature maps, building the ``[Df, Dv]`` state and ``[Df]`` normalizer from the keys, reading
        them for every query, and, causal, the ``[chunk, chunk]`` intra-chunk products (``D``-wide for every map:
        taylor's come from the raw ``q.k``) and the running sum of chunk states. The hybrid counts the banded
        softmax part as computed (full query blocks against key slabs) and one scan per side of the window
        that has keys outside it. Bytes are reading q, k, v and writing the output once.
        """
        s = site_sizes(site)
        b, hq, hkv, nq, nk, d, dv = (s[x] for x in ("B", "Hq", "Hkv", "Nq", "Nk", "D", "Dv"))
        df = feature_dim(self.feature_map, d)
        dv1 = dv + 1  # the normalizer z costs one more value column
        flops = _FEATURE_FLOPS[self.feature_map] * b * (hq * nq + hkv * nk) * df

        def scan(causal: bool) -> sympy.Expr:
            build = 2 * b * hkv * nk * df * dv1
            read = 2 * b * hq * nq * df * dv1
            if not causal:
                return build + read
            c = sympy.Min(self.chunk, nq)
            intra = 2 * b * hq * nq * c * (d + dv1)
            prefix = b * hkv * (nk / c) * df * dv1
            return build + read + intra + prefix

        causal = bool(site.causal)
        if self.window == 0:
            flops += scan(causal)
        else:
            w = sympy.Min(self.window, sympy.Max(nq, nk))
            c = sympy.Min(self.chunk, nq)
            slab = c + sympy.Min(w - 1, nq - 1) + (0 if causal else sympy.Min(w - 1, nk - 1))
            flops += attention_cost(site, nq * slab)["flops"] + 2 * b * hq * nq * slab  # + exp and row sum
            flops += sympy.Piecewise((scan(True), sympy.StrictLessThan(w, nq)), (0, True))  # left of window
            if not causal:
                flops += sympy.Piecewise((scan(True), sympy.StrictLessThan(w, nk)), (0, True))
        return {"flops": flops, "bytes": attention_cost(site, sympy.Integer(0))["bytes"]}

    # -- computing -----------------------------------------------------------------------------------------

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        """The efficient path: q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``, v ``[B, Hkv, Nk, Dv]`` ->
        ``[B, Hq, Nq, Dv]`` in q's dtype (float32 math; k and v may have batch 1). Differentiable; memory and
        time linear in N (plus the window band)."""
        q4, k4, v4, keep = _prepare(self, q, k, v, mods)
        q4, last = _as_last_queries(self, q4, k4)
        out = _linear_forward(q4, k4, v4, keep, self.feature_map, self.window, self.chunk, mods)
        return out[..., out.shape[-2] - last:, :].to(q.dtype)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
        """The oracle: dense float32 ``[B, Hq, Nq, Nk]`` weights from the definition (full taylor features,
        explicit window/outside split, row max of the window scores as stabilizer). Shapes as ``forward``."""
        q4, k4, v4, keep = _prepare(self, q, k, v, mods)
        q4, last = _as_last_queries(self, q4, k4)
        out = _linear_reference(q4, k4, v4, keep, self.feature_map, self.window, mods)
        return out[..., out.shape[-2] - last:, :].to(q.dtype)


def _as_last_queries(spec: LinearSpec, q: Tensor, k: Tensor) -> tuple[Tensor, int]:
    """``(q, Nq)``; with ``spec.decode`` and Nq < Nk, q with ``Nk - Nq`` zero rows in front, so that query i
    sits at position ``Nk - Nq + i`` (those rows' outputs are dropped). Decode thereby recomputes the linear
    sums over the cache at each step (``O(Nk)`` work, no state carried between calls)."""
    nq, nk = q.shape[-2], k.shape[-2]
    if not spec.decode or nq >= nk:
        return q, nq
    return F.pad(q, (0, 0, nk - nq, 0)), nq


# -- input checks ------------------------------------------------------------------------------------------


def check_inputs(spec: LinearSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> None:
    """Reject what linear attention does not take (bias, softcap, shapes), one sentence each (the kernels in
    ``attncc.codegen.linear`` check the same)."""
    if mods.bias is not None:
        raise AttnccError(f"{spec}: an additive score bias is not supported by linear attention")
    if mods.softcap > 0:
        raise AttnccError(f"{spec}: softcapping (softcap={mods.softcap}) is not supported by linear attention")
    if mods.sinks is not None:
        raise AttnccError(f"{spec}: learned sink logits: linear attention has no softmax denominator to add them to")
    if not q.dim() == k.dim() == v.dim() == 4:
        raise AttnccError(f"{spec}: expects [B, H, N, D] tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                          f"v {tuple(v.shape)}")
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if k.shape[0] not in (1, bsz) or v.shape[:3] != k.shape[:3] or k.shape[-1] != d or hkv == 0 or hq % hkv:
        raise AttnccError(f"{spec}: expected k [B, Hkv, Nk, {d}] and v [B, Hkv, Nk, Dv] with Hq % Hkv == 0, got "
                          f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if mods.causal and nq != nk:
        raise AttnccError(f"{spec}: causal linear attention needs Nq == Nk, got Nq={nq}, Nk={nk}")


def _prepare(spec: LinearSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods):
    """Check mods and shapes; return float32 q, k, v (k/v batch broadcast to q's) and the key-padding mask as
    ``[B or 1, Nk]`` bool (None without a mask)."""
    check_inputs(spec, q, k, v, mods)
    bsz, nk = q.shape[0], k.shape[2]
    k, v = k.expand(bsz, *k.shape[1:]), v.expand(bsz, *v.shape[1:])
    return q.float(), k.float(), v.float(), key_keep(spec, mods.mask, bsz, nk)


def key_keep(spec: LinearSpec, mask: Optional[Tensor], bsz: int, nk: int) -> Optional[Tensor]:
    """A bool mask broadcastable to ``[B, 1, 1, Nk]`` as ``[B or 1, Nk]``; anything else is an error."""
    if mask is None:
        return None
    shape = tuple(mask.shape)
    m = mask.reshape((1,) * (4 - mask.dim()) + shape) if mask.dim() <= 4 else mask
    if (mask.dtype != torch.bool or m.dim() != 4 or m.shape[0] not in (1, bsz) or m.shape[1] != 1
            or m.shape[2] != 1 or m.shape[3] not in (1, nk)):
        raise AttnccError(f"{spec}: mask must be a bool key-padding mask broadcastable to [B, 1, 1, Nk] = "
                          f"[{bsz}, 1, 1, {nk}], got {mask.dtype} {shape}")
    return m[:, 0, 0, :].expand(m.shape[0], nk)


# -- the efficient path ------------------------------------------------------------------------------------
#
# Blocked tensors are ``[B, Hkv, nC, rows, F]``: a chunk of ``c`` keys, or the ``g * c`` query rows of the g
# query heads that share a kv head (one matmul serves the whole group: GQA without repeating k or v). With
# g == 1 and N a multiple of c, blocking is a free view.


def _query_blocks(q5: Tensor, c: int) -> Tensor:
    """``[B, Hkv, g, N, F]`` -> ``[B, Hkv, nC, g*c, F]`` (zero rows pad N to ``nC * c``)."""
    bsz, hkv, g, n, f = q5.shape
    nc = cdiv(n, c)
    x = (F.pad(q5, (0, 0, 0, nc * c - n)) if nc * c > n else q5).reshape(bsz, hkv, g, nc, c, f)
    return x.transpose(2, 3).reshape(bsz, hkv, nc, g * c, f)


def _key_blocks(x: Tensor, c: int, nc: int) -> Tensor:
    """``[B, H, P, F]`` with ``P <= nC * c`` -> ``[B, H, nC, c, F]`` (zero rows pad P)."""
    bsz, h, p, f = x.shape
    return (F.pad(x, (0, 0, 0, nc * c - p)) if nc * c > p else x).reshape(bsz, h, nc, c, f)


def _from_blocks(x: Tensor, g: int, n: int) -> Tensor:
    """Inverse of ``_query_blocks``: ``[B, Hkv, nC, g*c, F]`` -> ``[B, Hkv, g, n, F]``."""
    bsz, hkv, nc, gc, f = x.shape
    x = x.reshape(bsz, hkv, nc, g, gc // g, f).transpose(2, 3)
    return x.reshape(bsz, hkv, g, -1, f)[..., :n, :]


def _rows(x: Tensor, start: int, length: int) -> Tensor:
    """Rows ``start .. start + length`` of ``x [..., N, F]`` along dim -2, zeros where out of range (a shifted
    copy, so key rows can be lined up with the query rows that see them)."""
    n = x.shape[-2]
    if start == 0 and length == n:
        return x
    lo, hi = max(start, 0), min(start + length, n)
    if hi <= lo:
        return x.new_zeros(*x.shape[:-2], length, x.shape[-1])
    return F.pad(x[..., lo:hi, :], (0, 0, lo - start, start + length - hi))


def _causal_scan(qb: Tensor, kb: Tensor, vb: Tensor, valid: Optional[Tensor], fmap: str) -> tuple[Tensor, Tensor]:
    """Causal linear attention sums over chunks: row ``t`` gets ``sum_{s <= t} w_ts v_s`` and ``sum_{s <= t} w_ts``
    with ``w_ts = phi(q_t).phi(k_s) * valid_s``.

    qb ``[B, Hkv, nC, g*c, D]`` raw queries, kb ``[B, Hkv, nC, c, D]`` raw keys lined up with the query
    positions, vb ``[B, Hkv, nC, c, Dv]``, valid ``[B or 1, 1, nC, c, 1]`` float (0 drops a key: padding,
    masked, or outside the lagged range; None when every key row is real). Returns numerators
    ``[B, Hkv, nC, g*c, Dv]`` and denominators ``[B, Hkv, nC, g*c, 1]``.

    Features are computed a run of chunks at a time (at most ``_STATE_BUDGET`` elements of states or query
    features), so taylor's wide features never exist for the whole sequence at once in inference; the
    states of a run are summed in float32 in chunk order either way.
    """
    bsz, hkv, nc, gc, d = qb.shape
    c, dv = kb.shape[3], vb.shape[-1]
    df = feature_dim(fmap, d)
    tri = torch.ones(c, c, dtype=torch.bool, device=qb.device).tril().repeat(gc // c, 1)
    state, zstate = qb.new_zeros(bsz, hkv, df, dv), qb.new_zeros(bsz, hkv, df, 1)
    step = max(1, _STATE_BUDGET // (bsz * hkv * df * max(dv, gc)))
    nums, dens = [], []
    for c0 in range(0, nc, step):
        q_s, k_s, v_s = (x[:, :, c0:c0 + step] for x in (qb, kb, vb))
        valid_s = valid[:, :, c0:c0 + step] if valid is not None else None
        fq = feature_map(q_s, fmap)
        fk = feature_map(k_s, fmap)
        if valid_s is not None:
            fk = fk * valid_s
        if fmap == "taylor":
            # phi(q).phi(k) = 1 + s + s^2/2 from the raw D-dim product: c * D work per row instead of c * Df.
            s = q_s @ k_s.transpose(-1, -2)
            a = 1.0 + s * (1.0 + 0.5 * s)
            if valid_s is not None:
                a = a * valid_s.transpose(-1, -2)
        else:
            a = fq @ fk.transpose(-1, -2)
        # In-place updates below only touch tensors no backward formula reads (fresh matmul/arithmetic
        # outputs): fewer large allocations, which dominate on CPU at these sizes.
        a = a.masked_fill_(~tri, 0.0)
        intra_num, intra_den = a @ v_s, a.sum(dim=-1, keepdim=True)
        if df <= gc:
            # A chunk's state is no bigger than its query rows: form the running (S, z) left of every chunk
            # (a loop of adds: cumsum over a leading dim is several times slower on CPU), then one batched
            # product for all chunks.
            kv = fk.transpose(-1, -2) @ v_s  # [B, Hkv, s, Df, Dv]: each chunk's phi(k)^T v
            kz = fk.sum(dim=-2).unsqueeze(-1)  # [B, Hkv, s, Df, 1]: each chunk's sum of phi(k)
            before, zbefore = [state], [zstate]
            for i in range(kv.shape[2] - 1):
                before.append(before[-1] + kv[:, :, i])
                zbefore.append(zbefore[-1] + kz[:, :, i])
            state, zstate = before[-1] + kv[:, :, -1], zbefore[-1] + kz[:, :, -1]
            nums.append((fq @ torch.stack(before, dim=2)).add_(intra_num))
            dens.append((fq @ torch.stack(zbefore, dim=2)).add_(intra_den))
            continue
        # Wide features (taylor): per-chunk [Df, Dv] states would outweigh the chunks themselves, so one
        # state is carried chunk by chunk (each step's matmuls are large enough to hide the loop).
        num_s, den_s = [], []
        for i in range(q_s.shape[2]):
            num_s.append(fq[:, :, i] @ state)
            den_s.append(fq[:, :, i] @ zstate)
            state = state + fk[:, :, i].transpose(-1, -2) @ v_s[:, :, i]
            zstate = zstate + fk[:, :, i].sum(dim=-2).unsqueeze(-1)
        nums.append(torch.stack(num_s, dim=2).add_(intra_num))
        dens.append(torch.stack(den_s, dim=2).add_(intra_den))
    if len(nums) == 1:
        return nums[0], dens[0]
    return torch.cat(nums, dim=2), torch.cat(dens, dim=2)


def _bidirectional(q5: Tensor, k: Tensor, v: Tensor, keepf: Optional[Tensor], fmap: str) -> tuple[Tensor, Tensor]:
    """``sum_j phi(q_i).phi(k_j) v_j`` and ``sum_j phi(q_i).phi(k_j)`` over all kept keys: one ``[Df, Dv]`` state
    per kv head, built and read a run of rows at a time. q5 ``[B, Hkv, g, Nq, D]`` -> numerators
    ``[B, Hkv, g, Nq, Dv]`` and denominators ``[B, Hkv, g, Nq, 1]``."""
    bsz, hkv, g, nq, d = q5.shape
    nk, dv = k.shape[2], v.shape[-1]
    df = feature_dim(fmap, d)
    rows = max(1, _STATE_BUDGET // (bsz * hkv * df))
    state, zstate = q5.new_zeros(bsz, hkv, df, dv), q5.new_zeros(bsz, hkv, df, 1)
    for r0 in range(0, nk, rows):
        fk = feature_map(k[:, :, r0:r0 + rows], fmap)
        if keepf is not None:
            fk = fk * keepf[:, :, r0:r0 + rows]
        state = state + fk.transpose(-1, -2) @ v[:, :, r0:r0 + rows]
        zstate = zstate + fk.sum(dim=-2).unsqueeze(-1)
    qrows = q5.reshape(bsz, hkv, g * nq, d)
    fqs = [feature_map(qrows[:, :, r0:r0 + rows], fmap) for r0 in range(0, g * nq, rows)]
    num = torch.cat([fq @ state for fq in fqs], dim=2).reshape(bsz, hkv, g, nq, dv)
    den = torch.cat([fq @ zstate for fq in fqs], dim=2).reshape(bsz, hkv, g, nq, 1)
    return num, den


def _lagged_scan(q5: Tensor, k: Tensor, v: Tensor, keepf: Optional[Tensor], fmap: str, c: int, lag: int, p: int,
                 q_offset: int = 0) -> tuple[Tensor, Tensor]:
    """The causal scan over a sequence of ``p`` positions: query ``i`` at position ``q_offset + i``, key row
    ``t`` at position ``t + lag``; keepf ``[B or 1, 1, Nk, 1]`` float or None (keep all). Returns numerators
    ``[B, Hkv, g, p - q_offset, Dv]`` and denominators ``[B, Hkv, g, p - q_offset, 1]`` for the queries."""
    g = q5.shape[2]
    qb = _query_blocks(F.pad(q5, (0, 0, q_offset, 0)) if q_offset else q5, c)
    nc = qb.shape[2]
    kb, vb = (_key_blocks(_rows(x, -lag, p), c, nc) for x in (k, v))
    every_row_real = keepf is None and lag == 0 and p == k.shape[2] == nc * c
    if keepf is None:
        keepf = k.new_ones(1, 1, k.shape[2], 1)
    valid = None if every_row_real else _key_blocks(_rows(keepf, -lag, p), c, nc)
    return tuple(_from_blocks(x, g, p)[..., q_offset:, :] for x in _causal_scan(qb, kb, vb, valid, fmap))


def _linear_forward(q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], fmap: str, window: int,
                    chunk: int, mods: ScoreMods) -> Tensor:
    """Float32 4-D q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, *]``, keep ``[B or 1, Nk]`` -> ``[B, Hq, Nq, Dv]``."""
    bsz, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    if nq == 0 or nk == 0:
        return q.new_zeros(bsz, hq, nq, dv)  # no query, or no key to see: the empty-row convention
    q5 = q.reshape(bsz, hkv, g, nq, d)
    keepf = keep.to(q.dtype)[:, None, :, None] if keep is not None else None  # [B or 1, 1, Nk, 1]
    c = max(1, min(chunk, nq))
    if window == 0:
        if mods.causal:
            num, den = _lagged_scan(q5, k, v, keepf, fmap, c, lag=0, p=nq)
        else:
            num, den = _bidirectional(q5, k, v, keepf, fmap)
        return (num / den.clamp_min(EPS)).reshape(bsz, hq, nq, dv)
    w = min(window, max(nq, nk))  # a wider window sees nothing more
    lin = _outside_window(q5, k, v, keepf, fmap, w, c, mods.causal)
    return _window_combine(q5, k, v, keep, lin, mods.scale, w, c, mods.causal).reshape(bsz, hq, nq, dv)


def _outside_window(q5: Tensor, k: Tensor, v: Tensor, keepf: Optional[Tensor], fmap: str, w: int, c: int,
                    causal: bool):
    """Linear sums over the keys outside the window: numerators ``[B, Hkv, g, Nq, Dv]`` and denominators
    ``[B, Hkv, g, Nq, 1]`` (None when no key is outside).

    Left of the window (``j <= i - w``) is the causal scan with the keys lagged by ``w``; right of it
    (bidirectional, ``j >= i + w``) the same scan over the reversed sequence: query ``i`` at position
    ``o + Nq - 1 - i`` and key ``j`` at ``o + Nq - 1 + w - j``, the offset ``o`` making room for keys past the
    last query.
    """
    nq, nk = q5.shape[3], k.shape[2]
    parts = []
    if w < nq and nk > 0:
        parts.append(_lagged_scan(q5, k, v, keepf, fmap, c, lag=w, p=nq))
    if not causal and w < nk:
        o = max(0, nk - nq - w)
        p = nq + o
        rev = [x[:, :, w:].flip(-2) if x is not None else None for x in (k, v, keepf)]  # key j: row nk-1-j
        right = _lagged_scan(q5.flip(-2), *rev, fmap, c, lag=p - (nk - w), p=p, q_offset=o)
        parts.append(tuple(x.flip(-2) for x in right))
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return parts[0][0] + parts[1][0], parts[0][1] + parts[1][1]


def _window_combine(q5: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], lin, scale: float, w: int, c: int,
                    causal: bool) -> Tensor:
    """Banded softmax terms plus the outside-window linear sums ``lin`` (numerators, denominators), one
    denominator per row.

    Query blocks of ``c`` rows meet key slabs of ``L = c + w - 1`` (causal) or ``c + 2w - 2`` keys (fewer
    when the sequences are shorter than the window), so memory is ``O(Nq * L)``. Returns ``[B, Hkv, g, Nq, Dv]``.
    """
    bsz, hkv, g, nq, d = q5.shape
    nk = k.shape[2]
    # Keys a block's rows may see: i - lo .. i + hi (no key is further away than the sequences are long).
    lo, hi = min(w - 1, nq - 1), (0 if causal else min(w - 1, nk - 1))
    slab = c + lo + hi
    qb = _query_blocks(q5 * scale, c)  # scaling the D-wide queries is cheaper than the L-wide scores
    nb = qb.shape[2]
    padded = (nb - 1) * c + slab  # key positions -lo .. padded - lo - 1 cover every slab
    ks = _rows(k, -lo, padded).unfold(2, slab, c)  # [B, Hkv, nB, D, L]
    vs = _rows(v, -lo, padded).unfold(2, slab, c).transpose(-1, -2)  # [B, Hkv, nB, L, Dv]
    valid = torch.zeros(keep.shape[0] if keep is not None else 1, padded, dtype=torch.bool, device=q5.device)
    take = min(nk, padded - lo)
    valid[:, lo:lo + take] = keep[:, :take] if keep is not None else True
    valid = valid.unfold(1, slab, c)[:, None, :, None, :]  # [B or 1, 1, nB, 1, L]
    rel = torch.arange(c, device=q5.device)[:, None] + lo - torch.arange(slab, device=q5.device)[None, :]
    band = ((rel >= 0) & (rel < w)) if causal else (rel.abs() < w)  # rel = i - j, the same in every block

    # The scores are updated in place (masked, shifted, exponentiated): no backward formula reads them
    # before exp, and exp's reads its result. Fewer [Nq, L] allocations is most of the time saved on CPU.
    s = (qb @ ks).masked_fill_(~(band.repeat(g, 1) & valid), float("-inf"))
    m = s.detach().amax(dim=-1, keepdim=True)  # -inf in rows with no key inside the window
    has_window = torch.isfinite(m)
    if lin is None:
        p = s.sub_(torch.where(has_window, m, 0.0)).exp_()
        num, den = p @ vs, p.sum(dim=-1, keepdim=True)
    else:
        lin_num, mass = (_query_blocks(x, c) for x in lin)
        positive = mass > 0
        log_mass = torch.where(positive, torch.log(torch.where(positive, mass, 1.0)), float("-inf"))
        # One stabilizer for both kinds of terms: the larger of the window's row max m and log(linear mass),
        # so neither exp(s - shift) nor the linear factor exp(log_mass - shift) exceeds 1 and the
        # denominator is >= 1. With m alone the linear factor exp(-m) would overflow once m < -88 (fp32);
        # it still underflows to 0 once m - log(mass) > ~103, dropping linear terms that are then below
        # fp32 resolution next to the softmax terms anyway. Rows without window keys keep shift 0.
        shift = torch.where(has_window, torch.maximum(m, log_mass), 0.0).detach()
        p = s.sub_(shift).exp_()
        factor = torch.exp(log_mass - shift)
        # lin_num / mass is a convex combination of the outside values (all three maps give weights >= 0),
        # so it stays bounded however small the mass.
        num = p @ vs + factor * (lin_num / torch.where(positive, mass, 1.0))
        den = p.sum(dim=-1, keepdim=True) + factor
    return _from_blocks(num / den.clamp_min(EPS), g, nq)


# -- the oracle --------------------------------------------------------------------------------------------


def _linear_reference(q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], fmap: str, window: int,
                      mods: ScoreMods) -> Tensor:
    """Dense float32 version of the module docstring's formulas (``[B, Hq, Nq, Nk]`` weights)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    nq, nk = q.shape[2], k.shape[2]
    lin = _full_feature_map(q, fmap) @ _full_feature_map(k, fmap).transpose(-1, -2)
    visible = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if mods.causal:
        visible = visible.tril()
    if keep is not None:
        visible = visible & keep[:, None, None, :]
    if window == 0:
        weights = lin * visible
    else:
        i = torch.arange(nq, device=q.device)[:, None]
        j = torch.arange(nk, device=q.device)[None, :]
        inside = ((i - j >= 0) & (i - j < window)) if mods.causal else ((i - j).abs() < window)
        s = ((q @ k.transpose(-1, -2)) * mods.scale).masked_fill(~(visible & inside), float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, 0.0)
        weights = torch.where(inside, torch.exp(s - m), lin * torch.exp(-m)) * visible
    return (weights @ v) / weights.sum(dim=-1, keepdim=True).clamp_min(EPS)
