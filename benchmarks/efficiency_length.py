"""Efficiency length of ``local(window=256)`` on a Llama-shaped model, on this machine (``attncc bench``'s measure).

    python benchmarks/efficiency_length.py [--seq-len 256,512,1024,2048,4096,8192] [--attn eager sdpa]
                                           [--repeat 3] [--no-memory] [--smoke]

The efficiency length is the shortest measured length from which on the policy's median time beats the original
model's at every longer measured length (the CAB benchmark's crossover). The model: transformers' LlamaModel with
random weights, hidden 256, 2 layers, 4 heads of 64, intermediate 688, batch 1, fp32. ``--attn`` chooses the
original's attention (transformers' eager code holds [N, N] scores; sdpa is PyTorch's fused kernel, the stronger
baseline). Prints a rich table per attention implementation and a markdown summary with device, versions, sizes
and date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment_line  # noqa: E402

SIZES = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
             intermediate_size=688, vocab_size=1024)
POLICY = "local(window=256)"


def llama_shaped(seq_len: int, batch: int = 1, attn: str = "eager"):
    """(LlamaModel with SIZES and random weights, {"input_ids": [batch, seq_len], "use_cache": False})."""
    import torch
    from transformers import AutoModel, LlamaConfig

    config = LlamaConfig(**SIZES, max_position_embeddings=max(seq_len, 2048))
    torch.manual_seed(0)
    model = AutoModel.from_config(config, attn_implementation=attn).eval()
    ids = torch.randint(0, SIZES["vocab_size"], (batch, seq_len))
    return model, {"input_ids": ids, "use_cache": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", default="256,512,1024,2048,4096,8192")
    parser.add_argument("--attn", choices=("eager", "sdpa"), nargs="+", default=["eager", "sdpa"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny lengths, one round (for the suite)")
    args = parser.parse_args()
    lengths = [32, 64] if args.smoke else [int(n) for n in args.seq_len.split(",")]
    repeat = 1 if args.smoke else args.repeat

    from rich.console import Console

    from attncc.bench import run_bench

    console = Console(width=170)
    spec = f"{Path(__file__).resolve()}:llama_shaped"
    summary = []
    for attn in args.attn:
        result = run_bench(spec, [POLICY], lengths, repeat=repeat, attn=attn, memory=not args.no_memory)
        console.print(result.table())
        for line in result.efficiency_lines():
            console.print(f"{attn}: {line}", markup=False, highlight=False)
        summary.append((attn, result))
    print_markdown(summary)


def print_markdown(summary) -> None:
    """One markdown table (lengths x attention implementation) for the README."""
    first = summary[0][1]
    env = first.environment
    sizes = ", ".join(f"{k}={v}" for k, v in SIZES.items())
    print(f"\n{environment_line()} | {env['cpu']}, {env['cores']} cores | transformers {env['transformers']} | "
          f"load average {env['load_average']} at the start | {env['date']}")
    print(f"LlamaModel ({sizes}), batch 1, fp32, median of {first.repeat} interleaved rounds; "
          f"peak memory: {first.memory_method}\n")
    print("| original attention | tokens | original ms | local(window=256) ms | measured speedup | cosine | "
          "original peak MB | local peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for attn, result in summary:
        for length in result.seq_lens:
            original, local = (next(r for r in result.rows if r.seq_len == length and r.model == name)
                               for name in ("original", POLICY))
            if original.status != "ok":
                print(f"| {attn} | {length} | {original.status} | | | | | |")
                continue
            print(f"| {attn} | {length} | {original.median_ms:.1f} | {local.median_ms:.1f} | "
                  f"{_speedup(local.speedup)} | {local.cosine:.4f} | {_mb(original.peak_memory_bytes)} | "
                  f"{_mb(local.peak_memory_bytes)} |")
    print()
    for attn, result in summary:
        print(f"- original {attn}: {result.efficiency_lines()[0]}")


def _speedup(value) -> str:
    from attncc.bench import speedup_text

    return speedup_text(value)


def _mb(count) -> str:
    return "-" if count is None else f"{count / 1e6:.1f}"


if __name__ == "__main__":
    main()
