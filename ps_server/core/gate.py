"""The gate that parks pulls until SSP allows them: futures on the event loop, no threads, no polling.

A waiter registers a predicate over core state and awaits a future. Core code calls ``notify()``
synchronously after every state change; it resolves exactly the futures whose predicate now holds
(a predicate that raises, for example because the run was stopped or the caller's incarnation
became stale, fails its waiter with that error). A waiter with a key (a parked pull: the min clock
it needs) is looked at only once a ``notify(progress)`` reaches it, or by a plain ``notify()``:
a push wakes the ranks that waited for it without asking every other parked pull again. Compared with one ``asyncio.Condition`` and
``notify_all``, this wakes only waiters that can proceed and can be called from plain ``def``
core methods, which keeps every state mutation synchronous (STYLE.md, point 3).

Invariant: a waiter returns True only after its predicate returned True on the event loop; every
wait is bounded by its timeout (then it returns False, and the caller says why in its own error)
and removes itself in ``finally`` (also when cancelled).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from .errors import PsError

__all__ = ["Gate", "GateStatistics"]


@dataclass(frozen=True)
class GateStatistics:
    waiting: int


Key = Callable[[], int | None]
"""What a waiter waits for to grow to, as it stands now (None: it cannot say)."""


@dataclass(eq=False)
class _Waiter:
    predicate: Callable[[], bool]
    fut: asyncio.Future[None]
    key: Key | None = None


class Gate:
    def __init__(self) -> None:
        self._waiters: list[_Waiter] = []
        """Looked at by every ``notify``."""
        self._keyed: list[tuple[int, int, _Waiter]] = []
        """A heap by key: looked at by ``notify(progress)`` once the progress reaches the key."""
        self._seq = itertools.count()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float, key: Key | None = None) -> bool:
        """True once ``predicate()`` is true; False after ``timeout`` seconds. A PsError the
        predicate raises (the wait can never succeed) is raised here.

        ``key``: a value the predicate cannot hold below (a parked pull: the min clock it needs),
        so that ``notify(progress)`` need not look at it before the progress reaches it."""
        if predicate():
            return True
        waiter = _Waiter(predicate, asyncio.get_running_loop().create_future(), key)
        self._park(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter.fut
            return True
        except TimeoutError:
            return False
        finally:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass  # (keyed: left in the heap, done, until a notify drops it)

    def _park(self, waiter: _Waiter) -> None:
        key = waiter.key() if waiter.key is not None else None
        if key is None:
            self._waiters.append(waiter)
        else:
            heapq.heappush(self._keyed, (key, next(self._seq), waiter))

    def notify(self, progress: int | None = None) -> None:
        """Wake the waiters whose predicate holds now (call after every state change).

        ``progress``: all that changed is that the value keyed waiters wait for grew to this (a
        push moved the min clock): keyed waiters whose key is above it are not looked at. None:
        anything may have changed; every waiter is looked at, its key taken again."""
        for waiter in list(self._waiters):
            _resolve(waiter)
        if progress is None:
            keyed, self._keyed = self._keyed, []
            again = [w for _, _, w in keyed if not _resolve(w)]
        else:
            again = []
            while self._keyed and self._keyed[0][0] <= progress:
                waiter = heapq.heappop(self._keyed)[2]
                if not _resolve(waiter):
                    again.append(waiter)
        for waiter in again:
            self._park(waiter)

    def fail_all(self, exc: PsError) -> None:
        """Release every waiter with ``exc`` (shutdown)."""
        for waiter in [*self._waiters, *(w for _, _, w in self._keyed)]:
            if not waiter.fut.done():
                waiter.fut.set_exception(exc)

    def statistics(self) -> GateStatistics:
        return GateStatistics(waiting=len(self._waiters) + sum(not w.fut.done() for _, _, w in self._keyed))


def _resolve(waiter: _Waiter) -> bool:
    """Settle ``waiter`` if its predicate holds (or raises): whether it is done."""
    if waiter.fut.done():
        return True
    try:
        ready = waiter.predicate()
    except PsError as exc:
        waiter.fut.set_exception(exc)
        return True
    if ready:
        waiter.fut.set_result(None)
    return ready
