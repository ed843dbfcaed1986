"""The linear-attention backward kernels (``attncc.codegen.linear_backward``) against torch autograd of the
variant's PyTorch path (``LinearSpec.forward``), in Triton's interpreter at tiny sizes: causal and
bidirectional, elu and relu, odd lengths (1, 63), GQA, Dv != D, padded head dims, key-padding masks,
Nq != Nk, batch-1 k/v."""

from __future__ import annotations

import pytest
import torch

from attncc.codegen.linear import linear_attention
from attncc.codegen.linear_backward import backward_covers, linear_attention_backward
from attncc.errors import AttnccError
from attncc.variants.base import ScoreMods
from attncc.variants.linear import LinearSpec


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CASES = [
    # fmap, causal, (hq, hkv), nq, nk, d, dv, mask, batch
    ("elu", True, (4, 2), 63, 63, 16, 32, True, 2),
    ("relu", True, (2, 2), 40, 40, 48, 16, False, 1),
    ("elu", True, (1, 1), 1, 1, 16, 16, False, 1),
    ("elu", False, (3, 1), 30, 50, 16, 48, True, 1),
    ("relu", False, (2, 2), 64, 64, 16, 16, False, 2),
    ("elu", True, (2, 1), 33, 33, 80, 48, True, 1),  # D_pad + Dv_pad > 128: dk and dv in kernels of their own
]


def _id(case):
    fmap, causal, (hq, hkv), nq, nk, d, dv, mask, batch = case
    kind = "causal" if causal else "bidir"
    return f"{fmap}-{kind}-h{hq}:{hkv}-nq{nq}-nk{nk}-d{d}-dv{dv}{'-mask' if mask else ''}-b{batch}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_gradients_match_autograd_of_the_torch_path(case, device):
    fmap, causal, (hq, hkv), nq, nk, d, dv, mask, batch = case
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, hq, nq, d, generator=gen)
    k = torch.randn(batch, hkv, nk, d, generator=gen)
    v = torch.randn(batch, hkv, nk, dv, generator=gen)
    grad = torch.randn(batch, hq, nq, dv, generator=gen)
    keep = None
    if mask:
        keep = torch.rand(batch, 1, 1, nk, generator=gen) > 0.3
        keep[..., 0] = True
    q, k, v, grad = (x.to(device) for x in (q, k, v, grad))
    keep = keep.to(device) if keep is not None else None
    spec = LinearSpec(fmap)
    mods = ScoreMods(scale=0.25, causal=causal, mask=keep)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    spec.forward(*leaves, mods).backward(grad)
    out = linear_attention(spec, q, k, v, mods)
    got = linear_attention_backward(spec, q, k, v, mods, out, grad)
    for name, mine, want in zip(("dq", "dk", "dv"), got, (x.grad for x in leaves)):
        assert mine.shape == want.shape and mine.dtype == want.dtype, name
        torch.testing.assert_close(mine, want, atol=1e-4, rtol=1e-3, msg=name)


def test_batch_one_kv_gets_gradients_summed_over_the_batch(device):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 20, 16, generator=gen).to(device)
    k, v = (torch.randn(1, 1, 20, 16, generator=gen).to(device) for _ in range(2))
    grad = torch.randn(2, 2, 20, 16, generator=gen).to(device)
    spec, mods = LinearSpec("elu"), ScoreMods(scale=0.25, causal=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    spec.forward(*leaves, mods).backward(grad)
    got = linear_attention_backward(spec, q, k, v, mods, linear_attention(spec, q, k, v, mods), grad)
    for mine, leaf in zip(got, leaves):
        torch.testing.assert_close(mine, leaf.grad, atol=1e-4, rtol=1e-3)


def test_uncovered_specs_are_declined_loudly():
    q = torch.randn(1, 1, 8, 16)
    assert "window" in backward_covers(LinearSpec("elu", window=4), ScoreMods(scale=0.25))
    assert "taylor" in backward_covers(LinearSpec("taylor"), ScoreMods(scale=0.25))
    assert backward_covers(LinearSpec("relu"), ScoreMods(scale=0.25)) == ""
    with pytest.raises(AttnccError, match="taylor"):
        linear_attention_backward(LinearSpec("taylor"), q, q, q, ScoreMods(scale=0.25), q, q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_gradients_are_close(dtype, device):
    gen = torch.Generator().manual_seed(2)
    q, k, v, grad = (torch.randn(1, 2, 50, 16, generator=gen).to(device) for _ in range(4))
    spec, mods = LinearSpec("elu"), ScoreMods(scale=0.25, causal=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    spec.forward(*leaves, mods).backward(grad)
    low = [x.to(dtype) for x in (q, k, v)]
    got = linear_attention_backward(spec, *low, mods, linear_attention(spec, *low, mods), grad.to(dtype))
    for mine, leaf in zip(got, leaves):
        assert mine.dtype == dtype
        err = (mine.float() - leaf.grad).norm() / leaf.grad.norm()
        assert err < (1e-2 if dtype == torch.float16 else 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_real_size_gradients_match_autograd(causal):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 4096, 128, generator=gen).cuda() * 128 ** -0.5
    k = torch.randn(2, 2, 4096, 128, generator=gen).cuda() * 128 ** -0.5
    v = torch.randn(2, 2, 4096, 128, generator=gen).cuda()
    grad = torch.randn(2, 8, 4096, 128, generator=gen).cuda()
    spec, mods = LinearSpec("elu"), ScoreMods(scale=128 ** -0.5, causal=causal)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    spec.forward(*leaves, mods).backward(grad)
    low = [x.bfloat16() for x in (q, k, v)]
    got = linear_attention_backward(spec, *low, mods, linear_attention(spec, *low, mods), grad.bfloat16())
    for mine, leaf in zip(got, leaves):
        assert mine.isfinite().all()
        assert ((mine.float() - leaf.grad).norm() / leaf.grad.norm()) < 3e-2
