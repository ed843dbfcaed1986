"""A Hugging Face LLM at long context under `local(window, sinks)`: prefill, then `generate()` with a bounded cache.

    python examples/llm_long_context.py                              # a Llama-shaped model, 4096-token prompt
    python examples/llm_long_context.py --model path/to/hf_dir --prompt-len 16384 --window 1024
    python examples/llm_long_context.py --smoke

Three runs of greedy generation from the same prompt:
1. the original model;
2. `attncc.compile(model, "exact")`: its tokens must equal the original's (the script exits 1 otherwise);
3. `local(window=W, sinks=S)` (StreamingLLM's pattern: each token sees the first S tokens and the last W) through
   the Hugging Face path, `attn_implementation="attncc"`, with `attncc.kv_cache.SinkWindowCache`, which keeps only
   those S + W keys per layer, so memory stays flat however many tokens are generated. Its tokens are compared
   with the original's: the policy is an approximation, and the script says how far.
The weights are random unless you pass --model (no hub on this machine), so agreement figures say nothing about a
trained model's quality there: run it on yours.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import attncc
import attncc.hf
from attncc.kv_cache import SinkWindowCache


def load(path: str | None, smoke: bool, attn: str):
    """A causal LM from a local folder, or a Llama-shaped config with random weights (seeded: the same weights for
    every ``attn``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if path:
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if smoke else \
        dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8)
    config = LlamaConfig(vocab_size=1000, num_key_value_heads=2, max_position_embeddings=65536, **size)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn).eval()


def generate(model, ids: torch.Tensor, new_tokens: int, **kwargs) -> tuple[torch.Tensor, float]:
    """Greedy continuation of ``ids [1, N]``: the new tokens ``[new_tokens]`` and the wall time in seconds."""
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, **kwargs)
    return out[0, ids.shape[1]:], time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local transformers causal-LM folder (default: random Llama-shaped)")
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that everything runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompt_len, args.new_tokens, args.window, args.sinks = 48, 16, 16, 2

    model = load(args.model, args.smoke, "sdpa")
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_len))
    original, t_original = generate(model, ids, args.new_tokens)

    cm = attncc.compile(model, "exact")
    exact, t_exact = generate(cm, ids, args.new_tokens)
    print(cm.report())

    policy = f"local(window={args.window}, sinks={args.sinks})"
    with attncc.hf.registered(policy):
        local_model = load(args.model, args.smoke, attncc.hf.NAME)
        cache = SinkWindowCache(window=args.window, sinks=args.sinks)
        local, t_local = generate(local_model, ids, args.new_tokens, cache=cache)
        print(attncc.hf.report(local_model))
    kept = cache.layers[0].keys.shape[-2]

    def agreement(tokens: torch.Tensor) -> str:
        same = (tokens == original).float().mean().item()
        first = next((i for i, (a, b) in enumerate(zip(tokens.tolist(), original.tolist())) if a != b), None)
        return f"{same:.0%} of tokens equal" + ("" if first is None else f", first difference at new token {first}")

    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, torch {torch.__version__}")
    rows = [("original", t_original, "-"),
            ("attncc exact (compile; time includes capture)", t_exact, agreement(exact)),
            (f"attncc {policy} (attn_implementation='attncc')", t_local,
             f"{agreement(local)}; the cache holds {kept} keys per layer (sinks + window) instead of "
             f"{args.prompt_len + args.new_tokens}")]
    for name, seconds, note in rows:
        print(f"  {name:66s} {seconds:7.2f} s  {note}")
    if not torch.equal(exact, original):
        print("error: attncc exact changed the generated tokens", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
