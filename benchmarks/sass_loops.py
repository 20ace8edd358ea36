"""Instructions in the loops of a compiled Triton kernel (SASS), to check cost-per-step estimates.

    python benchmarks/sass_loops.py [DIR]   # the sliced kernel at run 10's settings; DIR: keep the SASS
"""

from __future__ import annotations

import re
import sys

import torch

from sparsecraft import formats
from sparsecraft.kernels.triton import layout
from sparsecraft.kernels.triton.sliced import sliced_gemv_kernel, sliced_mm


def loops(sass: str) -> list[tuple[str, int]]:
    """(label, instructions from the label to its backward branch) for each backward branch."""
    pos, out, n = {}, [], 0
    for ln in sass.splitlines():  # Triton's listing: "LBBn:" labels, one instruction per tabbed line
        m = re.match(r"^(LBB\d+):", ln)
        if m:
            pos[m.group(1)] = n
        elif "\t" in ln:
            n += 1
            b = re.search(r"BRA (LBB\d+)", ln)
            if b and b.group(1) in pos:
                out.append((b.group(1), n - pos[b.group(1)]))
    return out


def main() -> int:
    keep = torch.rand(4096, 4096) >= 0.7
    w = (torch.randn(4096, 4096) * keep).half()
    tw = layout.prepare(formats.BitmaskTensor.from_dense(w, mask=keep), "cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    for rows, warps, unroll in ((64, 2, 4), (64, 2, 1), (32, 1, 1)):
        sliced_mm(x, tw.sliced_view(128, rows), 1, warps, unroll=unroll)
    settings = iter(("rows 64, 2 warps, unroll 4", "rows 64, 2 warps, unroll 1", "rows 32, 1 warp, unroll 1"))
    for cache in sliced_gemv_kernel.device_caches.values():
        kernels = next(c for c in cache if isinstance(c, dict))
        for kern in kernels.values():
            sass = kern.asm["sass"]
            if len(sys.argv) > 1:  # a folder to keep the listings in
                name = next(settings, "?").replace(", ", "_").replace(" ", "")
                with open(f"{sys.argv[1]}/sliced_{name}.sass", "w") as f:
                    f.write(sass)
                print(name, len(sass.splitlines()), "SASS lines", flush=True)
                continue
            print(f"{next(settings, '?')}: {len(sass.splitlines())} SASS lines;"
                  f" loops (label, instructions): {loops(sass)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
