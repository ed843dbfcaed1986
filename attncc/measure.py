"""Measured error: run a rewritten graph once and compare each site's output with exact attention.

At every attncc op in the graph, the interpreter also runs the site's exact spec on the same q, k, v and
masks, so the figure is the site's own error (not the error accumulated from earlier sites). It also counts
the attention FLOPs the call actually ran where its variant measures them (``VariantSpec.measured_pairs``:
data-dependent selections, padding excluded) and the FLOPs of dense attention over the real tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import warnings

import torch
import torch.fx as fx

from attncc import progress

SITE_META = "attncc_site"
"""``node.meta`` key: the position of the op's site in its graph's site list (set by the rewrite pass)."""


@dataclass(frozen=True)
class SiteError:
    """Error of one site's output against exact attention on the same inputs."""

    rel_l2: float
    """``||out - exact|| / ||exact||`` over the whole output tensor."""
    cosine: float
    """Cosine similarity of the flattened outputs."""
    flops_measured: Optional[float] = None
    """Attention FLOPs the call ran, ``2 * pairs * (D + Dv)`` summed over batch and query heads, with the pairs
    the variant measured on these inputs (``measured_pairs``: real queries x real keys it scored, a pooled
    entry one pair); None where the variant does not measure them."""
    flops_dense_real: Optional[float] = None
    """FLOPs of dense attention over the real tokens only: ``2 * Hq * real_q * real_k * (D + Dv)`` summed over
    batch rows (padding = a key-padding mask; the queries of self-attention are the key tokens)."""


def compare(out: torch.Tensor, exact: torch.Tensor) -> SiteError:
    """Relative L2 error and cosine of two tensors (float64 sums)."""
    a, b = out.detach().double().flatten(), exact.detach().double().flatten()
    finite = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[finite], b[finite]
    norm = b.norm()
    rel = float((a - b).norm() / norm) if norm > 0 else float((a - b).norm())
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0)) if a.numel() else 1.0
    return SiteError(rel, cos)


class _ErrorRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.errors: dict[int, SiteError] = {}
        self.step = progress.Steps("", None, visible=False, lazy=True)  # replaced while run_measuring runs

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_function" and SITE_META in n.meta:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            exact_kwargs = dict(kwargs, variant=kwargs.get("fallback", "exact"), min_len=0)
            error = None
            if kwargs.get("variant", "exact") == exact_kwargs["variant"]:
                error = SiteError(0.0, 1.0)
            elif isinstance(out, torch.Tensor):
                with torch.no_grad():
                    exact = n.target(*args, **exact_kwargs)
                error = compare(out, exact)
            if error is not None:
                measured, dense_real = _flops_or_warn(args, kwargs, n.meta.get("attncc_module", ""))
                self.errors[n.meta[SITE_META]] = replace(error, flops_measured=measured, flops_dense_real=dense_real)
            self.step.advance(f"site {n.meta[SITE_META]} {n.meta.get('attncc_module', '')}".rstrip())
        return out


def call_flops(args: tuple, kwargs: dict) -> tuple[Optional[float], Optional[float]]:
    """``(measured, dense_real)`` attention FLOPs of one op call (see :class:`SiteError`); None where the
    call's shapes are not ``[B, H, N, D]`` / ``[B, N, D]`` (measured: also where its variant measures none)."""
    from attncc.runtime.call import AttentionCall
    from attncc.runtime.dispatch import resolve_spec, route_segments
    from attncc.variants.remainder import real_keys

    call = AttentionCall(*args, **kwargs)
    q, k, v = call.q, call.k, call.v
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or q.dim() not in (3, 4) or k.dim() != q.dim():
        return None, None
    mods = call.score_mods()
    if q.dim() == 3:  # one head
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        mods = replace(mods, bias=None if mods.bias is None else mods.bias.unsqueeze(-3),
                       mask=None if mods.mask is None or mods.mask.dim() < 3 else mods.mask.unsqueeze(-3))
    width = 2 * (q.shape[-1] + v.shape[-1])
    nq, nk = q.shape[-2], k.shape[-2]
    keys = real_keys(mods.mask, nk)
    if keys is None:
        dense_real = float(width * q.shape[0] * q.shape[1] * nq * nk)
    else:  # the queries of self-attention (Nq <= Nk: the last Nq tokens) are padding where their keys are
        real_k = keys.sum(-1).double().expand(q.shape[0])
        real_q = keys[:, nk - nq:].sum(-1).double().expand(q.shape[0]) if nq <= nk else torch.full_like(real_k, nq)
        dense_real = float(width * q.shape[1] * (real_q * real_k).sum())
    spec, _, _ = route_segments(resolve_spec(call), call, mods)
    with torch.no_grad():
        pairs = spec.measured_pairs(q, k, mods)
    measured = None if pairs is None else float(width * pairs.double().sum())
    return measured, dense_real


def _flops_or_warn(args: tuple, kwargs: dict, module: str) -> tuple[Optional[float], Optional[float]]:
    """``call_flops``, or ``(None, None)`` with a warning when counting fails: the model's call still runs (the
    report then shows no measured FLOPs for the site, and says so)."""
    try:
        return call_flops(args, kwargs)
    except Exception as error:  # counting is a report figure; it must not fail the model's call
        warnings.warn(f"attncc: could not count the FLOPs of the attention in {module or 'a site'}: "
                      f"{type(error).__name__}: {error}")
        return None, None


def run_measuring(gm: fx.GraphModule, args: list) -> tuple[Any, dict[int, SiteError]]:
    """Run ``gm`` on positional placeholder values; returns its output and the error of each site it runs
    (keyed by the site's position in the graph's site list)."""
    recorder = _ErrorRecorder(gm)
    with progress.steps("measuring error", total=sum(SITE_META in n.meta for n in gm.graph.nodes)) as recorder.step:
        out = recorder.run(*args)
    return out, recorder.errors
