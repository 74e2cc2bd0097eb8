"""The server-wide budget of checkpoint snapshots held in memory at once (the ``Checkpointer``'s).

The snapshots held take at most ``limit`` bytes (a copy of the largest run the server accepts:
``config.snapshot_budget``, what the deployment's sizing counts), and one always fits when none is
held. Bytes are held when a snapshot is taken (or room is kept for one) and given back when it is
written or dropped; what waits for room (``room_for``) looks again each time bytes are given back.
Which snapshot waits, and what it does meanwhile, is the checkpointer's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import numpy as np

__all__ = ["SnapshotBudget", "nbytes"]


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """The bytes a snapshot's arrays hold."""
    return sum(a.nbytes for a in arrays.values())


class SnapshotBudget:
    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        """bytes of snapshots held at once, server-wide (0: no limit)."""
        self.held = 0
        """bytes of the snapshots taken and not written yet (or kept for a cut: ``checkpoint_at``)."""
        self._room: list[asyncio.Future[None]] = []
        """those waiting for ``held`` to go down (woken, they look again: a Condition cannot be
        notified from the synchronous code that gives bytes back)."""

    def fits(self, nbytes: int) -> bool:
        return not self.limit or not self.held or self.held + nbytes <= self.limit

    def hold(self, nbytes: int) -> None:
        """``nbytes`` more held (fewer if negative: no one is woken)."""
        self.held += nbytes

    def give(self, nbytes: int) -> None:
        """``nbytes`` of snapshots dropped or written: those waiting for room look again."""
        self.held -= nbytes
        for waiter in self._room:
            if not waiter.done():
                waiter.set_result(None)
        self._room.clear()

    async def room_for(self, nbytes: int) -> None:
        """Until ``nbytes`` fit (they are not held: the caller holds them once it has its snapshot)."""
        while not self.fits(nbytes):
            waiter = asyncio.get_running_loop().create_future()
            self._room.append(waiter)
            await waiter
