"""``attncc.compile``: capture a model, run the pass pipeline on every graph, return a drop-in module."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

from attncc import progress
from attncc.errors import AttnccError, AttnccWarning
from attncc.frontend import CallArgs, dynamo_capture, placeholder_values, run_captured, try_symbolic_trace
from attncc.measure import run_measuring
from attncc.module_names import ModuleNames
from attncc.passes import PassResult, run_pipeline
from attncc.policy import Policy, PolicyLike, as_policy
from attncc.report import RejectedReport, Report, SiteReport, plan_section
from attncc.site import RejectedSite
from attncc.uncaptured import (eager_attention_calls, graph_attention_calls, graph_break_reasons,
                               snapshot_graph_breaks, uncaptured_sites)

log = logging.getLogger("attncc")

FRONTENDS = ("auto", "fx", "dynamo")


@dataclass
class Capture:
    """The graphs one capture produced (one for fx; one per Dynamo graph break), after the pipeline."""

    frontend: str
    results: list[PassResult] = field(default_factory=list)
    uncaptured: list[RejectedSite] = field(default_factory=list)
    """Attention that ran outside these graphs (Dynamo graph breaks, skipped frames), by module."""
    graph_calls: list[int] = field(default_factory=list)
    """How often each graph ran during the capturing call (Dynamo can run one graph per layer)."""
    attention_calls: list[Counter] = field(default_factory=list)
    """Softmax/SDPA nodes per module of each graph as captured, before any rewrite."""


_structure_version = 0
"""Bumped whenever any module anywhere registers a submodule, parameter or buffer (PEFT injecting adapters, a
user swapping a layer): an fx-captured graph holds the modules it was traced with, so it is checked again."""


def _structure_changed(*_args) -> None:
    global _structure_version
    _structure_version += 1


nn.modules.module.register_module_module_registration_hook(_structure_changed)
nn.modules.module.register_module_parameter_registration_hook(_structure_changed)
nn.modules.module.register_module_buffer_registration_hook(_structure_changed)


class CompiledModule(nn.Module):
    """The model with its attention rewritten, standing in for it. ``cm(...)`` returns what ``model(...)`` returns.

    It shares the model's submodules, parameters and buffers (no copy): ``cm.state_dict()``,
    ``cm.named_parameters()`` and ``cm.named_modules()`` use the model's names, and attribute access falls through
    to the model (``cm.config``, ``cm.device``, ``cm.generate(...)``). A method of the model called through ``cm``
    (``cm.generate``, a sentence-transformers ``encode``) runs with the model's forward routed through attncc, so
    its own calls of ``self(...)`` run the rewritten graphs. ``cm.original_model`` is the model, unmodified.
    """

    def __init__(self, model: nn.Module, policy: Policy, example_inputs: Any = None, frontend: str = "auto",
                 backend: Union[str, Callable] = "eager", strict: bool = False, measure_error: bool = True):
        super().__init__()
        # share the model's registries: names, state_dict keys and module swaps (PEFT) are the model's own
        self.__dict__["_modules"] = model._modules
        self.__dict__["_parameters"] = model._parameters
        self.__dict__["_buffers"] = model._buffers
        self.__dict__["_non_persistent_buffers_set"] = model._non_persistent_buffers_set
        self.__dict__["_attncc_model"] = model
        self.training = model.training
        self.measure_error = measure_error
        self.policy = policy
        self.frontend = frontend
        self.backend = backend
        self.strict = strict
        self._names = ModuleNames(model)
        self._structure_seen = _structure_version
        self._fingerprint = _structure_fingerprint(model)
        self._fx_graphs: dict[tuple, PassResult] = {}
        self._fx_captures: dict[tuple, Capture] = {}
        self._fx_compiled: dict[fx.GraphModule, Callable] = {}
        self._dynamo: Optional[Callable] = None
        self._latest: Optional[Capture] = None
        self._pending: Optional[Capture] = None
        self.graph_runner: Optional[Callable[[PassResult, list], Any]] = None
        """When set, every rewritten graph runs as ``graph_runner(result, placeholder_values)`` instead of as
        compiled (``attncc.calibrate`` runs the graphs through its own interpreter this way); None: as compiled."""
        self.capture_count = 0
        """How many captures ran the pass pipeline: one per fx trace, one per Dynamo (re)compilation of the model
        (its graphs after graph breaks count once). generate() should take at most three: prefill, the first
        decode step, and the decode step after which Dynamo makes the cache length dynamic."""
        if example_inputs is not None:
            self.capture(example_inputs)

    # ---------------------------------------------------------------------------------- standing in for it
    @property
    def original_model(self) -> nn.Module:
        """The model attncc compiled, unmodified (calling it runs the original attention)."""
        return self.__dict__["_attncc_model"]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # the shared submodules, parameters and buffers
        except AttributeError:
            pass
        model = self.__dict__.get("_attncc_model")
        if model is None:
            raise AttributeError(name)
        value = getattr(model, name)
        if inspect.ismethod(value) and value.__self__ is model:
            return self._routed(value)
        return value

    def _routed(self, method: Callable) -> Callable:
        """``method`` of the model, run with the model's forward routed through the rewritten graphs."""

        @functools.wraps(method)
        def call(*args, **kwargs):
            with self._routing():
                return method(*args, **kwargs)

        return call

    @contextlib.contextmanager
    def _routing(self):
        model = self.original_model
        if model.__dict__.get("forward") is self._route:  # already routed (a routed method calling another)
            yield
            return
        saved = model.__dict__.get("forward", _MISSING)
        model.__dict__["forward"] = self._route
        try:
            yield
        finally:
            if saved is _MISSING:
                model.__dict__.pop("forward", None)
            else:
                model.__dict__["forward"] = saved

    def _route(self, *args, **kwargs):
        return self._run(CallArgs(args, kwargs))

    def state_dict(self, *args, **kwargs):
        return self.original_model.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.original_model.load_state_dict(*args, **kwargs)

    def train(self, mode: bool = True) -> "CompiledModule":
        self.original_model.train(mode)
        self.training = mode
        return self

    def _apply(self, fn, *args, **kwargs):
        # .to()/.half()/.cuda() may replace buffers (and parameters): fx graphs hold the tensors they were traced
        # with, so they are traced again at the next call
        self.original_model._apply(fn, *args, **kwargs)
        self._forget_fx_graphs()
        return self

    def forward(self, *args, **kwargs):
        model = self.original_model
        if (model._forward_hooks or model._forward_pre_hooks) and not torch.compiler.is_compiling():
            # the model's own __call__ runs its hooks, with its forward routed through the rewritten graphs
            with self._routing():
                return model(*args, **kwargs)
        return self._run(CallArgs(args, kwargs))

    # ------------------------------------------------------------------------------------------- capture
    def capture(self, example_inputs: Any) -> None:
        """Capture (and rewrite) now for these inputs instead of at the first call."""
        call = CallArgs.from_example(example_inputs)
        with torch.no_grad():
            self._run(call)

    def _fx_graph(self, call: CallArgs) -> Optional[PassResult]:
        if self.frontend == "dynamo":
            return None
        key = (self.original_model.training, call.signature_key())
        if key in self._fx_graphs:
            self._latest = self._fx_captures[key]
            return self._fx_graphs[key]
        if self._dynamo is not None and self.frontend == "auto":
            return None  # this model already needed Dynamo once; stay with it
        traced = try_symbolic_trace(self.original_model, call)
        if traced is None:
            if self.frontend == "fx":
                raise AttnccError("torch.fx.symbolic_trace cannot trace this model faithfully (tracing failed, or the "
                                  "traced graph's outputs or buffer updates differ from the model's); "
                                  "use frontend='dynamo'")
            return None
        self.capture_count += 1
        capture = Capture("fx", [self._run_pipeline(traced, 0)])
        _warn_if_no_attention(self, capture)
        self._latest = capture
        self._fx_graphs[key] = capture.results[0]
        self._fx_captures[key] = capture
        return capture.results[0]

    def _run_pipeline(self, gm: fx.GraphModule, index: int) -> PassResult:
        self._names.annotate(gm)
        try:
            result = run_pipeline(gm, self.policy, graph_index=index, verify=self.strict, modules=self._names)
        except Exception as error:  # a bug in attncc must not stop the user's model: run the graph as it was
            if self.strict:
                raise
            reason = f"attncc internal error, graph left unchanged: {type(error).__name__}: {error}"
            _warn(f"attncc: graph {index}: {reason}")
            return PassResult(gm, [], [RejectedSite("", reason)])
        if result.rejected:
            listed = "; ".join(f"{r.module or '<root>'}: {r.reason}" for r in result.rejected[:4])
            more = f" (and {len(result.rejected) - 4} more)" if len(result.rejected) > 4 else ""
            _warn(f"attncc: {len(result.rejected)} attention-like computation(s) left unchanged: {listed}{more}")
        _warn_decode_fallbacks(result)
        progress.advance(f"graph {index}: {len(result.sites)} attention site(s)")
        return result

    def _on_dynamo_graph(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        if self._pending is None:
            self._pending = Capture("dynamo")
            self.capture_count += 1
        capture = self._pending
        position = len(capture.results)
        self._names.annotate(gm)
        capture.attention_calls.append(graph_attention_calls(gm))
        capture.graph_calls.append(0)
        result = self._run_pipeline(gm, position)
        capture.results.append(result)
        rewritten = result.graph_module
        if self.backend == "eager":
            compiled = rewritten.forward
        else:
            from torch._dynamo import lookup_backend

            compiled = lookup_backend(self.backend)(rewritten, example_inputs)
        run = self._measuring_first_call(result, compiled)

        def counted(*args):
            capture.graph_calls[position] += 1
            return run(*args)

        return counted

    def _measuring_first_call(self, result: PassResult, compiled: Callable) -> Callable:
        """``compiled``, except that its first call runs the graph through the error-measuring interpreter, and
        that a ``graph_runner`` set on this module runs it instead while it is set."""
        measure = self.measure_error and result.sites and result.graph_module is not None

        def run(*args):
            if self.graph_runner is not None and result.graph_module is not None:
                return self.graph_runner(result, list(args))
            if measure and result.errors is None:
                result.errors = {}  # measure once, even if this call fails
                out, result.errors = run_measuring(result.graph_module, list(args))
                return out
            return compiled(*args)

        return run

    def _check_structure(self) -> None:
        """When a module somewhere registered a submodule, parameter or buffer: if it changed this model, name the
        modules again and drop the fx graphs (they hold the modules they were traced with; Dynamo's guards see
        such changes themselves)."""
        if self._structure_seen == _structure_version:
            return
        self._structure_seen = _structure_version
        fingerprint = _structure_fingerprint(self.original_model)
        if fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            self._names = ModuleNames(self.original_model)
            self._forget_fx_graphs()

    def _forget_fx_graphs(self) -> None:
        self._fx_graphs.clear()
        self._fx_captures.clear()
        self._fx_compiled.clear()

    def _run(self, call: CallArgs):
        if torch.compiler.is_compiling():  # torch.compile(cm) traces this: no progress (nor its stderr checks)
            return self._run_graphs(call)
        # a first capture shows its progress at once; a later call only if it captures again (a graph arrives)
        with progress.steps(f"capturing {type(self.original_model).__name__}", lazy=self._latest is not None):
            return self._run_graphs(call)

    def _run_graphs(self, call: CallArgs):
        self._check_structure()
        result = self._fx_graph(call)
        if result is not None:
            if self.graph_runner is not None:
                return self.graph_runner(result, placeholder_values(result.graph_module, call))
            if self.measure_error and result.errors is None and result.sites:
                result.errors = {}
                out, result.errors = run_measuring(result.graph_module, placeholder_values(result.graph_module, call))
                return out
            return self._compiled_fx(result.graph_module)(*call.args, **call.kwargs)
        if self._dynamo is None:
            self._dynamo = dynamo_capture(self.original_model, self._on_dynamo_graph)
        self._pending = None
        breaks_before = snapshot_graph_breaks()
        try:
            out = run_captured(self._dynamo, call.args, call.kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            raise AttnccError(f"attncc failed on a captured graph: {error.inner_exception}") from error
        capture, self._pending = self._pending, None
        if capture is not None and capture.results:
            if snapshot_graph_breaks() != breaks_before or len(capture.results) > 1:
                self._account_uncaptured(capture, call, graph_break_reasons(breaks_before))
            _warn_if_no_attention(self, capture)
            self._latest = capture
        elif self._latest is None:
            self._loud("Dynamo captured no graph of the model (is torch.compile disabled for it, or a "
                       "TorchDispatchMode active?): it ran with its attention unchanged")
        return out

    def _compiled_fx(self, gm: fx.GraphModule) -> Callable:
        """What runs an fx-captured graph: ``gm`` itself for backend ``"eager"``, else ``torch.compile(gm,
        backend=self.backend)`` (made once per graph), so ``backend`` means on the fx frontend what it means with
        Dynamo capture. The attncc op has a fake implementation, so the rewritten graph compiles whole."""
        if self.backend == "eager":
            return gm
        if gm not in self._fx_compiled:
            self._fx_compiled[gm] = torch.compile(gm, backend=self.backend)
        return self._fx_compiled[gm]


    def _account_uncaptured(self, capture: Capture, call: CallArgs, reason: str) -> None:
        """Report attention that ran eagerly next to the graphs of ``capture`` (see ``attncc.uncaptured``)."""
        in_graphs: Counter = Counter()
        for calls, counts in zip(capture.graph_calls, capture.attention_calls):
            for module, n in counts.items():
                in_graphs[module] += n * calls
        model = self.original_model
        routed = model.__dict__.get("forward") is self._route
        if routed:  # count the original model's own attention, not a second run of this one
            del model.__dict__["forward"]
        try:
            eager = eager_attention_calls(model, self._names, call.args, call.kwargs)
        except Exception as error:  # the check itself must not stop the user's model
            # (FlexAttention runs torch.compile inside, which refuses to run under the counting mode): say so,
            # without failing strict mode, since nothing was found to have run outside the graphs
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            capture.uncaptured = [RejectedSite("", f"could not check for attention outside the captured graphs "
                                                   f"({reason}): {type(error).__name__}: {first}")]
            _warn(f"attncc: {capture.uncaptured[0].reason}")
            return
        finally:
            if routed:
                model.__dict__["forward"] = self._route
        capture.uncaptured = uncaptured_sites(eager, in_graphs, reason)
        for missed in capture.uncaptured:
            self._loud(f"{missed.module or '<root>'}: {missed.reason}")

    def _loud(self, message: str) -> None:
        """Tell the user: raise with strict=True, else warn."""
        if self.strict:
            raise AttnccError(f"attncc: {message}")
        _warn(f"attncc: {message}")

    # -------------------------------------------------------------------------------------------- report
    @property
    def graph_modules(self) -> list[fx.GraphModule]:
        """The rewritten graphs of the latest capture."""
        return [r.graph_module for r in self._latest.results] if self._latest else []

    @property
    def pass_results(self) -> list[PassResult]:
        """What the pipeline made of each graph of the latest capture, in ``report()`` order: the rewritten graph
        and its sites, whose nodes point into the graph as the detector matched it, before the rewrite (what
        ``attncc.visual`` draws)."""
        return list(self._latest.results) if self._latest else []

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
                error = result.errors.get(position) if result.errors else None
                sites.append(SiteReport.from_site(site, len(sites), error))
            rejected.extend(RejectedReport.from_rejected(r) for r in result.rejected)
        rejected.extend(RejectedReport.from_rejected(r) for r in self._latest.uncaptured)
        return Report(sites, rejected, frontend=self._latest.frontend, graphs=len(self._latest.results),
                      policy=str(self.policy), plan=plan_section(self.policy))


_MISSING = object()


def _structure_fingerprint(model: nn.Module) -> int:
    """Identity of every submodule, parameter and buffer of ``model`` by name: changes when one is replaced."""
    return hash(tuple((name, id(obj)) for named in (model.named_modules(remove_duplicate=False),
                                                   model.named_parameters(remove_duplicate=False),
                                                   model.named_buffers(remove_duplicate=False))
                      for name, obj in named))


def _warn(message: str) -> None:
    warnings.warn(message, AttnccWarning, stacklevel=3)


def compile(model: nn.Module, policy: PolicyLike = "exact", example_inputs: Any = None, *, frontend: str = "auto",
            backend: Union[str, Callable] = "eager", strict: bool = False,
            measure_error: bool = True) -> CompiledModule:
    """Find every attention in ``model`` and rewrite it as ``policy`` says.

    Args:
        model: any ``nn.Module``; it is not modified.
        policy: a variant for every site that supports it (``"exact"``, ``"local(window=256, sinks=4)"``,
            ``"neighborhood(kernel=7)"``, ``"topk(density=0.125)"``, ``"linear(feature_map='elu', window=64)"``),
            ``"none"`` (detect and report only), a rules file (``"rules.yaml"``), an ``attncc.Policy`` of rules,
            or a calibration plan (``attncc.calibration.plan.Plan`` or its ``.json`` file): a plan made for another
            architecture is refused here, before capture (``Plan.check_model``); or ``attncc.auto(max_error=...)``,
            calibrated on ``example_inputs`` (``attncc.calibrate`` calibrates on many batches).
        example_inputs: a tuple of positional arguments or a dict of keyword arguments; when None the model is
            captured at its first call.
        frontend: ``"auto"`` (fx.symbolic_trace, else Dynamo), ``"fx"`` or ``"dynamo"``.
        backend: what runs the rewritten graphs (either frontend): ``"eager"`` or any ``torch.compile`` backend
            (``"inductor"``, ``"aot_eager"`` ..., or a callable), so attncc composes with torch.compile. An
            unknown name raises AttnccError here.
        strict: raise instead of warning when a graph is left unchanged (an internal error), when attention ran
            outside the captured graphs, or when nothing could be captured.
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
    _refuse_hf_attncc_model(model)
    from attncc.runtime.dispatch import selected_backend

    selected_backend()  # a bad ATTNCC_BACKEND is one error now, not one per op call after capture
    from attncc.calibration.auto import AutoPolicy

    if isinstance(policy, AutoPolicy):
        policy = _calibrated_on_examples(model, policy, example_inputs)
    chosen = as_policy(policy)
    from attncc.calibration.plan import check_plan_model

    check_plan_model(chosen, model)  # a plan for another model: one error before anything is captured
    compiled = CompiledModule(model, chosen, example_inputs, frontend=frontend, backend=backend,
                              strict=strict, measure_error=measure_error)
    return compiled


def _calibrated_on_examples(model: nn.Module, policy, example_inputs: Any):
    """The Plan of ``attncc.auto(...)`` calibrated on ``example_inputs`` alone (with a warning that one batch
    measures little: ``attncc.calibrate`` takes many)."""
    if example_inputs is None:
        raise AttnccError("attncc.compile(model, attncc.auto(...)) needs example_inputs to calibrate on; better: "
                          "plan = attncc.calibrate(model, attncc.auto(...), data=[batch, ...]), then "
                          "attncc.compile(model, plan)")
    from attncc.calibration.auto import calibrate

    _warn("attncc: calibrating attncc.auto on the example inputs only: the plan's error is measured on that one "
          "batch; attncc.calibrate(model, policy, data=[...], held_out=[...]) measures it on many")
    return calibrate(model, policy, [example_inputs])


def _refuse_hf_attncc_model(model: nn.Module) -> None:
    """A transformers model loaded with ``attn_implementation="attncc"`` already runs attncc's op through the
    registered policy: capturing it again would find no attention to rewrite and only say "no attention found"."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == "attncc":
            raise AttnccError("this model was loaded with attn_implementation='attncc': its attention already runs "
                              "attncc's op under the policy given to attncc.hf.register(); use that path or "
                              "attncc.compile() on a model loaded with 'sdpa'/'eager', not both")


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


def _warn_decode_fallbacks(result: PassResult) -> None:
    """Warn when the policy's variant does not apply to a self-attention site with fewer queries than keys (a
    decode step against a KV cache), so that generating under such a policy is not mistaken for running it."""
    decode = [site for site in result.sites
              if site.kind == "self" and site.q_len != site.kv_len and site.declined]
    if decode:
        _warn(f"attncc: {len(decode)} decode site(s) (fewer queries than keys) run exact: {decode[0].reason}")


def _warn_if_no_attention(compiled: CompiledModule, capture: Capture) -> None:
    """Warn (once per compiled model) when a capture found no attention at all, so a model attncc cannot help is
    not mistaken for one it rewrote."""
    if compiled._latest is not None or any(result.sites for result in capture.results):
        return  # (a recapture: said at the first one already, or there was attention then)
    near = sum(len(result.rejected) for result in capture.results)
    _warn(f"attncc: no attention found in {type(compiled.original_model).__name__}: nothing was rewritten"
          + (f" ({near} near-miss(es) in report().rejected)" if near else ""))
