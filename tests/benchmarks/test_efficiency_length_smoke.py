"""Smoke test of ``benchmarks/efficiency_length.py``: ``--smoke`` (32 and 64 tokens, one round) runs the same code
as the real run, so a broken script is found here; checked: exit status 0, both tables, the markdown summary with
the device line and the efficiency length sentence. Timings are not asserted. About 20-40 s on 2 cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "efficiency_length.py"


def test_smoke_run_prints_the_tables():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--attn", "eager", "--no-memory"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "local(window=256)" in out and "measured speedup" in out
    assert "| eager | 32 |" in out and "| eager | 64 |" in out
    assert "torch " in out and "LlamaModel (hidden_size=256" in out
    assert "efficiency length of local(window=256):" in out
