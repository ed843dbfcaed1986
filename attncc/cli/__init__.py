"""The ``attncc`` command line: ``attncc inspect MODEL``, ``attncc demo``, ``attncc bench MODEL``,
``attncc export MODEL -o model.pt2``, ``attncc cache list|info|clear`` and
``attncc calibrate MODEL --max-error 0.01 --data texts.txt -o plan.json``;
one command per module of this package.

Every user mistake (unknown model spec, missing file, bad policy, inputs the model rejects, a model that cannot be
captured, a size that does not fit in memory) prints one line ``attncc: error: ...`` and exits with status 2;
torch's capture logs and warnings are hidden. ``ATTNCC_DEBUG=1`` shows the traceback and the logs instead.
"""

from __future__ import annotations

import os
import sys

import click

from attncc.cli.bench import bench
from attncc.cli.cache import cache
from attncc.cli.calibrate import calibrate
from attncc.cli.common import first_line, out_of_memory
from attncc.cli.demo import demo
from attncc.cli.export import export
from attncc.cli.inspect import inspect
from attncc.errors import AttnccError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attncc")
def cli():
    """attncc: find every attention in a PyTorch model and rewrite it into fused, sparse, local or linear forms."""


for command in (inspect, demo, bench, export, cache, calibrate):
    cli.add_command(command)


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
        click.echo(f"attncc: error: {first_line(error)}", err=True)
        return 2
    except Exception as error:  # out of memory is the user's size, not a bug: one line; anything else is a bug
        memory = out_of_memory(error)
        if memory is None or os.environ.get("ATTNCC_DEBUG"):
            raise
        click.echo(f"attncc: error: out of memory: {type(memory).__name__}: {first_line(memory)} "
                   f"(try a smaller --seq-len or --batch)", err=True)
        return 2
    return 0


def run() -> None:
    """Console-script wrapper: exit with main()'s status."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
