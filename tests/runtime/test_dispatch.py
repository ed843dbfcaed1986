"""Backend selection: ATTNCC_BACKEND, CUDA vs CPU tensors, and the calls that always take the torch path."""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.errors import AttnccError
from attncc.runtime import dispatch


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 20, 16, generator=g) for _ in range(3)]


def test_auto_runs_cpu_tensors_on_torch(monkeypatch, qkv):
    monkeypatch.delenv("ATTNCC_BACKEND", raising=False)
    assert dispatch.selected_backend() == "auto"
    assert dispatch.backend_for(qkv[0]) == "torch"


def test_unknown_backend_is_one_clear_error(monkeypatch, qkv):
    monkeypatch.setenv("ATTNCC_BACKEND", "cuda")
    with pytest.raises(AttnccError, match="ATTNCC_BACKEND='cuda' is not a backend: choose one of auto, triton, torch"):
        attncc.attention(*qkv)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch, qkv):
    monkeypatch.setenv("ATTNCC_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(AttnccError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        attncc.attention(*qkv)


def test_forced_torch_never_loads_kernels(monkeypatch, qkv):
    monkeypatch.setenv("ATTNCC_BACKEND", "torch")
    calls = []
    monkeypatch.setattr("attncc.runtime.triton_backend.triton_attention", lambda *a: calls.append(a))
    out = attncc.attention(*qkv, variant="local(window=4)")
    assert out.shape == (1, 2, 20, 16) and not calls


def test_triton_backend_gets_the_call_and_backward_does_not(monkeypatch, qkv):
    monkeypatch.setenv("ATTNCC_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seen = []

    def fake(spec, q, k, v, mods):
        seen.append(str(spec))
        return None  # "no kernel covers this": the torch path runs

    monkeypatch.setattr("attncc.runtime.triton_backend.triton_attention", fake)
    expected = attncc.attention(*qkv, variant="local(window=4)", causal=True)
    assert seen == ["local(window=4)"]
    q = qkv[0].clone().requires_grad_()
    out = attncc.attention(q, *qkv[1:], variant="local(window=4)", causal=True)
    assert len(seen) == 2  # the forward of a differentiable call runs the kernels too
    out.sum().backward()
    assert len(seen) == 2 and q.grad is not None  # backward recomputes on the torch path
    torch.testing.assert_close(out.detach(), expected)


@pytest.mark.parametrize("variant", ["exact", "local(window=4, sinks=1)", "linear"])
def test_kernel_forward_and_torch_backward_give_the_torch_gradients(monkeypatch, qkv, variant):
    """The kernels are forward-only: under autograd the forward runs on them and backward recomputes on the
    torch path, so gradients equal the torch backend's."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    grads = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("ATTNCC_BACKEND", backend)
        leaves = [t.clone().requires_grad_() for t in qkv]
        out = attncc.attention(*leaves, variant=variant, causal=True)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads[backend] = (out.detach(), *[t.grad for t in leaves])
    for have, want in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-5)


def test_a_shape_no_kernel_config_fits_falls_back_to_torch_with_a_warning(monkeypatch, qkv):
    from attncc.codegen.autotune import NoRunnableConfig

    monkeypatch.setenv("ATTNCC_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def too_big(*args, **kwargs):
        raise NoRunnableConfig("autotune: no config of softmax_attention_fwd runs: out of shared memory")

    monkeypatch.setattr("attncc.codegen.softmax.softmax_attention", too_big)
    with pytest.warns(UserWarning, match="runs on the PyTorch path: no kernel config fits this GPU"):
        out = attncc.attention(*qkv, causal=True)
    monkeypatch.setenv("ATTNCC_BACKEND", "torch")
    torch.testing.assert_close(out, attncc.attention(*qkv, causal=True))
