"""The time model: each (variant, shape, ...) is timed once, cached on disk (atomically) and read back without
timing again; keys tell shapes, variants and backends apart; the timed call is the variant's op on inputs of the
shape (padding as a key mask); warmup runs come first and timed runs are interleaved."""

from __future__ import annotations

import json
import os

import pytest
import torch

from attncc.calibration import timing
from attncc.calibration.timing import AttentionShape, TimeModel, measure_seconds
from attncc.errors import AttnccError

SHAPE = AttentionShape(batch=1, q_heads=4, kv_heads=2, q_len=32, kv_len=32, head_dim=8, value_dim=8)


@pytest.fixture
def counted(monkeypatch):
    """Replace the timer: every call of measure_seconds is recorded, and variant i of it takes (i + 1) ms."""
    calls = []

    def fake(fns, device, *, warmup, repeat):
        calls.append(list(fns))
        return {name: 1e-3 * (i + 1) for i, name in enumerate(fns)}

    monkeypatch.setattr(timing, "measure_seconds", fake)
    monkeypatch.delenv("ATTNCC_DISABLE_CACHE", raising=False)
    return calls


def test_a_timing_is_measured_once_and_read_back(tmp_path, counted):
    model = TimeModel("cpu", cache_dir=tmp_path)
    assert model.seconds("topk(density=0.25, block=16)", SHAPE) == 1e-3
    assert counted == [["topk(block=16, density=0.25)"]]  # canonical text
    assert model.seconds("topk(block=16, density=0.25)", SHAPE) == 1e-3  # from memory
    fresh = TimeModel("cpu", cache_dir=tmp_path)  # as a new process: from disk
    assert fresh.seconds("topk(block=16,density=0.25)", SHAPE) == 1e-3
    assert fresh.exact_seconds(SHAPE) == 1e-3 and len(counted) == 2  # exact was not measured yet
    entries = sorted((tmp_path / "timing").iterdir())
    assert len(entries) == 2
    record = json.loads(entries[0].read_text())
    assert record["key"] == entries[0].stem and record["descriptor"]["shape"]["q_heads"] == 4
    assert {"torch", "triton", "attncc", "attncc_code", "device", "backend"} <= set(record["descriptor"])
    assert fresh.per_head_seconds("exact", SHAPE, 1) == pytest.approx(1e-3 / 4)


def test_only_what_is_missing_is_timed_together(tmp_path, counted):
    model = TimeModel("cpu", cache_dir=tmp_path)
    model.seconds("exact", SHAPE)
    found = model.measure(["exact", "local(window=8)", "topk(block=16, density=0.5)"], SHAPE)
    assert counted[1] == ["local(window=8)", "topk(block=16, density=0.5)"]
    assert found == {"exact": 1e-3, "local(window=8)": 1e-3, "topk(block=16, density=0.5)": 2e-3}


def test_keys_tell_shapes_variants_and_backends_apart(tmp_path):
    model = TimeModel("cpu", cache_dir=tmp_path)
    keys = {model.key("exact", SHAPE), model.key("local(window=8)", SHAPE), model.key("local(window=16)", SHAPE),
            model.key("exact", AttentionShape(1, 4, 2, 32, 64, 8, 8)),
            model.key("exact", AttentionShape(1, 4, 2, 32, 32, 8, 8, causal=True)),
            model.key("exact", AttentionShape(1, 4, 2, 32, 32, 8, 8, dtype="bfloat16")),
            model.key("exact", AttentionShape(1, 4, 2, 32, 32, 8, 8, padding=0.25)),
            TimeModel("cpu", backend="triton", cache_dir=tmp_path).key("exact", SHAPE)}
    assert len(keys) == 8
    assert model.key("local(window=8)", SHAPE) == model.key("local( window = 8 )", SHAPE)


def test_entries_are_written_atomically(tmp_path, counted, monkeypatch):
    model = TimeModel("cpu", cache_dir=tmp_path)
    model.seconds("exact", SHAPE)
    path = tmp_path / "timing" / f"{model.key('exact', SHAPE)}.json"
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(timing.os, "replace", failing_replace)
    with pytest.raises(OSError):
        timing.atomic_write_json(path, {"key": "other", "seconds": 9.0})
    assert path.read_bytes() == before  # the old entry, whole
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # the temp file is gone
    monkeypatch.undo()
    # an entry that does not verify (truncated, other key) is timed again and replaced
    path.write_text('{"key": "')
    monkeypatch.setattr(timing, "measure_seconds", lambda fns, device, **_: {name: 5e-3 for name in fns})
    assert TimeModel("cpu", cache_dir=tmp_path).seconds("exact", SHAPE) == 5e-3
    assert json.loads(path.read_text())["seconds"] == 5e-3


def test_disable_cache_writes_nothing(tmp_path, counted, monkeypatch):
    monkeypatch.setenv("ATTNCC_DISABLE_CACHE", "1")
    model = TimeModel("cpu", cache_dir=tmp_path)
    model.seconds("exact", SHAPE)
    model.seconds("exact", SHAPE)
    assert len(counted) == 1 and not (tmp_path / "timing").exists()


def test_the_timed_call_is_the_variant_on_inputs_of_the_shape(monkeypatch):
    seen = []

    def attention(q, k, v, variant, mask, causal):
        seen.append((q.shape, k.shape, v.shape, variant, None if mask is None else mask.clone(), causal))
        return q

    monkeypatch.setattr("attncc.runtime.ops.attention", attention)
    shape = AttentionShape(2, 4, 2, 16, 20, 8, 6, causal=True, padding=0.25)
    timing._attention_call("local(window=8)", shape, torch.device("cpu"))()
    q, k, v, variant, mask, causal = seen[0]
    assert (q, k, v) == ((2, 4, 16, 8), (2, 2, 20, 8), (2, 2, 20, 6)) and variant == "local(window=8)" and causal
    assert mask.shape == (2, 1, 1, 20) and mask.sum().item() == 2 * 15 and not mask[..., 15:].any()
    timing._attention_call("exact", SHAPE, torch.device("cpu"))()
    assert seen[1][4] is None  # no padding: no mask


def test_warmup_first_then_interleaved_rounds():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    found = measure_seconds(calls, torch.device("cpu"), warmup=2, repeat=3)
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert set(found) == {"a", "b"} and all(t >= 0 for t in found.values())


def test_a_real_measurement(tmp_path):
    seconds = TimeModel("cpu", cache_dir=tmp_path, warmup=1, repeat=2).measure(["exact", "local(window=8)"], SHAPE)
    assert all(0 < t < 10 for t in seconds.values())


@pytest.mark.parametrize("kwargs, says", [
    ({"q_heads": 3}, "multiple of kv_heads"),
    ({"q_len": 0}, "q_len must be a positive integer"),
    ({"padding": 1.0}, "padding must be a fraction"),
    ({"dtype": "float33"}, "dtype must name a torch dtype"),
])
def test_bad_shapes_are_one_error(kwargs, says):
    fields = dict(batch=1, q_heads=4, kv_heads=2, q_len=8, kv_len=8, head_dim=8, value_dim=8) | kwargs
    with pytest.raises(AttnccError, match=says):
        AttentionShape(**fields)


def test_bad_settings_are_one_error():
    with pytest.raises(AttnccError, match="backend must be"):
        TimeModel("cpu", backend="cuda")
    with pytest.raises(AttnccError, match="not a device"):
        TimeModel("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(AttnccError, match="no CUDA GPU"):
            TimeModel("cuda")


def test_the_default_folder_is_the_kernel_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    assert TimeModel("cpu").folder() == tmp_path / "timing"
    assert os.fspath(TimeModel("cpu", cache_dir=tmp_path / "x").folder()) == os.fspath(tmp_path / "x" / "timing")
