"""End-to-end error metrics: how far a model's output on one batch is from the original's, per sample.

Each metric maps ``(output, reference, batch)`` to a float64 tensor ``[B]`` (one error per batch row, 0 when
equal). The output is the tensor a user compares first (``logits``, ``last_hidden_state``, the output itself:
``attncc.cli.common.main_tensor``); token positions where the batch's ``attention_mask`` is 0 are padding and
never count.

* ``cosine``: ``1 - cos`` of the mean-pooled output over real tokens (a sentence embedding's error) for
  ``[B, N, D]`` outputs, of each row for ``[B, D]`` outputs;
* ``rel_l2``: ``||out - ref|| / ||ref||`` over the real tokens of each row;
* ``logits_kl``: ``KL(softmax(ref) || softmax(out))`` over the last dim, averaged over real tokens.

A callable ``metric(output, reference, batch) -> Tensor[B]`` may be passed instead of a name.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from attncc.errors import AttnccError

Metric = Callable[[Any, Any, Any], Tensor]
METRICS = ("cosine", "rel_l2", "logits_kl")


def main_output(output: Any) -> Tensor:
    """The tensor a user compares first (see ``attncc.cli.common.main_tensor``), as float64."""
    from attncc.cli.common import main_tensor

    return main_tensor(output).detach().double()


def token_mask(batch: Any, out: Tensor) -> Optional[Tensor]:
    """float64 ``[B, N]`` with 1 at real tokens, from the batch's ``attention_mask`` when it has one that fits the
    output's ``[B, N, ...]``; None otherwise (every position counts)."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if not isinstance(mask, Tensor) or out.dim() < 3 or tuple(mask.shape) != tuple(out.shape[:2]):
        return None
    return mask.to(device=out.device, dtype=torch.float64)


def _pooled(out: Tensor, mask: Optional[Tensor]) -> Tensor:
    if out.dim() == 2:
        return out
    flat = out.reshape(out.shape[0], out.shape[1], -1)
    if mask is None:
        return flat.mean(dim=1)
    return (flat * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1.0)


def cosine_error(output: Any, reference: Any, batch: Any) -> Tensor:
    out, ref = main_output(output), main_output(reference)
    mask = token_mask(batch, ref)
    a, b = _pooled(out, mask).flatten(1), _pooled(ref, mask).flatten(1)
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=1)


def rel_l2_error(output: Any, reference: Any, batch: Any) -> Tensor:
    out, ref = main_output(output), main_output(reference)
    mask = token_mask(batch, ref)
    diff, base = (out - ref).reshape(ref.shape[0], -1, 1), ref.reshape(ref.shape[0], -1, 1)
    if mask is not None:
        weight = mask.reshape(ref.shape[0], ref.shape[1], 1).repeat_interleave(diff.shape[1] // ref.shape[1], dim=1)
        diff, base = diff * weight, base * weight
    return diff.norm(dim=(1, 2)) / base.norm(dim=(1, 2)).clamp_min(1e-30)


def logits_kl_error(output: Any, reference: Any, batch: Any) -> Tensor:
    out, ref = main_output(output), main_output(reference)
    kl = (torch.log_softmax(ref, -1).exp() * (torch.log_softmax(ref, -1) - torch.log_softmax(out, -1))).sum(-1)
    kl = kl.reshape(ref.shape[0], -1)
    mask = token_mask(batch, ref)
    if mask is None:
        return kl.mean(dim=1)
    return (kl * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


_BY_NAME: dict[str, Metric] = {"cosine": cosine_error, "rel_l2": rel_l2_error, "logits_kl": logits_kl_error}


def metric_function(metric: Union[str, Metric]) -> Metric:
    """The per-sample error function ``metric`` names (or ``metric`` itself when callable)."""
    if callable(metric):
        return metric
    if metric not in _BY_NAME:
        raise AttnccError(f"auto: metric must be one of {', '.join(METRICS)} or a callable, got {metric!r}")
    return _BY_NAME[metric]


def metric_name(metric: Union[str, Metric]) -> str:
    return metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
