"""The sites: every attention computation of a canonicalized graph, described as an AttentionSite.

Two spellings are matched. ``scaled_dot_product_attention`` calls are read off their arguments. Everything
else is anchored at a softmax: the score chain back from it (``score_chain``) must reach a product ``q @ k^T``
and the probabilities forward from it (``probabilities``) a product with v; the operands of both products give
q, k and v (``operands``), the score steps fold into the site's scale, softcap and masks (``score_facts``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx

from attncc.passes import graph_ops as g
from attncc.passes.detect.axis import attention_axis
from attncc.passes.detect.decline import Decline
from attncc.passes.detect.operands import choose_operands, peel_repeat_kv, same_source
from attncc.passes.detect.probabilities import ProbabilityPath, walk_probabilities
from attncc.passes.detect.reading import as_int, reaches_product
from attncc.passes.detect.score_chain import ScoreChain, walk_scores
from attncc.passes.detect.score_facts import fold_score_steps
from attncc.passes.detect.writes_check import WritesCheck
from attncc.passes.opaque_attention import opaque_attention_reason
from attncc.passes.sink_logits import NotSinkForm, SinkColumn, sink_column
from attncc.site import AttentionSite, RejectedSite, ScoreStep


def detect_sites(gm: fx.GraphModule, graph_index: int = 0) -> tuple[list[AttentionSite], list[RejectedSite]]:
    """All attention sites of ``gm`` in program order, and the near-misses with their reasons.

    ``gm`` must be canonicalized (``passes.canonicalize``) with ``meta['val']`` on every node.
    """
    sites: list[AttentionSite] = []
    rejected: list[RejectedSite] = []
    writes_check = WritesCheck(gm.graph)
    for node in gm.graph.nodes:
        if not (g.is_sdpa(node) or g.is_softmax(node)):
            reason = opaque_attention_reason(node)  # fused kernels, FlexAttention, MHA left whole
            if reason is not None:
                rejected.append(RejectedSite(g.module_path(node), reason, node, graph_index))
            continue
        try:
            site = _sdpa_site(node) if g.is_sdpa(node) else _explicit_site(node)
            if site is not None:
                writes_check.check(site, node)
        except Decline as decline:
            anchor = decline.node or node
            rejected.append(RejectedSite(g.module_path(anchor), decline.reason, anchor, graph_index))
            continue
        if site is not None:
            kind = "self" if same_source(site.q, site.k, site.q_stored_transposed, site.k_stored_transposed) \
                else "cross"
            site = site.replace(graph_index=graph_index, kind=kind)
            sites.append(site.replace(axis=attention_axis(site)))
    return sites, rejected


def _sdpa_site(node: fx.Node) -> AttentionSite:
    q, k, v = (g.arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    attn_mask = g.arg(node, 3, "attn_mask")
    dropout_p = g.arg(node, 4, "dropout_p", 0.0)
    is_causal = g.arg(node, 5, "is_causal", False)
    scale = g.arg(node, 6, "scale", None)
    for name, value in (("dropout_p", dropout_p), ("is_causal", is_causal)):
        if isinstance(value, fx.Node):
            raise Decline(f"scaled_dot_product_attention with a run-time {name}", node)
    q_multipliers = []
    if isinstance(scale, fx.Node):
        # a scale computed in the graph (from a size under fx, a float input under Dynamo): carried on q
        if not isinstance(g.val(scale), (int, float, torch.SymInt, torch.SymFloat)) and not (
                g.tensor_val(scale) is not None and g.tensor_val(scale).numel() == 1):
            raise Decline("scaled_dot_product_attention with a run-time scale that is not a number", node)
        q_multipliers, scale = [("mul", scale)], 1.0
    if scale is None:
        scale = 1.0 / math.sqrt(as_int(g.shape(q)[-1]))
    site = AttentionSite(
        module=g.module_path(node), source="sdpa", q=q, k=peel_repeat_kv(k), v=peel_repeat_kv(v), output=node,
        scale=float(scale), causal=bool(is_causal), dropout_p=float(dropout_p), sdpa_mask=attn_mask,
        q_multipliers=tuple(q_multipliers),
    )
    return _describe(site)


def _explicit_site(softmax: fx.Node) -> Optional[AttentionSite]:
    """The site anchored at ``softmax``; None when it is not fed by a product (a router, a classifier)."""
    x = softmax.args[0]
    if not isinstance(x, fx.Node) or g.tensor_val(x) is None:
        return None
    sink = _sink_column(x, softmax)
    if sink is not None:
        x = sink.scores
    chain = walk_scores(x, softmax)
    if chain is None:
        return None
    _check_softmax_axis(softmax, g.ndim(x))
    _check_score_shape(chain, x, softmax)
    path = walk_probabilities(softmax, sink)
    steps = chain.steps + _views_back(chain, path, x, softmax)
    a, b = chain.product.args[0], chain.product.args[1]
    ops = choose_operands(a, b, path.output.args[0 if path.transposed else 1], path.transposed)
    facts = fold_score_steps(steps, softmax, ops.scale)
    site = AttentionSite(
        module=g.module_path(chain.product), source="explicit", q=ops.q, k=ops.k, v=ops.v, output=path.output,
        q_stored_transposed=ops.q_stored_transposed, k_stored_transposed=ops.k_stored_transposed,
        v_stored_transposed=ops.v_stored_transposed, output_transposed=path.transposed, dropout_p=path.dropout_p,
        sink_logits=sink.logits if sink is not None else None, scale=facts.scale, softcap=facts.softcap,
        steps=tuple(facts.steps), q_multipliers=tuple(chain.q_multipliers))
    return _describe(site)


def _check_softmax_axis(softmax: fx.Node, rank: int) -> None:
    dim = g.softmax_dim(softmax)
    if not isinstance(dim, int):
        raise Decline("softmax over a dimension only known at run time", softmax)
    if dim % rank != rank - 1:
        raise Decline(f"softmax is not over the key axis (dim={dim} of a rank-{rank} score tensor)", softmax)


def _check_score_shape(chain: ScoreChain, x: fx.Node, softmax: fx.Node) -> None:
    """The scores keep the product's shape up to the softmax, or change it only by reshape steps."""
    product = chain.product
    if g.shape(product)[:-2] != g.shape(x)[:-2] and not any(s.kind == "reshape" for s in chain.steps):
        raise Decline("the scores change shape before the softmax", softmax)
    if g.shape(product) != g.shape(x) and g.shape(product)[-2:] != g.shape(x)[-2:]:
        raise Decline("the scores change shape before the softmax", softmax)


def _views_back(chain: ScoreChain, path: ProbabilityPath, x: fx.Node, softmax: fx.Node) -> tuple[ScoreStep, ...]:
    """The views of the probabilities back to the product's shape, as the last score steps.

    BLOOM/Falcon/MPT: scores [B*H, N, N] viewed to [B, H, N, N] for the mask and softmax, probabilities viewed
    back for the product with v. Softmax works on the last axis, so the view back is the same whether it comes
    before or after it: carry it as the last score step (the rewrite reshapes the terms with it)."""
    product = chain.product
    if not path.views:
        if any(s.kind == "reshape" for s in chain.steps) and g.shape(product) != g.shape(x):
            raise Decline("the scores are reshaped and not restored before the softmax", softmax)
        return ()
    if g.shape(path.views[-1]) != g.shape(product):
        raise Decline(f"the attention probabilities are reshaped to {tuple(g.shape(path.views[-1]))}, not back "
                      f"to the shape of the scores' product {tuple(g.shape(product))}", softmax)
    return tuple(ScoreStep("reshape", node=view) for view in path.views)


def _sink_column(x: fx.Node, softmax: fx.Node) -> Optional[SinkColumn]:
    """The learned sink column concatenated to the scores at the softmax input ``x`` (gpt-oss), if any; a
    concatenation of the scores that is not one is declined with the reason."""
    try:
        return sink_column(x, reaches_product)
    except NotSinkForm as refused:
        raise Decline(refused.reason, softmax) from None


def _describe(site: AttentionSite) -> AttentionSite:
    """The site with its sizes, layout and dtype read from its q/k/v values."""
    q, k, v = g.tensor_val(site.q), g.tensor_val(site.k), g.tensor_val(site.v)
    qs = list(q.shape)
    ks = list(k.shape)
    vs = list(v.shape)
    if site.k_stored_transposed:
        ks[-2], ks[-1] = ks[-1], ks[-2]
    if site.v_stored_transposed:
        vs[-2], vs[-1] = vs[-1], vs[-2]
    if site.q_stored_transposed:
        qs[-2], qs[-1] = qs[-1], qs[-2]

    def dim(x):
        return x if isinstance(x, int) else str(x)

    rank = len(qs)
    if rank == 4:
        layout = dict(layout="bhnd", batch=dim(qs[0]), q_heads=dim(qs[1]), kv_heads=dim(ks[1]))
    elif rank == 3:
        layout = dict(layout="(bh)nd", batch=dim(qs[0]), q_heads=1, kv_heads=1)
    else:
        layout = dict(layout=f"{rank}-d",
                      batch=dim(math.prod(qs[:-2])) if all(isinstance(s, int) for s in qs[:-2]) else "?")
    return site.replace(q_len=dim(qs[-2]), head_dim=dim(qs[-1]), kv_len=dim(ks[-2]), value_dim=dim(vs[-1]),
                        dtype=q.dtype, **layout)

