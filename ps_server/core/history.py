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
        self.event_count = 0
        """Events ever recorded (WatchRun sends those it has not sent yet)."""

    def event(self, kind: str, rank: int, message: str) -> None:
        self.events.append(RunEvent(time.time(), kind, rank, message))
        self.event_count += 1

    def record(self, kind: str, rank: int, clock: int, min_clock: int) -> None:
        self.clock_records.append(ClockRecord(kind, rank, clock, min_clock, time.time()))

    def add_points(self, rank: int, points: Iterable[MetricPoint]) -> None:
        """A worker's report; InvalidArgument (nothing added) when it holds more than 10,000."""
        points = list(points)
        if len(points) > 10_000:
            raise InvalidArgument(f"{len(points)} points in one report: send at most 10000")
        for p in points:
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
