"""Lower PyTorch's multi-head attention into the SDPA form the detector reads.

``nn.MultiheadAttention`` reaches a captured graph as one node: a ``call_module`` (``fx.symbolic_trace`` keeps
``torch.nn`` modules whole) or a ``F.multi_head_attention_forward`` call (Dynamo inlines the module's forward,
not the functional). ``lower_multihead_attention`` replaces that node by its decomposition: in-projection (packed
or separate weights, biases), ``bias_k``/``bias_v`` and ``add_zero_attn`` keys, head split, one
``F.scaled_dot_product_attention`` with ``attn_mask``/``key_padding_mask``/``is_causal`` combined as
``F.multi_head_attention_forward`` combines them, head merge and out-projection; ``batch_first`` and unbatched
inputs as the module handles them. The module's parameters are read through ``get_attr`` nodes, so the
compiled module keeps sharing them with the model (training updates stay visible).

A call that cannot be lowered keeps its node, and ``node.meta[UNLOWERED]`` says why; the detector reports it.
The one common case: the attention probabilities are returned (``need_weights=True``, MHA's default, with the
returned weights read by the caller). ``need_weights=True`` with the weights unused is lowered.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.proxy import GraphAppendingTracer

from attncc.passes import graph_ops as g
from attncc.passes.fake_eval import copy_meta, fill_val
from attncc.util import getattr_path

UNLOWERED = "attncc_unlowered"
"""``node.meta`` key: why canonicalize left a recognized attention call (an MHA node) as it was."""

WEIGHTS_RETURNED = "the attention probabilities are returned (need_weights=True)"

_FUNCTIONAL_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_MODULE_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_TENSOR_FIELDS = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight", "bias_k",
                  "bias_v", "out_proj_weight", "out_proj_bias", "key_padding_mask", "attn_mask")


def is_multihead_attention(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is an ``nn.MultiheadAttention`` module call or an ``F.multi_head_attention_forward`` call."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.MultiheadAttention)
    return node.op == "call_function" and node.target is F.multi_head_attention_forward


def lower_multihead_attention(gm: fx.GraphModule, node: fx.Node) -> None:
    """Replace an MHA node (see ``is_multihead_attention``) of ``gm``'s graph by its SDPA decomposition in place,
    or leave it and set ``node.meta[UNLOWERED]`` to the reason."""
    call = _read_module_call(gm, node) if node.op == "call_module" else _read_functional_call(node)
    reason = call if isinstance(call, str) else _output_use_problem(node, call.need_weights)
    if reason is not None:
        node.meta[UNLOWERED] = reason
        return
    out = _emit(call)
    for user in list(node.users):
        if user.op == "output":
            user.args = _replace_in(user.args, node, (out, None))
        elif user.args[1] in (0, -2):
            user.replace_all_uses_with(out)
            node.graph.erase_node(user)
        else:  # the weights' getitem, unused (``_output_use_problem`` checked)
            node.graph.erase_node(user)
    node.graph.erase_node(node)


# ------------------------------------------------------------------------------------- the decomposition


@dataclass(frozen=True)
class MhaConfig:
    """What decides the shape of the decomposition (compile-time constants of one MHA call)."""

    num_heads: int
    embed_dim: int
    dtype: torch.dtype
    """The query's dtype: bool masks become additive masks of it when merged with a float mask."""
    batched: bool
    batch_first: bool
    separate_proj: bool
    """q/k/v projected by separate weights (``kdim``/``vdim`` differ from ``embed_dim``), else one packed weight."""
    add_zero_attn: bool
    dropout_p: float
    """0 outside training."""
    causal_hint: bool
    """SDPA's ``is_causal`` replaces ``attn_mask``: F.multi_head_attention_forward does this only for
    ``is_causal=True`` with no key padding mask and ``need_weights=False`` (else it applies the mask)."""
    attn_mask_ndim: int
    """0 (no mask), 2 (``[L, S]``) or 3 (``[B * H, L, S]``)."""
    bool_masks: bool
    """Every mask present is bool (True = masked): they merge with ``|`` into one bool SDPA mask. Otherwise they
    merge as additive float masks, as F.multi_head_attention_forward does; both give the same softmax."""


def multi_head_attention(query, key, value, t: dict[str, Any], cfg: MhaConfig):
    """``nn.MultiheadAttention``'s output (not its weights) for tensors ``t`` (the names of ``_TENSOR_FIELDS``,
    None where absent), written with one ``F.scaled_dot_product_attention``.

    query ``[L, B, E]`` (``[B, L, E]`` when ``cfg.batch_first``, ``[L, E]`` unbatched), key ``[S, B, kdim]``,
    value ``[S, B, vdim]``; returns the attention output in the query's layout. The arguments may be tensors or
    ``fx.Proxy`` values (how ``_emit`` writes it into a graph): nothing here branches on a tensor's value.
    Tensor identity (``query is key``) selects the in-projection as in PyTorch (one packed product for self
    attention), so the products are the same ones the original computes.
    """
    heads = cfg.num_heads
    kpm, attn_mask = t["key_padding_mask"], t["attn_mask"]
    if cfg.batch_first and cfg.batched:  # nn.MultiheadAttention.forward, keeping the identities
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = query.transpose(1, 0), key.transpose(1, 0)
                value = key
        else:
            query, key, value = query.transpose(1, 0), key.transpose(1, 0), value.transpose(1, 0)
    if not cfg.batched:  # F.multi_head_attention_forward: a batch of one (three new tensors, as there)
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if kpm is not None:
            kpm = kpm.unsqueeze(0)
    if not cfg.bool_masks:
        kpm, attn_mask = _additive(kpm, cfg.dtype), _additive(attn_mask, cfg.dtype)
    if cfg.causal_hint:
        attn_mask = None

    q, k, v = _in_projection(query, key, value, t, cfg)  # [L, B, E], [S, B, E], [S, B, E]
    if t["bias_k"] is not None:  # one more key and value, the same for every batch row, never masked
        k = torch.cat([k, t["bias_k"].expand_as(k[:1])])
        v = torch.cat([v, t["bias_v"].expand_as(v[:1])])
        kpm, attn_mask = _pad_key(kpm), _pad_key(attn_mask)
    if cfg.add_zero_attn:  # one more key and value of zeros, never masked
        k = torch.cat([k, torch.zeros_like(k[:1])])
        v = torch.cat([v, torch.zeros_like(v[:1])])
        kpm, attn_mask = _pad_key(kpm), _pad_key(attn_mask)

    q, k, v = _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)  # [B, H, N, E / H]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_sdpa_mask(attn_mask, kpm, heads, cfg),
                                         dropout_p=cfg.dropout_p, is_causal=cfg.causal_hint)
    out = F.linear(out.permute(2, 0, 1, 3).flatten(-2), t["out_proj_weight"], t["out_proj_bias"])  # [L, B, E]
    if not cfg.batched:
        return out.squeeze(1)
    return out.transpose(1, 0) if cfg.batch_first else out


def _in_projection(query, key, value, t: dict[str, Any], cfg: MhaConfig):
    """F._in_projection_packed / F._in_projection: the same products, split by column blocks."""
    embed = cfg.embed_dim
    bias = t["in_proj_bias"]
    if cfg.separate_proj:
        bq = bk = bv = None
        if bias is not None:
            parts = bias.chunk(3)
            bq, bk, bv = parts[0], parts[1], parts[2]
        return (F.linear(query, t["q_proj_weight"], bq), F.linear(key, t["k_proj_weight"], bk),
                F.linear(value, t["v_proj_weight"], bv))
    weight = t["in_proj_weight"]
    if key is value and query is key:  # self attention: one product with the packed weight
        qkv = F.linear(query, weight, bias).chunk(3, dim=-1)
        return qkv[0], qkv[1], qkv[2]
    if key is value:  # cross attention with k = v: the query block, and one product for keys and values
        w = weight.split([embed, 2 * embed])
        b = bias.split([embed, 2 * embed]) if bias is not None else (None, None)
        kv = F.linear(key, w[1], b[1]).chunk(2, dim=-1)
        return F.linear(query, w[0], b[0]), kv[0], kv[1]
    w = weight.chunk(3)
    b = bias.chunk(3) if bias is not None else (None, None, None)
    return F.linear(query, w[0], b[0]), F.linear(key, w[1], b[1]), F.linear(value, w[2], b[2])


def _additive(mask, dtype: torch.dtype):
    """F._canonical_mask: a bool mask (True = masked) as 0 / -inf of ``dtype``; float masks unchanged."""
    if mask is None or not _is_bool(mask):
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))


def _is_bool(mask) -> bool:
    value = g.tensor_val(mask.node) if isinstance(mask, fx.Proxy) else mask
    return value is not None and value.dtype == torch.bool


def _pad_key(mask):
    """One more key column, not masked (False in a bool mask, 0 in an additive one)."""
    return None if mask is None else F.pad(mask, (0, 1))


def _split_heads(x, heads: int):
    """``[N, B, E]`` -> ``[B, H, N, E / H]``."""
    return x.unflatten(-1, (heads, -1)).permute(1, 2, 0, 3)


def _sdpa_mask(attn_mask, kpm, heads: int, cfg: MhaConfig):
    """The one SDPA ``attn_mask`` for ``attn_mask`` (``[L, S]`` or ``[B * H, L, S]``) and the key padding mask
    (``[B, S]``): bool with True = attend when both are bool, else their additive sum."""
    if attn_mask is not None and cfg.attn_mask_ndim == 3:
        attn_mask = attn_mask.unflatten(0, (-1, heads))  # [B, H, L, S]
    if kpm is not None:
        kpm = kpm[:, None, None, :]  # [B, 1, 1, S]
    if attn_mask is None or kpm is None:
        merged = kpm if attn_mask is None else attn_mask
    else:
        merged = attn_mask | kpm if cfg.bool_masks else attn_mask + kpm
    if merged is not None and cfg.bool_masks:
        merged = ~merged
    return merged


# ------------------------------------------------------------------------------------------ reading calls


@dataclass
class _MhaCall:
    node: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    tensors: dict[str, Optional[fx.Node]]
    config: MhaConfig
    need_weights: bool


def _read_functional_call(node: fx.Node) -> Union[_MhaCall, str]:
    """An ``F.multi_head_attention_forward`` call (Dynamo's graphs), or why it cannot be lowered."""
    try:
        bound = _FUNCTIONAL_SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError as error:
        return f"F.multi_head_attention_forward with unexpected arguments ({error})"
    bound.apply_defaults()
    a = bound.arguments
    if a["static_k"] is not None or a["static_v"] is not None:
        return "F.multi_head_attention_forward with static_k/static_v"
    tensors = {name: a.get(name) for name in _TENSOR_FIELDS}
    tensors["in_proj_weight"] = a["in_proj_weight"] if not a["use_separate_proj_weight"] else None
    return _make_call(node, a["query"], a["key"], a["value"], tensors, a["num_heads"], a["add_zero_attn"],
                      a["dropout_p"], a["training"], a["need_weights"], a["is_causal"], a["use_separate_proj_weight"],
                      batch_first=False, embed_dim=a["embed_dim_to_check"])


def _read_module_call(gm: fx.GraphModule, node: fx.Node) -> Union[_MhaCall, str]:
    """An ``nn.MultiheadAttention`` module call (fx.symbolic_trace's graphs), or why it cannot be lowered."""
    module: nn.MultiheadAttention = gm.get_submodule(node.target)
    if type(module).forward is not nn.MultiheadAttention.forward:  # e.g. torch.ao's quantizable MHA
        return f"{type(module).__name__} (a MultiheadAttention with its own forward) is not decomposed"
    try:
        bound = _MODULE_SIGNATURE.bind(module, *node.args, **node.kwargs)
    except TypeError as error:
        return f"nn.MultiheadAttention called with unexpected arguments ({error})"
    bound.apply_defaults()
    a = bound.arguments
    fake_mode = getattr(g.tensor_val(a["query"]), "fake_mode", None)
    params = {
        "in_proj_weight": "in_proj_weight", "in_proj_bias": "in_proj_bias", "q_proj_weight": "q_proj_weight",
        "k_proj_weight": "k_proj_weight", "v_proj_weight": "v_proj_weight", "bias_k": "bias_k",
        "bias_v": "bias_v", "out_proj_weight": "out_proj.weight", "out_proj_bias": "out_proj.bias",
    }
    tensors = {}
    for field, path in params.items():
        attr = _get_attr(gm, node, f"{node.target}.{path}", fake_mode)
        if isinstance(attr, str):
            return attr
        tensors[field] = attr
    separate = not module._qkv_same_embed_dim
    if separate:
        tensors["in_proj_weight"] = None
    tensors["key_padding_mask"], tensors["attn_mask"] = a["key_padding_mask"], a["attn_mask"]
    return _make_call(node, a["query"], a["key"], a["value"], tensors, module.num_heads, module.add_zero_attn,
                      module.dropout, module.training, a["need_weights"], a["is_causal"], separate,
                      batch_first=module.batch_first, embed_dim=module.embed_dim)


def _make_call(node, query, key, value, tensors, num_heads, add_zero_attn, dropout_p, training, need_weights,
               is_causal, separate, batch_first, embed_dim) -> Union[_MhaCall, str]:
    flags = {"num_heads": num_heads, "add_zero_attn": add_zero_attn, "dropout_p": dropout_p, "training": training,
             "need_weights": need_weights, "is_causal": is_causal, "embed_dim": embed_dim}
    for name, value_ in flags.items():
        if isinstance(value_, fx.Node):
            return f"multi-head attention with a run-time {name}"
    q_val = g.tensor_val(query)
    if q_val is None or any(g.tensor_val(x) is None for x in (key, value)):
        return "multi-head attention on inputs without a recorded tensor value"
    if (tensors["bias_k"] is None) != (tensors["bias_v"] is None):
        return "nn.MultiheadAttention with only one of bias_k/bias_v (PyTorch raises)"
    kpm, attn_mask = _bool_source(_absent_as_none(tensors["key_padding_mask"])), \
        _bool_source(_absent_as_none(tensors["attn_mask"]))
    if is_causal and attn_mask is None:
        return "is_causal=True without attn_mask (PyTorch raises)"
    masks = [m for m in (kpm, attn_mask) if m is not None]
    mask_vals = [g.tensor_val(m) for m in masks]
    if any(v is None for v in mask_vals):
        return "multi-head attention with a mask of unknown dtype"
    tensors = dict(tensors, key_padding_mask=kpm, attn_mask=attn_mask)
    causal_hint = bool(is_causal) and kpm is None and not need_weights
    config = MhaConfig(
        num_heads=int(num_heads), embed_dim=int(embed_dim), dtype=q_val.dtype, batched=q_val.dim() == 3,
        batch_first=bool(batch_first), separate_proj=bool(separate), add_zero_attn=bool(add_zero_attn),
        dropout_p=float(dropout_p) if training else 0.0, causal_hint=causal_hint,
        attn_mask_ndim=0 if attn_mask is None or causal_hint else g.ndim(attn_mask),
        bool_masks=all(v.dtype == torch.bool for v in mask_vals),
    )
    return _MhaCall(node, query, key, value, tensors, config, bool(need_weights))


def _absent_as_none(mask: Optional[fx.Node]) -> Optional[fx.Node]:
    # fx.symbolic_trace makes an input given as None a placeholder whose value is None (the graph is captured
    # again for a call that passes a tensor there)
    return None if isinstance(mask, fx.Node) and g.val(mask) is None else mask


def _bool_source(mask: Optional[fx.Node]) -> Optional[fx.Node]:
    """For a bool mask made additive (``F._canonical_mask``, as fx records it, or inlined as Dynamo records it:
    ``zeros_like(m, dtype=).masked_fill_(m, -inf)``), the bool mask: the decomposition merges bool masks as bool,
    so the mask analysis sees what they are (key padding). Any other mask is returned as it is."""
    if not isinstance(mask, fx.Node):
        return mask
    source = None
    if _is_canonical_mask(mask):
        source = g.arg(mask, 0, "mask")
        while _is_canonical_mask(source):  # the encoder and then each layer canonicalize the same mask
            source = g.arg(source, 0, "mask")
    elif g.is_call(mask, (torch.Tensor.masked_fill,), {"masked_fill_", "masked_fill"}) and len(mask.args) >= 3:
        base, cond, fill = mask.args[:3]
        if (g.is_call(base, (torch.zeros_like,)) and base.args and base.args[0] is cond and fill == float("-inf")
                and len(base.users) == 1):
            source = cond
    value = g.tensor_val(source)
    return source if value is not None and value.dtype == torch.bool else mask


def _is_canonical_mask(node: Any) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and getattr(node.target, "__name__", "") == "_canonical_mask"
            and getattr(node.target, "__module__", "") == "torch.nn.functional")


def _get_attr(gm: fx.GraphModule, anchor: fx.Node, target: str, fake_mode) -> Union[fx.Node, None, str]:
    """A ``get_attr`` node for a tensor attribute of the module (a parameter, or what a parametrization computes);
    None where the module has None there; a reason for anything else."""
    value: Any = getattr_path(gm, target)
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        return f"nn.MultiheadAttention whose {target.rsplit('.', 1)[-1]} is a {type(value).__name__}, not a tensor"
    graph = anchor.graph
    with graph.inserting_before(anchor):
        node = graph.get_attr(target)
    copy_meta(anchor, node)
    node.meta["val"] = fake_mode.from_tensor(value) if fake_mode is not None else value
    return node


def _output_use_problem(node: fx.Node, need_weights: bool) -> Optional[str]:
    """Why the ``(output, weights)`` result of ``node`` cannot be replaced by the output alone, or None."""
    for user in node.users:
        if user.op == "output":  # the tuple returned as it is
            if need_weights:
                return WEIGHTS_RETURNED
            continue
        if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] in (0, 1, -1, -2)):
            return f"the (output, weights) result of multi-head attention is used as a whole by {user.format_node()}"
        if user.args[1] in (1, -1) and user.users:
            return WEIGHTS_RETURNED if need_weights else "multi-head attention's weights (None) are read"
    return None


def _replace_in(args: Any, old: fx.Node, new: Any) -> Any:
    if args is old:
        return new
    if isinstance(args, (tuple, list)):
        return type(args)(_replace_in(a, old, new) for a in args)
    if isinstance(args, dict):
        return {k: _replace_in(v, old, new) for k, v in args.items()}
    return args


def _emit(call: _MhaCall) -> fx.Node:
    """Write ``multi_head_attention`` for ``call`` into the graph before ``call.node``; its output node."""
    graph = call.node.graph
    tracer = GraphAppendingTracer(graph)
    proxies: dict[fx.Node, fx.Proxy] = {}

    def proxy(x: Optional[fx.Node]):
        if x is None:
            return None
        if x not in proxies:  # one proxy per node, so ``query is key`` holds where the graph says so
            proxies[x] = fx.Proxy(x, tracer)
        return proxies[x]

    existing = set(graph.nodes)
    with graph.inserting_before(call.node):
        out = multi_head_attention(proxy(call.query), proxy(call.key), proxy(call.value),
                                   {name: proxy(x) for name, x in call.tensors.items()}, call.config)
    for node in graph.nodes:
        if node not in existing:
            node.meta.pop("nn_module_stack", None)
            copy_meta(call.node, node)
            fill_val(node)
    return out.node
