"""The graphs the visual report draws, as networkx DiGraphs of short node records.

* ``matched_subgraph``: one site as the detector matched it, before the rewrite: the nodes on the paths from its
  q/k/v to its output (score product, scale, masks, softmax, product with v), plus the values they read (q/k/v
  producers, masks, sizes) as input nodes.
  The graph attribute ``output`` names the site's output node.
* ``rewritten_subgraph``: the attncc op that replaced it, with the nodes the rewrite added next to it
  (transposes, casts, the combined mask), the values it reads and the nodes that use its result. The graph
  attribute ``op`` names the op's node.

A site's node fields point into the canonicalized graph the detector ran on (``attncc.site``); the rewrite pass
copies that graph and leaves it untouched, so the "before" is read from it after the fact. It is the captured
graph as attncc matched it: canonicalize spelled a few forms one way first (``nn.MultiheadAttention`` as its SDPA
decomposition, ``einsum`` as ``matmul``, a written-out softmax as ``softmax``). Nodes keep their
names in the copy, so a matched node whose name is gone from the rewritten graph is one the rewrite removed.

Every graph node is keyed by the fx node's name and carries:
``label`` (short op name), ``shape`` (short text), ``role`` (one of ``ROLES``), ``detail`` (the full node text,
for a tooltip or a table; graph code lines can run to thousands of characters).
"""

from __future__ import annotations

from typing import Any, Optional

import networkx as nx
import torch
import torch.fx as fx

from attncc.measure import SITE_META
from attncc.passes.graph_ops import SDPA
from attncc.site import AttentionSite

ATTENTION_OP = "attncc.attention"
"""The op's name as a graph node's label shows it (``torch.ops.attncc.attention.default``)."""

ROLES = {
    "q": "the site's queries",
    "k": "the site's keys",
    "v": "the site's values",
    "mask": "a mask or bias of the scores",
    "input": "another value the site reads (size, constant, labels)",
    "removed": "matched and removed by the rewrite",
    "kept": "matched and still in the rewritten graph (used elsewhere, or the site was left alone)",
    "op": "the attncc op",
    "added": "added by the rewrite next to the op",
    "user": "uses the attention output",
}


def fx_as_networkx(graph: fx.Graph) -> nx.DiGraph:
    """The data flow of ``graph``: one vertex per fx node, an edge from each input to its user."""
    flow = nx.DiGraph()
    for node in graph.nodes:
        flow.add_node(node)
        for source in node.all_input_nodes:
            flow.add_edge(source, node)
    return flow


def matched_subgraph(site: AttentionSite, rewritten_names: Optional[set[str]] = None,
                     flow: Optional[nx.DiGraph] = None) -> nx.DiGraph:
    """The site as matched, before the rewrite.

    Args:
        site: a site of a ``PassResult`` (its nodes point into the graph the detector matched).
        rewritten_names: names of the nodes of the rewritten graph; a matched node missing there was removed.
            None when the site was left alone (every matched node is then ``kept``).
        flow: ``fx_as_networkx(site.output.graph)``, when the caller draws several sites of one graph.
    """
    flow = fx_as_networkx(site.output.graph) if flow is None else flow
    qkv = {site.q: "q", site.k: "k", site.v: "v"}
    upstream = nx.ancestors(flow, site.output) | {site.output}
    core = upstream & set().union(*(nx.descendants(flow, start) for start in qkv))
    # the scores: what q and k reach before v joins in; a tensor read there is a mask or bias
    scores = (core & nx.descendants(flow, site.q) & nx.descendants(flow, site.k)) - nx.descendants(flow, site.v)
    drawn = nx.DiGraph(output=site.output.name)
    for node in sorted(core, key=_position(site.output.graph)):
        role = "kept" if rewritten_names is None or node.name in rewritten_names else "removed"
        _add(drawn, node, role)
    for node in sorted(core, key=_position(site.output.graph)):
        for source in node.all_input_nodes:
            if source not in core:
                masking = node in scores or _is_sdpa_mask(node, source)
                _add(drawn, source, qkv.get(source) or _input_role(source, masking))
            drawn.add_edge(source.name, node.name)
    for user in site.output.users:
        _add(drawn, user, "user")
        drawn.add_edge(site.output.name, user.name)
    return drawn


def rewritten_subgraph(gm: fx.GraphModule, position: int, matched_names: set[str]) -> Optional[nx.DiGraph]:
    """The op the rewrite put in place of the ``position``-th site of ``gm``'s graph, with the nodes the rewrite
    added around it (names not in ``matched_names``, the canonical graph's), the values they read and the users
    of the result; None when the graph holds no op for that site (the site was left alone)."""
    op = _op_node(gm, position)
    if op is None:
        return None
    added = _added_around(op, matched_names)
    drawn = nx.DiGraph(op=op.name)
    for node in sorted(added, key=_position(gm.graph)):
        _add(drawn, node, "op" if node is op else "added")
    masks = {value for name, value in _op_fields(op) if name in ("mask", "bias")}
    for node in sorted(added, key=_position(gm.graph)):
        for source in node.all_input_nodes:
            if source not in added:
                _add(drawn, source, _input_role(source, masking=source in masks))
            drawn.add_edge(source.name, node.name)
        for user in node.users:
            if user not in added:
                _add(drawn, user, "user")
                drawn.add_edge(node.name, user.name)
    return drawn


def label_qkv(after: nx.DiGraph, site: AttentionSite) -> None:
    """Mark the op's inputs that are the site's q/k/v (the rewritten graph keeps their names)."""
    for node, role in ((site.q, "q"), (site.k, "k"), (site.v, "v")):
        if node.name in after and after.nodes[node.name]["role"] in ("input", "mask"):
            after.nodes[node.name]["role"] = role


def op_arguments(gm: fx.GraphModule, position: int) -> list[tuple[str, str]]:
    """``[(argument name, value as text)]`` of the op call of the ``position``-th site (the op's schema names; a
    node argument is shown by its name and shape)."""
    op = _op_node(gm, position)
    if op is None:
        return []
    return [(name, _argument_text(value)) for name, value in _op_fields(op)]


# ------------------------------------------------------------------------------------------------ node text


def node_label(node: fx.Node) -> str:
    """The op a node runs, short: ``matmul``, ``softmax``, ``transpose``, ``attncc.attention``, ``x`` (input)."""
    target = node.target
    if node.op == "call_function":
        if isinstance(target, torch._ops.OpOverload):
            return f"{target.namespace}.{target._opname}"
        return getattr(target, "__name__", str(target))
    if node.op == "call_module":
        module = _submodule(node)
        return type(module).__name__ if module is not None else str(target).rsplit(".", 1)[-1]
    if node.op == "get_attr":
        return str(target).rsplit(".", 1)[-1]
    if node.op == "placeholder":
        return f"input {target}"
    return str(target)


def node_shape(node: fx.Node) -> str:
    """``1×4×64×16 f32`` for a tensor, the value for a number, '' when unknown."""
    value = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(value, torch.Tensor):
        dims = "×".join(str(d) for d in value.shape) or "scalar"
        return f"{dims} {_DTYPES.get(value.dtype, str(value.dtype).replace('torch.', ''))}"
    if isinstance(value, (int, float, bool, torch.SymInt, torch.SymFloat)):
        return _short(str(value), 24)
    return ""


def node_detail(node: fx.Node) -> str:
    """The node in full (fx's text of it) and, where the frontend recorded it, the model's source line."""
    text = node.format_node() or f"%{node.name} = {node.op}[{node.target}]"
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    if len(trace) >= 2:  # the last frame: 'File "...", line N, in f' and the code line
        text += "\n" + trace[-2].strip() + "\n    " + trace[-1].strip()
    return text


_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
           torch.bool: "bool", torch.int64: "i64", torch.int32: "i32"}


def _add(drawn: nx.DiGraph, node: fx.Node, role: str) -> None:
    if node.name not in drawn:
        drawn.add_node(node.name, label=node_label(node), shape=node_shape(node), role=role, detail=node_detail(node))


def _input_role(node: fx.Node, masking: bool = False) -> str:
    """'mask' for a bool tensor, or a tensor of at least two dims read by the score chain; else 'input'."""
    value = node.meta.get("val", node.meta.get("example_value"))
    if not isinstance(value, torch.Tensor):
        return "input"
    return "mask" if value.dtype == torch.bool or (masking and value.dim() >= 2) else "input"


def _is_sdpa_mask(node: fx.Node, source: fx.Node) -> bool:
    """Whether ``source`` is the attn_mask of the SDPA call ``node`` (canonicalize made it positional)."""
    return node.op == "call_function" and node.target in SDPA and node.args[3:4] == (source,)


def _op_node(gm: fx.GraphModule, position: int) -> Optional[fx.Node]:
    """The op call the rewrite made for the ``position``-th site of ``gm``'s graph (None: it made none)."""
    return next((n for n in gm.graph.nodes if n.meta.get(SITE_META) == position and _is_attention_op(n)), None)


def _added_around(op: fx.Node, matched_names: set[str]) -> set[fx.Node]:
    """``op`` and the nodes the rewrite added next to it (q transposes and multipliers, the combined mask, the
    output cast): those connected to it through nodes not in the matched graph, up to other sites' ops."""
    added = {op}
    frontier = [op]
    while frontier:
        node = frontier.pop()
        for other in (*node.all_input_nodes, *node.users):
            if other not in added and other.name not in matched_names and not _is_attention_op(other):
                added.add(other)
                frontier.append(other)
    return added


def _op_fields(op: fx.Node) -> list[tuple[str, Any]]:
    """``[(argument name, value)]`` of an op call node, positional arguments named by the op's schema."""
    from attncc.runtime.call import FIELD_NAMES

    return [*zip(FIELD_NAMES, op.args), *op.kwargs.items()]


def _is_attention_op(node: fx.Node) -> bool:
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node_label(node) == ATTENTION_OP)


def _position(graph: fx.Graph):
    """Sort key: a node's place in its graph's program order."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    return lambda node: order.get(node, len(order))


def _submodule(node: fx.Node) -> Any:
    owner = node.graph.owning_module
    try:
        return owner.get_submodule(node.target) if owner is not None else None
    except AttributeError:
        return None


def _argument_text(value: Any) -> str:
    if isinstance(value, fx.Node):
        shape = node_shape(value)
        return f"%{value.name}" + (f" ({shape})" if shape else "")
    return _short(repr(value), 200)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"
