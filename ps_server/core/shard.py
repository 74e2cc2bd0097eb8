"""A run's shard on a server that does not own its membership (a cluster's server 1, 2, ...).

It is a ``Run`` holding its pieces of the parameters: it takes pushes and serves pulls, enforces
the staleness bound on its own clocks, de-duplicates, applies the optimizer and checkpoints like
any run (at the same cuts as every server of the cluster: ``checkpointer``). Who holds which rank
is the owner's decision (``Run.join``, leases, leaves, stops): ``mirror`` sets this shard's ranks
and state to the owner's, in the order the owner sent them; the shard never assigns a rank or
expires a lease itself. A shard fails by itself only when its own parameters diverge; the owner
learns it when it next asks for the shard's status.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import FailedPrecondition, Reason, ShardUnavailable
from .run import Run
from .status import Assignment, PushResult, RunState, WorkerState

__all__ = ["RankUpdate", "ShardRun"]


@dataclass(frozen=True)
class RankUpdate:
    """One rank as the owner holds it."""

    rank: int
    incarnation: int
    state: WorkerState
    clock: int
    worker_name: str = ""
    lost_pushes: bool = False
    """DONE at ``clock`` on the owner, whose worker stopped in the middle of a push that never
    reached this shard: go on without the pushes between the shard's clock of it and ``clock``."""
    start: int = 0
    """The clock the incarnation holds the rank from on the owner (``Slot.start``): later than it
    was handed over at when a shard had already combined the clocks before it."""


_FORWARD = {RunState.PENDING: 0, RunState.RUNNING: 1}
"""Run states a shard may move through in this order; the finished ones come last and stay."""


class ShardRun(Run):
    def has_vacancy(self) -> bool:
        return False  # workers join the owner

    def join(self, worker_name: str, join_token: str = "") -> Assignment:
        raise FailedPrecondition(f"run {self.run_id}'s ranks are assigned by server 0 of the cluster: join there "
                                 "(any server forwards Join to it)", Reason.NO_VACANT_RANK)

    def expire(self, lease: float) -> list[int]:
        return []  # the owner's leases decide

    def _coming(self, rank: int, incarnation: int) -> bool:
        """Whether ``incarnation`` is newer than this shard holds of ``rank``: the owner admitted it,
        and its update is still on its way (or this server restarted)."""
        return 0 <= rank < len(self.clock.slots) and incarnation > self.clock.slots[rank].incarnation

    def _known(self, rank: int, incarnation: int) -> None:
        """Retryable, not a stale incarnation, for one ``_coming``."""
        if self._coming(rank, incarnation):
            raise ShardUnavailable(f"this server's shard of {self.run_id} has not heard yet from server 0 that "
                                   f"incarnation {incarnation} holds rank {rank}: retry")

    def push(self, rank: int, incarnation: int, *args: Any, **kwargs: Any) -> PushResult:
        self._known(rank, incarnation)
        return super().push(rank, incarnation, *args, **kwargs)

    def pull_now(self, rank: int, incarnation: int, *args: Any, **kwargs: Any) -> bool:
        if self._coming(rank, incarnation) and not self.held:
            return False  # (``wait_pull`` waits for its update)
        return super().pull_now(rank, incarnation, *args, **kwargs)

    async def wait_pull(self, rank: int, incarnation: int, clock: int, timeout: float, names: list[str] | None = None,
                        rows: Mapping[str, np.ndarray] | None = None) -> None:
        """A pull of an incarnation ``_coming`` waits for its update first, within ``timeout`` (then
        ShardUnavailable, retryable). Join answers once every server has the admission or after
        its wait for them (a slow server): a worker pulls before it pushes, so its first pull on
        a server late to hear of it waits there, and its first push is taken. (The pull was
        refused, and the worker's whole first pull retried with back-off, after the other
        servers' answers: its first iteration was lost.)"""
        if self._coming(rank, incarnation) and not self.held:
            start = time.monotonic()
            if not await self.gate.wait_for(lambda: not self._coming(rank, incarnation), timeout):
                self._known(rank, incarnation)
            timeout = max(0.0, timeout - (time.monotonic() - start))
        await super().wait_pull(rank, incarnation, clock, timeout, names, rows)

    def mirror(self, ranks: Iterable[RankUpdate], state: RunState, message: str) -> RunState:
        """Set the ranks and the run's state to the owner's. A rank's update of an older incarnation
        than the shard holds is ignored; a finished shard stays as it ended. A rank's clock is the
        shard's own (its pushes here), but for an admission and for pushes the owner says are lost
        (``RankUpdate.lost_pushes``), and one that starts later than it was handed over at
        (``RankUpdate.start``: another server had already combined the clocks before it)."""
        for u in ranks:
            slot = self.clock.slots[u.rank]
            if u.incarnation > slot.incarnation:  # admitted: a new incarnation from its clock
                # (BSP: not below the clocks this shard already combined, which take no more
                # gradients: a push that reached it before server 0 completed one here first)
                start = max(u.clock, self.bsp.applied_clock) if self.spec.staleness == 0 else u.clock
                self.clock.admit(slot, u.incarnation, start, u.worker_name)
                self.bsp.drop(u.rank)  # whatever the old incarnation held for an unfinished clock
                self.history.event("joined", u.rank, f"{u.worker_name or 'a worker'} took rank {u.rank} "
                                   f"(incarnation {u.incarnation}, clock {start})")
            self._start_later(u.rank, u.incarnation, u.start, "joined", f"rank {u.rank} (incarnation {u.incarnation}) "
                             f"starts at clock {u.start}, as on the server that had combined the clocks before it")
            if u.incarnation == slot.incarnation and u.state is not slot.state and not self.state.finished:
                if u.state is WorkerState.EVICTED:
                    self.bsp.drop(u.rank)
                    self.history.event("evicted", u.rank, f"rank {u.rank} (incarnation {u.incarnation}) evicted "
                                       "by server 0")
                self.clock.set_state(slot, u.state)
            if u.lost_pushes and u.incarnation == slot.incarnation and slot.clock < u.clock and \
                    slot.state is WorkerState.DONE and not self.state.finished:
                self.history.event("lost_pushes", u.rank, f"rank {u.rank}'s pushes of clocks {slot.clock}.."
                                   f"{u.clock - 1} never came (its worker stopped in the middle of a push that "
                                   "reached server 0): going on without them")
                self.clock.skip_to(slot, u.clock)
        if self.state.finished:
            pass
        elif state.finished:
            self._finish(state, message)
        elif _FORWARD[state] > _FORWARD[self.state]:
            self.state = state
            if state is RunState.RUNNING:
                self.started = time.time()
                self._started_event()
        self._after_clock_change()
        return self.state
