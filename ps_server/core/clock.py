"""A run's ranks: who holds each one (incarnation, lease), how far each got (its clock), the min clock.

A rank's clock is the number of iterations it completed. The min clock is the minimum over ranks
that are ACTIVE or DONE (the max clock the maximum); an evicted or vacant rank counts as +inf
(with none live, both are the highest clock). The min clock never goes down: a rank handed over
starts at it (``assign``), or later (``start_later``). It is read several times per push and pull,
so it is cached; the cache is forgotten in one place, ``_moved``, which every method that changes
a clock or a state calls.
Other modules read slots and never write their ``state`` or ``clock``.

Plain ``def``s, no I/O: the run calls these and reports what changed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import FailedPrecondition, InvalidArgument, Reason
from .status import WorkerState, WorkerStatus

__all__ = ["COUNT_MAX", "Parked", "Slot", "VectorClock"]


COUNT_MAX = 2**64 - 1
"""The largest count a status carries (uint64): a sum of counts workers report stops there."""


@dataclass(eq=False)
class Parked:
    """One parked pull: the clock it reads, since when (monotonic). Compared by identity: each pull
    takes out its own (``VectorClock.unpark``)."""
    clock: int
    since: float


@dataclass
class Slot:
    rank: int
    state: WorkerState = WorkerState.VACANT
    incarnation: int = 0
    clock: int = 0
    start: int = 0
    """The clock this incarnation holds the rank from: where it was handed over, or later
    (``start_later``)."""
    replaced: tuple[int, int] | None = None
    """(incarnation, clock) of the incarnation this one replaced, as it ended here: a cluster's
    servers compare theirs to find a push it stopped in the middle of."""
    worker_name: str = ""
    join_token: str = ""
    """The ``JoinRequest.join_token`` of the Join that handed this incarnation the rank, until the
    incarnation's first call (``holder``): a Join asking again with it (its answer was lost) is
    answered with this rank (``joined``)."""
    last_seen: float = 0.0  # monotonic
    last_seen_wall: float = 0.0
    pushes: int = 0
    pulls_skipped: int = 0
    parked: list[Parked] = field(default_factory=list)
    """This rank's parked pulls: several at once when a retry (its client's deadline passed) or a
    pull on another stream parks while one waits."""
    data_plane: str = ""  # what the rank's last push came over: "tcp" or "grpc"
    told: int | None = None
    """The loosest staleness bound this rank's answers told it since its last push was applied (its
    next push was computed under one of them: ``Run._tell``)."""
    lr_scale: float | None = None
    """The learning-rate factor of this rank's last applied push (``RunSpec.staleness_aware_lr``):
    a retry of it is told the same."""

    @property
    def live(self) -> bool:
        return self.state in (WorkerState.ACTIVE, WorkerState.DONE, WorkerState.STOPPED)

    @property
    def waiting_for(self) -> int | None:
        """The lowest clock this rank's parked pulls read, None when it has none."""
        return min((p.clock for p in self.parked), default=None)


class VectorClock:
    def __init__(self, ranks: int, now: Callable[[], float] = time.monotonic) -> None:
        self.slots = [Slot(rank=r) for r in range(ranks)]
        self.next_incarnation = 1
        self.retired_skipped = 0
        """Pulls skipped by incarnations that were evicted (their reports are gone with them)."""
        self._now = now
        self._min: int | None = None

    # ------------------------------------------------------------------------------ queries
    @property
    def min_clock(self) -> int:
        if self._min is None:
            live = [s.clock for s in self.slots if s.live]
            self._min = min(live) if live else max(s.clock for s in self.slots)
        return self._min

    @property
    def max_clock(self) -> int:
        """The highest clock over live ranks (with none live, over all: then the min clock)."""
        return max((s.clock for s in self.slots if s.live), default=max(s.clock for s in self.slots))

    def silent_for(self, slot: Slot) -> float:
        """Seconds since the rank was last heard from."""
        return self._now() - slot.last_seen

    def vacant(self) -> list[Slot]:
        return [s for s in self.slots if s.state in (WorkerState.VACANT, WorkerState.EVICTED)]

    def count(self, state: WorkerState) -> int:
        return sum(s.state is state for s in self.slots)

    def any_in(self, state: WorkerState) -> bool:
        return any(s.state is state for s in self.slots)

    def behind(self, need: int) -> list[Slot]:
        """Live ranks whose clock is below ``need``: who holds a wait for ``need`` back."""
        return [s for s in self.slots if s.live and s.clock < need]

    def statuses(self) -> tuple[WorkerStatus, ...]:
        return tuple(
            WorkerStatus(rank=s.rank, state=s.state, incarnation=s.incarnation, clock=s.clock,
                         worker_name=s.worker_name, last_seen=s.last_seen_wall if s.incarnation else 0.0,
                         pushes=s.pushes, waiting_for_clock=s.waiting_for, pulls_skipped=s.pulls_skipped,
                         data_plane=s.data_plane)
            for s in self.slots)

    def pulls_skipped(self) -> int:
        """Pulls skipped by workers' caches, as reported, over every incarnation (at most
        ``COUNT_MAX``: each rank may report up to that much)."""
        return min(COUNT_MAX, self.retired_skipped + sum(s.pulls_skipped for s in self.slots))

    def joined(self, join_token: str) -> Slot | None:
        """The ACTIVE rank a Join with ``join_token`` took, if its incarnation has made no call since
        (that Join's answer was lost)."""
        if not join_token:  # (no token: no Join is asked again)
            return None
        return next((s for s in self.slots if s.join_token == join_token and s.state is WorkerState.ACTIVE), None)

    def holder(self, rank: int, incarnation: int) -> Slot:
        """The rank's slot if ``incarnation`` holds it, its lease refreshed; raise otherwise. Its
        worker had Join's answer: the Join's token takes the rank no more."""
        if not 0 <= rank < len(self.slots):
            raise InvalidArgument(f"rank {rank} is out of range: this run has ranks 0..{len(self.slots) - 1}")
        slot = self.slots[rank]
        if incarnation != slot.incarnation or slot.state in (WorkerState.VACANT, WorkerState.EVICTED):
            raise FailedPrecondition(
                f"incarnation {incarnation} of rank {rank} is stale (current: {slot.incarnation}, "
                f"{slot.state.value}): the worker was evicted or replaced; join again", Reason.STALE_INCARNATION)
        slot.join_token = ""
        self.touch(slot)
        return slot

    def holds(self, rank: int, incarnation: int) -> bool:
        """Whether ``incarnation`` still holds ``rank`` (a parked pull asks; no lease refresh)."""
        slot = self.slots[rank]
        return slot.incarnation == incarnation and slot.state not in (WorkerState.VACANT, WorkerState.EVICTED)

    # ------------------------------------------------------------------------------ changes
    def _moved(self) -> None:
        self._min = None

    def touch(self, slot: Slot) -> None:
        slot.last_seen = self._now()
        slot.last_seen_wall = time.time()

    def assign(self, worker_name: str, start: int | None, join_token: str = "") -> Slot | None:
        """Hand the first vacant (else evicted) rank to a new incarnation at clock ``start`` (None:
        the min clock, also when no rank is live: then the highest clock, not the rank's own, so
        the min clock never goes down and a read's guaranteed clock stays true); None if none
        is free."""
        free = self.vacant()
        slot = next((s for s in free if s.state is WorkerState.VACANT), free[0] if free else None)
        if slot is None:
            return None
        self.admit(slot, self.next_incarnation, self.min_clock if start is None else start, worker_name, join_token)
        self.next_incarnation += 1
        return slot

    def admit(self, slot: Slot, incarnation: int, start: int, worker_name: str, join_token: str = "") -> None:
        """``incarnation`` holds the rank from clock ``start`` (``assign``, or a shard told so)."""
        if slot.state is WorkerState.EVICTED:
            self.retired_skipped = min(COUNT_MAX, self.retired_skipped + slot.pulls_skipped)
        if slot.incarnation:
            slot.replaced = (slot.incarnation, slot.clock)
        slot.state = WorkerState.ACTIVE
        slot.incarnation = incarnation
        slot.clock = slot.start = start
        slot.worker_name = worker_name
        slot.join_token = join_token
        slot.pulls_skipped = 0
        slot.data_plane = ""
        slot.parked = []  # (the old incarnation's fail at the next notify)
        self.touch(slot)
        self._moved()

    def advance(self, slot: Slot, clock: int) -> None:
        """The rank completed iteration ``clock``."""
        slot.clock = clock + 1
        slot.pushes += 1
        self._moved()

    def start_later(self, slot: Slot, start: int) -> None:
        """The rank's incarnation holds it from ``start``, not from where it was handed over (a
        cluster's server had completed the clocks before it: ``Run.start_later``)."""
        slot.start = start
        slot.clock = max(slot.clock, start)
        self._moved()

    def skip_to(self, slot: Slot, clock: int) -> None:
        """The rank's iterations up to ``clock`` count as completed without their pushes (a
        cluster's shard that will never get them: ``ShardRun.mirror``)."""
        slot.clock = clock
        self._moved()

    def set_state(self, slot: Slot, state: WorkerState) -> None:
        slot.state = state
        if state is WorkerState.EVICTED:
            slot.parked = []  # its parked pulls are failed by the next notify
        self._moved()

    def end(self) -> None:
        """The run ended: ranks still training are STOPPED (their workers learn it at their next call)."""
        for s in self.slots:
            if s.state is WorkerState.ACTIVE:
                s.state = WorkerState.STOPPED
        self._moved()

    def expired(self, lease: float) -> list[tuple[Slot, float]]:
        """ACTIVE ranks not heard from for ``lease`` seconds, with how long they have been silent.
        A rank whose pull is parked is not silent: it waits in the server (for others: the
        slowest rank is never parked), which ends the wait if its caller goes (``unpark``)."""
        now = self._now()
        return [(s, now - s.last_seen) for s in self.slots
                if s.state is WorkerState.ACTIVE and not s.parked and now - s.last_seen > lease]

    def park(self, slot: Slot, clock: int) -> Parked:
        """A pull of ``clock`` by this rank is parked (shown as what it waits for); ``unpark`` it."""
        parked = Parked(clock, self._now())
        slot.parked.append(parked)
        return parked

    def unpark(self, slot: Slot, parked: Parked) -> float:
        """A parked pull ended (its lease starts afresh: it was held while parked); returns how
        long it was parked. One of an incarnation the rank no longer has (evicted, handed over)
        was taken out then: the rank's others stay."""
        if parked in slot.parked:
            slot.parked.remove(parked)
            if slot.state is WorkerState.ACTIVE:
                self.touch(slot)
        return self._now() - parked.since

    def restored(self) -> None:
        """Slots were set from a checkpoint: every lease starts afresh (workers have a full lease
        to find the new server)."""
        for s in self.slots:
            self.touch(s)
        self._moved()
