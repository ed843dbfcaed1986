"""Lower FlexAttention calls whose masking is plain (none, or causal) into SDPA, so they become sites.

Dynamo captures ``flex_attention(q, k, v, score_mod=, block_mask=)`` as the higher-order op
``torch.ops.higher_order.flex_attention`` with the score_mod and mask_mod as subgraph modules and the block mask
as tensors computed in the graph (``create_block_mask``, vmapped). A call is lowered to
``F.scaled_dot_product_attention(q, k, v, is_causal=, scale=, enable_gqa=)`` when that computes the same thing:

- the score_mod is the identity (no score_mod given) and no tensors are captured by the mods;
- the block mask's tensors do not depend on the graph's inputs (static shapes: ``create_block_mask`` from
  sizes), so they are evaluated here, and with the mask_mod they let every query attend to every key (no
  block_mask given) or exactly to the keys ``kv_idx <= q_idx`` (a causal mask_mod): the effective mask is
  computed as FlexAttention applies it (visited blocks, mask_mod inside partial blocks, full blocks whole);
- only the output is used (not the logsumexp).

Anything else keeps its node with ``node.meta[UNLOWERED]`` set to the reason; the detector reports it.
"""

from __future__ import annotations

import operator
from typing import Any, Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from attncc.passes import graph_ops as g
from attncc.passes.dead_code import is_side_effect
from attncc.passes.fake_eval import copy_meta, fill_val
from attncc.passes.lower_torch_nn import UNLOWERED
from attncc.util import cdiv

PREFIX = "FlexAttention call: "
MAX_CHECKED_MASK = 1 << 26
"""Largest effective mask (B * H * Nq * Nk elements) evaluated at compile time."""


def _flex_op():
    try:
        return torch.ops.higher_order.flex_attention
    except (AttributeError, RuntimeError):  # pragma: no cover - torch without FlexAttention
        return None


def is_flex_attention(node: fx.Node) -> bool:
    op = _flex_op()
    return op is not None and node.op == "call_function" and node.target is op


def lower_flex_attention(gm: fx.GraphModule, node: fx.Node) -> None:
    """Replace a FlexAttention node by SDPA in place where exact, else set ``node.meta[UNLOWERED]``."""
    plan = _plan(gm, node)
    if isinstance(plan, str):
        node.meta[UNLOWERED] = PREFIX + plan
        return
    q, k, v, scale, causal, gqa = plan
    graph = node.graph
    kwargs: dict[str, Any] = {"is_causal": causal, "scale": scale}
    if gqa:
        kwargs["enable_gqa"] = True
    with graph.inserting_before(node):
        sdpa = graph.call_function(F.scaled_dot_product_attention, (q, k, v), kwargs)
    copy_meta(node, sdpa)
    fill_val(sdpa)
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(sdpa)
        graph.erase_node(user)
    graph.erase_node(node)


def _plan(gm: fx.GraphModule, node: fx.Node) -> Union[str, tuple]:
    """(q, k, v, scale, causal, gqa) for the SDPA call that computes what ``node`` does, or why there is none."""
    args = node.args
    if len(args) < 6 or not isinstance(args[4], (tuple, list)):
        return "arguments of an unknown layout"
    q, k, v, score_mod, block_mask, scale = args[:6]
    reason = _unused_extras(node) or _unplain_mods(gm, node)
    if reason is not None:
        return reason
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        return "a run-time scale"
    qv, kv = g.tensor_val(q), g.tensor_val(k)
    reason = _unsupported_inputs(qv, kv, g.tensor_val(v))
    if reason is not None:
        return reason
    mask = _effective_mask(gm, node, block_mask, qv.shape[2], kv.shape[2])
    if isinstance(mask, str):
        return mask
    n_q, n_k = qv.shape[2], kv.shape[2]
    if bool(mask.all()):
        causal = False
    elif torch.equal(mask, torch.ones(n_q, n_k, dtype=torch.bool).tril().expand_as(mask)):
        causal = True
    else:
        return "a block_mask other than none or causal is not carried yet"
    return q, k, v, float(scale), causal, qv.shape[1] != kv.shape[1]


def _unused_extras(node: fx.Node) -> Optional[str]:
    """Why the call's result is used beyond its output (the whole tuple, the logsumexp), or None."""
    for user in node.users:
        if not (user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int)):
            return f"its result is used as a whole by {user.format_node()}"
        if user.args[1] != 0 and user.users:
            return "its logsumexp is used"
    return None


def _unplain_mods(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """Why the score_mod / mask_mod are more than SDPA carries (a score_mod, captured tensors), or None."""
    score_buffers = node.args[7] if len(node.args) > 7 else ()
    mask_buffers = node.args[8] if len(node.args) > 8 else ()
    if score_buffers or not _is_identity_score_mod(gm, node.args[3]):
        return "score_mod is not carried yet"
    if mask_buffers:
        return "a mask_mod that reads tensors is not carried yet"
    return None


def _unsupported_inputs(qv, kv, vv) -> Optional[str]:
    """Why q/k/v's recorded values do not fit SDPA here (rank, dynamic sizes, batch broadcast), or None."""
    if qv is None or kv is None or vv is None or qv.dim() != 4:
        return "inputs without a recorded 4-D tensor value"
    if not all(isinstance(s, int) for s in (*qv.shape, *kv.shape)):
        return "block_mask with dynamic sizes is not carried yet"
    if qv.shape[0] != kv.shape[0]:
        return "key/value batch broadcast is not carried yet"
    return None


def _is_identity_score_mod(gm: fx.GraphModule, score_mod: Any) -> bool:
    """The score_mod subgraph returns its score argument unchanged (what flex_attention uses when none is given)."""
    if not (isinstance(score_mod, fx.Node) and score_mod.op == "get_attr"):
        return False
    try:
        sub = gm.get_submodule(score_mod.target)
    except AttributeError:
        return False
    if not isinstance(sub, fx.GraphModule):
        return False
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    output = next(n for n in sub.graph.nodes if n.op == "output")
    result = output.args[0]
    if isinstance(result, (tuple, list)) and len(result) == 1:
        result = result[0]
    return bool(placeholders) and result is placeholders[0]


def _effective_mask(gm: fx.GraphModule, node: fx.Node, block_mask: tuple, n_q: int, n_k: int):
    """``[B, H, Nq, Nk]`` bool: which keys each query attends, as FlexAttention applies the block mask; or why it
    cannot be known at compile time."""
    if len(block_mask) < 11:
        return "a block_mask of an unknown layout"
    q_block, kv_block, mask_mod = block_mask[-3], block_mask[-2], block_mask[-1]
    if not all(isinstance(x, int) for x in (q_block, kv_block)):
        return "a block_mask with run-time block sizes"
    if not (isinstance(mask_mod, fx.Node) and mask_mod.op == "get_attr"):
        return "a block_mask without a mask_mod subgraph"
    tensors = list(block_mask[2:6])  # kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices
    values = _constant_values(node, [t for t in tensors if t is not None])
    if values is None:
        return "block_mask is computed from the inputs (not carried yet)"
    num, idx, full_num, full_idx = (values[t] if t is not None else None for t in tensors)
    batch, heads = num.shape[0], num.shape[1]
    if batch * heads * n_q * n_k > MAX_CHECKED_MASK:
        return "a block_mask too large to check at compile time"
    rows = torch.arange(n_q) // q_block
    cols = torch.arange(n_k) // kv_block
    if num.shape[-1] <= int(rows[-1]):
        return "a block_mask made for shorter queries"
    n_cols = cdiv(n_k, kv_block)
    mod = gm.get_submodule(mask_mod.target)
    try:
        from torch.nn.attention.flex_attention import create_mask

        with torch.no_grad(), _real_tensors():
            element = create_mask(lambda b, h, q_idx, kv_idx: mod(b, h, q_idx, kv_idx), batch, heads, n_q, n_k,
                                  device="cpu").bool()
    except Exception as error:  # a mask_mod that does not run on its own
        return f"its mask_mod cannot be evaluated ({type(error).__name__})"
    # FlexAttention's kernels visit the listed blocks (mask_mod inside partial ones, full ones whole); its eager
    # implementation applies mask_mod alone. Both must agree for the call to have one meaning.
    visible = _blocks_dense(num, idx, n_cols)[..., rows[:, None], cols[None, :]] & element
    if full_num is not None:
        visible = visible | _blocks_dense(full_num, full_idx, n_cols)[..., rows[:, None], cols[None, :]]
    if not torch.equal(visible, element):
        return "a block_mask whose blocks disagree with its mask_mod"
    return element


def _blocks_dense(num: torch.Tensor, indices: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``[B, H, nQ, nKV]`` bool of the listed key blocks (the first ``num`` of ``indices`` in each row)."""
    n_cols = max(n_cols, int(indices.max()) + 1 if indices.numel() else 0)
    listed = torch.arange(indices.shape[-1]) < num[..., None]
    dense = torch.zeros(*indices.shape[:-1], n_cols + 1, dtype=torch.bool)
    dense.scatter_(-1, torch.where(listed, indices.long(), n_cols), True)
    return dense[..., :n_cols]


def _constant_values(anchor: fx.Node, targets: list[fx.Node]) -> Optional[dict[fx.Node, torch.Tensor]]:
    """Real values of ``targets`` when they depend on none of the graph's inputs (else None).

    The nodes before ``anchor`` that compute them run in program order: their ancestors, the in-place writes
    into those (``dense[rows, cols] = 1``), and the vmap level changes (no users, but ``_add_batch_dim`` needs
    them). Nothing else runs: other calls may change global state (grad mode, autocast).
    """
    prefix: list[fx.Node] = []
    for n in anchor.graph.nodes:
        if n is anchor:
            break
        prefix.append(n)
    needed = _with_writes(prefix, _ancestors(targets))
    if needed is None:
        return None
    program = [n for n in prefix if n in needed or (_is_vmap_plumbing(n) and not n.all_input_nodes)]
    env = _run_program(program)
    if env is None:
        return None
    values = {t: env[t] for t in targets}
    return values if all(isinstance(x, torch.Tensor) for x in values.values()) else None


def _with_writes(prefix: list[fx.Node], needed: Optional[set[fx.Node]]) -> Optional[set[fx.Node]]:
    """``needed`` grown by the in-place writes into its tensors and what they read; None when a write reads
    the graph's inputs."""
    grown = needed is not None
    while grown:
        grown = False
        for n in prefix:
            if n not in needed and n.args and n.args[0] in needed and is_side_effect(n) and not _is_vmap_plumbing(n):
                writes = _ancestors([n])
                if writes is None:
                    return None  # written from the inputs
                needed |= writes
                grown = True
    return needed


def _run_program(program: list[fx.Node]) -> Optional[dict[fx.Node, Any]]:
    """Run the nodes on real tensors, in order; their values, or None when one fails."""
    env: dict[fx.Node, Any] = {}
    level = torch._C._functorch.maybe_current_level()
    try:
        with torch.no_grad(), _real_tensors():
            for n in program:
                args = fx.node.map_arg(n.args, lambda a: env[a])
                kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
                if n.op == "call_function":
                    env[n] = n.target(*args, **kwargs)
                else:
                    env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
    except Exception:
        return None
    finally:  # leave functorch's vmap levels as they were, also when a step failed half-way
        while torch._C._functorch.maybe_current_level() != level:
            torch._C._functorch._vmap_decrement_nesting()
    return env


def _ancestors(nodes: list[fx.Node]) -> Optional[set[fx.Node]]:
    """``nodes`` and every node they are computed from, or None if that includes an input, a parameter or a
    submodule (not a constant of this graph)."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        if n.op not in ("call_function", "call_method"):
            return None
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _is_vmap_plumbing(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__module__", "") == "torch._functorch.predispatch"


def _real_tensors():
    """Eager tensors here, even where the pass runs under a tracing context's fake mode."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()
