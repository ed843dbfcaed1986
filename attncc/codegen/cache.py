"""The kernel cache: generated Triton sources and autotuning results, in memory and on disk.

An entry is one JSON file ``<dir>/<kind>/<key>.json`` holding a ``descriptor`` (what was generated: family,
spec, dtypes, head dims, flags, GPU architecture, Triton/attncc/generator versions), a ``payload`` (the
generated module source, or a tuned config) and ``sha256``, the hash of descriptor and payload together.
``key`` is the hash of the descriptor alone, so a warm process finds its entry without generating anything.
Because the descriptor carries a fingerprint of the generator code itself (``attncc.codegen.fingerprint``), a
given key always stands for the same generated source.

* Writes are atomic: a temp file in the same folder, fsync, ``os.replace``. Several processes writing the
  same entry at once each replace it with a complete, identical file; a reader never sees half a file.
* Reads are verified: an entry whose hash, key or descriptor does not match is treated as missing (and
  rebuilt by the caller), never returned. Loaded sources run from the verified bytes (``codegen.source``),
  never re-read from disk.

Environment: ``ATTNCC_CACHE_DIR`` (default: the user's cache folder, ``~/.cache/attncc`` on Linux),
``ATTNCC_DISABLE_CACHE=1`` (no disk reads or writes; the in-memory cache still works within a process),
``ATTNCC_ASSERT_CACHE_HIT=1`` (generating, tuning or compiling anything raises :class:`CacheMissError`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from attncc.errors import AttnccError

KINDS = ("kernel", "tuning")
"""Entry kinds: a generated kernel module's source, and the autotuner's choice for one kernel and length."""


_ENTRY_NAME = re.compile(r"[0-9a-f]{32}\.json")
_TEMP_NAME = re.compile(r"\.[0-9a-f]{32}\..*\.tmp")
TRITON_MARKER = ".created-by-attncc"
"""Written into ``<cache>/triton`` when attncc points Triton's cache there (so ``clear`` may remove it)."""


class CacheMissError(AttnccError):
    """Something had to be generated, tuned or compiled while ``ATTNCC_ASSERT_CACHE_HIT=1``."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def cache_dir() -> Path:
    """``ATTNCC_CACHE_DIR``, or the platform's user cache folder for attncc."""
    configured = os.environ.get("ATTNCC_CACHE_DIR", "").strip()
    if configured:
        return Path(configured).expanduser()
    try:
        import platformdirs
    except ImportError:  # a bare environment (attncc run from a checkout): the XDG convention
        return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "attncc"
    return Path(platformdirs.user_cache_dir("attncc", appauthor=False))


def disk_enabled() -> bool:
    """False when ``ATTNCC_DISABLE_CACHE`` is set."""
    return not _flag("ATTNCC_DISABLE_CACHE")


def hits_required() -> bool:
    """True when ``ATTNCC_ASSERT_CACHE_HIT`` is set."""
    return _flag("ATTNCC_ASSERT_CACHE_HIT")


def require_miss_allowed(what: str) -> None:
    """Raise :class:`CacheMissError` naming ``what`` when cache hits are required."""
    if hits_required():
        raise CacheMissError(
            f"ATTNCC_ASSERT_CACHE_HIT is set but {what} (cache folder {cache_dir()}); warm the cache first "
            f"or unset ATTNCC_ASSERT_CACHE_HIT")


def descriptor_key(descriptor: dict) -> str:
    """The entry key of a descriptor: sha256 of its canonical JSON, 32 hex digits."""
    return hashlib.sha256(_canonical(descriptor)).hexdigest()[:32]


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def _content_hash(descriptor: dict, payload: Any) -> str:
    return hashlib.sha256(_canonical({"descriptor": descriptor, "payload": payload})).hexdigest()


@dataclass(frozen=True)
class Entry:
    """A verified cache entry."""

    kind: str
    key: str
    descriptor: dict
    payload: Any
    sha256: str
    path: Optional[Path]
    """Where it lies on disk; None for an entry that only lives in memory (disk cache disabled)."""


class KernelCache:
    """Entries by (kind, key), in a process-wide memory table backed by ``root`` on disk."""

    def __init__(self, root: Optional[Path] = None):
        self._root = root
        self._memory: dict[tuple[str, str, str], Entry] = {}  # (folder, kind, key)
        self._lock = threading.Lock()
        self._warned = False

    @property
    def root(self) -> Path:
        return self._root if self._root is not None else cache_dir()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.json"

    # ------------------------------------------------------------------------------------- lookups

    def get(self, kind: str, descriptor: dict) -> Optional[Entry]:
        """The verified entry for ``descriptor``, from memory or disk; None when missing or invalid."""
        key = descriptor_key(descriptor)
        entry = self._memory.get((str(self.root), kind, key))
        if entry is not None:
            return entry
        if not disk_enabled():
            return None
        entry = self.read(kind, key)
        if entry is None or entry.descriptor != json.loads(_canonical(descriptor)):
            return None
        with self._lock:
            self._memory[(str(self.root), kind, key)] = entry
        return entry

    def get_or_create(self, kind: str, descriptor: dict, build: Callable[[], Any], what: str) -> Entry:
        """The entry for ``descriptor``; on a miss ``build()`` makes the payload (JSON-able), which is stored.

        ``what`` names the work for :class:`CacheMissError` ("generating kernel attn_fwd_...").
        """
        entry = self.get(kind, descriptor)
        if entry is not None:
            return entry
        require_miss_allowed(what)
        return self.put(kind, descriptor, build())

    def put(self, kind: str, descriptor: dict, payload: Any) -> Entry:
        """Store ``payload`` under ``descriptor`` (memory always, disk unless disabled) and return the entry."""
        if kind not in KINDS:
            raise AttnccError(f"cache: unknown entry kind {kind!r}")
        descriptor = json.loads(_canonical(descriptor))  # what a reader will see (tuples become lists)
        key = descriptor_key(descriptor)
        digest = _content_hash(descriptor, payload)
        path = None
        if disk_enabled():
            path = self.path(kind, key)
            record = {"kind": kind, "key": key, "descriptor": descriptor, "payload": payload, "sha256": digest}
            try:
                _atomic_write(path, _canonical(record))
            except OSError as error:  # a read-only or full disk: work on, from memory only
                path = None
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"attncc: cannot write the kernel cache in {self.root} ({error}); kernels stay "
                                  f"in memory for this process (set ATTNCC_CACHE_DIR to a writable folder)")
        entry = Entry(kind, key, descriptor, payload, digest, path)
        with self._lock:
            self._memory[(str(self.root), kind, key)] = entry
        return entry

    def read(self, kind: str, key: str) -> Optional[Entry]:
        """The entry stored on disk under ``key`` if it verifies (hash, key and kind match); else None."""
        path = self.path(kind, key)
        try:
            record = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or not verify_record(record, kind, key):
            return None
        return Entry(kind, key, record["descriptor"], record["payload"], record["sha256"], path)

    # -------------------------------------------------------------------------------- maintenance

    def entries(self) -> list[tuple[Path, Optional[Entry]]]:
        """Every entry file on disk with its verified entry (None where it fails verification)."""
        found = []
        for kind in KINDS:
            folder = self.root / kind
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob("*.json")):
                found.append((path, self.read(kind, path.stem)))
        return found

    def clear(self) -> int:
        """Delete every entry, and Triton's compiled binaries where attncc put them under this folder; returns
        the number of entries removed.

        Only what attncc wrote goes: entry files (``<kind>/<32 hex digits>.json`` and unfinished temp files) and
        ``triton/`` when its marker says attncc created it. Other files, even in those folders, stay (the folder
        may be one the user shares with other things).
        """
        removed = 0
        for kind in KINDS:
            folder = self.root / kind
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if _ENTRY_NAME.fullmatch(path.name) or _TEMP_NAME.fullmatch(path.name):
                    removed += path.suffix == ".json"
                    path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        triton_dir = self.root / "triton"
        if (triton_dir / TRITON_MARKER).is_file():
            shutil.rmtree(triton_dir, ignore_errors=True)
        with self._lock:
            self._memory.clear()
        return removed

    def forget_memory(self) -> None:
        """Drop the in-memory table (tests use this to act like a fresh process)."""
        with self._lock:
            self._memory.clear()
            self._warned = False


def verify_record(record: dict, kind: str, key: str) -> bool:
    """True when an entry file's content is intact: right kind and key, and its hash matches."""
    try:
        descriptor, payload = record["descriptor"], record["payload"]
        return (record.get("kind") == kind and record.get("key") == key == descriptor_key(descriptor)
                and record.get("sha256") == _content_hash(descriptor, payload))
    except (KeyError, TypeError):
        return False


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


_DEFAULT: Optional[KernelCache] = None


def default_cache() -> KernelCache:
    """The process-wide cache (its folder follows ``ATTNCC_CACHE_DIR`` at each use)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = KernelCache()
    return _DEFAULT
