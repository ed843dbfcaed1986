"""Autotuning: a small pruned set of launch configs per kernel, timed on the real inputs, remembered per
(kernel, sequence-length bucket) in the kernel cache.

Generators list candidate :class:`Config` s already pruned for the site (tiles no larger than the sequence,
head dims that fit in shared memory); :func:`choose` times each one with the caller's ``run(config)`` (which
builds the real block layout for that config's tile sizes, so sparse kernels are tuned on the sparsity they
will see) and stores the winner. The next call with the same kernel and length bucket, in this process or a
later one, reuses it without timing. Under ``TRITON_INTERPRET=1`` timings mean nothing: the first candidate
is used and nothing is stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from attncc import progress
from attncc.codegen.cache import default_cache, require_miss_allowed
from attncc.codegen.source import interpreting
from attncc.errors import AttnccError


FP_FUSION = True
"""``enable_fp_fusion`` of every launch (multiply-adds fused into FMAs)."""


class NoRunnableConfig(AttnccError):
    """Every candidate config failed to launch on this GPU (e.g. too much shared memory for a huge head dim)."""


@dataclass(frozen=True)
class Config:
    """One launch configuration: constexpr tile sizes (``params``) plus Triton's ``num_warps``/``num_stages``."""

    params: tuple[tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 2

    @staticmethod
    def of(num_warps: int = 4, num_stages: int = 2, **params: int) -> "Config":
        return Config(tuple(sorted(params.items())), num_warps, num_stages)

    def __getitem__(self, name: str) -> int:
        return dict(self.params)[name]

    def launch_kwargs(self) -> dict:
        """Keyword arguments for ``kernel[grid](..., **config.launch_kwargs())``."""
        kwargs = dict(self.params)
        if not interpreting():
            kwargs.update(self.compile_options())
        return kwargs

    def compile_options(self) -> dict:
        """Triton's compile options of this config (what a GPU launch passes besides the tile sizes)."""
        # Floating-point fusion said explicitly (Triton 3.9 warns that its default turns off in 3.10): the
        # kernels want it, e.g. the softmax's `s * scale - m` is one FMA, more accurate than two roundings.
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, "enable_fp_fusion": FP_FUSION}

    def as_json(self) -> dict:
        return {"params": dict(self.params), "num_warps": self.num_warps, "num_stages": self.num_stages}

    @staticmethod
    def from_json(data: dict) -> "Config":
        return Config.of(data["num_warps"], data["num_stages"], **data["params"])

    def __str__(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{inner}, warps={self.num_warps}, stages={self.num_stages}"


def length_bucket(n: int) -> int:
    """Sequence lengths tune together within a power-of-two bucket (1000 and 1024 share 1024)."""
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def choose(kernel: dict, bucket: int, configs: Sequence[Config], run: Callable[[Config], None],
           device: torch.device, timer: Optional[Callable[[Callable[[], None]], float]] = None) -> Config:
    """The fastest of ``configs`` for ``kernel`` (its cache descriptor) at length ``bucket``.

    ``run(config)`` launches the kernel once on the real inputs; ``timer(fn)`` returns fn's time in ms
    (default ``triton.testing.do_bench`` on a GPU; without a timer, interpreted or CPU runs take the first
    config). Configs that fail to launch (too many resources on this GPU) are skipped; if all fail, the first
    one's error is raised.
    """
    if not configs:
        raise AttnccError("autotune: no candidate configs")
    if len(configs) == 1 or (timer is None and (interpreting() or device.type != "cuda")):
        return configs[0]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    descriptor = {"kernel": kernel, "bucket": bucket, "device": device_name,
                  "configs": [c.as_json() for c in configs]}
    cache = default_cache()
    entry = cache.get("tuning", descriptor)
    if entry is not None:
        return Config.from_json(entry.payload["best"])
    require_miss_allowed(f"autotuning {kernel.get('entry', 'a kernel')} at length bucket {bucket}")
    if timer is None:
        from triton.testing import do_bench

        def timer(fn):
            return do_bench(fn, warmup=5, rep=20)

    timings: dict[str, float] = {}
    best, best_ms, first_error = None, math.inf, None
    with progress.steps(f"autotuning {kernel.get('entry', 'a kernel')} at length {bucket}", len(configs)) as step:
        for config in configs:
            step.advance(str(config))
            try:
                ms = timer(lambda: run(config))
            except Exception as error:  # out of shared memory / registers on this GPU: not a candidate here
                first_error = first_error or error
                continue
            timings[str(config)] = ms
            if ms < best_ms:
                best, best_ms = config, ms
    if best is None:
        raise NoRunnableConfig(f"autotune: no config of {kernel.get('entry', 'the kernel')} runs: {first_error}")
    cache.put("tuning", descriptor, {"best": best.as_json(), "timings_ms": timings})
    return best
