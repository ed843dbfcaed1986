"""The attncc custom op (``torch.ops.attncc.attention``) and the functional ``attncc.attention``.

The op is a ``torch.library.custom_op`` with a fake implementation, so rewritten graphs survive
``torch.compile`` (no graph break) and ``torch.export``. Backward runs the backward kernels
(``attncc.codegen.softmax_backward``) on the triton backend where the variant has them, and otherwise
recomputes through the torch path.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from attncc.errors import AttnccError
from attncc.runtime.call import FIELD_NAMES, AttentionCall
from attncc.runtime.dispatch import run_attention
from attncc.runtime.kernel_backward import (
    kernel_backward, kernel_backward_covers, kernel_backward_may_run, recomputed_gradients,
)
from attncc.variants.exact import expand_kv_heads
from attncc.variants.parse import parse_variant


def _run_op(*args, **kwargs) -> Tensor:
    """One attention site: ``variant`` is the variant's canonical text (``"exact"``, ``"local(window=256)"``,
    semantics in ``attncc.variants``), run as ``fallback`` while the key length is below ``min_len``.
    ``segments`` (int64 ``[nW, N]``, exact only) adds ``segment_fill`` between tokens of different regions; batch
    row r of q uses row ``r % nW`` (Swin's shifted windows). ``sinks`` (float ``[Hq]``, or ``[1]`` shared) are
    learned sink logits: the softmax denominator of query head h gains ``exp(sinks[h])``, no value is added.
    Arguments: the fields of ``AttentionCall``, in its order. Returns ``[*batch, Nq, Dv]`` in q's dtype."""
    out = run_attention(AttentionCall(*args, **kwargs))
    # custom ops may not return a view of an input (SDPA can, for some degenerate shapes)
    return out.clone() if out._base is not None else out


# the op's signature (hence its schema, which graphs and exported programs hold) is AttentionCall's fields
_run_op.__signature__ = AttentionCall.op_signature()
attention_op = torch.library.custom_op("attncc::attention", _run_op, mutates_args=())


@attention_op.register_fake
def _attention_fake(*args, **kwargs):
    call = AttentionCall(*args, **kwargs)
    q, k, v, _ = expand_kv_heads(call.q, call.k, call.v)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup_context(ctx, inputs, output):
    call = AttentionCall(*inputs)
    # the backward kernels also read the output (delta = rowsum(dO * O)); the torch path does not need it
    ctx.save_for_backward(*call.tensors(), output if kernel_backward_may_run(call) else None)
    ctx.options = call.options()


def _backward(ctx, grad_out):
    *tensors, out = ctx.saved_tensors
    call = AttentionCall.from_saved(tuple(tensors), ctx.options)
    # needs_input_grad covers the arguments the call passed (trailing defaults, e.g. sinks, may be absent)
    needs = dict(zip(FIELD_NAMES, ctx.needs_input_grad))
    wants = {name: t is not None and t.is_floating_point() and needs.get(name, False)
             for name, t in call.differentiable().items()}
    targets = [name for name, want in wants.items() if want]
    # create_graph (double backward) needs the recompute: the kernels' op has no derivative of its own
    if out is not None and targets and not torch.is_grad_enabled() and kernel_backward_covers(call):
        grads = kernel_backward(call, out, grad_out, targets)
    else:
        grads = recomputed_gradients(call, grad_out, targets)
    return AttentionCall.grads(grads)[:len(ctx.needs_input_grad)]


attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(
    q: Tensor, k: Tensor, v: Tensor, variant: str = "exact", causal: bool = False, scale: Optional[float] = None,
    bias: Optional[Tensor] = None, mask: Optional[Tensor] = None, softcap: float = 0.0, dropout_p: float = 0.0,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """Attention in SDPA layout, as one attncc op.

    Args:
        q: ``[B, Hq, Nq, Dqk]`` (any leading dims work: ``[*batch, Nq, Dqk]``).
        k: ``[B, Hkv, Nk, Dqk]`` with ``Hq % Hkv == 0`` (GQA/MQA without copies in the graph).
        v: ``[B, Hkv, Nk, Dv]``; Dv may differ from Dqk.
        variant: the variant text: ``"exact"``, ``"local(window=256, sinks=4)"``, ``"topk(density=0.125)"``,
            ``"linear(feature_map='elu')"`` ... (see ``attncc.variants``).
        causal: mask keys after the query position (top-left aligned, as SDPA's is_causal).
        scale: multiplier of ``q @ k^T``; default ``1/sqrt(Dqk)``.
        bias: additive float, broadcastable to ``[B, Hq, Nq, Nk]``.
        mask: bool, broadcastable to ``[B, Hq, Nq, Nk]``; True = attend.
        softcap: when > 0, scores become ``softcap * tanh(scores / softcap)`` before bias and mask.
        dropout_p: dropout on the probabilities (applied whenever > 0, as in SDPA).
        sinks: learned sink logits (gpt-oss), float ``[Hq]`` (one per query head) or ``[1]``: the softmax of
            head h gets an extra term ``exp(sinks[h])`` in its denominator and none in the output, i.e.
            ``softmax(cat([scores, sinks], -1))[..., :-1] @ v``. Not supported by ``linear``.

    Returns:
        ``[B, Hq, Nq, Dv]``.

    Example::

        out = attncc.attention(q, k, v, causal=True)   # == F.scaled_dot_product_attention(q, k, v, is_causal=True)
    """
    if not torch.compiler.is_compiling():  # validated once when eager; the op parses (cached) when it runs
        variant = str(parse_variant(variant))
    check_attention_inputs(q, k, v, bias, mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seed = None
    if dropout_p > 0:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    call = AttentionCall(q, k, v, bias=bias, mask=mask, scale=scale, causal=causal, softcap=float(softcap),
                         dropout_p=float(dropout_p), dropout_seed=seed, variant=variant, sinks=sinks)
    args, kwargs = call.op_arguments()
    return attention_op(*args, **kwargs)


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor]) -> None:
    """Raise one AttnccError naming the shapes (dtypes, devices) when ``attention``'s inputs do not fit together.

    q ``[*batch, Hq, Nq, Dqk]``, k ``[*batch, Hkv, Nk, Dqk]``, v ``[*batch, Hkv, Nk, Dv]`` with ``Hq % Hkv == 0``
    (or batch dims that broadcast), one floating dtype and one device; bias (float) and mask (bool) broadcast to
    the scores ``[*batch, Hq, Nq, Nk]``. Checked here so a mistake reads as the user's, not as a broadcast error
    deep inside a variant.
    """
    _check_qkv(q, k, v)
    _check_one_device(q=q, k=k, v=v, bias=bias, mask=mask)
    scores = (*_batch_shape(q, k, v), q.shape[-2], k.shape[-2])
    for name, t, kind in (("bias", bias, "floating"), ("mask", mask, "bool")):
        if t is not None:
            _check_score_term(name, t, kind, scores, _shapes(q, k, v))


def _shapes(q: Tensor, k: Tensor, v: Tensor) -> str:
    return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """q, k, v are tensors of rank >= 2 with matching Dqk and key counts and one floating dtype."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise AttnccError(f"attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise AttnccError(f"attention: {name} must have at least 2 dims [..., N, D], got shape {tuple(t.shape)}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise AttnccError(f"attention: incompatible shapes {_shapes(q, k, v)}: q and k need the same last dim "
                          f"(Dqk), k and v the same key count (dim -2)")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise AttnccError(f"attention: q, k and v need one floating dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")


def _check_one_device(**tensors: Optional[Tensor]) -> None:
    given = {name: t for name, t in tensors.items() if t is not None}
    if len({t.device for t in given.values()}) > 1:
        named = ", ".join(f"{name} {t.device}" for name, t in given.items())
        raise AttnccError(f"attention: all inputs must be on one device, got {named}")


def _batch_shape(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, ...]:
    """The batch dims of the scores: q's, k's and v's broadcast, the heads of dim -3 grouped for GQA/MQA."""
    bq, bk, bv = q.shape[:-2], k.shape[:-2], v.shape[:-2]
    grouped = len(bq) >= 1 and len(bq) == len(bk) == len(bv) and bk[-1] != bq[-1] and bk[-1] != 1
    if grouped:  # GQA/MQA: dim -3 holds the heads; kv heads must divide the query heads
        if bk[-1] != bv[-1] or bq[-1] % bk[-1] != 0:
            raise AttnccError(f"attention: {bq[-1]} query heads and {bk[-1]} key / {bv[-1]} value heads (dim -3): "
                              f"the query heads must be a multiple of the key/value heads, got {_shapes(q, k, v)}")
        outer = (bq[:-1], bk[:-1], bv[:-1])
    else:
        outer = (bq, bk, bv)
    try:
        return (*torch.broadcast_shapes(*outer), *((bq[-1],) if grouped else ()))
    except RuntimeError:
        raise AttnccError(f"attention: the batch dims of {_shapes(q, k, v)} do not broadcast (dims before [N, D])") \
            from None


def _check_score_term(name: str, t: Tensor, kind: str, scores: tuple[int, ...], shapes: str) -> None:
    """bias (``kind`` floating) or mask (bool) has its kind and broadcasts to the scores."""
    if (t.dtype == torch.bool) != (kind == "bool") or not (kind == "bool" or t.is_floating_point()):
        hint = " (an additive float mask goes in bias=)" if name == "mask" else " (a bool mask goes in mask=)"
        raise AttnccError(f"attention: {name} must be {kind}, got {t.dtype}{hint}")
    try:
        fits = tuple(torch.broadcast_shapes(t.shape, scores)) == tuple(scores)
    except RuntimeError:
        fits = False
    if not fits:
        raise AttnccError(f"attention: {name} of shape {tuple(t.shape)} does not broadcast to the scores "
                          f"{tuple(scores)} [*batch, Hq, Nq, Nk] of {shapes}")
