"""From generated Triton source to a launchable kernel, through the kernel cache.

A generator describes what it would generate as a JSON-able ``descriptor`` (family, spec text, dtypes, head
dims, flags) and a function that writes the module source. :func:`load_kernel` adds the environment (GPU
architecture or ``interpreter``, Triton and attncc versions, the generator fingerprint), looks the entry up in
the cache, generates and stores it only on a miss, and executes the verified source as a fresh module whose
``@triton.jit`` function it returns. Each kernel is loaded once per process (memory table).

The source runs from the verified text held in memory: its lines are registered with ``linecache`` under a
stable file name so Triton (which reads a kernel's source through ``inspect``) sees exactly what was verified,
even if the file on disk changes afterwards.
"""

from __future__ import annotations

import functools
import hashlib
import linecache
import os
import threading
import types
from pathlib import Path
from typing import Any, Callable

import torch

from attncc.codegen.cache import (
    TRITON_MARKER, default_cache, disk_enabled, hits_required, require_miss_allowed,
)

_LOADED: dict[str, Any] = {}
_LOAD_LOCK = threading.Lock()
_MEMOS: list[dict] = []


def process_memo() -> dict:
    """A dict for a launcher's per-process shortcuts (plan -> kernel and config); :func:`clear_loaded` empties
    it with the loaded kernels."""
    memo: dict = {}
    _MEMOS.append(memo)
    return memo


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0")


@functools.lru_cache(maxsize=None)
def fingerprint() -> str:
    """A hash of the code generators' own source (every module of ``attncc.codegen``): part of every key, so
    changing a generator never reuses kernels an older one wrote."""
    digest = hashlib.sha256()
    folder = Path(__file__).parent
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def architecture(device: torch.device) -> str:
    """``sm90``-style compute capability of a CUDA device; ``interpreter`` under TRITON_INTERPRET."""
    if interpreting() or device.type != "cuda":
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def environment(device: torch.device) -> dict:
    """What every kernel key carries besides the generator's own descriptor."""
    import triton

    import attncc

    return {"arch": architecture(device), "triton": triton.__version__, "attncc": attncc.__version__,
            "generator": fingerprint()}


def load_kernel(name: str, descriptor: dict, generate: Callable[[], str], device: torch.device):
    """The ``@triton.jit`` function ``name`` of the module ``generate()`` writes for ``descriptor``.

    ``descriptor`` must determine the source completely (generators put every choice they make into it).
    Raises CacheMissError when the source would be generated while ATTNCC_ASSERT_CACHE_HIT is set.
    """
    full = {"entry": name, **descriptor, "env": environment(device)}
    cache = default_cache()
    entry = cache.get_or_create("kernel", full, lambda: {"source": generate()}, what=f"generating kernel {name}")
    with _LOAD_LOCK:
        loaded = _LOADED.get(entry.sha256)
        if loaded is None:
            loaded = _execute(entry.payload["source"], entry.key, name)
            _LOADED[entry.sha256] = loaded
    _use_attncc_triton_cache()
    return loaded


def _execute(source: str, key: str, name: str):
    """Run verified module text as a new module and return its attribute ``name``."""
    module_name = f"attncc_kernel_{key}"
    filename = f"<attncc-kernel {key}>.py"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType(module_name)
    module.__file__ = filename
    exec(compile(source, filename, "exec"), module.__dict__)
    return getattr(module, name)


def _use_attncc_triton_cache() -> None:
    """Keep Triton's compiled binaries beside attncc's entries (``<cache>/triton``) unless the user chose a
    Triton cache folder; ``attncc cache clear`` then clears both."""
    if disk_enabled() and "TRITON_CACHE_DIR" not in os.environ:
        folder = default_cache().root / "triton"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / TRITON_MARKER).touch()
        except OSError:
            return  # an unwritable cache folder: Triton keeps its default
        os.environ["TRITON_CACHE_DIR"] = str(folder)


def _triton_cache_files() -> int:
    folder = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    return sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; with ATTNCC_ASSERT_CACHE_HIT on a GPU, a launch that made Triton
    compile (a new binary in its cache folder) raises CacheMissError."""
    if not hits_required() or interpreting():
        kernel[grid](*args, **kwargs)
        return
    before = _triton_cache_files()
    kernel[grid](*args, **kwargs)
    if _triton_cache_files() != before:
        require_miss_allowed(f"Triton compiled {getattr(kernel, '__name__', 'a kernel')}")


def clear_loaded() -> None:
    """Forget kernels loaded in this process (tests use it to act like a fresh process)."""
    with _LOAD_LOCK:
        _LOADED.clear()
        for memo in _MEMOS:
            memo.clear()
