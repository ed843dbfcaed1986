"""``attncc inspect MODEL``: the attention sites of a model and what a policy does with each."""

from __future__ import annotations

import json

import click

from attncc import progress
from attncc.cli.common import QUIET_HELP, check_environment, compile_loaded, quiet_capture

@click.command()
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
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
def inspect(model, policy, as_json, graph, seq_len, batch, attn, quiet):
    """Show the attention sites of MODEL and what the policy does with each.

    MODEL is one of: demo | timm:NAME | hf:MODEL_TYPE | hf:LOCAL_DIR | path/to/file.py:factory.
    """
    from attncc.models import load_model
    from attncc.policy import as_policy

    check_environment()
    click.get_current_context().with_resource(progress.quiet(quiet))
    chosen = as_policy(policy)
    with quiet_capture():
        loaded = load_model(model, seq_len=seq_len, batch=batch, attn=attn)
    cm, _ = compile_loaded(loaded, chosen)
    report = cm.report()
    if as_json:
        data = report.to_dict()
        data["model"] = model
        if graph:
            data["graph"] = cm.code()
        click.echo(json.dumps(data, indent=2, default=str))
        return
    click.echo(loaded.description)  # it starts with the spec
    click.echo(report.render(model=model), nl=False)
    if graph:
        click.echo(cm.code())
