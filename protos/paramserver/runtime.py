"""Process tuning for moving large tensors, applied at start-up by ps-server and ps-worker.

glibc hands every allocation of 32 MiB or more back to the OS when it is freed, so each large
message or gradient buffer is faulted in afresh (~2 GB/s here). Raising the mmap and trim
thresholds keeps those pages in the process: measured 2-5x on every large-message path
(DESIGN.md), and 1045 -> 565 ms of server CPU per push+pull of a 100M-parameter model
(bench/RESULTS.md). Same effect as MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ in the
environment, which take precedence when set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = 2**31 - 1) -> bool:
    """Set glibc's thresholds unless the environment already does; False where not glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
