"""What every ``attncc`` command shares: running a model on its example inputs, compiling it with the user's
errors turned into one line, quieting capture logs, and reading out-of-memory errors."""

from __future__ import annotations

import contextlib
import os
import statistics
import time

import click

from attncc.errors import AttnccError

MODEL_HELP = ("demo | timm:NAME | hf:MODEL_TYPE (e.g. hf:llama, tiny random config) | hf:LOCAL_DIR | "
              "path/to/file.py:factory (returns model, example_inputs)")


def call_model(model, inputs):
    import torch

    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def main_tensor(output):
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
        return main_tensor(output[0])
    raise AttnccError(f"cannot find a tensor in the model output of type {type(output).__name__}")


def relative_error(reference, candidate) -> float:
    """``||candidate - reference|| / ||reference||`` over the main output tensor."""
    a, b = main_tensor(reference).double(), main_tensor(candidate).double()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def compile_loaded(loaded, policy):
    """``(compiled model, the original's output on the example inputs)``.

    The original runs first, so inputs the model rejects are reported as the model's own error, not as the
    Dynamo error that wraps it during capture.
    """
    import attncc

    with quiet_capture():
        try:
            reference = call_model(loaded.model, loaded.example_inputs)
        except Exception as error:
            if out_of_memory(error) is not None:
                raise
            raise AttnccError(f"the model failed on its example inputs: {type(error).__name__}: "
                              f"{first_line(error)}") from error
        try:
            cm = attncc.compile(loaded.model, policy, example_inputs=loaded.example_inputs)
        except AttnccError:
            raise
        except Exception as error:  # capture failed on a model that runs
            if out_of_memory(error) is not None:
                raise
            cause = root_cause(error)  # Dynamo wraps the error that stopped it ("when making fake tensor call")
            raise AttnccError(f"could not capture the model: {type(cause).__name__}: {first_line(cause)}") from error
    return cm, reference


QUIET_HELP = "No progress display on stderr (also ATTNCC_QUIET=1; never shown when stderr is not a terminal)."


QUIETED_LOGGERS = ("torch", "transformers")
"""Loggers whose capture-time output (Dynamo / Inductor / fake-tensor errors, transformers advice) the CLI hides
unless ATTNCC_DEBUG is set: a user mistake is one line, and capture noise buries it."""


@contextlib.contextmanager
def quiet_capture():
    """Silence torch / transformers logging and non-attncc warnings for the block (unless ATTNCC_DEBUG)."""
    if os.environ.get("ATTNCC_DEBUG"):
        yield
        return
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in QUIETED_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.filterwarnings("default", message="attncc: ")  # attncc's own warnings stay visible
            warnings.showwarning = one_line_warning
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """attncc's warnings at the CLI: ``attncc: warning: ...`` on one line, without the source line."""
    text = str(message)
    text = "attncc: warning: " + text[len("attncc: "):] if text.startswith("attncc: ") else f"attncc: warning: {text}"
    click.echo(text, err=True)


def out_of_memory(error: BaseException):
    """The out-of-memory error in ``error``'s chain of causes (MemoryError, torch.OutOfMemoryError, the CPU
    allocator's RuntimeError 'not enough memory'), or None."""
    import torch

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
            return error
        if isinstance(error, RuntimeError) and any(
                text in str(error) for text in ("not enough memory", "out of memory", "Out of memory")):
            return error
        error = error.__cause__ or error.__context__
    return None


def root_cause(error: BaseException) -> BaseException:
    """The innermost error in ``error``'s chain (``raise ... from`` causes, or errors raised while handling
    another, even where ``from None`` hid it): Dynamo re-raises a model's error through several wrappers whose
    first lines hide it."""
    seen = {id(error)}
    while True:
        inner = error.__cause__ or error.__context__
        if inner is None or id(inner) in seen:
            return error
        error = inner
        seen.add(id(error))


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def check_environment() -> None:
    """Settings read from the environment, checked before any model is built (one line when wrong)."""
    from attncc.runtime.dispatch import selected_backend

    selected_backend()




def median_time(fn, repeat: int) -> float:
    fn()  # warm-up (and capture, for the compiled model)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
