"""Process tuning, applied at start-up by ps-server and ps-worker: the allocator for moving large
tensors (``tune_malloc``), and the server's open-file limit (``raise_fd_limit``).

glibc hands every allocation of 32 MiB or more back to the OS when it is freed, so each large
message or gradient buffer is faulted in afresh (~2 GB/s here). Raising the mmap and trim
thresholds keeps those pages in the process: measured 2-5x on every large-message path
(DESIGN.md), and 1045 -> 565 ms of server CPU per push+pull of a 100M-parameter model
(bench/RESULTS.md). Since those pages are kept, each malloc arena keeps its own peak: gRPC's
threads receive into their arenas while Python reads in the main one. A server with four clients
pushing and pulling a 23 MB model peaked at 257-290 MiB with glibc's default arena count and at
155-165 MiB with one arena, moving as much data (bench/push_memory.py, bench/RESULTS.md). The
environment's MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ and MALLOC_ARENA_MAX take precedence
when set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
from typing import Any

__all__ = ["raise_fd_limit", "release_free_memory", "tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")


def tune_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = 2**31 - 1, arena_max: int = 1) -> bool:
    """Set glibc's thresholds and arena count unless the environment already does; False where
    not glibc. Call it before any thread starts (arenas are created as threads first allocate)."""
    if any(name in os.environ for name in _ENV):
        return False
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    return all(bool(mallopt(param, value)) for param, value in (
        (_M_ARENA_MAX, arena_max), (_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold)))


def release_free_memory() -> bool:
    """Hand the allocator's free pages back to the OS now (glibc's ``malloc_trim``), which
    ``tune_malloc`` keeps otherwise: for memory freed for good, such as a worker's own copy of
    parameters it now reads in shared memory. False where not glibc."""
    malloc_trim = _glibc("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))


def _glibc(function: str) -> Any:
    """glibc's ``function``; None where the C library has none (musl, macOS)."""
    libc = _libc()
    return None if libc is None else getattr(libc, function, None)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, loaded once (``find_library`` runs a program)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit (a server holds a socket per data
    stream; the common soft default of 1024 is a few hundred workers); return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # a hard limit the kernel will not grant (RLIM_INFINITY on macOS)
            pass
    return int(soft)
