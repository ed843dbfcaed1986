"""The linear-attention Triton kernels (``attncc.codegen.linear``) against the variant's dense oracle
(``LinearSpec.reference``) and its torch path (``LinearSpec.forward``).

Without a GPU the kernels run in Triton's CPU interpreter (see conftest.py), so the sizes here are small:
lengths 1, 63, 100 (and 64/128, where every tile is whole), head dims 16/48/80, Dv != D, GQA 4:1, Nq != Nk,
key-padding masks, each feature map causal and bidirectional, with and without the softmax window. The
``gpu`` tests repeat the main cases at real sizes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from attncc.codegen.linear import _Plan, _scan_source, _window_source, linear_attention
from attncc.errors import AttnccError
from attncc.variants.base import ScoreMods
from attncc.variants.linear import LinearSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "variants"))
from variant_helpers import rel_rms  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Small tensors: one intra-op thread never waits on a descheduled second one (busy 2-core machines)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(b, hq, hkv, nq, nk, d, dv, dtype=torch.float32, device="cpu", seed=0, mask=False):
    """q ``[b, hq, nq, d]``, k ``[b, hkv, nk, d]``, v ``[b, hkv, nk, dv]`` and, with ``mask``, a key-padding
    mask ``[b, 1, 1, nk]`` keeping about 70% of the keys (and always key 0)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=gen)
    k = torch.randn(b, hkv, nk, d, generator=gen)
    v = torch.randn(b, hkv, nk, dv, generator=gen)
    keep = None
    if mask:
        keep = torch.rand(b, 1, 1, nk, generator=gen) > 0.3
        keep[..., 0] = True
        keep = keep.to(device)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), keep


def _case(fmap, causal, n, d, dv=None, window=0, heads=(2, 2), mask=False, batch=1, nk=None):
    """A pytest param with a readable id, e.g. ``elu-causal-n63-d48-dv80-gqa4:1-mask``."""
    dv = d if dv is None else dv
    parts = [fmap, "causal" if causal else "bidir", f"n{n}" if nk is None else f"nq{n}-nk{nk}", f"d{d}"]
    parts += [f"dv{dv}"] if dv != d else []
    parts += [f"w{window}"] if window else []
    parts += [f"gqa{heads[0]}:{heads[1]}"] if heads[0] != heads[1] else []
    parts += ["mask"] if mask else []
    parts += [f"b{batch}"] if batch != 1 else []
    args = dict(fmap=fmap, causal=causal, nq=n, nk=n if nk is None else nk, d=d, dv=dv, window=window,
                heads=heads, mask=mask, batch=batch)
    return pytest.param(args, id="-".join(parts))


def _run(case, dtype=torch.float32, device="cpu"):
    """Kernel output, oracle output and the torch path's output for one case."""
    hq, hkv = case["heads"]
    q, k, v, keep = _inputs(case["batch"], hq, hkv, case["nq"], case["nk"], case["d"], case["dv"], dtype, device,
                            mask=case["mask"])
    spec = LinearSpec(case["fmap"], window=case["window"])
    mods = ScoreMods(scale=ScoreMods.default_scale(q), causal=case["causal"], mask=keep)
    out = linear_attention(spec, q, k, v, mods)
    assert out.shape == (case["batch"], hq, case["nq"], case["dv"]) and out.dtype == dtype
    return out, spec.reference(q, k, v, mods), spec.forward(q, k, v, mods)


# -- float32 against the oracle ------------------------------------------------------------------------------

FP32_CASES = [
    # causal chunked scan
    _case("elu", True, 100, 16),
    _case("elu", True, 63, 48, dv=80, heads=(4, 1)),
    _case("elu", True, 1, 16),
    _case("elu", True, 64, 16, batch=2),  # whole chunks: the generated scan has no row masks
    _case("relu", True, 100, 80, dv=16, mask=True),
    _case("taylor", True, 100, 16, dv=32, heads=(4, 1)),
    _case("taylor", True, 63, 48, mask=True),
    _case("taylor", True, 1, 16),
    # bidirectional: global state, then the queries read it
    _case("elu", False, 100, 16, mask=True),
    _case("relu", False, 63, 80, dv=48, heads=(4, 1)),
    _case("taylor", False, 100, 16),
    _case("taylor", False, 128, 16, dv=48, mask=True),  # whole key splits and query blocks
    _case("elu", False, 1, 16),
    _case("relu", False, 30, 16, nk=70),
    # hybrid: exact softmax inside the window, linear outside, one denominator
    _case("elu", True, 100, 16, window=7, mask=True),
    _case("relu", True, 63, 48, dv=16, window=20, heads=(4, 1)),
    _case("taylor", True, 100, 16, window=20),
    _case("elu", False, 100, 16, dv=48, window=9, mask=True),
    _case("taylor", False, 63, 16, window=9, heads=(4, 1), mask=True),
    _case("relu", False, 100, 16, window=200),  # window >= N: exact softmax attention
    _case("elu", True, 1, 16, window=5),
    _case("relu", False, 1, 48, window=3),
    _case("elu", False, 40, 16, nk=100, window=7, mask=True),
    _case("taylor", False, 100, 16, nk=40, window=7),
]


@pytest.mark.parametrize("case", FP32_CASES)
def test_float32_matches_reference(case, device):
    out, ref, forward = _run(case, torch.float32, device)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out, forward, atol=2e-5, rtol=1e-4)


# -- float16 / bfloat16 ----------------------------------------------------------------------------------------

LOW_CASES = [
    _case("elu", True, 100, 48, dv=80, heads=(4, 1)),
    _case("taylor", True, 63, 16, mask=True),
    _case("relu", False, 100, 16, mask=True),
    _case("elu", True, 100, 16, window=9),
    _case("taylor", False, 63, 16, dv=32, window=9),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", LOW_CASES)
def test_half_precision_matches_reference(case, dtype, device):
    out, ref, _ = _run(case, dtype, device)
    assert rel_rms(out, ref) < (1e-2 if dtype == torch.float16 else 2e-2)


def test_float16_long_sums_stay_in_range(device):
    """A state summing hundreds of keys' ``phi(k) v`` (values ~100) exceeds float16's 65504: the kernels scale
    it (and taylor's large intra-chunk weights) before the float16 dots."""
    for fmap, causal in (("elu", True), ("taylor", False)):
        q, k, v, _ = _inputs(1, 1, 1, 700, 700, 16, 16, torch.float16, device)
        q, k, v = q * 2, k * 2, v + 100
        spec = LinearSpec(fmap)
        mods = ScoreMods(scale=0.25, causal=causal)
        out = linear_attention(spec, q, k, v, mods)
        assert out.isfinite().all()
        assert rel_rms(out, spec.reference(q, k, v, mods)) < 1e-2


# -- semantics at the edges ---------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [0, 6], ids=["linear", "hybrid"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_fully_masked_batch_gives_zeros(causal, window, device):
    q, k, v, _ = _inputs(2, 2, 1, 50, 50, 16, 16, device=device)
    keep = torch.ones(2, 1, 1, 50, dtype=torch.bool, device=device)
    keep[1] = False
    spec = LinearSpec("relu", window=window)
    mods = ScoreMods(scale=0.25, causal=causal, mask=keep)
    out = linear_attention(spec, q, k, v, mods)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out, spec.reference(q, k, v, mods), atol=2e-5, rtol=1e-4)


def test_relu_rows_without_overlap_are_zero(device):
    q, k, v, _ = _inputs(1, 1, 1, 40, 40, 16, 16, device=device)
    out = linear_attention(LinearSpec("relu"), -q.abs(), k, v, ScoreMods(scale=0.25, causal=True))
    assert torch.equal(out, torch.zeros_like(out))


def test_shared_kv_batch_and_strided_inputs(device):
    """k/v with batch 1 for a batch-2 q and a non-contiguous q are read in place through their strides."""
    q, k, v, _ = _inputs(2, 4, 2, 50, 50, 16, 16, device=device)
    strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    keep = torch.rand(2, 1, 1, 50, generator=torch.Generator().manual_seed(1)) > 0.5
    spec = LinearSpec("elu", window=5)
    mods = ScoreMods(scale=0.3, mask=keep.to(device))
    out = linear_attention(spec, strided, k[:1], v[:1], mods)
    torch.testing.assert_close(out, spec.reference(q, k[:1], v[:1], mods), atol=2e-5, rtol=1e-4)


def test_empty_sequences_give_empty_or_zero_output(device):
    q, k, v, _ = _inputs(1, 2, 2, 8, 8, 16, 16, device=device)
    spec = LinearSpec("elu")
    assert linear_attention(spec, q[:, :, :0], k, v, ScoreMods(scale=0.25)).shape == (1, 2, 0, 16)
    out = linear_attention(spec, q, k[:, :, :0], v[:, :, :0], ScoreMods(scale=0.25))
    assert torch.equal(out, torch.zeros(1, 2, 8, 16, device=device))


@pytest.mark.parametrize("mods, message", [
    (dict(bias=torch.zeros(1)), "bias"),
    (dict(softcap=5.0), "softcap"),
    (dict(mask=torch.ones(1, 1, 8, 8, dtype=torch.bool)), "key-padding mask"),
    (dict(causal=True), "Nq == Nk"),
], ids=["bias", "softcap", "dense-mask", "causal-cross"])
def test_unsupported_calls_raise(mods, message):
    q, k, v, _ = _inputs(1, 2, 2, 8, 8, 16, 16)
    k, v = (torch.cat([x, x], dim=2) for x in (k, v)) if mods.get("causal") else (k, v)
    with pytest.raises(AttnccError, match=message):
        linear_attention(LinearSpec("elu"), q, k, v, ScoreMods(scale=0.25, **mods))


def test_mixed_dtypes_raise():
    q, k, v, _ = _inputs(1, 2, 2, 8, 8, 16, 16)
    with pytest.raises(AttnccError, match="one dtype"):
        linear_attention(LinearSpec("elu"), q.half(), k, v, ScoreMods(scale=0.25))


# -- generated source and the kernel cache ------------------------------------------------------------------


def _plan(**overrides) -> _Plan:
    fields = dict(spec_text="linear", dtype="tl.bfloat16", dot_dtype="tl.bfloat16", d=128, d_pad=128, dv=128,
                  dv_pad=128, fmap="elu", causal=True, has_keep=False, quad_block=64)
    fields.update(overrides)
    return _Plan(**fields)


def test_generated_scan_is_specialized():
    """The plain causal scan carries no mask, buffer or float16 code it does not need; each option adds
    only its own."""
    plain = _scan_source(_plan(), reverse=False, lagged=False, rows_even=True, add_buffers=False, normalize=True)
    for absent in ("mask=", "KEEP +", "NUM +", "DEN +", "d_ok", "v_ok", "a_max", "input_precision", "float32)"
                   ", (tl.trans"):
        assert absent not in plain, absent
    assert "tl.dot((fq).to(tl.bfloat16)" in plain and "tl.exp(" in plain  # native bf16 dots, fused elu
    padded = _scan_source(_plan(d=48, d_pad=64, dv=80, dv_pad=128, has_keep=True, dtype="tl.float16",
                                dot_dtype="tl.float16"), reverse=False, lagged=True, rows_even=False,
                          add_buffers=False, normalize=False)
    for present in ("d_ok = offs_d < 48", "v_ok = offs_v < 80", "keep_base", "kpos = rows - LAG", "a_max",
                    "tl.store(DEN + buf"):
        assert present in padded, present
    taylor = _scan_source(_plan(fmap="taylor"), reverse=True, lagged=True, rows_even=False, add_buffers=True,
                          normalize=False)
    assert "1.0 + s * (1.0 + 0.5 * s)" in taylor and "kpos = rows + LAG" in taylor
    assert "for j0 in range(" in taylor  # keys right of every window start the reversed scan's state


def test_window_source_combines_only_with_linear_sums():
    assert "NUM +" not in _window_source(_plan(), has_lin=False)
    assert "log_mass" in _window_source(_plan(causal=False), has_lin=True)


def test_bf16_dots_widen_to_float32_in_the_interpreter(monkeypatch):
    """The interpreter's bf16 tl.dot is wrong: plans made there dot in float32 (``dot_f32`` in the key)."""
    from attncc.codegen import linear as module
    from attncc.codegen.source import clear_loaded

    clear_loaded()  # no launch memo from an earlier test may skip load_kernel
    seen = []

    def record_and_stop(name, descriptor, generate, device):
        seen.append(descriptor)
        raise RuntimeError("stop")

    monkeypatch.setattr(module, "load_kernel", record_and_stop)
    monkeypatch.setattr(module, "interpreting", lambda: True)
    q, k, v, _ = _inputs(1, 1, 1, 8, 8, 16, 16, torch.bfloat16)
    with pytest.raises(RuntimeError, match="stop"):
        linear_attention(LinearSpec("elu"), q, k, v, ScoreMods(scale=0.25, causal=True))
    assert seen[0]["dot_f32"] is True and seen[0]["dot_dtype"] == "tl.float32"


def test_second_call_generates_nothing(device, monkeypatch):
    q, k, v, _ = _inputs(1, 2, 2, 40, 40, 16, 16, device=device)
    spec = LinearSpec("taylor", window=5)
    mods = ScoreMods(scale=0.25, causal=True)
    first = linear_attention(spec, q, k, v, mods)
    monkeypatch.setenv("ATTNCC_ASSERT_CACHE_HIT", "1")
    torch.testing.assert_close(linear_attention(spec, q, k, v, mods), first, atol=0, rtol=0)


# -- real sizes (GPU only) -------------------------------------------------------------------------------------

GPU_CASES = [
    _case("elu", True, 8192, 128, heads=(8, 2)),
    _case("relu", False, 8192, 128, mask=True, heads=(8, 8)),
    _case("taylor", True, 8192, 16, dv=64, heads=(8, 8)),  # taylor as Based uses it: 16-dim features
    _case("taylor", False, 8192, 16, dv=64, heads=(8, 8), mask=True),
    _case("elu", True, 8192, 128, window=64, heads=(8, 2)),
    _case("relu", False, 8192, 80, dv=128, window=128, mask=True, heads=(8, 8)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_real_sizes_bf16_match_torch_path(case):
    """N=8192 in bf16 against the torch path (float32 math; the dense oracle would be N x N)."""
    hq, hkv = case["heads"]
    q, k, v, keep = _inputs(case["batch"], hq, hkv, case["nq"], case["nk"], case["d"], case["dv"], torch.bfloat16,
                            "cuda", mask=case["mask"])
    q, k = q * case["d"] ** -0.5, k * case["d"] ** -0.5  # typical magnitudes for a feature-map model
    spec = LinearSpec(case["fmap"], window=case["window"])
    mods = ScoreMods(scale=ScoreMods.default_scale(q), causal=case["causal"], mask=keep)
    out = linear_attention(spec, q, k, v, mods)
    assert out.isfinite().all()
    assert rel_rms(out, spec.forward(q, k, v, mods)) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("case", [_case("elu", True, 4096, 128, heads=(4, 1)), _case("elu", False, 4096, 64)])
def test_real_sizes_float32_match_torch_path(case):
    """Float32 inputs dot in IEEE float32 (no TF32): close to the torch path at real sizes."""
    hq, hkv = case["heads"]
    q, k, v, keep = _inputs(1, hq, hkv, case["nq"], case["nk"], case["d"], case["dv"], torch.float32, "cuda")
    spec = LinearSpec(case["fmap"])
    mods = ScoreMods(scale=ScoreMods.default_scale(q), causal=case["causal"])
    torch.testing.assert_close(linear_attention(spec, q, k, v, mods), spec.forward(q, k, v, mods), atol=1e-4,
                               rtol=1e-3)


def test_cuda_calls_take_the_torch_path_until_the_fault_is_fixed():
    """On an H200 the linear kernels made an illegal memory access (issue 11): the backend must not launch them on
    CUDA tensors (the interpreter still runs them here, and the gpu tests above still call them directly)."""
    from types import SimpleNamespace

    from attncc.codegen.linear import CUDA_FAULT
    from attncc.codegen.registry import kernel

    covers = kernel("linear").covers
    spec = LinearSpec()
    assert covers(spec, SimpleNamespace(is_cuda=True), None, None, None) == CUDA_FAULT
    assert covers(spec, torch.zeros(1, 1, 4, 8), None, None, None) == ""


# -- the chunked causal scan (state pass, prefix over chunks, output pass) ------------------------------------

CHUNKED_CASES = [
    _case("elu", True, 65, 16, dv=48, heads=(4, 2), mask=True, batch=2),  # one row past a whole chunk, GQA 2:1
    _case("relu", True, 33, 80, dv=16, heads=(3, 1)),  # D and Dv padded, GQA 3:1
    _case("taylor", True, 65, 16, dv=32, heads=(2, 1), mask=True),
    _case("elu", False, 50, 16, nk=120, window=5, heads=(2, 1), mask=True),  # reversed scan: keys past the last chunk
]


@pytest.mark.parametrize("case", CHUNKED_CASES)
def test_chunked_scan_matches_reference(case, device):
    out, ref, forward = _run(case, torch.float32, device)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out, forward, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [16, 24], ids=["chunk16", "chunk24-rounded"])
def test_chunked_scan_takes_the_spec_chunk(chunk, device):
    """A spec chunk of 16 gives 16-row chunks (more of them: a longer prefix); 24 is no tile and becomes 64
    (32 here); both match the oracle."""
    q, k, v, _ = _inputs(1, 2, 2, 70, 70, 16, 16, device=device)
    spec = LinearSpec("elu", chunk=chunk)
    mods = ScoreMods(scale=0.25, causal=True)
    torch.testing.assert_close(linear_attention(spec, q, k, v, mods), spec.reference(q, k, v, mods), atol=2e-5,
                               rtol=1e-4)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reversed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefix_over_chunk_states(reverse, dtype, device):
    """linear_chunk_prefix: slot t becomes the sum of the slots before it (reversed: after it), in the
    output's dtype; element counts that do not fill a block (1, 48) are masked."""
    from attncc.codegen.linear import _prefix_source
    from attncc.codegen.source import _execute

    kernel = None
    for e in (1, 48, 2048):
        block = min(1024, 1 << (e - 1).bit_length())
        kernel = _execute(_prefix_source(reverse=reverse, even=e % block == 0), f"prefix-test-{reverse}-{e}",
                          "linear_chunk_prefix")
        x = torch.randn(3, 5, e, generator=torch.Generator().manual_seed(e)).to(device)
        y = torch.empty(3, 5, e, dtype=dtype, device=device)
        kernel[((e + block - 1) // block, 3)](x, y, 5, e, BLOCK=block)
        xs = x.flip(1) if reverse else x
        want = torch.cat([torch.zeros_like(xs[:, :1]), xs.cumsum(1)[:, :-1]], dim=1)
        want = want.flip(1) if reverse else want
        torch.testing.assert_close(y, want.to(dtype), atol=1e-5, rtol=1e-5 if dtype == torch.float32 else 1e-2)
    assert kernel is not None


def test_chunked_scan_output_pass_has_no_loop_over_chunks():
    """The output pass is fully parallel (one program per chunk); only the prefix walks the chunks, and the
    state pass loops only over the reversed scan's keys past the last chunk."""
    source = _scan_source(_plan(), reverse=False, lagged=False, rows_even=True, add_buffers=False, normalize=True)
    out_pass = source[source.index("def linear_chunk_out"):]
    state_pass = source[source.index("def linear_chunk_state"):source.index("def linear_chunk_out")]
    assert "for " not in out_pass and "for " not in state_pass
    assert "tl.load(S + slot" in out_pass and "tl.store(S + slot" in state_pass
    reversed_source = _scan_source(_plan(), reverse=True, lagged=True, rows_even=False, add_buffers=True,
                                   normalize=False)
    assert "for j0 in range(lo, hi, CHUNK)" in reversed_source


@pytest.mark.gpu
@pytest.mark.parametrize("case", [_case("elu", True, 16384, 128, heads=(16, 16), batch=4),
                                  _case("relu", True, 16384, 128, window=64, heads=(16, 4), batch=4, mask=True)])
def test_real_size_chunked_scan_matches_torch_path(case):
    """B4 H16 N16K D128 (the size the old scan faulted near): the chunked scan's slots and offsets stay in
    bounds (int64 chunk bases) and match the torch path."""
    hq, hkv = case["heads"]
    q, k, v, keep = _inputs(case["batch"], hq, hkv, case["nq"], case["nk"], case["d"], case["dv"], torch.bfloat16,
                            "cuda", mask=case["mask"])
    q, k = q * case["d"] ** -0.5, k * case["d"] ** -0.5
    spec = LinearSpec(case["fmap"], window=case["window"])
    mods = ScoreMods(scale=ScoreMods.default_scale(q), causal=True, mask=keep)
    out = linear_attention(spec, q, k, v, mods)
    torch.cuda.synchronize()
    assert out.isfinite().all()
    assert rel_rms(out, spec.forward(q, k, v, mods)) < 2e-2
