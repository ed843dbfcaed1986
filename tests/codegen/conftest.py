"""Kernel tests run Triton's CPU interpreter unless a CUDA GPU is present (then `gpu`-marked tests run too).

TRITON_INTERPRET must be set before any kernel is defined; generated kernels are defined when first loaded,
so setting it here, at collection, is early enough.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """Where small-size kernel tests run: the GPU when there is one, else CPU tensors in the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own kernel cache folder (never the user's)."""
    folder = tmp_path_factory.getbasetemp() / "attncc-cache"
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(folder))
    monkeypatch.delenv("ATTNCC_ASSERT_CACHE_HIT", raising=False)
    monkeypatch.delenv("ATTNCC_DISABLE_CACHE", raising=False)
