"""``attncc calibrate MODEL --max-error 0.01 --data texts.txt -o plan.json``: choose a variant per attention head
within an end-to-end error budget, measured on the user's texts, and save the plan.

The plan (``attncc.calibration.plan.Plan``) runs with ``attncc.compile(model, "plan.json")`` or ``--policy
plan.json`` in ``attncc inspect``, ``bench`` and ``export``. The calibration itself is ``attncc.calibrate(model,
attncc.auto(...), data=batches, held_out=...)``; this command reads and tokenizes the texts, prints the plan and
writes the file.
"""

from __future__ import annotations

import importlib
import inspect as pyinspect
from pathlib import Path
from typing import Any, Callable, Optional

import click

from attncc.cli.common import QUIET_HELP, check_environment, quiet_capture
from attncc.errors import AttnccError

METRICS = ("cosine", "rel_l2", "logits_kl")

RANDOM_INPUTS_NOTE = ("attncc: calibrating on the model's example inputs (random tokens or pixels): the errors "
                      "measured on them say little about real inputs; pass --data with texts like yours")


@click.command()
@click.argument("model", metavar="MODEL")
@click.option("--max-error", type=click.FloatRange(min=0, min_open=True), required=True,
              help="The end-to-end error budget, in --metric units (e.g. 0.01 = 1 - cosine of 0.01).")
@click.option("--metric", type=click.Choice(METRICS), default="cosine", show_default=True,
              help="How the model's output is compared with the original's: 1 - cosine of the pooled output, "
                   "relative L2, or the KL divergence of the logits.")
@click.option("--target-len", type=click.IntRange(min=2), default=None,
              help="The sequence length to plan for: texts are truncated and padded to it, and variants are "
                   "timed at it (default: the longest text of each batch).")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A text file, one calibration text per line (blank lines skipped); needs an hf:LOCAL_DIR model "
                   "with a tokenizer. Without it: the model's example inputs.")
@click.option("--held-out", "held_out_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Texts (same format) not used to choose, only to measure the plan's error on.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Texts per batch.")
@click.option("--output", "-o", required=True, metavar="PATH", help="The plan file to write (.json).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--attn", type=click.Choice(["eager", "sdpa"]), default="eager", show_default=True,
              help="attn_implementation for hf: models.")
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
def calibrate(model, max_error, metric, target_len, data_path, held_out_path, batch, output, force, attn, quiet):
    """Choose a variant per attention head of MODEL so that its output stays within --max-error of the
    original's, as fast as the time model predicts; write the plan to OUTPUT.

    MODEL is one of: demo | timm:NAME | hf:MODEL_TYPE | hf:LOCAL_DIR | path/to/file.py:factory.
    """
    from attncc import progress
    from attncc.cli.inspect import check_output_path

    if not output.lower().endswith(".json"):
        raise AttnccError(f"the plan is JSON: give OUTPUT a .json name (got {output})")
    check_output_path(output, force)
    check_environment()
    data_texts = read_texts(data_path, "--data") if data_path else None
    held_texts = read_texts(held_out_path, "--held-out") if held_out_path else None
    auto, run_calibration = load_calibrator()
    click.get_current_context().with_resource(progress.quiet(quiet))
    with progress.steps("attncc calibrate", total=3) as step, quiet_capture():
        loaded, tokenizer = load_with_tokenizer(model, target_len, batch, attn, needs_tokenizer=bool(data_texts
                                                                                                  or held_texts))
        step.advance("model loaded")
        if data_texts is None:
            click.echo(RANDOM_INPUTS_NOTE, err=True)
            data = [loaded.example_inputs]
        else:
            data = text_batches(tokenizer, loaded.model, data_texts, batch, target_len)
        held_out = text_batches(tokenizer, loaded.model, held_texts, batch, target_len) if held_texts else None
        step.advance("texts tokenized")
        plan = run_calibration(loaded.model, auto(max_error=max_error, metric=metric, target_len=target_len),
                               data=data, held_out=held_out, progress=not quiet)
        step.advance("calibrated")
    plan.save(output, overwrite=force)
    print_plan(plan, model, loaded.description)
    click.echo(f"wrote {output}: {len(plan.sites)} site(s); run it with attncc.compile(model, {output!r}) or "
               f"--policy {output}")


def load_calibrator() -> tuple[Callable, Callable]:
    """``(auto, calibrate)`` from ``attncc.calibration.auto`` (imported here, when the command runs)."""
    try:
        module = importlib.import_module("attncc.calibration.auto")
    except ImportError as error:
        raise AttnccError(f"this attncc has no calibrator (attncc.calibration.auto: {error})") from None
    return module.auto, module.calibrate


def read_texts(path: str, option: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped; AttnccError when there are none."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise AttnccError(f"{option} {path}: not a UTF-8 text file") from None
    except OSError as error:
        raise AttnccError(f"{option} {path}: cannot read it: {error.strerror or error}") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise AttnccError(f"{option} {path}: no texts (one text per line; blank lines are skipped)")
    return texts


def load_with_tokenizer(spec: str, target_len: Optional[int], batch: int, attn: str, needs_tokenizer: bool):
    """``(LoadedModel, tokenizer or None)``; a tokenizer is loaded only when texts need one, and only an
    ``hf:LOCAL_DIR`` model has one (``AutoTokenizer.from_pretrained(LOCAL_DIR)``)."""
    from attncc.models import load_model

    directory = spec[len("hf:"):] if spec.startswith("hf:") else None
    if needs_tokenizer and (directory is None or not Path(directory).is_dir()):  # said before building anything
        raise AttnccError(f"{spec} has no tokenizer: --data and --held-out need an hf:LOCAL_DIR model whose "
                          f"directory holds one (or calibrate without --data, on the model's example inputs)")
    loaded = load_model(spec, seq_len=target_len, batch=batch, attn=attn)
    if not needs_tokenizer:
        return loaded, None
    if not any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
        # (transformers 5 would build a tokenizer of special tokens only from config.json: every word unknown)
        raise AttnccError(f"{spec} has no usable tokenizer in {directory} (none of {', '.join(TOKENIZER_FILES)}); "
                          f"--data and --held-out need one: save it there with tokenizer.save_pretrained()")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as error:  # transformers raises many types for a directory without a usable tokenizer
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AttnccError(f"{spec} has no usable tokenizer in {directory} ({type(error).__name__}: {first}); "
                          f"--data and --held-out need one") from None
    return loaded, tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
"""Files one of which a folder holding a transformers tokenizer has."""


def text_batches(tokenizer, model, texts: list[str], batch: int, target_len: Optional[int]) -> list[dict]:
    """Keyword batches of ``batch`` texts each: token tensors truncated to ``target_len`` and padded to it (to
    the longest text of the batch when None), only the keys ``model.forward`` takes."""
    accepted = _forward_parameters(model)
    limit = target_len or _max_length(tokenizer, model)
    batches = []
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start:start + batch], padding="max_length" if target_len else True,
                            truncation=True, max_length=limit, return_tensors="pt")
        batches.append({key: value for key, value in encoded.items() if accepted is None or key in accepted})
    _warn_if_mostly_unknown(tokenizer, batches)
    return batches


def _warn_if_mostly_unknown(tokenizer, batches: list[dict]) -> None:
    """Say so when most real tokens are the tokenizer's unknown token: the texts do not fit its vocabulary, and
    calibrating on them measures little."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is None:
        return
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    found = sum(int((b["input_ids"] == unknown).sum()) for b in batches)
    if real and found > real / 2:
        click.echo(f"attncc: warning: {found} of {real} tokens are the tokenizer's unknown token: these texts do "
                   f"not fit its vocabulary, and errors measured on them say little", err=True)


def _forward_parameters(model) -> Optional[set[str]]:
    """The keyword names ``model.forward`` takes; None when it takes ``**kwargs`` (every name)."""
    params = pyinspect.signature(model.forward).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _max_length(tokenizer, model) -> int:
    """The longest input the model takes: its position table, else the tokenizer's limit, else 512."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    limit = getattr(tokenizer, "model_max_length", None)
    found = [n for n in (positions, limit) if isinstance(n, int) and 0 < n < 1_000_000]
    return min(found) if found else 512


def print_plan(plan: Any, spec: str, description: str) -> None:
    """The plan as the user reads it: per site the heads per variant, the predicted speedup, the measured
    end-to-end errors and the plan's notes."""
    from rich.console import Console

    console = Console(width=150)
    console.print(description, markup=False, highlight=False)
    console.print(plan_table(plan, spec))
    for line in plan_summary(plan):
        console.print(line, markup=False, highlight=False)


def plan_table(plan: Any, spec: str):
    """A rich Table, one row per site: heads per variant, predicted error, predicted time exact -> plan."""
    from rich.table import Table

    length = f" at {plan.target_len} tokens" if plan.target_len else ""
    table = Table(title=f"plan for {spec} ({plan.model}): {plan.metric} error <= {plan.max_error}{length}",
                  title_justify="left")
    for column in ("site", "heads per variant", "pred. error", "pred. time exact -> plan"):
        table.add_column(column, overflow="fold")
    for module, heads in plan.sites.items():
        exact = [_exact_time(choice) for choice in heads]
        time_text = "-"
        if all(t is not None for t in exact):
            time_text = f"{sum(exact) * 1e3:.3g} ms -> {sum(c.time_s for c in heads) * 1e3:.3g} ms"
        counts = plan.heads_per_variant(module)
        table.add_row(module or "<root>", ", ".join(f"{n} x {variant}" for variant, n in counts.items()),
                      f"{sum(c.error for c in heads):.2e}", time_text)
    return table


def plan_summary(plan: Any) -> list[str]:
    """The lines under the table: predicted speedup, measured errors (calibration, held-out), notes."""
    speedup = plan.predicted_speedup()
    lines = [f"predicted attention speedup: {speedup:.2f}x (time model, at the target length)" if speedup
             else "predicted attention speedup: not known (no exact timing recorded)"]
    for name in ("calibration", "held_out"):
        found = plan.measured.get(name)
        label = name.replace("_", "-")
        if isinstance(found, dict):
            lines.append(f"measured {plan.metric} error on {label} data: mean {found.get('mean')}, worst "
                         f"{found.get('worst')} ({found.get('texts')} text(s))")
        elif name == "held_out":
            lines.append("measured error on held-out data: none given (--held-out)")
    return lines + [f"note: {note}" for note in plan.notes]


def _exact_time(choice) -> Optional[float]:
    for candidate in choice.considered:
        if candidate.get("variant") == "exact" and isinstance(candidate.get("time_s"), (int, float)):
            return float(candidate["time_s"])
    return None
