"""An asyncio event loop whose clock is virtual: sleeping takes no time (``psctl simulate``).

Only the selector waits for time to pass: where a real one blocks in ``select(timeout)`` until a
timer is due, ``VirtualSelector`` returns at once and moves the virtual clock on by ``timeout``.
So ``asyncio.sleep``, ``asyncio.timeout``, ``call_later`` and every future resolved by them run on
``VirtualLoop.time()`` unchanged, as fast as the callbacks run, and deterministically: the same
program gives the same times. There is no I/O: a ``select`` that would block with no timer due
(every task waits on something only another task could set) is a deadlock and raises it.

Invariant: the virtual clock never goes back and only moves in ``select``, by the timeout the loop
asked for, i.e. up to its next timer.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["RESOLUTION", "Deadlock", "VirtualLoop", "VirtualSelector", "run_virtual"]

T = TypeVar("T")
RESOLUTION = 1e-9
"""Seconds: timers due this close to the virtual clock run together."""


class Deadlock(RuntimeError):
    """The loop would wait forever: nothing ready, no timer, and no I/O to wait for."""


class VirtualSelector(selectors.SelectSelector):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """Return no events; instead of blocking for ``timeout`` seconds, let them pass."""
        if timeout is None:
            raise Deadlock("virtual time: every task waits and no timer is due (a deadlock)")
        self.now += max(0.0, timeout)
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    """``time()`` is the selector's virtual clock, starting at 0."""

    def __init__(self) -> None:
        self._virtual = VirtualSelector()
        super().__init__(self._virtual)
        # Timers due within this of the clock run now (asyncio's test: due < time() + resolution, so
        # it must be > 0). The real clock's may be 15 ms (Windows); a nanosecond keeps virtual
        # times exact to ~1e-9 s (and above the float spacing of any time below ~10^6 s).
        self._clock_resolution = RESOLUTION

    def time(self) -> float:
        return self._virtual.now



def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on a new ``VirtualLoop`` (as ``asyncio.run`` does on a real one: tasks left over
    are cancelled, the loop closed); raises ``Deadlock`` if its tasks wait on each other for ever."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass  # none: good
    else:
        main.close()
        raise RuntimeError("virtual time runs a loop of its own: call it where no event loop is running "
                           "(from async code: in a thread, asyncio.to_thread)")
    with asyncio.Runner(loop_factory=VirtualLoop) as runner:
        return runner.run(main)
