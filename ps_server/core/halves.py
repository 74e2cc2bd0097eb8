"""Both cores for one large tensor's elementwise work: half of it on a helper thread.

numpy releases the GIL inside its loops over large arrays, so two threads updating two halves of a
tensor run on two cores. This pays when a core is idle while the server works, as under BSP: every
worker waits for the clock's step (the wide model's 23 MB SGD step with BSP's combination of four
gradients, in one process: 6.5 ms on one core, 4.4 ms on two; Adam's 14.7 and 9.0 ms). Below
``MIN_ELEMENTS`` handing over costs more than it saves. The helper runs in a copy of the caller's
context, so ``np.errstate`` (the optimizers' overflow watch) sees its work too.
"""

from __future__ import annotations

import contextvars
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

__all__ = ["MIN_ELEMENTS", "both", "cut"]

MIN_ELEMENTS = 1 << 19
"""Elements (2 MiB of float32) from which a tensor's work is split in two."""

_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_lock = threading.Lock()
_helper: ThreadPoolExecutor | None = None


def cut(n: int, align: int) -> int:
    """Where to split work on ``n`` elements (a multiple of ``align``); 0: do not split (too
    small, or one core)."""
    if n < MIN_ELEMENTS or _CORES < 2:
        return 0
    return n // 2 // align * align


def both(first: Callable[[], None], second: Callable[[], None]) -> None:
    """Run ``first`` here and ``second`` on the helper thread; return when both are done (raising
    the first one's error, else the second's): the helper never outlives the call."""
    global _helper
    with _lock:
        if _helper is None:
            _helper = ThreadPoolExecutor(1, thread_name_prefix="ps-halves")
    future = _helper.submit(contextvars.copy_context().run, second)
    try:
        first()
    finally:
        error = future.exception()
    if error is not None:
        raise error

