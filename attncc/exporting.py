"""``attncc.export`` and ``attncc.load`` (this module is ``exporting`` so that the function ``attncc.export`` does not
shadow it): a ``.pt2`` whose attention runs as attncc ops, loadable anywhere attncc is.

How an export is made (one function per step below):

1. ``torch.export.export`` captures the model (non-strict, so transformers 5.x models export; a Hugging Face
   model's ``use_cache`` is fixed to False, not an input of the program: a cache object is not an exportable
   output), with the sequence axis dynamic where asked (``dynamic="seq"``);
2. its unlifted module (``ep.module()``) is spelled at the torch level (``attncc.passes.lower_aten``) and runs the
   same pass pipeline as ``attncc.compile`` (canonicalize -> detect -> masks -> plan -> rewrite), on symbolic
   lengths: a mask structure is only taken out where the graph proves it for every length;
3. nothing may be lost on the way (``check_nothing_lost``): the attention an eager run executes must be in the
   exported graph, every site ``attncc.compile`` rewrites for the same policy must be rewritten here with the
   same variant, and every rewritten site must be an attncc op in the final program; otherwise AttnccError;
4. the rewritten module is exported again, so the ``torch.ops.attncc.attention`` calls (a custom op with a fake
   implementation) are part of the returned ``ExportedProgram``; ``torch.export.save(ep, "model.pt2")`` stores it.

``attncc.load(path)`` imports the op (importing attncc registers it) and returns the program's module.
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from collections import Counter
from typing import Any, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

from attncc import progress
from attncc.errors import AttnccError, AttnccWarning
from attncc.frontend import CallArgs
from attncc.module_names import ModuleNames
from attncc.passes import PassResult, run_pipeline
from attncc.passes.lower_aten import lower_aten
from attncc.policy import Policy, PolicyLike, as_policy
from attncc.report import RejectedReport, Report, SiteReport, plan_section
from attncc.runtime.ops import attention_op

REPORT_ATTRIBUTE = "attncc_report"
"""The attribute of the returned ExportedProgram that holds the export's ``attncc.report.Report``."""

DYNAMIC_CHOICES = ("seq", None)


def export(model: nn.Module, policy: PolicyLike = "exact", example_inputs: Any = None, *,
           dynamic: Union[str, dict, tuple, None] = None, measure_error: bool = True,
           check_compile: bool = True) -> torch.export.ExportedProgram:
    """Export ``model`` with its attention rewritten as ``policy`` says.

    Args:
        model: any ``nn.Module`` ``torch.export`` can capture (non-strict); it is not modified.
        policy: as for ``attncc.compile`` (``"exact"``, ``"local(window=256)"``, a rules file, a ``Policy``);
            ``"none"`` is refused (it rewrites nothing).
        example_inputs: a tuple of positional arguments or a dict of keyword arguments (required), e.g.
            ``{"input_ids": ids}`` with ids ``[B, N]``.
        dynamic: ``"seq"``: the sequence axis (dim 1) of every ``[B, N]`` integer/bool input (``input_ids``,
            ``attention_mask`` ...) and of every ``[B, N, D]`` float input is dynamic, so one program serves any
            length the model allows (the batch size stays the example's); ``None``: every shape as in
            ``example_inputs``; or a ``dynamic_shapes`` value as ``torch.export.export`` takes it.
        measure_error: run the rewritten graph once on the example inputs and report each approximate site's
            error against exact attention (``rel_l2``, ``cosine``), as ``attncc.compile`` does.
        check_compile: also compile the model with ``attncc.compile`` on the same inputs and fail if the export
            rewrites fewer sites, or any with another variant.

    Returns:
        The ``torch.export.ExportedProgram``; its attribute ``attncc_report`` (``REPORT_ATTRIBUTE``) is the
        ``attncc.report.Report`` of the export (every site, what was left alone and why).

    Raises:
        AttnccError: the model cannot be exported, or the export would lose the rewrite (attention the exported
        graph does not hold, a site ``attncc.compile`` rewrites that the export does not, an op the final
        program lost).

    Example::

        ep = attncc.export(model, "exact", {"input_ids": ids}, dynamic="seq")
        print(ep.attncc_report)
        torch.export.save(ep, "model.pt2")
        loaded = attncc.load("model.pt2")        # in any process that can import attncc
        out = loaded(input_ids=other_ids)        # another sequence length: same program
    """
    if not isinstance(model, nn.Module):
        raise AttnccError(f"attncc.export expects a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        raise AttnccError("attncc.export needs example_inputs (a tuple of positional or a dict of keyword "
                          "arguments): torch.export captures the model by running it")
    chosen = as_policy(policy)
    from attncc.calibration.plan import check_plan_model

    check_plan_model(chosen, model)  # a plan made for another model: one error before anything is traced
    if not chosen.rewrites:
        raise AttnccError("policy 'none' rewrites nothing: export the model with torch.export directly")
    call, fixed = _with_fixed_keywords(model, CallArgs.from_example(example_inputs))
    shapes = dynamic_shapes_for(call, dynamic)
    if isinstance(shapes, dict):  # the user's dynamic_shapes by name: the fixed keywords are static
        shapes = {**{name: None for name in fixed}, **shapes}
    with progress.steps(f"exporting {type(model).__name__}", total=4) as step:
        first = _torch_export(model, call, shapes, "the model")
        step.advance("captured with torch.export")
        names = ModuleNames(model)
        unlifted = first.module()
        lowered = lower_aten(unlifted)
        names.annotate(lowered)
        result = run_pipeline(lowered, chosen, modules=names)
        report = _report(result, chosen, call, unlifted if measure_error else None)
        _warn_left_alone(report)
        step.advance(f"{len(result.sites)} attention site(s) rewritten")
        check_nothing_hidden(model, names, call, unlifted)
        if check_compile:
            check_same_as_compile(model, chosen, call, report)
        step.advance("checked against attncc.compile")
        inputs = CallArgs(call.args, {k: v for k, v in call.kwargs.items() if k not in fixed})
        program = _torch_export(_with_signature(result.graph_module, unlifted, fixed), inputs,
                                _without_keys(shapes, fixed), "the rewritten model")
        check_ops_kept(result, program)
        step.advance("exported with the attncc ops")
    setattr(program, REPORT_ATTRIBUTE, report)
    return program


def load(path: Union[str, os.PathLike]) -> nn.Module:
    """The module of a ``.pt2`` written by ``attncc export`` / ``torch.export.save(attncc.export(...))``.

    Importing attncc registers ``torch.ops.attncc.attention``, so the program's attncc ops load and run in a
    fresh process. Returns a callable ``nn.Module`` taking the model's arguments (``loaded(input_ids=ids)``);
    outputs that were dict subclasses (a transformers ``ModelOutput``) come back as plain dicts with the same keys
    (``loaded(input_ids=ids)["last_hidden_state"]``), so loading needs neither transformers nor the model's code.
    """
    if not os.path.isfile(path):
        raise AttnccError(f"no such file: {os.fspath(path)}")
    try:
        program = torch.export.load(path)
    except Exception as error:
        raise AttnccError(f"cannot load {os.fspath(path)} as a torch.export program: {type(error).__name__}: "
                          f"{_first_line(error)}") from error
    return program.module()


# ------------------------------------------------------------------------------------------- capture
FIXED_KEYWORDS = {"use_cache": False}
"""Keyword arguments the exported program fixes when the model's forward takes them: a transformers cache object
in the output is not something torch.export can return. The program does not take them as inputs (a call of the
loaded module passes the model's tensors only)."""


def _with_fixed_keywords(model: nn.Module, call: CallArgs) -> tuple[CallArgs, tuple]:
    """(the call with ``FIXED_KEYWORDS`` set where the model takes them, the names fixed). A given value other than
    the fixed one is an AttnccError."""
    try:
        parameters = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return call, ()
    fixed = {name: value for name, value in FIXED_KEYWORDS.items()
             if name in parameters and len(call.args) <= parameters.index(name)}
    for name, value in fixed.items():
        if call.kwargs.get(name, value) != value:
            raise AttnccError(f"attncc.export runs the model with {name}={value!r} (got {call.kwargs[name]!r}): "
                              f"a cache object is not an exportable output")
    return CallArgs(call.args, dict(call.kwargs, **fixed)), tuple(fixed)


def dynamic_shapes_for(call: CallArgs, dynamic: Union[str, dict, tuple, None]) -> Optional[Any]:
    """torch.export's ``dynamic_shapes`` for ``dynamic`` (see ``export``): for ``"seq"``, one shared dimension
    on axis 1 of every ``[B, N]`` integer/bool tensor and every ``[B, N, D]`` float tensor of the call."""
    if dynamic is None or not isinstance(dynamic, str):
        return dynamic
    if dynamic != "seq":
        raise AttnccError(f"unknown dynamic={dynamic!r}: use 'seq', None, or torch.export dynamic_shapes")
    seq = torch.export.Dim.DYNAMIC

    def axes(x):
        if not isinstance(x, torch.Tensor):
            return None
        text = x.dim() == 2 and (x.dtype == torch.bool or not x.is_floating_point())
        return {1: seq} if text or (x.dim() == 3 and x.is_floating_point()) else None

    args = tuple(axes(a) for a in call.args)
    kwargs = {k: axes(v) for k, v in call.kwargs.items()}
    if all(a is None for a in args) and all(v is None for v in kwargs.values()):
        raise AttnccError("dynamic='seq' needs a [batch, seq] token input or a [batch, seq, dim] float input; "
                          "this model's inputs have none (use dynamic=None)")
    return (*args, kwargs) if kwargs else args


def _torch_export(module: nn.Module, call: CallArgs, shapes: Any, what: str) -> torch.export.ExportedProgram:
    if isinstance(shapes, tuple) and call.kwargs:  # (*per positional, per keyword) -> the form export takes
        shapes = {**{name: s for name, s in zip(_positional_names(module), shapes[:-1])}, **shapes[-1]}
    try:
        with torch.no_grad():
            return torch.export.export(module, call.args, call.kwargs, dynamic_shapes=shapes, strict=False)
    except AttnccError:
        raise
    except Exception as error:
        raise AttnccError(f"torch.export cannot capture {what}: {type(error).__name__}: "
                          f"{_first_line(error)}") from error


def _without_keys(shapes: Any, keys: tuple) -> Any:
    """``dynamic_shapes`` without the entries of keyword inputs ``keys``."""
    if isinstance(shapes, dict):
        return {k: v for k, v in shapes.items() if k not in keys}
    if isinstance(shapes, tuple) and shapes and isinstance(shapes[-1], dict):
        kept = {k: v for k, v in shapes[-1].items() if k not in keys}
        return (*shapes[:-1], kept) if kept else shapes[:-1]
    return shapes


def _positional_names(module: nn.Module) -> list[str]:
    return list(inspect.signature(module.forward).parameters)


def _with_signature(rewritten: fx.GraphModule, exported: fx.GraphModule, fixed: tuple = ()) -> fx.GraphModule:
    """``rewritten`` (the pipeline's graph, flat placeholders) taking and returning what the model does, as the
    exported module ``exported`` does (its pytree calling convention), without export's input-guard call and
    without the keyword inputs ``fixed`` (``use_cache``, set by attncc: a constant the graph does not read)."""
    from torch.utils._pytree import TreeSpec

    graph = rewritten.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)  # it checks the example shapes; the second export records its own
    codegen = copy.deepcopy(exported.graph._codegen)
    in_spec = codegen.pytree_info.in_spec
    args_spec, kwargs_spec = in_spec.children_specs
    keys = list(kwargs_spec.context)
    placeholders = {node.target: node for node in graph.nodes if node.op == "placeholder"}
    dropped = [key for key in fixed if key in keys and not placeholders[key].users]
    for key in dropped:
        graph.erase_node(placeholders[key])
    kept = [i for i, key in enumerate(keys) if key not in dropped]
    kwargs_spec = TreeSpec(dict, [keys[i] for i in kept], [kwargs_spec.children_specs[i] for i in kept])
    codegen.pytree_info = codegen.pytree_info._replace(
        orig_args=[name for name in codegen.pytree_info.orig_args if name not in dropped],
        in_spec=TreeSpec(in_spec.type, in_spec.context, [args_spec, kwargs_spec]),
        out_spec=plain_containers(codegen.pytree_info.out_spec))
    graph._codegen = codegen
    rewritten.recompile()
    return rewritten


PLAIN_CONTAINERS = (tuple, list, dict)


def plain_containers(spec):
    """The pytree spec ``spec`` with every dict subclass (a transformers ``ModelOutput``) as a plain dict of the
    same keys: a ``.pt2`` names its output types, and a fresh process that loads it (without importing
    transformers) knows only the plain ones. The loaded module returns ``{"last_hidden_state": ...}``."""
    from torch.utils._pytree import TreeSpec

    if spec.is_leaf():
        return spec
    children = [plain_containers(child) for child in spec.children_specs]
    kind = spec.type
    if kind not in PLAIN_CONTAINERS and isinstance(kind, type) and issubclass(kind, dict):
        return TreeSpec(dict, list(spec.context), children)
    return TreeSpec(kind, spec.context, children)


# ----------------------------------------------------------------------------------------- the report
def _report(result: PassResult, policy: Policy, call: CallArgs, measure_on: Optional[fx.GraphModule]) -> Report:
    errors = {}
    if measure_on is not None and result.sites:
        from attncc.measure import run_measuring

        with torch.no_grad():
            _, errors = run_measuring(result.graph_module, _flat_inputs(measure_on, call))
    sites = [SiteReport.from_site(site, position, errors.get(position)) for position, site in enumerate(result.sites)]
    rejected = [RejectedReport.from_rejected(r) for r in result.rejected]
    return Report(sites, rejected, frontend="export", graphs=1, policy=str(policy), plan=plan_section(policy))


def _flat_inputs(gm: fx.GraphModule, call: CallArgs) -> list:
    """The values of ``gm``'s placeholders (an exported module's flattened inputs) for ``call``."""
    from torch.fx._pytree import tree_flatten_spec

    return list(tree_flatten_spec((call.args, call.kwargs), gm._in_spec))


def _warn_left_alone(report: Report) -> None:
    """What stays as the model wrote it is said, as ``attncc.compile`` says it."""
    if report.rejected:
        listed = "; ".join(f"{r.module or '<root>'}: {r.reason}" for r in report.rejected[:4])
        more = f" (and {len(report.rejected) - 4} more)" if len(report.rejected) > 4 else ""
        warnings.warn(f"attncc: export: {len(report.rejected)} attention-like computation(s) left unchanged: "
                      f"{listed}{more}", AttnccWarning, stacklevel=3)
    for site in report.sites:
        if site.variant == "none":
            warnings.warn(f"attncc: export: {site.module or '<root>'} left unchanged: {site.reason}", AttnccWarning,
                          stacklevel=3)


# ------------------------------------------------------------------------------------ nothing lost
EXPORTED_ATTENTION = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default,
                      torch.ops.aten._safe_softmax.default, torch.ops.aten.scaled_dot_product_attention.default}
"""The ATen calls of an exported graph that are one softmax or one SDPA call of the model each."""


def exported_attention_calls(exported: fx.GraphModule) -> Counter:
    """Softmax and SDPA calls of an exported (not lowered) graph, per module name (``ModuleNames.annotate``d)."""
    from attncc.passes.graph_ops import module_path
    from attncc.uncaptured import ATTENTION_KERNELS

    kernels = EXPORTED_ATTENTION | ATTENTION_KERNELS
    return Counter(module_path(node) for node in exported.graph.nodes
                   if node.op == "call_function" and node.target in kernels)


def check_nothing_hidden(model: nn.Module, names: ModuleNames, call: CallArgs, exported: fx.GraphModule) -> None:
    """Raise AttnccError when attention would run unchanged because the exported graph hides it: softmax/SDPA
    inside a branch subgraph (``torch.cond``, a higher-order op), or fewer softmax/SDPA calls in a module's part of
    the graph than an eager run of ``model`` executes there (an eager run does not see into custom ops or
    higher-order ops either, so what those hide is only found by ``check_same_as_compile`` where compile sees it)."""
    from attncc.uncaptured import eager_attention_calls

    nested = [name for name, sub in exported.named_modules() if isinstance(sub, fx.GraphModule)
              and sub is not exported and exported_attention_calls(sub)]
    if nested:
        raise AttnccError(f"export would lose the rewrite: the exported graph holds attention inside a branch "
                          f"(torch.cond / a higher-order op: {', '.join(nested)}), which attncc does not rewrite; "
                          f"it would run unchanged")
    eager = eager_attention_calls(model, names, call.args, call.kwargs)
    names.annotate(exported)
    in_graph = exported_attention_calls(exported)
    hidden = {module: n - in_graph.get(module, 0) for module, n in eager.items() if n > in_graph.get(module, 0)}
    if hidden:
        listed = ", ".join(f"{module or '<root>'} ({n})" for module, n in sorted(hidden.items()))
        raise AttnccError(f"export would lose the rewrite: attention call(s) run in {listed} that the exported "
                          f"graph does not hold as softmax or SDPA; they would run unchanged")


def check_same_as_compile(model: nn.Module, policy: Policy, call: CallArgs, report: Report) -> None:
    """Compare with ``attncc.compile(model, policy)`` on the same inputs: raise AttnccError when compile rewrites a
    site of a module the export leaves as the model wrote it (the exported program would run the model's own
    attention where the compiled model runs attncc's); warn (AttnccWarning) when a site got another variant, e.g.
    exact because a mask structure compile proved at the example length is not proven for every length."""
    from attncc.api import compile as attncc_compile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the export says what it leaves alone itself
        compiled = attncc_compile(model, policy, measure_error=False)
        with torch.no_grad():
            compiled(*call.args, **call.kwargs)
    wanted, got = _rewritten(compiled.report()), _rewritten(report)
    reasons = {r.module: r.reason for r in report.rejected}
    reasons.update({s.module: s.reason for s in report.sites})
    missing = Counter(module for module, _ in wanted.elements()) - Counter(module for module, _ in got.elements())
    if missing:
        listed = "; ".join(f"{module or '<root>'}: {reasons.get(module, 'not found in the exported graph')}"
                           for module in sorted(missing))
        raise AttnccError(f"export would lose the rewrite: attncc.compile rewrites {listed}")
    for module, variant in sorted((wanted - got).elements()):
        warnings.warn(f"attncc: export: {module or '<root>'} runs {_variants_of(got, module)} where attncc.compile "
                      f"runs {variant} ({reasons.get(module, '')})", AttnccWarning, stacklevel=3)


def _variants_of(rewritten: Counter, module: str) -> str:
    return ", ".join(sorted({variant for name, variant in rewritten if name == module}))


def _rewritten(report: Report) -> Counter:
    return Counter((site.module, site.variant) for site in report.sites if site.variant != "none")


def check_ops_kept(result: PassResult, program: torch.export.ExportedProgram) -> None:
    """Raise AttnccError unless the exported program holds one attncc op per site the pipeline rewrote."""
    wanted = sum(site.variant != "none" for site in result.sites)
    held = sum(node.op == "call_function" and node.target in (attention_op._opoverload, torch.ops.attncc.attention)
               for node in program.graph.nodes)
    if held < wanted:
        raise AttnccError(f"export would lose the rewrite: {wanted} site(s) were rewritten but the exported "
                          f"program holds {held} attncc op(s)")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
