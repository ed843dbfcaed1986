"""A process that loads and runs one small generated kernel through the kernel cache (for cache tests).

Usage: ``python cache_worker.py TAG`` (TAG goes into the descriptor, so tests choose which entry). Exit 0 and
prints ``ok`` when the kernel ran correctly; a CacheMissError prints ``attncc: error: ...`` and exits 3.
"""

import os
import sys

if __name__ == "__main__":
    # a worker process runs its kernel in Triton's interpreter (set before triton is imported); imported by the
    # tests instead, it must leave the suite's mode alone (the GPU where there is one)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from attncc.codegen.cache import CacheMissError  # noqa: E402
from attncc.codegen.source import interpreting, launch, load_kernel  # noqa: E402
from attncc.codegen.writer import SourceWriter  # noqa: E402


def generate(tag: str) -> str:
    w = SourceWriter()
    w.lines("""
        import triton
        import triton.language as tl
    """)
    w.line(f"# tag {tag}")
    w.line("@triton.jit")
    with w.block("def add_one(x_ptr, n, BLOCK: tl.constexpr):"):
        w.line("offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)")
        w.line("tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)")
    return w.text()


def run_attention() -> None:
    """The real kernels through the public op: exact causal and a local band with sinks."""
    import attncc
    from attncc.variants.exact import reference

    os.environ["ATTNCC_BACKEND"] = "triton"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    out = attncc.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, reference(q, k, v, causal=True), rtol=1e-4, atol=1e-5)
    attncc.attention(q, k, v, variant="local(window=8, sinks=2)", causal=True)


def run(tag: str) -> None:
    if tag == "attention":
        run_attention()
        return
    device = torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")
    kernel = load_kernel("add_one", {"family": "cache-test", "tag": tag}, lambda: generate(tag), device)
    x = torch.zeros(10, device=device)
    launch(kernel, (1,), x, 10, BLOCK=16)
    assert torch.equal(x.cpu(), torch.ones(10)), x


if __name__ == "__main__":
    try:
        run(sys.argv[1] if len(sys.argv) > 1 else "default")
    except CacheMissError as error:
        print(f"attncc: error: {error}")
        sys.exit(3)
    print("ok")
