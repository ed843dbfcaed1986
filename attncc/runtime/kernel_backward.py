"""The op's backward: the softmax backward kernels where they cover the call, else a recompute through the
torch path.

The kernels run inside a custom op of their own, ``torch.ops.attncc.attention_backward`` (with a fake
implementation), so ``torch.compile`` / AOT autograd trace the backward graph with it as one opaque node
instead of tracing into Triton launches. Whether a call takes the kernels is decided from shapes, dtypes and
options only (:func:`kernel_backward_covers`), so the decision is the same when traced; a call the kernels
cannot run after all (no launch config fits the GPU) recomputes inside the op.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from attncc.errors import AttnccError
from attncc.runtime.call import AttentionCall
from attncc.runtime.dispatch import _sink_vector, backend_for, resolve_spec, run_attention
from attncc.variants.base import ScoreMods


def recomputed_gradients(call: AttentionCall, grad_out: Tensor, targets: list[str]) -> dict[str, Tensor]:
    """The gradients of ``targets`` (names of differentiable fields) by autograd through a recomputed forward
    (the torch path: the dispatcher declines inputs that need gradients to it)."""
    with torch.enable_grad():
        leaves = {name: t.detach().requires_grad_(name in targets) if t is not None else None
                  for name, t in call.differentiable().items()}
        out = run_attention(call.replace(**leaves))
        grads = torch.autograd.grad(out, [leaves[name] for name in targets], grad_out) if targets else ()
    return dict(zip(targets, grads))


def kernel_backward_may_run(call: AttentionCall) -> bool:
    """Whether the backward kernels may take this call at all (the triton backend, no dropout, no region
    labels, 4-D inputs); decides whether the forward saves its output."""
    if call.dropout_p > 0 or call.segments is not None or call.q.dim() != 4:
        return False
    try:
        return backend_for(call.q) == "triton"
    except AttnccError:
        return False


def _kernel_mods(call: AttentionCall) -> ScoreMods:
    sinks = _sink_vector(call.sinks, call.q)
    return replace(call.score_mods(), sinks=None if sinks is None else sinks.expand(call.q.shape[1]))


def kernel_backward_covers(call: AttentionCall) -> bool:
    """Whether the backward kernels run this call (from shapes, dtypes and options: traceable)."""
    from attncc.runtime.triton_backend import backward_uncovered

    if not kernel_backward_may_run(call) or (call.bias is not None and call.bias.dim() > 4):
        return False
    return not backward_uncovered(resolve_spec(call), call.q, call.k, call.v, _kernel_mods(call))


def kernel_backward(call: AttentionCall, out: Tensor, grad_out: Tensor, targets: list[str]) -> dict[str, Tensor]:
    """The gradients of ``targets`` through ``torch.ops.attncc.attention_backward`` (for a call
    :func:`kernel_backward_covers` accepts)."""
    grads = backward_op(grad_out, out, call.q, call.k, call.v, call.bias, call.mask, call.sinks, call.scale,
                        call.causal, call.softcap, call.variant, call.fallback, call.min_len,
                        "bias" in targets, "sinks" in targets)
    return {name: grad for name, grad in zip(("q", "k", "v", "bias", "sinks"), grads) if name in targets}


def _backward_op(grad_out: Tensor, out: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                 mask: Optional[Tensor], sinks: Optional[Tensor], scale: float, causal: bool, softcap: float,
                 variant: str, fallback: str, min_len: int, want_bias: bool, want_sinks: bool) -> list[Tensor]:
    """``[dq, dk, dv, dbias, dsinks]`` of one op call (dbias / dsinks empty unless wanted), by the kernels, or by
    a recompute through the torch path when they cannot run it on this device."""
    call = AttentionCall(q, k, v, bias=bias, mask=mask, scale=scale, causal=causal, softcap=softcap,
                         variant=variant, fallback=fallback, min_len=min_len, sinks=sinks)
    targets = ["q", "k", "v"] + (["bias"] if want_bias else []) + (["sinks"] if want_sinks else [])
    grads = _kernel_gradients(call, out, grad_out, targets)
    if grads is None:
        grads = recomputed_gradients(call, grad_out, targets)
    return [grads[name] if name in grads else q.new_empty(0) for name in ("q", "k", "v", "bias", "sinks")]


backward_op = torch.library.custom_op("attncc::attention_backward", _backward_op, mutates_args=())


@backward_op.register_fake
def _backward_fake(grad_out, out, q, k, v, bias, mask, sinks, scale, causal, softcap, variant, fallback, min_len,
                   want_bias, want_sinks):
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            bias.new_empty(bias.shape) if want_bias else q.new_empty(0),
            sinks.new_empty(sinks.shape) if want_sinks else q.new_empty(0)]


def _kernel_gradients(call: AttentionCall, out: Tensor, grad_out: Tensor, targets: list[str]) -> Optional[dict]:
    """The gradients of ``targets`` by the backward kernels; None when they do not run this call."""
    from attncc.runtime.triton_backend import triton_attention_backward

    if not kernel_backward_may_run(call):
        return None
    q = call.q
    found = triton_attention_backward(resolve_spec(call), q, call.k, call.v, out, grad_out, _kernel_mods(call),
                                      bias_grad="bias" in targets)
    if found is None:
        return None
    grads = {"q": found.dq, "k": found.dk, "v": found.dv}
    if "bias" in targets:
        grads["bias"] = _reduced_to(found.dscores, call.bias.shape).to(call.bias.dtype)
    if "sinks" in targets:
        dsinks = found.dsinks if call.sinks.numel() == q.shape[1] else found.dsinks.sum()
        grads["sinks"] = dsinks.reshape(call.sinks.shape).to(call.sinks.dtype)
    return {name: grads[name] for name in targets}


def _reduced_to(full: Tensor, shape: torch.Size) -> Tensor:
    """``full`` ``[B, Hq, Nq, Nk]`` summed over the dims a tensor of ``shape`` broadcasts along, in ``shape``."""
    padded = (1,) * (full.dim() - len(shape)) + tuple(shape)
    dims = tuple(i for i, (n, m) in enumerate(zip(padded, full.shape)) if n == 1 and m != 1)
    return (full.sum(dims, keepdim=True) if dims else full).reshape(shape)


__all__ = ["backward_op", "kernel_backward", "kernel_backward_covers", "kernel_backward_may_run",
           "recomputed_gradients"]
