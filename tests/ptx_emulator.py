"""A tiny emulator for the straight-line integer / fp16x2 PTX that the Triton kernels inline, so CI
(no GPU) runs the exact instruction text that ships. It knows only the instructions used there."""

from __future__ import annotations

import re

import numpy as np

M32 = 0xFFFFFFFF


def _f16(bits: int) -> float:
    return float(np.array([bits & 0xFFFF], dtype=np.uint16).view(np.float16)[0])


def _f16_bits(v: float) -> int:
    return int(np.array([v], dtype=np.float16).view(np.uint16)[0])


def _lanes(op, *xs: int) -> int:
    """Apply ``op`` to the two fp16 lanes (float64 math, one rounding to fp16: exact for mul/fma of
    fp16 operands, whose products fit a float64 mantissa)."""
    lo = op(*(_f16(x) for x in xs))
    hi = op(*(_f16(x >> 16) for x in xs))
    return _f16_bits(lo) | _f16_bits(hi) << 16


def run(ptx: str, inputs: dict[int, int]) -> int:
    """Run ``ptx`` with operands ``$i`` = inputs[i]; returns the value written to ``$0``."""
    regs: dict[str, int] = {}

    def get(tok: str) -> int:
        if tok.startswith("$"):
            return inputs[int(tok[1:])]
        if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", tok):
            return int(tok, 0)
        return regs[tok]

    out = None
    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        d, *a = [t.strip() for t in rest.split(",")]
        v = [get(t) for t in a]
        if op == "mov.b32":
            r = v[0]
        elif op == "and.b32":
            r = v[0] & v[1]
        elif op == "or.b32":
            r = v[0] | v[1]
        elif op == "shr.b32":
            r = v[0] >> v[1]
        elif op == "fma.rn.f16x2":
            r = _lanes(lambda x, y, z: x * y + z, *v)
        else:
            raise NotImplementedError(f"PTX emulator: {op}")
        r &= M32
        if d == "$0":
            out = r
        else:
            regs[d] = r
    return out
