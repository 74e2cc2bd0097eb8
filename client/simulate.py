"""What-if: replay a run's recorded step times under other staleness bounds (``psctl simulate``).

``trace.Trace`` holds what the run's clock records say does not depend on the bound: each rank's
work per clock, its pull latency, the wake-up of a parked pull, its start. ``simulate`` runs one
task per rank against a real ``Run`` (the server's own SSP rule and gate: ``Run.wait_pull`` and
``Run.push``) on an event loop whose clock is virtual (``virtual_time``): each rank sleeps its
latency and its work, the gate parks it as the server would (then it pays its wake-up), and the
time from its pull's arrival to its serving is its idle time. Nothing of the rule is re-implemented
here.

The model's assumptions: a rank's work per clock and its pull latency do not depend on the bound
(nor on which ranks compute at the same time: CPU and network contention are not modelled), and
pulls a worker skipped (its cache was fresh enough) stay skipped. Clocks are renumbered 0..n-1:
a trace cut at its start (the server keeps the most recent records) is replayed as a run of its
clocks.

Pure: no gRPC.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ps_server.core.errors import WaitTimeout
from ps_server.core.run import Run
from ps_server.core.spec import UNBOUNDED, OptimizerConfig, ParamSpec, RunSpec, validate_spec
from ps_server.core.tensors import Gradient

from .trace import Trace
from .virtual_time import RESOLUTION, Deadlock, run_virtual

__all__ = ["Prediction", "facts", "processes_for", "replay", "report", "simulate", "simulate_all"]

@dataclass(frozen=True, eq=False)
class Prediction:
    staleness: int
    total: float
    """Seconds from the first rank's start to the last push."""
    parked: np.ndarray
    """(ranks,) seconds each rank's pulls were parked by the gate."""
    push_times: np.ndarray = field(repr=False)
    """(ranks, clocks) when each push was accepted."""

    @property
    def ranks(self) -> int:
        return int(self.push_times.shape[0])

    @property
    def clocks(self) -> int:
        return int(self.push_times.shape[1])

    @property
    def per_clock(self) -> float:
        return self.total / self.clocks

    @property
    def throughput(self) -> float:
        """Pushes per second."""
        return self.ranks * self.clocks / self.total

    @property
    def idle(self) -> np.ndarray:
        """(ranks,) the share of the run's time each rank was parked."""
        return np.asarray(self.parked / self.total)


def _spec(trace: Trace, staleness: int) -> RunSpec:
    spec = RunSpec(name="simulate", num_workers=trace.ranks, iterations=trace.clocks, params=(ParamSpec("x", (1,)),),
                   staleness=staleness, optimizer=OptimizerConfig(learning_rate=1.0))
    validate_spec(spec)
    return spec


def replay(trace: Trace, staleness: int) -> tuple[Prediction, Run]:
    """Run ``trace``'s ranks under ``staleness`` through a real ``Run`` in virtual time; also
    return that run (its clock records and counters are the server's view of the replay)."""
    spec = _spec(trace, staleness)
    work, latency, wake, start = trace.work.tolist(), trace.latency.tolist(), trace.wake.tolist(), trace.start.tolist()
    # Longer than any wait can be: every step of every rank one after the other.
    patience = 1.0 + float(trace.work.sum() + trace.latency.sum() + trace.wake.sum() * trace.clocks + trace.start.max())

    async def main() -> tuple[Prediction, Run]:
        loop = asyncio.get_running_loop()
        run = Run("simulate", spec, now=loop.time, history=max(20_000, trace.ranks * trace.clocks))
        incarnations = [run.join(f"rank {r}").incarnation for r in range(trace.ranks)]
        parked = [0.0] * trace.ranks
        pushed = [[0.0] * trace.clocks for _ in range(trace.ranks)]
        zero: dict[str, Gradient] = {"x": np.zeros(1, np.float32)}

        def until(when: float) -> asyncio.Future[None]:  # asyncio.sleep, at an absolute time (and cheaper)
            woken: asyncio.Future[None] = loop.create_future()
            loop.call_at(when, _wake, woken)
            return woken

        async def rank(r: int) -> None:
            inc, gaps, steps, times = incarnations[r], latency[r], work[r], pushed[r]
            t = start[r]
            if t > 0:
                await until(t)
            for c in range(trace.clocks):
                if c and gaps[c] > 0:
                    t += gaps[c]
                    await until(t)
                await run.wait_pull(r, inc, c, patience)
                opened = loop.time()
                if opened > t + RESOLUTION:  # it was parked: served once the server's loop gets to it
                    await until(opened + wake[r])
                    parked[r] += opened + wake[r] - t
                    t = opened + wake[r]
                run.read(r, c, None)
                t += steps[c]
                await until(t)
                run.push(r, inc, c, zero, 0)
                times[c] = t

        await asyncio.gather(*(rank(r) for r in range(trace.ranks)))
        times = np.array(pushed)
        return Prediction(staleness, float(times[:, -1].max()), np.array(parked), times), run

    try:
        return run_virtual(main())
    except (Deadlock, WaitTimeout) as exc:  # the gate never lets a rank go: a bug, not a prediction
        raise RuntimeError(f"the replay under staleness {staleness} deadlocked: {exc}") from None


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():  # (its task was cancelled)
        future.set_result(None)


def simulate(trace: Trace, staleness: int) -> Prediction:
    """Predict the run's timing had it run under ``staleness`` (0 BSP, s > 0 SSP, -1 unbounded)."""
    return replay(trace, staleness)[0]


PARALLEL_STEPS = 50_000
"""Replays of at least this many steps in all (ranks x clocks x bounds) are worth a process each."""


def processes_for(trace: Trace, bounds: Sequence[int]) -> int:
    """How many processes ``simulate_all`` had best use: for large traces (the server's rule costs
    microseconds per step and per parked pull), one per bound, up to one less than the CPUs this
    process may use (a spawn costs ~0.5 s; on two busy CPUs two processes did not pay); else 1."""
    if trace.ranks * trace.clocks * len(bounds) < PARALLEL_STEPS:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(len(bounds), cpus - 1))


def simulate_all(trace: Trace, bounds: Sequence[int], processes: int = 1) -> list[Prediction]:
    """``simulate`` under each bound: one after the other, or in up to ``processes`` fresh
    processes at once (spawned: a script that calls this needs the ``if __name__ == "__main__"``
    guard, as for any ``multiprocessing`` spawn)."""
    if processes <= 1 or len(bounds) <= 1:
        return [simulate(trace, s) for s in bounds]
    # spawn, not fork: the caller (psctl) has used gRPC, whose threads a forked child must not inherit
    with ProcessPoolExecutor(min(processes, len(bounds)), mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(simulate, [trace] * len(bounds), bounds))


def _timing(staleness: int, total: float, ranks: int, clocks: int, idle: np.ndarray) -> dict[str, Any]:
    shares = [round(float(x), 6) for x in idle]
    worst = int(np.argmax(idle))
    return {"staleness": staleness, "time_per_clock_s": total / clocks, "run_seconds": total,
            "pushes_per_second": ranks * clocks / total, "idle_share_mean": float(np.mean(idle)),
            "idle_share": shares, "most_idle_rank": worst, "most_idle_share": shares[worst]}


def facts(p: Prediction) -> dict[str, Any]:
    """A prediction as JSON-able values (``psctl simulate --json``)."""
    return _timing(p.staleness, p.total, p.ranks, p.clocks, p.idle)


def report(trace: Trace, recorded: int, predictions: Sequence[Prediction], replayed: Prediction,
           bound_changed: bool = False) -> dict[str, Any]:
    """What ``psctl simulate`` shows (its table and its --json): the run as recorded (bound
    ``recorded``; its idle shares estimated from the records; its pushes/s every push measured in
    its time, beyond the trace's clocks too), the replay of that bound and how far its time per
    clock is from the measured one, and each prediction."""
    notes = list(trace.notes)
    if bound_changed:
        notes.append(f"the run's bound changed while it ran: its pulls were taken as under the tightest, "
                     f"{_bound(recorded)}, and the replay under it is approximate")
    return {"ranks": trace.ranks, "clocks": trace.clocks, "first_clock": trace.first,
            "recorded": {**_timing(recorded, trace.total, trace.ranks, trace.clocks, trace.idle),
                         "pushes_per_second": trace.pushes_per_second, "bound_changed": bound_changed},
            "replay": {**facts(replayed), "error": replayed.per_clock / trace.per_clock - 1.0},
            "predictions": [facts(p) for p in predictions], "notes": notes}


def _bound(staleness: int) -> str:
    return "inf" if staleness == UNBOUNDED else str(staleness)
