"""``attncc inspect MODEL``: the attention sites of a model and what a policy does with each, as a table, JSON,
DOT or SVG on stdout, and as a self-contained HTML page with ``--html report.html``."""

from __future__ import annotations

import json
import os

import click

from attncc import progress
from attncc.cli.common import QUIET_HELP, check_environment, compile_loaded, quiet_capture
from attncc.errors import AttnccError

FORMATS = ("table", "json", "dot", "svg")


@click.command()
@click.argument("model", metavar="MODEL")
@click.option("--policy", "-p", default="exact", show_default=True,
              help="A variant for every site that supports it (exact, none, 'local(window=256, sinks=4)', "
                   "'neighborhood(kernel=7)', 'topk(density=0.125)', \"linear(feature_map='elu', window=64)\", "
                   "'block_sparse(pattern=bigbird(window=3, globals=1, random=2))'), a rules file (.yaml/.json), "
                   "or a plan from 'attncc calibrate' (plan.json).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="What to print: the site table (default), JSON, or the graphs before and after each site's "
                   "rewrite as DOT text (for Graphviz) or an SVG document.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (same as --format json).")
@click.option("--html", "html_path", metavar="PATH", default=None,
              help="Also write the visual report, a self-contained HTML page, to PATH.")
@click.option("--force", is_flag=True, help="Overwrite the --html file if it exists.")
@click.option("--graph", is_flag=True, help="Also print the code of the rewritten graph(s) (table and JSON).")
@click.option("--seq-len", type=click.IntRange(min=1), default=None, help="Sequence length of text inputs.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size.")
@click.option("--attn", type=click.Choice(["eager", "sdpa"]), default="eager", show_default=True,
              help="attn_implementation for hf: models.")
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
def inspect(model, policy, fmt, as_json, html_path, force, graph, seq_len, batch, attn, quiet):
    """Show the attention sites of MODEL and what the policy does with each.

    MODEL is one of: demo | timm:NAME | hf:MODEL_TYPE | hf:LOCAL_DIR | path/to/file.py:factory.
    """
    from attncc.models import load_model
    from attncc.policy import as_policy

    fmt = _output_format(fmt, as_json, graph)
    if html_path is not None:
        check_output_path(html_path, force)
    elif force:
        raise AttnccError("--force only applies to --html PATH")
    check_environment()
    click.get_current_context().with_resource(progress.quiet(quiet))
    chosen = as_policy(policy)
    with quiet_capture():
        loaded = load_model(model, seq_len=seq_len, batch=batch, attn=attn)
    cm, _ = compile_loaded(loaded, chosen)
    if html_path is not None:
        _write_html(cm, html_path, force, model, loaded.description)
    if fmt in ("dot", "svg"):
        from attncc.visual import render

        click.echo(render(cm, fmt, title=model), nl=False)
        return
    report = cm.report()
    if fmt == "json":
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


def _output_format(fmt, as_json: bool, graph: bool) -> str:
    """The one output format the options ask for (``--json`` is ``--format json``)."""
    if as_json and fmt not in (None, "json"):
        raise AttnccError(f"--json and --format {fmt} ask for two outputs; use one")
    fmt = "json" if as_json else (fmt or "table")
    if graph and fmt in ("dot", "svg"):
        raise AttnccError(f"--graph prints graph code beside the table or JSON, not with --format {fmt}")
    return fmt


def check_output_path(path: str, force: bool) -> None:
    """Raise AttnccError (one line) unless a file can be written at ``path``: its folder exists, and it does not
    exist yet or ``force`` allows overwriting it. Checked before the model is built, so a typo costs nothing."""
    if os.path.isdir(path):
        raise AttnccError(f"{path} is a folder; give a file name, e.g. {os.path.join(path, 'report.html')}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise AttnccError(f"cannot write {path}: no such folder {os.path.dirname(path) or folder}")
    if not os.access(folder, os.W_OK):
        raise AttnccError(f"cannot write {path}: the folder is not writable")
    if os.path.lexists(path) and not force:
        raise AttnccError(f"{path} exists; use --force to overwrite it")


def _write_html(cm, path: str, force: bool, model: str, description: str) -> None:
    from attncc.visual import render

    page = render(cm, "html", title=model, subtitle=description)
    try:  # "x": never replace a file that appeared since the check, unless --force
        with open(path, "w" if force else "x", encoding="utf-8") as file:
            file.write(page)
    except FileExistsError:
        raise AttnccError(f"{path} exists; use --force to overwrite it") from None
    except OSError as error:
        raise AttnccError(f"cannot write {path}: {error.strerror or error}") from None
    report = cm.report()
    click.echo(f"attncc: wrote {path} ({len(report.sites)} site(s), {len(report.rejected)} near-miss(es))", err=True)
