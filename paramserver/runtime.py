"""Process tuning, applied at start-up by ps-server and ps-worker: the allocator for moving large
tensors (``tune_malloc``), the server's open-file limit (``raise_fd_limit``), the end of a
child whose parent died (``child_env`` in the parent, ``exit_with_parent`` in the child), and stop
signals (``stop_early`` while starting, then ``on_stop_signals``: the ordered stop).

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

import asyncio
import ctypes
import ctypes.util
import functools
import os
import resource
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["PARENT_ENV", "STOP_SIGNALS", "StoppedEarly", "child_env", "exit_with_parent", "on_stop_signals",
           "raise_fd_limit", "release_free_memory", "stop_early", "tune_malloc"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""What stops ps-server and ps-worker in order (``on_stop_signals``): SIGTERM (docker stop, Kubernetes),
SIGINT (Ctrl-C) and SIGHUP (its terminal closed: a server killed by it wrote no final checkpoint)."""

PARENT_ENV = "PS_PARENT_PID"
"""Set by a program that starts ps-servers and ps-workers and stops them itself (``psctl launch
--local``, the benchmarks) to its pid: the child then stops when that parent dies, even by SIGKILL,
when nobody is left to stop it (``exit_with_parent``)."""
_PR_SET_PDEATHSIG = 1

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


def _stop_signals() -> list[signal.Signals]:
    """``STOP_SIGNALS`` but a SIGHUP ignored when this process started (``nohup ps-server``: its
    terminal's close was meant not to stop it); SIGTERM and SIGINT always (a shell starts background
    jobs with SIGINT ignored, against Ctrl-C in its terminal, not against ``kill -INT``)."""
    return [sig for sig in STOP_SIGNALS if sig != signal.SIGHUP or signal.getsignal(sig) is not signal.SIG_IGN]


def on_stop_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> list[signal.Signals]:
    """Have ``STOP_SIGNALS`` call ``stop`` on ``loop`` (in place of ``stop_early``); return those
    handled (``_stop_signals``: a SIGHUP ignored at start stays ignored)."""
    handled = _stop_signals()
    for sig in handled:
        loop.add_signal_handler(sig, stop)
    return handled


class StoppedEarly(BaseException):  # (not an Exception: no ``except Exception`` on the way may swallow it)
    """A stop signal came while the process started, before it had anything to stop in order."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signal = signal.Signals(signum)


def _raise_stopped(signum: int, frame: object) -> None:
    raise StoppedEarly(signum)


def stop_early() -> list[signal.Signals]:
    """Until ``on_stop_signals`` takes over, have ``STOP_SIGNALS`` raise ``StoppedEarly`` wherever
    the main thread is; return those handled (as ``on_stop_signals`` will). Call it first at start-up:
    a stop while the process starts (a server resuming a large data directory takes minutes, and its
    event loop does nothing else meanwhile) then ends it at once, which has nothing to stop in order
    yet. Without it, SIGTERM killed the process (143), and as PID 1 in a container, where a signal
    without a handler is ignored, it started on, to be SIGKILLed at the end of the grace period;
    SIGINT waited for asyncio's handler, which cancels a task only once the loop runs again."""
    handled = _stop_signals()
    for sig in handled:
        signal.signal(sig, _raise_stopped)
    return handled


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a child started with ``subprocess`` from this thread, that this process stops
    when done with it: ``PARENT_ENV`` names this process, so that the child, calling
    ``exit_with_parent``, is stopped by the kernel if this process dies first (SIGKILL, an OOM kill).

    Only from the main thread: the kernel signals the child when the *thread* that started it ends
    (PR_SET_PDEATHSIG), so a child started from a short-lived thread would be stopped with it."""
    env = {k: v for k, v in env.items() if k != PARENT_ENV}
    if threading.current_thread() is threading.main_thread():
        env[PARENT_ENV] = str(os.getpid())
    return env


def exit_with_parent(sig: int = signal.SIGTERM) -> bool:
    """When ``PARENT_ENV`` names this process's parent, have the kernel send ``sig`` here when that
    parent dies (Linux PR_SET_PDEATHSIG; SIGTERM: this process's ordered stop). A parent already
    gone by then (it died before this call) gets the same at once. The variable is removed from
    the environment (it names this process's parent, not its children's). True when armed; False
    without the variable, or where the kernel has no such setting. Call it first at start-up."""
    value = os.environ.pop(PARENT_ENV, "")
    if not value.isdigit():
        return False
    prctl = _glibc("prctl")
    if prctl is None or prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != int(value):  # it died before the kernel was told: nobody would send it
        os.kill(os.getpid(), sig)
    return True
