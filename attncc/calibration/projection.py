"""Where a site's output enters the residual stream: the output projection that follows the attention op.

Models write ``out.transpose(1, 2).reshape(B, N, H * Dv)`` and then a linear layer (BERT's ``output.dense``,
Llama's ``o_proj``, timm's ``proj``). Head ``h``'s part of the projected output is
``out[:, h] @ W[:, h*Dv:(h+1)*Dv]^T``,
so an error in head ``h`` costs ``delta_h G_h delta_h^T`` per token with ``G_h = W_h^T W_h`` (``[Dv, Dv]``): the
error as the rest of the model sees it, which ranks heads far better than the error of the attention output
(a head whose output the projection nearly ignores costs little).

``find_projection`` follows the op's single-user chain of pure layout ops (reshape, view, transpose, permute,
contiguous, flatten, clone, eval-mode dropout) to a linear layer, and proves the chain maps ``[B, H, N, Dv]``
onto the linear's input ``[B, N, H * Dv]`` head by head by replaying it on a probe tensor; anything else gives
None (the errors are then measured on the op's output itself).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

LAYOUT_METHODS = {"reshape", "view", "transpose", "permute", "contiguous", "flatten", "clone"}
LAYOUT_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.clone}
LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear}
DROPOUT_FUNCTIONS = {F.dropout, torch.dropout}


@dataclass(frozen=True)
class Projection:
    """The linear layer a site's output feeds, as per-head Gram matrices."""

    grams: Tensor
    """float32 ``[H, Dv, Dv]``: ``W_h^T W_h`` of each head's column slice of the projection weight."""

    def head_errors(self, delta: Tensor, rows: Optional[Tensor]) -> Tensor:
        """Squared norm of each head's projected error, summed over the real query rows.

        delta ``[B, H, Nq, Dv]`` (candidate minus exact output), rows float ``[B, Nq]`` (1 = real query) or None
        -> float64 ``[B, H]``."""
        d = delta.float()
        per_row = torch.einsum("bhnd,hde,bhne->bhn", d, self.grams.to(d.device), d)
        return _sum_rows(per_row, rows)


def plain_head_errors(delta: Tensor, rows: Optional[Tensor]) -> Tensor:
    """Squared norm of each head's error on the op's output itself (no projection found): float64 ``[B, H]``."""
    return _sum_rows(delta.float().pow(2).sum(-1), rows)


def _sum_rows(per_row: Tensor, rows: Optional[Tensor]) -> Tensor:
    if rows is not None:
        per_row = per_row * rows[:, None, :].to(per_row)
    return per_row.double().sum(-1)


def find_projection(node: fx.Node, out: Tensor, fetch: Callable[[fx.Node], object],
                    module: nn.Module) -> Optional[Projection]:
    """The output projection of the attention op ``node`` whose output is ``out`` ``[B, H, Nq, Dv]``.

    ``fetch(n)`` gives the value of a graph node the interpreter has computed (raises KeyError if it has not);
    ``module`` is the graph module (for ``call_module`` linears and ``get_attr`` weights)."""
    if out.dim() != 4:
        return None
    chain, linear = _layout_chain(node, module)
    if linear is None:
        return None
    try:
        weight = _linear_weight(linear, fetch, module)
        if not _maps_heads(chain, node, out.shape, fetch):
            return None
    except (KeyError, RuntimeError, TypeError, ValueError, AttributeError):
        return None
    b, h, n, dv = out.shape
    if weight is None or weight.dim() != 2 or weight.shape[1] != h * dv:
        return None
    w = weight.detach().float().reshape(weight.shape[0], h, dv)
    return Projection(torch.einsum("ohd,ohe->hde", w, w))


def _layout_chain(node: fx.Node, module: nn.Module) -> tuple[list[fx.Node], Optional[fx.Node]]:
    chain, current = [], node
    for _ in range(16):
        users = list(current.users)
        if len(users) != 1:
            return chain, None
        nxt = users[0]
        if _is_linear(nxt, module) and nxt.args and nxt.args[0] is current:
            return chain, nxt
        if not _is_layout(nxt) or not nxt.args or nxt.args[0] is not current:
            return chain, None
        chain.append(nxt)
        current = nxt
    return chain, None


def _is_layout(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in LAYOUT_METHODS
    if n.op == "call_function":
        if n.target in LAYOUT_FUNCTIONS:
            return True
        if n.target in DROPOUT_FUNCTIONS:  # identity in eval mode only
            training = n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True)
            train = n.kwargs.get("train", training)
            return train is False
    return False


def _is_linear(n: fx.Node, module: nn.Module) -> bool:
    if n.op == "call_function":
        return n.target in LINEAR_FUNCTIONS
    if n.op == "call_module":
        return isinstance(module.get_submodule(n.target), nn.Linear)
    return False


def _linear_weight(n: fx.Node, fetch, module: nn.Module) -> Optional[Tensor]:
    if n.op == "call_module":
        return module.get_submodule(n.target).weight
    w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
    if isinstance(w, fx.Node):
        if w.op == "get_attr":
            return operator.attrgetter(w.target)(module)
        return fetch(w)
    return w if isinstance(w, Tensor) else None


def _maps_heads(chain: list[fx.Node], node: fx.Node, shape, fetch) -> bool:
    """Replay ``chain`` on a probe ``[B, H, N, Dv]`` of distinct values: True when it lands as ``[..., H * Dv]``
    with head h's channels at columns ``h * Dv .. (h + 1) * Dv``, token by token."""
    b, h, n, dv = shape
    probe = torch.arange(b * h * n * dv, dtype=torch.float64).reshape(b, h, n, dv)
    value, previous = probe, node
    for step in chain:
        args = tuple(value if a is previous else _resolve(a, fetch) for a in step.args)
        previous = step
        kwargs = {k: _resolve(v, fetch) for k, v in step.kwargs.items()}
        if step.op == "call_method":
            value = getattr(args[0], step.target)(*args[1:], **kwargs)
        elif step.target in DROPOUT_FUNCTIONS:
            value = args[0]
        else:
            value = step.target(*args, **kwargs)
    if value.shape[-1] != h * dv or value.numel() != probe.numel():
        return False
    return torch.equal(value.reshape(b, n, h, dv), probe.permute(0, 2, 1, 3))


def _resolve(a, fetch):
    if isinstance(a, fx.Node):
        return fetch(a)
    if isinstance(a, (list, tuple)):
        return type(a)(_resolve(x, fetch) for x in a)
    return a
