"""``attncc bench``: the original model and each policy on the user's model, side by side, at several lengths.

Per sequence length, in one process: the original model and one compiled model per policy are built on the same
weights and inputs, warmed up, then timed in interleaved rounds (every round runs each model once, in a rotating
order), so machine noise hits all of them alike; the median of the rounds is reported. Each policy's main output
tensor is compared with the original's (cosine, max abs error), its attention FLOPs come from its report, and its
peak memory is measured on its own (see :func:`measure_peak_memory`).

The efficiency length of a policy is the shortest measured length at which its median time beats the original's
and at every longer one (the CAB benchmark's crossover); ``None`` when no measured length reaches it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

from attncc import progress
from attncc.errors import AttnccError

ORIGINAL = "original"
"""The name of the unmodified model's rows."""

SCORE_COPIES = 3
"""How many fp32 ``[B, H, N, N]`` tensors one eagerly written attention holds at its peak (the scores, their
masked copy, the probabilities); used to refuse lengths at which the original cannot fit, before running it."""

MEMORY_MARGIN = 0.7
"""Fraction of the available memory a length may be estimated to take before it is refused."""


@dataclass
class BenchRow:
    """One model (the original or a policy) at one length."""

    seq_len: int
    model: str
    """``"original"`` or the policy's text."""
    status: str = "ok"
    """``"ok"``, or why this length was not measured (``"does not fit in memory: ..."``)."""
    median_ms: Optional[float] = None
    times_ms: list[float] = field(default_factory=list)
    speedup: Optional[float] = None
    """Original's median time / this model's median time (>1: faster, <1: slower), measured."""
    cosine: Optional[float] = None
    """Cosine of this model's main output tensor against the original's (flattened)."""
    max_abs_error: Optional[float] = None
    attn_flops: Optional[int] = None
    """Attention FLOPs summed over sites, counted from shapes (the report's before for the original, after for a
    policy); None where a count is symbolic or missing."""
    peak_memory_bytes: Optional[int] = None
    """Peak memory of one forward above the memory held before it (see BenchResult.memory_method)."""
    memory_note: str = ""
    """Why the memory was not measured, when it was not."""


@dataclass
class BenchResult:
    """Everything one ``attncc bench`` run measured, with the conditions it ran under."""

    model: str
    description: str
    policies: list[str]
    seq_lens: list[int]
    batch: int
    repeat: int
    device: str
    memory_method: str
    rows: list[BenchRow] = field(default_factory=list)
    efficiency_length: dict[str, Optional[int]] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain JSON types: the settings, ``rows`` and ``efficiency_length`` (policy -> length or null)."""
        return asdict(self)

    def table(self):
        """The rows as a rich Table (one block of rows per length)."""
        from rich.table import Table
        from rich.text import Text

        env = self.environment  # Text, not markup: a spec such as hf:llama:... is no emoji code
        table = Table(title=Text(f"attncc bench {self.model}: batch {self.batch}, median of {self.repeat} "
                                 f"interleaved runs, {self.device}, torch {env.get('torch')}, {env.get('threads')} "
                                 f"threads"), title_justify="left",
                      caption=Text(f"time and speedup: measured wall time of one forward. cosine / max abs error: "
                                   f"main output tensor vs the original's. attn GFLOP: attention FLOPs counted from "
                                   f"shapes (not measured). peak memory: {self.memory_method}."),
                      caption_justify="left")
        for name in ("tokens", "model", "median ms", "measured speedup", "cosine vs original", "max abs error",
                     "attn GFLOP", "peak memory MB"):
            table.add_column(name, justify="left" if name == "model" else "right", overflow="fold")
        for length in self.seq_lens:
            rows = [row for row in self.rows if row.seq_len == length]
            for position, row in enumerate(rows):
                cells = _cells(row) if row.status == "ok" or position == 0 else (row.model, "not run (see above)")
                table.add_row(str(length) if position == 0 else "", *map(Text, cells),
                              end_section=position == len(rows) - 1)
        return table

    def efficiency_lines(self) -> list[str]:
        """One sentence per policy: its efficiency length, or the longest length it was measured at."""
        measured = [row.seq_len for row in self.rows if row.model == ORIGINAL and row.status == "ok"]
        lines = []
        for policy in self.policies:
            length = self.efficiency_length.get(policy)
            if length is not None:
                lines.append(f"efficiency length of {policy}: {length} tokens (the shortest measured length from "
                             f"which on it beats the original)")
            elif measured:
                lines.append(f"efficiency length of {policy}: not reached up to {max(measured)} tokens")
            else:
                lines.append(f"efficiency length of {policy}: no length could be measured")
        return lines


def run_bench(spec: str, policies: Sequence[str], seq_lens: Sequence[int], *, batch: int = 1, repeat: int = 5,
              attn: str = "eager", device: str = "cpu", memory: bool = True) -> BenchResult:
    """Benchmark ``spec`` (an ``attncc.models.load_model`` spec) under each policy at each length.

    Args:
        spec: ``demo``, ``hf:llama``, ... (a model that takes a sequence length: token ids ``[batch, N]``).
        policies: policy texts or rules files, each compared with the original model.
        seq_lens: token counts N, measured in increasing order.
        repeat: timed rounds per length (each round runs every model once).
        device: ``"cpu"`` or ``"cuda"``.
        memory: measure peak memory (CPU: one subprocess per model and length; CUDA: in process).

    Each length is captured afresh (``torch._dynamo.reset()`` before it), so other ``torch.compile`` d code in the
    process compiles again after a bench.

    Returns a BenchResult; a length that does not fit in memory is a row saying so. Raises AttnccError for a
    model that does not take a sequence length, an unknown device, or a policy or model that fails.
    """
    from attncc.policy import as_policy

    if not policies:
        raise AttnccError("bench needs at least one --policy to compare with the original")
    for policy in policies:
        as_policy(policy)  # a bad policy is one error before any model is built
    device = _check_device(device)
    lengths = sorted(set(seq_lens))
    first = _load(spec, lengths[0], batch, attn)  # a bad spec, or a model without lengths, fails here
    result = BenchResult(model=spec, description=first.description, policies=list(policies), seq_lens=lengths,
                         batch=batch, repeat=repeat, device=device, memory_method=memory_method(device, memory),
                         environment=environment())
    del first
    sites = None  # the sites of the first length measured, for the memory estimate of longer ones
    with progress.steps(f"bench {spec}", total=len(lengths) * (len(policies) + 1)) as step:
        for length in lengths:
            rows, report = bench_length(spec, list(policies), length, batch=batch, repeat=repeat, attn=attn,
                                        device=device, memory=memory, step=step, sites=sites)
            result.rows.extend(rows)
            sites = sites or report
    result.efficiency_length = {p: efficiency_length(result.rows, p) for p in policies}
    return result


def bench_length(spec: str, policies: list[str], length: int, *, batch: int, repeat: int, attn: str,
                 device: str, memory: bool, step: Optional[progress.Steps] = None, sites=None):
    """``(rows, report)`` of one length: the original's row first, then each policy's (all "does not fit"
    rows when it does not), and the first policy's report (None when nothing ran).

    ``sites``: a report of the same model at another length; when given, a length at which the original's
    attention scores would not fit in the memory available is refused before anything runs.
    """
    names = [ORIGINAL, *policies]
    step = step or progress.Steps("", None, visible=False, lazy=True)
    refusal = None if sites is None or device != "cpu" else memory_refusal(sites, batch, length)
    if refusal is not None:
        step.advance(f"{length} tokens: does not fit", amount=len(names))
        return [BenchRow(length, name, status=refusal) for name in names], None
    try:
        step.describe(f"{length} tokens: building and compiling")
        models, outputs, reports, inputs = _prepare(spec, policies, length, batch, attn, device)
        step.describe(f"{length} tokens: timing {len(names)} models")
        times = time_interleaved([_caller(models[name], inputs) for name in names], repeat)
    except Exception as error:
        reason = _memory_reason(error)
        if reason is None:
            raise
        step.advance(f"{length} tokens: does not fit", amount=len(names))
        return [BenchRow(length, name, status=reason) for name in names], None
    rows = measured_rows(length, names, times, outputs, reports)
    del models, outputs
    for row in rows:
        if memory:
            step.describe(f"{length} tokens: peak memory of {row.model}")
            row.peak_memory_bytes, row.memory_note = measure_peak_memory(
                spec, None if row.model == ORIGINAL else row.model, length, batch=batch, attn=attn, device=device)
        step.advance(f"{length} tokens, {row.model}")
    return rows, reports[policies[0]]


def measured_rows(length: int, names: list[str], times: list[list[float]], outputs: dict, reports: dict):
    """The rows of one length from the timed rounds (seconds), the outputs and the reports, keyed by name."""
    rows = []
    for name, runs in zip(names, times):
        row = BenchRow(length, name, median_ms=statistics.median(runs) * 1e3, times_ms=[t * 1e3 for t in runs])
        rows.append(row)
        row.speedup = rows[0].median_ms / row.median_ms if row.median_ms > 0 else None
        if name == ORIGINAL:
            row.attn_flops = _flops_sum(next(iter(reports.values())), "flops_before") if reports else None
        else:
            row.cosine, row.max_abs_error = compare_outputs(outputs[ORIGINAL], outputs[name])
            row.attn_flops = _flops_sum(reports[name], "flops_after")
    return rows


def _prepare(spec, policies, length, batch, attn, device):
    """Build the original and one compiled model per policy at ``length`` on ``device``; run each once (the
    compile captures, the extra call warms up). Returns (models, outputs, reports, inputs) keyed by name."""
    import torch

    import attncc
    from attncc.cli.common import call_model

    # Dynamo would capture a second length with dynamic sizes (automatic dynamic shapes): forgetting the earlier
    # captures makes every length a first capture, with static sizes and FLOPs that are numbers, as a user's is
    torch._dynamo.reset()
    loaded = _load(spec, length, batch, attn)
    model, inputs = loaded.model.to(device), _to_device(loaded.example_inputs, device)
    models, outputs, reports = {ORIGINAL: model}, {}, {}
    outputs[ORIGINAL] = call_model(model, inputs)
    for policy in policies:
        models[policy] = _compiled(attncc, model, policy, inputs)
        reports[policy] = models[policy].report()
        outputs[policy] = call_model(models[policy], inputs)
    return models, outputs, reports, inputs


def _compiled(attncc, model, policy, inputs):
    """``attncc.compile`` with a capture failure as one AttnccError (out of memory passes through)."""
    from attncc.cli.common import first_line, out_of_memory, root_cause

    try:
        return attncc.compile(model, policy, example_inputs=inputs)
    except AttnccError:
        raise
    except Exception as error:
        if out_of_memory(error) is not None:
            raise
        cause = root_cause(error)
        raise AttnccError(f"could not capture the model under {policy}: {type(cause).__name__}: "
                          f"{first_line(cause)}") from error


def memory_refusal(report, batch: int, length: int) -> Optional[str]:
    """Why ``length`` is not run (the original's estimated attention memory is above MEMORY_MARGIN of what is
    available), or None."""
    from attncc.models.memory import available_memory_bytes, format_bytes

    need, available = estimate_original_bytes(report, batch, length), available_memory_bytes()
    if available is None or need <= MEMORY_MARGIN * available:
        return None
    return (f"does not fit in memory: the original's attention scores need about {format_bytes(need)} "
            f"(estimated, not run), more than {MEMORY_MARGIN:.0%} of the {format_bytes(available)} available")


def estimate_original_bytes(report, batch: int, length: int) -> int:
    """Bytes the original's largest explicitly written attention holds at ``length`` tokens: SCORE_COPIES fp32
    ``[batch, heads, N, N]`` tensors (SDPA sites are left out: PyTorch's fused kernels do not hold them)."""
    heads = [s.q_heads for s in report.sites if s.source == "explicit" and isinstance(s.q_heads, int)]
    return SCORE_COPIES * 4 * batch * max(heads, default=0) * length * length


def _caller(model, inputs) -> Callable[[], Any]:
    from attncc.cli.common import call_model

    return lambda: call_model(model, inputs)


def time_interleaved(calls: Sequence[Callable[[], Any]], repeat: int) -> list[list[float]]:
    """Seconds of each call in ``repeat`` rounds; every round runs every call once, starting one further along
    each round, so a slow moment of the machine is shared out instead of landing on one model."""
    import torch

    times: list[list[float]] = [[] for _ in calls]
    for round_ in range(repeat):
        for offset in range(len(calls)):
            index = (round_ + offset) % len(calls)
            _synchronize(torch)
            start = time.perf_counter()
            calls[index]()
            _synchronize(torch)
            times[index].append(time.perf_counter() - start)
    return times


def _synchronize(torch) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def compare_outputs(reference, candidate) -> tuple[float, float]:
    """(cosine, max abs error) of the main output tensors (float64, flattened)."""
    import torch

    from attncc.cli.common import main_tensor

    a = main_tensor(reference).detach().double().flatten().cpu()
    b = main_tensor(candidate).detach().double().flatten().cpu()
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0)) if a.numel() else 1.0
    return cosine, float((a - b).abs().max()) if a.numel() else 0.0


def efficiency_length(rows: Sequence[BenchRow], policy: str) -> Optional[int]:
    """The shortest measured length from which on ``policy``'s median time is below the original's at every
    longer measured length (CAB's crossover; a lone win below a loss is noise, not a crossover), or None.
    Lengths that did not run are left out."""
    measured = sorted((r for r in rows if r.model == policy and r.status == "ok" and r.speedup is not None),
                      key=lambda r: r.seq_len)
    length = None
    for row in reversed(measured):
        if row.speedup <= 1.0:
            break
        length = row.seq_len
    return length


def speedup_text(speedup: Optional[float]) -> str:
    """``2.31x faster`` / ``0.42x (2.4x slower)``: a slower model is never called faster."""
    if speedup is None:
        return "-"
    if speedup >= 1.0:
        return f"{speedup:.2f}x faster" if speedup >= 1.005 else f"{speedup:.2f}x (same)"
    return f"{speedup:.2f}x ({1 / speedup:.2f}x slower)"


# ------------------------------------------------------------------------------------------ peak memory


MALLOC_RETURNS_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
"""glibc settings of the memory subprocess: every block of 64 KiB or more is its own mapping, unmapped when
freed, and the heap is trimmed at every free, so the warm-up run's memory goes back to the system and the
measured run's high-water mark is its own (without them, the measured run reuses the warm-up's freed memory and
its RSS barely moves)."""


def memory_method(device: str, memory: bool = True) -> str:
    """What the peak memory column holds, in words, on ``device``."""
    if not memory:
        return "not measured (--no-memory)"
    if device.startswith("cuda"):
        return "torch.cuda.max_memory_allocated during one forward, above the memory allocated before it"
    if _can_reset_peak_rss():
        return ("process RSS high-water (VmHWM) during one forward, above the RSS before it, in a fresh subprocess "
                "per model and length")
    return "process RSS high-water (ru_maxrss) of a fresh subprocess per model and length, whole run (this " \
           "kernel cannot reset the high-water mark)"


def measure_peak_memory(spec: str, policy: Optional[str], length: int, *, batch: int, attn: str,
                        device: str) -> tuple[Optional[int], str]:
    """(peak bytes of one forward of the original (policy None) or the compiled model, "") or (None, why not).

    On CPU it runs in a fresh subprocess, so neither the other models nor memory the allocator kept from earlier
    runs hide or inflate it. On CUDA it runs in this process (the caching allocator counts exactly).
    """
    request = {"spec": spec, "policy": policy, "seq_len": length, "batch": batch, "attn": attn, "device": device}
    if device.startswith("cuda"):
        try:
            return peak_memory_of(request), ""
        except Exception as error:
            return None, _memory_reason(error) or f"failed: {type(error).__name__}"
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this attncc, not another install
    env = dict(os.environ, ATTNCC_QUIET="1", **MALLOC_RETURNS_MEMORY,
               PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
    command = [sys.executable, "-c", "import sys; from attncc.bench import memory_child; memory_child(sys.argv[1])",
               json.dumps(request)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=os.getcwd())
    if done.returncode < 0:
        return None, f"subprocess killed by signal {-done.returncode} (out of memory?)"
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = done.stderr.strip().splitlines()
        return None, f"subprocess failed: {tail[-1] if tail else done.returncode}"
    return answer.get("peak_bytes"), answer.get("error", "")


def memory_child(request_json: str) -> None:
    """Entry point of the memory subprocess: prints ``{"peak_bytes": int}`` or ``{"error": "..."}``."""
    request = json.loads(request_json)
    try:
        print(json.dumps({"peak_bytes": peak_memory_of(request)}))
    except Exception as error:
        print(json.dumps({"peak_bytes": None, "error": _memory_reason(error) or
                          f"failed: {type(error).__name__}: {error}".splitlines()[0]}))


def peak_memory_of(request: dict) -> int:
    """Build the model of ``request``, compile it (unless policy is None), run it once to warm up, then return
    the peak memory of one more forward above the memory held before it."""
    import torch

    import attncc
    from attncc.cli.common import call_model, quiet_capture

    with quiet_capture():
        loaded = _load(request["spec"], request["seq_len"], request["batch"], request["attn"])
        device = request["device"]
        model, inputs = loaded.model.to(device), _to_device(loaded.example_inputs, device)
        if request["policy"] is not None:
            model = attncc.compile(model, request["policy"], example_inputs=inputs, measure_error=False)
        call_model(model, inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            call_model(model, inputs)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before
        if not _can_reset_peak_rss():
            import resource

            call_model(model, inputs)
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        _reset_peak_rss()
        before = _status_bytes("VmRSS")
        call_model(model, inputs)
        return _status_bytes("VmHWM") - before


def _can_reset_peak_rss() -> bool:
    """Linux lets a process reset its own RSS high-water mark (``echo 5 > /proc/self/clear_refs``)."""
    try:
        _reset_peak_rss()
        return _status_bytes("VmHWM") > 0
    except (OSError, ValueError):
        return False


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as lines:
        for line in lines:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no {key} in /proc/self/status")


# ------------------------------------------------------------------------------------------- helpers


def _load(spec: str, length: int, batch: int, attn: str):
    """``load_model`` at ``length`` (or a factory file's ``factory(seq_len=, ...)``), refusing a model whose inputs
    do not follow the length (a ViT, a factory with fixed inputs)."""
    import torch

    from attncc.models import load_model

    loaded = _load_sized_factory(spec, length, batch, attn) or load_model(spec, seq_len=length, batch=batch, attn=attn)
    inputs = loaded.example_inputs
    tensors = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    if not any(isinstance(t, torch.Tensor) and not t.is_floating_point() and tuple(t.shape) == (batch, length)
               for t in tensors):
        shapes = ", ".join(f"[{', '.join(map(str, t.shape))}]" for t in tensors if isinstance(t, torch.Tensor))
        raise AttnccError(f"{spec} does not take a sequence length (its inputs are {shapes or 'not tensors'}, not "
                          f"token ids [{batch}, {length}]); bench measures text models: demo, hf:MODEL_TYPE of a "
                          f"text model, hf:LOCAL_DIR, or path/to/file.py:factory with factory(seq_len=...)")
    return loaded


def _load_sized_factory(spec: str, length: int, batch: int, attn: str):
    """For ``path/to/file.py:factory`` whose factory takes ``seq_len`` (and optionally ``batch``, ``attn``):
    ``LoadedModel`` of ``factory(seq_len=length, ...)``; None for any other spec (``load_model`` handles it)."""
    import inspect

    from attncc.models import LoadedModel
    from attncc.models.zoo import _import_file

    path, sep, name = spec.rpartition(":")
    if not (sep and path.endswith(".py") and os.path.isfile(path)):
        return None
    factory = getattr(_import_file(path), name, None)
    if not callable(factory) or "seq_len" not in inspect.signature(factory).parameters:
        return None
    accepted = inspect.signature(factory).parameters
    sizes = {key: value for key, value in (("seq_len", length), ("batch", batch), ("attn", attn)) if key in accepted}
    model, inputs = factory(**sizes)
    return LoadedModel(model.eval(), inputs, f"{spec}({', '.join(f'{k}={v}' for k, v in sizes.items())})")


def _to_device(inputs, device: str):
    if isinstance(inputs, dict):
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
    return tuple(v.to(device) if hasattr(v, "to") else v for v in inputs)


def _check_device(device: str) -> str:
    import torch

    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AttnccError(f"--device {device}: no CUDA GPU is available to this process")
        return device
    raise AttnccError(f"unknown device {device!r}; use cpu or cuda")


def _memory_reason(error: BaseException) -> Optional[str]:
    """``"does not fit in memory: ..."`` when ``error`` says memory ran out (or would), else None."""
    from attncc.cli.common import first_line, out_of_memory

    memory = out_of_memory(error)
    if memory is not None:
        return f"does not fit in memory: {type(memory).__name__}: {first_line(memory)}"
    if isinstance(error, AttnccError) and "memory available" in str(error):  # an up-front estimate said so
        return f"does not fit in memory: {first_line(error)}"
    return None


def _flops_sum(report, column: str) -> Optional[int]:
    values = [getattr(site, column) for site in report.sites]
    return sum(values) if all(isinstance(v, int) for v in values) else None


def _cells(row: BenchRow) -> tuple[str, ...]:
    if row.status != "ok":
        return (row.model, row.status, "", "", "", "", "")
    original = row.model == ORIGINAL
    return (row.model, f"{row.median_ms:.1f}", "1.00x (reference)" if original else speedup_text(row.speedup),
            "-" if original else f"{row.cosine:.6f}", "-" if original else f"{row.max_abs_error:.2e}",
            "-" if row.attn_flops is None else f"{row.attn_flops / 1e9:.3g}",
            _megabytes(row.peak_memory_bytes) if row.peak_memory_bytes is not None else (row.memory_note or "-"))


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f}" if count >= 50_000 else "< 0.1"


def environment() -> dict[str, Any]:
    """Where and when the run happened: date (UTC), host CPU, torch/transformers/attncc versions, threads, and the
    1-minute load average at the start (other work on the machine makes every time noisier)."""
    import torch

    import attncc

    try:
        import transformers

        hf = transformers.__version__
    except ImportError:
        hf = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": hf, "attncc": getattr(attncc, "__version__", None), "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as lines:
            for line in lines:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
