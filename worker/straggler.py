"""Straggler injection for experiments (``ps-worker --slowdown``, ``psctl launch --slowdown RANK=FACTOR``)
and transient delays (``ps-worker --tail-delay P:FACTOR``)."""

from __future__ import annotations

import collections

import numpy as np

__all__ = ["Straggler"]


class Straggler:
    """Straggler injection (``--slowdown``): makes each iteration ``factor`` times as long as its work.

    An iteration's work is estimated robustly over the last ``WINDOW`` iterations: the median time
    of its computation plus the median time of its pulls and pushes - of those that were not parked
    waiting for other ranks (waiting is not work: counting it would make a straggler slow itself
    down further and further; the caller knows from the min clock a push reports). With iterations
    of a millisecond, one iteration's own times are mostly the scheduler's noise.

    The delay is owed, then slept: the event loop's timer rounds a sleep up to its ~1 ms
    granularity, and a sleep that overran is paid back by the next ones (the debt goes negative, by
    at most one iteration's delay and at least 2 ms; a longer stall - the process was descheduled -
    is forgiven). Delays too short to sleep accumulate. So over a few iterations the rank runs
    ``factor`` times slower, neither faster nor slower as the timer and the scheduler happen to round.

    Transient delays (``tail``: (p, factor)), as on a shared cluster: besides, each iteration is made
    ``factor`` times as long with probability ``p``, drawn from ``rng`` (seeded by the caller:
    the same run and rank delay the same iterations).

    A slower machine (``floor``, seconds, ``--step-seconds``): an iteration's work is taken as at
    least ``floor`` (the rank sleeps the difference) before the factors multiply it. Experiments
    use it to emulate workers on machines of their own, whose steps do not depend on how many
    processes share this one's cores.
    """

    WINDOW = 64
    MIN_SLEEP = 0.001
    """Sleep once at least this much is owed (a shorter sleep would take the timer's 1 ms anyway)."""

    def __init__(self, factor: float, tail: tuple[float, float] = (0.0, 1.0),
                 rng: np.random.Generator | None = None, floor: float = 0.0) -> None:
        self.factor = factor
        self.floor = floor
        self.tail_p, self.tail_factor = tail
        self._rng = rng or np.random.default_rng()
        self._compute: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self._comm: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self._comm_parked: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self._debt = 0.0

    def work(self) -> float:
        """The estimated work of one iteration, in seconds."""
        if not self._compute:
            return 0.0
        compute = sorted(self._compute)[len(self._compute) // 2]
        if self._comm:
            return compute + sorted(self._comm)[len(self._comm) // 2]
        return compute + min(self._comm_parked)  # parked every time (so far): a bound from below

    def owe(self, compute: float, comm: float, parked: bool = False) -> float:
        """Record an iteration's seconds of computation and of communication (``parked``: it may
        include waiting for other ranks); returns how long to sleep now (0: not yet)."""
        self._compute.append(compute)
        (self._comm_parked if parked else self._comm).append(comm)
        work = self.work()
        base = max(work, self.floor)
        delay = base - work + (self.factor - 1.0) * base
        if self.tail_p and self._rng.random() < self.tail_p:
            delay += (self.tail_factor - 1.0) * base
        self._debt = max(self._debt, -max(delay, 0.002)) + delay
        return self._debt if self._debt >= self.MIN_SLEEP else 0.0

    def paid(self, slept: float) -> None:
        self._debt -= slept
