"""``attncc.compile``: capture a model, run the pass pipeline on every graph, return a drop-in module."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

from attncc.errors import AttnccError
from attncc.frontend import CallArgs, dynamo_capture, try_symbolic_trace
from attncc.passes import PassResult, run_pipeline
from attncc.policy import Policy, PolicyLike, as_policy
from attncc.report import RejectedReport, Report, SiteReport

log = logging.getLogger("attncc")

FRONTENDS = ("auto", "fx", "dynamo")


@dataclass
class Capture:
    """The graphs one capture produced (one for fx; one per Dynamo graph break), after the pipeline."""

    frontend: str
    results: list[PassResult] = field(default_factory=list)


class CompiledModule(nn.Module):
    """The model with its attention rewritten. ``cm(...)`` returns what ``model(...)`` returns.

    It shares the model's parameters (no copy); ``cm.model`` is the original module, untouched.
    """

    def __init__(self, model: nn.Module, policy: Policy, example_inputs: Any = None, frontend: str = "auto",
                 backend: Union[str, Callable] = "eager", strict: bool = False):
        super().__init__()
        self.model = model
        self.policy = policy
        self.frontend = frontend
        self.backend = backend
        self.strict = strict
        self._fx_graphs: dict[tuple, fx.GraphModule] = {}
        self._dynamo: Optional[Callable] = None
        self._latest: Optional[Capture] = None
        self._pending: Optional[Capture] = None
        if example_inputs is not None:
            self.capture(example_inputs)

    # ------------------------------------------------------------------------------------------- capture
    def capture(self, example_inputs: Any) -> None:
        """Capture (and rewrite) now for these inputs instead of at the first call."""
        call = CallArgs.from_example(example_inputs)
        with torch.no_grad():
            self._run(call)

    def _fx_graph(self, call: CallArgs) -> Optional[fx.GraphModule]:
        if self.frontend == "dynamo":
            return None
        key = (self.model.training, call.signature_key())
        if key in self._fx_graphs:
            return self._fx_graphs[key]
        if self._dynamo is not None and self.frontend == "auto":
            return None  # this model already needed Dynamo once; stay with it
        traced = try_symbolic_trace(self.model, call)
        if traced is None:
            if self.frontend == "fx":
                raise AttnccError("torch.fx.symbolic_trace cannot trace this model; use frontend='dynamo'")
            return None
        capture = Capture("fx", [self._run_pipeline(traced, 0)])
        self._latest = capture
        gm = capture.results[0].graph_module
        self._fx_graphs[key] = gm
        return gm

    def _run_pipeline(self, gm: fx.GraphModule, index: int) -> PassResult:
        try:
            return run_pipeline(gm, self.policy, graph_index=index, verify=self.strict)
        except Exception as error:  # a bug in attncc must not stop the user's model: run the graph as it was
            if self.strict:
                raise
            log.warning("attncc: graph %d left unchanged: %s: %s", index, type(error).__name__, error)
            from attncc.site import RejectedSite

            return PassResult(gm, [], [RejectedSite("", f"attncc internal error: {type(error).__name__}: {error}")])

    def _on_dynamo_graph(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        if self._pending is None:
            self._pending = Capture("dynamo")
        result = self._run_pipeline(gm, len(self._pending.results))
        self._pending.results.append(result)
        rewritten = result.graph_module
        if self.backend == "eager":
            return rewritten.forward
        from torch._dynamo import lookup_backend

        return lookup_backend(self.backend)(rewritten, example_inputs)

    def _run(self, call: CallArgs):
        gm = self._fx_graph(call)
        if gm is not None:
            return gm(*call.args, **call.kwargs)
        if self._dynamo is None:
            self._dynamo = dynamo_capture(self.model, self._on_dynamo_graph)
        self._pending = None
        try:
            out = self._dynamo(*call.args, **call.kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            raise AttnccError(f"attncc failed on a captured graph: {error.inner_exception}") from error
        if self._pending is not None and self._pending.results:
            self._latest = self._pending
        self._pending = None
        return out

    def forward(self, *args, **kwargs):
        return self._run(CallArgs(args, kwargs))

    # -------------------------------------------------------------------------------------------- report
    @property
    def graph_modules(self) -> list[fx.GraphModule]:
        """The rewritten graphs of the latest capture."""
        return [r.graph_module for r in self._latest.results] if self._latest else []

    def code(self) -> str:
        """Python code of the rewritten graphs of the latest capture."""
        parts = []
        for i, gm in enumerate(self.graph_modules):
            parts.append(f"# graph {i}\n{gm.code.strip()}\n")
        return "\n".join(parts)

    def report(self) -> Report:
        """Sites found (with the variant each got) and near-misses, for the latest capture."""
        if self._latest is None:
            return Report(policy=str(self.policy), captured=False)
        sites, rejected = [], []
        for result in self._latest.results:
            for site in result.sites:
                site.index = len(sites)
                sites.append(SiteReport.from_site(site))
            rejected.extend(RejectedReport.from_rejected(r) for r in result.rejected)
        return Report(sites, rejected, frontend=self._latest.frontend, graphs=len(self._latest.results),
                      policy=str(self.policy))


def compile(model: nn.Module, policy: PolicyLike = "exact", example_inputs: Any = None, *, frontend: str = "auto",
            backend: Union[str, Callable] = "eager", strict: bool = False) -> CompiledModule:
    """Find every attention in ``model`` and rewrite it as ``policy`` says.

    Args:
        model: any ``nn.Module``; it is not modified.
        policy: ``"exact"`` (every site becomes the exact fused attncc op), ``"none"`` (detect and report
            only), or an ``attncc.Policy``.
        example_inputs: a tuple of positional arguments or a dict of keyword arguments; when None the model is
            captured at its first call.
        frontend: ``"auto"`` (fx.symbolic_trace, else Dynamo), ``"fx"`` or ``"dynamo"``.
        backend: with Dynamo capture, what runs the rewritten graphs: ``"eager"`` or any ``torch.compile``
            backend (``"inductor"``, ``"aot_eager"`` ...), so attncc composes with torch.compile.
        strict: raise on internal errors instead of running an affected graph unchanged (tests use this).

    Example::

        cm = attncc.compile(model, "exact", example_inputs={"input_ids": ids})
        logits = cm(input_ids=ids)
        print(cm.report())
    """
    if not isinstance(model, nn.Module):
        raise AttnccError(f"attncc.compile expects a torch.nn.Module, got {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise AttnccError(f"unknown frontend {frontend!r}: valid frontends are {', '.join(FRONTENDS)}")
    return CompiledModule(model, as_policy(policy), example_inputs, frontend=frontend, backend=backend,
                          strict=strict)
