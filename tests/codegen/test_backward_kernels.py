"""The softmax backward kernels (``attncc.codegen.softmax_backward``) through the op's autograd on the triton
backend, against ``torch.autograd.grad`` through the same variant's torch path.

Small sizes in Triton's CPU interpreter without a GPU (tests/codegen/conftest.py); every case also checks that
the kernels ran (a silent fallback to the torch path would compare the torch path with itself).
"""

from __future__ import annotations

import pytest
import torch

import attncc
from attncc.codegen import softmax_backward as backward_module
from attncc.codegen.softmax_backward import pack_layout_rows
from attncc.variants.blocks import BlockLayout
from tests.variants.variant_helpers import rel_rms


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the backward kernel launches (``softmax_backward`` calls) of the test."""
    calls = []
    real = backward_module.softmax_backward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(backward_module, "softmax_backward", counting)
    return calls


def make_inputs(n, hq=2, hkv=1, d=16, dv=None, dtype=torch.float32, bias=None, sinks=False, seed=0, device="cpu",
                nk=None, batch=1):
    """q, k, v (and bias, sinks) as leaves that need gradients, and a fixed output gradient."""
    gen = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    nk = n if nk is None else nk
    tensors = {"q": torch.randn(batch, hq, n, d, generator=gen), "k": torch.randn(batch, hkv, nk, d, generator=gen),
               "v": torch.randn(batch, hkv, nk, dv, generator=gen)}
    if bias is not None:
        tensors["bias"] = torch.randn(*bias, generator=gen)
    if sinks:
        tensors["sinks"] = torch.randn(hq, generator=gen)
    grad_out = torch.randn(batch, hq, n, dv, generator=gen)
    leaves = {name: t.to(device=device, dtype=dtype if name in "qkv" else torch.float32).requires_grad_()
              for name, t in tensors.items()}
    return leaves, grad_out.to(device=device, dtype=dtype)


def gradients(backend, monkeypatch, leaves, grad_out, **kwargs):
    """``torch.autograd.grad`` of ``attncc.attention`` on ``backend`` w.r.t. every leaf."""
    monkeypatch.setenv("ATTNCC_BACKEND", backend)
    inputs = {name: t.detach().clone().requires_grad_() for name, t in leaves.items()}
    out = attncc.attention(inputs["q"], inputs["k"], inputs["v"], bias=inputs.get("bias"),
                           sinks=inputs.get("sinks"), **kwargs)
    return dict(zip(inputs, torch.autograd.grad(out, list(inputs.values()), grad_out)))


def even(q_idx, kv_idx):
    return (q_idx + kv_idx) % 2 == 0


def padding(n: int) -> torch.Tensor:
    mask = torch.ones(1, 1, 1, n, dtype=torch.bool)
    mask[..., n - n // 3:] = False
    return mask


CASES = {
    # id: (n, input options, attention options)
    "dense_n1": (1, {}, {}),
    "dense_gqa_dv": (63, dict(hq=4, hkv=2, d=16, dv=8), {}),
    "cross_causal_batch2": (20, dict(nk=33, batch=2, dv=8), dict(causal=True)),
    "causal_n100": (100, {}, dict(causal=True)),
    "dense_bias_mask_softcap": (40, dict(hq=2, bias=(1, 2, 40, 40)), dict(mask=padding(40), softcap=3.0)),
    "causal_bias_rows_sinks": (37, dict(hq=4, hkv=2, d=24, bias=(1, 1, 1, 37), sinks=True),
                               dict(causal=True)),
    "local_prefix_globals": (40, {}, dict(variant="local(window=5, sinks=2, globals=1)")),
    "local_causal_sinks": (40, dict(sinks=True), dict(variant="local(window=7)", causal=True)),
    "block_sparse_bigbird": (40, dict(hq=2, hkv=1, bias=(1, 2, 40, 40)),
                             dict(variant="block_sparse(pattern=bigbird(window=1, globals=1, random=0), block=16)")),
    "topk_causal_gqa": (40, dict(hq=4, hkv=2), dict(variant="topk(block=16, density=0.5)", causal=True)),
    "topk_mask_softcap": (45, {}, dict(variant="topk(block=16, density=0.5)", mask=padding(45), softcap=4.0)),
    "neighborhood": (13, dict(dv=8), dict(variant="neighborhood(kernel=3, grid=(3, 4), globals=1)")),
}


@pytest.mark.parametrize("name", CASES)
def test_kernel_gradients_match_the_torch_path_fp32(name, monkeypatch, kernel_calls, device):
    n, input_options, options = CASES[name]
    leaves, grad_out = make_inputs(n, device=device, **input_options)
    options = {key: (value.to(device) if isinstance(value, torch.Tensor) else value) for key, value in options.items()}
    want = gradients("torch", monkeypatch, leaves, grad_out, **options)
    assert not kernel_calls
    got = gradients("triton", monkeypatch, leaves, grad_out, **options)
    assert len(kernel_calls) == 1, "the backward kernels did not run"
    assert set(got) == set(leaves)
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=2e-5, msg=lambda m: f"d{key}: {m}")


def test_block_sparse_mask_mod_gradients(monkeypatch, kernel_calls, device):
    """A mask_mod pattern: its predicate runs in the partial entries of both the dQ and the dK/dV walk."""
    leaves, grad_out = make_inputs(40, hq=2, hkv=2, device=device)
    from attncc.variants.block_sparse import BlockSparseSpec, mask_mod_pattern

    variant = str(BlockSparseSpec(mask_mod_pattern(even), block=16))
    want = gradients("torch", monkeypatch, leaves, grad_out, variant=variant, causal=True)
    got = gradients("triton", monkeypatch, leaves, grad_out, variant=variant, causal=True)
    assert len(kernel_calls) == 1
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("dtype, variant", [(torch.float16, "exact"), (torch.bfloat16, "exact"),
                                            (torch.bfloat16, "local(window=9)")])
def test_half_precision_gradients(dtype, variant, monkeypatch, kernel_calls, device):
    """fp16/bf16 against the float32 torch path: relative RMS error at the dtype's rounding level."""
    leaves, grad_out = make_inputs(48, hq=2, hkv=1, dtype=dtype, sinks=True, device=device)
    exact32 = {name: t.detach().float().requires_grad_() for name, t in leaves.items()}
    want = gradients("torch", monkeypatch, exact32, grad_out.float(), variant=variant, causal=True)
    got = gradients("triton", monkeypatch, leaves, grad_out, variant=variant, causal=True)
    assert len(kernel_calls) == 1
    limit = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for key in got:
        assert got[key].dtype == leaves[key].dtype
        assert rel_rms(got[key].float(), want[key]) < limit, key


def test_shared_sink_gets_the_sum_of_the_heads(monkeypatch, kernel_calls, device):
    """``sinks`` of shape [1] (one logit for every head): its gradient is the heads' sum."""
    leaves, grad_out = make_inputs(20, hq=3, hkv=1, device=device)
    leaves["sinks"] = torch.tensor([0.7], device=device, requires_grad=True)
    want = gradients("torch", monkeypatch, leaves, grad_out, causal=True)
    got = gradients("triton", monkeypatch, leaves, grad_out, causal=True)
    assert len(kernel_calls) == 1
    assert got["sinks"].shape == (1,)
    torch.testing.assert_close(got["sinks"], want["sinks"], rtol=1e-4, atol=1e-5)


def test_only_requested_gradients(monkeypatch, kernel_calls, device):
    """Gradients of v only: the kernels run, and q, k, bias get none."""
    leaves, grad_out = make_inputs(20, bias=(1, 1, 20, 20), device=device)
    monkeypatch.setenv("ATTNCC_BACKEND", "triton")
    q, k = leaves["q"].detach(), leaves["k"].detach()
    v = leaves["v"].detach().clone().requires_grad_()
    out = attncc.attention(q, k, v, bias=leaves["bias"].detach())
    (dv,) = torch.autograd.grad(out, [v], grad_out)
    assert len(kernel_calls) == 1
    monkeypatch.setenv("ATTNCC_BACKEND", "torch")
    v2 = leaves["v"].detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(attncc.attention(q, k, v2, bias=leaves["bias"].detach()), [v2], grad_out)
    torch.testing.assert_close(dv, want, rtol=1e-4, atol=1e-5)


def test_variants_without_backward_kernels_recompute(monkeypatch, kernel_calls, device):
    """linear has no softmax backward kernel, and 3-D inputs are not covered: both recompute on the torch path
    (same gradients as the torch backend), the kernels never run."""
    leaves, grad_out = make_inputs(20, device=device)
    want = gradients("torch", monkeypatch, leaves, grad_out, variant="linear")
    got = gradients("triton", monkeypatch, leaves, grad_out, variant="linear")
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
    flat = {name: t[:, 0].detach().requires_grad_() for name, t in leaves.items()}
    want = gradients("torch", monkeypatch, flat, grad_out[:, 0])
    got = gradients("triton", monkeypatch, flat, grad_out[:, 0])
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
    assert not kernel_calls


def test_torch_backend_on_cpu_saves_no_output(monkeypatch, kernel_calls):
    """Without ATTNCC_BACKEND=triton, CPU calls keep today's behaviour: the torch path's recompute."""
    monkeypatch.delenv("ATTNCC_BACKEND", raising=False)
    leaves, grad_out = make_inputs(20)
    out = attncc.attention(leaves["q"], leaves["k"], leaves["v"], causal=True)
    assert out.grad_fn is not None
    out.backward(grad_out)
    assert not kernel_calls


def test_transposed_layout_lists_the_query_blocks_of_each_key_block():
    """pack_layout_rows(transposed=True) inverts the forward rows: key block kb lists exactly the query
    blocks whose row holds kb, with the slot where it sits, partial entries first."""
    kv = torch.tensor([[[0, 2, -1], [1, 2, 0], [2, -1, -1]]])          # [H=1, nQB=3, K=3]
    partial = torch.tensor([[[False, True, False], [False, False, True], [True, False, False]]])
    layout = BlockLayout(16, 16, 48, 48, kv, partial)
    rows, width = pack_layout_rows(layout, 16, 16, transposed=True, with_partial=True)
    assert rows.shape == (1, 1, 3, 2 + 2 * width)
    listed = {}
    for kb in range(3):
        n_partial, n = rows[0, 0, kb, :2].tolist()
        blocks = rows[0, 0, kb, 2:2 + n].tolist()
        slots = rows[0, 0, kb, 2 + width:2 + width + n].tolist()
        listed[kb] = (n_partial, list(zip(blocks, slots)))
    assert listed == {0: (1, [(1, 2), (0, 0)]), 1: (0, [(1, 0)]), 2: (2, [(0, 1), (2, 0), (1, 1)])}
    forward, _ = pack_layout_rows(layout, 16, 16, transposed=False, with_partial=False)
    assert forward[0, 0, :, :2].tolist() == [[0, 2], [0, 3], [0, 1]]
    assert forward[0, 0, 1, 2:5].tolist() == [0, 1, 2]


def test_compiled_backward_runs_the_kernels(monkeypatch, kernel_calls, device):
    """Under torch.compile (AOT autograd traces the backward), the kernels run as the opaque op
    ``attncc::attention_backward`` and give the torch path's gradients."""
    leaves, grad_out = make_inputs(20, hq=2, hkv=1, device=device)
    want = gradients("torch", monkeypatch, leaves, grad_out, causal=True)
    monkeypatch.setenv("ATTNCC_BACKEND", "triton")
    inputs = [leaves[name].detach().clone().requires_grad_() for name in "qkv"]

    def attend(q, k, v):
        return torch.ops.attncc.attention(q, k, v, causal=True, scale=16 ** -0.5)

    torch._dynamo.reset()
    out = torch.compile(attend, backend="aot_eager", fullgraph=True)(*inputs)
    got = torch.autograd.grad(out, inputs, grad_out)
    torch._dynamo.reset()
    assert len(kernel_calls) == 1
    for name, grad in zip("qkv", got):
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=2e-5)


def test_large_layout_blocks_are_walked_as_sub_tiles(device):
    """A topk layout of block 32 walked as 16 x 16 sub-tiles (``max_tile=16``; on a GPU 128 -> 64) gives the
    gradients of the walk at the layout's own block."""
    from attncc.codegen.backward_visits import backward_visit
    from attncc.codegen.softmax_backward import refined_layout, softmax_backward
    from attncc.variants.base import ScoreMods
    from attncc.variants.topk import TopKSpec

    leaves, grad_out = make_inputs(50, hq=2, hkv=1, device=device)
    q, k, v = (leaves[name].detach() for name in "qkv")
    spec, mods = TopKSpec(block=32, density=0.5), ScoreMods(scale=0.25, causal=True)
    visit = backward_visit(spec, q, k, v, mods)
    out = spec.forward(q, k, v, mods)
    whole = softmax_backward(q, k, v, out, grad_out, mods, visit, max_tile=32)
    split = softmax_backward(q, k, v, out, grad_out, mods, visit, max_tile=16)
    for a, b in zip(whole[:3], split[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    fine = refined_layout(visit.layout_for(32, 32), 16)
    assert (fine.block_q, fine.block_k) == (16, 16) and fine.kv_blocks.shape[-2] == 4  # ceil(50 / 16)
    assert int(fine.kv_blocks.max()) == 3
