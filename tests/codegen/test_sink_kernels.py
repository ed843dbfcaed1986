"""Learned sink logits in the online-softmax kernels (dense, band, block layouts, top-k, neighborhood) against
the variants' dense oracles, through the Triton backend's dispatch (``triton_attention``).

Small sizes in Triton's CPU interpreter without a GPU (tests/codegen/conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from attncc.errors import AttnccError
from attncc.runtime.triton_backend import triton_attention
from attncc.variants.base import ScoreMods
from attncc.variants.block_sparse import BigBirdPattern, BlockSparseSpec, mask_mod_pattern
from attncc.variants.exact import ExactSpec
from attncc.variants.linear import LinearSpec
from attncc.variants.local import LocalSpec
from attncc.variants.neighborhood import NeighborhoodSpec
from attncc.variants.topk import TopKSpec
from tests.variants.variant_helpers import random_qkv, rel_rms

B, HQ, HKV, D = 1, 4, 2, 16
SINKS = torch.tensor([-1.0, 0.5, 2.0, 4.0])


def even(q_idx, kv_idx):
    return (q_idx + kv_idx) % 2 == 0


CASES = {
    # id: (spec, tokens, causal)
    "dense": (ExactSpec(), 40, False),
    "dense_causal": (ExactSpec(), 40, True),
    "band_prefix_globals": (LocalSpec(window=5, sinks=2, globals=1), 40, False),
    "band_causal": (LocalSpec(window=7), 40, True),
    "layout_bigbird": (BlockSparseSpec(BigBirdPattern(window=1, globals=1, random=0), block=16), 48, False),
    "layout_mask_mod": (BlockSparseSpec(mask_mod_pattern(even), block=16), 40, True),
    "topk": (TopKSpec(block=16, density=0.5), 48, True),
    "neighborhood": (NeighborhoodSpec(kernel=3, grid=(4, 6), globals=1), 25, False),
}


def inputs(n: int, device, dtype=torch.float32, seed: int = 0):
    q, k, v = random_qkv(B, HQ, HKV, n, D, dtype=dtype, seed=seed)
    return q.to(device), k.to(device), v.to(device)


@pytest.mark.parametrize("name", CASES)
def test_kernels_add_the_sink_to_the_denominator(name, device):
    spec, n, causal = CASES[name]
    q, k, v = inputs(n, device)
    mods = ScoreMods(scale=D ** -0.5, causal=causal, sinks=SINKS.to(device))
    out = triton_attention(spec, q, k, v, mods)
    assert out is not None
    torch.testing.assert_close(out, spec.reference(q, k, v, mods), atol=2e-5, rtol=1e-4)


def test_padding_mask_empty_row_and_dominant_sink(device):
    """A row with no visible key is zeros; a sink far above every score (m moves to it first: no overflow)
    leaves tiny finite outputs; a padding mask and bias ride along."""
    n = 33
    q, k, v = inputs(n, device, seed=3)
    mask = torch.ones(B, HQ, n, n, dtype=torch.bool, device=device)
    mask[:, :, 5] = False  # query row 5 sees nothing
    bias = torch.randn(B, 1, n, n, generator=torch.Generator().manual_seed(1)).to(device)
    sinks = torch.tensor([60.0, -3.0, 0.0, 1.0], device=device)
    mods = ScoreMods(scale=D ** -0.5, bias=bias, mask=mask, sinks=sinks)
    out = triton_attention(ExactSpec(), q, k, v, mods)
    assert torch.isfinite(out).all()
    assert out[:, :, 5].abs().max() == 0
    torch.testing.assert_close(out, ExactSpec().reference(q, k, v, mods), atol=2e-5, rtol=1e-4)


def test_bf16_with_a_shared_sink(device):
    q, k, v = inputs(40, device, dtype=torch.bfloat16, seed=4)
    mods = ScoreMods(scale=D ** -0.5, causal=True, sinks=torch.tensor([1.5], device=device))
    out = triton_attention(LocalSpec(window=9), q, k, v, mods)
    assert rel_rms(out.float(), LocalSpec(window=9).reference(q, k, v, mods).float()) < 2e-2


def test_linear_kernels_refuse_sinks(device):
    q, k, v = inputs(32, device)
    with pytest.raises(AttnccError, match="no softmax denominator"):
        triton_attention(LinearSpec(), q, k, v, ScoreMods(scale=D ** -0.5, sinks=SINKS.to(device)))


def test_without_sinks_the_source_is_unchanged():
    """The sink epilogue is only in kernels for calls with sinks (other cached kernels keep their source)."""
    from attncc.codegen.softmax import SoftmaxPlan, generate_source

    plain = SoftmaxPlan(dtype="tl.float32", d=16, block_d=16, dv=16, block_dv=16, group=1, causal=False,
                        softcap=False, bias=None, mask=None, visit="dense")
    with_sinks = SoftmaxPlan(**{**plain.__dict__, "sinks": True})
    assert "Sinks" not in generate_source(plain) and "sink" not in generate_source(plain)
    assert "tl.load(Sinks + off_h)" in generate_source(with_sinks)
    assert math.isclose(len(generate_source(with_sinks).splitlines()) - len(generate_source(plain).splitlines()),
                        7, abs_tol=1)
