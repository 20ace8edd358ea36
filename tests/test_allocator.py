import platform
import sys

from sparsecraft.allocator import keep_freed_memory


def test_keep_freed_memory_applies_on_glibc_and_is_repeatable():
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
    assert keep_freed_memory() is glibc  # a second call (CLI, then the engine) changes nothing
