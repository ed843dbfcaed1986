"""AttentionSite: the one record a detected attention computation becomes.

Passes hand each other nothing else about an attention. Node fields point into the canonicalized graph
the detector ran on; the rewrite pass maps them onto its own copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.fx as fx

Dim = Union[int, str]
"""A size: an int where static, the symbol's name (e.g. ``"s0"``) where Dynamo captured it as dynamic."""


@dataclass
class ScoreStep:
    """One operation between the score product ``q @ k^T`` and the softmax, in program order.

    kind is one of ``scale`` (value: float), ``softcap`` (value: float), ``add`` (node: additive term, value: its
    factor: 1, -1 for a subtraction, or the scale the model applied after adding it),
    ``fill`` (node: bool tensor, True where the score is replaced by value), ``keep`` (node: bool tensor,
    True where the score survives; elsewhere value), ``reshape`` (value: the new shape, a tuple).
    """

    kind: str
    value: Any = None
    node: Optional[fx.Node] = None


@dataclass
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
    q_multipliers: list = field(default_factory=list)
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
    steps: list[ScoreStep] = field(default_factory=list)
    """What the model does to the scaled scores before softmax (biases, masks, softcapping)."""
    sdpa_mask: Optional[fx.Node] = None
    """The attn_mask argument of an SDPA call, if any (bool: True = attend; float: added)."""
    mask_kind: str = "none"
    """'none', 'bool', 'additive' or 'bool+additive' (what the op receives)."""
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
    keep_nodes: list = field(default_factory=list)
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



@dataclass
class RejectedSite:
    """Something that looks like attention but is not rewritten, with the reason."""

    module: str
    reason: str
    node: Optional[fx.Node] = None
    graph_index: int = 0
