"""Compile the softmax backward kernels for sm_90 (H100/H200) with Triton's own compiler and a CUDA target
(no GPU needed) and print, per kernel: registers, spilled bytes, shared memory, and the wgmma / mma
instructions of the compiled code.

    env -u TRITON_INTERPRET python benchmarks/backward_compile_sm90.py

Registers and spills come from ``cuobjdump -res-usage`` on the cubin (Triton's bundled binary), shared memory
from the compiled metadata, HGMMA (Hopper wgmma) and HMMA counts from the SASS (``nvdisasm``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET: the interpreter does not compile")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attncc.codegen.softmax_backward import BackwardPlan, Hook, KERNELS, generate_source, kernel_params  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
FLOATS = {"sm_scale", "qk_scale", "tanh_scale", "cap_log2"}
POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "Lse", "Delta", "Bias", "Mask", "Sinks", "DBias", "LayQ",
            "LayK", "KTok", "mask_tiles", "tile_index"}


def pointer_type(name: str, plan: BackwardPlan) -> str:
    elem = {"tl.bfloat16": "bf16", "tl.float16": "fp16", "tl.float32": "fp32"}[plan.dtype]
    if name in ("DK", "DV") and plan.token_map is not None:
        return "*fp32"
    return {"Lse": "*fp32", "Delta": "*fp32", "DBias": "*fp32", "Sinks": "*fp32", "Bias": "*fp32", "Mask": "*u8",
            "LayQ": "*i32", "LayK": "*i32", "KTok": "*i32", "mask_tiles": "*i8", "tile_index": "*i32"}.get(name,
                                                                                                     f"*{elem}")


def compile_one(plan: BackwardPlan, entry: str, block_m: int, block_n: int, warps: int, stages: int):
    module = types.ModuleType("bwd_kernels")
    source = generate_source(plan)
    path = Path(tempfile.mkdtemp()) / "bwd_kernels.py"
    path.write_text(source)  # Triton reads a kernel's source through inspect: give it a real file
    exec(compile(source, str(path), "exec"), module.__dict__)
    fn = getattr(module, entry)
    names = kernel_params(plan)
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in POINTERS:
            signature[name] = pointer_type(name, plan)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride_") and name.endswith(("n", "_q", "_m")):
                attrs[(i,)] = [["tt.divisibility", 16]]
    signature.update(BLOCK_M="constexpr", BLOCK_N="constexpr")
    src = ASTSource(fn, signature, constexprs={"BLOCK_M": block_m, "BLOCK_N": block_n}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": warps, "num_stages": stages})


def resources(compiled) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                               text=True).stdout
        sass = subprocess.run([str(BIN / "nvdisasm"), str(cubin)], capture_output=True, text=True).stdout
    reg = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    return {"regs": int(reg.group(1)) if reg else -1, "stack": int(stack.group(1)) if stack else -1,
            "local": int(local.group(1)) if local else -1, "shared": compiled.metadata.shared,
            "hgmma": sass.count("HGMMA"), "hmma": sass.count("HMMA"),
            "stl": len(re.findall(r"\bSTL\b", sass))}


def plans():
    base = dict(dtype="tl.bfloat16", d=128, block_d=128, dv=128, block_dv=128, group=1, causal=False, softcap=False,
                bias=None, mask=None, sinks=False, dbias=False)
    # configs: what attncc.codegen.softmax_backward.tile_sizes picks on a GPU
    yield "dense causal bf16 D128", BackwardPlan(visit="dense", **{**base, "causal": True}), (64, 64, 8, 2)
    yield "dense bf16 D64 GQA4", BackwardPlan(visit="dense", **{**base, "d": 64, "block_d": 64, "dv": 64,
                                                               "block_dv": 64, "group": 4}), (64, 64, 4, 2)
    yield "dense fp32 D64 (tf32x3)", BackwardPlan(visit="dense", **{**base, "dtype": "tl.float32", "d": 64,
                                                                     "block_d": 64, "dv": 64, "block_dv": 64},
                                                  dot_precision="tf32x3"), (64, 64, 4, 2)
    yield "band causal bf16 D128 + padding mask + sinks", BackwardPlan(
        visit="band", band_prefix=True, **{**base, "causal": True, "mask": (False, True), "sinks": True}), \
        (64, 64, 8, 2)
    yield "dense bf16 D128 full bias (dbias) + softcap", BackwardPlan(
        visit="dense", **{**base, "bias": (True, True), "dbias": True, "softcap": True}), (64, 64, 8, 2)
    yield "layout (topk/block_sparse block 64) bf16 D128", BackwardPlan(visit="layout", **{**base, "causal": True}), \
        (64, 64, 8, 2)
    # layouts of block 128 are walked as 64 x 64 sub-tiles (softmax_backward.MAX_LAYOUT_TILE): the row above
    from attncc.codegen.block_sparse import TILE_PREDICATE
    pred = Hook(TILE_PREDICATE, ("tile_index_stride", "tile_b"), ("mask_tiles", "tile_index"))
    yield "layout + mask_mod predicate bf16 D64", BackwardPlan(
        visit="layout", predicate=pred, **{**base, "d": 64, "block_d": 64, "dv": 64, "block_dv": 64}), (64, 64, 4, 2)
    from attncc.codegen.neighborhood import neighborhood_visit
    from attncc.variants.neighborhood import NeighborhoodSpec
    visit = neighborhood_visit(NeighborhoodSpec(kernel=7, grid=(32, 32)), 1024)
    yield "neighborhood 2-D (token map + predicate) bf16 D64", BackwardPlan(
        visit="layout", predicate=Hook(visit.predicate.code), token_map=Hook(visit.token_map.code),
        **{**base, "d": 64, "block_d": 64, "dv": 64, "block_dv": 64}), (64, 64, 4, 2)


def main() -> None:
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_90 (GPUTarget('cuda', 90, 128))")
    print("| kernel | config | entry | registers | spill (stack/local bytes) | shared bytes | HGMMA | HMMA |")
    print("|---|---|---|---|---|---|---|---|")
    for title, plan, (bm, bn, warps, stages) in plans():
        for entry in KERNELS:
            try:
                r = resources(compile_one(plan, entry, bm, bn, warps, stages))
            except Exception as error:  # report, keep going
                print(f"| {title} | {bm}x{bn} w{warps} s{stages} | {entry} | error: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:100]} |")
                continue
            print(f"| {title} | {bm}x{bn} w{warps} s{stages} | {entry} | {r['regs']} | {r['stack']}/{r['local']} "
                  f"(STL {r['stl']}) | {r['shared']} | {r['hgmma']} | {r['hmma']} |")


if __name__ == "__main__":
    main()
