"""Suite-wide: tests marked ``gpu`` run only where a CUDA GPU is present; without one, Triton kernels run in
Triton's CPU interpreter.

TRITON_INTERPRET must be set before ``triton`` is first imported (Triton's own library functions are
decorated at import, interpreted or not), so it is set here, before any test module imports anything.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite runs on as many workers as cores (README: -n 2): one torch thread each, not two workers
    # fighting over both cores
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
