"""Progress on stderr for the slow parts of attncc: capture (per graph), error measurement (per site), autotuning
(per config), export and bench (per length and policy).

One API for every caller::

    with progress.steps("export", total=len(graphs)) as step:
        for graph in graphs:
            ...
            step.advance(f"graph {i}")          # one step done; the label says which

    progress.advance("graph 3: 12 sites")       # the innermost open steps, from code that has no handle on it

Nested ``steps`` share one rich display (rich allows one live display at a time): each adds a line under the
one that opened it and removes it when it closes, so a bench shows "length 4096, policy local" above "capture"
above "measuring error". Everything is transient: a finished display leaves the terminal as it found it.

Silent unless someone watches: nothing is shown when stderr is not a terminal (pipes, CI logs, pytest), when
``ATTNCC_QUIET=1``, or inside ``quiet()`` (the CLI's ``--quiet``). Tests inject a console with
``console=Console(force_terminal=True, file=StringIO())``. Single-threaded by design: Dynamo calls attncc's
backend on the thread that runs the model.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

QUIET_ENV = "ATTNCC_QUIET"

_quiet_depth = 0
"""How many ``quiet()`` blocks are open (the CLI's ``--quiet``)."""

_open: list["Steps"] = []
"""Open ``steps`` blocks, outermost first; the display belongs to the first that became visible."""

_display = None
"""The rich Progress shown now (None while nothing is visible)."""


def enabled(console=None) -> bool:
    """Whether progress would be shown on ``console`` (default: stderr): a terminal, no ``ATTNCC_QUIET=1``, no
    ``quiet()`` block open."""
    if _quiet_depth or os.environ.get(QUIET_ENV, "") not in ("", "0"):
        return False
    if console is not None:
        return bool(console.is_terminal)
    import sys

    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


@contextlib.contextmanager
def quiet(active: bool = True) -> Iterator[None]:
    """No progress inside the block when ``active`` (the CLI's ``--quiet``); ``quiet(False)`` changes nothing."""
    global _quiet_depth
    _quiet_depth += int(active)
    try:
        yield
    finally:
        _quiet_depth -= int(active)


class Steps:
    """One line of the progress display: a title, ``done``/``total`` steps (a spinner when total is None) and
    the label of the latest step. Made by :func:`steps`; a no-op when progress is not shown."""

    def __init__(self, title: str, total: Optional[int], visible: bool, lazy: bool, console=None):
        self.title = title
        self.total = total
        self.done = 0
        self.label = ""
        self.visible = visible
        self.console = console
        self._lazy = lazy
        self._task = None

    def advance(self, label: str = "", amount: int = 1) -> None:
        """Count ``amount`` steps as done; ``label`` names the step (shown after the title)."""
        self.done += amount
        self.label = label or self.label
        if self.visible:
            _show(self)
            _display.update(self._task, advance=amount, description=self._description(), refresh=True)

    def describe(self, label: str) -> None:
        """Say what is running now, without counting a step."""
        self.label = label
        if self.visible and self._task is not None:
            _display.update(self._task, description=self._description(), refresh=True)

    def _description(self) -> str:
        return f"{self.title}: {self.label}" if self.label else self.title


@contextlib.contextmanager
def steps(title: str, total: Optional[int] = None, *, lazy: bool = False, console=None) -> Iterator[Steps]:
    """A progress line for the block: ``title``, ``total`` steps (None: unknown, a spinner and a count).

    ``lazy=True`` shows the line only once a step is counted or a nested ``steps`` opens inside it (a call that
    may or may not do slow work, such as a forward that may recapture). ``console``: a rich Console to draw on
    (default: stderr), used only by the outermost block.
    """
    if _open:
        console = _open[0].console
    visible = not _tracing() and enabled(console)  # (stderr's isatty breaks a torch.compile graph)
    step = Steps(title, total, visible, lazy, console)
    _open.append(step)
    try:
        if visible and not lazy:
            _show(step)
        yield step
    finally:
        _open.remove(step)
        _hide(step)


def _tracing() -> bool:
    """True while torch.compile / torch.export traces the code that opened the steps (nothing to draw then)."""
    import torch

    return torch.compiler.is_compiling()


def advance(label: str = "", amount: int = 1) -> None:
    """Count a step of the innermost open ``steps`` (nothing when none is open)."""
    if _open:
        _open[-1].advance(label, amount)


def _show(step: Steps) -> None:
    """Make ``step`` visible, and every open step around it (a lazy outer line appears with its first inner)."""
    global _display
    if step._task is not None:
        return
    if _display is None:
        _display = _new_display(step.console)
        _display.start()
    for outer in _open[: _open.index(step)] if step in _open else []:
        if outer.visible and outer._task is None:
            _add_task(outer)
    _add_task(step)


def _add_task(step: Steps) -> None:
    step._task = _display.add_task(step._description(), total=step.total, completed=step.done)


def _hide(step: Steps) -> None:
    global _display
    if step._task is not None and _display is not None:
        _display.remove_task(step._task)
        step._task = None
    if not any(s._task is not None for s in _open) and _display is not None:
        _display.stop()
        _display = None


def _new_display(console=None):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console or Console(stderr=True), transient=True)
