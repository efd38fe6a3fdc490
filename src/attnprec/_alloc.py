"""Keep freed memory in the process (glibc): the bounds allocate and free the same
few-megabyte temporaries for every row block, and by default glibc returns them to the
system at once, so every block pays page faults on fresh pages (a third of an audit's time
at n = 8192, benchmarks/bench_scale.py). Called by the command line and its worker
processes, never on import: a library must not change its host's allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(limit: int = 2**30) -> bool:
    """Let glibc keep up to ``limit`` bytes of freed heap and serve blocks up to 32 MiB
    from it (``mallopt``); returns False where that is not possible (not glibc).

    Raises
    ------
    ValueError
        ``limit`` not an integer in ``[0, 2^31 - 1]`` (mallopt takes a C int).
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit < 2**31:
        raise ValueError(f"limit: expected an integer in [0, 2^31 - 1] bytes, got {limit!r}")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
