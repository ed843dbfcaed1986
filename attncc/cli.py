"""The ``attncc`` command line: ``attncc inspect MODEL`` and ``attncc demo``.

Every user mistake (unknown model spec, missing file, bad policy, a model that cannot be captured) prints one
line ``attncc: error: ...`` and exits with status 2; ``ATTNCC_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import click

from attncc.errors import AttnccError

MODEL_HELP = ("demo | timm:NAME | hf:MODEL_TYPE (e.g. hf:llama, tiny random config) | hf:LOCAL_DIR | "
              "path/to/file.py:factory (returns model, example_inputs)")


def _call(model, inputs):
    import torch

    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _main_tensor(output):
    """The tensor a user would compare first: the output itself, logits, last_hidden_state, or the first item."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)) and output:
        return _main_tensor(output[0])
    raise AttnccError(f"cannot find a tensor in the model output of type {type(output).__name__}")


def relative_error(reference, candidate) -> float:
    """``||candidate - reference|| / ||reference||`` over the main output tensor."""
    a, b = _main_tensor(reference).double(), _main_tensor(candidate).double()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def _compile_loaded(loaded, policy):
    import attncc

    try:
        cm = attncc.compile(loaded.model, policy, example_inputs=loaded.example_inputs)
    except AttnccError:
        raise
    except Exception as error:  # the model itself failed on its inputs, or capture failed
        raise AttnccError(f"could not capture the model: {type(error).__name__}: {_first_line(error)}") from error
    return cm


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else ""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attncc")
def cli():
    """attncc: find every attention in a PyTorch model and rewrite it into fused, sparse, local or linear forms."""


@cli.command()
@click.argument("model", metavar="MODEL")
@click.option("--policy", "-p", default="exact", show_default=True,
              help="A variant for every site that supports it (exact, none, 'local(window=256, sinks=4)', "
                   "'neighborhood(kernel=7)', 'topk(density=0.125)', \"linear(feature_map='elu', window=64)\", "
                   "'block_sparse(pattern=bigbird(window=3, globals=1, random=2))') or a rules file (.yaml/.json).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--graph", is_flag=True, help="Also print the code of the rewritten graph(s).")
@click.option("--seq-len", type=click.IntRange(min=1), default=None, help="Sequence length of text inputs.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size.")
@click.option("--attn", type=click.Choice(["eager", "sdpa"]), default="eager", show_default=True,
              help="attn_implementation for hf: models.")
def inspect(model, policy, as_json, graph, seq_len, batch, attn):
    """Show the attention sites of MODEL and what the policy does with each.

    MODEL is one of: demo | timm:NAME | hf:MODEL_TYPE | hf:LOCAL_DIR | path/to/file.py:factory.
    """
    from attncc.models import load_model
    from attncc.policy import as_policy

    chosen = as_policy(policy)
    loaded = load_model(model, seq_len=seq_len, batch=batch, attn=attn)
    cm = _compile_loaded(loaded, chosen)
    report = cm.report()
    if as_json:
        data = report.to_dict()
        data["model"] = model
        if graph:
            data["graph"] = cm.code()
        click.echo(json.dumps(data, indent=2, default=str))
        return
    click.echo(f"{model}: {loaded.description}")
    click.echo(report.render(), nl=False)
    if graph:
        click.echo(cm.code())


def _time(fn, repeat: int) -> float:
    fn()  # warm-up (and capture, for the compiled model)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@cli.command()
@click.option("--seq-len", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs (median).")
def demo(seq_len, batch, repeat):
    """Compile the built-in GPT-style demo model and compare it with the original: sites, error, time."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from attncc.models import build_demo_model

    loaded = build_demo_model(seq_len=seq_len, batch=batch)
    cm = _compile_loaded(loaded, "exact")
    console = Console(width=120)
    console.print(loaded.description)
    console.print(cm.report().table())
    reference = _call(loaded.model, loaded.example_inputs)
    compiled = _call(cm, loaded.example_inputs)
    error = relative_error(reference, compiled)
    t_orig = _time(lambda: _call(loaded.model, loaded.example_inputs), repeat)
    t_cc = _time(lambda: _call(cm, loaded.example_inputs), repeat)
    table = Table(title=f"original vs attncc exact (torch {torch.__version__}, {torch.get_num_threads()} threads, "
                        f"batch {batch}, {seq_len} tokens, median of {repeat})", title_justify="left")
    for col in ("model", "time (ms)", "speedup", "rel. error vs original"):
        table.add_column(col, justify="right" if col != "model" else "left")
    table.add_row("original", f"{t_orig * 1e3:.1f}", "1.00x", "-")
    table.add_row("attncc exact", f"{t_cc * 1e3:.1f}", f"{t_orig / t_cc:.2f}x", f"{error:.2e}")
    console.print(table)


def main(argv=None) -> int:
    """Entry point of the ``attncc`` script: returns the exit status."""
    try:
        cli.main(args=argv, prog_name="attncc", standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.exceptions.Abort:
        click.echo("attncc: aborted", err=True)
        return 130
    except click.ClickException as error:
        click.echo(f"attncc: error: {error.format_message()} (see 'attncc --help')", err=True)
        return 2
    except AttnccError as error:
        if os.environ.get("ATTNCC_DEBUG"):
            raise
        click.echo(f"attncc: error: {error}", err=True)
        return 2
    return 0


def run() -> None:
    """Console-script wrapper: exit with main()'s status."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
