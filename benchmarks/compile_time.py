"""Capture and detection+rewrite time for a 32-layer Llama-shaped model (random weights, CPU).

    python benchmarks/compile_time.py [--layers 32] [--seq-len 128] [--attn eager|sdpa] [--repeat 3]

Capture is Dynamo's (transformers models defeat symbolic_trace), timed as the first call of the model under
``torch.compile`` with a backend that only keeps the graph; detection+rewrite is attncc's pass pipeline
(canonicalize, detect, plan, rewrite) on that graph. Target: detection+rewrite < 1 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment_line  # noqa: E402

from attncc.passes import run_pipeline  # noqa: E402
from attncc.policy import Policy  # noqa: E402


def llama(layers: int, attn: str):
    from transformers import AutoModel, LlamaConfig

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096)
    torch.manual_seed(0)
    return AutoModel.from_config(config, attn_implementation=attn).eval()


def capture(model, ids) -> tuple[list, float]:
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    start = time.perf_counter()
    with torch.no_grad():
        torch.compile(model, backend=keep)(input_ids=ids, use_cache=False)
    return graphs, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--attn", choices=("eager", "sdpa"), nargs="+", default=["eager", "sdpa"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"attncc compile time, Llama-shaped {args.layers} layers (hidden 256, 8 heads, 2 kv heads), "
                        f"{args.seq_len} tokens\n{environment_line()}", title_justify="left")
    for col in ("attn", "graphs", "nodes", "sites", "capture (s)", "detect+rewrite (s)", "target < 1 s"):
        table.add_column(col, justify="right" if col != "attn" else "left")
    ids = torch.randint(0, 1024, (1, args.seq_len))
    for attn in args.attn:
        model = llama(args.layers, attn)
        graphs, capture_s = capture(model, ids)
        times, sites = [], 0
        for _ in range(args.repeat):
            start = time.perf_counter()
            results = [run_pipeline(gm, Policy("exact"), i) for i, gm in enumerate(graphs)]
            times.append(time.perf_counter() - start)
            sites = sum(len(r.sites) for r in results)
        rewrite_s = statistics.median(times)
        nodes = sum(len(gm.graph.nodes) for gm in graphs)
        table.add_row(attn, str(len(graphs)), str(nodes), str(sites), f"{capture_s:.2f}", f"{rewrite_s:.3f}",
                      "met" if rewrite_s < 1.0 else "MISSED")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
