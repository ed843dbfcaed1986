"""Peak memory of generate() under ``local(window=W, sinks=S)``, with transformers' dynamic KV cache and with
attncc's bounded ``SinkWindowCache`` (StreamingLLM eviction), from 1K to 8K generated tokens.

    python benchmarks/decode_memory.py [--tokens 1024,2048,4096,8192] [--window 256] [--sinks 4]

A small Llama-shaped model with random weights (4 layers, 8 kv heads of 32 dims: 8 kB of keys and values per
token). Each (length, cache) runs in a fresh process: compile, a 16-token warm-up generate (the captures happen
there), then the measured generate. Columns:

* ``KV at end``: bytes of the keys and values the cache holds after generating (read off the cache);
* ``peak growth``: on CUDA, ``torch.cuda.max_memory_allocated`` during the measured generate minus the memory
  allocated before it; on CPU, the peak resident set size (``/proc/self/statm``, sampled every 2 ms by a
  thread) minus the resident size before it: everything the process allocated, not only tensors;
* ``same tokens``: whether the bounded run generated exactly the unbounded run's tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment_line  # noqa: E402

PROMPT = 64


def model_and_prompt():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=1024, max_position_embeddings=16384,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 1024, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device), ids.to(device)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakResident:
    """The largest resident set size seen while the block runs (sampled by a thread)."""

    def __enter__(self):
        self.peak, self.running = resident_bytes(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, resident_bytes())


def measure(tokens: int, bounded: bool, window: int, sinks: int) -> dict:
    """One measured generate in this process (see the module docstring)."""
    import attncc
    from attncc.kv_cache import SinkWindowCache

    model, ids = model_and_prompt()
    cm = attncc.compile(model, f"local(window={window}, sinks={sinks})", measure_error=False)

    def generate(n: int):
        cache = SinkWindowCache(window=window, sinks=sinks) if bounded else None
        extra = {"cache": cache} if cache is not None else {}
        with torch.no_grad():
            out = cm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              return_dict_in_generate=True, **extra)
        return out.sequences, getattr(out, "past_key_values", None) or cache

    generate(16)  # warm-up: prefill, first decode step, the step Dynamo makes the length dynamic
    cuda = ids.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resident_bytes()
    start = time.perf_counter()
    with PeakResident() as rss:
        out, cache = generate(tokens)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else rss.peak
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return {"tokens": tokens, "bounded": bounded, "peak_growth": peak - before, "seconds": seconds,
            "captures": cm.capture_count, "kv_bytes": held, "generated": out[0, PROMPT:].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1024,2048,4096,8192")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine OpenMP wake-ups dominate "
                             "the tiny decode ops)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: "tokens,bounded" measured in this process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        tokens, bounded = args.one.split(",")
        print(json.dumps(measure(int(tokens), bounded == "1", args.window, args.sinks)))
        return

    print(environment_line())
    print(f"model: Llama-shaped, 4 layers, hidden 256, 8 kv heads x 32 dims (8 kB KV per token), random weights; "
          f"prompt {PROMPT} tokens; policy local(window={args.window}, sinks={args.sinks}); greedy")
    device = "cuda (max_memory_allocated)" if torch.cuda.is_available() else "cpu (peak RSS, sampled)"
    print(f"peak growth measured on {device}, each run in a fresh process")
    print()
    header = f"{'generated':>9} | {'cache':>9} | {'KV at end':>10} | {'peak growth':>11} | {'time':>7} | " \
             f"{'captures':>8} | same tokens"
    print(header)
    print("-" * len(header))
    for tokens in [int(t) for t in args.tokens.split(",")]:
        runs = {}
        for bounded in (False, True):
            done = subprocess.run([sys.executable, __file__, "--one", f"{tokens},{int(bounded)}", "--window",
                                   str(args.window), "--sinks", str(args.sinks), "--threads", str(args.threads)],
                                  capture_output=True, text=True, check=True)
            runs[bounded] = json.loads(done.stdout.strip().splitlines()[-1])
        for bounded, run in runs.items():
            same = "-" if not bounded else str(run["generated"] == runs[False]["generated"])
            print(f"{tokens:>9} | {'bounded' if bounded else 'dynamic':>9} | {run['kv_bytes'] / 1e6:>7.2f} MB | "
                  f"{run['peak_growth'] / 1e6:>8.1f} MB | {run['seconds']:>6.1f}s | {run['captures']:>8} | {same}")


if __name__ == "__main__":
    main()
