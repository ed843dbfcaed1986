"""AttentionSite: the one record a detected attention computation becomes, and what each pass adds to it.

Passes hand each other nothing else about an attention. Every record here is frozen: a pass returns new values
and never changes the ones it was given.

* detect builds the :class:`AttentionSite` (its q/k/v, sizes, layout, score chain);
* mask analysis proves a :class:`MaskFacts` (the structure of the masks) and returns ``site.with_masks(facts)``;
* the plan decides a :class:`SitePlan` (the variant the op runs) and returns ``site.with_plan(plan)``;
* the rewrite pass returns the sites it could not rewrite with ``site.with_plan(SitePlan.left_alone(...))``.

The site keeps the fields of the records flat (``site.band``, ``site.variant``), so that what reads a site (the
policy, ``VariantSpec.supports``, the report) reads one record whichever pass it runs after. Node fields point
into the canonicalized graph the detector ran on; the rewrite pass maps them onto its own copy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.fx as fx

Dim = Union[int, str]
"""A size: an int where static, the symbol's name (e.g. ``"s0"``) where Dynamo captured it as dynamic."""


@dataclass(frozen=True)
class ScoreStep:
    """One operation between the score product ``q @ k^T`` and the softmax, in program order.

    kind is one of ``scale`` (value: float), ``softcap`` (value: float), ``add`` (node: additive term, value: its
    factor: 1, -1 for a subtraction, or the scale the model applied after adding it),
    ``fill`` (node: bool tensor, True where the score is replaced by value), ``keep`` (node: bool tensor,
    True where the score survives; elsewhere value), ``reshape`` (node: the view of the scores to a new shape).
    """

    kind: str
    value: Any = None
    node: Optional[fx.Node] = None


@dataclass(frozen=True)
class AttentionSite:
    """One attention computation found in a graph.

    Shapes follow SDPA: q is ``[*batch, Nq, Dqk]``, k is ``[*batch_kv, Nk, Dqk]``, v is ``[*batch_kv, Nk, Dv]``
    and the output is ``[*batch, Nq, Dv]``; for 4-D tensors ``batch = (B, Hq)`` and ``batch_kv = (B, Hkv)``.
    """

    module: str
    """The name ``model.named_modules()`` gives the module the computation lives in, '' for the root."""
    source: str
    """How the model spelled it: 'sdpa' or 'explicit'."""
    q: fx.Node
    k: fx.Node
    v: fx.Node
    output: fx.Node
    """The node whose value the attention output replaces."""
    q_stored_transposed: bool = False
    """True when the q node holds ``q^T`` (``[*batch, Dqk, Nq]``, channels-first)."""
    k_stored_transposed: bool = False
    """True when the k node holds ``k^T`` (keys stored pre-transposed, ``[*batch_kv, Dqk, Nk]``)."""
    v_stored_transposed: bool = False
    """True when the v node holds ``v^T`` (``[*batch_kv, Dv, Nk]``, channels-first)."""
    q_multipliers: tuple = ()
    """Per-head/per-batch tensor multipliers of the scores, moved onto q: ``[('mul'|'div', node)]``."""
    output_transposed: bool = False
    """True when the model computed ``out^T`` (channels-first: ``v @ attn^T``)."""
    kind: str = "self"
    """'self' when queries and keys are projected from the same activations, else 'cross'."""
    axis: str = "tokens"
    """What the softmax runs over: 'tokens' (q @ k^T contracts the projections' feature axis), or 'channels'
    when it contracts the token axis (XCiT's cross-covariance attention: q_len/kv_len count channels, head_dim
    counts tokens, and only the exact variant applies)."""
    layout: str = "bhnd"
    """'bhnd' for 4-D, '(bh)nd' for 3-D, 'nd' for 2-D, or the rank for others."""
    batch: Dim = 1
    q_heads: Dim = 1
    kv_heads: Dim = 1
    q_len: Dim = 0
    kv_len: Dim = 0
    head_dim: Dim = 0
    value_dim: Dim = 0
    scale: float = 1.0
    """Multiplier of ``q @ k^T`` before anything else."""
    causal: bool = False
    """Top-left aligned causal mask (SDPA ``is_causal``)."""
    steps: tuple[ScoreStep, ...] = ()
    """What the model does to the scaled scores before softmax (biases, masks, softcapping)."""
    sdpa_mask: Optional[fx.Node] = None
    """The attn_mask argument of an SDPA call, if any (bool: True = attend; float: added)."""
    softcap: float = 0.0
    """``c * tanh(s / c)`` applied to the scaled scores when > 0 (Gemma 2)."""
    dropout_p: float = 0.0
    """Dropout on the probabilities, 0 in eval mode."""
    sink_logits: Optional[fx.Node] = None
    """Learned attention-sink logits (gpt-oss): a node holding one logit per query head (``Hq`` values, or one
    shared by all heads) that the model concatenates to the scores as an extra column and drops after the
    softmax, so the softmax denominator gains ``exp(sink_h)`` and no value is added."""
    dtype: Optional[torch.dtype] = None
    layer: Optional[int] = None
    """The layer number policies select on (``Rule(layers=...)``): the module's index in the model's first stack of
    repeated layers (``attncc.module_names``); None where the structure gives none."""
    graph_index: int = 0
    """Which captured graph the site is in."""
    has_bias: bool = False
    """True when an additive float term reaches the scores (relative-position bias, ALiBi, additive mask
    that mask analysis could not turn into structure)."""
    mask_residual: str = "none"
    """The bool mask left after mask analysis took causal/band/segment structure out: 'none', 'padding'
    (broadcastable to ``[B, 1, 1, Nk]``: per-key, same for every query) or 'dense'."""
    band: Optional[tuple[int, int]] = None
    """``(left, right)`` when the model's mask keeps only keys ``i - left <= j <= i + right`` (sliding window)."""
    segments: bool = False
    """True when the model's mask separates tokens by label (documents, Swin's shifted-window regions)."""
    segment_labels: Any = None
    """The labels: a constant int64 ``[nW, N]`` (Swin regions) or the node of a ``[B, N]`` tensor the model
    computes (document ids); batch row r of q uses row ``r % len(labels)``."""
    segment_fill: float = float("-inf")
    """What the model adds to scores between different regions (timm's Swin: -100)."""
    keep_nodes: tuple = ()
    """Bool masks (True = attend) left by mask analysis, ANDed into the op's mask; the structured part of the
    model's masks is in ``causal`` / ``band`` instead."""
    grid: Optional[tuple[int, ...]] = None
    """Token grid ``(H, W)`` or ``(T, H, W)`` when the tokens are patches of an image/video (ViT), else None."""
    grid_prefix: int = 0
    """Tokens before the grid (class, register, distillation tokens)."""
    variant: str = "exact"
    """What the policy chose for it ('exact', 'local(window=256)', ...); 'none' when left as it was."""
    spec: Any = None
    """The variant spec the op runs (set by planning; for exact sites with a sliding window, the exact band)."""
    fallback: Any = None
    """The exact spec the op runs instead when the key length is below ``min_len``."""
    min_len: int = 0
    reason: str = ""
    """Why that variant (or why not rewritten)."""
    declined: str = ""
    """The variant family the policy asked for where it does not apply to this site (the site runs exact)."""

    @property
    def mask_kind(self) -> str:
        """What the site's masks are, as the report's 'mask' column says it: the structure mask analysis found
        and what is left, joined by '+' (``causal+window 4096+padding+bias``), or 'none'."""
        parts = ["segments"] if self.segments else []
        if self.causal:
            parts.append("causal")
        if self.band is not None:
            parts.append(f"window {self.band[0] + 1}")
        if self.mask_residual != "none":
            parts.append(self.mask_residual)
        if self.has_bias:
            parts.append("bias")
        return "+".join(parts) or "none"

    def replace(self, **changes) -> "AttentionSite":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def with_masks(self, facts: "MaskFacts") -> "AttentionSite":
        """This site with the masks mask analysis proved (its structure, what is left of the score chain)."""
        return dataclasses.replace(self, **{f.name: getattr(facts, f.name) for f in dataclasses.fields(facts)})

    def with_plan(self, plan: "SitePlan") -> "AttentionSite":
        """This site with the variant the plan (or the rewrite, when it leaves the site alone) decided."""
        return dataclasses.replace(self, **{f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)})


@dataclass(frozen=True)
class MaskFacts:
    """What mask analysis (``attncc.passes.masks``) proves about one site's masks.

    Each field replaces the site's field of the same name (``AttentionSite.with_masks``).
    """

    steps: tuple
    """The score steps still applied as the model wrote them (biases, fills it did not turn into structure)."""
    sdpa_mask: Optional[fx.Node]
    """The SDPA ``attn_mask`` still applied as it is (None where it became structure or a keep node)."""
    causal: bool
    """Keys ``j <= i`` only: the detected ``is_causal``, or proved from the mask."""
    band: Optional[tuple[int, int]] = None
    """``(left, right)``: keys ``i - left <= j <= i + right`` only (a sliding window)."""
    segments: bool = False
    segment_labels: Any = None
    """Swin's constant region labels ``[nW, N]``, or the node of the ``[B, N]`` document ids."""
    segment_fill: float = float("-inf")
    keep_nodes: tuple = ()
    """Bool residual masks (True = attend), ANDed into the op's mask."""
    has_bias: bool = False
    """An additive float term reaches the scores."""
    mask_residual: str = "none"
    """The bool mask left besides the structure: 'none', 'padding' (per key) or 'dense'."""


@dataclass(frozen=True)
class SitePlan:
    """What runs at one site: the plan's decision (``attncc.passes.plan``), or the rewrite's 'left alone'.

    Each field replaces the site's field of the same name (``AttentionSite.with_plan``).
    """

    variant: str
    """The variant's canonical text, 'exact', or 'none' (the site runs as the model wrote it)."""
    reason: str
    """The policy rule that chose it, and why a variant did not apply where it did not."""
    spec: Any = None
    """The variant spec the op runs (None for 'none')."""
    fallback: Any = None
    """The exact spec the op runs while the key length is below ``min_len``."""
    min_len: int = 0
    grid: Optional[tuple[int, ...]] = None
    """The token grid the plan found for the site (a ViT's patches)."""
    grid_prefix: int = 0
    declined: str = ""
    """The variant family the policy asked for, where it does not apply here ('' otherwise)."""

    @staticmethod
    def left_alone(site: "AttentionSite", reason: str) -> "SitePlan":
        """The site runs as the model wrote it, for ``reason`` (its grid kept for the report)."""
        return SitePlan("none", reason, grid=site.grid, grid_prefix=site.grid_prefix)


@dataclass
class RejectedSite:
    """Something that looks like attention but is not rewritten, with the reason."""

    module: str
    reason: str
    node: Optional[fx.Node] = None
    graph_index: int = 0
