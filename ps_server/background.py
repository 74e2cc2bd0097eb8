"""Work that must end even when the call that started it does not wait for it (``Background``).

A deletion cut short leaves what nobody deletes again: a run's checkpoints half gone, a server
never told to drop its shard. So DeleteRun's deletion, that of a CreateRun's shards whose caller
gave up, and those the lease sweep starts (the retention limits', evictions told to the other
servers) run as tasks of one ``Background``: each referenced until it ends (the event loop holds
tasks weakly: one nothing refers to may be collected mid-way, "Task was destroyed but it is
pending"), waited for by a caller cancelled meanwhile (``landed``), and given a bounded time to end
when the server stops (``settle``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["Background", "landed"]

T = TypeVar("T")


async def landed(work: Awaitable[T], failed: Callable[[Exception], object] = lambda exc: None) -> T:
    """``work``'s result; a caller cancelled meanwhile is cancelled once ``work`` has ended (a
    thread writing or deleting a run's files goes on regardless: the run's lock, held around
    this, must be held until it has landed, or the next write of the run would race it), and
    what ``work`` raised then goes to ``failed`` (no one else hears of it). A caller cancelled
    again while it waits lets go of ``work``: ``Background.landed`` keeps it referenced."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        if not task.cancelled() and isinstance(exc := task.exception(), Exception):
            failed(exc)
        raise


class Background:
    """The server's tasks that outlive their caller."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, work: Awaitable[T]) -> asyncio.Future[T]:
        """``work`` as a task, kept until it ends."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def landed(self, work: Awaitable[T]) -> T:
        """``landed(work)``, ``work`` kept until it ends whatever its caller does."""
        return await landed(self.start(work))

    async def settle(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the tasks under way (and those they start); cancel what
        is left, and give it as long again to end (a deletion cancelled writes down whom it did not
        tell: ``ClusterOwner.delete``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._tasks and loop.time() < deadline:
            await asyncio.wait(set(self._tasks), timeout=deadline - loop.time())
        late = set(self._tasks)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=timeout)
