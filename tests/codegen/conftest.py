"""Kernel tests run in Triton's CPU interpreter unless a CUDA GPU is present (``tests/conftest.py`` sets
TRITON_INTERPRET); with a GPU, the `gpu`-marked real-size tests run too."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "variants"))  # variant_helpers (random q/k/v, rel_rms)


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
