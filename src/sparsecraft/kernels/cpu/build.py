"""Compile ``sc_kernels.c`` on first use and load it with ctypes.

The shared library is cached per user, keyed by a hash of the source, the compiler flags, the
compiler's version and the CPU's feature flags, so a changed source or a different machine gets a
fresh build and concurrent first uses are safe (each writes a temp file, then ``os.replace``).
Only the system C compiler is needed (``CC`` or ``gcc``/``cc``); nothing is downloaded.

torch is imported before the library is loaded, so the OpenMP runtime it already carries
(``libgomp.so.1``) satisfies our library's dependency by soname: one thread pool for torch and
the kernels instead of two pools spinning against each other on few cores.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp first, see module docstring)

from ...errors import SparsecraftError

SOURCE = Path(__file__).with_name("sc_kernels.c")
ABI_VERSION = 5  # must match sc_abi_version() in the C file

# "native": every instruction this CPU has (AVX-512 path when present);
# "portable": baseline x86-64 / generic code, i.e. the scalar path (used by tests and as a fallback)
VARIANT_FLAGS = {
    "native": ["-O3", "-march=native"],
    "portable": ["-O3"],
}
COMMON_FLAGS = ["-shared", "-fPIC", "-std=c11", "-fno-strict-aliasing"]


def cache_dir() -> Path:
    root = os.environ.get("SPARSECRAFT_CACHE") or os.environ.get("XDG_CACHE_HOME")
    base = Path(root) if root else Path.home() / ".cache"
    return base / "sparsecraft" / "cpu_kernels"


def _compiler() -> str:
    for cand in (os.environ.get("CC"), "gcc", "cc", "clang"):
        if cand and shutil.which(cand):
            return cand
    raise SparsecraftError(
        "no C compiler found (tried $CC, gcc, cc, clang): the CPU sparse kernels are compiled on first "
        "use; install gcc (e.g. `apt-get install gcc`) or run SparseLinear with kernels='torch'"
    )


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return cc


def _try_compile(cc: str, flags: list[str], dst: Path) -> str | None:
    """Compile to a temp file next to dst and move it in place; returns an error text or None."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=dst.parent)
    os.close(fd)
    try:
        cmd = [cc, *flags, *COMMON_FLAGS, str(SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return f"{' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}"
        os.replace(tmp, dst)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library_path(variant: str = "native") -> Path:
    """Path of the compiled library for this machine, building it if needed."""
    if variant not in VARIANT_FLAGS:
        raise SparsecraftError(f"unknown kernel variant {variant!r}; use one of {sorted(VARIANT_FLAGS)}")
    cc = _compiler()
    src = SOURCE.read_bytes()
    errors = []
    # OpenMP first; without it (e.g. clang lacking libomp) the kernels still run, single-threaded.
    for omp in (["-fopenmp"], []):
        flags = VARIANT_FLAGS[variant] + omp
        key = hashlib.sha256(
            b"\0".join([src, " ".join(flags).encode(), _compiler_version(cc).encode(), _cpu_flags().encode()])
        ).hexdigest()[:20]
        dst = cache_dir() / f"sc_kernels_{variant}_{key}.so"
        if dst.exists():
            return dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        err = _try_compile(cc, flags, dst)
        if err is None:
            return dst
        errors.append(err)
    raise SparsecraftError(f"could not compile the CPU sparse kernels ({SOURCE.name}):\n" + "\n".join(errors))


class Desc(ctypes.Structure):
    """Mirror of ``sc_desc`` in the C file: everything about one weight that is constant per call."""

    _fields_ = [
        ("kind", ctypes.c_int32),
        ("vt", ctypes.c_int32),
        ("out", ctypes.c_int64),
        ("in_", ctypes.c_int64),
        ("meta", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
        ("row_offsets", ctypes.c_void_p),
        ("n", ctypes.c_int32),
        ("m", ctypes.c_int32),
        ("scales", ctypes.c_void_p),
        ("zeros", ctypes.c_void_p),
        ("group_size", ctypes.c_int64),
        ("bias", ctypes.c_void_p),
        ("nthreads", ctypes.c_int32),
        ("force_scalar", ctypes.c_int32),
    ]


_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int


@functools.cache
def load_library(variant: str = "native") -> ctypes.CDLL:
    """The loaded kernel library (built on first use, then cached on disk and in this process)."""
    lib = ctypes.CDLL(str(library_path(variant)))
    if lib.sc_abi_version() != ABI_VERSION:
        raise SparsecraftError(
            f"stale kernel library (ABI {lib.sc_abi_version()} != {ABI_VERSION}); "
            f"delete {cache_dir()} and retry"
        )
    lib.sc_matmul.argtypes = [ctypes.POINTER(Desc), _P, _I64, _I64, _P, _I64]
    lib.sc_matmul.restype = _INT
    lib.sc_matmul_rows.argtypes = [ctypes.POINTER(Desc), _P, _I64, _P]
    lib.sc_matmul_rows.restype = _INT
    lib.sc_stream_copy.argtypes = [_P, _P, _I64, _INT]
    lib.sc_stream_copy.restype = None
    lib.sc_stream_read.argtypes = [_P, _I64, _INT]
    lib.sc_stream_read.restype = ctypes.c_float
    lib.sc_has_avx512.restype = _INT
    return lib


def has_avx512(variant: str = "native") -> bool:
    return bool(load_library(variant).sc_has_avx512())
