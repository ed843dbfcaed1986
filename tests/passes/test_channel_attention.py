"""Channel attention (a softmax over the feature axis) is recognized as such and runs exact only.

XCiT's cross-covariance attention and Restormer's transposed attention compute ``q @ k^T`` with q, k of shape
``[B, H, D, N]``: the contraction runs over the tokens and the softmax over feature channels. It is exact
attention in form, so the exact rewrite applies; but a local window or a top-k choice over its "keys" would
sparsify over channels. The detector follows the contracted axis back to the projection (``site.axis``), plan
keeps every approximate variant off such a site with the reason, and the report's kind says "channel".
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attncc.passes.plan import CHANNEL_ATTENTION
from forms_helpers import FRONTENDS, assert_same_outputs, compile_form, count_ops, count_softmax_like, rand, run_model

APPROXIMATE = ("local(window=2)", "topk(density=0.25)")


class CrossCovariance(nn.Module):
    """XCiT's XCA: tokens [B, N, C] -> q, k, v [B, H, C/H, N]; scores [B, H, C/H, C/H]."""

    def __init__(self, dim: int = 32, heads: int = 4, fused: bool = False):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.temperature = nn.Parameter(torch.linspace(0.5, 2.0, heads).view(heads, 1, 1))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 4, 1).unbind(0)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.fused:
            out = F.scaled_dot_product_attention(q * self.temperature, k, v, scale=1.0)
        else:
            out = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1) @ v
        return self.proj(out.permute(0, 3, 1, 2).reshape(b, n, c))


class ConvChannelAttention(nn.Module):
    """Restormer's transposed attention: q, k, v from a 1x1 conv, [B, C, h, w] -> [B, H, C/H, h*w]."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).reshape(b, c, h, w))


class ConvTokenAttention(ConvChannelAttention):
    """The near-miss: the same conv projections, attention over the h*w tokens (contracting the channels)."""

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w).transpose(-2, -1) for t in (q, k, v))
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1)
        out = (attn @ v).transpose(-2, -1).reshape(b, c, h, w)
        return self.proj(out)


class TokenAttention(CrossCovariance):
    """The near-miss: the same projections, ordinary attention over the tokens."""

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def _tokens():
    return (rand(2, 9, 32, seed=1),)


def _image():
    return (rand(2, 16, 4, 4, seed=2),)


CHANNEL = [
    pytest.param(CrossCovariance, _tokens, id="xca"),
    pytest.param(lambda: CrossCovariance(fused=True), _tokens, id="xca_sdpa"),
    pytest.param(ConvChannelAttention, _image, id="conv_channel"),
]


def _check_channel_sites(cm, model, inputs, policy):
    rep = cm.report()
    assert count_ops(cm) == len(rep.sites) >= 1 and count_softmax_like(cm) == 0, cm.code()
    for site in rep.sites:
        assert site.kind == "channel", site
        assert site.variant == "exact", site
        if policy != "exact":
            assert CHANNEL_ATTENTION in site.reason, site.reason
    assert_same_outputs(run_model(cm, inputs), run_model(model, inputs))


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("policy", ("exact",) + APPROXIMATE)
@pytest.mark.parametrize("make,inputs", CHANNEL)
def test_channel_attention_runs_exact_only(make, inputs, policy, frontend):
    model, inputs = make().eval(), inputs()
    cm = compile_form(model, inputs, frontend, policy=policy)
    _check_channel_sites(cm, model, inputs, policy)


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("make,inputs", [pytest.param(TokenAttention, _tokens, id="linear"),
                                         pytest.param(ConvTokenAttention, _image, id="conv")])
def test_token_attention_with_the_same_projections_is_not_channel(make, inputs, frontend):
    model, inputs = make().eval(), inputs()
    cm = compile_form(model, inputs, frontend, policy="local(window=2)")
    (site,) = cm.report().sites
    assert site.kind == "self" and site.variant.startswith("local"), site


def test_xcit_channel_sites_stay_exact():
    """timm's XCiT: every XCA block is channel attention; its class-attention layers are token attention."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("xcit_nano_12_p16_224", pretrained=False, img_size=32, depth=2, cls_attn_layers=1,
                              num_classes=10).eval()
    inputs = (rand(2, 3, 32, 32, seed=3),)
    want = run_model(model, inputs)
    for policy, frontend in (("exact", "fx"), ("topk(density=0.25)", "fx"), ("local(window=2)", "dynamo")):
        cm = compile_form(model, inputs, frontend, policy=policy)
        rep = cm.report()
        xca = [s for s in rep.sites if s.module.startswith("blocks.")]
        assert [s.module for s in xca] == ["blocks.0.attn", "blocks.1.attn"], rep
        assert all(s.kind == "channel" and s.variant == "exact" for s in xca), rep
        if policy != "exact":
            assert all(CHANNEL_ATTENTION in s.reason for s in xca)
        assert all(s.kind != "channel" for s in rep.sites if s.module.startswith("cls_attn_blocks."))
        assert count_ops(cm) == len(rep.sites) and not rep.rejected
        assert_same_outputs(run_model(cm, inputs), want)


def test_reshape_that_merges_and_splits_maps_each_axis_to_its_source():
    """[N, B, E] viewed as [N, B*H, D] (torch.ao's quantizable MHA): D is part of E (features), not of B."""
    from attncc.passes.detect.axis import reshape_axis as _reshape_axis

    assert _reshape_axis((5, 2, 16), (5, 4, 8), 2) == 2
    assert _reshape_axis((5, 2, 16), (5, 4, 8), 1) == 1
    assert _reshape_axis((7, 12), (7, 3, 4), 2) == 1  # heads split from features
    assert _reshape_axis((2, 3, 4, 5), (2, 3, 20), 2) == 2  # H and W flattened: the outermost stands for it


def test_quantizable_multihead_attention_is_token_attention():
    from torch.ao.nn.quantizable import MultiheadAttention

    torch.manual_seed(0)
    model = MultiheadAttention(16, 2).eval()
    x = torch.randn(5, 2, 16)
    inputs = {"query": x, "key": x, "value": x, "need_weights": False}
    cm = compile_form(model, inputs, "dynamo", policy="local(window=1)")
    (site,) = cm.report().sites
    assert site.kind == "self" and site.variant.startswith("local"), site
