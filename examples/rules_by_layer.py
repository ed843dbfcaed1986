"""A policy written as rules by layer (examples/rules.yaml) applied to a Llama-style decoder.

    python examples/rules_by_layer.py                        # a 6-layer Llama-shaped model, random weights, 2048 tokens
    python examples/rules_by_layer.py --model path/to/hf_dir --policy my_rules.yaml
    python examples/rules_by_layer.py --smoke                # tiny sizes

Prints which variant each layer got (and why, where a rule could not apply), the error each approximate site
measured on the first call, and the end-to-end difference in the logits against the original model.
"""

from __future__ import annotations

import argparse
import os

import torch

import attncc

HERE = os.path.dirname(os.path.abspath(__file__))


def build_model(path: str | None, smoke: bool):
    """A transformers causal LM: from ``path`` (a local folder) or a Llama-shaped config with random weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if path:
        return AutoModelForCausalLM.from_pretrained(path).eval()
    if smoke:
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2)
    else:
        config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local transformers model folder (default: a random Llama-shaped model)")
    parser.add_argument("--policy", default=os.path.join(HERE, "rules.yaml"), help="a rules file (.yaml/.json)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that everything runs")
    args = parser.parse_args(argv)
    policy = attncc.Policy.from_file(args.policy)  # a bad rule is one error naming the rule and the field
    seq_len = 600 if args.smoke else args.seq_len  # above the rules' min_len, so the local rule really runs

    model = build_model(args.model, args.smoke)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len))
    inputs = {"input_ids": ids, "use_cache": False}
    cm = attncc.compile(model, policy, example_inputs=inputs)
    with torch.no_grad():
        reference = model(**inputs).logits
        logits = cm(**inputs).logits
    print(cm.report())
    for site in cm.report().sites:
        print(f"  {site.module:32s} {site.variant}")
    error = ((logits - reference).norm() / reference.norm()).item()
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"logits: relative L2 error {error:.2e} vs the original, same next-token prediction at {agree:.1%} "
          f"of {seq_len} positions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
