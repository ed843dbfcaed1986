"""``attncc bench MODEL --policy P [--policy Q ...] --seq-len 1024,4096,16384``: is a policy faster on this model,
at these lengths, and how far are its outputs from the original's? Measured, side by side (``attncc.bench``)."""

from __future__ import annotations

import json

import click

from attncc.cli.common import QUIET_HELP, check_environment, quiet_capture


def parse_lengths(ctx, param, value: str) -> list[int]:
    """``"1024,4096,16384"`` -> ``[1024, 4096, 16384]``; anything else is a usage error naming the option."""
    try:
        lengths = [int(part) for part in value.replace(" ", "").split(",") if part]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated token counts such as 1024,4096, got {value!r}") from None
    if not lengths or min(lengths) < 1:
        raise click.BadParameter(f"expected positive token counts such as 1024,4096, got {value!r}")
    return lengths


@click.command()
@click.argument("model", metavar="MODEL")
@click.option("--policy", "-p", "policies", multiple=True, required=True,
              help="A policy to compare with the original (repeat the option for several): a variant such as "
                   "'local(window=256)', a rules file, or a plan from 'attncc calibrate' (plan.json).")
@click.option("--seq-len", "seq_lens", callback=parse_lengths, default="1024,4096,16384", show_default=True,
              help="Comma-separated token counts.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size.")
@click.option("--repeat", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed rounds per length (median); each round runs every model once, interleaved.")
@click.option("--attn", type=click.Choice(["eager", "sdpa"]), default="eager", show_default=True,
              help="attn_implementation for hf: models.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Measure peak memory (on CPU one subprocess per model and length).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
def bench(model, policies, seq_lens, batch, repeat, attn, device, memory, as_json, quiet):
    """Time MODEL as it is and under each policy at each length: speedup, output error, attention FLOPs, peak
    memory, and the efficiency length (the shortest length from which on the policy beats the original).

    MODEL is a model that takes a sequence length: demo | hf:MODEL_TYPE | hf:LOCAL_DIR |
    path/to/file.py:factory where factory(seq_len, batch=1) returns (model, example_inputs).
    """
    from rich.console import Console

    from attncc import progress
    from attncc.bench import run_bench

    check_environment()
    with progress.quiet(quiet), quiet_capture():
        result = run_bench(model, list(policies), seq_lens, batch=batch, repeat=repeat, attn=attn, device=device,
                           memory=memory)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    console = Console(width=160)
    console.print(result.description, markup=False, highlight=False)
    console.print(result.table())
    for line in result.efficiency_lines():
        console.print(line, markup=False, highlight=False)
