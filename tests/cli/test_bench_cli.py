"""``attncc bench``: the original and each policy side by side at each length (tiny lengths, one round), as a
table and as JSON; lengths that do not fit are rows, models without a length one error line; and the helpers
that decide what the table says (speedup wording, efficiency length)."""

from __future__ import annotations

import io
import json

import pytest

from attncc import bench
from attncc.bench import BenchRow, efficiency_length, speedup_text
from attncc.cli import main


def one_error_line(capfd) -> str:
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bench_demo_prints_the_table(capsys):
    assert main(["bench", "demo", "-p", "local(window=8)", "--seq-len", "32", "--repeat", "1", "--no-memory"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for column in ("tokens", "median ms", "measured speedup", "cosine vs original", "max abs error", "attn GFLOP",
                   "peak memory MB"):
        assert column in out
    assert "original" in out and "local(window=8)" in out and "1.00x (reference)" in out
    assert "efficiency length of local(window=8):" in out
    assert "peak memory: not measured (--no-memory)" in out


def test_peak_memory_is_measured_in_a_subprocess():
    # the demo's original attention at 256 tokens holds fp32 scores of 4 x 256 x 256 = 1 MB (more than one copy)
    peak, note = bench.measure_peak_memory("demo", None, 256, batch=1, attn="eager", device="cpu")
    assert note == "" and 1_000_000 < peak < 200_000_000
    assert "VmHWM" in bench.memory_method("cpu") or "ru_maxrss" in bench.memory_method("cpu")


def test_a_factory_that_takes_seq_len_is_benchmarked_at_each_length(tmp_path, capsys):
    path = tmp_path / "model.py"
    path.write_text(
        "import torch\n"
        "from attncc.models.demo import build_demo_model\n"
        "def build(seq_len, batch=1):\n"
        "    loaded = build_demo_model(seq_len=seq_len, batch=batch)\n"
        "    return loaded.model, loaded.example_inputs\n")
    assert main(["bench", f"{path}:build", "-p", "exact", "--seq-len", "8,16", "--repeat", "1", "--no-memory",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [row["seq_len"] for row in data["rows"]] == [8, 8, 16, 16]
    assert all(row["status"] == "ok" for row in data["rows"])


def test_bench_hf_llama_json(capsys):
    assert main(["bench", "hf:llama", "-p", "exact", "-p", "local(window=8)", "--seq-len", "16,48", "--repeat", "1",
                 "--no-memory", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["seq_lens"] == [16, 48] and data["policies"] == ["exact", "local(window=8)"]
    rows = {(row["seq_len"], row["model"]): row for row in data["rows"]}
    assert len(rows) == 6 and all(row["status"] == "ok" for row in rows.values())
    for length in (16, 48):
        original, exact, local = (rows[length, name] for name in ("original", "exact", "local(window=8)"))
        assert original["median_ms"] > 0 and original["speedup"] == 1.0
        assert exact["cosine"] > 0.99999 and exact["max_abs_error"] < 1e-4
        assert 0 < exact["attn_flops"] <= original["attn_flops"]  # the fused op skips the causal half
        assert local["speedup"] == pytest.approx(original["median_ms"] / local["median_ms"])
    assert rows[48, "local(window=8)"]["attn_flops"] < rows[48, "original"]["attn_flops"]
    assert rows[48, "local(window=8)"]["max_abs_error"] > 1e-4  # a window of 8 at 48 tokens is approximate
    assert set(data["efficiency_length"]) == {"exact", "local(window=8)"}
    assert data["memory_method"].startswith("not measured")
    assert data["environment"]["torch"]


def test_a_length_that_does_not_fit_is_a_row(monkeypatch, capsys):
    import attncc.models.memory as memory

    # the second length's estimate (3 fp32 score tensors of 4 heads x 64 x 64 = 197 kB) is above 70% of 100 kB
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 100_000)
    assert main(["bench", "demo", "-p", "exact", "--seq-len", "16,64", "--repeat", "1", "--no-memory",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    refused = [row for row in data["rows"] if row["seq_len"] == 64]
    assert len(refused) == 2 and all(row["median_ms"] is None for row in refused)
    assert refused[0]["status"] == ("does not fit in memory: the original's attention scores need about 196.6 kB "
                                    "(estimated, not run), more than 70% of the 100.0 kB available")
    assert [row["status"] for row in data["rows"] if row["seq_len"] == 16] == ["ok", "ok"]


def test_the_table_says_which_lengths_did_not_run():
    result = bench.BenchResult("demo", "", ["exact"], [16, 64], 1, 1, "cpu", "not measured (--no-memory)", rows=[
        BenchRow(16, "original", median_ms=2.0, speedup=1.0, attn_flops=10**6),
        BenchRow(16, "exact", median_ms=4.0, speedup=0.5, cosine=1.0, max_abs_error=0.0, attn_flops=10**6),
        BenchRow(64, "original", status="does not fit in memory: too big"),
        BenchRow(64, "exact", status="does not fit in memory: too big")])
    from rich.console import Console

    console = Console(width=200, file=io.StringIO())
    console.print(result.table())
    text = console.file.getvalue()
    assert "does not fit in memory: too big" in text and "not run (see above)" in text
    assert "0.50x (2.00x slower)" in text and "faster" not in text
    assert result.efficiency_lines() == ["efficiency length of exact: not reached up to 16 tokens"]


def test_out_of_memory_while_running_is_a_row(monkeypatch):
    def out_of_memory(*args):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 40000000000 bytes.")

    monkeypatch.setattr(bench, "_prepare", out_of_memory)
    rows, report = bench.bench_length("demo", ["exact"], 16, batch=1, repeat=1, attn="eager", device="cpu",
                                      memory=False)
    assert report is None and [row.model for row in rows] == ["original", "exact"]
    assert all(row.status.startswith("does not fit in memory: RuntimeError: DefaultCPUAllocator") for row in rows)


def test_a_model_without_a_sequence_length_is_one_error_line(capfd):
    assert main(["bench", "hf:vit", "-p", "exact", "--seq-len", "16"]) == 2
    line = one_error_line(capfd)
    assert line.startswith("attncc: error: hf:vit does not take a sequence length")
    assert "pixel" not in line or "[1, 3, 32, 32]" in line


@pytest.mark.parametrize("args, says", [
    (["--seq-len", "16,abc"], "comma-separated token counts"),
    (["--seq-len", "0"], "positive token counts"),
    ([], "Missing option '--policy'"),
], ids=["not-a-number", "zero", "no-policy"])
def test_bad_options_are_one_error_line(args, says, capfd):
    policy = [] if not args else ["-p", "exact"]
    assert main(["bench", "demo", *policy, *args]) == 2
    assert says in one_error_line(capfd)


@pytest.mark.parametrize("device, says", [("tpu", "unknown device 'tpu'; use cpu or cuda"),
                                          ("cuda", "no CUDA GPU is available")], ids=["unknown", "cuda"])
def test_bad_device_is_one_error_line(device, says, capfd):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "demo", "-p", "exact", "--seq-len", "16", "--device", device]) == 2
    assert says in one_error_line(capfd)


def test_bad_policy_is_refused_before_any_model_is_built(capfd):
    assert main(["bench", "demo", "-p", "local(windo=3)", "--seq-len", "16"]) == 2
    assert "valid parameters are window" in one_error_line(capfd)


@pytest.mark.parametrize("speedup, says, never", [
    (2.3125, "2.31x faster", "slower"),
    (0.4, "0.40x (2.50x slower)", "faster"),
    (0.999, "slower", "faster"),
    (1.001, "(same)", "slower"),
])
def test_a_slower_model_is_never_called_faster(speedup, says, never):
    text = speedup_text(speedup)
    assert says in text and never not in text


def test_efficiency_length_is_where_the_policy_starts_beating_the_original_for_good():
    rows = [BenchRow(512, "p", speedup=1.1), BenchRow(1024, "p", speedup=0.5),
            BenchRow(2048, "p", status="does not fit in memory"), BenchRow(4096, "p", speedup=1.3),
            BenchRow(8192, "p", speedup=2.0), BenchRow(4096, "q", speedup=0.9), BenchRow(512, "r", speedup=1.2),
            BenchRow(1024, "s", speedup=2.0), BenchRow(2048, "s", speedup=0.8)]
    assert efficiency_length(rows, "p") == 4096  # the win at 512 is followed by a loss: not a crossover
    assert efficiency_length(rows, "q") is None
    assert efficiency_length(rows, "r") == 512
    assert efficiency_length(rows, "s") is None  # losing at the longest length measured
