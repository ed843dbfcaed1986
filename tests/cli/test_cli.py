"""The attncc command line, run as a user runs it (a subprocess), and in-process for speed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from attncc.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attncc", *args], capture_output=True, text=True, timeout=300)


def test_inspect_demo_json(capsys):
    assert main(["inspect", "demo", "--seq-len", "32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["sites"]) == 4
    assert {s["variant"] for s in data["sites"]} == {"exact"}
    assert data["sites"][0]["module"] == "blocks.0.attn"
    assert data["sites"][0]["q_len"] == 32


def test_inspect_table_and_graph(capsys):
    assert main(["inspect", "demo", "--seq-len", "16", "--graph"]) == 0
    out = capsys.readouterr().out
    assert "blocks.3.attn" in out
    assert "torch.ops.attncc.attention" in out
    assert "softmax" not in out


def test_inspect_variant_policy_reports_flops_and_error(capsys):
    assert main(["inspect", "demo", "--seq-len", "64", "--policy", "local(window=8, sinks=2)", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for site in data["sites"]:
        assert site["variant"] == "local(window=8, sinks=2)"
        assert site["mask"] == "causal"  # the demo's tril buffer, recognized
        assert site["flops_after"] < site["flops_before"]
        assert 0 < site["rel_l2"] < 10 and -1 <= site["cosine"] <= 1


def test_inspect_rules_file(tmp_path, capsys):
    rules = tmp_path / "rules.yaml"
    rules.write_text("- match: 'blocks.0.*'\n  variant: exact\n- variant: topk(density=0.5, block=16)\n")
    assert main(["inspect", "demo", "--seq-len", "64", "--policy", str(rules)]) == 0
    out = capsys.readouterr().out
    assert "topk(block=16, density=0.5)" in out and "rule 1" in out


def test_inspect_bad_rules_file_is_one_line(tmp_path, capsys):
    rules = tmp_path / "rules.yaml"
    rules.write_text("- variant: local(window=8)\n  kind: selfish\n")
    assert main(["inspect", "demo", "--policy", str(rules)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "rule" in err and "'kind'" in err and "'self', 'cross'" in err


def test_inspect_policy_none_keeps_graph(capsys):
    assert main(["inspect", "demo", "--seq-len", "16", "--policy", "none", "--graph"]) == 0
    out = capsys.readouterr().out
    assert "torch.ops.attncc.attention" not in out
    assert "none" in out


def test_inspect_hf_model(capsys):
    assert main(["inspect", "hf:llama", "--attn", "sdpa", "--seq-len", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["module"] for s in data["sites"]] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert data["frontend"] == "dynamo"


def test_inspect_factory_file(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text(textwrap.dedent("""
        import torch
        class Attn(torch.nn.Module):
            def forward(self, q, k, v):
                return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v
        def build():
            x = torch.randn(1, 2, 8, 16)
            return Attn(), (x, x, x)
    """))
    assert main(["inspect", f"{path}:build", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["sites"]) == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["inspect", "nonsense"], "accepted"),
        (["inspect", "hf:not_a_model_type"], "unknown transformers model type"),
        (["inspect", "missing_file.py:factory"], "no such file"),
        (["inspect", "demo", "--policy", "fastest"], "unknown variant 'fastest'"),
        (["inspect", "demo", "--seq-len", "0"], "--seq-len"),
        (["inspect", "timm:not_a_timm_model"], "timm"),
    ],
    ids=["unknown-spec", "unknown-hf-type", "missing-file", "bad-policy", "bad-seq-len", "unknown-timm"],
)
def test_bad_input_one_line_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("attncc: error:") and message in err


def test_uncapturable_model_is_one_line(tmp_path, capsys):
    path = tmp_path / "broken.py"
    path.write_text(textwrap.dedent("""
        import torch
        class Broken(torch.nn.Module):
            def forward(self, x):
                raise ValueError("this model always fails")
        def build():
            return Broken(), (torch.randn(2, 2),)
    """))
    assert main(["inspect", f"{path}:build"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "the model failed on its example inputs: ValueError: this model always fails" in err


def test_subprocess_exit_codes_and_no_traceback():
    ok = run_cli("inspect", "demo", "--seq-len", "8", "--json")
    assert ok.returncode == 0, ok.stderr
    bad = run_cli("inspect", "hf:not_a_model_type")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    usage = run_cli("inspect")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_demo_runs(capsys):
    assert main(["demo", "--seq-len", "64", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "attncc exact" in out and "original" in out and "speedup" in out
