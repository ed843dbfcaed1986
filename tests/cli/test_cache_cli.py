"""``attncc cache list|info|clear`` on a private cache folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attncc.cli import main
from attncc.codegen.cache import KernelCache, default_cache


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "cache"))
    default_cache().forget_memory()
    store = KernelCache(tmp_path / "cache")
    store.put("kernel", {"entry": "attn_fwd", "variant": "local(window=8)", "dtype": "bfloat16",
                         "env": {"arch": "sm90"}}, {"source": "x = 1\n"})
    store.put("tuning", {"kernel": {"entry": "attn_fwd", "env": {"arch": "sm90"}}, "bucket": 4096},
              {"best": {"params": {"BLOCK_M": 128}, "num_warps": 8, "num_stages": 3}, "timings_ms": {}})
    yield tmp_path / "cache"
    default_cache().forget_memory()


def test_list_shows_entries_and_damage(folder, capsys):
    damaged = folder / "kernel" / ("f" * 32 + ".json")
    damaged.write_text("{}")
    assert main(["cache", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["folder"] == str(folder)
    by_status = {row["status"] for row in data["entries"]}
    assert by_status == {"ok", "damaged (will be rebuilt)"}
    kernel = next(r for r in data["entries"] if r["kind"] == "kernel" and r["status"] == "ok")
    assert kernel["entry"] == "attn_fwd" and kernel["arch"] == "sm90" and "local(window=8)" in kernel["what"]
    tuning = next(r for r in data["entries"] if r["kind"] == "tuning")
    assert "bucket=4096" in tuning["what"]
    assert main(["cache", "list"]) == 0
    assert "attn_fwd" in capsys.readouterr().out


def test_info_and_clear(folder, capsys):
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert f"folder:            {folder}" in out and "kernels:           1" in out
    assert "tuning results:    1" in out
    (folder / "notes.txt").write_text("the user's own file")
    (folder / "kernel" / "README").write_text("the user's file inside an entry folder")
    (folder / "triton").mkdir()
    (folder / "triton" / "model.bin").write_text("a folder attncc did not create")
    assert main(["cache", "clear"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    # only what attncc wrote goes
    assert (folder / "notes.txt").read_text() == "the user's own file"
    assert (folder / "kernel" / "README").exists() and (folder / "triton" / "model.bin").exists()
    assert not (folder / "tuning").exists()
    assert main(["cache", "list"]) == 0
    assert "no entries" in capsys.readouterr().out


def test_clear_removes_the_triton_binaries_attncc_put_there(folder, capsys):
    from attncc.codegen.cache import TRITON_MARKER

    (folder / "triton" / "abc123").mkdir(parents=True)
    (folder / "triton" / TRITON_MARKER).touch()
    (folder / "triton" / "abc123" / "kernel.cubin").write_bytes(b"\0")
    assert main(["cache", "clear"]) == 0
    assert not (folder / "triton").exists()


def test_cache_help_runs_as_a_script(folder):
    result = subprocess.run([sys.executable, "-m", "attncc", "cache", "info"], capture_output=True, text=True,
                            env={**os.environ, "ATTNCC_CACHE_DIR": str(folder)}, timeout=120)
    assert result.returncode == 0 and str(folder) in result.stdout


def test_unknown_cache_command_is_one_line_error(capsys):
    assert main(["cache", "purge"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attncc: error:")
