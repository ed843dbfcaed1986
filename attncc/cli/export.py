"""``attncc export MODEL --policy P -o model.pt2``: a ``.pt2`` whose attention runs as attncc ops.

The program is ``attncc.export``'s (see ``attncc/exporting.py``); ``attncc.load(path)`` loads it in any process that
can import attncc. An existing output file is kept unless ``--force``.
"""

from __future__ import annotations

import os

import click

from attncc.cli.common import QUIET_HELP, check_environment, first_line, quiet_capture, root_cause
from attncc.errors import AttnccError


@click.command()
@click.argument("model", metavar="MODEL")
@click.option("--policy", "-p", default="exact", show_default=True,
              help="A variant for every site that supports it (exact, 'local(window=256, sinks=4)', "
                   "'neighborhood(kernel=7)', 'topk(density=0.125)' ...), a rules file (.yaml/.json), "
                   "or a plan from 'attncc calibrate' (plan.json).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="The .pt2 file to write.")
@click.option("--seq-len", type=click.IntRange(min=2), default=None,
              help="Sequence length of the example text inputs (with --dynamic seq: any length runs).")
@click.option("--dynamic", type=click.Choice(["seq"]), default=None,
              help="'seq': one program for every sequence length (the sequence axis of the inputs is dynamic).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size.")
@click.option("--attn", type=click.Choice(["eager", "sdpa"]), default="eager", show_default=True,
              help="attn_implementation for hf: models.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
def export(model, policy, output, seq_len, dynamic, batch, attn, force, quiet):
    """Export MODEL with its attention rewritten by the policy to a torch.export .pt2 file.

    MODEL is one of: demo | timm:NAME | hf:MODEL_TYPE | hf:LOCAL_DIR | path/to/file.py:factory.
    """
    import torch

    import attncc
    from attncc import progress
    from attncc.models import load_model
    from attncc.policy import as_policy

    check_environment()
    if os.path.exists(output) and not force:
        raise AttnccError(f"{output} exists; pass --force to overwrite it")
    chosen = as_policy(policy)
    click.get_current_context().with_resource(progress.quiet(quiet))
    with quiet_capture():
        loaded = load_model(model, seq_len=seq_len, batch=batch, attn=attn)
        try:
            program = attncc.export(loaded.model, chosen, loaded.example_inputs, dynamic=dynamic)
        except AttnccError:
            raise
        except Exception as error:
            cause = root_cause(error)
            raise AttnccError(f"could not export the model: {type(cause).__name__}: {first_line(cause)}") from error
    report = program.attncc_report
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise AttnccError(f"cannot write {output}: no directory {directory}")
    torch.export.save(program, output)
    click.echo(loaded.description)
    click.echo(report.render(model=model), nl=False)
    rewritten = sum(site.variant != "none" for site in report.sites)
    shapes = "any sequence length" if dynamic else "the example shapes"
    click.echo(f"wrote {output}: {rewritten} attncc op(s), for {shapes}; load it with attncc.load({output!r})")
