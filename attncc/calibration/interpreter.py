"""Running a compiled model's graphs with a hook at every attention site.

Calibration needs to see each site's q, k, v and masks on real inputs, run other variants on them, and (to
measure a plan end to end) put a different output in the site's place. ``CompiledModule.graph_runner`` lets a
caller run every rewritten graph (fx or Dynamo) through its own interpreter; ``hooked(cm, hook)`` sets it to
``SiteInterpreter`` for the ``with`` block. The model is compiled with the ``exact`` policy, so the op at each
site computes the original attention, and ``SiteVisit.run(text)`` runs any other variant on the same inputs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx
from torch import Tensor

from attncc.calibration.projection import Projection, find_projection
from attncc.measure import SITE_META
from attncc.passes import PassResult
from attncc.runtime.call import AttentionCall
from attncc.site import AttentionSite


@dataclass
class SiteVisit:
    """One run of one site: its inputs, its exact output, and ways to run other variants on the same inputs."""

    site: AttentionSite
    node: fx.Node
    args: tuple
    kwargs: dict
    exact: Tensor
    """The op's output under the exact policy, ``[B, Hq, Nq, Dv]`` (or the site's own rank)."""
    interpreter: "SiteInterpreter"

    @property
    def module(self) -> str:
        return self.site.module

    def run(self, variant: str) -> Tensor:
        """The site's output with ``variant`` (a canonical variant text) on the same q, k, v and masks."""
        kwargs = dict(self.kwargs, variant=variant, fallback="exact", min_len=0)
        with torch.no_grad():
            return self.node.target(*self.args, **kwargs)

    def call(self) -> AttentionCall:
        """The op call as a record (q, k, v, mask, scale, ...)."""
        return AttentionCall(*self.args, **self.kwargs)

    def query_rows(self) -> Optional[Tensor]:
        """float ``[B, Nq]``: 1 at real query rows (self-attention with a key-padding mask ``[B, 1, 1, N]``),
        None when every row counts."""
        call = self.call()
        mask = call.mask
        if mask is None or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
            return None
        if call.q.shape[-2] != call.k.shape[-2] or mask.shape[0] != call.q.shape[0]:
            return None
        return mask[:, 0, 0, :].float()

    def projection(self) -> Optional[Projection]:
        """The output projection this site feeds (cached per graph node), None where none is proved."""
        cache = self.interpreter.projections
        if self.node not in cache:
            cache[self.node] = find_projection(self.node, self.exact, self.interpreter.fetch,
                                               self.interpreter.module)
        return cache[self.node]


SiteHook = Callable[[SiteVisit], Optional[Tensor]]
"""Called at every site with its visit; returns the output to use instead of the exact one, or None."""


class SiteInterpreter(fx.Interpreter):
    """An ``fx.Interpreter`` over one rewritten graph that calls ``hook`` at every attncc op of a site."""

    def __init__(self, result: PassResult, hook: SiteHook, projections: Optional[dict] = None):
        super().__init__(result.graph_module)
        self.result = result
        self.hook = hook
        self.projections = {} if projections is None else projections

    def fetch(self, node: fx.Node) -> Any:
        return self.env[node]

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_function" and SITE_META in n.meta and isinstance(out, Tensor):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            site = self.result.sites[n.meta[SITE_META]]
            replaced = self.hook(SiteVisit(site, n, tuple(args), dict(kwargs), out, self))
            if replaced is not None:
                return replaced
        return out


@dataclass
class HookedRunner:
    """What ``CompiledModule.graph_runner`` calls: each graph through a ``SiteInterpreter`` with ``hook``."""

    hook: SiteHook
    projections: dict = field(default_factory=dict)

    def __call__(self, result: PassResult, args: list) -> Any:
        with torch.no_grad():
            return SiteInterpreter(result, self.hook, self.projections).run(*args)


@contextlib.contextmanager
def hooked(compiled, hook: SiteHook, projections: Optional[dict] = None) -> Iterator[None]:
    """Run ``compiled`` (a CompiledModule) with ``hook`` at every site for the ``with`` block."""
    previous = compiled.graph_runner
    compiled.graph_runner = HookedRunner(hook, {} if projections is None else projections)
    try:
        yield
    finally:
        compiled.graph_runner = previous
