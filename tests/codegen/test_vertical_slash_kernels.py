"""The vertical-slash Triton kernel against the variant's dense-mask oracle, directly and through the Triton
backend's dispatch, and what its ``covers`` leaves to the PyTorch path.

Tiny sizes: without a GPU the kernel runs in Triton's CPU interpreter (tests/codegen/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from attncc.codegen.registry import kernel
from attncc.codegen.vertical_slash import vertical_slash_attention
from attncc.runtime.triton_backend import triton_attention
from attncc.variants.base import ScoreMods
from attncc.variants.exact import ExactSpec
from attncc.variants.vertical_slash import VerticalSlashSpec
from tests.variants.variant_helpers import random_qkv

TIGHT = dict(rtol=1e-5, atol=1e-5)
SPEC = VerticalSlashSpec(vertical=5, slash=6, last_q=4)


def _padding(n: int) -> torch.Tensor:
    keep = torch.ones(2, 1, 1, n, dtype=torch.bool)
    keep[1, ..., n // 2 + 1:] = False
    return keep


CASES = {
    # id: (Nq, Nk, ScoreMods fields)
    "bidirectional": (17, 17, {}),
    "causal+padding+softcap": (21, 21, {"causal": True, "mask": _padding(21), "softcap": 2.0}),
    "sinks+padding": (19, 19, {"sinks": torch.tensor([-1.0, 2.0]), "mask": _padding(19)}),
    "decode": (3, 26, {"mask": _padding(26)}),
    "one token": (1, 1, {"causal": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_the_reference(case, device):
    nq, nk, fields = CASES[case]
    q, k, v = random_qkv(2, 2, 1, nq, 16, dv=8, seed=len(case), nk=nk)  # GQA, Dv != D
    mods = ScoreMods(scale=0.3, **fields)
    want = SPEC.reference(q, k, v, mods)
    moved = ScoreMods(scale=0.3, **{name: t.to(device) if isinstance(t, torch.Tensor) else t
                                    for name, t in fields.items()})
    got = vertical_slash_attention(SPEC, q.to(device), k.to(device), v.to(device), moved)
    torch.testing.assert_close(got.cpu(), want, **TIGHT)


def test_kernel_exact_limit_through_the_backend(device):
    n = 17
    q, k, v = (t.to(device) for t in random_qkv(1, 2, 1, n, 16, seed=4))
    mods = ScoreMods(scale=0.25, causal=True)
    got = triton_attention(VerticalSlashSpec.exact_limit(n), q, k, v, mods)
    assert got is not None, "the backend ran the PyTorch path instead of the kernel"
    torch.testing.assert_close(got.cpu(), ExactSpec().reference(q.cpu(), k.cpu(), v.cpu(), mods), **TIGHT)


def test_covers_leaves_bias_and_pair_masks_to_the_pytorch_path(device):
    q, k, v = (t.to(device) for t in random_qkv(2, 2, 2, 8, 16, seed=5))
    found = kernel("vertical_slash")
    assert found is not None and found.run is vertical_slash_attention
    assert found.covers(SPEC, q, k, v, ScoreMods(scale=0.3, mask=_padding(8).to(device))) == ""
    why = found.covers(SPEC, q, k, v, ScoreMods(scale=0.3, bias=torch.zeros(1, 2, 8, 8, device=device)))
    assert "bias" in why
    why = found.covers(SPEC, q, k, v, ScoreMods(scale=0.3, mask=torch.ones(2, 1, 8, 8, dtype=torch.bool, device=device)))
    assert "key-padding" in why
    assert triton_attention(SPEC, q, k, v, ScoreMods(scale=0.3, bias=torch.zeros(1, 2, 8, 8, device=device))) is None
