"""Export a model with its attention rewritten to a `.pt2` file, then load it in a new Python process.

    python examples/export_and_load.py                                   # a Llama-shaped decoder, local(window=128, sinks=4)
    python examples/export_and_load.py --policy exact -o /tmp/llama.pt2
    python examples/export_and_load.py --smoke

`attncc.export` captures the model with torch.export, rewrites its attention as `attncc.compile` would, and
exports the result again, so the `.pt2` holds the attncc ops (and fails, with the reason, rather than write the
original attention). The program takes any sequence length (`dynamic="seq"`). The loading process needs attncc and
torch only: not transformers, not the model's code. This script checks that the loaded program gives the outputs
of `attncc.compile` at two lengths, and exits 1 if it does not.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch

import attncc

LOAD_AND_RUN = """
import sys, torch, attncc
program = attncc.load(sys.argv[1])
for path in sys.argv[2:]:
    inputs = torch.load(path)
    out = program(**inputs)
    torch.save(out["logits"], path + ".out")
"""


def build_model(smoke: bool):
    """A Llama-shaped causal LM with random weights (no hub here; use ``from_pretrained`` with your own)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if smoke else \
        dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8)
    config = LlamaConfig(vocab_size=1000, num_key_value_heads=2, max_position_embeddings=4096, **size)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="local(window=128, sinks=4)")
    parser.add_argument("-o", "--output", help="the .pt2 file to write (default: a temporary file, removed after)")
    parser.add_argument("--seq-len", type=int, nargs=2, default=[512, 1024], metavar=("N1", "N2"),
                        help="the example length, and a second length the same program must serve")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that everything runs")
    args = parser.parse_args(argv)
    lengths = [24, 40] if args.smoke else args.seq_len
    policy = "local(window=8, sinks=2)" if args.smoke and args.policy == parser.get_default("policy") else args.policy
    if args.output and os.path.exists(args.output):
        print(f"export_and_load.py: error: {args.output} exists; remove it or choose another path", file=sys.stderr)
        return 2

    model = build_model(args.smoke)
    inputs = [{"input_ids": torch.randint(0, 1000, (1, n))} for n in lengths]
    program = attncc.export(model, policy, inputs[0], dynamic="seq")
    print(program.attncc_report)

    cm = attncc.compile(model, policy)
    with tempfile.TemporaryDirectory() as folder:
        path = args.output or os.path.join(folder, "model.pt2")
        torch.export.save(program, path)
        files = []
        for i, example in enumerate(inputs):
            files.append(os.path.join(folder, f"inputs{i}.pt"))
            torch.save(example, files[-1])
        # a new process: only attncc and torch, nothing of this one
        subprocess.run([sys.executable, "-c", LOAD_AND_RUN, path, *files], check=True)
        worst = 0.0
        for example, file in zip(inputs, files):
            loaded = torch.load(file + ".out")
            with torch.no_grad():
                compiled = cm(**example, use_cache=False).logits
                original = model(**example, use_cache=False).logits
            error = ((loaded - compiled).norm() / compiled.norm()).item()
            policy_error = ((loaded - original).norm() / original.norm()).item()
            worst = max(worst, error)
            print(f"{example['input_ids'].shape[1]:5d} tokens: loaded program vs attncc.compile, relative error "
                  f"{error:.1e} (vs the original model: {policy_error:.1e}, the policy's approximation)")
        size = os.path.getsize(path) / 2**20
        print(f"{path if args.output else 'the .pt2'}: {size:.1f} MiB, policy {policy}")
    if worst > 1e-5:
        print("error: the loaded program does not give attncc.compile's outputs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
