"""attncc's Triton kernels on one GPU vs SDPA (flash), FlexAttention and flash-linear-attention; a Llama end to end.

    python benchmarks/kernels.py [--quick] [--sizes 4096,32768] [--sections dense,sparse,topk,linear,e2e]
    python benchmarks/kernels.py --smoke [--out PATH]     # CPU, Triton's interpreter, tiny sizes: a smoke test

One script; the end-to-end model is its ``e2e`` section. Forward only, B=4, H=16, D=128, bf16, N = 1K, 2K, 4K,
8K, 16K, 32K (``--quick``: 4K and 32K), q/k/v drawn from N(0, 1). Every attncc row goes through the public op
``attncc.attention(q, k, v, variant=..., causal=...)`` with ``ATTNCC_BACKEND=triton`` (set unless already set);
its ``path`` note says whether the Triton kernels ran: a call no kernel covers runs the variant's PyTorch path
instead, and that row then measures something else. Sections:

1. ``dense``: exact attention, bidirectional and causal, vs SDPA with the flash backend and vs
   ``torch.compile(flex_attention)`` (no block mask / a causal block mask). Targets: >= 1.0x SDPA, >= 1.15x Flex.
2. ``sparse``: ``local(window=2048)`` causal; a 2-D ``neighborhood(kernel=31)`` (bidirectional) over the N
   tokens as an H x W grid, H the largest divisor of N not above sqrt(N) (32x32 at 1K ... 128x256 at 32K);
   BigBird block-sparse with BigBird-ITC's base layout (64-token blocks, 3 sliding, 2 global, 3 random),
   bidirectional. Each vs Flex with ``create_block_mask`` of the same mask_mod, and vs the FLOP bound: ideal
   speedup = dense FLOPs / variant FLOPs (from the pairs the variant visits, the variant's own ``cost``),
   achieved = (attncc exact ms / attncc variant ms), reported as a fraction of the ideal. Targets (local and
   neighborhood, at every N where the pattern skips work, i.e. ideal >= 1.05x): >= 85% of the FLOP-bound
   speedup and >= 1.3x Flex. Kernel 31 rather than a small one: 961 keys per query keeps the per-query work
   large enough that a FLOP-bound target means something (with 7x7 or 13x13, loading each query tile's
   neighbourhood is likelier to bound a kernel than its FLOPs are).
3. ``topk``: ``topk(density=0.125)`` (the selection included: the op selects), bidirectional, vs dense SDPA
   flash. Target: >= 6x at N=32K.
4. ``linear``: causal ``linear(feature_map='elu')`` vs flash-linear-attention's chunk kernel
   (``fla.ops.linear_attn.chunk_linear_attn``, only if ``fla`` imports; on ``elu(x) + 1`` features computed
   inside the timed call, scale 1, normalized: the same function attncc computes) and vs causal SDPA flash.
   Targets: >= 1.0x fla and >= 8x causal SDPA at N=32K.
5. ``e2e``: a Llama-shaped ``LlamaModel`` (8 layers, hidden 1024, 16 heads, intermediate 2816, vocab 32000),
   bf16, eval, ``no_grad``, 16K tokens, batch 1, an attention_mask of ones, no KV cache: the original (transformers SDPA) vs ``attncc.compile(model,
   "exact")`` and ``attncc.compile(model, "local(window=1024)")`` (compiled with ``measure_error=False``).

Timing: ``triton.testing.do_bench`` (median) after one untimed first call (compilation, autotuning; its time is
the ``1st call s`` column). TFLOP/s = the method's FLOPs (the variant's ``cost``, 2 per multiply-add) / time.
A row that fails shows ``error: ...`` (the traceback is printed at the end) and a row out of GPU memory
``OOM: skipped``; the run goes on. Targets are printed as PASS/FAIL lines, never asserted.

The tables are printed and written as markdown to ``--out`` (default ``docs/benchmarks.md``): only the
generated part below the marker line is rewritten, one block per section run, so a run of some sections keeps
the others. The exit status is 0 when every row ran, 1 when some row failed, 2 without a GPU (or bad usage).

``--smoke`` runs every section at tiny sizes (B=1, H=2, D=16, N=64 and 128, fp32, local(window=32),
neighborhood kernel 5, 16-token blocks, a 2-layer Llama at 128 tokens) on CPU tensors with ``TRITON_INTERPRET=1``
and ``ATTNCC_BACKEND=triton``, through the same code. What needs CUDA is replaced or skipped: SDPA runs on its
default CPU backend, FlexAttention uncompiled (eager), fla not at all, and timings are ``perf_counter``. It
writes to a temporary file unless ``--out`` is given, never to ``docs/benchmarks.md``; its numbers say nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
DOCUMENT = REPO / "docs" / "benchmarks.md"
sys.path.insert(0, str(BENCHMARKS))
from _env import environment_line  # noqa: E402

SECTION_ORDER = ("method", "dense", "sparse", "topk", "linear", "e2e")
KERNEL_SECTIONS = SECTION_ORDER[1:]
HEADINGS = {
    "method": "## How these numbers were taken",
    "dense": "## 1. Dense and causal attention",
    "sparse": "## 2. Sparse softmax: local, neighborhood, block-sparse",
    "topk": "## 3. Top-k block attention",
    "linear": "## 4. Causal linear attention",
    "e2e": "## 5. End to end: Llama-shaped model",
}
MARKER = "<!-- generated by benchmarks/kernels.py: everything below this line is rewritten by each run -->"
NO_RUN_YET = "No GPU run has been recorded yet."
WIDTH = 190

PROBLEMS: list[str] = []
"""Tracebacks of the rows that failed (their cells say 'error: ...'); printed at the end, exit status 1."""


# ------------------------------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Setup:
    """Sizes and variants of one run: the issue's GPU problem, or the tiny CPU smoke problem."""

    smoke: bool
    device: torch.device
    dtype: torch.dtype
    batch: int
    heads: int
    head_dim: int
    sizes: tuple[int, ...]
    local: str
    nat_kernel: int
    bigbird: str
    topk: str
    linear: str
    e2e_tokens: int
    e2e_llama: dict
    e2e_policy: str
    cpu_repeats: int = 1
    """Timed calls per row on the CPU (smoke); the GPU uses do_bench."""

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def shape_line(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return f"B={self.batch}, H={self.heads}, D={self.head_dim}, {dtype}, forward only"


GPU_SIZES = (1024, 2048, 4096, 8192, 16384, 32768)
QUICK_SIZES = (4096, 32768)


def gpu_setup(sizes: tuple[int, ...]) -> Setup:
    return Setup(
        smoke=False, device=torch.device("cuda"), dtype=torch.bfloat16, batch=4, heads=16, head_dim=128,
        sizes=sizes, local="local(window=2048)", nat_kernel=31,
        bigbird="block_sparse(pattern=bigbird(window=1, globals=2, random=3), block=64)",
        topk="topk(density=0.125)", linear="linear(feature_map='elu')",
        e2e_tokens=16384, e2e_policy="local(window=1024)",
        e2e_llama=dict(num_hidden_layers=8, hidden_size=1024, num_attention_heads=16, num_key_value_heads=16,
                       intermediate_size=2816, vocab_size=32000, max_position_embeddings=32768),
    )


def smoke_setup(sizes: tuple[int, ...]) -> Setup:
    # Scaled down so every pattern stays a real pattern at N=64/128: a band narrower than N, a kernel smaller
    # than the 8x8 grid, 16-token blocks (the kernels' smallest tile) so that patterns have several blocks.
    return Setup(
        smoke=True, device=torch.device("cpu"), dtype=torch.float32, batch=1, heads=2, head_dim=16,
        sizes=sizes, local="local(window=32)", nat_kernel=5,
        bigbird="block_sparse(pattern=bigbird(window=1, globals=2, random=3), block=16)",
        topk="topk(density=0.125, block=16)", linear="linear(feature_map='elu')",
        e2e_tokens=128, e2e_policy="local(window=32)",
        e2e_llama=dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=256, max_position_embeddings=256),
    )


def grid_for(n: int) -> tuple[int, int]:
    """The N tokens as a square-ish 2-D grid: H the largest divisor of N not above sqrt(N), W = N / H."""
    h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return h, n // h


def neighborhood_text(setup: Setup, n: int) -> str:
    h, w = grid_for(n)
    return f"neighborhood(kernel={setup.nat_kernel}, grid=({h}, {w}))"


def inputs(setup: Setup, n: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v ``[B, H, N, D]`` from N(0, 1); the same seed gives every section the same tensors."""
    g = torch.Generator(device=setup.device).manual_seed(seed)
    shape = (setup.batch, setup.heads, n, setup.head_dim)
    return tuple(torch.randn(shape, generator=g, device=setup.device, dtype=setup.dtype) for _ in range(3))


def size_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


# ------------------------------------------------------------------------------------------------- FLOPs


def variant_flops(setup: Setup, text: str, n: int, causal: bool) -> float:
    """FLOPs of one call of variant ``text`` (its ``cost``: 2 per multiply-add of the pairs it visits)."""
    from attncc.site import AttentionSite
    from attncc.variants.parse import parse_variant

    site = AttentionSite(module="benchmark", source="sdpa", q=None, k=None, v=None, output=None,
                         batch=setup.batch, q_heads=setup.heads, kv_heads=setup.heads, q_len=n, kv_len=n,
                         head_dim=setup.head_dim, value_dim=setup.head_dim, causal=causal, dtype=setup.dtype)
    return float(parse_variant(text).cost(site)["flops"])


def tflops(flops: float, ms: Optional[float]) -> str:
    if ms is None or ms <= 0:
        return "-"
    value = flops / (ms * 1e-3) / 1e12
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"


# ------------------------------------------------------------------------------------------------ timing


@dataclass
class Measured:
    """One method at one size: its median time, or why there is none."""

    ms: Optional[float] = None
    note: str = ""
    """Why there is no time: 'error: ...', 'OOM: skipped', 'needs CUDA', 'fla not installed'."""
    path: str = ""
    """attncc rows: which backend ran the op ('triton', or 'torch path ...')."""
    first_s: Optional[float] = None
    """Seconds of the untimed first call (compilation, autotuning, Flex's torch.compile)."""
    out: Optional[Tensor] = None
    """The first call's output, kept for the differences of one size's rows, then dropped."""

    def time_cell(self) -> str:
        if self.ms is None:
            return self.note or "-"
        return f"{self.ms:.3f}" if self.ms < 1 else f"{self.ms:.2f}"

    def first_cell(self) -> str:
        return "-" if self.first_s is None else f"{self.first_s:.1f}"


def release(setup: Setup) -> None:
    """Free what the rows of one size held before the next (large N sits close to the memory limit)."""
    gc.collect()
    if setup.cuda:
        torch.cuda.empty_cache()


def note_problem(what: str, error: BaseException) -> str:
    """Keep the traceback for the end of the run; the table gets one line."""
    text = f"{type(error).__name__}: {error}"
    PROBLEMS.append(f"{what}: {text}\n{traceback.format_exc()}")
    return "error: " + text.splitlines()[0][:90]


@contextlib.contextmanager
def kernel_path_probe():
    """While active, count the op calls the Triton backend ran and those it handed back to the PyTorch path.

    The dispatcher imports ``triton_attention`` from its module at each call, so replacing the module attribute
    sees every call; a call that never reaches it (backend ``torch``) counts as neither.
    """
    counts = {"triton": 0, "torch": 0}
    try:
        from attncc.runtime import triton_backend
    except Exception:  # noqa: BLE001 - no Triton backend in this tree: every call ran the PyTorch path
        yield counts
        return
    original = triton_backend.triton_attention

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        counts["triton" if out is not None else "torch"] += 1
        return out

    triton_backend.triton_attention = counting
    try:
        yield counts
    finally:
        triton_backend.triton_attention = original


def describe_path(counts: dict[str, int]) -> str:
    if counts["triton"] and not counts["torch"]:
        return "triton"
    if not counts["triton"] and not counts["torch"]:
        return "torch path (the Triton backend was not asked)"
    return f"torch path for {counts['torch']} of {counts['triton'] + counts['torch']} calls"


def timed_ms(fn: Callable[[], object], setup: Setup) -> float:
    """Median milliseconds of ``fn``: do_bench on the GPU, ``cpu_repeats`` perf_counter calls on the CPU."""
    if setup.cuda:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    samples = []
    for _ in range(setup.cpu_repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def measure(what: str, prepare: Callable[[], Callable[[], Tensor]], setup: Setup, probe: bool = False,
            within: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Measured:
    """Prepare (untimed: block masks, torch.compile), call once (untimed), then time one method.

    ``within`` is entered around the calls (SDPA's backend selection), ``probe`` records which attncc backend
    ran. Any failure becomes the row's note instead of ending the run.
    """
    result = Measured()
    try:
        with within():
            fn = prepare()
            with kernel_path_probe() if probe else contextlib.nullcontext() as counts:
                start = time.perf_counter()
                out = fn()
                if setup.cuda:
                    torch.cuda.synchronize()
                result.first_s = time.perf_counter() - start
            if probe:
                result.path = describe_path(counts)
            result.ms = timed_ms(fn, setup)
        result.out = out
    except torch.OutOfMemoryError:
        result = Measured(note="OOM: skipped")
        release(setup)
    except Exception as error:  # noqa: BLE001 - one failing row must not end the benchmark
        result = Measured(note=note_problem(what, error))
        release(setup)
    shown = result.time_cell() + (" ms" if result.ms is not None else "")
    print(f"    {what}: {shown}" + (f" [{result.path}]" if result.path else ""), flush=True)
    return result


def max_diff(a: Measured, b: Measured) -> str:
    """max |a - b| of two rows' outputs (same layout), in float32."""
    if a.out is None or b.out is None:
        return "-"
    try:
        return f"{(a.out.float() - b.out.float()).abs().max().item():.2e}"
    except torch.OutOfMemoryError:  # float32 copies of two 32K outputs: a difference is not worth a crash
        return "OOM"


def speedup(baseline: Measured, ours: Measured) -> Optional[float]:
    """How many times faster ``ours`` is than ``baseline`` (> 1: faster)."""
    if baseline.ms is None or ours.ms is None or ours.ms <= 0:
        return None
    return baseline.ms / ours.ms


def times(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


# ------------------------------------------------------------------------------------------------ methods


def attncc_method(q: Tensor, k: Tensor, v: Tensor, text: str, causal: bool):
    """The op under test, as a prepare() for measure()."""
    import attncc

    return lambda: (lambda: attncc.attention(q, k, v, variant=text, causal=causal))


def sdpa_label(setup: Setup) -> str:
    return "SDPA flash" if setup.cuda else "SDPA (CPU default backend: smoke)"


def sdpa_backend(setup: Setup) -> Callable[[], contextlib.AbstractContextManager]:
    """The flash backend on the GPU (as the issue asks); on the CPU, whatever SDPA picks (flash is CUDA-only)."""
    if not setup.cuda:
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def sdpa_method(q: Tensor, k: Tensor, v: Tensor, causal: bool):
    return lambda: (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))


def flex_label(setup: Setup) -> str:
    return "Flex (compiled)" if setup.cuda else "Flex (eager: smoke)"


def causal_mask_mod(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def flex_mask_mod(text: str, n: int, causal: bool, device: torch.device):
    """The FlexAttention mask_mod of variant ``text`` (None: no mask at all, dense bidirectional attention)."""
    from cpu_variants import (  # the CPU benchmark's restatements
        block_sparse_mask_mod, local_mask_mod, neighborhood_mask_mod,
    )

    from attncc.variants.parse import parse_variant

    spec = parse_variant(text)
    if spec.name == "exact":
        return causal_mask_mod if causal else None
    if spec.name == "local":
        return local_mask_mod(spec, causal)
    if spec.name == "neighborhood":
        if causal:
            raise NotImplementedError("neighborhood is bidirectional")
        return neighborhood_mask_mod(spec, spec.grid)
    if spec.name == "block_sparse":
        return block_sparse_mask_mod(spec, n, causal, device)
    raise NotImplementedError(f"{spec.name} has no FlexAttention mask (data-dependent or not softmax)")


def flex_method(q: Tensor, k: Tensor, v: Tensor, text: str, causal: bool, setup: Setup):
    """FlexAttention with the block mask of the same mask_mod: compiled on the GPU (fresh Dynamo state per row,
    as each mask_mod is a new graph), eager on the CPU (compiling takes minutes there)."""

    def prepare():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        n = q.shape[-2]
        mask_mod = flex_mask_mod(text, n, causal, q.device)
        block_mask = None if mask_mod is None else create_block_mask(mask_mod, None, None, n, n, device=q.device)
        if setup.cuda:
            torch._dynamo.reset()
            run = torch.compile(flex_attention, dynamic=False)
        else:
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            run = flex_attention
        return lambda: run(q, k, v, block_mask=block_mask)

    return prepare


def fla_chunk_linear_attn():
    """flash-linear-attention's chunk kernel for plain linear attention, or None when fla is not installed."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception:  # noqa: BLE001 - missing, or an fla that does not import with this torch
        try:
            from fla.ops.linear_attn.chunk import chunk_linear_attn
        except Exception:  # noqa: BLE001
            return None
    return chunk_linear_attn


def fla_method(q: Tensor, k: Tensor, v: Tensor, fn):
    """fla's chunk_linear_attn on attncc's function: ``elu(x) + 1`` features of q and k (computed inside the
    timed call, as attncc computes them), scale 1, normalized by ``phi(q) . sum phi(k)``. fla takes
    ``[B, T, H, D]``: the inputs are laid out so once, untimed, and the output is laid back for the difference.
    Keywords are passed only if this fla version has them (its signature changed across versions)."""
    import inspect

    params = inspect.signature(fn).parameters
    options = {name: value for name, value in (("scale", 1.0), ("normalize", True), ("head_first", False))
               if name in params}
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))

    def run():
        out = fn(F.elu(qt) + 1, F.elu(kt) + 1, vt, **options)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)

    return lambda: run


# ------------------------------------------------------------------------------------------------ tables


@dataclass
class Section:
    """One section's output: a table (rows in groups), notes under it, and its target lines."""

    key: str
    title: str
    columns: list[str]
    groups: list[list[list[str]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    context: list[str] = field(default_factory=list)
    """Lines above the table: environment, sizes, variants."""

    def add_group(self) -> list[list[str]]:
        self.groups.append([])
        return self.groups[-1]


def left_aligned(index: int, column: str) -> bool:
    """Text columns (the first two, names, notes) read left-aligned; numbers right-aligned."""
    return index < 2 or column in ("method", "model", "notes", "attention sites")


def print_section(section: Section) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # Cells hold text like "[B, N, H, D]" that rich would read as markup: every string goes in escaped.
    console = Console(width=WIDTH, highlight=False)
    title = f"{HEADINGS[section.key].lstrip('# ')}: {section.title}\n" + "\n".join(section.context)
    table = Table(title=escape(title), title_justify="left", caption=escape("\n".join(section.notes)),
                  caption_justify="left")
    for i, column in enumerate(section.columns):
        table.add_column(escape(column), overflow="fold", justify="left" if left_aligned(i, column) else "right")
    for g, group in enumerate(section.groups):
        if g:
            table.add_section()
        for row in group:
            table.add_row(*(escape(cell) for cell in row))
    console.print(table)
    for line in section.targets:
        console.print("  " + line, markup=False)
    console.print()


def markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def section_markdown(section: Section) -> str:
    lines = [HEADINGS[section.key], "", section.title, ""]
    lines += [f"{line}  " for line in section.context] + [""]
    if section.columns:
        lines.append("| " + " | ".join(markdown_cell(c) for c in section.columns) + " |")
        lines.append("|" + "|".join("---" if left_aligned(i, c) else "---:" for i, c in enumerate(section.columns))
                     + "|")
        for group in section.groups:
            for row in group:
                lines.append("| " + " | ".join(markdown_cell(c) for c in row) + " |")
        lines.append("")
    lines += [f"{note}  " for note in section.notes]
    if section.targets:
        lines += ["", "Targets:", ""] + [f"- {markdown_cell(t)}" for t in section.targets]
    return "\n".join(lines).rstrip() + "\n"


def target_line(name: str, threshold: float, values: dict[int, Optional[float]], percent: bool = False,
                skipped: Optional[dict[int, str]] = None) -> str:
    """PASS when every measured value reaches ``threshold``; the per-size values follow in brackets."""
    def show(x: float) -> str:
        return f"{x:.0%}" if percent else f"{x:.2f}x"

    measured = {n: x for n, x in values.items() if x is not None}
    parts = [f"{size_label(n)} {show(x)}" if x is not None else f"{size_label(n)} not measured"
             for n, x in sorted(values.items())]
    parts += [f"{size_label(n)} {why}" for n, why in sorted((skipped or {}).items())]
    if not measured:
        verdict = "not measured"
    else:
        verdict = "PASS" if all(x >= threshold for x in measured.values()) else "FAIL"
    return f"target {name}: {verdict} ({', '.join(parts) if parts else 'no size'})"


def at_size(values: dict[int, Optional[float]], n: int) -> dict[int, Optional[float]]:
    """The value at one size only (targets stated 'at 32K'); empty means 'not run at that size'."""
    return {n: values[n]} if n in values else {}


def at_size_line(name: str, threshold: float, values: dict[int, Optional[float]], n: int) -> str:
    if n not in values:
        return f"target {name}: not measured (N={n} not in this run)"
    return target_line(name, threshold, at_size(values, n))


# ----------------------------------------------------------------------------------------------- sections


class Baselines:
    """Dense timings several sections compare against, measured once per (method, N, causal) and shared (the
    inputs of a size are the same tensors' values in every section)."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.cache: dict[tuple[str, int, bool], Measured] = {}

    def get(self, method: str, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Measured:
        key = (method, q.shape[-2], causal)
        if key not in self.cache:
            mode = "causal" if causal else "bidirectional"
            if method == "attncc":
                m = measure(f"attncc exact {mode}", attncc_method(q, k, v, "exact", causal), self.setup, probe=True)
            else:
                m = measure(f"{sdpa_label(self.setup)} {mode}", sdpa_method(q, k, v, causal), self.setup,
                            within=sdpa_backend(self.setup))
            self.cache[key] = m
        return self.cache[key]

    def forget_outputs(self) -> None:
        for m in self.cache.values():
            m.out = None


def section_dense(setup: Setup, baselines: Baselines) -> Section:
    section = Section("dense", "attncc `exact` vs SDPA (flash backend) and FlexAttention (no mask / causal "
                               "block mask)",
                      ["N", "mask", "method", "ms", "TFLOP/s", "attncc speedup", "max abs diff vs attncc",
                       "1st call s", "notes"])
    vs_sdpa: dict[bool, dict[int, Optional[float]]] = {False: {}, True: {}}
    vs_flex: dict[bool, dict[int, Optional[float]]] = {False: {}, True: {}}
    for n in setup.sizes:
        q, k, v = inputs(setup, n)
        for causal in (False, True):
            mode = "causal" if causal else "none"
            print(f"  dense N={n} mask={mode}", flush=True)
            flops = variant_flops(setup, "exact", n, causal)
            ours = baselines.get("attncc", q, k, v, causal)
            sdpa = baselines.get("sdpa", q, k, v, causal)
            flex = measure(f"{flex_label(setup)} {mode}", flex_method(q, k, v, "exact", causal, setup), setup)
            group = section.add_group()
            group.append([f"{n:,}", mode, "attncc", ours.time_cell(), tflops(flops, ours.ms), "", "",
                          ours.first_cell(), ours.path])
            for label, other in ((sdpa_label(setup), sdpa), (flex_label(setup), flex)):
                group.append([f"{n:,}", mode, label, other.time_cell(), tflops(flops, other.ms),
                              times(speedup(other, ours)), max_diff(other, ours), other.first_cell(), ""])
            vs_sdpa[causal][n] = speedup(sdpa, ours)
            vs_flex[causal][n] = speedup(flex, ours)
            flex.out = None
        baselines.forget_outputs()
        del q, k, v
        release(setup)
    section.notes = [
        "attncc speedup: baseline ms / attncc ms (> 1: attncc faster). TFLOP/s: 4·B·H·D per visited (query, key) "
        "pair (all N² pairs; N(N+1)/2 causal) / time. max abs diff: of the outputs, in float32.",
    ]
    for causal in (False, True):
        mode = "causal" if causal else "bidirectional"
        section.targets.append(target_line(f"dense {mode}: attncc >= 1.00x {sdpa_label(setup)} at every N", 1.0,
                                           vs_sdpa[causal]))
        section.targets.append(target_line(f"dense {mode}: attncc >= 1.15x {flex_label(setup)} at every N", 1.15,
                                           vs_flex[causal]))
    return section


def section_sparse(setup: Setup, baselines: Baselines) -> Section:
    section = Section("sparse", "attncc sparse softmax variants vs FlexAttention with the same block mask and vs "
                                "the FLOP bound",
                      ["variant", "N", "method", "ms", "TFLOP/s", "attncc speedup", "ideal speedup",
                       "achieved speedup", "of ideal", "max abs diff vs attncc", "1st call s", "notes"])
    kinds = (("local", True), ("neighborhood", False), ("block_sparse", False))
    fraction: dict[str, dict[int, Optional[float]]] = {kind: {} for kind, _ in kinds}
    vs_flex: dict[str, dict[int, Optional[float]]] = {kind: {} for kind, _ in kinds}
    dense_at: dict[str, dict[int, str]] = {kind: {} for kind, _ in kinds}
    groups = {kind: [] for kind, _ in kinds}
    for n in setup.sizes:
        q, k, v = inputs(setup, n)
        for kind, causal in kinds:
            text = {"local": setup.local, "neighborhood": neighborhood_text(setup, n),
                    "block_sparse": setup.bigbird}[kind]
            mode = "causal" if causal else "bidirectional"
            print(f"  sparse N={n} {text} {mode}", flush=True)
            try:
                flops = variant_flops(setup, text, n, causal)
                ideal = variant_flops(setup, "exact", n, causal) / flops
            except Exception as error:  # noqa: BLE001 - e.g. a kernel larger than this size's grid
                groups[kind].append([f"{text}, {mode}", f"{n:,}", "attncc", note_problem(f"{text} cost", error)]
                                    + [""] * 8)
                continue
            dense = baselines.get("attncc", q, k, v, causal)
            ours = measure(f"attncc {text}", attncc_method(q, k, v, text, causal), setup, probe=True)
            flex = measure(f"{flex_label(setup)} {text}", flex_method(q, k, v, text, causal, setup), setup)
            achieved = speedup(dense, ours)
            rows = groups[kind]
            rows.append([f"{text}, {mode}", f"{n:,}", "attncc", ours.time_cell(), tflops(flops, ours.ms), "",
                         times(ideal), times(achieved), "-" if achieved is None else f"{achieved / ideal:.0%}", "",
                         ours.first_cell(), ours.path])
            rows.append(["", f"{n:,}", "attncc exact (dense reference)", dense.time_cell(),
                         tflops(variant_flops(setup, "exact", n, causal), dense.ms), "", "", "", "", "",
                         dense.first_cell(), dense.path])
            rows.append(["", f"{n:,}", flex_label(setup), flex.time_cell(), tflops(flops, flex.ms),
                         times(speedup(flex, ours)), "", "", "", max_diff(flex, ours), flex.first_cell(), ""])
            if ideal >= 1.05:
                fraction[kind][n] = None if achieved is None else achieved / ideal
                vs_flex[kind][n] = speedup(flex, ours)
            else:
                dense_at[kind][n] = f"dense (ideal {ideal:.2f}x)"
            ours.out = flex.out = None
        baselines.forget_outputs()
        del q, k, v
        release(setup)
    for kind, _ in kinds:
        section.groups.append(groups[kind])
    grids = ", ".join(f"{size_label(n)}: {grid_for(n)[0]}x{grid_for(n)[1]}" for n in setup.sizes)
    section.context.append(f"neighborhood: kernel {setup.nat_kernel} x {setup.nat_kernel} over the N tokens as an "
                           f"H x W grid ({grids}), "
                           f"windows shifted inward at the borders (NATTEN's); block_sparse: BigBird-ITC's base "
                           f"layout (3 sliding, 2 global, 3 random blocks, seed 0)")
    section.notes = [
        "ideal speedup: FLOPs of dense attention with the same causality / FLOPs of the variant (the variant's own "
        "cost: visited pairs; whole visited blocks for block_sparse). achieved speedup: attncc exact ms / attncc "
        "variant ms; of ideal: achieved / ideal. attncc speedup (Flex rows): Flex ms / attncc variant ms. "
        "TFLOP/s: the variant's FLOPs / time (Flex runs the same mask).",
        "Targets hold at every N where the pattern skips work (ideal >= 1.05x); below that the variant is dense "
        "attention and section 1's targets apply. block_sparse has no target in the issue: reported only.",
    ]
    for kind in ("local", "neighborhood"):
        name = setup.local + ", causal" if kind == "local" else f"neighborhood(kernel={setup.nat_kernel})"
        section.targets.append(target_line(f"{name} >= 85% of the FLOP-bound speedup", 0.85, fraction[kind],
                                           percent=True, skipped=dense_at[kind]))
        section.targets.append(target_line(f"{name} >= 1.30x {flex_label(setup)} (same block mask)", 1.3,
                                           vs_flex[kind], skipped=dense_at[kind]))
    return section


def section_topk(setup: Setup, baselines: Baselines) -> Section:
    section = Section("topk", f"attncc `{setup.topk}` (block selection included) vs dense SDPA, bidirectional",
                      ["N", "method", "ms", "TFLOP/s", "attncc speedup", "ideal speedup", "1st call s", "notes"])
    vs_sdpa: dict[int, Optional[float]] = {}
    for n in setup.sizes:
        q, k, v = inputs(setup, n)
        print(f"  topk N={n}", flush=True)
        flops = variant_flops(setup, setup.topk, n, False)
        dense_flops = variant_flops(setup, "exact", n, False)
        ours = measure(f"attncc {setup.topk}", attncc_method(q, k, v, setup.topk, False), setup, probe=True)
        sdpa = baselines.get("sdpa", q, k, v, False)
        group = section.add_group()
        group.append([f"{n:,}", "attncc", ours.time_cell(), tflops(flops, ours.ms), "",
                      times(dense_flops / flops), ours.first_cell(), ours.path])
        group.append([f"{n:,}", sdpa_label(setup), sdpa.time_cell(), tflops(dense_flops, sdpa.ms),
                      times(speedup(sdpa, ours)), "", sdpa.first_cell(), "dense"])
        vs_sdpa[n] = speedup(sdpa, ours)
        ours.out = None
        baselines.forget_outputs()
        del q, k, v
        release(setup)
    section.notes = [
        "TFLOP/s of attncc: the variant's cost (attention over the kept blocks plus pooling and block scoring) / "
        "time. ideal speedup: dense FLOPs / that cost. attncc speedup: SDPA ms / attncc ms.",
    ]
    largest = max(GPU_SIZES)
    section.targets.append(at_size_line(f"{setup.topk} >= 6x {sdpa_label(setup)} at N={largest}", 6.0, vs_sdpa,
                                        largest))
    return section


def section_linear(setup: Setup, baselines: Baselines) -> Section:
    section = Section("linear", f"attncc `{setup.linear}`, causal, vs flash-linear-attention's chunk kernel and "
                                f"causal SDPA",
                      ["N", "method", "ms", "TFLOP/s", "attncc speedup", "max abs diff vs attncc", "1st call s",
                       "notes"])
    fla = fla_chunk_linear_attn() if setup.cuda else None
    fla_note = "needs CUDA" if not setup.cuda else ("fla not installed" if fla is None else "")
    vs_fla: dict[int, Optional[float]] = {}
    vs_sdpa: dict[int, Optional[float]] = {}
    for n in setup.sizes:
        q, k, v = inputs(setup, n)
        print(f"  linear N={n}", flush=True)
        flops = variant_flops(setup, setup.linear, n, True)
        ours = measure(f"attncc {setup.linear}", attncc_method(q, k, v, setup.linear, True), setup, probe=True)
        other = (measure("fla chunk_linear_attn", fla_method(q, k, v, fla), setup) if fla is not None
                 else Measured(note=fla_note))
        sdpa = baselines.get("sdpa", q, k, v, True)
        group = section.add_group()
        group.append([f"{n:,}", "attncc", ours.time_cell(), tflops(flops, ours.ms), "", "", ours.first_cell(),
                      ours.path])
        group.append([f"{n:,}", "fla chunk_linear_attn (elu+1 features)", other.time_cell(), tflops(flops, other.ms),
                      times(speedup(other, ours)), max_diff(other, ours), other.first_cell(), ""])
        group.append([f"{n:,}", f"{sdpa_label(setup)}, causal", sdpa.time_cell(),
                      tflops(variant_flops(setup, "exact", n, True), sdpa.ms), times(speedup(sdpa, ours)), "",
                      sdpa.first_cell(), "softmax, not the same function"])
        vs_fla[n] = speedup(other, ours)
        vs_sdpa[n] = speedup(sdpa, ours)
        ours.out = other.out = None
        baselines.forget_outputs()
        del q, k, v
        release(setup)
    section.notes = [
        "fla: fla.ops.linear_attn.chunk_linear_attn on elu(x)+1 features of q and k (computed inside the timed "
        "call), scale 1, normalize=True: the function attncc computes; inputs laid out [B, N, H, D] once, untimed. "
        "TFLOP/s of both: attncc's linear cost / time; of SDPA: causal softmax FLOPs / time.",
    ]
    largest = max(GPU_SIZES)
    if fla is None:
        section.targets.append(f"target {setup.linear} causal >= 1.00x fla at N={largest}: not measured ({fla_note})")
    else:
        section.targets.append(at_size_line(f"{setup.linear} causal >= 1.00x fla at N={largest}", 1.0, vs_fla,
                                            largest))
    section.targets.append(at_size_line(f"{setup.linear} causal >= 8x causal {sdpa_label(setup)} at N={largest}",
                                        8.0, vs_sdpa, largest))
    return section


def section_e2e(setup: Setup, baselines: Baselines) -> Section:
    import attncc
    from transformers import AutoModel, LlamaConfig

    n = setup.e2e_tokens
    config = LlamaConfig(**setup.e2e_llama)
    c = setup.e2e_llama
    section = Section("e2e", f"Llama-shaped LlamaModel, {n:,} tokens, batch 1: the original (transformers SDPA) vs "
                             f"attncc.compile",
                      ["model", "ms", "speedup vs original", "compile s", "1st call s", "attention sites",
                       "max abs diff vs original", "notes"])
    section.context.append(
        f"LlamaConfig(num_hidden_layers={c['num_hidden_layers']}, hidden_size={c['hidden_size']}, "
        f"num_attention_heads={c['num_attention_heads']}, num_key_value_heads={c['num_key_value_heads']}, "
        f"intermediate_size={c['intermediate_size']}, vocab_size={c['vocab_size']}), random weights (seed 0), "
        f"{str(setup.dtype).replace('torch.', '')}, eval, torch.no_grad, input_ids with an attention_mask of ones, "
        f"use_cache=False")
    print(f"  e2e: building the model, {n} tokens", flush=True)
    torch.manual_seed(0)
    model = AutoModel.from_config(config, attn_implementation="sdpa").to(device=setup.device, dtype=setup.dtype)
    model.eval()
    ids = torch.randint(0, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0)).to(setup.device)
    # An attention_mask of ones (nothing padded) as a tokenizer gives it: with input_ids alone, transformers 5
    # builds a mask that attncc reads as document segments, which local attention declines. No KV cache: a plain
    # forward is what is compared.
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}

    def hidden(out) -> Tensor:
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    original = measure("original (transformers SDPA)", lambda: (lambda: hidden(model(**example))), setup)
    rows = [["original (transformers SDPA)", original.time_cell(), "", "", original.first_cell(), "", "", ""]]
    for policy in ("exact", setup.e2e_policy):
        name = f"attncc.compile(model, {policy!r})"
        compiled: dict = {}

        def prepare(policy=policy, compiled=compiled):
            torch._dynamo.reset()
            start = time.perf_counter()
            cm = attncc.compile(model, policy, example_inputs=example, measure_error=False)
            compiled["s"] = time.perf_counter() - start
            compiled["cm"] = cm
            return lambda: hidden(cm(**example))

        ours = measure(name, prepare, setup, probe=True)
        sites = "-"
        if "cm" in compiled:
            try:
                found = compiled["cm"].report().sites
                sites = f"{len(found)}: " + ", ".join(sorted({s.variant for s in found}))
            except Exception as error:  # noqa: BLE001
                sites = note_problem(f"{name} report", error)
        rows.append([name, ours.time_cell(), times(speedup(original, ours)),
                     f"{compiled['s']:.1f}" if "s" in compiled else "-", ours.first_cell(), sites,
                     max_diff(ours, original), ours.path])
        ours.out = None
        compiled.clear()
        release(setup)
    section.groups.append(rows)
    section.notes = [
        "ms: one forward (last_hidden_state), median. compile s: attncc.compile with the example inputs "
        "(capture and rewrite, measure_error=False), untimed. max abs diff: of last_hidden_state; local attention "
        "is an approximation, so its difference is not an error.",
    ]
    del model
    original.out = None
    release(setup)
    return section


def section_method(setup: Setup, command: str) -> Section:
    """What every table shares: where, with what, how timed (rewritten with each run)."""
    section = Section("method", "Generated by benchmarks/kernels.py.", [])
    if setup.smoke:
        section.context.append("**SMOKE RUN** (CPU tensors, Triton's interpreter, tiny sizes): these numbers say "
                               "nothing about performance.")
    section.context += [
        f"Last run: `{command}`",
        f"{environment_line()}",
        f"Kernel sections: {setup.shape_line()}; N = {', '.join(size_label(n) for n in setup.sizes)}; q, k, v from "
        f"N(0, 1); attncc through `attncc.attention(q, k, v, variant=..., causal=...)` with "
        f"ATTNCC_BACKEND={os.environ.get('ATTNCC_BACKEND', '')}.",
        "Timing: " + ("`triton.testing.do_bench` (warmup 25 ms, rep 100 ms), median ms, after one untimed first "
                      "call (compilation, autotuning, Flex's torch.compile: the `1st call s` column)."
                      if setup.cuda else
                      f"time.perf_counter, median of {setup.cpu_repeats} call(s) after one untimed first call."),
        "A row that failed shows `error: ...`; one out of GPU memory `OOM: skipped`. Each section records the "
        "environment of the run that wrote it.",
    ]
    return section


SECTIONS: dict[str, Callable[[Setup, Baselines], Section]] = {
    "dense": section_dense, "sparse": section_sparse, "topk": section_topk, "linear": section_linear,
    "e2e": section_e2e,
}


# ------------------------------------------------------------------------------------------------ document


BLOCK = re.compile(r"<!-- section (\w+) -->\n(.*?)<!-- /section \1 -->\n?", re.DOTALL)

DEFAULT_INTRO = """# Kernel benchmarks

attncc's Triton kernels against SDPA (flash), FlexAttention and flash-linear-attention on one GPU, and a
Llama-shaped model end to end. Regenerate on a CUDA machine with `python benchmarks/kernels.py` (`--quick`: 4K and
32K only); everything below the marker line is written by that script.
"""


def write_document(path: Path, sections: list[Section]) -> None:
    """Rewrite the generated part of ``path``: the hand-written intro (above the marker) stays, each section
    block written by this run replaces its old block, blocks of sections this run did not run stay."""
    old = path.read_text() if path.exists() else ""
    if MARKER in old:
        intro, generated = old.split(MARKER, 1)
    else:  # a new file (the smoke run's temporary one): the intro of the repository's document
        template = DOCUMENT.read_text() if DOCUMENT.exists() else ""
        intro = template.split(MARKER, 1)[0] if MARKER in template else DEFAULT_INTRO
        generated = ""
    blocks = {m.group(1): m.group(2) for m in BLOCK.finditer(generated)}
    for section in sections:
        blocks[section.key] = section_markdown(section)
    body = [f"<!-- section {key} -->\n{blocks[key].rstrip()}\n<!-- /section {key} -->\n"
            for key in SECTION_ORDER if key in blocks]
    text = intro.rstrip() + "\n\n" + MARKER + "\n\n" + ("\n".join(body) if body else NO_RUN_YET + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 4K and 32K only")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU in Triton's interpreter (a smoke test; writes no real doc)")
    parser.add_argument("--sizes", help="sequence lengths, comma-separated (overrides --quick)")
    parser.add_argument("--sections", default=",".join(KERNEL_SECTIONS),
                        help=f"comma-separated subset of {','.join(KERNEL_SECTIONS)}")
    parser.add_argument("--out", help="markdown file to write (default docs/benchmarks.md on a GPU; a temporary "
                                      "file with --smoke)")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(KERNEL_SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}: choose from {', '.join(KERNEL_SECTIONS)}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (none found); run it with --smoke for the CPU smoke test")
        return 2
    if args.smoke:
        # Before anything defines a kernel: Triton picks the interpreter when a kernel is defined.
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["ATTNCC_BACKEND"] = "triton"
        default_sizes = (64, 128)
    else:
        os.environ.setdefault("ATTNCC_BACKEND", "triton")
        default_sizes = QUICK_SIZES if args.quick else GPU_SIZES
    sizes = tuple(int(x) for x in args.sizes.split(",")) if args.sizes else default_sizes
    setup = smoke_setup(sizes) if args.smoke else gpu_setup(sizes)

    if args.out:
        out = Path(args.out).resolve()
    elif args.smoke:
        handle, name = tempfile.mkstemp(prefix="attncc-benchmarks-smoke-", suffix=".md")
        os.close(handle)
        out = Path(name)
    else:
        out = DOCUMENT
    if args.smoke and out == DOCUMENT.resolve():
        print(f"--smoke never writes {DOCUMENT.relative_to(REPO)} (its numbers say nothing): give another --out")
        return 2

    command = "python benchmarks/kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"attncc kernel benchmark{' (--smoke: CPU, Triton interpreter, numbers mean nothing)' if args.smoke else ''}")
    print(environment_line())
    print(f"{setup.shape_line()}; N = {', '.join(map(str, setup.sizes))}; sections {', '.join(args.sections)}; "
          f"ATTNCC_BACKEND={os.environ['ATTNCC_BACKEND']}; writing {out}", flush=True)
    start = time.perf_counter()
    baselines = Baselines(setup)
    written = [section_method(setup, command.strip())]  # written with the first section that completes
    with torch.no_grad():
        for key in args.sections:
            t0 = time.perf_counter()
            print(f"section {key}", flush=True)
            try:
                section = SECTIONS[key](setup, baselines)
            except Exception as error:  # noqa: BLE001 - a section that cannot even start (imports, model build)
                section = Section(key, note_problem(f"section {key}", error), [])
            shapes = "" if key == "e2e" else f"; {setup.shape_line()}"  # the model has its own sizes
            section.context.insert(0, f"{environment_line()}{shapes}"
                                      + ("; SMOKE RUN (numbers mean nothing)" if setup.smoke else ""))
            section.notes.append(f"Section time: {time.perf_counter() - t0:.0f} s.")
            print_section(section)
            written.append(section)
            write_document(out, written)  # after every section: a run cut short keeps what it measured
    print(f"total {time.perf_counter() - start:.0f} s; wrote {out}")
    if PROBLEMS:
        print(f"{len(PROBLEMS)} row(s) failed:")
        for problem in PROBLEMS:
            print(problem)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
