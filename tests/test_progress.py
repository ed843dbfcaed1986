"""attncc.progress: shown on a terminal (a rich Console forced to be one, writing to a StringIO), silent
everywhere else (pytest's stderr, ATTNCC_QUIET=1, quiet(), the CLI's --quiet); and the hooks in compile (per
graph), error measurement (per site) and autotuning (per config) feed it."""

from __future__ import annotations

import io
import re

import pytest
import torch
from rich.console import Console

import attncc
from attncc import progress
from attncc.codegen.autotune import Config, choose
from attncc.codegen.cache import default_cache
from attncc.models import build_demo_model


def terminal() -> Console:
    return Console(force_terminal=True, file=io.StringIO(), width=120)


def shown(console: Console) -> str:
    """Everything drawn on ``console``, without the terminal's control codes."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console.file.getvalue())


@pytest.fixture(autouse=True)
def no_quiet_env(monkeypatch):
    monkeypatch.delenv(progress.QUIET_ENV, raising=False)


def test_nested_steps_share_one_display_and_leave_none_behind():
    console = terminal()
    with progress.steps("bench demo", total=2, console=console) as outer:
        with progress.steps("capture", lazy=True):
            progress.advance("graph 0: 4 attention site(s)")
        outer.advance("length 16")
        with progress.steps("measuring error", total=3) as inner:
            inner.advance("site 0")
        outer.advance("length 32")
    text = shown(console)
    for expected in ("bench demo: length 16", "capture: graph 0: 4 attention site(s)", "measuring error: site 0",
                     "1/3", "2/2"):
        assert expected in text
    assert progress._display is None and not progress._open


def test_lazy_steps_without_work_draw_nothing():
    console = terminal()
    with progress.steps("capturing Model", lazy=True, console=console):
        pass
    assert shown(console).strip() == ""


@pytest.mark.parametrize("silence", ["env", "quiet"])
def test_quiet_draws_nothing_even_on_a_terminal(silence, monkeypatch):
    console = terminal()
    if silence == "env":
        monkeypatch.setenv(progress.QUIET_ENV, "1")
    with progress.quiet(silence == "quiet"):
        assert not progress.enabled(console)
        with progress.steps("export", total=2, console=console) as step:
            step.advance("graph 0")
            assert not step.visible
    assert console.file.getvalue() == ""
    monkeypatch.delenv(progress.QUIET_ENV, raising=False)
    assert progress.enabled(console)  # quiet() ends with its block


def test_pytest_stderr_is_not_a_terminal_so_compile_is_silent(capfd):
    loaded = build_demo_model(seq_len=16)
    assert not progress.enabled()
    attncc.compile(loaded.model, "local(window=4)", example_inputs=loaded.example_inputs)
    assert capfd.readouterr().err == ""


def test_compile_shows_capture_per_graph_and_measurement_per_site():
    loaded = build_demo_model(seq_len=16)
    console = terminal()
    with progress.steps("test", console=console):
        cm = attncc.compile(loaded.model, "local(window=4)", example_inputs=loaded.example_inputs)
    text = shown(console)
    assert "capturing DemoGPT: graph 0: 4 attention site(s)" in text
    assert "measuring error: site 3" in text and "4/4" in text
    again = terminal()
    with progress.steps("test", console=again, lazy=True):
        cm(*loaded.example_inputs)  # captured already: nothing to show
    assert shown(again).strip() == ""


def test_export_shows_its_steps():
    loaded = build_demo_model(seq_len=16)
    console = terminal()
    with progress.steps("test", console=console):
        attncc.export(loaded.model, "local(window=4)", loaded.example_inputs, check_compile=False,
                      measure_error=False)
    text = shown(console)
    assert "exporting DemoGPT: 4 attention site(s) rewritten" in text
    assert "exported with the attncc ops" in text and "4/4" in text


def test_autotune_shows_each_config(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "cache"))
    default_cache().forget_memory()
    configs = [Config.of(4, 2, BLOCK_M=64), Config.of(8, 3, BLOCK_M=128)]
    console = terminal()
    with progress.steps("test", console=console):
        best = choose({"entry": "attn_fwd_test"}, 1024, configs, lambda config: None, torch.device("cpu"),
                      timer=lambda fn: (fn(), 1.0)[1])
    default_cache().forget_memory()
    assert best == configs[0]
    text = shown(console)
    assert "autotuning attn_fwd_test at length 1024: BLOCK_M=128, warps=8, stages=3" in text and "2/2" in text


def test_cli_commands_take_quiet(capsys):
    from attncc.cli import cli, main

    for name in ("inspect", "demo", "bench", "export"):
        assert "quiet" in [param.name for param in cli.commands[name].params], name
    assert main(["inspect", "demo", "--seq-len", "16", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert not progress._quiet_depth, "--quiet ends with the command"
