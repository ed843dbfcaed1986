"""Linear attention on generated Triton kernels: the ``linear`` variant (feature maps elu/relu/taylor, causal or
bidirectional, optional exact-softmax window, key-padding mask) with the semantics of
``attncc.variants.linear`` (read its docstring first).

Kernels (each generated for one plan: dtype, head dims, feature map, flags; one program per tile below):

* The causal scan, in flash-linear-attention's chunk form (chunks of ``CHUNK`` tokens, three launches, no
  program walks the chunks but the cheap prefix): ``linear_chunk_state`` (grid ``(chunks, Dv tiles, B*Hkv)``)
  computes every chunk's own ``phi(K_c)^T V_c`` and ``sum phi(K_c)`` at once into float32 slots
  ``[B*Hkv, chunks, D_pad, Dv_pad]``; ``linear_chunk_prefix`` (grid ``(element blocks, B*Hkv)``) turns the
  slots into exclusive prefix sums ``S_c = sum_{c' < c}`` in place (float32 sums; slots stored bf16 for bf16
  inputs, whose dots read them so anyway); ``linear_chunk_out`` (grid ``(chunks, Dv tiles, B*Hq)``) gives chunk
  ``c``'s rows ``phi(Q_c) S_c + (phi(Q_c) phi(K_c)^T * causal) V_c`` over the same for the normalizer, each
  feature map computed once per tile. The states are per kv head (GQA query heads share them). With a lag
  it is the scan over the keys left of the softmax window (query ``i`` sees keys ``j <= i - lag``: the keys
  lined up with chunk ``c`` are its rows minus the lag); reversed, the one right of it (``j >= i + lag``,
  suffix sums, and one more slot for the keys right of the last chunk's).
* ``linear_quad_scan`` (causal taylor; grid ``(Dv tiles, quadratic feature blocks, B*Hq)``): taylor's
  ``1 + D + D^2`` features are too many for one program's registers, so the scan is split by feature: the
  constant and linear features run in the chunked scan (whose output pass also takes the whole intra-chunk weight
  ``1 + s + s^2/2`` from the raw ``s = q.k``), and each block of ``BK`` quadratic features ``x_a x_b`` has a
  program of its own that adds its inter-chunk part ``phi2(q) S2`` to float32 buffers with atomic adds. The
  features are gathered by index from the q/k tiles (still nothing in memory). This part still walks the
  chunks in order: chunk-form slots of the quadratic features would hold ``D^2 * Dv`` floats per chunk.
* ``linear_state`` / ``linear_quad_state`` (bidirectional; grid ``(Dv tiles, key splits [x blocks], B*Hkv)``):
  the global ``(S, z)`` of every kv head, summed over key splits (partial states, then a sum in torch: the
  states are tiny). ``linear_apply`` (grid ``(query blocks, Dv tiles, B*Hq)``) reads them:
  ``out = phi(q) S / max(phi(q).z, EPS)``.
* ``linear_window`` (hybrid; grid ``(query blocks, B*Hq)``): online softmax (``exp2``, ``log2(e)`` folded into
  the scale) over the band of keys inside the window, then one denominator with the outside-window linear
  sums the scans left in float32 buffers, stabilized exactly as the torch path does (the larger of the row
  max and ``log`` of the linear mass).

GQA maps query head ``h`` to kv head ``h // (Hq // Hkv)``; q/k/v are read in place through their strides
(each query head's program builds its kv head's state itself: ``Hq / Hkv`` times the state work, no copies).
State, sums and softmax statistics are float32; dot operands are the input dtype (float32 inputs: IEEE
float32 dots), and bf16 operands are widened to float32 under the interpreter (its bf16 ``tl.dot`` is wrong).
Float16 operands have a small range (65504), so float16 plans scale what they cast: a state by the number of
keys it holds, intra-chunk weights by their row max, multiplied back in float32.

Taylor: the quadratic features are all ``D^2`` products ``x_a x_b`` with weight 1/2 (the variant's forward
keeps the ``D(D+1)/2`` upper triangle: the same dot products for half the work; the square blocks are simpler
to index). The causal quadratic blocks add with atomics, so taylor's causal output is not bitwise
deterministic from run to run on a GPU (float32 sums in varying order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from attncc.codegen.autotune import Config, choose, length_bucket
from attncc.codegen.registry import kernel_for
from attncc.codegen.source import interpreting, launch, load_kernel, process_memo
from attncc.codegen.writer import SourceWriter, next_power_of_2, torch_to_triton_dtype
from attncc.errors import AttnccError
from attncc.util import LOG2E, all_of, cdiv
from attncc.variants.base import ScoreMods
from attncc.variants.linear import EPS, LinearSpec, check_inputs, key_keep


QUAD_BLOCK = 64
"""Quadratic taylor features per block (``BK``) on a GPU: a ``[*, 64]`` feature tile and a ``[64, BV]`` state
slice per program. Fixed (not tuned) because the bidirectional state buffers are laid out in these blocks.
Under the interpreter a block is 256 wide: it runs programs one by one, so fewer, larger ones are faster."""

STATE_ELEMENTS = 8192
"""Most float32 state elements (``D_pad * BV``) a scan program keeps in registers (64 per thread at 4 warps)."""

PREFIX_BLOCK = 1024
"""State elements per program of the prefix over chunk states (8 per thread at 4 warps: wide, coalesced)."""

SPLIT_KEYS = 1024
"""Keys per program of the bidirectional state pass on a GPU (more programs than kv heads keep the GPU busy)."""

QUAD_SPLIT_BLOCKS = 8
"""Taylor's quadratic state pass splits the keys only below this many feature blocks (above, the blocks give
the programs, and split partial states would cost ``splits * D^2 * Dv`` floats per head)."""


@dataclass(frozen=True)
class _Plan:
    """Every choice the generated sources depend on (shared by all kernels of one call)."""

    spec_text: str
    dtype: str  # the inputs' tl dtype (also the output's)
    dot_dtype: str  # dot operands: the input dtype, or tl.float32 (float32 inputs; bf16 in the interpreter)
    d: int
    d_pad: int
    dv: int
    dv_pad: int
    fmap: str
    causal: bool
    has_keep: bool
    quad_block: int  # taylor's quadratic features per block (BK)

    def descriptor(self, kernel: str, **flags) -> dict:
        """The cache key of kernel ``kernel``'s source: the plan plus the kernel's own ``flags``."""
        dot_f32 = self.dot_dtype == "tl.float32" and self.dtype != "tl.float32"
        return {"family": "linear", "kernel": kernel, "spec": self.spec_text, "dtype": self.dtype,
                "dot_dtype": self.dot_dtype, "dot_f32": dot_f32, "d": self.d, "d_pad": self.d_pad, "dv": self.dv,
                "dv_pad": self.dv_pad, "feature_map": self.fmap, "causal": self.causal, "mask": self.has_keep,
                "quad_block": self.quad_block, "eps": EPS, **flags}

    @property
    def taylor(self) -> bool:
        return self.fmap == "taylor"

    @property
    def quad_blocks(self) -> int:
        """Blocks of taylor quadratic features ``x_a x_b`` (``a, b < D``, flattened a-major)."""
        return cdiv(self.d * self.d, self.quad_block)

    @property
    def fp16(self) -> bool:
        """Float16 dot operands: float32 sums must be scaled into range before the cast (65504 at most)."""
        return self.dot_dtype == "tl.float16"

    def state_dot(self, features: str, state: str, held: str) -> str:
        """Source of ``features @ state``. A state sums up to ``held`` keys' terms: with float16 operands it
        is divided by ``held`` before the cast (a mean is as large as one key's term) and the product
        multiplied back in float32; other dtypes have the range and take it as is."""
        if not self.fp16:
            return self.dot(features, state)
        return f"{self.dot(features, f'{state} * (1.0 / {held})')} * {held}"

    def dot(self, a: str, b: str) -> str:
        """Source of ``tl.dot(a, b)`` with operands cast to the dot dtype (fp32 accumulation). Float32 operands
        use tf32x3 (three TF32 products: float32 accuracy on tensor cores; IEEE float32 dots run on FMA units
        and spill)."""
        precision = ', input_precision="tf32x3"' if self.dot_dtype == "tl.float32" else ""
        return f"tl.dot(({a}).to({self.dot_dtype}), ({b}).to({self.dot_dtype}){precision})"


# -- the entry point -------------------------------------------------------------------------------------------


CUDA_FAULT = ("the linear kernels made an illegal memory access on an H200 in the suite's real-size tests "
              "(Triton 3.6; issue 11): CUDA calls run the PyTorch path until that is fixed")
"""Why ``linear`` runs on its PyTorch path on CUDA tensors: a kernel that faults takes the whole process's CUDA
context with it, so no call reaches it until the fault is found (the interpreter still runs and tests them)."""


def _covers(spec: LinearSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> str:
    """'' when the kernels run this call; on CUDA tensors, why they do not (``CUDA_FAULT``); a decode call
    (``spec.decode``, fewer queries than keys) runs the PyTorch path (the kernels align queries top-left)."""
    if spec.decode and q.shape[-2] < k.shape[-2]:
        return "fewer queries than keys with decode=True (the window at the queries' last positions): PyTorch path"
    return CUDA_FAULT if q.is_cuda else ""


@kernel_for("linear", covers=_covers)
def linear_attention(spec: LinearSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> Tensor:
    """Linear attention of ``spec`` on Triton kernels: q ``[B, Hq, Nq, D]``, k ``[B or 1, Hkv, Nk, D]``,
    v ``[B or 1, Hkv, Nk, Dv]`` (GQA by head mapping, no copies) -> ``[B, Hq, Nq, Dv]`` in q's dtype; the same
    result as ``spec.forward`` / ``spec.reference`` (float32 state and sums throughout)."""
    _check(spec, q, k, v, mods)
    bsz, hq, nq, _ = q.shape
    nk, dv = k.shape[2], v.shape[3]
    k, v = k.expand(bsz, *k.shape[1:]), v.expand(bsz, *v.shape[1:])  # batch-1 k/v: stride 0, no copy
    keep = key_keep(spec, mods.mask, bsz, nk)
    if nq == 0 or nk == 0:
        return q.new_zeros(bsz, hq, nq, dv)  # no query, or no key to see: the empty-row convention
    plan = plan_for(spec, q, v, mods, keep)
    run = _Run(plan, q, k, v, keep, spec.chunk)
    window = min(spec.window, max(nq, nk))  # a wider window sees nothing more
    if window > 0:
        return run.hybrid(window, mods.scale)
    return run.causal() if plan.causal else run.bidirectional()


def plan_for(spec: LinearSpec, q: Tensor, v: Tensor, mods: ScoreMods, keep: Optional[Tensor]) -> _Plan:
    """The kernels' plan for one call (also used by ``attncc.codegen.linear_backward``)."""
    dtype = torch_to_triton_dtype(q.dtype)
    dot_f32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpreting())
    d, dv = q.shape[-1], v.shape[-1]
    return _Plan(spec_text=str(spec), dtype=dtype, dot_dtype="tl.float32" if dot_f32 else dtype, d=d,
                 d_pad=next_power_of_2(d), dv=dv, dv_pad=next_power_of_2(dv), fmap=spec.feature_map,
                 causal=bool(mods.causal), has_keep=keep is not None,
                 quad_block=256 if interpreting() else QUAD_BLOCK)


def _check(spec: LinearSpec, q: Tensor, k: Tensor, v: Tensor, mods: ScoreMods) -> None:
    """Reject what the kernels (and the variant) do not take, in one sentence each."""
    check_inputs(spec, q, k, v, mods)
    if not q.dtype == k.dtype == v.dtype:
        raise AttnccError(f"{spec}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise AttnccError(f"{spec}: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not interpreting():
        raise AttnccError(f"{spec}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")


# -- launching -------------------------------------------------------------------------------------------------


class _Run:
    """One call's tensors, plan and launches. Buffers: ``num [B*Hq, Nq, Dv]`` / ``den [B*Hq, Nq]`` float32,
    the outside-window (or taylor quadratic) linear sums handed from one kernel to the next."""

    def __init__(self, plan: _Plan, q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], chunk: int):
        self.plan, self.q, self.k, self.v = plan, q, k, v
        self.bsz, self.hq, self.nq, _ = q.shape
        self.hkv, self.nk = k.shape[1], k.shape[2]
        # The key-padding mask as int8 [B or 1, Nk] (batch stride 0 when shared); without one, the kernels
        # read no mask and get q as a placeholder pointer.
        if keep is not None:
            self.keep = keep.to(torch.int8)
            self.keep_strides = (self.keep.stride(0) if self.keep.shape[0] > 1 else 0, self.keep.stride(1))
        else:
            self.keep, self.keep_strides = q, (0, 0)
        self.chunk = _chunk_tile(chunk, self.nq)
        self.device = q.device

    # -- the three algorithms --------------------------------------------------------------------------------

    def causal(self) -> Tensor:
        """Chunked causal scan (taylor: quadratic blocks first, into zeroed buffers the scan then adds)."""
        out = self._output()
        if self.plan.taylor:
            num, den = self._buffers(zeroed=True)
            self._quad_scan(num, den, reverse=False, lag=0)
            self._scan(num, den, out, reverse=False, lag=0, add_buffers=True)
        else:
            self._scan(self.q, self.q, out, reverse=False, lag=0, add_buffers=False)
        return out

    def bidirectional(self) -> Tensor:
        """Global state over all keys, then every query reads it."""
        state = self._state()
        out = self._output()
        self._apply(state, out)
        return out

    def hybrid(self, window: int, scale: float) -> Tensor:
        """Softmax over the window band plus linear sums over the keys outside it, one denominator."""
        plan = self.plan
        left = window < self.nq
        right = not plan.causal and window < self.nk
        num = den = None
        if left or right:
            num, den = self._buffers(zeroed=plan.taylor)
            filled = plan.taylor  # the buffers hold sums already (zeros for taylor's atomic adds)
            for reverse, wanted in ((False, left), (True, right)):
                if not wanted:
                    continue
                if plan.taylor:
                    self._quad_scan(num, den, reverse=reverse, lag=window)
                self._scan(num, den, None, reverse=reverse, lag=window, add_buffers=filled)
                filled = True
        out = self._output()
        self._window(num, den, out, window, scale)
        return out

    # -- buffers ---------------------------------------------------------------------------------------------

    def _output(self) -> Tensor:
        return torch.empty(self.bsz, self.hq, self.nq, self.plan.dv, dtype=self.q.dtype, device=self.device)

    def _buffers(self, zeroed: bool) -> tuple[Tensor, Tensor]:
        make = torch.zeros if zeroed else torch.empty
        num = make(self.bsz * self.hq, self.nq, self.plan.dv, dtype=torch.float32, device=self.device)
        den = make(self.bsz * self.hq, self.nq, dtype=torch.float32, device=self.device)
        return num, den

    def _common_args(self) -> tuple:
        """Pointer-and-stride prefix every q-side kernel takes."""
        q, k, v = self.q, self.k, self.v
        return (q, k, v, self.keep, *q.stride(), *k.stride(), *v.stride(), *self.keep_strides)

    # -- the kernels -----------------------------------------------------------------------------------------

    def _scan(self, num: Tensor, den: Tensor, out: Optional[Tensor], reverse: bool, lag: int,
              add_buffers: bool) -> None:
        """The chunked causal scan (flash-linear-attention's chunk form, three launches): every chunk's own
        state at once, an exclusive prefix over the chunks, then every chunk's rows at once."""
        plan = self.plan
        normalize = out is not None
        rows_even = lag == 0 and self.nq % self.chunk == 0
        flags = dict(reverse=reverse, lagged=lag > 0, rows_even=rows_even, add_buffers=add_buffers,
                     normalize=normalize)
        states = self._chunk_states(flags, lag)
        target = out if normalize else self.q  # an unused pointer argument gets any tensor
        chunks, slots = cdiv(self.nq, self.chunk), states["s"].shape[1]
        s, z = states["s"], states["z"]
        s0, z0 = states.get("s0", s), states.get("z0", z)

        def run(kernel, config: Config, into: Optional[tuple]) -> None:
            n, d, o = into or (num, den, target)
            grid = (chunks, plan.dv_pad // config["BV"], self.bsz * self.hq)
            launch(kernel, grid, *self._common_args(), s, z, s0, z0, n, d, o, self.hq, self.hq // self.hkv,
                   self.nq, self.nk, lag, slots, CHUNK=self.chunk, **config.launch_kwargs())

        self._launch("linear_chunk_out", flags, lambda: _scan_source(plan, **flags), self.nq,
                     lambda: _chunk_out_configs(plan), run, writes=(num, den, target))

    def _chunk_states(self, flags: dict, lag: int) -> dict:
        """The prefix states every chunk reads, per kv head: ``s [B*Hkv, SLOTS, D_pad, Dv_pad]`` (float32; bf16
        inputs: bfloat16, the dtype their dots cast it to anyway, half the bytes of the three passes),
        ``z [B*Hkv, SLOTS, D_pad]`` and, taylor, ``s0 [B*Hkv, SLOTS, Dv_pad]`` / ``z0 [B*Hkv, SLOTS]`` (float32).
        ``SLOTS`` is the number of chunks (one more reversed: the keys right of the last chunk). Bytes per kv
        head of ``s``: ``SLOTS * D_pad * Dv_pad * 2`` in bf16 (4 MiB at 16K tokens, chunk 64, D = Dv = 128).
        The prefix sums in float32 whatever the storage."""
        plan = self.plan
        slots = cdiv(self.nq, self.chunk) + (1 if flags["reverse"] else 0)
        heads = self.bsz * self.hkv
        f32 = dict(dtype=torch.float32, device=self.device)
        s = torch.empty(heads, slots, plan.d_pad, plan.dv_pad, dtype=state_dtype(plan), device=self.device)
        z = torch.empty(heads, slots, plan.d_pad, **f32)
        s0 = torch.empty(heads, slots, plan.dv_pad, **f32) if plan.taylor else s
        z0 = torch.empty(heads, slots, **f32) if plan.taylor else z
        k, v = self.k, self.v
        kv_args = (k, v, self.keep, *k.stride(), *v.stride(), *self.keep_strides)

        def run(kernel, config: Config, into: Optional[tuple]) -> None:
            grid = (slots, plan.dv_pad // config["BV"], heads)
            launch(kernel, grid, *kv_args, *(into or (s, z, s0, z0)), self.hkv, self.nq, self.nk, lag, slots,
                   CHUNK=self.chunk, **config.launch_kwargs())

        self._launch("linear_chunk_state", flags, lambda: _scan_source(self.plan, **flags), self.nq,
                     lambda: _chunk_state_configs(plan), run, writes=(s, z, s0, z0))
        states = {"s": self._prefix(s, s, flags["reverse"]), "z": self._prefix(z, z, flags["reverse"])}
        if plan.taylor:
            states.update(s0=self._prefix(s0, s0, flags["reverse"]), z0=self._prefix(z0, z0, flags["reverse"]))
        return states

    def _prefix(self, x: Tensor, y: Tensor, reverse: bool) -> Tensor:
        """``y`` (may be ``x``) <- the exclusive prefix of ``x [rows, SLOTS, ...]`` over its slots; returns y."""
        rows, slots = x.shape[0], x.shape[1]
        e = x[0, 0].numel()
        block = min(PREFIX_BLOCK, 1 << (e - 1).bit_length())
        flags = dict(reverse=reverse, even=e % block == 0)

        def run(kernel, config: Config, into: Optional[tuple]) -> None:
            launch(kernel, (cdiv(e, block), rows), x, into[0] if into else y, slots, e, **config.launch_kwargs())

        self._launch("linear_chunk_prefix", flags, lambda: _prefix_source(**flags), slots,
                     lambda: [Config.of(4, 2, BLOCK=block)], run, writes=(y,), memo_extra=block)
        return y

    def _quad_scan(self, num: Tensor, den: Tensor, reverse: bool, lag: int) -> None:
        plan = self.plan
        rows_even = lag == 0 and self.nq % self.chunk == 0
        flags = dict(reverse=reverse, lagged=lag > 0, rows_even=rows_even)

        def run(kernel, config: Config, into: Optional[tuple]) -> None:
            n, d = into or (num, den)
            grid = (plan.dv_pad // config["BV"], plan.quad_blocks, self.bsz * self.hq)
            launch(kernel, grid, *self._common_args(), n, d, self.hq, self.hq // self.hkv, self.nq, self.nk, lag,
                   CHUNK=self.chunk, BK=plan.quad_block, **config.launch_kwargs())

        self._launch("linear_quad_scan", flags, lambda: _quad_scan_source(plan, **flags), self.nq,
                     lambda: _scan_configs(plan, state_rows=plan.quad_block), run, writes=(num, den))

    def _state(self) -> dict:
        """The global state of every kv head: ``s [B*Hkv, D_pad, Dv_pad]``, ``z [B*Hkv, D_pad]`` (taylor: the
        linear features) plus, for taylor, ``s0 [B*Hkv, Dv_pad]`` / ``z0 [B*Hkv]`` (the constant feature) and
        ``s2 [B*Hkv, blocks*BK, Dv_pad]`` / ``z2 [B*Hkv, blocks*BK]`` (the quadratic features). Each key
        split writes its partial state; the splits are summed here (the states are small)."""
        plan = self.plan
        split = _split_keys()
        splits = cdiv(self.nk, split)
        heads = self.bsz * self.hkv
        flags = dict(even=self.nk % split == 0)  # every key block whole (splits are multiples of each BLOCK_N)
        f32 = dict(dtype=torch.float32, device=self.device)
        s = torch.empty(splits, heads, plan.d_pad, plan.dv_pad, **f32)
        z = torch.empty(splits, heads, plan.d_pad, **f32)
        s0 = torch.empty(splits, heads, plan.dv_pad, **f32) if plan.taylor else s
        z0 = torch.empty(splits, heads, **f32) if plan.taylor else z
        k, v = self.k, self.v
        kv_args = (k, v, self.keep, *k.stride(), *v.stride(), *self.keep_strides)

        def run(kernel, config: Config, into: Optional[tuple]) -> None:
            grid = (plan.dv_pad // config["BV"], splits, heads)
            launch(kernel, grid, *kv_args, *(into or (s, z, s0, z0)), self.hkv, self.nk, split,
                   **config.launch_kwargs())

        self._launch("linear_state", flags, lambda: _state_source(plan, **flags), self.nk,
                     lambda: _state_configs(plan, plan.d_pad, split), run, writes=(s, z, s0, z0))
        state = {"s": s.sum(0), "z": z.sum(0)}
        if not plan.taylor:
            return state
        state.update(s0=s0.sum(0), z0=z0.sum(0))
        blocks = plan.quad_blocks
        if blocks >= QUAD_SPLIT_BLOCKS:
            # enough programs from the feature blocks alone: one split, not splits x [D^2, Dv] partial states
            splits, split = 1, splits * split
        s2 = torch.empty(splits, heads, blocks * plan.quad_block, plan.dv_pad, **f32)
        z2 = torch.empty(splits, heads, blocks * plan.quad_block, **f32)

        def run_quad(kernel, config: Config, into: Optional[tuple]) -> None:
            grid = (plan.dv_pad // config["BV"], splits * blocks, heads)
            launch(kernel, grid, *kv_args, *(into or (s2, z2)), self.hkv, self.nk, split, blocks,
                   BK=plan.quad_block, **config.launch_kwargs())

        self._launch("linear_quad_state", flags, lambda: _quad_state_source(plan, **flags), self.nk,
                     lambda: _state_configs(plan, plan.quad_block, split), run_quad, writes=(s2, z2))
        state.update(s2=s2.sum(0), z2=z2.sum(0))
        return state

    def _apply(self, state: dict, out: Tensor) -> None:
        plan = self.plan
        flags = dict(even=self.nq % 128 == 0)  # every query block whole (BLOCK_M divides 128)
        s, z = state["s"], state["z"]
        s0, z0 = state.get("s0", s), state.get("z0", z)
        s2, z2 = state.get("s2", s), state.get("z2", z)
        blocks = plan.quad_blocks if plan.taylor else 0
        q = self.q

        def run(kernel, config: Config, into: Optional[tuple]) -> None:
            grid = (cdiv(self.nq, config["BLOCK_M"]), plan.dv_pad // config["BV"], self.bsz * self.hq)
            launch(kernel, grid, q, *q.stride(), s, z, s0, z0, s2, z2, into[0] if into else out, self.hq,
                   self.hkv, self.nq, self.nk, blocks, BK=plan.quad_block, **config.launch_kwargs())

        self._launch("linear_apply", flags, lambda: _apply_source(plan, **flags), self.nq,
                     lambda: _apply_configs(plan, self.nq), run, writes=(out,))

    def _window(self, num: Optional[Tensor], den: Optional[Tensor], out: Tensor, window: int,
                scale: float) -> None:
        plan = self.plan
        has_lin = num is not None
        flags = dict(has_lin=has_lin)
        num = num if has_lin else out
        den = den if has_lin else out

        def run(kernel, config: Config, into: Optional[tuple]) -> None:
            grid = (cdiv(self.nq, config["BLOCK_M"]), self.bsz * self.hq)
            launch(kernel, grid, *self._common_args(), num, den, into[0] if into else out, self.hq,
                   self.hq // self.hkv, self.nq, self.nk, window, scale * LOG2E, **config.launch_kwargs())

        # the candidates depend on the window's width too (no key block wider than the band)
        self._launch("linear_window", flags, lambda: _window_source(plan, **flags), self.nq,
                     lambda: _window_configs(plan, self.nq, window), run, writes=(out,),
                     memo_extra=next_power_of_2(window))

    def _launch(self, name: str, flags: dict, generate: Callable[[], str], n: int,
                configs: Callable[[], list[Config]], run: Callable, writes: tuple, memo_extra=None) -> None:
        """Load kernel ``name`` for this plan and ``flags``, pick its config for length ``n`` (timing the
        candidates into scratch copies of ``writes``, so tuning never disturbs the buffers the real launch
        reads and accumulates into) and launch it. Warm calls find both in the process memo."""
        key = (name, self.plan, tuple(sorted(flags.items())), length_bucket(n), memo_extra, str(self.device))
        memo = _LAUNCHES.get(key)
        if memo is None:
            descriptor = self.plan.descriptor(name, **flags)
            kernel = load_kernel(name, descriptor, generate, self.device)
            scratch: list[tuple] = []

            def timed(config: Config) -> None:
                if not scratch:
                    scratch.append(tuple(torch.empty_like(t) for t in writes))
                run(kernel, config, scratch[0])

            config = choose(descriptor, length_bucket(n), configs(), timed, self.device)
            memo = _LAUNCHES[key] = (kernel, config)
        kernel, config = memo
        run(kernel, config, None)


_LAUNCHES: dict = process_memo()
"""(kernel name, plan, flags, length bucket, extra, device) -> (kernel, chosen config), for this process."""


def state_dtype(plan: _Plan) -> torch.dtype:
    """Storage of the chunk states ``[D_pad, Dv_pad]``: bfloat16 for bf16 inputs (their dots read bf16; in the
    interpreter too, so its tests cover the storage), else float32 (float16's range is too small for sums)."""
    return torch.bfloat16 if plan.dtype == "tl.bfloat16" else torch.float32


def _chunk_tile(chunk: int, n: int) -> int:
    """The scan's chunk: the spec's ``chunk`` when it is a tile ``tl.dot`` takes (a power of two, 16..128),
    else 64; never longer than the sequence needs, and at most 32 under the interpreter (several chunks even
    in small tests, and faster there)."""
    tile = chunk if chunk >= 16 and chunk & (chunk - 1) == 0 and chunk <= 128 else 64
    tile = min(tile, next_power_of_2(n))
    return min(tile, 32) if interpreting() else tile


def _split_keys() -> int:
    """Keys per program of the bidirectional state pass (small under the interpreter, to test the split)."""
    return 64 if interpreting() else SPLIT_KEYS


# -- autotune candidates (pruned for the sizes; small tiles first under the interpreter) -------------------------


def _value_tiles(plan: _Plan, state_rows: int) -> list[int]:
    """Dv tile widths whose ``[state_rows, BV]`` float32 state fits in registers."""
    if interpreting():
        return [min(32, plan.dv_pad)]
    tiles = [bv for bv in (64, 32, 16) if bv <= plan.dv_pad and state_rows * bv <= STATE_ELEMENTS]
    return tiles[:2] or [16]


def _scan_configs(plan: _Plan, state_rows: int) -> list[Config]:
    tiles = _value_tiles(plan, state_rows)
    if interpreting():
        return [Config.of(4, 2, BV=tiles[0])]
    # 8 warps first: with a [128, BV] state, 4 warps spill a little at D = 128 (ptxas, sm_90)
    return [Config.of(w, s, BV=bv) for bv in tiles for (w, s) in ((8, 2), (8, 3), (4, 2))]


def _chunk_state_configs(plan: _Plan) -> list[Config]:
    """``linear_chunk_state``: a ``[D_pad, BV]`` float32 state per program (no loop but the reversed tail);
    8 warps (D = 128, BV = 64: 108 registers against 201 at 4 warps; ptxas, sm_90)."""
    if interpreting():
        return [Config.of(4, 1, BV=min(32, plan.dv_pad))]
    tiles = [bv for bv in (128, 64, 32) if bv <= plan.dv_pad and plan.d_pad * bv <= 2 * STATE_ELEMENTS][:2]
    return [Config.of(w, 2, BV=bv) for bv in tiles or [16] for w in (8, 4) if w == 8 or plan.d_pad * bv <= 4096]


def _chunk_out_configs(plan: _Plan) -> list[Config]:
    """``linear_chunk_out``: a ``[CHUNK, BV]`` float32 accumulator, the ``[D_pad, BV]`` state a dot operand.
    BV = 128 only with 8 warps (4 spill 112 bytes at D = 128; ptxas, sm_90)."""
    if interpreting():
        return [Config.of(4, 1, BV=min(32, plan.dv_pad))]
    if plan.dot_dtype == "tl.float32":
        # tf32x3 (three dots per product) spills at D = 128 in every tile tried (ptxas, sm_90, 8 warps: BV 64
        # 304 B, BV 16 248 B, BV 32 more; chunk 32 worse and without wgmma): the autotuner picks of these two
        return [Config.of(8, 2, BV=bv) for bv in (64, 16) if bv <= plan.dv_pad] or [Config.of(8, 2, BV=16)]
    tiles = [bv for bv in (64, 128) if bv <= plan.dv_pad] or [plan.dv_pad]
    return [Config.of(w, 2, BV=bv) for bv in tiles for w in (8, 4) if bv < 128 or w == 8]


def _state_configs(plan: _Plan, state_rows: int, split: int) -> list[Config]:
    tiles = _value_tiles(plan, state_rows)
    if interpreting():
        return [Config.of(4, 2, BLOCK_N=32, BV=tiles[0])]
    blocks = [bn for bn in (64, 128) if bn <= split and bn * state_rows <= 16384] or [64]
    return [Config.of(w, 3, BLOCK_N=bn, BV=bv) for bv in tiles for bn in blocks for w in (4, 8)][:6]


def _apply_configs(plan: _Plan, nq: int) -> list[Config]:
    if interpreting():
        return [Config.of(4, 2, BLOCK_M=min(32, next_power_of_2(nq)), BV=min(32, plan.dv_pad))]
    rows = [bm for bm in (64, 128) if bm <= max(64, next_power_of_2(nq)) and bm * plan.d_pad <= 16384] or [64]
    tiles = [bv for bv in (64, 128) if bv <= plan.dv_pad] or [plan.dv_pad]
    return [Config.of(w, 2, BLOCK_M=bm, BV=bv) for bm in rows for bv in tiles for w in (4, 8)][:6]


def _window_configs(plan: _Plan, nq: int, window: int) -> list[Config]:
    if interpreting():
        return [Config.of(4, 2, BLOCK_M=min(32, next_power_of_2(nq)), BLOCK_N=16)]
    widest = max(plan.d_pad, plan.dv_pad)
    # (BLOCK_M, BLOCK_N, warps), spill-free ones first at D = 128 (ptxas, sm_90)
    shapes = [(64, 32, 4), (64, 64, 8), (64, 32, 8), (128, 32, 8), (128, 64, 8)]
    # no larger query block than the sequence, no wider key block than the band needs (BLOCK_M + W - 1 keys)
    fits = [(bm, bn, w) for bm, bn, w in shapes if bm <= max(64, next_power_of_2(nq)) and bm * widest <= 16384
            and bn <= max(32, next_power_of_2(window))]
    stages = (2, 3) if widest <= 128 else (2,)
    return [Config.of(w, s, BLOCK_M=bm, BLOCK_N=bn) for bm, bn, w in fits or [(64, 32, 4)] for s in stages][:6]


# -- source generation: shared pieces ------------------------------------------------------------------------


def _rows(mask: Optional[str]) -> Optional[str]:
    return f"{mask}[:, None]" if mask else None


def _cols(mask: Optional[str]) -> Optional[str]:
    return f"{mask}[None, :]" if mask else None


def _masked(mask: Optional[str], other: str = "0.0") -> str:
    """The ``mask=..., other=...`` of a load (nothing when no mask is needed)."""
    return f", mask={mask}, other={other}" if mask else ""


def _store_mask(mask: Optional[str]) -> str:
    return f", mask={mask}" if mask else ""


def _signature(w: SourceWriter, name: str, *params: str):
    """``@triton.jit def name(<params>):`` (``params``: blocks of parameter lines); returns the block of its
    body (``with _signature(...):``)."""
    w.line("@triton.jit")
    with w.block(f"def {name}("):
        for block in params:
            w.lines(block)
    return w.block("):")


def _module(kernel: SourceWriter) -> str:
    return "import triton\nimport triton.language as tl\n\n\n" + kernel.text()


def _feature(fmap: str, x: str) -> str:
    """``phi(x)`` of a float32 tile for elu/relu; taylor's linear features are ``x`` itself."""
    if fmap == "elu":
        return f"tl.where({x} > 0, {x} + 1.0, tl.exp({x}))"  # elu(x) + 1
    if fmap == "relu":
        return f"tl.maximum({x}, 0.0)"
    return x


def _emit_features(w: SourceWriter, plan: _Plan, out: str, x: str, mask: Optional[str] = None) -> None:
    """``out = phi(x)`` of a loaded tile, computed in float32 and kept in the dot dtype: the float32 tiles
    would not fit in registers next to the state (the sums over features read the rounded values, so
    numerators and denominators weigh alike). ``mask``: where elu's features must be zeroed."""
    if plan.taylor:
        w.line(f"{out} = {x}.to({plan.dot_dtype})")
        return
    w.line(f"{x}f = {x}.to(tl.float32)")
    phi = _feature(plan.fmap, f"{x}f")
    if mask and plan.fmap == "elu":
        # elu(0) + 1 = 1: a masked load's zeros are not zero features, so zero them explicitly (relu(0) = 0)
        phi = f"tl.where({mask}, {phi}, 0.0)"
    w.line(f"{out} = ({phi}).to({plan.dot_dtype})")


def _emit_key_features(w: SourceWriter, plan: _Plan, key: Optional[str], d_ok: Optional[str]) -> None:
    """``fk = phi(k)``, zero for keys that are masked out and for padded head-dim columns."""
    _emit_features(w, plan, "fk", "k", all_of(_rows(key), _cols(d_ok)))


def _emit_heads(w: SourceWriter, plan: _Plan) -> None:
    """Base pointers of this program's batch, query head and kv head (int64: large tensors overflow int32)."""
    w.lines("""
        b = (pid_bh // HQ).to(tl.int64)
        h = (pid_bh % HQ).to(tl.int64)
        hk = h // GROUP
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
    """)
    if plan.has_keep:
        w.line("keep_base = KEEP + b * stride_mb")


_QKV_PARAMS = """
    Q, K, V, KEEP,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
"""


def _emit_keep(w: SourceWriter, bounds: Optional[str]) -> None:
    """``key_ok``: the key-padding mask at ``kpos`` (within ``bounds``)."""
    w.line(f"key_ok = tl.load(keep_base + kpos * stride_mn{_masked(bounds, '0')}) != 0")


def _emit_chunk_positions(w: SourceWriter, plan: _Plan, reverse: bool, lagged: bool, rows_even: bool) -> dict:
    """``rows`` (query rows of chunk ``t``) and ``kpos`` (the keys lined up with them: ``rows - LAG``, or
    ``rows + LAG`` reversed) with their masks; returns the mask names (None where none is needed)."""
    w.line("rows = t * CHUNK + offs_c")
    row_ok = None if rows_even else "row_ok"
    if row_ok:
        w.line("row_ok = rows < NQ")
    if lagged:
        w.line(f"kpos = rows {'+' if reverse else '-'} LAG")
        bounds = "key_in" if plan.has_keep else "key_ok"
        w.line(f"{bounds} = kpos < NK" if reverse else f"{bounds} = (kpos >= 0) & (kpos < NK)")
    else:
        w.line("kpos = rows")
        bounds = row_ok
    if not plan.has_keep:
        return {"row": row_ok, "key": bounds}
    _emit_keep(w, bounds)
    return {"row": row_ok, "key": "key_ok"}


def _emit_prologue_keys(w: SourceWriter, plan: _Plan, fold: Callable[[dict], None]) -> None:
    """Reversed scans: the keys lined up past the last chunk (``j >= n_chunks * CHUNK + LAG``) are right of
    every query's window; they start the state."""
    with w.block("for j0 in range(tl.cdiv(NQ, CHUNK) * CHUNK + LAG, NK, CHUNK):"):
        w.line("kpos = j0 + offs_c")
        bounds = "key_in" if plan.has_keep else "key_ok"
        w.line(f"{bounds} = kpos < NK")
        if plan.has_keep:
            _emit_keep(w, bounds)
        fold({"key": "key_ok"})


def _causal_mask(reverse: bool) -> str:
    # Forward, the key lined up at chunk offset c_k is visible to the query at c_q iff c_k <= c_q; reversed,
    # iff c_k >= c_q.
    return "offs_c[:, None] <= offs_c[None, :]" if reverse else "offs_c[:, None] >= offs_c[None, :]"


def _held(reverse: bool) -> str:
    """An upper bound of the keys in the state at loop step ``i`` (float16 scaling, see ``_Plan.state_dot``)."""
    return "(i * CHUNK + prologue + 1.0)" if reverse else "(i * CHUNK + 1.0)"


def _emit_held_prologue(w: SourceWriter, plan: _Plan, reverse: bool) -> None:
    """Reversed float16 scans: the keys the prologue put into the state."""
    if plan.fp16 and reverse:
        w.line("prologue = tl.maximum(NK - tl.cdiv(NQ, CHUNK) * CHUNK - LAG, 0)")


def _emit_chunk_loop(w: SourceWriter):
    """The loop over chunks; returns its body block (whose first line picks chunk ``t`` from step ``i``:
    reversed scans go last chunk first)."""
    w.line("n_chunks = tl.cdiv(NQ, CHUNK)")
    return w.block("for i in range(0, n_chunks):")


# -- the causal scan -------------------------------------------------------------------------------------------


def _scan_source(plan: _Plan, reverse: bool, lagged: bool, rows_even: bool, add_buffers: bool,
                 normalize: bool) -> str:
    """The chunked causal scan's two per-chunk kernels, one module (``linear_chunk_prefix`` runs between
    them): ``linear_chunk_state`` (each chunk's own keys' state) and ``linear_chunk_out`` (each chunk's rows).
    Both cover the features that fit one program (elu/relu: all of them; taylor: the constant and linear
    ones, and the output pass takes the whole intra-chunk weight ``1 + s + s^2/2``)."""
    w = SourceWriter()
    _emit_chunk_state(w, plan, reverse, lagged, rows_even)
    w.line()
    w.line()
    _emit_chunk_out(w, plan, reverse, lagged, rows_even, add_buffers, normalize)
    return _module(w)


def _chunk_start(reverse: bool, lagged: bool) -> str:
    """The first key position lined up with chunk ``t``'s rows (``rows - LAG``, or ``rows + LAG`` reversed)."""
    if not lagged:
        return "t * CHUNK"
    return "t * CHUNK + LAG" if reverse else "t * CHUNK - LAG"


def _emit_load_rows(w: SourceWriter, out: str, rows_ptr: str, x: str, cols: str, mask: Optional[str]) -> None:
    """``out = x[row0 + offs_c, cols]`` of tensor ``x`` (strides ``stride_{x}n``/``stride_{x}d``), where
    ``rows_ptr`` points at row ``row0`` (an int64 offset made once per chunk): the tile's own offsets (under
    ``CHUNK`` rows) stay small int32."""
    w.line(f"{out} = tl.load({rows_ptr} + (offs_c[:, None] * stride_{x}n + {cols}[None, :] * stride_{x}d)"
           f"{_masked(mask)})")


def _emit_row_pointers(w: SourceWriter, start: str, names: tuple[str, ...]) -> None:
    """``{x}_rows = {x}_base + start * stride_{x}n`` in int64 for each tensor ``x`` of ``names``."""
    for x in names:
        w.line(f"{x}_rows = {x}_base + ({start}).to(tl.int64) * stride_{x}n")


def _emit_chunk_state(w: SourceWriter, plan: _Plan, reverse: bool, lagged: bool, rows_even: bool) -> None:
    """``linear_chunk_state`` (grid ``(SLOTS, Dv tiles, B*Hkv)``): slot ``t`` gets chunk ``t``'s own
    ``phi(K_t)^T V_t`` and ``sum phi(K_t)`` (taylor: also its value sum and key count), all chunks at once.
    Reversed scans have one more slot: the keys right of the last chunk's (they start the reversed state)."""
    d_ok = "d_ok" if plan.d != plan.d_pad else None
    v_ok = "v_ok" if plan.dv != plan.dv_pad else None
    params = _KV_PARAMS, """
        S, Z, S0, Z0,
        HKV, NQ, NK, LAG, SLOTS,
        CHUNK: tl.constexpr, BV: tl.constexpr,
    """
    with _signature(w, "linear_chunk_state", *params):
        w.lines("""
            t = tl.program_id(0)
            pid_v = tl.program_id(1)
            pid_bh = tl.program_id(2)
            b = (pid_bh // HKV).to(tl.int64)
            hk = (pid_bh % HKV).to(tl.int64)
            k_base = K + b * stride_kb + hk * stride_kh
            v_base = V + b * stride_vb + hk * stride_vh
        """)
        if plan.has_keep:
            w.line("keep_base = KEEP + b * stride_mb")
        w.line("offs_c = tl.arange(0, CHUNK)")
        w.line(f"offs_d = tl.arange(0, {plan.d_pad})")
        w.line("offs_v = pid_v * BV + tl.arange(0, BV)")
        if d_ok:
            w.line(f"d_ok = offs_d < {plan.d}")
        if v_ok:
            w.line(f"v_ok = offs_v < {plan.dv}")
        w.line(f"state = tl.zeros([{plan.d_pad}, BV], dtype=tl.float32)")
        w.line(f"zsum = tl.zeros([{plan.d_pad}], dtype=tl.float32)")
        if plan.taylor:
            w.line("# taylor's constant feature 1: the sum of the values and the count of the keys")
            w.line("vsum = tl.zeros([BV], dtype=tl.float32)")
            w.line("count = tl.zeros([1], dtype=tl.float32)")

        def fold(bounds: Optional[str]) -> None:
            """Add the ``CHUNK`` keys from position ``j0`` on (``bounds``: which of them exist)."""
            w.line("kpos = j0 + offs_c")
            key = bounds
            if bounds:
                w.line(f"{'key_in' if plan.has_keep else 'key_ok'} = {bounds}")
                key = "key_in" if plan.has_keep else "key_ok"
            if plan.has_keep:
                _emit_keep(w, key)
                key = "key_ok"
            _emit_load_rows(w, "k", "k_rows", "k", "offs_d", all_of(_rows(key), _cols(d_ok)))
            _emit_load_rows(w, "v", "v_rows", "v", "offs_v", all_of(_rows(key), _cols(v_ok)))
            _emit_key_features(w, plan, key, d_ok)
            w.line(f"state += {plan.dot('tl.trans(fk)', 'v')}")
            w.line("zsum += tl.sum(fk.to(tl.float32), 0)")
            if plan.taylor:
                w.line("vsum += tl.sum(v.to(tl.float32), 0)")
                w.line(f"count += tl.sum({key}.to(tl.float32), 0)" if key else "count += CHUNK")

        if reverse:
            w.line("# slot t < SLOTS - 1: chunk t's keys; the last slot: every key right of the last chunk's")
            w.line(f"lo = {_chunk_start(reverse, lagged)}")
            w.line("hi = tl.where(t < SLOTS - 1, lo + CHUNK, NK)")
            _emit_row_pointers(w, "lo", ("k", "v"))
            with w.block("for j0 in range(lo, hi, CHUNK):"):
                fold("kpos < NK")
                w.line("k_rows += CHUNK * stride_kn")
                w.line("v_rows += CHUNK * stride_vn")
        else:
            w.line(f"j0 = {_chunk_start(reverse, lagged)}")
            _emit_row_pointers(w, "j0", ("k", "v"))
            fold("(kpos >= 0) & (kpos < NK)" if lagged else (None if rows_even else "kpos < NK"))
        w.line("slot = pid_bh.to(tl.int64) * SLOTS + t")
        w.line(f"tl.store(S + slot * {plan.d_pad * plan.dv_pad} + (offs_d[:, None] * {plan.dv_pad} + "
               f"offs_v[None, :]), state.to(S.dtype.element_ty))")
        if plan.taylor:
            w.line(f"tl.store(S0 + slot * {plan.dv_pad} + offs_v, vsum)")
        with w.block("if pid_v == 0:"):
            w.line(f"tl.store(Z + slot * {plan.d_pad} + offs_d, zsum)")
            if plan.taylor:
                w.line("tl.store(Z0 + slot + tl.arange(0, 1), count)")


def _chunk_held(reverse: bool) -> str:
    """An upper bound of the keys in the state chunk ``t`` reads, plus 1 (float16 scaling, ``_Plan.state_dot``):
    the keys before its start, or (reversed) the keys after its end."""
    return "(tl.maximum(NK - (t + 1) * CHUNK - LAG, 0) + 1.0)" if reverse else "(t * CHUNK + 1.0)"


def _emit_chunk_out(w: SourceWriter, plan: _Plan, reverse: bool, lagged: bool, rows_even: bool, add_buffers: bool,
                    normalize: bool) -> None:
    """``linear_chunk_out`` (grid ``(chunks, Dv tiles, B*Hq)``): chunk ``t``'s rows get the intra-chunk causal
    ``(phi(Q_t) phi(K_t)^T * causal) V_t`` plus the inter-chunk ``phi(Q_t) S_t`` of the prefix state ``S_t``
    of every earlier chunk (reversed: later), each feature map computed once per tile."""
    d_ok = "d_ok" if plan.d != plan.d_pad else None
    v_ok = "v_ok" if plan.dv != plan.dv_pad else None
    params = _QKV_PARAMS, """
        S, Z, S0, Z0, NUM, DEN, OUT,
        HQ, GROUP, NQ, NK, LAG, SLOTS,
        CHUNK: tl.constexpr, BV: tl.constexpr,
    """
    with _signature(w, "linear_chunk_out", *params):
        w.line("t = tl.program_id(0)")
        w.line("pid_v = tl.program_id(1)")
        w.line("pid_bh = tl.program_id(2)")
        _emit_heads(w, plan)
        w.line("offs_c = tl.arange(0, CHUNK)")
        w.line(f"offs_d = tl.arange(0, {plan.d_pad})")
        w.line("offs_v = pid_v * BV + tl.arange(0, BV)")
        if d_ok:
            w.line(f"d_ok = offs_d < {plan.d}")
        if v_ok:
            w.line(f"v_ok = offs_v < {plan.dv}")
        w.line(f"visible = {_causal_mask(reverse)}")
        masks = _emit_chunk_positions(w, plan, reverse, lagged, rows_even)
        key = masks["key"]
        _emit_row_pointers(w, "t * CHUNK", ("q",))
        _emit_row_pointers(w, _chunk_start(reverse, lagged), ("k", "v"))
        _emit_load_rows(w, "q", "q_rows", "q", "offs_d", all_of(_rows(masks["row"]), _cols(d_ok)))
        _emit_load_rows(w, "k", "k_rows", "k", "offs_d", all_of(_rows(key), _cols(d_ok)))
        _emit_load_rows(w, "v", "v_rows", "v", "offs_v", all_of(_rows(key), _cols(v_ok)))
        _emit_features(w, plan, "fq", "q")
        _emit_key_features(w, plan, key, d_ok)
        if plan.taylor:
            w.line("# intra-chunk weights phi(q).phi(k) = 1 + s + s^2/2 from the raw s = q.k (D wide)")
            w.line(f"s = {plan.dot('fq', 'tl.trans(fk)')}")
            w.line(f"a = tl.where({all_of('visible', _cols(key))}, 1.0 + s * (1.0 + 0.5 * s), 0.0)")
        else:
            w.line(f"a = tl.where(visible, {plan.dot('fq', 'tl.trans(fk)')}, 0.0)")
        if plan.fp16:
            w.line("# float16 operands: the weights scaled into [0, 1] by their row max (no overflow)")
            w.line("a_max = tl.max(a, 1)")
            w.line("a_max = tl.where(a_max > 0, a_max, 1.0)")
            intra = f"{plan.dot('a / a_max[:, None]', 'v')} * a_max[:, None]"
        else:
            intra = plan.dot("a", "v")
        w.line("# the prefix state of this chunk (linear_chunk_prefix: every earlier chunk's, reversed every later)")
        w.line("slot = (b * (HQ // GROUP) + hk) * SLOTS + t")
        w.line(f"state = tl.load(S + slot * {plan.d_pad * plan.dv_pad} + (offs_d[:, None] * {plan.dv_pad} + "
               f"offs_v[None, :]))")
        w.line(f"zsum = tl.load(Z + slot * {plan.d_pad} + offs_d)")
        w.line(f"num = {intra} + {plan.state_dot('fq', 'state', _chunk_held(reverse))}")
        w.line("den = tl.sum(a, 1) + tl.sum(fq.to(tl.float32) * zsum[None, :], 1)")
        if plan.taylor:
            w.line(f"num += tl.load(S0 + slot * {plan.dv_pad} + offs_v)[None, :]")
            w.line("den += tl.load(Z0 + slot)")
        _emit_scan_store(w, plan, masks["row"], v_ok, add_buffers, normalize)


def _prefix_source(reverse: bool, even: bool) -> str:
    """``linear_chunk_prefix`` (grid ``(element blocks, rows)``): ``X [rows, SLOTS, E]`` of per-chunk states
    becomes the exclusive prefix ``Y[r, t] = sum_{u < t} X[r, u]`` (reversed: ``u > t``), summed in float32
    and stored in Y's dtype (Y may be X: each slot is read before it is written)."""
    w = SourceWriter()
    params = """
        X, Y, SLOTS, E,
        BLOCK: tl.constexpr,
    """
    with _signature(w, "linear_chunk_prefix", params):
        w.line("offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)")
        w.line("row = tl.program_id(1).to(tl.int64)")
        w.line("first = (row * SLOTS + SLOTS - 1) * E" if reverse else "first = row * SLOTS * E")
        w.line("x_ptrs = X + first + offs")
        w.line("y_ptrs = Y + first + offs")
        w.line("acc = tl.zeros([BLOCK], dtype=tl.float32)")
        mask = None if even else "offs < E"
        if mask:
            w.line(f"ok = {mask}")
        step = "-=" if reverse else "+="
        with w.block("for i in range(0, SLOTS):"):
            w.line(f"x = tl.load(x_ptrs{_masked('ok' if mask else None)})")
            w.line(f"tl.store(y_ptrs, acc.to(Y.dtype.element_ty){_store_mask('ok' if mask else None)})")
            w.line("acc += x.to(tl.float32)")
            w.line(f"x_ptrs {step} E")
            w.line(f"y_ptrs {step} E")
    return _module(w)


def _emit_scan_store(w: SourceWriter, plan: _Plan, row_ok: Optional[str], v_ok: Optional[str], add_buffers: bool,
                     normalize: bool) -> None:
    """Write the chunk's rows: normalized into OUT, or as float32 sums into NUM/DEN (DEN by Dv tile 0)."""
    w.line("buf = pid_bh.to(tl.int64) * NQ + rows")
    if add_buffers or not normalize:
        w.line(f"num_ptrs = NUM + buf[:, None] * {plan.dv} + offs_v[None, :]")
    tile_mask = all_of(_rows(row_ok), _cols(v_ok))
    if add_buffers:
        w.line(f"num += tl.load(num_ptrs{_masked(tile_mask)})")
        w.line(f"den += tl.load(DEN + buf{_masked(row_ok)})")
    if normalize:
        w.line(f"out = num / tl.maximum(den, {EPS!r})[:, None]")
        w.line(f"tl.store(OUT + buf[:, None] * {plan.dv} + offs_v[None, :], out.to({plan.dtype})"
               f"{_store_mask(tile_mask)})")
        return
    w.line(f"tl.store(num_ptrs, num{_store_mask(tile_mask)})")
    w.line(f"tl.store(DEN + buf, den, mask={all_of(row_ok, '(pid_v == 0)')})")


# -- taylor's quadratic features -------------------------------------------------------------------------------


def _emit_quad_indices(w: SourceWriter, plan: _Plan) -> Optional[str]:
    """Feature indices of block ``pid_f``: feature ``f`` is ``x_a x_b`` with ``a = f // D``, ``b = f % D``;
    returns the mask of real features (None when D*D fills the blocks)."""
    w.line("feats = pid_f * BK + tl.arange(0, BK)")
    w.line(f"fa = feats // {plan.d}")
    w.line(f"fb = feats - fa * {plan.d}")
    if (plan.d * plan.d) % plan.quad_block:
        w.line(f"f_ok = feats < {plan.d * plan.d}")
        return "f_ok"
    return None


def _emit_quad_features(w: SourceWriter, out: str, base: str, rows: str, x: str, row_mask: Optional[str],
                        f_ok: Optional[str], dot_dtype: str, weight: str = "") -> None:
    """``out[r, f] = x[r, a_f] * x[r, b_f]`` gathered from rows ``rows`` of tensor ``x`` (q or k: strides
    ``stride_{x}n``/``stride_{x}d``); the gathers hit cache (the same rows' D values)."""
    mask = _masked(all_of(_rows(row_mask), _cols(f_ok)))
    row = f"{base} + {rows}[:, None] * stride_{x}n"
    w.line(f"{out} = tl.load({row} + fa[None, :] * stride_{x}d{mask}).to(tl.float32)")
    w.line(f"{out} = ({out} * tl.load({row} + fb[None, :] * stride_{x}d{mask}).to(tl.float32){weight})"
           f".to({dot_dtype})")


def _quad_scan_source(plan: _Plan, reverse: bool, lagged: bool, rows_even: bool) -> str:
    """``linear_quad_scan``: the inter-chunk part of one block of taylor's quadratic features, added to
    NUM/DEN atomically (the intra-chunk part is in linear_scan's weights)."""
    w = SourceWriter()
    v_ok = "v_ok" if plan.dv != plan.dv_pad else None
    params = _QKV_PARAMS, """
        NUM, DEN,
        HQ, GROUP, NQ, NK, LAG,
        CHUNK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    """
    with _signature(w, "linear_quad_scan", *params):
        w.line("pid_v = tl.program_id(0)")
        w.line("pid_f = tl.program_id(1)")
        w.line("pid_bh = tl.program_id(2)")
        _emit_heads(w, plan)
        w.line("offs_c = tl.arange(0, CHUNK)")
        w.line("offs_v = pid_v * BV + tl.arange(0, BV)")
        if v_ok:
            w.line(f"v_ok = offs_v < {plan.dv}")
        f_ok = _emit_quad_indices(w, plan)
        w.line("state = tl.zeros([BK, BV], dtype=tl.float32)")
        w.line("zsum = tl.zeros([BK], dtype=tl.float32)")

        def fold(masks: dict) -> None:
            _emit_quad_features(w, "fk", "k_base", "kpos", "k", masks["key"], f_ok, plan.dot_dtype)
            w.line(f"v = tl.load(v_base + kpos[:, None] * stride_vn + offs_v[None, :] * stride_vd"
                   f"{_masked(all_of(_rows(masks['key']), _cols(v_ok)))})")
            w.line(f"state += {plan.dot('tl.trans(fk)', 'v')}")
            w.line("zsum += tl.sum(fk.to(tl.float32), 0)")

        if reverse:
            _emit_prologue_keys(w, plan, fold)
        _emit_held_prologue(w, plan, reverse)
        with _emit_chunk_loop(w):
            w.line("t = n_chunks - 1 - i" if reverse else "t = i")
            masks = _emit_chunk_positions(w, plan, reverse, lagged, rows_even)
            w.line("# the weight 1/2 on the query side: phi2(q).phi2(k) over all D^2 pairs is (q.k)^2 / 2")
            _emit_quad_features(w, "fq", "q_base", "rows", "q", masks["row"], f_ok, plan.dot_dtype,
                                weight=" * 0.5")
            w.line(f"num = {plan.state_dot('fq', 'state', _held(reverse))}")
            w.line("den = tl.sum(fq.to(tl.float32) * zsum[None, :], 1)")
            w.line("buf = pid_bh.to(tl.int64) * NQ + rows")
            tile_mask = all_of(_rows(masks["row"]), _cols(v_ok))
            w.line(f"tl.atomic_add(NUM + buf[:, None] * {plan.dv} + offs_v[None, :], num{_store_mask(tile_mask)})")
            w.line(f"tl.atomic_add(DEN + buf, den, mask={all_of(masks['row'], '(pid_v == 0)')})")
            fold(masks)
    return _module(w)


# -- bidirectional: the global state, then every query reads it ---------------------------------------------


_KV_PARAMS = """
    K, V, KEEP,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
"""


def _emit_state_prologue(w: SourceWriter, plan: _Plan, quad: bool) -> None:
    """Program ids, kv head pointers and this program's key range ``start .. stop``."""
    w.line("pid_v = tl.program_id(0)")
    if quad:
        w.line("pid_s = tl.program_id(1) // BLOCKS")
        w.line("pid_f = tl.program_id(1) % BLOCKS")
    else:
        w.line("pid_s = tl.program_id(1)")
    w.lines("""
        pid_bh = tl.program_id(2)
        b = (pid_bh // HKV).to(tl.int64)
        hk = (pid_bh % HKV).to(tl.int64)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
    """)
    if plan.has_keep:
        w.line("keep_base = KEEP + b * stride_mb")
    w.lines("""
        offs_n = tl.arange(0, BLOCK_N)
        offs_v = pid_v * BV + tl.arange(0, BV)
        start = pid_s * SPLIT
        stop = tl.minimum(start + SPLIT, NK)
        slot = pid_s * tl.num_programs(2) + pid_bh
    """)
    if plan.dv != plan.dv_pad:
        w.line(f"v_ok = offs_v < {plan.dv}")


def _emit_state_keys(w: SourceWriter, plan: _Plan, even: bool) -> Optional[str]:
    """Inside a state kernel's key loop: ``kpos`` and the name of its mask (None: every key is real)."""
    w.line("kpos = n0 + offs_n")
    bounds = None if even else ("key_in" if plan.has_keep else "key_ok")
    if bounds:
        w.line(f"{bounds} = kpos < stop")
    if not plan.has_keep:
        return bounds
    _emit_keep(w, bounds)
    return "key_ok"


def _state_source(plan: _Plan, even: bool) -> str:
    """``linear_state``: one key split's ``(S, z)`` of a kv head (taylor: its linear and constant features)."""
    w = SourceWriter()
    d_ok = "d_ok" if plan.d != plan.d_pad else None
    v_ok = "v_ok" if plan.dv != plan.dv_pad else None
    params = _KV_PARAMS, """
        S, Z, S0, Z0,
        HKV, NK, SPLIT,
        BLOCK_N: tl.constexpr, BV: tl.constexpr,
    """
    with _signature(w, "linear_state", *params):
        _emit_state_prologue(w, plan, quad=False)
        w.line(f"offs_d = tl.arange(0, {plan.d_pad})")
        if d_ok:
            w.line(f"d_ok = offs_d < {plan.d}")
        w.line(f"state = tl.zeros([{plan.d_pad}, BV], dtype=tl.float32)")
        w.line(f"zsum = tl.zeros([{plan.d_pad}], dtype=tl.float32)")
        if plan.taylor:
            w.line("vsum = tl.zeros([BV], dtype=tl.float32)")
            w.line("count = tl.zeros([1], dtype=tl.float32)")
        with w.block("for n0 in range(start, stop, BLOCK_N):"):
            key = _emit_state_keys(w, plan, even)
            w.line(f"k = tl.load(k_base + kpos[:, None] * stride_kn + offs_d[None, :] * stride_kd"
                   f"{_masked(all_of(_rows(key), _cols(d_ok)))})")
            w.line(f"v = tl.load(v_base + kpos[:, None] * stride_vn + offs_v[None, :] * stride_vd"
                   f"{_masked(all_of(_rows(key), _cols(v_ok)))})")
            _emit_key_features(w, plan, key, d_ok)
            w.line(f"state += {plan.dot('tl.trans(fk)', 'v')}")
            w.line("zsum += tl.sum(fk.to(tl.float32), 0)")
            if plan.taylor:
                w.line("vsum += tl.sum(v.to(tl.float32), 0)")
                w.line(f"count += tl.sum({key}.to(tl.float32), 0)" if key else "count += BLOCK_N")
        w.line(f"tl.store(S + (slot * {plan.d_pad} + offs_d[:, None]) * {plan.dv_pad} + offs_v[None, :], state)")
        w.line(f"tl.store(Z + slot * {plan.d_pad} + offs_d, zsum, mask=pid_v == 0)")
        if plan.taylor:
            w.line(f"tl.store(S0 + slot * {plan.dv_pad} + offs_v, vsum)")
            w.line("tl.store(Z0 + slot + tl.arange(0, 1), count, mask=pid_v == 0)")
    return _module(w)


def _quad_state_source(plan: _Plan, even: bool) -> str:
    """``linear_quad_state``: one key split's state of one block of taylor's quadratic features."""
    w = SourceWriter()
    v_ok = "v_ok" if plan.dv != plan.dv_pad else None
    params = _KV_PARAMS, """
        S2, Z2,
        HKV, NK, SPLIT, BLOCKS,
        BK: tl.constexpr, BLOCK_N: tl.constexpr, BV: tl.constexpr,
    """
    with _signature(w, "linear_quad_state", *params):
        _emit_state_prologue(w, plan, quad=True)
        f_ok = _emit_quad_indices(w, plan)
        w.line("state = tl.zeros([BK, BV], dtype=tl.float32)")
        w.line("zsum = tl.zeros([BK], dtype=tl.float32)")
        with w.block("for n0 in range(start, stop, BLOCK_N):"):
            key = _emit_state_keys(w, plan, even)
            _emit_quad_features(w, "fk", "k_base", "kpos", "k", key, f_ok, plan.dot_dtype)
            w.line(f"v = tl.load(v_base + kpos[:, None] * stride_vn + offs_v[None, :] * stride_vd"
                   f"{_masked(all_of(_rows(key), _cols(v_ok)))})")
            w.line(f"state += {plan.dot('tl.trans(fk)', 'v')}")
            w.line("zsum += tl.sum(fk.to(tl.float32), 0)")
        w.line("rows = slot * BLOCKS * BK + feats")
        w.line(f"tl.store(S2 + rows[:, None] * {plan.dv_pad} + offs_v[None, :], state)")
        w.line("tl.store(Z2 + rows, zsum, mask=pid_v == 0)")
    return _module(w)


def _apply_source(plan: _Plan, even: bool) -> str:
    """``linear_apply``: ``out = phi(q) S / max(phi(q).z, EPS)`` for a block of query rows and a Dv tile."""
    w = SourceWriter()
    d_ok = "d_ok" if plan.d != plan.d_pad else None
    v_ok = "v_ok" if plan.dv != plan.dv_pad else None
    row_ok = None if even else "row_ok"
    params = """
        Q, stride_qb, stride_qh, stride_qn, stride_qd,
        S, Z, S0, Z0, S2, Z2, OUT,
        HQ, HKV, NQ, NK, BLOCKS,
        BLOCK_M: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
    """
    with _signature(w, "linear_apply", params):
        w.lines("""
            pid_m = tl.program_id(0)
            pid_v = tl.program_id(1)
            pid_bh = tl.program_id(2)
            b = (pid_bh // HQ).to(tl.int64)
            h = (pid_bh % HQ).to(tl.int64)
            kv = b * HKV + h // (HQ // HKV)
            q_base = Q + b * stride_qb + h * stride_qh
            rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_v = pid_v * BV + tl.arange(0, BV)
        """)
        w.line(f"offs_d = tl.arange(0, {plan.d_pad})")
        if row_ok:
            w.line("row_ok = rows < NQ")
        if d_ok:
            w.line(f"d_ok = offs_d < {plan.d}")
        if v_ok:
            w.line(f"v_ok = offs_v < {plan.dv}")
        w.line(f"q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd"
               f"{_masked(all_of(_rows(row_ok), _cols(d_ok)))})")
        _emit_features(w, plan, "fq", "q")
        w.line(f"state = tl.load(S + (kv * {plan.d_pad} + offs_d[:, None]) * {plan.dv_pad} + offs_v[None, :])")
        w.line(f"zsum = tl.load(Z + kv * {plan.d_pad} + offs_d)")
        w.line(f"num = {plan.state_dot('fq', 'state', '(NK + 1.0)')}")
        w.line("den = tl.sum(fq.to(tl.float32) * zsum[None, :], 1)")
        if plan.taylor:
            w.line(f"num += tl.load(S0 + kv * {plan.dv_pad} + offs_v)[None, :]")
            w.line("den += tl.load(Z0 + kv)")
            w.line("# the quadratic features block by block (1/2 on the query side: (q.k)^2 / 2)")
            with w.block("for pid_f in range(0, BLOCKS):"):
                f_ok = _emit_quad_indices(w, plan)
                _emit_quad_features(w, "fq2", "q_base", "rows", "q", row_ok, f_ok, plan.dot_dtype, weight=" * 0.5")
                w.line("srows = kv * BLOCKS * BK + feats")
                state2 = f"tl.load(S2 + srows[:, None] * {plan.dv_pad} + offs_v[None, :])"
                w.line(f"num += {plan.state_dot('fq2', state2, '(NK + 1.0)')}")
                w.line("den += tl.sum(fq2.to(tl.float32) * tl.load(Z2 + srows)[None, :], 1)")
        w.line(f"out = num / tl.maximum(den, {EPS!r})[:, None]")
        tile_mask = all_of(_rows(row_ok), _cols(v_ok))
        w.line(f"tl.store(OUT + (pid_bh.to(tl.int64) * NQ + rows[:, None]) * {plan.dv} + offs_v[None, :], "
               f"out.to({plan.dtype}){_store_mask(tile_mask)})")
    return _module(w)


# -- the hybrid's softmax window -------------------------------------------------------------------------------


def _window_source(plan: _Plan, has_lin: bool) -> str:
    """``linear_window``: softmax over the keys inside the window of each query row, combined with the
    outside-window linear sums (``NUM``/``DEN``) under one denominator."""
    w = SourceWriter()
    d_ok = "d_ok" if plan.d != plan.d_pad else None
    v_ok = "v_ok" if plan.dv != plan.dv_pad else None
    params = _QKV_PARAMS, """
        NUM, DEN, OUT,
        HQ, GROUP, NQ, NK, W, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    """
    with _signature(w, "linear_window", *params):
        w.line("pid_m = tl.program_id(0)")
        w.line("pid_bh = tl.program_id(1)")
        _emit_heads(w, plan)
        w.lines(f"""
            rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < NQ
            offs_n = tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, {plan.d_pad})
            offs_v = tl.arange(0, {plan.dv_pad})
        """)
        if d_ok:
            w.line(f"d_ok = offs_d < {plan.d}")
        if v_ok:
            w.line(f"v_ok = offs_v < {plan.dv}")
        w.line(f"q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd"
               f"{_masked(all_of('row_ok[:, None]', _cols(d_ok)))})")
        w.lines(f"""
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, {plan.dv_pad}], dtype=tl.float32)
        """)
        w.line("# the keys some row of this block has inside its window")
        w.line("start = tl.maximum(pid_m * BLOCK_M - W + 1, 0)")
        reach = "BLOCK_M" if plan.causal else "BLOCK_M + W - 1"
        w.line(f"stop = tl.minimum(pid_m * BLOCK_M + {reach}, NK)")
        with w.block("for n0 in range(start, stop, BLOCK_N):"):
            w.line("cols = n0 + offs_n")
            w.line("col_ok = cols < stop")
            if plan.has_keep:
                w.line("col_ok = col_ok & (tl.load(keep_base + cols * stride_mn, mask=col_ok, other=0) != 0)")
            w.line(f"kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd"
                   f"{_masked(all_of('col_ok[None, :]', _rows(d_ok)))})")
            w.line(f"s = {plan.dot('q', 'kt')} * qk_scale")
            w.line("rel = rows[:, None] - cols[None, :]")
            inside = "(rel >= 0) & (rel < W)" if plan.causal else "(rel < W) & (rel > -W)"
            w.line(f"s = tl.where({inside} & col_ok[None, :], s, float(\"-inf\"))")
            w.lines("""
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # a row with no window key so far keeps shift 0: exp2(-inf) = 0, never exp2(-inf - -inf)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp2(s - m_use[:, None])
                alpha = tl.exp2(m_i - m_use)
                l_i = l_i * alpha + tl.sum(p, 1)
            """)
            w.line(f"v = tl.load(v_base + cols[:, None] * stride_vn + offs_v[None, :] * stride_vd"
                   f"{_masked(all_of('col_ok[:, None]', _cols(v_ok)))})")
            w.line(f"acc = acc * alpha[:, None] + {plan.dot('p', 'v')}")
            w.line("m_i = m_new")
        w.line("buf = pid_bh.to(tl.int64) * NQ + rows")
        tile_mask = all_of("row_ok[:, None]", _cols(v_ok))
        if has_lin:
            w.lines(f"""
                lin_num = tl.load(NUM + buf[:, None] * {plan.dv} + offs_v[None, :], mask={tile_mask}, other=0.0)
                mass = tl.load(DEN + buf, mask=row_ok, other=0.0)
                # One shift for both kinds of terms (log2 units, as the torch path in natural units): the larger
                # of the window's row max and log2 of the linear mass, so neither factor exceeds 1; rows
                # without window keys keep shift 0.
                positive = mass > 0
                log_mass = tl.where(positive, tl.log2(tl.where(positive, mass, 1.0)), float("-inf"))
                has_window = m_i > float("-inf")
                shift = tl.where(has_window, tl.maximum(m_i, log_mass), 0.0)
                alpha = tl.exp2(m_i - shift)
                factor = tl.exp2(log_mass - shift)
                # lin_num / mass is a convex combination of the outside values: bounded however small the mass
                num = acc * alpha[:, None] + lin_num * (factor / tl.where(positive, mass, 1.0))[:, None]
                den = l_i * alpha + factor
            """)
        else:
            w.line("num = acc")
            w.line("den = l_i")
        w.line(f"out = num / tl.maximum(den, {EPS!r})[:, None]")
        w.line(f"tl.store(OUT + buf[:, None] * {plan.dv} + offs_v[None, :], out.to({plan.dtype}), "
               f"mask={tile_mask})")
    return _module(w)
