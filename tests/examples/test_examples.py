"""Every script in examples/ runs under ``--smoke`` (tiny sizes) and exits 0: the examples users copy stay true.

Each script is imported from its file and its ``main(argv)`` is called in this process (importing torch and
transformers once for all of them); a script that needs a fresh process (export, then load) starts one itself.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))


def test_examples_exist():
    assert len(SCRIPTS) >= 5, [p.name for p in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_example_runs_under_smoke(script, capsys):
    spec = importlib.util.spec_from_file_location(f"example_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)), f"{script.name} has no main(argv)"
    assert "--smoke" in script.read_text(), f"{script.name} takes no --smoke"
    status = module.main(["--smoke"])
    out = capsys.readouterr().out
    assert status == 0, out[-2000:]
    assert "attention sites" in out, f"{script.name} printed no report:\n{out[-2000:]}"
