"""``attncc demo``: compile the built-in demo model and compare it with the original."""

from __future__ import annotations

import click

from attncc import progress
from attncc.bench import speedup_text
from attncc.cli.common import (QUIET_HELP, call_model, check_environment, compile_loaded, median_time,
                               relative_error)

@click.command()
@click.option("--seq-len", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs (median).")
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
def demo(seq_len, batch, repeat, quiet):
    """Compile the built-in GPT-style demo model and compare it with the original: sites, error, time."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from attncc.models import build_demo_model

    check_environment()
    click.get_current_context().with_resource(progress.quiet(quiet))
    loaded = build_demo_model(seq_len=seq_len, batch=batch)
    cm, reference = compile_loaded(loaded, "exact")
    console = Console(width=150)
    console.print(loaded.description)
    console.print(cm.report().table())
    compiled = call_model(cm, loaded.example_inputs)
    error = relative_error(reference, compiled)
    t_orig = median_time(lambda: call_model(loaded.model, loaded.example_inputs), repeat)
    t_cc = median_time(lambda: call_model(cm, loaded.example_inputs), repeat)
    table = Table(title=f"original vs attncc exact, measured (torch {torch.__version__}, {torch.get_num_threads()} "
                        f"threads, batch {batch}, {seq_len} tokens, median of {repeat})", title_justify="left")
    for col in ("model", "measured time (ms)", "measured speedup", "rel. error vs original"):
        table.add_column(col, justify="right" if col != "model" else "left")
    table.add_row("original", f"{t_orig * 1e3:.1f}", "1.00x (reference)", "-")
    table.add_row("attncc exact", f"{t_cc * 1e3:.1f}", speedup_text(t_orig / t_cc), f"{error:.2e}")
    console.print(table)
