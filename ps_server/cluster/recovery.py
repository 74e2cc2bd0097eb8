"""Server 0's side of a cluster's recovery: a run rolled back to the newest cut every server has.

A server that restarts resumes its shards from their checkpoints, held (they take no pushes or
pulls: ``Run.held``; GetShard says "resumed"); so does server 0 (``resumed``). (Not after a
graceful stop: its last checkpoint holds every push it acknowledged, and while it was away no push
could complete, so the others cannot be ahead of it by a whole iteration.) Every unfinished run
then goes back to the newest cut every server has on disk (``roll_back``): each restores its
snapshot of that cut, so no shard runs ahead of another and no worker reads a mix of two
histories, and the run's events say how many steps were lost. Workers follow by their rule for a
restarted server: a shard that knows their rank at an earlier clock answers CLOCK_AHEAD and they go
back there; a shard that has their push already acknowledges it as a duplicate. ``Recovery`` owns
the roll backs due and in progress (tried again each poll while a server does not answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from paramserver.v1 import cluster_pb2 as cpb

from ..checkpointer import Checkpointer
from ..core.errors import NotFound, PsError, ShardUnavailable, counted
from ..core.registry import RunRegistry
from ..core.run import Run
from ..core.status import WorkerState
from .cuts import Cuts
from .shards import restore

if TYPE_CHECKING:  # (the links are gRPC's; this module is not)
    from .peers import PeerLink

__all__ = ["Recovery"]

log = logging.getLogger("ps_server")


class Recovery:
    def __init__(self, registry: RunRegistry, peers: Sequence[PeerLink], checkpointer: Checkpointer | None,
                 cuts: Cuts, *, call_timeout: float, shard_timeout: float, sync: Callable[[Run], Awaitable[None]],
                 fail: Callable[[Run, str], None], unsent: Callable[[str], None]) -> None:
        """``peers``: links to servers 1.. in index order; ``sync``: sends a run's membership to
        every server (``ClusterOwner.sync``); ``fail``: fails a run, saying why; ``unsent``: forgets
        what every server was sent of a run (its membership goes to each again)."""
        self._registry = registry
        self._peers = list(peers)
        self._checkpointer = checkpointer
        self._cuts = cuts
        self._timeout = call_timeout
        self._shard_timeout = shard_timeout
        self._sync = sync
        self._fail = fail
        self._unsent = unsent
        self._chosen: dict[str, int] = {}
        """run id -> the cut its roll back in progress chose."""
        self._rollbacks: dict[str, tuple[str, int | None, float | None]] = {}
        """run id -> why it has to go back to the newest cut every server has, the highest cut it may
        go back to (a retry never goes past the one an earlier attempt chose), and since when
        attempts have failed."""

    def resumed(self, runs: Sequence[Run]) -> None:
        """This server restarted and resumed ``runs`` from checkpoints that may be behind the other
        servers' shards (not a graceful stop's): every unfinished one goes back to a cut all have."""
        for run in runs:
            if run.placement is not None and not run.state.finished:
                self._rollbacks[run.run_id] = ("server 0 restarted", None, None)

    def restarted(self, run_id: str, why: str) -> None:
        """A server resumed its shard of ``run_id`` from a checkpoint (``why``): the run goes back
        (at the next ``poll``, unless it is going back already)."""
        self._rollbacks.setdefault(run_id, (why, None, None))

    async def poll(self) -> None:
        """Try every roll back due (``watch``, each poll)."""
        for run_id in list(self._rollbacks):
            await self._try_roll_back(run_id)

    async def _try_roll_back(self, run_id: str) -> None:
        why, bound, since = self._rollbacks[run_id]
        try:
            run = self._registry.get(run_id)
        except NotFound:
            run = None
        if run is None or run.state.finished:
            self._rollbacks.pop(run_id, None)
            return
        try:
            await self.roll_back(run, why, bound)
        except ShardUnavailable as exc:  # a server that does not answer: the next poll tries again
            since = since or time.monotonic()
            self._rollbacks[run_id] = (why, self._chosen.get(run_id, bound), since)
            log.warning("%s could not go back to a common checkpoint yet (%s): %s", run_id, why, exc,
                        extra={"run": run_id})
            if time.monotonic() - since <= self._shard_timeout:
                return
            with contextlib.suppress(NotFound):  # (deleted meanwhile)
                self._fail(self._registry.get(run_id), f"{why} and the servers could not go back to a common "
                           f"checkpoint for {time.monotonic() - since:.0f}s (--shard-timeout): {exc}")
        except PsError as exc:  # a checkpoint that does not load: no state every shard agrees on
            with contextlib.suppress(NotFound):
                self._fail(self._registry.get(run_id), f"{why} and the shards could not go back to a common "
                           f"checkpoint: {exc}")
        self._rollbacks.pop(run_id, None)
        self._chosen.pop(run_id, None)

    async def roll_back(self, run: Run, why: str, bound: int | None = None) -> Run:
        """Every shard of ``run`` back to the newest cut all servers have, at most ``bound`` (the
        run fails if there is none); the run as this server now holds it. This server's restored
        run takes no pushes or pulls until every server has restored: no worker reads a mix."""
        if self._checkpointer is None:
            self._fail(run, f"{why} and server 0 has no --data-dir: the shards cannot go back to a common "
                            "checkpoint (start every server with --data-dir DIR)")
            return run
        listed = await asyncio.gather(*(peer.call("ListShardCheckpoints", cpb.ListShardCheckpointsRequest(
            run_id=run.run_id), cpb.ListShardCheckpointsResponse, self._timeout) for peer in self._peers))
        cuts = [set(self._checkpointer.store.cuts(run.run_id)), *(set(r.cuts) for r in listed)]
        common = {c for c in set.intersection(*cuts) if bound is None or c <= bound}
        if not common:
            have = "; ".join(f"server {i}: {sorted(c, reverse=True) or 'none'}" for i, c in enumerate(cuts))
            self._fail(run, f"{why} and no checkpoint cut is on every server ({have}): the shards cannot agree "
                            "on a state to resume from")
            return run
        cut = self._chosen[run.run_id] = max(common)
        before = [max(clocks) for clocks in zip([s.clock for s in run.clock.slots], *(r.clocks for r in listed),
                                                  strict=True)]
        min_before = run.min_clock
        message = f"{why}: every shard went back to the checkpoint at cut {cut}: retry"
        restored = await restore(self._registry, self._checkpointer, run.run_id, cut, message)
        restored.hold(f"{why}: the servers are going back to the checkpoint at cut {cut}: retry")
        self._renumber(run, restored)
        await asyncio.gather(*(peer.call("RestoreShard", cpb.RestoreShardRequest(run_id=run.run_id, cut=cut),
                                         cpb.RestoreShardResponse, max(4 * self._timeout, self._shard_timeout))
                               for peer in self._peers))
        self._unsent(run.run_id)
        self._cuts.went_back(run.run_id, cut)
        lost = sum(max(0, before[s.rank] - s.clock) for s in restored.clock.slots)
        restored.history.event("rolled_back", -1, f"{why}: every shard went back to its checkpoint at cut {cut} "
                               f"(min clock {min_before} -> {restored.min_clock}; {counted(lost, 'step')} lost)")
        restored.hold("")  # (after the event: a watcher woken by it sees both)
        log.warning("%s: %s rolled back to cut %d on every server, %d steps lost", why, run.run_id, cut, lost,
                    extra={"run": run.run_id})
        await self._sync(restored)
        return restored

    @staticmethod
    def _renumber(old: Run, restored: Run) -> None:
        """Incarnations given out after the cut stay given: numbering goes on from the newest, and a
        rank handed to another worker since the cut is evicted (its holder joins again). The bounds
        the run was under after the cut were still its own (``Run.bounds``)."""
        restored.clock.next_incarnation = max(restored.clock.next_incarnation, old.clock.next_incarnation)
        for bound in old.bounds:
            restored.had(bound)
        for was, slot in zip(old.clock.slots, restored.clock.slots, strict=True):
            if was.incarnation != slot.incarnation and slot.state is WorkerState.ACTIVE:
                restored.clock.set_state(slot, WorkerState.EVICTED)
                restored.bsp.drop(slot.rank)
