"""The header every benchmark table carries: device, versions, threads, date."""

from __future__ import annotations

import datetime
import platform

import torch


def environment_line() -> str:
    """One line naming where and with what a benchmark ran."""
    import attncc

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "-"
    return (f"{device} | torch {torch.__version__} | triton {triton_version} | attncc {attncc.__version__} | "
            f"python {platform.python_version()} | {datetime.date.today().isoformat()}")
