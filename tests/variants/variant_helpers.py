"""Helpers shared by the variant tests: random inputs, key-padding masks, the pooled-remainder test shapes, a
relative-RMS error, and a probe for the largest tensor."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def random_qkv(b, hq, hkv, n, d, dv=None, dtype=torch.float32, seed=0, nk=None):
    """q ``[b, hq, n, d]``, k ``[b, hkv, nk, d]``, v ``[b, hkv, nk, dv]`` from a seeded generator (``nk``
    defaults to ``n``)."""
    gen = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    nk = n if nk is None else nk
    q = torch.randn(b, hq, n, d, generator=gen)
    k = torch.randn(b, hkv, nk, d, generator=gen)
    v = torch.randn(b, hkv, nk, dv, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def key_padding(n, lengths):
    """Bool key-padding mask ``[len(lengths), 1, 1, n]``: row r keeps its first ``lengths[r]`` keys."""
    return (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).view(len(lengths), 1, 1, n)


POOLED_CASES = [
    # id, n, hq, hkv, causal, padded: the shapes the pooled-remainder variants are checked on against their oracles
    ("n37-gqa-bidir", 37, 4, 2, False, False),
    ("n37-gqa-causal-padded", 37, 4, 2, True, True),
    ("n100-mha-bidir-padded", 100, 2, 2, False, True),
    ("n100-mqa-causal", 100, 4, 1, True, False),
]


def assert_gradients_match(spec, q, k, v, bias, weight, **mods):
    """Gradients of ``sum(out * weight)`` w.r.t. q, k, v and bias: ``spec.forward`` against
    ``spec.reference`` with ``ScoreMods(bias=bias, **mods)`` (rtol 1e-4, atol 1e-5)."""
    from attncc.variants.base import ScoreMods

    grads = []
    for fn in (spec.forward, spec.reference):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, bias)]
        out = fn(*leaves[:3], ScoreMods(bias=leaves[3], **mods))
        grads.append(torch.autograd.grad((out * weight).sum(), leaves))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def rel_rms(a, b) -> float:
    """``rms(a - b) / rms(b)`` in float64."""
    a, b = a.double(), b.double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12))


class LargestTensor(TorchDispatchMode):
    """Records in ``largest`` the element count of the largest tensor any op produces inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
