"""Real model code whose attention the detector used to miss or refuse: diffusers' attention dispatch (SDPA
called with keywords only) and transformers' BLOOM eager attention (scores viewed to 4-D for mask and softmax,
probabilities viewed back for the product with v). Each is rewritten exactly (fp32, relative L2 <= 1e-5).
The minimal forms are in tests/passes/test_forms_keywords.py and test_forms_refused.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "passes"))
from forms_helpers import assert_same_outputs, compile_form, count_ops, rand, run_model  # noqa: E402


def test_diffusers_attention_dispatch_keywords():
    """diffusers' attention dispatch (native backend) calls SDPA with keywords only; a tiny Flux transformer
    (one joint block, one single block) has two such sites."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()
    image, text = 16, 6
    inputs = dict(hidden_states=rand(1, image, 4, seed=1), encoder_hidden_states=rand(1, text, 16, seed=2),
                  pooled_projections=rand(1, 16, seed=3), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(image, 3), txt_ids=torch.zeros(text, 3), return_dict=False)
    want = run_model(model, inputs)
    cm = compile_form(model, inputs, "dynamo")
    rep = cm.report()
    assert len(rep.sites) == 2 and not rep.rejected, rep
    assert all(s.source == "sdpa" and s.q_len == image + text and s.q_heads == 2 for s in rep.sites)
    assert count_ops(cm) == 2
    assert_same_outputs(run_model(cm, inputs), want)


def test_bloom_eager_is_rewritten_exactly():
    """transformers' BloomAttention (eager): ALiBi baddbmm on [B*H, N, N], 4-D view for the mask, view back."""
    from transformers import BloomConfig, BloomModel

    torch.manual_seed(0)
    config = BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4, attn_implementation="eager")
    model = BloomModel(config).eval()
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    inputs = {"input_ids": ids, "attention_mask": mask}
    want = run_model(model, inputs).last_hidden_state
    cm = compile_form(model, inputs, "dynamo")
    rep = cm.report()
    assert len(rep.sites) == config.n_layer and not rep.rejected, rep
    assert count_ops(cm) == config.n_layer
    assert all(s.layout == "(bh)nd" and s.q_heads == 1 for s in rep.sites)
    got = run_model(cm, inputs).last_hidden_state
    # rows of padding queries are fully masked (their output is undefined in both); compare the real tokens
    keep = mask.bool()
    assert_same_outputs(got[keep], want[keep])
