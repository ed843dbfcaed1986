"""Rewrite: replace each chosen attention site by one call of ``torch.ops.attncc.attention``.

The pass copies the graph, builds the op's inputs next to the site (q/k/v in SDPA layout, the additive
bias and bool mask the score chain applied), swaps the site's output for the op and removes what went dead.
"""

from __future__ import annotations

import operator
from typing import NamedTuple, Optional

import torch
import torch.fx as fx

from attncc.measure import SITE_META
from attncc.passes import graph_ops as g
from attncc.passes.dead_code import remove_dead_code
from attncc.passes.fake_eval import copy_meta, fill_val
from attncc.passes.graph_copy import copy_graph_module
from attncc.runtime.call import AttentionCall
from attncc.runtime.ops import attention_op  # noqa: F401  (importing registers torch.ops.attncc)
from attncc.site import AttentionSite, SitePlan

ATTENTION_OP = torch.ops.attncc.attention.default


class Rewritten(NamedTuple):
    """What the rewrite pass returns."""

    graph_module: fx.GraphModule
    """A copy of the input graph with one attncc op per rewritten site."""
    sites: list[AttentionSite]
    """The sites as they ran: those the rewrite had to leave alone have ``variant='none'`` and the reason."""


def rewrite_sites(gm: fx.GraphModule, sites: list[AttentionSite]) -> Rewritten:
    """A copy of ``gm`` where every site whose ``variant`` is not 'none' is one attncc op call.

    A site whose rewrite turns out not to reproduce the original output's shape is left as it was: the returned
    site says so (``variant='none'`` and the reason). ``gm`` and ``sites`` are unchanged.
    """
    result, value_map = copy_graph_module(gm)
    graph = result.graph
    ran = []
    for position, site in enumerate(sites):
        left_alone = None if site.variant == "none" else _SiteRewriter(site, value_map, position).apply()
        ran.append(site.with_plan(SitePlan.left_alone(site, left_alone)) if left_alone else site)
    remove_dead_code(graph)
    graph.lint()
    result.recompile()
    return Rewritten(result, ran)


class _SiteRewriter:
    """Emits the op call for one site; ``self.m`` maps nodes of the detector's graph to the copy."""

    def __init__(self, site: AttentionSite, value_map: dict[fx.Node, fx.Node], position: int):
        self.site = site
        self.position = position
        self.value_map = value_map
        self.anchor = value_map[site.output]
        self.emitted: list[fx.Node] = []

    def m(self, x):
        return self.value_map[x] if isinstance(x, fx.Node) else x

    def emit(self, op: str, target, *args, **kwargs) -> fx.Node:
        graph = self.anchor.graph
        with graph.inserting_before(self.anchor):
            node = graph.create_node(op, target, args, kwargs)
        copy_meta(self.anchor, node)
        fill_val(node, fallback_mode=getattr(g.tensor_val(self.anchor), "fake_mode", None))
        self.emitted.append(node)
        return node

    def constant(self, name: str, value: torch.Tensor) -> fx.Node:
        """A get_attr node for a tensor the op needs, stored on the rewritten module as a buffer."""
        module = self.anchor.graph.owning_module
        name = f"{name}_g{self.site.graph_index}"
        module.register_buffer(name, value, persistent=False)
        return self.emit("get_attr", name)

    def transpose(self, x: fx.Node) -> fx.Node:
        return self.emit("call_method", "transpose", x, -2, -1)

    def apply(self) -> Optional[str]:
        """Emit the op in place of the site's output; the reason when it has to leave the site alone instead."""
        site = self.site
        q, k, v = self.qkv()
        bias, mask = self.score_terms()
        for keep in site.keep_nodes:
            keep = self.m(keep)
            mask = keep if mask is None else self.emit("call_function", operator.and_, mask, keep)
        segments = self.segment_labels()
        call = AttentionCall(
            q, k, v, bias=bias, mask=mask, scale=site.scale, causal=bool(site.causal), softcap=site.softcap or 0.0,
            dropout_p=site.dropout_p or 0.0, dropout_seed=self.dropout_seed(),
            variant=str(site.spec) if site.spec is not None else "exact",
            fallback=str(site.fallback) if site.fallback is not None else "exact",  # the model's own exact band
            min_len=site.min_len or 0, segments=segments,
            segment_fill=site.segment_fill if segments is not None else 0.0,
            sinks=self.sink_vector() if site.sink_logits is not None else None,
        )
        # the op's defaults are left out of the node: the graph shows what this site changes
        args, kwargs = call.op_arguments()
        out = self.emit("call_function", ATTENTION_OP, *args, **kwargs)
        out.meta[SITE_META] = self.position
        if site.output_transposed:
            out = self.transpose(out)
        return self.replace_output(out)

    def qkv(self) -> tuple[fx.Node, fx.Node, fx.Node]:
        """The site's q, k, v in SDPA layout ``[..., N, D]``, with the multipliers the model applied to q."""
        site = self.site
        q, k, v = self.m(site.q), self.m(site.k), self.m(site.v)
        q = self.transpose(q) if site.q_stored_transposed else q
        k = self.transpose(k) if site.k_stored_transposed else k
        v = self.transpose(v) if site.v_stored_transposed else v
        for how, factor in site.q_multipliers:
            q = self.emit("call_function", operator.mul if how == "mul" else operator.truediv, q, self.m(factor))
        return q, k, v

    def dropout_seed(self) -> Optional[fx.Node]:
        """A fresh seed per call when the site drops out (backward replays the same mask from it)."""
        if not self.site.dropout_p:
            return None
        return self.emit("call_function", torch.randint, 0, 2**62, (), dtype=torch.int64)

    def segment_labels(self) -> Optional[fx.Node]:
        """The site's region or document labels as a node: computed by the model from its inputs (documents),
        or constants stored on the module (Swin's regions)."""
        labels = self.site.segment_labels
        if labels is None or isinstance(labels, fx.Node):
            return self.m(labels)
        return self.constant(f"_attncc_regions_{self.position}", labels)

    def replace_output(self, out: fx.Node) -> Optional[str]:
        """Swap the site's output for ``out`` (cast to its dtype), or undo the rewrite when the shapes differ (and
        say why)."""
        want = g.tensor_val(self.anchor)
        have = g.tensor_val(out)
        if tuple(have.shape) != tuple(want.shape):
            self.undo()
            return f"rewritten output shape {tuple(have.shape)} differs from the original {tuple(want.shape)}"
        if have.dtype != want.dtype:
            out = self.emit("call_method", "to", out, want.dtype)
        self.anchor.replace_all_uses_with(out)
        # a later site may read this site's output as its q/k/v or mask (stacked attention without a projection
        # in between): point the map at the op, since the original output node is now dead
        self.value_map[self.site.output] = out
        return None

    def sink_vector(self) -> fx.Node:
        """The site's learned sink logits as the op's one-per-query-head vector ``[Hq]`` (``[1]`` when the model
        shares one logit and the head count is not static)."""
        logits = self.emit("call_method", "reshape", self.m(self.site.sink_logits), -1)
        heads = self.site.q_heads
        if g.shape(logits)[0] == 1 and isinstance(heads, int) and heads != 1:
            logits = self.emit("call_method", "expand", logits, heads)
        return logits

    def undo(self) -> None:
        """Erase what this site emitted."""
        for node in reversed(self.emitted):
            if not node.users:
                node.graph.erase_node(node)

    def score_terms(self) -> tuple[Optional[fx.Node], Optional[fx.Node]]:
        """The additive bias and bool keep-mask equivalent to the site's score steps (or its SDPA mask)."""
        site = self.site
        if site.sdpa_mask is not None:
            m = self.m(site.sdpa_mask)
            return (None, m) if g.tensor_val(m).dtype == torch.bool else (m, None)
        bias: Optional[fx.Node] = None
        keep: Optional[fx.Node] = None
        for step in site.steps:
            if step.kind == "add":
                term = self.m(step.node)
                if step.value == -1.0:
                    term = self.emit("call_function", operator.neg, term)
                elif step.value != 1.0:  # a scale the model applied after the term: (s + b) * c
                    term = self.emit("call_function", operator.mul, term, step.value)
                bias = term if bias is None else self.emit("call_function", operator.add, bias, term)
            elif step.kind in ("fill", "keep"):
                cond = self.m(step.node)
                if g.tensor_val(cond).dtype != torch.bool:
                    cond = self.emit("call_method", "bool", cond)
                replaced = cond if step.kind == "fill" else self.emit("call_function", operator.invert, cond)
                if step.value == float("-inf"):
                    survive = self.emit("call_function", operator.invert, replaced)
                    keep = survive if keep is None else self.emit("call_function", operator.and_, keep, survive)
                else:
                    base = bias if bias is not None else 0.0
                    bias = self.emit("call_function", torch.where, replaced, step.value, base)
            elif step.kind == "reshape":
                view = self.m(step.node)
                before = g.shape(view.args[0])
                shape_args = view.args[1:]
                if bias is not None:
                    bias = self.emit("call_method", "reshape",
                                     self.emit("call_method", "expand", bias, *before), *shape_args)
                if keep is not None:
                    keep = self.emit("call_method", "reshape",
                                     self.emit("call_method", "expand", keep, *before), *shape_args)
        return bias, keep
