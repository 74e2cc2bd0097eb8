"""How many large pushes the server receives at once.

A push is applied whole or not at all, so its chunks are held until the last one arrives. When
several workers push a large model at the same time and the event loop reads their streams in
turn, every one of those partial pushes is in memory at once. ``PushSlots`` lets ``limit``
multi-message pushes be received at a time; the others wait for a slot before reading on, and
HTTP/2 flow control holds their senders. With four workers pushing a 23 MB model the server's
peak was 157 MiB with one slot and 191 MiB with four (bench/RESULTS.md, memory), at the same rate.

A push whose next message does not arrive within ``patience`` seconds lends its slot out until
that message comes, so a stopped or stalled worker can never hold the others up: it only keeps
its own partial push in memory. Single-message pushes (small models) never take a slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

__all__ = ["PushSlots", "SlotHolder"]

T = TypeVar("T")


class PushSlots:
    def __init__(self, limit: int, patience: float = 0.5) -> None:
        if limit < 1:
            raise ValueError(f"push slots must be >= 1, got {limit}")
        self.limit = limit
        self.patience = patience
        self._sem = asyncio.Semaphore(limit)
        self.lent = 0  # times a stalled push lent its slot out (a figure for tests and metrics)

    def holder(self) -> SlotHolder:
        return SlotHolder(self)


class SlotHolder:
    """One stream's use of the slots: ``acquire`` once a push turns out to span several messages,
    ``next`` to read on while holding, ``release`` when the push is applied or refused."""

    def __init__(self, slots: PushSlots) -> None:
        self._slots = slots
        self.holding = False
        self.pinned = False
        """Set while a message is being received into memory under the slot (the TCP data plane):
        the slot is not lent out then, whatever the patience, so one slot bounds one such message."""
        self.within = False
        """Set while the data plane reads the rest of a push of several messages (a transport that
        answers one-message pushes itself, ``DataPlane.push_now``, hands it every message meanwhile)."""

    async def acquire(self) -> None:
        if not self.holding:
            await self._slots._sem.acquire()
            self.holding = True

    def release(self) -> None:
        if self.holding:
            self.holding = False
            self._slots._sem.release()

    async def next(self, it: AsyncIterator[T]) -> T:
        """The stream's next message (StopAsyncIteration at its end); while it keeps us waiting
        longer than the patience, the slot is someone else's. A timer, not a task with a timeout:
        this runs for every message of a large push (a task and ``asyncio.wait`` cost ~45 µs)."""
        if not self.holding:
            return await anext(it)
        timer = asyncio.get_running_loop().call_later(self._slots.patience, self._lend)
        try:
            msg = await anext(it)
        finally:
            timer.cancel()
        if not self.holding:  # lent out while we waited: take a slot again before reading on
            await self.acquire()
        return msg

    def _lend(self) -> None:
        if self.holding and not self.pinned:
            self.release()
            self._slots.lent += 1
