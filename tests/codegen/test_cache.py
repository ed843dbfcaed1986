"""The kernel cache: verified entries, atomic concurrent writes, warm starts, and the switches that control it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attncc.codegen import autotune
from attncc.codegen.autotune import Config, choose
from attncc.codegen.cache import CacheMissError, KernelCache, default_cache, descriptor_key
from attncc.codegen.source import clear_loaded, load_kernel

sys.path.insert(0, str(Path(__file__).parent))
import cache_worker  # noqa: E402

WORKER = Path(__file__).parent / "cache_worker.py"


def _entries(folder: Path, kind: str = "kernel") -> list[Path]:
    return sorted((folder / kind).glob("*.json"))


def _worker(folder: Path, tag: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "ATTNCC_CACHE_DIR": str(folder), "TRITON_INTERPRET": "1", **env}
    return subprocess.run([sys.executable, str(WORKER), tag], env=environ, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "cache"))
    default_cache().forget_memory()
    clear_loaded()
    yield tmp_path / "cache"
    default_cache().forget_memory()
    clear_loaded()


def _fresh_process_state():
    default_cache().forget_memory()
    clear_loaded()


def test_entry_round_trip_and_verification(folder):
    cache = KernelCache(folder)
    entry = cache.put("kernel", {"family": "x", "dims": (16, 32)}, {"source": "print('hi')\n"})
    assert entry.path == folder / "kernel" / f"{descriptor_key({'family': 'x', 'dims': [16, 32]})}.json"
    fresh = KernelCache(folder)
    again = fresh.get("kernel", {"family": "x", "dims": [16, 32]})
    assert again is not None and again.payload == {"source": "print('hi')\n"} and again.sha256 == entry.sha256
    assert fresh.get("kernel", {"family": "y"}) is None


@pytest.mark.parametrize("damage", ["altered-source", "truncated", "not-json", "swapped-key"])
def test_damaged_entry_is_treated_as_missing(folder, damage):
    cache = KernelCache(folder)
    entry = cache.put("kernel", {"family": "x"}, {"source": "x = 1\n"})
    path = entry.path
    record = json.loads(path.read_text())
    if damage == "altered-source":
        record["payload"]["source"] = "x = 2\n"
        path.write_text(json.dumps(record))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:20])
    elif damage == "not-json":
        path.write_text("garbage")
    else:
        record["key"] = "0" * 32
        path.write_text(json.dumps(record))
    assert KernelCache(folder).get("kernel", {"family": "x"}) is None


def test_altered_kernel_is_rebuilt_never_run(folder, tmp_path):
    cache_worker.run("alter")
    [path] = _entries(folder)
    marker = tmp_path / "executed"
    record = json.loads(path.read_text())
    # what an attacker or a disk error might leave: different code under the old hash
    record["payload"]["source"] = f"open({str(marker)!r}, 'w').close()\n" + record["payload"]["source"]
    path.write_text(json.dumps(record))
    _fresh_process_state()
    cache_worker.run("alter")  # still correct: regenerated
    assert not marker.exists()
    rebuilt = json.loads(path.read_text())
    assert "executed" not in rebuilt["payload"]["source"]
    assert KernelCache(folder).get("kernel", rebuilt["descriptor"]) is not None


def test_second_process_with_assert_cache_hit_runs(folder):
    first = _worker(folder, "warm")
    assert first.returncode == 0 and first.stdout.strip() == "ok", first.stderr
    second = _worker(folder, "warm", ATTNCC_ASSERT_CACHE_HIT="1")
    assert second.returncode == 0 and second.stdout.strip() == "ok", second.stderr


def test_warm_start_of_the_attention_kernels(folder):
    first = _worker(folder, "attention")
    assert first.returncode == 0 and first.stdout.strip() == "ok", first.stderr
    assert len(_entries(folder)) == 2  # the dense-causal and the band kernel
    second = _worker(folder, "attention", ATTNCC_ASSERT_CACHE_HIT="1")
    assert second.returncode == 0 and second.stdout.strip() == "ok", second.stderr


def test_assert_cache_hit_fails_on_a_cold_cache(folder):
    cold = _worker(folder, "cold", ATTNCC_ASSERT_CACHE_HIT="1")
    assert cold.returncode == 3
    assert "ATTNCC_ASSERT_CACHE_HIT" in cold.stdout and "generating kernel add_one" in cold.stdout
    assert not _entries(folder)


def test_assert_cache_hit_in_process(folder, monkeypatch):
    monkeypatch.setenv("ATTNCC_ASSERT_CACHE_HIT", "1")
    with pytest.raises(CacheMissError, match="generating kernel add_one"):
        cache_worker.run("in-process")


def test_eight_processes_compile_the_same_kernel(folder):
    environ = {**os.environ, "ATTNCC_CACHE_DIR": str(folder), "TRITON_INTERPRET": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), "race"], env=environ, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert all(code == 0 and out.strip() == "ok" for out, _, code in results), results
    [entry] = _entries(folder)
    assert not [p for p in (folder / "kernel").iterdir() if p.suffix != ".json"]  # no temp files left
    record = json.loads(entry.read_text())
    assert KernelCache(folder).get("kernel", record["descriptor"]) is not None


def test_disable_cache_writes_nothing(folder, monkeypatch):
    monkeypatch.setenv("ATTNCC_DISABLE_CACHE", "1")
    cache_worker.run("disabled")
    assert not folder.exists() or not _entries(folder)


def test_unwritable_cache_folder_warns_and_runs_from_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(blocker))
    _fresh_process_state()
    with pytest.warns(UserWarning, match="cannot write the kernel cache"):
        cache_worker.run("unwritable")
    _fresh_process_state()
    assert blocker.read_text() == "a file where the cache folder should be"


def test_kernel_loaded_once_per_process(folder):
    calls = []

    def generate():
        calls.append(1)
        return cache_worker.generate("once")

    first = load_kernel("add_one", {"family": "cache-test", "tag": "once"}, generate, torch.device("cpu"))
    second = load_kernel("add_one", {"family": "cache-test", "tag": "once"}, generate, torch.device("cpu"))
    assert first is second and len(calls) == 1


def test_autotune_times_once_and_remembers(folder, monkeypatch):
    configs = [Config.of(4, 2, BLOCK_M=64), Config.of(8, 3, BLOCK_M=128), Config.of(4, 3, BLOCK_M=32)]
    timed = []
    cost = {64: 2.0, 128: 1.0, 32: 3.0}

    def timer(fn):
        fn()
        return cost[timed[-1]]

    def run(config):
        timed.append(config["BLOCK_M"])

    kernel = {"entry": "k", "family": "test"}
    best = choose(kernel, autotune.length_bucket(1000), configs, run, torch.device("cpu"), timer=timer)
    assert best["BLOCK_M"] == 128 and timed == [64, 128, 32]
    _fresh_process_state()
    again = choose(kernel, 1024, configs, run, torch.device("cpu"), timer=timer)
    assert again == best and len(timed) == 3  # read back from disk, not timed again
    [entry] = _entries(folder, "tuning")
    assert json.loads(entry.read_text())["payload"]["timings_ms"]
    monkeypatch.setenv("ATTNCC_ASSERT_CACHE_HIT", "1")
    with pytest.raises(CacheMissError, match="autotuning k at length bucket 4096"):
        choose(kernel, 4096, configs, run, torch.device("cpu"), timer=timer)


def test_autotune_skips_configs_that_fail(folder):
    configs = [Config.of(4, 2, BLOCK_M=256), Config.of(4, 2, BLOCK_M=64)]

    def run(config):
        if config["BLOCK_M"] == 256:
            raise RuntimeError("out of resources: shared memory")

    best = choose({"entry": "k2"}, 64, configs, run, torch.device("cpu"), timer=lambda fn: (fn(), 1.0)[1])
    assert best["BLOCK_M"] == 64


def test_length_bucket():
    assert [autotune.length_bucket(n) for n in (1, 2, 3, 1000, 1024, 1025)] == [1, 2, 4, 1024, 1024, 2048]
