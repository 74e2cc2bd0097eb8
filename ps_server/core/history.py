"""What a run remembers of its past, bounded: events, workers' metric points, and clock records.

Clock records are the server's own evidence that the staleness bound held: for every served pull
(an iteration starts) and accepted push (it ends), the rank, its clock and the min clock then.
They are not checkpointed (``snapshot``): 100,000 of them would be megabytes in every checkpoint
of even a small model, and a trace spliced over a restart would count the server's downtime as a
rank's work (``psctl simulate``); the run's counters (staleness statistics) are.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import NamedTuple

from .errors import InvalidArgument
from .status import MetricPoint, RunEvent

__all__ = ["ClockRecord", "History"]


class ClockRecord(NamedTuple):
    """The server's record of a served pull (an iteration starts) or an accepted push (it ends).

    A named tuple: two are made per iteration and up to 100,000 kept (cheaper to build than a
    dataclass, and tuples of plain values drop out of the garbage collector's scans)."""

    kind: str
    """"pull" or "push"."""
    rank: int
    clock: int
    min_clock: int
    """Min clock over live ranks when the pull was served / just before the push was applied."""
    time: float


class History:
    def __init__(self, size: int = 20_000) -> None:
        self.points: collections.deque[MetricPoint] = collections.deque(maxlen=size)
        self.events: collections.deque[RunEvent] = collections.deque(maxlen=size)
        self.clock_records: collections.deque[ClockRecord] = collections.deque(maxlen=5 * size)
        self.last_eval: MetricPoint | None = None
        self._evaluated: dict[int, int] = {}
        """Per rank, the latest clock it reported an evaluation of (``add_points``)."""
        self._trained: dict[int, int] = {}
        """Per rank, the latest clock it reported a training point of (``add_points``)."""
        self.event_count = 0
        """Events ever recorded (WatchRun sends those it has not sent yet)."""

    def event(self, kind: str, rank: int, message: str) -> None:
        self.events.append(RunEvent(time.time(), kind, rank, message))
        self.event_count += 1

    def record(self, kind: str, rank: int, clock: int, min_clock: int) -> None:
        self.clock_records.append(ClockRecord(kind, rank, clock, min_clock, time.time()))

    def add_points(self, rank: int, points: Iterable[MetricPoint]) -> None:
        """A worker's report; InvalidArgument (nothing added) when it holds more than 10,000.

        An evaluation of a clock no later than the rank's last is dropped: that clock was evaluated
        already (a rank handed over starts at the min clock, a rank sent back by a server restarted
        from a checkpoint at an earlier one, and rank 0 evaluates again the clocks it passes), and
        two points of one clock would be two in the loss curve. So is a training point: a report
        retried after its answer was lost carries the points it added, and a rank handed over
        behind its last point trains those clocks again; the curve keeps a clock's first point.
        (A server restarted from a checkpoint has the points up to the rank's clock in it, so the
        clocks the rank trains again after it are added.)"""
        points = list(points)
        if len(points) > 10_000:
            raise InvalidArgument(f"{len(points)} points in one report: send at most 10000")
        for p in points:
            seen = self._evaluated if p.eval else self._trained
            if p.clock <= seen.get(rank, -1):
                continue
            seen[rank] = p.clock
            p = replace(p, rank=rank)
            self.points.append(p)
            if p.eval and (self.last_eval is None or p.clock >= self.last_eval.clock):
                self.last_eval = p

    def restore(self, points: Iterable[MetricPoint], events: Iterable[RunEvent], last_eval: MetricPoint | None) -> None:
        """Start from a checkpoint's history (instead of an empty one)."""
        self.points.clear()
        self.events.clear()
        self.points.extend(points)
        self.events.extend(events)
        self.event_count = len(self.events)
        self.last_eval = last_eval
        self._evaluated, self._trained = {}, {}
        for p in (*self.points, *([last_eval] if last_eval else [])):  # (the last outlives the points)
            seen = self._evaluated if p.eval else self._trained
            seen[p.rank] = max(p.clock, seen.get(p.rank, -1))
