"""The ``attncc`` command line: ``attncc inspect MODEL``, ``attncc demo`` and ``attncc cache list|info|clear``.

Every user mistake (unknown model spec, missing file, bad policy, inputs the model rejects, a model that cannot be
captured, a size that does not fit in memory) prints one line ``attncc: error: ...`` and exits with status 2;
torch's capture logs and warnings are hidden. ``ATTNCC_DEBUG=1`` shows the traceback and the logs instead.
"""

from __future__ import annotations

import contextlib
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
    """``(compiled model, the original's output on the example inputs)``.

    The original runs first, so inputs the model rejects are reported as the model's own error, not as the
    Dynamo error that wraps it during capture.
    """
    import attncc

    with _quiet_capture():
        try:
            reference = _call(loaded.model, loaded.example_inputs)
        except Exception as error:
            if _out_of_memory(error) is not None:
                raise
            raise AttnccError(f"the model failed on its example inputs: {type(error).__name__}: "
                              f"{_first_line(error)}") from error
        try:
            cm = attncc.compile(loaded.model, policy, example_inputs=loaded.example_inputs)
        except AttnccError:
            raise
        except Exception as error:  # capture failed on a model that runs
            if _out_of_memory(error) is not None:
                raise
            cause = _root_cause(error)  # Dynamo wraps the error that stopped it ("when making fake tensor call")
            raise AttnccError(f"could not capture the model: {type(cause).__name__}: {_first_line(cause)}") from error
    return cm, reference


QUIETED_LOGGERS = ("torch", "transformers")
"""Loggers whose capture-time output (Dynamo / Inductor / fake-tensor errors, transformers advice) the CLI hides
unless ATTNCC_DEBUG is set: a user mistake is one line, and capture noise buries it."""


@contextlib.contextmanager
def _quiet_capture():
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
            warnings.showwarning = _one_line_warning
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """attncc's warnings at the CLI: ``attncc: warning: ...`` on one line, without the source line."""
    text = str(message)
    text = "attncc: warning: " + text[len("attncc: "):] if text.startswith("attncc: ") else f"attncc: warning: {text}"
    click.echo(text, err=True)


def _out_of_memory(error: BaseException):
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


def _root_cause(error: BaseException) -> BaseException:
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _check_environment() -> None:
    """Settings read from the environment, checked before any model is built (one line when wrong)."""
    from attncc.runtime.dispatch import selected_backend

    selected_backend()


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

    _check_environment()
    chosen = as_policy(policy)
    with _quiet_capture():
        loaded = load_model(model, seq_len=seq_len, batch=batch, attn=attn)
    cm, _ = _compile_loaded(loaded, chosen)
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

    _check_environment()
    loaded = build_demo_model(seq_len=seq_len, batch=batch)
    cm, reference = _compile_loaded(loaded, "exact")
    console = Console(width=150)
    console.print(loaded.description)
    console.print(cm.report().table())
    compiled = _call(cm, loaded.example_inputs)
    error = relative_error(reference, compiled)
    t_orig = _time(lambda: _call(loaded.model, loaded.example_inputs), repeat)
    t_cc = _time(lambda: _call(cm, loaded.example_inputs), repeat)
    table = Table(title=f"original vs attncc exact, measured (torch {torch.__version__}, {torch.get_num_threads()} "
                        f"threads, batch {batch}, {seq_len} tokens, median of {repeat})", title_justify="left")
    for col in ("model", "measured time (ms)", "measured speedup", "rel. error vs original"):
        table.add_column(col, justify="right" if col != "model" else "left")
    table.add_row("original", f"{t_orig * 1e3:.1f}", "1.00x", "-")
    table.add_row("attncc exact", f"{t_cc * 1e3:.1f}", f"{t_orig / t_cc:.2f}x", f"{error:.2e}")
    console.print(table)


@cli.group()
def cache():
    """The kernel cache: generated Triton kernels and autotuning results (folder: ATTNCC_CACHE_DIR)."""


SUMMARY_FIRST = ("visit", "variant", "spec", "layout", "dtype", "d", "dv", "group", "causal")
"""Descriptor fields that say most about a kernel, shown first by ``attncc cache list``."""


def _entry_summary(descriptor: dict) -> str:
    """What an entry was generated for, compactly: the telling fields first, unset ones (None, False, empty)
    and bookkeeping (env, entry name, family, version) left out."""
    skip = {"entry", "env", "kernel", "configs", "family", "version"}
    names = [n for n in SUMMARY_FIRST if n in descriptor] + sorted(n for n in descriptor if n not in SUMMARY_FIRST)
    parts = []
    for name in names:
        value = descriptor[name]
        if name in skip or value in (None, False, "", "{}", {}, []):
            continue
        text = value if isinstance(value, str) and name in ("dtype", "variant", "spec", "visit", "layout") else (
            json.dumps(value, separators=(",", ":"), default=str))
        parts.append(f"{name}={text}")
    text = " ".join(parts)
    return text if len(text) <= 90 else text[:87] + "..."


@cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def cache_list(as_json):
    """List every cache entry: kind, key, kernel, what it was generated for, and whether it verifies."""
    from rich.console import Console
    from rich.table import Table

    from attncc.codegen.cache import default_cache

    store = default_cache()
    rows = []
    for path, entry in store.entries():
        if entry is None:
            rows.append({"kind": path.parent.name, "key": path.stem, "status": "damaged (will be rebuilt)",
                         "bytes": path.stat().st_size})
            continue
        descriptor = entry.descriptor
        kernel = descriptor.get("kernel", {}) if entry.kind == "tuning" else descriptor
        env = kernel.get("env", {})
        row = {"kind": entry.kind, "key": entry.key, "status": "ok", "bytes": path.stat().st_size,
               "entry": kernel.get("entry", ""), "arch": env.get("arch", ""), "what": _entry_summary(kernel)}
        if entry.kind == "tuning":
            row["what"] = f"bucket={descriptor.get('bucket')} best: {entry.payload.get('best', {}).get('params')}"
        rows.append(row)
    if as_json:
        click.echo(json.dumps({"folder": str(store.root), "entries": rows}, indent=2))
        return
    console = Console(width=160)
    if not rows:
        console.print(f"no entries in {store.root}")
        return
    table = Table(title=f"{len(rows)} entries in {store.root}", title_justify="left")
    for column in ("kind", "key", "kernel", "arch", "what", "bytes", "status"):
        table.add_column(column, justify="right" if column == "bytes" else "left",
                         overflow="fold" if column == "what" else "ellipsis")
    for row in rows:
        table.add_row(row["kind"], row["key"][:12], row.get("entry", ""), row.get("arch", ""), row.get("what", ""),
                      str(row["bytes"]), row["status"])
    console.print(table)


@cache.command("info")
def cache_info():
    """Where the cache is, what it holds, and the switches in effect."""
    from attncc.codegen.cache import default_cache, disk_enabled, hits_required

    store = default_cache()
    entries = store.entries()
    counts = {kind: sum(1 for p, _ in entries if p.parent.name == kind) for kind in ("kernel", "tuning")}
    damaged = sum(1 for _, e in entries if e is None)
    size = sum(p.stat().st_size for p, _ in entries)
    triton_dir = store.root / "triton"
    triton_size = sum(p.stat().st_size for p in triton_dir.rglob("*") if p.is_file()) if triton_dir.is_dir() else 0
    lines = [
        f"folder:            {store.root}",
        f"kernels:           {counts['kernel']}",
        f"tuning results:    {counts['tuning']}",
        f"damaged entries:   {damaged}",
        f"entry bytes:       {size}",
        f"triton binaries:   {triton_size} bytes in {triton_dir}",
        f"disk cache:        {'on' if disk_enabled() else 'off (ATTNCC_DISABLE_CACHE)'}",
        f"assert cache hit:  {'on (ATTNCC_ASSERT_CACHE_HIT)' if hits_required() else 'off'}",
    ]
    click.echo("\n".join(lines))


@cache.command("clear")
def cache_clear():
    """Delete the entries and the Triton binaries attncc wrote under the cache folder (nothing else there)."""
    from attncc.codegen.cache import default_cache

    store = default_cache()
    removed = store.clear()
    click.echo(f"removed {removed} entries from {store.root}")


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
        click.echo(f"attncc: error: {_first_line(error)}", err=True)
        return 2
    except Exception as error:  # out of memory is the user's size, not a bug: one line; anything else is a bug
        memory = _out_of_memory(error)
        if memory is None or os.environ.get("ATTNCC_DEBUG"):
            raise
        click.echo(f"attncc: error: out of memory: {type(memory).__name__}: {_first_line(memory)} "
                   f"(try a smaller --seq-len or --batch)", err=True)
        return 2
    return 0


def run() -> None:
    """Console-script wrapper: exit with main()'s status."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
