"""How much memory a model may still take, for refusing sizes up front instead of dying in the allocator."""

from __future__ import annotations

import os
from typing import Optional


def available_memory_bytes() -> Optional[int]:
    """Bytes of host memory available to new allocations (``MemAvailable``, capped by a cgroup v2 limit);
    None where neither can be read, and callers then skip their estimate."""
    available = _meminfo_available()
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = None
    limit = _cgroup_headroom()
    if limit is not None:
        available = limit if available is None else min(available, limit)
    return available


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom() -> Optional[int]:
    """memory.max - memory.current of this process's cgroup (v2): what a container still lets it take."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            text = f.read().strip()
        if text == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return max(0, int(text) - int(f.read().strip()))
    except (OSError, ValueError):
        return None


def format_bytes(count: float) -> str:
    """``1.5 GB``-style text (powers of 1000, as memory sizes are quoted in error messages)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"
