"""The block-sparse executor: layouts from predicates, attention over a layout against the dense oracle (every
ScoreMods field, GQA, per-head layouts, padding entries), empty rows, gradients, and that it never builds an
N x N tensor."""

from __future__ import annotations

import pytest
import torch

from attncc.errors import AttnccError
from attncc.variants.base import ScoreMods
from attncc.variants.blocks import (
    BlockLayout, block_sparse_attention, dense_layout, gather_pairs, layout_from_keep, run_tasks, visited_fraction,
)
from attncc.variants.exact import masked_reference, reference as exact_reference
from variant_helpers import LargestTensor, random_qkv





def _oracle(q, k, v, mods, keep):
    """The sparse variants' float32 oracle with ``keep`` ANDed into the mask; rows with no visible key are 0."""
    return masked_reference(q.float(), k.float(), v.float(), mods, keep)


def _band_keep(width):
    return lambda i, j: ((i - j).abs() <= width) | (j < 2)


def _dense_of(layout: BlockLayout, keep=None) -> torch.Tensor:
    """The element mask a layout (plus keep inside partial blocks) stands for, built densely for the oracle."""
    kv = layout.kv_blocks
    lead = kv.shape[:-2]
    partial = layout.partial if layout.partial is not None else torch.ones_like(kv, dtype=torch.bool)
    nqb, nkb = layout.n_q_blocks, layout.n_k_blocks
    full = torch.zeros(*lead, nqb, nkb + 1, dtype=torch.bool)
    part = torch.zeros(*lead, nqb, nkb + 1, dtype=torch.bool)
    idx = torch.where(kv >= 0, kv, torch.full_like(kv, nkb))
    full.scatter_(-1, idx, ~partial)
    part.scatter_(-1, idx, partial)
    full, part = full[..., :nkb], part[..., :nkb]

    def expand(t):
        t = t.repeat_interleave(layout.block_q, -2).repeat_interleave(layout.block_k, -1)
        return t[..., :layout.nq, :layout.nk]

    i = torch.arange(layout.nq)[:, None]
    j = torch.arange(layout.nk)[None, :]
    inside = keep(i, j) if keep is not None else torch.ones(layout.nq, layout.nk, dtype=torch.bool)
    return expand(full) | (expand(part) & inside)


# -- layout_from_keep --------------------------------------------------------------------------------------


@pytest.mark.parametrize("nq,nk,bq,bk", [(100, 100, 16, 16), (63, 257, 8, 32), (1, 1, 64, 64), (257, 63, 32, 8)],
                         ids=lambda x: str(x))
def test_layout_from_keep_matches_brute_force(nq, nk, bq, bk):
    keep = lambda i, j: ((i - j).abs() <= 9) | (j < 3) | (i % 17 == 0)  # noqa: E731
    layout = layout_from_keep(keep, nq, nk, bq, bk, "cpu")
    i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    dense = keep(i, j)
    for qb in range(layout.n_q_blocks):
        rows = dense[qb * bq:(qb + 1) * bq]
        expected = [kb for kb in range(layout.n_k_blocks) if rows[:, kb * bk:(kb + 1) * bk].any()]
        got = [kb for kb in layout.kv_blocks[qb].tolist() if kb >= 0]
        assert got == expected
        for slot, kb in enumerate(layout.kv_blocks[qb].tolist()):
            if kb >= 0:
                assert bool(layout.partial[qb, slot]) == (not bool(rows[:, kb * bk:(kb + 1) * bk].all()))
    assert torch.equal(_dense_of(layout, keep), dense)


def test_layout_from_keep_scalar_predicate_is_dense():
    layout = layout_from_keep(lambda i, j: True, 70, 70, 32, 32, "cpu")
    assert layout.kv_blocks.tolist() == [[0, 1, 2]] * 3
    assert not layout.partial.any()
    assert visited_fraction(layout) == pytest.approx(96 * 96 / 70 / 70)


# -- forward against the oracle ----------------------------------------------------------------------------


@pytest.mark.parametrize("n,d", [(1, 16), (63, 48), (100, 80), (257, 16)], ids=lambda x: str(x))
@pytest.mark.parametrize("heads", [(4, 2), (4, 1), (2, 2)], ids=lambda h: f"hq{h[0]}-hkv{h[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_forward_matches_oracle(n, d, heads, causal):
    q, k, v = random_qkv(2, heads[0], heads[1], n, d, dv=d + 8)
    keep = _band_keep(20)
    layout = layout_from_keep(keep, n, n, 16, 32, "cpu")
    mods = ScoreMods(scale=d ** -0.5, causal=causal)
    out = block_sparse_attention(q, k, v, layout, mods, keep)
    assert out.shape == (2, heads[0], n, d + 8) and out.dtype == q.dtype
    torch.testing.assert_close(out, _oracle(q, k, v, mods, keep(torch.arange(n)[:, None], torch.arange(n))),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["padding", "dense", "per-head-query"])
def test_forward_applies_every_mod(mask_kind):
    b, hq, hkv, n = 2, 4, 2, 100
    q, k, v = random_qkv(b, hq, hkv, n, 16)
    gen = torch.Generator().manual_seed(1)
    mask = {
        "padding": torch.rand(b, 1, 1, n, generator=gen) > 0.3,
        "dense": torch.rand(b, hq, n, n, generator=gen) > 0.2,
        "per-head-query": torch.rand(1, hq, n, 1, generator=gen) > 0.1,
    }[mask_kind]
    bias = torch.randn(b, 1, n, n, generator=gen)
    keep = _band_keep(12)
    layout = layout_from_keep(keep, n, n, 16, 16, "cpu")
    mods = ScoreMods(scale=0.3, causal=True, softcap=2.5, bias=bias, mask=mask)
    out = block_sparse_attention(q, k, v, layout, mods, keep)
    expected = _oracle(q, k, v, mods, keep(torch.arange(n)[:, None], torch.arange(n)))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_dense_layout_is_exact_attention():
    q, k, v = random_qkv(1, 4, 1, 257, 48)
    mods = ScoreMods(scale=0.2, causal=True)
    out = block_sparse_attention(q, k, v, dense_layout(257, 257), mods)
    expected = exact_reference(q, k, v, scale=0.2, causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lead", ["batch-head", "head", "kv-head"])
def test_per_head_layouts_with_padding_entries(lead):
    b, hq, hkv, n, blk = 2, 4, 2, 100, 16
    q, k, v = random_qkv(b, hq, hkv, n, 16)
    nqb = -(-n // blk)
    gen = torch.Generator().manual_seed(3)
    heads = {"batch-head": (b, hq), "head": (hq,), "kv-head": (1, hkv)}[lead]
    scores = torch.rand(*heads, nqb, nqb, generator=gen)
    kv = scores.topk(3, dim=-1).indices
    kv[..., 2] = torch.where(torch.arange(nqb) % 2 == 0, kv[..., 2], -1)  # some query blocks visit only 2
    partial = torch.rand(kv.shape, generator=gen) > 0.5
    layout = BlockLayout(blk, blk, n, n, kv, partial)
    keep = lambda i, j: (i + j) % 3 != 0  # noqa: E731
    mods = ScoreMods(scale=0.25)
    out = block_sparse_attention(q, k, v, layout, mods, keep)
    dense = _dense_of(layout, keep)
    if lead == "kv-head":  # each kv head's layout serves its whole query group
        dense = dense.repeat_interleave(hq // hkv, dim=-3)
    while dense.dim() < 4:
        dense = dense.unsqueeze(0)
    torch.testing.assert_close(out, _oracle(q, k, v, mods, dense), rtol=1e-5, atol=1e-5)


def test_rows_without_visible_keys_are_zero():
    q, k, v = random_qkv(1, 2, 2, 64, 16)
    kv = torch.tensor([[0, -1], [-1, -1], [1, 2], [3, -1]])
    layout = BlockLayout(16, 16, 64, 64, kv, torch.zeros(4, 2, dtype=torch.bool))
    mask = torch.ones(1, 1, 1, 64, dtype=torch.bool)
    mask[..., 48:] = False  # query block 3 visits only masked keys
    q.requires_grad_(True)
    out = block_sparse_attention(q, k, v, layout, ScoreMods(scale=0.25, mask=mask))
    assert torch.count_nonzero(out[:, :, 16:32]) == 0 and torch.count_nonzero(out[:, :, 48:]) == 0
    assert torch.count_nonzero(out[:, :, :16]) > 0
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(grad).all()


def test_chunking_does_not_change_the_result():
    q, k, v = random_qkv(2, 4, 2, 257, 16)
    keep = _band_keep(40)
    layout = layout_from_keep(keep, 257, 257, 16, 16, "cpu")
    mods = ScoreMods(scale=0.25, causal=True)
    whole = block_sparse_attention(q, k, v, layout, mods, keep, chunk_bytes=1 << 40)
    pieces = block_sparse_attention(q, k, v, layout, mods, keep, chunk_bytes=1)
    torch.testing.assert_close(whole, pieces, rtol=1e-6, atol=1e-6)


def test_bf16_relative_rms():
    q, k, v = random_qkv(1, 4, 2, 257, 80, dtype=torch.bfloat16)
    keep = _band_keep(30)
    layout = layout_from_keep(keep, 257, 257, 32, 32, "cpu")
    mods = ScoreMods(scale=80 ** -0.5, causal=True)
    out = block_sparse_attention(q, k, v, layout, mods, keep)
    assert out.dtype == torch.bfloat16
    ref = _oracle(q, k, v, mods, keep(torch.arange(257)[:, None], torch.arange(257)))
    err = (out.float() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
    assert err < 2e-2


def test_gradients_match_the_oracle():
    q, k, v = random_qkv(1, 4, 2, 37, 16)
    bias = torch.randn(1, 4, 37, 37)
    q, k, v, bias = (t.requires_grad_(True) for t in (q, k, v, bias))
    keep = _band_keep(5)
    layout = layout_from_keep(keep, 37, 37, 8, 8, "cpu")
    mods = ScoreMods(scale=0.25, causal=True, softcap=3.0, bias=bias)
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(1, 4, 37, 16, generator=gen)
    out = block_sparse_attention(q, k, v, layout, mods, keep)
    ref = _oracle(q, k, v, mods, keep(torch.arange(37)[:, None], torch.arange(37)))
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v, bias))
    expected = torch.autograd.grad((ref * weight).sum(), (q, k, v, bias))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# -- no N x N tensor ----------------------------------------------------------------------------------------





def test_never_builds_an_n_by_n_tensor():
    n = 2048
    q, k, v = random_qkv(1, 1, 1, n, 16)
    keep = _band_keep(32)
    layout = layout_from_keep(keep, n, n, 64, 64, "cpu")
    mask = torch.ones(1, 1, 1, n, dtype=torch.bool)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # run_tasks then stays on this thread, where the (thread-local) mode sees every op
    try:
        with LargestTensor() as probe:
            block_sparse_attention(q, k, v, layout, ScoreMods(scale=0.25, causal=True, mask=mask), keep)
    finally:
        torch.set_num_threads(threads)
    assert probe.largest < n * n / 4


# -- helpers and validation -------------------------------------------------------------------------------


def test_gather_pairs_keeps_broadcast_dims():
    mask = torch.rand(2, 1, 1, 50) > 0.5
    q_pos = torch.arange(20).view(2, 10)
    k_pos = torch.arange(30).view(1, 1, 2, 1, 15) + 3
    got = gather_pairs(mask, q_pos, k_pos, hkv=2, g=2)
    assert got.shape == (2, 1, 2, 1, 1, 15)
    assert torch.equal(got[1, 0, 1, 0, 0], mask[1, 0, 0, 18:33])


@pytest.mark.parametrize("kwargs,field", [
    (dict(block_q=0), "block_q"),
    (dict(nk=-1), "nk"),
    (dict(kv_blocks=torch.zeros(7, 2, dtype=torch.int32)), "kv_blocks"),
    (dict(kv_blocks=torch.zeros(3, 2, dtype=torch.int64)), "query blocks"),
    (dict(partial=torch.zeros(7, 3, dtype=torch.bool)), "partial"),
], ids=["block_q", "nk", "dtype", "nqb", "partial"])
def test_layout_validation(kwargs, field):
    base = dict(block_q=16, block_k=16, nq=100, nk=100, kv_blocks=torch.zeros(7, 2, dtype=torch.int64))
    base.update(kwargs)
    with pytest.raises(AttnccError, match=field):
        BlockLayout(**base)


def test_layout_shape_must_match_inputs():
    q, k, v = random_qkv(1, 2, 2, 64, 16)
    with pytest.raises(AttnccError, match="layout"):
        block_sparse_attention(q, k, v, dense_layout(32, 32), ScoreMods(scale=1.0))


def test_run_tasks_keeps_order_and_modes():
    def work(i):
        return i, torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.get_num_threads()

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            got = run_tasks(work, list(range(7)), "cpu")
        assert [g[0] for g in got] == list(range(7))
        assert all(not grad and inference for _, grad, inference, _ in got)
        with torch.no_grad():
            assert not any(grad for _, grad, _, _ in run_tasks(work, [0, 1, 2], "cpu"))
        # inside a worker, tasks run serially (each worker uses one intra-op thread)
        nested = run_tasks(lambda i: run_tasks(work, [i, i + 1], "cpu"), [0, 10], "cpu")
        assert [[g[0] for g in row] for row in nested] == [[0, 1], [10, 11]]
        assert all(g[3] == 1 for row in nested for g in row)
    finally:
        torch.set_num_threads(threads)


def test_run_tasks_leaves_the_thread_count_of_other_threads_alone():
    import threading

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_tasks(lambda i: i, [0, 1, 2], "cpu")
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert torch.get_num_threads() == 2 and seen == [2]
    finally:
        torch.set_num_threads(threads)
