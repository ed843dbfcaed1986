"""Measured error: run a rewritten graph once and compare each site's output with exact attention.

At every attncc op in the graph, the interpreter also runs the site's exact spec on the same q, k, v and
masks, so the figure is the site's own error (not the error accumulated from earlier sites).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
            if kwargs.get("variant", "exact") == exact_kwargs["variant"]:
                self.errors[n.meta[SITE_META]] = SiteError(0.0, 1.0)
            elif isinstance(out, torch.Tensor):
                with torch.no_grad():
                    exact = n.target(*args, **exact_kwargs)
                self.errors[n.meta[SITE_META]] = compare(out, exact)
            self.step.advance(f"site {n.meta[SITE_META]} {n.meta.get('attncc_module', '')}".rstrip())
        return out


def run_measuring(gm: fx.GraphModule, args: list) -> tuple[Any, dict[int, SiteError]]:
    """Run ``gm`` on positional placeholder values; returns its output and the error of each site it runs
    (keyed by the site's position in the graph's site list)."""
    recorder = _ErrorRecorder(gm)
    with progress.steps("measuring error", total=sum(SITE_META in n.meta for n in gm.graph.nodes)) as recorder.step:
        out = recorder.run(*args)
    return out, recorder.errors
