"""GPU readiness without a GPU: compile generated kernels for sm_90 (H100/H200) and read what the compiled code
says about speed.

Triton compiles for a CUDA target without a device (``triton.compile(ASTSource(...), target=GPUTarget("cuda",
90, 128))``). For a representative set of generated kernels (:func:`cases`) and every launch config the
autotuner may pick for them, :func:`measure` compiles the kernel and records:

* ``regs`` and ``spill`` (the per-thread local-memory frame, what Triton reports as ``n_spills``; 0 means
  nothing spilled), read from the cubin by ``cuobjdump -res-usage`` (Triton ships it; ptxas made the cubin);
* ``shared``: dynamic shared memory bytes (the kernel's metadata);
* per loop of the PTX (a label and the backward branch to it): the ``wgmma`` instructions in it and the
  values of its ``cp.async.wait_group`` (how many copies may still be in flight when the loop waits).

:func:`problems` turns figures into readiness failures: a spill in a config the autotuner may pick; a loop of
the source that calls ``tl.dot`` without a PTX loop using ``wgmma`` (Hopper's tensor-core instruction; an
IEEE float32 dot runs on FMA units instead); a ``cp.async.wait_group 0`` inside a loop of a config with 3+
pipeline stages (every iteration waits for all outstanding copies: loads stop overlapping compute).

``python -m attncc.codegen.readiness`` prints the figures as a markdown table (``--json``: as JSON;
``--scope suite|quick|full``: which kernels, see :func:`cases`; ``--write``: into docs/benchmarks.md). Compiling
needs Triton without ``TRITON_INTERPRET`` (the interpreter patches ``triton.language``): the test runs this
module in a subprocess.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from attncc.codegen.autotune import Config

TARGET_ARCH = 90
WARP_SIZE = 32
LENGTH = 4096
"""Sequence length the configs are pruned for (long enough that no config is dropped for the length)."""


@dataclass(frozen=True)
class KernelCase:
    """One generated kernel and the configs the autotuner may pick for it."""

    name: str
    """What it is, e.g. ``"dense bf16 d128"``."""
    entry: str
    """The ``@triton.jit`` function's name in ``source``."""
    source: str
    pointers: dict
    """Pointer argument -> Triton pointer type (``"*bf16"``); other arguments are int32 unless in ``floats``."""
    configs: tuple
    """The :class:`Config` s (constexpr tile sizes, warps, stages) the autotuner times on a GPU."""
    floats: tuple = ()
    constexprs: dict = field(default_factory=dict)
    """Constexpr arguments that are not config params (e.g. ``CHUNK``)."""
    aligned: tuple = ()
    """Integer arguments a real launch passes as multiples of 16 (Triton specializes on that)."""
    asserted: bool = True
    """False for kernels whose figures are reported only (see ``note``)."""
    note: str = ""


@dataclass
class LoopFigures:
    wgmma: int
    waits: list
    """``cp.async.wait_group`` values in the loop, in order."""


@dataclass
class Figures:
    case: str
    config: str
    num_stages: int
    regs: int
    spill: int
    shared: int
    wgmma: int
    loops: list
    dot_loops: int
    """Loops of the source that call ``tl.dot`` (each should become a PTX loop with wgmma)."""
    asserted: bool = True
    compile_s: float = 0.0


# ------------------------------------------------------------------------------------------------ the cases


def _softmax_case(name: str, q_dtype: torch.dtype, d: int, visit, *, causal: bool = False, sinks: bool = False,
                  dv: Optional[int] = None, group: int = 1) -> KernelCase:
    from attncc.codegen import softmax
    from attncc.variants.base import ScoreMods

    mods = ScoreMods(scale=d ** -0.5, causal=causal, sinks=torch.zeros(1) if sinks else None)
    plan = softmax.make_plan(q_dtype, d, dv or d, group, mods, None, None, visit, gpu=True)
    n_q = n_k = LENGTH
    if getattr(visit, "token_map", None) is not None:
        n_q, n_k = visit.token_map.n_q_visit, visit.token_map.n_k_visit
    configs = softmax.candidate_configs(plan, n_q, n_k, visit, softmax.SHARED_BYTES_DEFAULT, gpu=True)
    io = "*" + {"tl.bfloat16": "bf16", "tl.float16": "fp16", "tl.float32": "fp32"}[plan.dtype]
    pointers = {"Q": io, "K": io, "V": io, "Out": io, "Sinks": "*fp32", "Layout": "*i32"}
    if plan.predicate is not None:
        pointers.update({t: "*i32" for t in plan.predicate.tensors})
    aligned = tuple(f"stride_{t}{dim}" for t in "qkvo" for dim in "bhn")
    return KernelCase(name, softmax.KERNEL_NAME, softmax.generate_source(plan), pointers, tuple(configs),
                      floats=("qk_scale", "tanh_scale", "cap_log2"), aligned=aligned)


def _layout_visit(block: int, descriptor: dict):
    from attncc.codegen.visits import LayoutVisit

    return LayoutVisit(layout_for=lambda bm, bn: None, descriptor=descriptor, block_sizes=(block, block))


def _neighborhood_visit(grid: tuple, kernel: int):
    from attncc.codegen.neighborhood import NeighborhoodTiling
    from attncc.codegen.visits import LayoutVisit

    tiling = NeighborhoodTiling(grid, (kernel,) * len(grid), (1,) * len(grid), (1,) * len(grid))
    return LayoutVisit(layout_for=lambda bm, bn: None, predicate=tiling.predicate(), token_map=tiling.token_map(),
                       descriptor=tiling.descriptor())


def _topk_scores_case(d: int) -> KernelCase:
    from attncc.codegen import topk

    desc = topk.scores_descriptor(block=64, d=d, causal=True, mask=False)
    configs = topk.score_configs(desc, LENGTH // 64, LENGTH // 64, gpu=True)
    return KernelCase(f"topk_scores d{d}", "topk_scores", topk._scores_source(desc),
                      {"pooled_q": "*fp32", "pooled_k": "*fp32", "scores": "*fp32", "mask_any": "*i8"},
                      tuple(configs), floats=("scale",))


def _linear_cases(d: int) -> list[KernelCase]:
    from attncc.codegen import linear

    plan = linear._Plan(spec_text="linear", dtype="tl.bfloat16", dot_dtype="tl.bfloat16", d=d, d_pad=d, dv=d,
                        dv_pad=d, fmap="elu", causal=True, has_keep=False, quad_block=linear.QUAD_BLOCK)
    note = "reported only: linear runs its PyTorch path on CUDA (linear.CUDA_FAULT), no config is picked there"
    pointers = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "OUT": "*bf16", "KEEP": "*i8",
                **{name: "*fp32" for name in ("NUM", "DEN", "S", "Z", "S0", "Z0")}}
    state = linear._state_configs(plan, plan.d_pad, linear.SPLIT_KEYS)
    flags = dict(reverse=False, lagged=False, rows_even=True, add_buffers=False, normalize=True)
    chunked = linear._scan_source(plan, **flags)  # the chunk-form causal scan: state pass, prefix, output pass
    slots = dict(pointers, S="*bf16")  # bf16 inputs keep bf16 chunk states
    return [
        KernelCase(f"linear chunk state d{d}", "linear_chunk_state", chunked, slots,
                   tuple(linear._chunk_state_configs(plan)), constexprs={"CHUNK": 64}, asserted=False, note=note),
        KernelCase(f"linear chunk output d{d}", "linear_chunk_out", chunked, slots,
                   tuple(linear._chunk_out_configs(plan)), constexprs={"CHUNK": 64}, asserted=False, note=note),
        KernelCase("linear chunk prefix", "linear_chunk_prefix", linear._prefix_source(reverse=False, even=True),
                   {"X": "*bf16", "Y": "*bf16"}, (linear.Config.of(4, 1, BLOCK=1024),), asserted=False, note=note),
        KernelCase(f"linear state d{d}", "linear_state", linear._state_source(plan, even=True), pointers,
                   tuple(state), asserted=False, note=note),
    ]


SCOPES = ("suite", "quick", "full")


def cases(scope: str = "full") -> list[KernelCase]:
    """The representative set (``"full"``): the softmax family on each visit kind (dense, causal, band with
    sinks, block-sparse, top-k, neighborhood, learned sinks), head dims 64/80/128, bf16 and fp32, the top-k
    block scores and (figures only) the linear scan and state. ``"quick"``: bf16 at d=128, every visit kind,
    every config. ``"suite"`` (what the test suite compiles, ~8 kernels): one kernel per failure kind the
    check found on the code before issue 11's fixes: dense bf16 d=128 at every config (spills of 128x64 with
    4 warps), top-k's configs with 3 stages (wait_group 0 in layout loops), fp32 and top-k block scores at
    their first config (no wgmma; spilling tiles)."""
    if scope not in SCOPES:
        raise ValueError(f"readiness: scope must be one of {SCOPES}, got {scope!r}")
    if scope == "suite":
        return _suite_cases()
    return _cases(quick=scope == "quick")


def _suite_cases() -> list[KernelCase]:
    import dataclasses

    from attncc.codegen.visits import DenseVisit

    bf16 = torch.bfloat16
    topk = _softmax_case("topk(64) bf16 d128", bf16, 128, _layout_visit(64, {"variant": "topk"}))
    fp32 = _softmax_case("dense fp32 d64", torch.float32, 64, DenseVisit())
    scores = _topk_scores_case(128)
    return [
        _softmax_case("dense bf16 d128", bf16, 128, DenseVisit()),
        dataclasses.replace(topk, configs=tuple(c for c in topk.configs if c.num_stages >= 3)),
        dataclasses.replace(fp32, configs=fp32.configs[:1]),
        dataclasses.replace(scores, configs=scores.configs[:1]),
    ]


def _cases(quick: bool) -> list[KernelCase]:
    from attncc.codegen.visits import BandVisit, DenseVisit

    bf16, fp32 = torch.bfloat16, torch.float32
    out = [
        _softmax_case("dense bf16 d128", bf16, 128, DenseVisit()),
        _softmax_case("causal bf16 d128", bf16, 128, DenseVisit(), causal=True),
        _softmax_case("local(256)+sinks4 bf16 d128", bf16, 128, BandVisit(255, 0, sinks=4), causal=True),
        _softmax_case("block_sparse(64) bf16 d128", bf16, 128, _layout_visit(64, {"variant": "block_sparse"}),
                      causal=True),
        _softmax_case("topk(64) bf16 d128", bf16, 128, _layout_visit(64, {"variant": "topk"})),
        _softmax_case("neighborhood 64x64 k7 bf16 d128", bf16, 128, _neighborhood_visit((64, 64), 7)),
    ]
    if quick:
        return out
    out += [
        _softmax_case("dense bf16 d64", bf16, 64, DenseVisit()),
        _softmax_case("dense bf16 d80", bf16, 80, DenseVisit()),
        _softmax_case("learned sinks bf16 d64", bf16, 64, DenseVisit(), sinks=True, group=4),
        _softmax_case("topk(64) bf16 d64", bf16, 64, _layout_visit(64, {"variant": "topk"})),
        _softmax_case("dense fp32 d64", fp32, 64, DenseVisit()),
        _softmax_case("dense fp32 d128", fp32, 128, DenseVisit()),
        _topk_scores_case(128),
        *_linear_cases(128),
    ]
    return out


# --------------------------------------------------------------------------------------------- compiling


def _jit_function(source: str, entry: str):
    """The ``@triton.jit`` function ``entry`` of ``source`` (registered with linecache, as the kernel cache
    does, so Triton can read it)."""
    from attncc.codegen.source import _execute

    key = f"readiness-{abs(hash(source)) & 0xFFFFFFFF:08x}"
    return _execute(source, key, entry)


def _signature(fn, case: KernelCase, config: Config) -> tuple[dict, dict, dict]:
    constexprs = {**dict(config.params), **case.constexprs}
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        param = fn.params[index]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs.setdefault(name, None)
            continue
        if name in case.pointers:
            signature[name] = case.pointers[name]
        else:
            signature[name] = "fp32" if name in case.floats else "i32"
        if name in case.pointers or name in case.aligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
    missing = [n for n, v in constexprs.items() if v is None]
    if missing:
        raise ValueError(f"{case.name}: no value for constexpr {missing}")
    return signature, constexprs, attrs


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise RuntimeError(f"readiness: Triton's cuobjdump is missing ({path}): registers cannot be read")
    return path


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, local-memory frame bytes per thread) of the cubin's kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    try:
        text = subprocess.run([_cuobjdump(), "-res-usage", handle.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(handle.name)
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return int(regs.group(1)), int(stack.group(1)) + int(local.group(1))


def ptx_loops(ptx: str) -> list[LoopFigures]:
    """The innermost loops of PTX text (a label and a later branch back to it, holding no other loop), with
    their wgmma count and cp.async.wait_group values."""
    lines = ptx.splitlines()
    labels = {}
    spans = []
    for i, line in enumerate(lines):
        label = re.match(r"^(\$L__BB\d+_\d+):", line)
        if label:
            labels[label.group(1)] = i
        branch = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if branch and branch.group(1) in labels and labels[branch.group(1)] < i:
            spans.append((labels[branch.group(1)], i))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    out = []
    for start, end in sorted(inner):
        body = lines[start:end + 1]
        out.append(LoopFigures(
            wgmma=sum("wgmma.mma_async" in line for line in body),
            waits=[int(m.group(1)) for line in body for m in [re.search(r"cp\.async\.wait_group\s+(\d+)", line)]
                   if m]))
    return out


def dot_loops(source: str, entry: str) -> int:
    """Loops of ``entry`` in ``source`` whose own body (not a nested loop's) calls ``tl.dot``."""
    tree = ast.parse(source)
    count = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == entry:
            for loop in ast.walk(node):
                if isinstance(loop, (ast.For, ast.While)) and _calls_dot_directly(loop):
                    count += 1
    return count


def _calls_dot_directly(loop) -> bool:
    stack = list(loop.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.For, ast.While)):
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dot":
            return True
        stack.extend(ast.iter_child_nodes(node))
    return False


def compile_case(case: KernelCase, config: Config) -> Figures:
    """Compile ``case`` at ``config`` for sm_90 and read its figures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(case.source, case.entry)
    signature, constexprs, attrs = _signature(fn, case, config)
    started = time.perf_counter()
    target = GPUTarget("cuda", TARGET_ARCH, WARP_SIZE)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                              options=config.compile_options())
    seconds = time.perf_counter() - started
    regs, spill = _resources(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return Figures(case=case.name, config=str(config), num_stages=config.num_stages, regs=regs, spill=spill,
                   shared=int(compiled.metadata.shared), wgmma=ptx.count("wgmma.mma_async"),
                   loops=[asdict(loop) for loop in ptx_loops(ptx)], dot_loops=dot_loops(case.source, case.entry),
                   asserted=case.asserted, compile_s=round(seconds, 2))


def measure(selected: list[KernelCase], progress: Optional[Callable[[str], None]] = None) -> list[Figures]:
    """Figures of every case at every one of its configs."""
    out = []
    for case in selected:
        for config in case.configs:
            if progress:
                progress(f"{case.name} [{config}]")
            out.append(compile_case(case, config))
    return out


KNOWN_SPILLS = {
    "dense fp32 d128": "float32 inputs at head dims 65-128 spill 64-488 bytes per thread with tf32x3 in every "
                       "wgmma tile tried (64x16, 64x32 at 4 warps; 64x32, 64x64, 128x16, 128x32 at 8; 2-4 stages; "
                       "32x32 does not spill but uses no wgmma); the least (64-80 B) are offered. ieee spilled "
                       "0.7-9.8 KB and used no tensor cores; tf32 alone breaks the exact policy's 1e-5",
}
"""Spills the check reports but does not fail on, with the reason (the figures stay in the table)."""


def problems(figures: list[Figures]) -> list[str]:
    """Readiness failures among ``figures`` (asserted cases only), one line each."""
    out = []
    for f in figures:
        if not f.asserted:
            continue
        where = f"{f.case} [{f.config}]"
        if f.spill and f.case not in KNOWN_SPILLS:
            out.append(f"{where}: spills ({f.spill} bytes of local memory per thread, {f.regs} registers)")
        mma_loops = sum(1 for loop in f.loops if loop["wgmma"])
        if mma_loops < f.dot_loops:
            out.append(f"{where}: {f.dot_loops} source loops call tl.dot but {mma_loops} PTX loops use wgmma")
        if f.num_stages >= 3:
            zero = [i for i, loop in enumerate(f.loops) if 0 in loop["waits"]]
            if zero:
                out.append(f"{where}: cp.async.wait_group 0 inside loop(s) {zero} with {f.num_stages} stages")
    return out


# ------------------------------------------------------------------------------------------------ output


def markdown(figures: list[Figures]) -> str:
    """The figures as a markdown table (one row per kernel and config)."""
    rows = ["| kernel | config | regs | spill B | shared KB | wgmma loops / dot loops | cp.async.wait_group per loop |",
            "|---|---|---:|---:|---:|---|---|"]
    for f in figures:
        waits = "; ".join(",".join(str(w) for w in loop["waits"]) or "-" for loop in f.loops) or "-"
        mark = "" if f.asserted else " (not asserted)"
        mark += " (known spill)" if f.spill and f.case in KNOWN_SPILLS else ""
        mma = sum(1 for loop in f.loops if loop["wgmma"])
        rows.append(f"| {f.case}{mark} | {f.config} | {f.regs} | {f.spill} | {f.shared / 1024:.0f} | "
                    f"{mma} / {f.dot_loops} | {waits} |")
    return "\n".join(rows)


BEGIN, END = "<!-- readiness: begin (python -m attncc.codegen.readiness --write) -->", "<!-- readiness: end -->"


def section(figures: list[Figures], found: list[str], seconds: float) -> str:
    """The markdown block ``--write`` puts between the readiness markers of docs/benchmarks.md."""
    import triton

    lines = [BEGIN, "",
             f"Compiled for sm_90 with Triton {triton.__version__} (no GPU: figures from the compiler, not timings; "
             f"{len(figures)} kernel x config compilations in {seconds:.0f} s). `spill B` is the per-thread "
             "local-memory frame (0: nothing spilled); `wgmma loops / dot loops`: PTX loops using wgmma against "
             "source loops calling tl.dot; waits: the `cp.async.wait_group` values in each innermost loop "
             "(`0` inside a 3+ stage loop serializes the prefetch).", "", markdown(figures), ""]
    lines += ["Problems:", *[f"- {line}" for line in found]] if found else ["No problems."]
    known = sorted({f.case for f in figures if f.spill and f.case in KNOWN_SPILLS})
    lines += [f"- known, not failed on: {case}: {KNOWN_SPILLS[case]}" for case in known]
    notes = {case.name: case.note for case in _cases(quick=False) if case.note}
    lines += [f"- {name}: {note}" for name, note in notes.items() if any(f.case == name for f in figures)]
    return "\n".join(lines + ["", END])


def write_section(path: str, block: str) -> None:
    """Replace the readiness block of ``path`` (or insert it before the benchmark script's marker line)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        marker = "<!-- generated by benchmarks/kernels.py"
        at = text.find(marker)
        at = len(text) if at < 0 else at
        text = text[:at] + block + "\n\n" + text[at:]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attncc.codegen.readiness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scope", choices=SCOPES, default="full",
                        help="full: every representative kernel; quick: bf16 d=128, every visit kind; suite: the "
                             "few kernels the test suite compiles")
    parser.add_argument("--json", action="store_true", help="print the figures and problems as JSON")
    parser.add_argument("--only", default="", help="only the kernels whose name contains this text")
    parser.add_argument("--write", metavar="PATH", nargs="?", const="docs/benchmarks.md",
                        help="also write the table into the readiness block of PATH (default docs/benchmarks.md)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0"):
        print("readiness: unset TRITON_INTERPRET (the interpreter patches triton.language)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    selected = [c for c in cases(args.scope) if args.only in c.name]
    figures = measure(selected, progress=lambda what: print(what, file=sys.stderr, flush=True))
    found = problems(figures)
    seconds = time.perf_counter() - started
    if args.write:
        write_section(args.write, section(figures, found, seconds))
    if args.json:
        print(json.dumps({"figures": [asdict(f) for f in figures], "problems": found,
                          "seconds": round(seconds, 1)}, indent=1))
    else:
        print(markdown(figures))
        print()
        print("Problems:" if found else "No problems.")
        for line in found:
            print(f"- {line}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
