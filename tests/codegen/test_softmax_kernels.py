"""The online-softmax Triton kernels (attncc.codegen.softmax) against the variants' dense oracles.

Small sizes run in Triton's CPU interpreter (tests/codegen/conftest.py); the ``gpu`` set repeats them at real
sizes on a CUDA GPU. fp32 is compared tightly, fp16/bf16 by relative RMS (the interpreter rounds to bf16
differently from torch).
"""

from __future__ import annotations

import pytest
import torch

from attncc.codegen.autotune import Config
from attncc.codegen.softmax import (
    BandVisit, DenseVisit, LayoutVisit, Predicate, SoftmaxPlan, TokenMap, candidate_configs, generate_source,
    shared_bytes, softmax_attention,
)
from attncc.errors import AttnccError
from attncc.variants.base import ScoreMods
from attncc.variants.blocks import BlockLayout, dense_layout
from attncc.variants.exact import masked_reference, reference
from attncc.variants.local import LocalSpec
from tests.variants.variant_helpers import random_qkv, rel_rms

REL_TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2}


def qkv(b, hq, hkv, nq, nk, d, dv, dtype, device, seed=0):
    """q [b, hq, nq, d], k [b, hkv, nk, d], v [b, hkv, nk, dv] on ``device``."""
    q, _, _ = random_qkv(b, hq, hkv, nq, d, dv, dtype=dtype, seed=seed)
    _, k, v = random_qkv(b, hq, hkv, nk, d, dv, dtype=dtype, seed=seed + 1)
    return q.to(device), k.to(device), v.to(device)


def assert_close(out, expected):
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert torch.isfinite(out).all()
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    else:
        assert rel_rms(out, expected) < REL_TOL[out.dtype]


# ------------------------------------------------------------------------------------------------- dense

DENSE_CASES = {
    # id: (B, Hq, Hkv, Nq, Nk, D, Dv, dtype)
    "n1-d16": (1, 1, 1, 1, 1, 16, 16, torch.float32),
    "n63-d16-b2": (2, 2, 2, 63, 63, 16, 16, torch.float32),
    "n100-d48-dv80-gqa4": (1, 4, 1, 100, 100, 48, 80, torch.float32),
    "nq37-nk100-d80-dv48": (1, 2, 1, 37, 100, 80, 48, torch.float32),
    "nq100-nk37-d16": (1, 1, 1, 100, 37, 16, 16, torch.float32),
    "fp16-n100-d48-gqa4": (1, 4, 1, 100, 100, 48, 48, torch.float16),
    "bf16-n63-d80-dv16": (1, 2, 1, 63, 63, 80, 16, torch.bfloat16),
}


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("case", DENSE_CASES.values(), ids=DENSE_CASES.keys())
def test_dense_matches_reference(case, causal, device):
    b, hq, hkv, nq, nk, d, dv, dtype = case
    q, k, v = qkv(b, hq, hkv, nq, nk, d, dv, dtype, device)
    out = softmax_attention(q, k, v, ScoreMods(scale=d ** -0.5, causal=causal))
    assert_close(out, reference(q, k, v, scale=d ** -0.5, causal=causal))


@pytest.mark.parametrize("tiles", [(16, 32), (32, 16)], ids=["m16-n32", "m32-n16"])
def test_dense_causal_with_unequal_tiles(tiles, device):
    """The diagonal split is right when a query block spans several key blocks, or the converse."""
    q, k, v = qkv(1, 2, 1, 100, 77, 16, 16, torch.float32, device)
    mods = ScoreMods(scale=0.3, causal=True)
    out = softmax_attention(q, k, v, mods, config=Config.of(4, 2, BLOCK_M=tiles[0], BLOCK_N=tiles[1]))
    assert_close(out, reference(q, k, v, scale=0.3, causal=True))


def test_strided_inputs_are_read_in_place(device):
    """q/k/v as views of a packed [B, N, 3, H, D] projection (non-contiguous, unit last stride)."""
    qkv_packed = torch.randn(2, 50, 3, 2, 16, device=device)
    q, k, v = (qkv_packed[:, :, i].transpose(1, 2) for i in range(3))
    mods = ScoreMods(scale=0.25, causal=True)
    assert_close(softmax_attention(q, k, v, mods), reference(q, k, v, scale=0.25, causal=True))


# -------------------------------------------------------------------------------------------- score mods


def _mods_cases(b, hq, nq, nk, device):
    gen = torch.Generator().manual_seed(7)
    key_padding = torch.ones(b, 1, 1, nk, dtype=torch.bool)
    key_padding[0, ..., 40:] = False
    key_padding[1] = False  # batch row 1 sees no key at all: zeros
    full_mask = torch.rand(b, hq, nq, nk, generator=gen) > 0.3
    full_mask[0, 1, 5] = False  # one fully masked query row
    return {
        "bias-full": dict(bias=torch.randn(b, hq, nq, nk, generator=gen)),
        "bias-keys-fp16": dict(bias=torch.randn(b, 1, 1, nk, generator=gen).half()),
        "bias-rows": dict(bias=torch.randn(1, hq, nq, 1, generator=gen)),
        "bias-neg-inf": dict(bias=torch.where(torch.rand(nq, nk, generator=gen) > 0.5, 0.0, float("-inf"))),
        "key-padding": dict(mask=key_padding),
        "mask-full": dict(mask=full_mask),
        "mask-heads-2d": dict(mask=torch.rand(1, hq, 1, nk, generator=gen) > 0.5),
        "softcap": dict(softcap=2.0),
        "softcap-bias-mask": dict(softcap=5.0, bias=torch.randn(b, hq, nq, nk, generator=gen), mask=full_mask),
    }


MODS_IDS = list(_mods_cases(2, 2, 8, 8, "cpu"))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", MODS_IDS)
def test_score_mods_match_reference(name, causal, device):
    b, hq, hkv, nq, nk, d = 2, 2, 1, 37, 70, 16
    q, k, v = qkv(b, hq, hkv, nq, nk, d, d, torch.float32, device)
    extra = {key: val.to(device) if isinstance(val, torch.Tensor) else val
             for key, val in _mods_cases(b, hq, nq, nk, device)[name].items()}
    mods = ScoreMods(scale=0.3, causal=causal, **extra)
    out = softmax_attention(q, k, v, mods)
    expected = masked_reference(q, k, v, mods, None)
    assert_close(out, expected)
    if name == "key-padding":
        assert (out[1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_score_mods_low_precision(dtype, device):
    b, hq, hkv, n, d = 1, 4, 1, 63, 48
    q, k, v = qkv(b, hq, hkv, n, n, d, d, dtype, device)
    mask = torch.ones(b, 1, 1, n, dtype=torch.bool, device=device)
    mask[..., 50:] = False
    mods = ScoreMods(scale=d ** -0.5, causal=True, softcap=3.0, mask=mask,
                     bias=torch.randn(b, hq, n, n, device=device).to(dtype))
    assert_close(softmax_attention(q, k, v, mods), masked_reference(q, k, v, mods, None))


# ------------------------------------------------------------------------------------------------- band

BAND_SPECS = {
    "window5": LocalSpec(window=5),
    "l7-r20-sinks3": LocalSpec(left=7, right=20, sinks=3),
    "window9-sinks2-globals5": LocalSpec(window=9, sinks=2, globals=5),
    "l40-r3-globals35": LocalSpec(left=40, right=3, globals=35),
    "window200-covers": LocalSpec(window=200),
}


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("spec", BAND_SPECS.values(), ids=BAND_SPECS.keys())
def test_band_matches_local_reference(spec, causal, device):
    q, k, v = qkv(1, 2, 1, 100, 100, 16, 32, torch.float32, device)
    mods = ScoreMods(scale=0.3, causal=causal)
    left, right = spec.bounds(causal)
    out = softmax_attention(q, k, v, mods, BandVisit(left, right, spec.sinks, spec.globals))
    assert_close(out, spec.reference(q, k, v, mods))


@pytest.mark.parametrize("tiles", [(16, 32), (32, 16)], ids=["m16-n32", "m32-n16"])
def test_band_with_unequal_tiles_and_mods(tiles, device):
    spec = LocalSpec(left=20, right=6, sinks=3, globals=2)
    q, k, v = qkv(1, 4, 1, 63, 63, 48, 48, torch.bfloat16, device)
    mask = torch.ones(1, 1, 1, 63, dtype=torch.bool, device=device)
    mask[..., 55:] = False
    mods = ScoreMods(scale=0.2, causal=False, mask=mask, bias=torch.randn(1, 4, 63, 63, device=device))
    left, right = spec.bounds(False)
    out = softmax_attention(q, k, v, mods, BandVisit(left, right, spec.sinks, spec.globals),
                            config=Config.of(4, 2, BLOCK_M=tiles[0], BLOCK_N=tiles[1]))
    assert_close(out, spec.reference(q, k, v, mods))


# ----------------------------------------------------------------------------------------------- layout


def random_layout(lead, nq, nk, bm, bn, seed, density=0.6, partial=True, padding_blocks=(), device="cpu"):
    """A random BlockLayout ``[*lead, nQB, K]``: increasing blocks, -1 padding at the end, some rows empty,
    about half the entries partial (``padding_blocks`` always partial)."""
    gen = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-nq // bm), -(-nk // bn)
    chosen = torch.rand(*lead, nqb, nkb, generator=gen) < density
    chosen[..., 0, :] = False  # an empty row: its queries see nothing
    blocks = torch.arange(nkb).expand_as(chosen)
    kv = torch.sort(torch.where(chosen, blocks, nkb), dim=-1).values  # visited first, in order
    kv = torch.where(kv == nkb, -1, kv)
    flags = None
    if partial:
        flags = torch.rand(kv.shape, generator=gen) < 0.5
        for blk in padding_blocks:
            flags |= kv == blk
        flags &= kv >= 0
        flags = flags.to(device)
    return BlockLayout(bm, bn, nq, nk, kv.to(device), flags)


def layout_keep(layout, keep_fn, b, hq):
    """The layout's element visibility ``[b, hq, nq, nk]`` on the CPU (predicate inside partial entries)."""
    kv, nkb = layout.kv_blocks.cpu(), layout.n_k_blocks
    partial = torch.ones_like(kv, dtype=torch.bool) if layout.partial is None else layout.partial.cpu()
    while kv.dim() < 4:
        kv, partial = kv.unsqueeze(0), partial.unsqueeze(0)
    target = kv.clamp_min(0) + torch.where(kv < 0, nkb, 0)  # padding goes to an extra column
    visited = torch.zeros(*kv.shape[:-1], nkb + 1, dtype=torch.bool).scatter_(-1, target, True)[..., :nkb]
    part = torch.zeros(*kv.shape[:-1], nkb + 1, dtype=torch.bool).scatter_(-1, target, partial)[..., :nkb]

    def elements(t):
        return t.repeat_interleave(layout.block_q, -2).repeat_interleave(layout.block_k, -1)[
            ..., :layout.nq, :layout.nk]

    qi, ki = torch.arange(layout.nq)[:, None], torch.arange(layout.nk)[None, :]
    keep = elements(visited) & (~elements(part) | keep_fn(qi, ki))
    if keep.shape[1] not in (1, hq):
        keep = keep.repeat_interleave(hq // keep.shape[1], dim=1)
    return keep.expand(b, hq, -1, -1)


CAUSAL_LIKE = Predicate("causal_like", "keep = k_pos <= q_pos")
BAND_PREDICATE = Predicate("band", "keep = (k_pos >= q_pos - W) & (k_pos <= q_pos + W)", scalars=("W",))

KEEP_FNS = {  # the predicates above as torch functions of (query, key) positions
    None: lambda qi, ki: torch.ones((), dtype=torch.bool),
    "causal_like": lambda qi, ki: ki <= qi,
    "band": lambda qi, ki: (ki >= qi - 9) & (ki <= qi + 9),
}

LAYOUT_CASES = {
    # id: (B, Hq, Hkv, Nq, Nk, lead, predicate, dtype)
    "per-head-causal-pred": (2, 4, 2, 100, 100, (2, 4), CAUSAL_LIKE, torch.float32),
    "per-kv-head-gqa2": (1, 4, 2, 63, 63, (1, 2), BAND_PREDICATE, torch.float32),
    "shared-gqa4-nq37-nk100": (1, 4, 1, 37, 100, (), None, torch.float32),
    "bf16-band-pred": (1, 2, 1, 100, 100, (), BAND_PREDICATE, torch.bfloat16),
}


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("case", LAYOUT_CASES.values(), ids=LAYOUT_CASES.keys())
def test_layout_matches_masked_reference(case, causal, device):
    b, hq, hkv, nq, nk, lead, predicate, dtype = case
    q, k, v = qkv(b, hq, hkv, nq, nk, 16, 16, dtype, device)
    layouts = []

    def layout_for(bm, bn):
        layouts.append(random_layout(lead, nq, nk, bm, bn, seed=bm + bn, device=device))
        return layouts[-1]

    tensors = {"W": 9} if predicate is BAND_PREDICATE else {}
    mods = ScoreMods(scale=0.25, causal=causal)
    out = softmax_attention(q, k, v, mods, LayoutVisit(layout_for, predicate=predicate, tensors=tensors,
                                                       descriptor={"test": "random"}))
    keep_fn = KEEP_FNS[predicate.name if predicate else None]
    keep = layout_keep(layouts[-1], keep_fn, b, hq)
    assert_close(out, masked_reference(q, k, v, mods, keep.to(device)))


def test_layout_all_partial_and_fixed_block_sizes(device):
    """partial=None means every entry is partial; block_sizes pins the tile the layout is defined on."""
    q, k, v = qkv(1, 2, 1, 70, 70, 16, 16, torch.float32, device)
    layout = random_layout((), 70, 70, 16, 32, seed=3, partial=False, device=device)
    visit = LayoutVisit(lambda bm, bn: layout, predicate=CAUSAL_LIKE, block_sizes=(16, 32))
    mods = ScoreMods(scale=0.25)
    keep = layout_keep(layout, lambda qi, ki: ki <= qi, 1, 2)
    assert_close(softmax_attention(q, k, v, mods, visit), masked_reference(q, k, v, mods, keep))


def test_predicate_reads_per_entry_data_by_slot(device):
    """``slot`` is the entry's index in the original layout row, although the kernel regroups the entries: a
    predicate can read per-entry data with it. It runs only in partial entries (the -1000 shifts of the others
    would hide their keys)."""
    n, bm, bn = 63, 32, 16
    kv = torch.tensor([[0, 2, 3, -1], [3, 1, 2, 0]])
    partial = torch.tensor([[False, True, True, False], [True, False, True, True]])
    shift = torch.tensor([[-1000, -5, 7, -1000], [-20, -1000, 3, -40]], dtype=torch.int32)  # per (block, slot)
    layout = BlockLayout(bm, bn, n, n, kv.to(device), partial.to(device))
    predicate = Predicate("shifted_causal", "keep = k_pos <= q_pos + tl.load(Shift + pid_m * WIDTH + slot)",
                          scalars=("WIDTH",), tensors=("Shift",))
    visit = LayoutVisit(lambda bm_, bn_: layout, predicate=predicate, block_sizes=(bm, bn),
                        tensors={"Shift": shift.to(device), "WIDTH": 4})
    q, k, v = qkv(1, 2, 1, n, n, 16, 16, torch.float32, device)
    mods = ScoreMods(scale=0.3)
    keep = torch.zeros(n, n, dtype=torch.bool)
    for m in range(2):
        for slot in range(4):
            blk = int(kv[m, slot])
            if blk < 0:
                continue
            qi = torch.arange(m * bm, min(n, m * bm + bm))[:, None]
            ki = torch.arange(blk * bn, min(n, blk * bn + bn))[None, :]
            inside = ki <= qi + int(shift[m, slot]) if partial[m, slot] else torch.ones(1, 1, dtype=torch.bool)
            keep[qi, ki] = inside
    assert_close(softmax_attention(q, k, v, mods, visit), masked_reference(q, k, v, mods, keep.to(device)))


def test_dense_layout_equals_dense_visit(device):
    q, k, v = qkv(1, 2, 2, 63, 100, 16, 16, torch.float32, device)
    mods = ScoreMods(scale=0.3, causal=True)
    out = softmax_attention(q, k, v, mods, LayoutVisit(lambda bm, bn: dense_layout(63, 100, bm, bn, device)))
    assert_close(out, softmax_attention(q, k, v, mods))


# A reversal with 7 padding positions first: visit position p holds token NTOK + 6 - p (none for p < 7).
REVERSAL = TokenMap(
    "q_tok = NTOK + 6 - q_pos\nq_ok = q_pos >= 7\nk_tok = NTOK + 6 - k_pos\nk_ok = k_pos >= 7",
    n_q_visit=107, n_k_visit=107, scalars=("NTOK",), descriptor={"map": "reverse-pad7"})


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_layout_with_token_map(causal, device):
    """Predicate on visit positions, causality on tokens, padding positions hidden, rows written at tokens."""
    n, nv = 100, 107
    b, hq, hkv = 1, 2, 1
    q, k, v = qkv(b, hq, hkv, n, n, 16, 16, torch.float32, device)
    gen = torch.Generator().manual_seed(5)
    bias = torch.randn(b, hq, n, n, generator=gen).to(device)
    mods = ScoreMods(scale=0.25, causal=causal, bias=bias)
    made = {}

    def layout_for(bm, bn):
        # key blocks holding padding positions (< 7) must be partial (TokenMap's contract)
        made["layout"] = random_layout((hq,), nv, nv, bm, bn, seed=11, padding_blocks=(0,), device=device)
        return made["layout"]

    visit = LayoutVisit(layout_for, predicate=CAUSAL_LIKE, token_map=REVERSAL, tensors={"NTOK": n})
    out = softmax_attention(q, k, v, mods, visit)
    keep_pos = layout_keep(made["layout"], lambda qi, ki: ki <= qi, b, hq)  # [b, hq, nv, nv] positions
    pos_of_token = n + 6 - torch.arange(n)
    keep_tok = keep_pos[:, :, pos_of_token][:, :, :, pos_of_token]
    assert_close(out, masked_reference(q, k, v, mods, keep_tok.to(device)))


# ------------------------------------------------------------------------------------- generated source


def _plan(**changes):
    base = dict(dtype="tl.float16", d=64, block_d=64, dv=64, block_dv=64, group=1, causal=False, softcap=False,
                bias=None, mask=None, visit="dense")
    return SoftmaxPlan(**{**base, **changes})


def test_source_is_specialized():
    plain = generate_source(_plan())
    assert "Bias" not in plain and "Mask" not in plain and "tanh" not in plain and "offs_d[:, None] <" not in plain
    assert plain.count("float('-inf')") == 1  # only the NK-boundary loop hides scores
    padded = generate_source(_plan(d=48, dv=80, block_dv=128))
    assert "offs_d[:, None] < 48" in padded and "offs_dv[None, :] < 80" in padded
    key_padding = generate_source(_plan(mask=(False, True)))
    assert "stride_mask_q" not in key_padding and "mask_base + k_row[None, :] * stride_mask_k" in key_padding
    row_bias = generate_source(_plan(bias=(True, False)))
    assert "bias_hoisted" in row_bias and "stride_bias_k" not in row_bias
    bf16 = generate_source(_plan(dtype="tl.bfloat16", dot_f32=True))
    assert "kt = kt.to(tl.float32)" in bf16 and "p.to(tl.float32)" in bf16


def test_configs_are_pruned_to_the_problem(monkeypatch):
    import attncc.codegen.softmax as softmax_module

    plan = _plan(d=128, block_d=128, dv=128, block_dv=128)
    interpreted = candidate_configs(plan, 1, 20)
    assert [(c["BLOCK_M"], c["BLOCK_N"]) for c in interpreted] == [(16, 32)]
    monkeypatch.setattr(softmax_module, "interpreting", lambda: False)  # the GPU table
    decode = candidate_configs(plan, 1, 20)
    assert decode and all(c["BLOCK_M"] == 16 and c["BLOCK_N"] <= 32 for c in decode)
    full = candidate_configs(plan, 4096, 4096)
    assert {c["BLOCK_M"] for c in full} <= {64, 128} and {c["BLOCK_N"] for c in full} <= {32, 64, 128}
    band_plan = _plan(d=128, block_d=128, dv=128, block_dv=128, visit="band", band_prefix=True, band_globals=True)
    band = candidate_configs(band_plan, 4096, 4096, BandVisit(256, 256, 4, 4))
    assert band and all(shared_bytes(band_plan, c["BLOCK_M"], c["BLOCK_N"], c.num_stages) <= 227 * 1024
                        for c in band)
    assert (128, 128) not in {(c["BLOCK_M"], c["BLOCK_N"]) for c in band}  # 288 KB with global rows
    fixed = candidate_configs(plan, 4096, 4096, LayoutVisit(lambda bm, bn: None, block_sizes=(64, 64)))
    assert {(c["BLOCK_M"], c["BLOCK_N"]) for c in fixed} == {(64, 64)}


# ------------------------------------------------------------------------------------------------ errors


def test_bad_inputs_raise_one_clear_error(device):
    q, k, v = qkv(1, 3, 2, 8, 8, 16, 16, torch.float32, device)
    with pytest.raises(AttnccError, match="multiple of kv heads"):
        softmax_attention(q, k, v, ScoreMods(scale=1.0))
    q, k, v = qkv(1, 2, 1, 8, 9, 16, 16, torch.float32, device)
    with pytest.raises(AttnccError, match="as many queries as keys"):
        softmax_attention(q, k, v, ScoreMods(scale=1.0), BandVisit(2, 2))
    with pytest.raises(AttnccError, match="does not broadcast"):
        softmax_attention(q, k, v, ScoreMods(scale=1.0, bias=torch.zeros(3, 9, device=device)))
    with pytest.raises(AttnccError, match="missing from LayoutVisit.tensors"):
        softmax_attention(q, k, v, ScoreMods(scale=1.0), LayoutVisit(lambda bm, bn: None, predicate=BAND_PREDICATE))
    with pytest.raises(AttnccError, match="layout_for"):
        softmax_attention(q, k, v, ScoreMods(scale=1.0), LayoutVisit(lambda bm, bn: dense_layout(8, 9, 64, 64)))
    with pytest.raises(AttnccError, match="unsupported dtype"):
        softmax_attention(q.double(), k.double(), v.double(), ScoreMods(scale=1.0))


# ------------------------------------------------------------------------------------------- real sizes

GPU_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16"])
def test_gpu_dense_real_size(dtype, causal):
    q, k, v = qkv(1, 8, 2, 4096, 4096, 128, 128, dtype, "cuda")
    mods = ScoreMods(scale=128 ** -0.5, causal=causal)
    assert_close(softmax_attention(q, k, v, mods), reference(q, k, v, scale=mods.scale, causal=causal))


@pytest.mark.gpu
def test_gpu_dense_real_size_mods():
    b, h, n, d = 2, 4, 2048, 80
    q, k, v = qkv(b, h, h, n, n, d, d, torch.bfloat16, "cuda")
    mask = torch.ones(b, 1, 1, n, dtype=torch.bool, device="cuda")
    mask[1, ..., 1500:] = False
    mods = ScoreMods(scale=d ** -0.5, causal=True, softcap=30.0, mask=mask,
                     bias=torch.randn(1, h, n, n, device="cuda", dtype=torch.bfloat16))
    assert_close(softmax_attention(q, k, v, mods), masked_reference(q, k, v, mods, None))


@pytest.mark.gpu
def test_gpu_fp32_is_exact():
    q, k, v = qkv(1, 2, 2, 1000, 1000, 64, 64, torch.float32, "cuda")
    mods = ScoreMods(scale=0.125, causal=True)
    assert_close(softmax_attention(q, k, v, mods), reference(q, k, v, scale=0.125, causal=True))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gpu_band_real_size(causal):
    spec = LocalSpec(window=256, sinks=4, globals=2)
    q, k, v = qkv(1, 8, 2, 4096, 4096, 128, 128, torch.bfloat16, "cuda")
    mods = ScoreMods(scale=128 ** -0.5, causal=causal)
    left, right = spec.bounds(causal)
    out = softmax_attention(q, k, v, mods, BandVisit(left, right, spec.sinks, spec.globals))
    assert_close(out, spec.reference(q, k, v, mods))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gpu_layout_real_size(causal):
    n, b, hq = 4096, 1, 4
    q, k, v = qkv(b, hq, 1, n, n, 128, 128, torch.bfloat16, "cuda")
    layout = random_layout((hq,), n, n, 64, 64, seed=1, density=0.3, device="cuda")
    visit = LayoutVisit(lambda bm, bn: layout, predicate=CAUSAL_LIKE, block_sizes=(64, 64))
    mods = ScoreMods(scale=128 ** -0.5, causal=causal)
    keep = layout_keep(layout, lambda qi, ki: ki <= qi, b, hq).cuda()
    assert_close(softmax_attention(q, k, v, mods, visit), masked_reference(q, k, v, mods, keep))
