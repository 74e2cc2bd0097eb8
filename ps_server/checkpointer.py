"""When checkpoints are taken, and the resume at start-up; the disk format is ``core.checkpoint``.

A run tells its checkpointer of every change, synchronously (``Run.on_change``); when it is created,
when its min clock passes a multiple of ``every`` and when it finishes, the snapshot
(``core.snapshot``) is taken right there, a consistent cut on the event loop; the write (npz,
hashes, fsync, rename) then runs in a thread so the loop keeps serving. Writes of one run are
ordered by a lock: a newer checkpoint never lands before an older one. When the disk is slower than
the run, snapshots are coalesced: one write at a time per run, and only the newest snapshot waits
for it (what lands is as fresh as the disk allows).

The snapshots held at once, server-wide, fit a budget, a copy of the largest run the server
accepts (``SnapshotBudget``, in ``snapshot_budget``): runs reaching a checkpoint together each
copied theirs, the one being written and the one waiting, up to twice every run's memory on top of
the runs. A snapshot with no room is taken once a copy before it is written: a scheduled one then,
at the min clock its run is at (labelled so: of a run over several servers, a cut the others may
not have); one on demand, and a cluster's cut (``checkpoint_at``), whose room is kept from before
its clock is reached, wait for it. One always fits when none is held.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .background import landed
from .core import snapshot
from .core.checkpoint import CheckpointStore
from .core.errors import FailedPrecondition, NotFound, shortened
from .core.run import Run
from .snapshot_budget import SnapshotBudget, nbytes

__all__ = ["Checkpointer"]

Snapshot = tuple[dict[str, Any], dict[str, np.ndarray], int]
"""Metadata, arrays, and the run's epoch when they were taken."""

Waiting = tuple[Run, str, int, int | None, int, int, Snapshot | None]
"""A checkpoint scheduled: the run (where a failed write is told too), why, the level its log
line gets, its cut, the run's epoch and min clock then, and its snapshot (None: no room then)."""

log = logging.getLogger("ps_server")


def _told(run: Run, taken: Snapshot, reason: str, exc: Exception) -> None:
    """A checkpoint that could not be written, shown where users look (psctl status, the run's events)."""
    run.history.event("checkpoint_failed", -1, f"the checkpoint at min clock {taken[0]['min_clock']} ({reason}) "
                      f"could not be written: {exc}")


class Checkpointer:
    def __init__(self, store: CheckpointStore, every: int, budget: SnapshotBudget | None = None) -> None:
        self.store = store
        self.every = every
        self.budget = budget or SnapshotBudget()
        """the snapshots held at once, server-wide (none given: no limit)."""
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiting: dict[str, Waiting] = {}
        """run id -> the checkpoint still to be written (``Waiting``)."""
        self._writing: set[str] = set()
        """runs whose writer has taken its snapshot off ``_waiting`` and writes it."""
        self._writers: dict[str, asyncio.Task[None]] = {}
        self._taken: dict[str, tuple[int, bool]] = {}
        """run id -> (min clock of its last scheduled checkpoint, whether its final one was)."""
        self.protected: dict[str, tuple[int, ...]] = {}
        """run id -> the cuts whose checkpoints pruning keeps (a cluster's newest common ones)."""
        self._sharded: set[str] = set()
        """runs placed over several servers: until ``protected`` says which cuts all servers have,
        pruning keeps cut 0, which every server writes at creation, and the first periodic cut, which
        every server writes at once: those are common."""
        self._epochs: dict[str, int] = {}
        """run id -> how many times it went back to a checkpoint (``restore``): a snapshot of an
        earlier epoch belongs to a history the run left, and is not written."""
        self._cuts: dict[str, list[tuple[int, asyncio.Future[Snapshot]]]] = {}
        """run id -> the cuts ``checkpoint_at`` waits for, each with the future its snapshot goes to."""
        self._asked: dict[str, asyncio.Lock] = {}
        """run id -> held by the ``checkpoint_now`` taking and writing its snapshot: the others
        asking meanwhile take theirs after it (one such copy of a run in memory at a time)."""
        self._deleting: dict[str, int] = {}
        """run id -> the deletions of it under way: what is scheduled meanwhile waits for their end
        (written if they fail, dropped once one landed), a write started then would land after."""
        self.behind: set[str] = set()
        """runs whose newest snapshot could not be written (a full disk, say): the server's last
        checkpoints write them even when they have ended (a stop the disk does not hold yet)."""

    def attach(self, run: Run) -> None:
        """Checkpoint ``run`` from now on: now if it has no checkpoint yet (a new run: a server
        that dies before its first periodic one must not lose it; a shard of a run over several
        servers too, at cut 0: every server writes it before the run is registered, so it is the
        first cut all have), each ``every`` clocks of its min clock, and when it ends."""
        self._taken[run.run_id] = (run.min_clock, run.state.finished)
        if run.placement is not None and len(run.placement.shard_map.shards) > 1:
            self._sharded.add(run.run_id)
        run.on_change = self._changed
        if not run.state.finished and not self.store.cuts(run.run_id):
            self.schedule(run, "created", logging.DEBUG, run.min_clock)

    async def first(self, run: Run) -> None:
        """Write a new run's first checkpoint, before the run is registered (``RunRegistry.create``'s
        ``ready``: a server killed after CreateRun answered keeps the run). A caller gone before it
        landed (CreateRun's deadline passed) leaves no run: the checkpoint is deleted again."""
        try:
            await self._write((*snapshot.state_dict(run, copy=False), self._epochs.get(run.run_id, 0)), "created",
                              logging.DEBUG)
        except BaseException:
            try:
                await self.delete(run.run_id)
            except OSError as exc:
                log.error("%s, created for a CreateRun that failed, could not be deleted: %s; a restart resumes it "
                          "(delete it then)", run.run_id, exc.strerror or exc, extra={"run": run.run_id})
            raise

    def _changed(self, run: Run) -> None:
        if run.run_id not in self._taken:  # deleted
            return
        clock, final = self._taken[run.run_id]
        if run.state.finished:
            if not final:
                self._taken[run.run_id] = (clock, True)
                self.schedule(run, run.state.value)
        elif self.every and run.min_clock // self.every > clock // self.every:
            self._taken[run.run_id] = (run.min_clock, False)
            # Routine, and most of a long run's log at INFO: DEBUG. Ends, resumes, requests tell the story.
            self.schedule(run, f"every {self.every} clocks", logging.DEBUG, run.min_clock // self.every * self.every)
        for cut, future in self._cuts.get(run.run_id, ()):
            if (run.min_clock >= cut or run.state.finished) and not future.done():
                future.set_result((*snapshot.state_dict(run, cut), self._epochs.get(run.run_id, 0)))

    def _take(self, run: Run, cut: int | None, epoch: int) -> Snapshot:
        taken = (*snapshot.state_dict(run, cut), epoch)
        self.budget.hold(nbytes(taken[1]))
        return taken

    def _drop(self, waiting: Waiting | None) -> None:
        if waiting is not None and waiting[-1] is not None:
            self.budget.give(nbytes(waiting[-1][1]))

    def schedule(self, run: Run, reason: str, level: int = logging.INFO, cut: int | None = None) -> None:
        self._drop(self._waiting.pop(run.run_id, None))  # (replaces an older one not yet written)
        epoch = self._epochs.get(run.run_id, 0)
        taken = self._take(run, cut, epoch) if self.budget.fits(run.footprint) else None  # (else once there is room)
        self._waiting[run.run_id] = (run, reason, level, cut, epoch, run.min_clock, taken)
        if run.run_id in self._deleting:  # (``delete`` writes it if it fails)
            return
        writer = self._writers.get(run.run_id)
        if writer is None or writer.done():
            self._writers[run.run_id] = asyncio.get_running_loop().create_task(self._write_waiting(run.run_id))

    async def _write_waiting(self, run_id: str) -> None:
        while (waiting := self._waiting.get(run_id)) is not None:
            run, reason, level, cut, epoch, clock, taken = waiting
            if taken is None:
                if not self.budget.fits(run.footprint):
                    await self.budget.room_for(run.footprint)
                    continue  # (replaced or dropped meanwhile, maybe)
                # (its min clock moved on while it waited: labelled with the one it holds)
                taken = self._take(run, cut if run.min_clock == clock else None, epoch)
            del self._waiting[run_id]
            self._writing.add(run_id)
            try:
                await self._write(taken, reason, level, run)
            except OSError as exc:  # (logged by _write; the next checkpoint tries again)
                _told(run, taken, reason, exc)
            except FailedPrecondition:
                pass  # of a history the run left
            finally:
                self._writing.discard(run_id)
                self.budget.give(nbytes(taken[1]))

    async def checkpoint_now(self, run: Run, reason: str, cut: int | None = None,
                             final: bool = False) -> tuple[Path, int]:
        """``final``: the server's last, after its last RPC (it holds every push it acknowledged).
        FailedPrecondition if the run went back to a checkpoint (``restore``) since it was asked
        for: ``run`` is then the run replaced, whatever the moment its snapshot is taken."""
        return await self._now(run, reason, cut, final, self._epochs.get(run.run_id, 0))

    async def _now(self, run: Run, reason: str, cut: int | None, final: bool, epoch: int) -> tuple[Path, int]:
        """``checkpoint_now`` asked for at the run's ``epoch``."""
        asked = self._asked.setdefault(run.run_id, asyncio.Lock())
        async with asked:
            if self._asked.get(run.run_id) is not asked:  # (``delete`` had it)
                raise NotFound(f"run {run.run_id} was deleted")
            sharded = run.run_id in self._sharded  # (a cluster's keeps each cut it was scheduled at)
            if not sharded:  # (room: it is replaced below)
                self._drop(self._waiting.pop(run.run_id, None))
            await self.budget.room_for(run.footprint)
            taken = self._take(run, cut, epoch)
            taken[0]["final"] = final and not run.held  # (a held shard is behind the others: it must go back)
            if not sharded:
                # A snapshot still waiting is older: this one replaces it (its writer, not started yet,
                # would otherwise write it after this one, as the newest).
                self._drop(self._waiting.pop(run.run_id, None))
            try:
                return await self._write(taken, reason, run=run), int(taken[0]["min_clock"])
            finally:
                self.budget.give(nbytes(taken[1]))

    async def checkpoint_at(self, run: Run, cut: int, reason: str, timeout: float) -> tuple[Path, int]:
        """A checkpoint of ``run`` labelled ``cut``, taken the moment its min clock reaches ``cut``
        (now if it has, or the run has ended); TimeoutError if that takes over ``timeout`` seconds,
        NotFound once the run is deleted meanwhile. (A run restored meanwhile is waited on as the
        one of its id.) Room for its snapshot is kept from when it is asked for: the snapshot is
        the cut's, whatever the other runs' checkpoints meanwhile."""
        epoch = self._epochs.get(run.run_id, 0)
        if run.min_clock >= cut or run.state.finished:
            return await self._now(run, reason, cut, False, epoch)
        await self.budget.room_for(run.footprint)
        kept = run.footprint
        self.budget.hold(kept)
        try:
            if run.min_clock >= cut or run.state.finished:  # (while it waited for room)
                self.budget.give(kept)
                kept = 0
                return await self._now(run, reason, cut, False, epoch)
            future: asyncio.Future[Snapshot] = asyncio.get_running_loop().create_future()
            waiting = self._cuts.setdefault(run.run_id, [])
            waiting.append((cut, future))
            try:
                async with asyncio.timeout(timeout):
                    taken = await future
            finally:
                waiting.remove((cut, future))
            self.budget.hold(nbytes(taken[1]) - kept)  # (what it holds, BSP's gradients of the clock, not what it may)
            kept = nbytes(taken[1])
            return await self._write(taken, reason, run=run), int(taken[0]["min_clock"])
        finally:
            if kept:
                self.budget.give(kept)

    async def restore(self, run_id: str, cut: int, check: Callable[[Run], None] = lambda run: None) -> Run:
        """``run_id`` as its newest checkpoint of ``cut`` holds it, not registered yet (the
        registry's ``replace``), once ``check(run)`` passed; then its checkpoints of later cuts are
        deleted, and the run it replaces takes none from now on. CorruptCheckpoint if none loads,
        KeyError/ValueError if it does not fit its run, or what ``check`` raises: then nothing
        changed and the run it would have replaced goes on as before. A caller cancelled while
        the run's files are read or deleted is cancelled once that has ended (the run's lock
        held until then: its next write must not land beside the deletion)."""
        taken = self._taken.pop(run_id, None)  # the run being replaced: no more snapshots of it
        self._drop(self._waiting.pop(run_id, None))
        try:
            await self.written(run_id)
            async with self._locks.setdefault(run_id, asyncio.Lock()):
                ckpt = await landed(asyncio.to_thread(self.store.load_cut, run_id, cut))
                run = snapshot.restore(ckpt.meta, ckpt.arrays)
                check(run)
                self._epochs[run_id] = self._epochs.get(run_id, 0) + 1  # snapshots of the run it replaces: void
                await landed(asyncio.to_thread(self.store.discard_after, run_id, cut))
                self.protected[run_id] = (cut,)  # (a cluster's servers all went back to it: kept until told)
        except BaseException:
            if taken is not None and run_id not in self._taken:
                self._taken[run_id] = taken
            raise
        return run

    async def _write(self, taken: Snapshot, reason: str, level: int = logging.INFO, run: Run | None = None) -> Path:
        """Write a snapshot; FailedPrecondition if the run went back to a checkpoint since it was taken.
        A write that fails is logged; if its caller was cancelled meanwhile (a CheckpointRun whose
        client gave up), it is told in ``run``'s events too, as a periodic one's is."""
        meta, arrays, epoch = taken
        run_id = meta["run_id"]

        def failed(exc: Exception) -> None:  # (its caller is gone)
            log.error("checkpoint of %s failed: %s", run_id, exc, extra={"run": run_id})
            self.behind.add(run_id)
            if run is not None:
                _told(run, taken, reason, exc)

        async with self._locks.setdefault(run_id, asyncio.Lock()):
            if epoch != self._epochs.get(run_id, 0):
                raise FailedPrecondition(f"{run_id} went back to a checkpoint after this snapshot was taken: it "
                                         "belongs to a history the run left; ask again")
            t0 = time.perf_counter()
            try:
                protect = self.protected.get(run_id)
                # (a caller cancelled, an RPC at shutdown: its thread writes on, and the run's next
                # write, which would take the same ckpt-<seq>, waits for it)
                path = await landed(asyncio.to_thread(self.store.write, meta, arrays, protect or (),
                                                      not protect and run_id in self._sharded), failed)
            except OSError as exc:
                log.error("checkpoint of %s failed: %s", run_id, exc, extra={"run": run_id})
                self.behind.add(run_id)
                raise
            self.behind.discard(run_id)
        log.log(level, "checkpoint of %s at min clock %d, cut %d "
                "(%s) written to %s in %.0f ms", run_id, meta["min_clock"], meta["cut"], reason, path,
                1e3 * (time.perf_counter() - t0), extra={"run": run_id})
        return path

    async def delete(self, run_id: str, forget: Callable[[], object] = lambda: None) -> str:
        """Delete ``run_id``'s checkpoints, once the write in progress (if any) and those asked for
        (``checkpoint_now``) have landed; a snapshot still waiting to be written is dropped, and
        those asked for after are refused (NotFound); ``forget()`` (the registry's ``remove``) is
        called in the same step as the deletion ends, so that no one asks for a checkpoint of the
        run after it (a new one would bring the deleted run back); one scheduled meanwhile waits,
        and is dropped once the deletion has landed; those waiting for a cut (``checkpoint_at``) get
        NotFound then. What could not be removed, or ""
        (``CheckpointStore.delete``: the run is deleted all the same). OSError if its directory
        cannot be moved away: then nothing is deleted and the run is checkpointed as before, as
        it is when the caller is cancelled before the deletion began (once begun, it ends first)."""
        waiting = self._waiting.pop(run_id, None)
        taken = self._taken.pop(run_id, None)
        protected = self.protected.pop(run_id, None)
        sharded = run_id in self._sharded
        self._sharded.discard(run_id)
        cuts = self._cuts.pop(run_id, None)
        moved = False

        def delete() -> str:
            nonlocal moved
            left = self.store.delete(run_id)
            moved = True
            return left

        self._deleting[run_id] = self._deleting.get(run_id, 0) + 1
        try:
            await self.written(run_id)
            # (after the checkpoints asked for before: one would take its snapshot, and write it, after)
            async with self._asked.setdefault(run_id, asyncio.Lock()), self._locks.setdefault(run_id, asyncio.Lock()):
                left = await landed(asyncio.to_thread(delete))
            if left:
                log.warning("deleted %s, but its files could not all be removed: %s; remove them by hand (or the "
                            "server tries again at its next start)", run_id, left, extra={"run": run_id})
            return left
        finally:
            if self._deleting[run_id] > 1:
                self._deleting[run_id] -= 1
            else:
                del self._deleting[run_id]
            if moved:  # (and what was scheduled meanwhile: a roll back gives a run it found stopped its final one)
                for _, future in (cuts or []) + self._cuts.pop(run_id, []):  # (no one pushes to it any more)
                    if not future.done():
                        future.set_exception(NotFound(f"run {run_id} was deleted"))
                self._drop(waiting)
                self._drop(self._waiting.pop(run_id, None))
                self._taken.pop(run_id, None)
                self._writers.pop(run_id, None)
                self._locks.pop(run_id, None)
                self._asked.pop(run_id, None)
                self.behind.discard(run_id)
                forget()
            else:  # (the run is as it was, its last snapshot still to be written)
                if taken is not None:
                    self._taken.setdefault(run_id, taken)
                if protected is not None:
                    self.protected.setdefault(run_id, protected)
                if cuts is not None:
                    self._cuts.setdefault(run_id, cuts)
                if waiting is not None and self._waiting.setdefault(run_id, waiting) is not waiting:
                    self._drop(waiting)  # (one scheduled meanwhile is newer)
                if sharded:
                    self._sharded.add(run_id)
                if run_id in self._waiting and (run_id not in self._writers or self._writers[run_id].done()):
                    self._writers[run_id] = asyncio.get_running_loop().create_task(self._write_waiting(run_id))

    async def written(self, run_id: str) -> None:
        """Until what was scheduled for ``run_id`` so far is written (or failed: logged); a caller
        cancelled meanwhile leaves the write going. (A writer waiting for room with nothing left
        to write, dropped by ``delete`` or ``restore``, is not waited for.)"""
        writer = self._writers.get(run_id)
        if writer is not None and not writer.done() and (run_id in self._waiting or run_id in self._writing):
            await asyncio.wait({writer})

    async def drain(self) -> None:
        """Wait for every scheduled write."""
        if self._writers:
            await asyncio.gather(*self._writers.values(), return_exceptions=True)

    def resume(self) -> list[Run]:
        """Every run restored from its newest checkpoint that loads (corrupt ones, and ones that do
        not fit their run, are skipped loudly for the next older one); every lease starts once all
        are loaded."""
        restored = []
        for ckpt, run in self.store.latest(lambda c: (c, snapshot.restore(c.meta, c.arrays))):
            restored.append(run)
            log.info("resumed %s from %s: %s at min clock %d", run.run_id, ckpt.path, run.state.value,
                     run.min_clock, extra={"run": run.run_id})
            if not run.state.finished:  # (psctl status and watch: why its workers go back to this clock)
                older = f" (newer ones did not load, their progress lost: {ckpt.skipped[0]}" + (
                    f", and {len(ckpt.skipped) - 1} more)" if len(ckpt.skipped) > 1 else ")") if ckpt.skipped else ""
                run.history.event("resumed", -1, shortened(f"the server restarted: resumed from its checkpoint at min "
                                                           f"clock {run.min_clock}{older}"))
            if run.placement is not None and not run.state.finished:
                # What server 0 had told this server to keep is lost: keep what is on disk until it says again.
                self.protected[run.run_id] = tuple(self.store.cuts(run.run_id))
            if run.placement is not None and not run.state.finished and not ckpt.meta.get("final"):
                # The other servers' shards may be ahead of this one: no pushes or pulls until the
                # cluster's owner has every server go back to a common cut. (A server stopped
                # gracefully wrote all it had acknowledged: it goes on where it stopped.)
                run.held = (f"this server restarted: its shard of {run.run_id} waits for server 0 to have every "
                            "shard go back to a common checkpoint: retry")
        for run in restored:  # (loading the others took seconds per GB: the workers have had no chance yet)
            run.clock.restored()
        return restored
