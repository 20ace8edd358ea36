"""Instructions per step of the sliced bitmask walk, counted in its sm_90 SASS (no GPU needed).

Triton compiles the kernel for an H100 target on this machine (its bundled ptxas and nvdisasm) and
the loop of the walk is counted from its label to its backward branch (docs/results/gpu_kernels.md:
session 15 cut these counts by 22-66% in a variant that was no faster on the H100).

    python benchmarks/sass_loops.py [DIR]   # DIR: keep the SASS listings there
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparsecraft.kernels.triton.sliced import sliced_gemv_kernel

SIG = {"x_ptr": "*fp16", "out_ptr": "*fp32", "vq_ptr": "*i64", "words_ptr": "*i32", "start_ptr": "*i32",
       "steps_ptr": "*i32", "perm_ptr": "*i16", "B": "i32", "N": "i32", "stride_xb": "i32",
       "stride_ob": "i32", "stride_or": "i32"}
# the dispatcher's layout: 128-column segments, 64-row slices, 4 values per step
COMMON = dict(SEG=128, C=64, P=4, BF16=False, INTERP=False, RELAXED=True, PDL=True)


def loops(sass: str) -> list[int]:
    """Instructions from each label to a later backward branch to it (nvdisasm's listing)."""
    pos, out, n = {}, [], 0
    for ln in sass.splitlines():
        m = re.match(r"^(\.L_x_\d+):", ln)
        if m:
            pos[m.group(1)] = n
        elif re.search(r"/\*[0-9a-f]{4,}\*/", ln):
            n += 1
            b = re.search(r"BRA `\((\.L_x_\d+)\)", ln)
            if b and b.group(1) in pos and pos[b.group(1)] < n - 1:
                out.append(n - pos[b.group(1)])
    return out


def sass_of(fn, consts: dict, num_warps: int, keep: str | None, name: str) -> str:
    sig = dict(SIG, **{k: "constexpr" for k in consts})
    kern = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps))
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kern.asm["cubin"])
        sass = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
    if keep:
        with open(os.path.join(keep, f"{name}.sass"), "w") as f:
            f.write(sass)
    return sass


def main() -> int:
    keep = sys.argv[1] if len(sys.argv) > 1 else None
    print(f"triton {triton.__version__}, target sm_90; instructions in the step loop (2 warps, 64-row slices,"
          " 4 values per step)")
    for bb in (1, 4, 8, 16):
        sass = sass_of(sliced_gemv_kernel, dict(COMMON, BB=bb, REG=True, UNROLL=1), 2, keep, f"walk{bb}")
        print(f"batch tile {bb:2d}: {loops(sass)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
