"""The gate that parks pulls until SSP allows them: futures on the event loop, no threads, no polling.

A waiter registers a predicate over core state and awaits a future. Core code calls ``notify()``
synchronously after every state change; it resolves exactly the futures whose predicate now holds
(a predicate that raises, for example because the run was stopped or the caller's incarnation
became stale, fails its waiter with that error). Compared with one ``asyncio.Condition`` and
``notify_all``, this wakes only waiters that can proceed and can be called from plain ``def``
core methods, which keeps every state mutation synchronous (STYLE.md, point 3).

Invariant: a waiter returns True only after its predicate returned True on the event loop; every
wait is bounded by its timeout (then it returns False, and the caller says why in its own error)
and removes itself in ``finally`` (also when cancelled).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from .errors import PsError

__all__ = ["Gate", "GateStatistics"]


@dataclass(frozen=True)
class GateStatistics:
    waiting: int


class Gate:
    def __init__(self) -> None:
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """True once ``predicate()`` is true; False after ``timeout`` seconds. A PsError the
        predicate raises (the wait can never succeed) is raised here."""
        if predicate():
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await fut
            return True
        except TimeoutError:
            return False
        finally:
            try:
                self._waiters.remove(entry)
            except ValueError:
                pass

    def notify(self) -> None:
        """Wake the waiters whose predicate holds now (call after every state change)."""
        for predicate, fut in list(self._waiters):
            if fut.done():
                continue
            try:
                ready = predicate()
            except PsError as exc:
                fut.set_exception(exc)
                continue
            if ready:
                fut.set_result(None)

    def fail_all(self, exc: PsError) -> None:
        """Release every waiter with ``exc`` (shutdown)."""
        for _, fut in list(self._waiters):
            if not fut.done():
                fut.set_exception(exc)

    def statistics(self) -> GateStatistics:
        return GateStatistics(waiting=len(self._waiters))
