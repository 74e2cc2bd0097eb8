"""What a run's clock records say about its ranks' steps, whatever the staleness bound (``Trace``).

The server records, per rank and clock, when its pull was served (the iteration starts) and when
its push was accepted (it ends); it keeps the most recent 100,000. From them, per rank: its work
per clock (pull served -> push accepted; a pull the worker skipped, its cache fresh enough: from
its previous push), the latency of its pulls that did not wait (push accepted -> next pull
served), how long a parked pull took to be served once the gate let it go (``wake``), and when it
started. Which pulls may have waited follows from the bound and every rank's push times: the pull
of clock c needed every rank to have pushed c - s - 1.

Pure: records come in as plain ``(kind, rank, clock, seconds)`` tuples (``facts.clock_records``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ps_server.core.spec import UNBOUNDED

from .virtual_time import RESOLUTION

__all__ = ["Record", "Trace"]

Record = tuple[str, int, int, float]
"""(kind "pull" | "push", rank, clock, time in seconds): one of the server's clock records."""


def _median(values: list[float], default: float = 0.0) -> float:
    return statistics.median(values) if values else default


@dataclass(frozen=True, eq=False)
class Trace:
    """Per rank, per clock 0..clocks-1 of the replay (``first`` + that in the run): what the bound
    does not change. Arrays are (ranks, clocks) or (ranks,) seconds."""

    ranks: int
    clocks: int
    first: int
    """The run's clock that the trace's clock 0 is (> 0 when the oldest records were dropped)."""
    staleness: int
    """The bound the pulls were classified under (the tightest one the run had)."""
    work: np.ndarray
    """Pull served (or, when the worker skipped it, its previous push accepted) -> push accepted."""
    latency: np.ndarray
    """Push of clock c - 1 accepted -> pull of c served, when it did not wait (0 for a skipped
    pull; column 0 unused: ``start`` says when clock 0 starts)."""
    wake: np.ndarray
    """(ranks,) a parked pull: the gate let it go -> it was served (the server's event loop serves
    the pulls one push released one after another)."""
    start: np.ndarray
    """(ranks,) when each rank's clock 0 started, after the first rank's."""
    total: float
    """Measured: the first start -> the last push accepted."""
    waited: np.ndarray
    """(ranks,) measured seconds each rank's pulls were parked, wake-up included (estimated: a
    served pull's gap beyond its latency)."""
    notes: tuple[str, ...] = ()
    pushes: int = 0
    """Measured: the pushes accepted in ``total``, of any clock from ``first`` on: more than ranks x
    clocks when ranks pushed clocks beyond the trace's last meanwhile (a run still going, its ranks
    far apart). 0: not known (a trace built by hand), taken as ranks x clocks."""

    @property
    def per_clock(self) -> float:
        return self.total / self.clocks

    @property
    def pushes_per_second(self) -> float:
        """Measured: pushes accepted per second over ``total``, every clock counted."""
        return (self.pushes or self.ranks * self.clocks) / self.total

    @property
    def idle(self) -> np.ndarray:
        return np.asarray(self.waited / self.total)

    @classmethod
    def from_records(cls, records: Iterable[Record], ranks: int, iterations: int, staleness: int) -> Trace:
        """The trace of the clocks every rank has pushed (from the first clock all ranks' records
        reach back to); ``staleness``: the bound the run had (with several, the tightest)."""
        pulls, pushes = _index(records, ranks, iterations)
        first, last, notes = _span(pushes, ranks)
        n = last + 1 - first
        done: dict[int, float] = {}  # clock -> when every rank had pushed it (a missing record is older)
        for (_, c), t in pushes.items():
            done[c] = max(done.get(c, -math.inf), t)
        q = np.array([[pushes[r, first + i] for i in range(n)] for r in range(ranks)])
        work, start = np.zeros((ranks, n)), np.zeros(ranks)
        gaps: list[list[tuple[int, float, float]]] = [[] for _ in range(ranks)]
        """Per rank: (i, push of i - 1 -> pull of i served, push of i - 1 -> the gate could open)."""
        for r in range(ranks):
            for i in range(n):
                c = first + i
                before, pulled = pushes.get((r, c - 1)), pulls.get((r, c))
                if pulled is not None:
                    work[r, i] = q[r, i] - pulled
                    if i == 0:
                        start[r] = pulled
                    elif before is not None:  # the pull needed every rank to have pushed c - s - 1
                        opened = -math.inf if staleness == UNBOUNDED else done.get(c - staleness - 1, -math.inf)
                        gaps[r].append((i, pulled - before, opened - before))
                elif before is not None:  # the worker skipped the pull (its cache was fresh enough)
                    work[r, i] = q[r, i] - before
                    if i == 0:
                        start[r] = before
                else:  # (i = 0) the pull's record was dropped: its work is the rank's usual
                    work[r, i] = math.nan
            if math.isnan(work[r, 0]):
                work[r, 0] = statistics.median(work[r, 1:])
                start[r] = q[r, 0] - work[r, 0]
        latency, wake, waited = _latencies(gaps, work.shape)
        np.maximum(work, 0.0, out=work)  # wall-clock records: a step back of the system clock is not work
        t0, end = float(start.min()), float(q[:, -1].max())
        total = end - t0
        if not total > 0:
            raise ValueError("the records span no time: cannot replay them")
        pushed = sum(1 for (_, c), t in pushes.items() if c >= first and t <= end)
        if pushed > ranks * n:
            notes.append(f"meanwhile ranks pushed clocks after {last} too ({pushed - ranks * n} pushes): the recorded "
                         f"pushes/s counts them, the replay's and the predictions' (clocks up to {last} only) do not, "
                         "and are lower than the run's")
        return cls(ranks, n, first, staleness, work, latency, wake, start - t0, total, waited, tuple(notes), pushed)


def _index(records: Iterable[Record], ranks: int, iterations: int) -> tuple[dict[tuple[int, int], float], ...]:
    """(rank, clock) -> time of its pull record, and of its push record (a later incarnation's wins)."""
    pulls: dict[tuple[int, int], float] = {}
    pushes: dict[tuple[int, int], float] = {}
    for kind, rank, clock, t in records:
        if not 0 <= rank < ranks:
            raise ValueError(f"a clock record of rank {rank}: the run has ranks 0..{ranks - 1}")
        if kind not in ("pull", "push"):
            raise ValueError(f"a clock record of kind {kind!r}: expected 'pull' or 'push'")
        if clock < iterations:  # (clock = iterations: rank 0's read of the final parameters)
            (pulls if kind == "pull" else pushes)[rank, clock] = t
    return pulls, pushes


def _span(pushes: dict[tuple[int, int], float], ranks: int) -> tuple[int, int, list[str]]:
    """The clocks every rank has pushed, one after the other: (first, last, notes)."""
    if not pushes:
        raise ValueError("the run has no push records yet: start its workers, or wait until they have pushed")
    last_of = {r: max((c for (q, c) in pushes if q == r), default=-1) for r in range(ranks)}
    silent = [r for r, c in last_of.items() if c < 0]
    if silent:
        raise ValueError(f"ranks {silent[:5]} have no push records: the replay needs every rank's; wait until "
                         "every rank has pushed")
    last, first, notes = min(last_of.values()), 0, []
    for r in range(ranks):
        c = last
        while c > 0 and (r, c - 1) in pushes:
            c -= 1
        first = max(first, c)
    n = last + 1 - first
    if n < 2:
        raise ValueError(f"only {n} clock{'s' * (n != 1)} pushed by every rank in the records: run longer, or "
                         "wait until every rank has pushed at least 2 clocks")
    if first:
        notes.append(f"the records start at clock {first} (the server keeps the most recent): clocks "
                     f"{first}..{last} are replayed as 0..{n - 1}")
    if max(last_of.values()) > last:
        notes.append(f"ranks pushed different numbers of clocks: replaying up to clock {last}, the last every "
                     "rank pushed")
    return first, last, notes


def _latencies(gaps: list[list[tuple[int, float, float]]],
               shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each served pull's latency, each rank's wake-up, and the seconds each rank waited.

    A pull the gate let through at once (it opened before the rank's previous push) shows its
    latency. One that may have waited shows less: it is taken to have had the rank's usual latency
    (at most its gap), and if the gate opened later than that, the pull was parked and served
    ``wake`` after the gate opened. Without samples, a rank takes every rank's median (or 0)."""
    latency, wake, waited = np.zeros(shape), np.zeros(shape[0]), np.zeros(shape[0])
    free = [[gap for _, gap, opened in mine if opened <= 0] for mine in gaps]
    anyone = _median([g for mine in free for g in mine])
    typical = [_median(mine, anyone) for mine in free]
    woken = [[gap - opened for _, gap, opened in mine if opened > typical[r] + RESOLUTION] for r, mine in enumerate(gaps)]
    anyone = _median([w for mine in woken for w in mine])
    for r, mine in enumerate(gaps):
        wake[r] = _median(woken[r], anyone)
        for i, gap, opened in mine:
            latency[r, i] = gap if opened <= 0 else min(typical[r], gap)
            waited[r] += gap - latency[r, i]
    np.maximum(latency, 0.0, out=latency)
    np.maximum(wake, 0.0, out=wake)
    return latency, wake, waited
