"""``attncc.compile``: capture a model, run the pass pipeline on every graph, return a drop-in module."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

from attncc.errors import AttnccError
from attncc.frontend import CallArgs, dynamo_capture, placeholder_values, try_symbolic_trace
from attncc.measure import run_measuring
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
                 backend: Union[str, Callable] = "eager", strict: bool = False, measure_error: bool = True):
        super().__init__()
        self.measure_error = measure_error
        self.model = model
        self.policy = policy
        self.frontend = frontend
        self.backend = backend
        self.strict = strict
        self._fx_graphs: dict[tuple, PassResult] = {}
        self._fx_captures: dict[tuple, Capture] = {}
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

    def _fx_graph(self, call: CallArgs) -> Optional[PassResult]:
        if self.frontend == "dynamo":
            return None
        key = (self.model.training, call.signature_key())
        if key in self._fx_graphs:
            self._latest = self._fx_captures[key]
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
        self._fx_graphs[key] = capture.results[0]
        self._fx_captures[key] = capture
        return capture.results[0]

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
            compiled = rewritten.forward
        else:
            from torch._dynamo import lookup_backend

            compiled = lookup_backend(self.backend)(rewritten, example_inputs)
        return self._measuring_first_call(result, compiled)

    def _measuring_first_call(self, result: PassResult, compiled: Callable) -> Callable:
        """``compiled``, except that its first call runs the graph through the error-measuring interpreter."""
        if not self.measure_error or not result.sites or result.graph_module is None:
            return compiled

        def run(*args):
            if result.errors is None:
                result.errors = {}  # measure once, even if this call fails
                out, result.errors = run_measuring(result.graph_module, list(args))
                return out
            return compiled(*args)

        return run

    def _run(self, call: CallArgs):
        result = self._fx_graph(call)
        if result is not None:
            if self.measure_error and result.errors is None and result.sites:
                result.errors = {}
                out, result.errors = run_measuring(result.graph_module, placeholder_values(result.graph_module, call))
                return out
            return self._compiled_fx(result.graph_module)(*call.args, **call.kwargs)
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

    def _compiled_fx(self, gm: fx.GraphModule) -> Callable:
        """What runs an fx-captured graph: ``gm`` itself for backend ``"eager"``, else ``torch.compile(gm,
        backend=self.backend)`` (made once per graph), so ``backend`` means on the fx frontend what it means with
        Dynamo capture. The attncc op has a fake implementation, so the rewritten graph compiles whole."""
        if self.backend == "eager":
            return gm
        compiled = getattr(self, "_fx_compiled", None)
        if compiled is None:
            compiled = self._fx_compiled = {}
        if gm not in compiled:
            compiled[gm] = torch.compile(gm, backend=self.backend)
        return compiled[gm]

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
            for position, site in enumerate(result.sites):
                site.index = len(sites)
                error = result.errors.get(position) if result.errors else None
                sites.append(SiteReport.from_site(site, error))
            rejected.extend(RejectedReport.from_rejected(r) for r in result.rejected)
        return Report(sites, rejected, frontend=self._latest.frontend, graphs=len(self._latest.results),
                      policy=str(self.policy))


def compile(model: nn.Module, policy: PolicyLike = "exact", example_inputs: Any = None, *, frontend: str = "auto",
            backend: Union[str, Callable] = "eager", strict: bool = False,
            measure_error: bool = True) -> CompiledModule:
    """Find every attention in ``model`` and rewrite it as ``policy`` says.

    Args:
        model: any ``nn.Module``; it is not modified.
        policy: a variant for every site that supports it (``"exact"``, ``"local(window=256, sinks=4)"``,
            ``"neighborhood(kernel=7)"``, ``"topk(density=0.125)"``, ``"linear(feature_map='elu', window=64)"``),
            ``"none"`` (detect and report only), a rules file (``"rules.yaml"``), or an ``attncc.Policy`` of rules.
        example_inputs: a tuple of positional arguments or a dict of keyword arguments; when None the model is
            captured at its first call.
        frontend: ``"auto"`` (fx.symbolic_trace, else Dynamo), ``"fx"`` or ``"dynamo"``.
        backend: what runs the rewritten graphs (either frontend): ``"eager"`` or any ``torch.compile`` backend
            (``"inductor"``, ``"aot_eager"`` ..., or a callable), so attncc composes with torch.compile. An
            unknown name raises AttnccError here.
        strict: raise on internal errors instead of running an affected graph unchanged (tests use this).
        measure_error: at the first call of each captured graph (the example inputs, when given), also run
            exact attention at every approximate site and report the error (relative L2, cosine).

    Example::

        cm = attncc.compile(model, "exact", example_inputs={"input_ids": ids})
        logits = cm(input_ids=ids)
        print(cm.report())
    """
    if not isinstance(model, nn.Module):
        raise AttnccError(f"attncc.compile expects a torch.nn.Module, got {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise AttnccError(f"unknown frontend {frontend!r}: valid frontends are {', '.join(FRONTENDS)}")
    check_backend(backend)
    from attncc.runtime.dispatch import selected_backend

    selected_backend()  # a bad ATTNCC_BACKEND is one error now, not one per op call after capture
    compiled = CompiledModule(model, as_policy(policy), example_inputs, frontend=frontend, backend=backend,
                              strict=strict, measure_error=measure_error)
    if example_inputs is not None:
        _warn_if_no_attention(compiled)
    return compiled


DEFAULT_BACKENDS = ("eager", "aot_eager", "inductor")
"""torch.compile backends that ``torch._dynamo.list_backends()`` leaves out by default (debug tags) or that a
user names most often; the error for an unknown backend lists them first."""


def check_backend(backend: Union[str, Callable]) -> None:
    """Raise AttnccError unless ``backend`` is a callable or the name of a registered ``torch.compile`` backend."""
    if callable(backend):
        return
    from torch._dynamo import list_backends

    if isinstance(backend, str) and backend in set(list_backends(exclude_tags=())) | set(DEFAULT_BACKENDS):
        return
    shown = list(DEFAULT_BACKENDS) + [b for b in list_backends() if b not in DEFAULT_BACKENDS]
    raise AttnccError(f"unknown backend {backend!r}: valid backends are {', '.join(shown)} (every name: "
                      f"torch._dynamo.list_backends(exclude_tags=())), or a callable torch.compile backend")


def _warn_if_no_attention(compiled: CompiledModule) -> None:
    """Warn (the ``attncc`` logger, as for graphs left unchanged) when a capture found no attention at all, so a
    model attncc cannot help is not mistaken for one it rewrote."""
    capture = compiled._latest
    if capture is None or any(result.sites for result in capture.results):
        return
    near = sum(len(result.rejected) for result in capture.results)
    log.warning("attncc: no attention found in %s: nothing was rewritten%s", type(compiled.model).__name__,
                f" ({near} near-miss(es) in report().rejected)" if near else "")
