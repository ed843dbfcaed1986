"""Smoke test of the GPU kernel benchmark (``benchmarks/kernels.py``) on the CPU.

``--smoke`` runs every section of the benchmark at tiny sizes in Triton's interpreter through the same code as the
GPU run, so a broken section is found here rather than on a rented GPU. The script runs in a subprocess (it sets
``TRITON_INTERPRET`` before any kernel is defined, and must not leak that into this process) with a private
kernel cache; what is checked is its exit status (0: every row ran), that the document it wrote has every
section, and that it left the repository's ``docs/benchmarks.md`` alone. About 15-30 s on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "kernels.py"
DOCUMENT = REPO / "docs" / "benchmarks.md"

HEADINGS = (
    "## 1. Dense and causal attention",
    "## 2. Sparse softmax: local, neighborhood, block-sparse",
    "## 3. Top-k block attention",
    "## 4. Causal linear attention",
    "## 5. End to end: Llama-shaped model",
)


@pytest.mark.slow
def test_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "benchmarks.md"
    before = DOCUMENT.read_text() if DOCUMENT.exists() else None
    env = dict(os.environ, ATTNCC_CACHE_DIR=str(tmp_path / "kernel-cache"), HF_HUB_OFFLINE="1")
    env.pop("ATTNCC_ASSERT_CACHE_HIT", None)
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    log = f"stdout (tail):\n{run.stdout[-6000:]}\nstderr (tail):\n{run.stderr[-3000:]}"
    assert run.returncode == 0, f"exit status {run.returncode}\n{log}"

    text = out.read_text()
    for heading in HEADINGS:
        assert heading in text, f"{heading!r} missing from the document\n{log}"
    assert "SMOKE RUN" in text
    assert "| error:" not in text, log  # no failed row (the exit status says so too)
    # every attncc row ran the Triton kernels (in the interpreter), not the PyTorch fallback
    assert "torch path" not in text, log
    assert (DOCUMENT.read_text() if DOCUMENT.exists() else None) == before, "the smoke run wrote docs/benchmarks.md"


def test_smoke_refuses_to_write_the_real_document():
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(DOCUMENT), "--sections", "dense"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "never writes" in run.stdout
