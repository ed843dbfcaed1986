"""The time model: how long one attention site takes under a variant, measured on this machine and cached.

``TimeModel(device).seconds("topk(block=16, density=0.25)", shape)`` times ``attncc.attention(q, k, v,
variant=..., mask=..., causal=...)`` on random inputs of ``shape`` (an :class:`AttentionShape`), on the backend
the runtime would pick for them (``attncc.runtime.dispatch.backend_for``), and returns the median of the timed
runs. Each (variant, shape, device, backend, versions) is measured once: the result is kept in memory and on disk
as one JSON file per entry, ``<attncc cache dir>/timing/<key>.json`` (the kernel cache's folder:
``ATTNCC_CACHE_DIR``, else the user cache folder; ``ATTNCC_DISABLE_CACHE=1`` keeps it in memory only). Files are
written atomically (a temp file in the same folder, then a rename), so a reader never sees half an entry.

What a measurement excludes: everything that happens once. Before timing, each candidate runs ``warmup`` times
untimed; the first of those runs is where the runtime generates, compiles and autotunes a Triton kernel (and
where torch's own first-call work happens), so the timed runs see only the kernel. When several variants are
timed together (:meth:`TimeModel.measure`), their timed runs are interleaved, round by round, so machine noise
(other processes, clock changes) hits all of them alike. On CUDA each run is bracketed by CUDA events after a
synchronize; on CPU by ``time.perf_counter``.

What it does not capture: the inputs are random, so a data-dependent variant (top-k, vertical-slash) selects
from random scores. Its work is set by its parameters (a density, a count), not by the data, so the time is
representative, but a variant whose work depends on the data (a cumulative-mass threshold) is timed at what it
selects on random inputs. Padding is one contiguous run of masked keys at the end of every row.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union
from unittest import mock

import torch

from attncc.errors import AttnccError

TIMING_FORMAT = 1
"""Bumped when what a timing entry means changes (how inputs are made, how runs are timed)."""


@dataclass(frozen=True)
class AttentionShape:
    """The sizes of one attention call: q ``[batch, q_heads, q_len, head_dim]``, k ``[batch, kv_heads, kv_len,
    head_dim]``, v ``[batch, kv_heads, kv_len, value_dim]``, in ``dtype`` (a torch dtype name, ``"float32"``);
    ``padding``: the fraction of each row's keys that are padding (masked out), 0 for none."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    causal: bool = False
    dtype: str = "float32"
    padding: float = 0.0

    def __post_init__(self) -> None:
        sizes = ("batch", "q_heads", "kv_heads", "q_len", "kv_len", "head_dim", "value_dim")
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AttnccError(f"AttentionShape: {name} must be a positive integer, got {value!r}")
        if self.q_heads % self.kv_heads:
            raise AttnccError(f"AttentionShape: q_heads ({self.q_heads}) must be a multiple of kv_heads "
                              f"({self.kv_heads})")
        if not 0.0 <= self.padding < 1.0:
            raise AttnccError(f"AttentionShape: padding must be a fraction in [0, 1), got {self.padding!r}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise AttnccError(f"AttentionShape: dtype must name a torch dtype ('float32', 'bfloat16'), got "
                              f"{self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def padded_keys(self) -> int:
        """Masked keys at the end of each row: ``round(kv_len * padding)``, leaving at least one real key."""
        return min(self.kv_len - 1, round(self.kv_len * self.padding))


class TimeModel:
    """Measured seconds of attention variants at given shapes on ``device``, cached on disk.

    Args:
        device: where to time (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``).
        backend: ``"torch"`` or ``"triton"`` to time that backend (set as ``ATTNCC_BACKEND`` while timing); None:
            the one the runtime picks for tensors on ``device``.
        cache_dir: the cache folder; entries go to ``<cache_dir>/timing`` (default: the kernel cache's folder,
            see the module docstring).
        warmup: untimed runs before timing (default 2; the first compiles what needs compiling).
        repeat: timed runs per variant (default 5 on CPU, 20 on CUDA); the median is the time.
    """

    def __init__(self, device: Union[str, torch.device] = "cpu", backend: Optional[str] = None,
                 cache_dir: Union[str, Path, None] = None, *, warmup: int = 2, repeat: Optional[int] = None):
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise AttnccError(f"TimeModel: not a device: {device!r} ({error})") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise AttnccError("TimeModel: device cuda asked for, but torch sees no CUDA GPU")
        if backend not in (None, "torch", "triton"):
            raise AttnccError(f"TimeModel: backend must be 'torch', 'triton' or None (the runtime's choice), "
                              f"got {backend!r}")
        self.backend = backend
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.warmup = max(1, int(warmup))
        self.repeat = max(1, int(repeat if repeat is not None else (20 if self.device.type == "cuda" else 5)))
        self._memory: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------- queries
    def seconds(self, variant: str, shape: AttentionShape) -> float:
        """Median seconds of one ``attncc.attention`` call of ``variant`` on inputs of ``shape`` (measured once,
        then read from the cache)."""
        return self.measure([variant], shape)[_canonical_variant(variant)]

    def exact_seconds(self, shape: AttentionShape) -> float:
        """``seconds("exact", shape)``."""
        return self.seconds("exact", shape)

    def per_head_seconds(self, variant: str, shape: AttentionShape, heads: int) -> float:
        """The share of ``heads`` of the site's ``q_heads`` query heads: ``seconds(variant, shape) * heads /
        q_heads``. An approximation: it assumes the time is spread evenly over the heads, which holds for
        attention's per-head work but not for the fixed cost of a call (launch, selection setup), so a few heads
        cost a little more than this says."""
        if not 0 <= heads <= shape.q_heads:
            raise AttnccError(f"per_head_seconds: heads must be in 0..{shape.q_heads}, got {heads}")
        return self.seconds(variant, shape) * heads / shape.q_heads

    def measure(self, variants: Sequence[str], shape: AttentionShape) -> dict[str, float]:
        """Seconds of each variant (keyed by its canonical text) at ``shape``: cached ones are read, the others
        are timed together with their runs interleaved, then stored."""
        texts = list(dict.fromkeys(_canonical_variant(v) for v in variants))
        keys = {text: self.key(text, shape) for text in texts}
        found = {text: self._cached(keys[text]) for text in texts}
        missing = [text for text, seconds in found.items() if seconds is None]
        if missing:
            with self._backend_selected():
                calls = {text: _attention_call(text, shape, self.device) for text in missing}
                try:
                    timed = measure_seconds(calls, self.device, warmup=self.warmup, repeat=self.repeat)
                except AttnccError as error:
                    raise AttnccError(f"cannot time {', '.join(missing)} at {shape}: {error}") from error
            for text in missing:
                found[text] = timed[text]
                self._store(keys[text], self.descriptor(text, shape), timed[text])
        return found

    # -------------------------------------------------------------------------------------------- keys
    def descriptor(self, variant: str, shape: AttentionShape) -> dict:
        """What one timing depends on: the variant text, the shape, the device, the backend, the versions of
        torch, Triton and attncc (and a hash of attncc's variant, runtime and kernel code)."""
        return {"format": TIMING_FORMAT, "variant": _canonical_variant(variant), "shape": asdict(shape),
                "device": device_name(self.device), "backend": self.backend_name(), **versions()}

    def key(self, variant: str, shape: AttentionShape) -> str:
        """The cache key (32 hex digits) of a timing: the hash of its :meth:`descriptor`."""
        text = json.dumps(self.descriptor(variant, shape), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def backend_name(self) -> str:
        """The backend the timed calls run on: ``self.backend``, or the runtime's choice for this device."""
        if self.backend is not None:
            return self.backend
        from attncc.runtime.dispatch import backend_for

        return backend_for(torch.empty(0, device=self.device))

    # ------------------------------------------------------------------------------------------- cache
    def folder(self) -> Path:
        """Where the entries lie: ``<cache_dir>/timing``, ``cache_dir`` defaulting to the kernel cache's folder."""
        if self.cache_dir is not None:
            return self.cache_dir / "timing"
        from attncc.codegen.cache import cache_dir

        return cache_dir() / "timing"

    def _cached(self, key: str) -> Optional[float]:
        if key in self._memory:
            return self._memory[key]
        from attncc.codegen.cache import disk_enabled

        if not disk_enabled():
            return None
        try:
            record = json.loads((self.folder() / f"{key}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # missing or unreadable: measure again (and replace it)
        if not isinstance(record, dict) or record.get("key") != key:
            return None
        seconds = record.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            return None
        self._memory[key] = float(seconds)
        return float(seconds)

    def _store(self, key: str, descriptor: dict, seconds: float) -> None:
        self._memory[key] = seconds
        from attncc.codegen.cache import disk_enabled

        if not disk_enabled():
            return
        record = {"key": key, "descriptor": descriptor, "seconds": seconds}
        try:
            atomic_write_json(self.folder() / f"{key}.json", record)
        except OSError:
            pass  # a read-only or full disk: the timing stays in memory for this process

    @contextmanager
    def _backend_selected(self) -> Iterator[None]:
        """``ATTNCC_BACKEND`` set to ``self.backend`` for the block (the runtime reads it at each call)."""
        if self.backend is None:
            yield
            return
        with mock.patch.dict(os.environ, {"ATTNCC_BACKEND": self.backend}):
            yield


def measure_seconds(calls: dict[str, Callable[[], object]], device: torch.device, *, warmup: int,
                    repeat: int) -> dict[str, float]:
    """Median seconds of each call: ``warmup`` untimed runs of each, then ``repeat`` rounds that run every call
    once each (interleaved); CUDA runs are timed with events after a synchronize."""
    with torch.no_grad():
        for call in calls.values():
            for _ in range(warmup):
                call()
        runs: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeat):
            for name, call in calls.items():
                runs[name].append(_time_once(call, device))
    return {name: statistics.median(times) for name, times in runs.items()}


def _time_once(call: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _attention_call(variant: str, shape: AttentionShape, device: torch.device) -> Callable[[], object]:
    """A call of ``attncc.attention`` with ``variant`` on random inputs of ``shape`` (made once, here)."""
    from attncc.runtime.ops import attention

    generator = torch.Generator().manual_seed(0)

    def random(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator).to(device=device, dtype=shape.torch_dtype)

    q = random(shape.batch, shape.q_heads, shape.q_len, shape.head_dim)
    k = random(shape.batch, shape.kv_heads, shape.kv_len, shape.head_dim)
    v = random(shape.batch, shape.kv_heads, shape.kv_len, shape.value_dim)
    mask = None
    if shape.padded_keys:
        mask = torch.ones(shape.batch, 1, 1, shape.kv_len, dtype=torch.bool, device=device)
        mask[..., shape.kv_len - shape.padded_keys:] = False
    return lambda: attention(q, k, v, variant=variant, mask=mask, causal=shape.causal)


def _canonical_variant(text: str) -> str:
    from attncc.variants.parse import parse_variant

    return str(parse_variant(text))


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    """What the timing of ``device`` depends on: the GPU's name and compute capability, or the CPU's model and
    torch's thread count."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda {torch.cuda.get_device_name(index)} sm{major}{minor}"
    return f"{device.type} {_cpu_model()} {torch.get_num_threads()} threads"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def versions() -> dict:
    """torch, Triton (None when absent) and attncc versions, and a hash of the attncc code a timing runs."""
    import attncc

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "attncc": attncc.__version__,
            "attncc_code": _code_hash()}


def _code_hash() -> str:
    """A hash of attncc's variant, runtime and kernel-generator sources: a change there times again."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in ("variants", "runtime", "codegen"):
        for path in sorted((root / folder).glob("*.py")):
            digest.update(f"{folder}/{path.name}".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def atomic_write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` through a temp file in the same folder and ``os.replace``: a reader
    sees the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
