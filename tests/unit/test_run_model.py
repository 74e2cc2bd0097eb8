"""A run under random schedules, checked against a small reference model of SSP (no gRPC).

Every push of (rank, clock) is a one-hot gradient, so the parameters say which pushes were applied
and how often. The model keeps, per rank, its state, incarnation, clock and the clock its
incarnation started from, and the updates it expects applied. Actions: reads and pushes, retried
pushes, copies of a read served again whose answer never arrives, lease expiries, leaves
(shutdown, done), joins, bound changes, and a restart from a snapshot taken right then (workers
must not notice it). Checked: a served read holds every update the bound promises and the
answer's guaranteed clock says; pushes read under a bound are never
refused and are applied exactly once (BSP: once their clock is complete, unless their incarnation
was evicted first); a rank that leaves early never stalls the others; the min clock never goes
down (a read's guaranteed clock stays true).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ps_server.core import snapshot
from ps_server.core.run import Run
from ps_server.core.spec import Aggregation, Initializer, OptimizerConfig, ParamSpec, RunSpec
from ps_server.core.status import RunState, WorkerState

pytestmark = pytest.mark.timeout(300)

ITERATIONS = 5
LIVE = (WorkerState.ACTIVE, WorkerState.DONE)


def _looser(a: int, b: int) -> int:
    return -1 if -1 in (a, b) else max(a, b)


@dataclass
class Rank:
    incarnation: int
    start: int
    clock: int
    state: WorkerState = WorkerState.ACTIVE
    read: tuple[int, int] | None = None
    """(clock, bound) of the read its next push was computed on."""


@dataclass
class Model:
    workers: int
    ranks: dict[int, Rank] = field(default_factory=dict)
    applied: dict[int, int] = field(default_factory=dict)
    """one-hot index -> times it must have been applied."""
    held: dict[int, dict[int, int]] = field(default_factory=dict)
    """BSP: clock -> rank -> index of its held push."""

    def index(self, rank: int, clock: int) -> int:
        return rank * ITERATIONS + clock

    def live(self) -> list[Rank]:
        return [r for r in self.ranks.values() if r.state in LIVE]

    def min_clock(self) -> int | None:
        live = self.live()
        return min(r.clock for r in live) if live else None

    def complete(self) -> None:
        """BSP: a clock every live rank has passed is applied (those an evicted rank held are gone)."""
        low = self.min_clock()
        for clock in sorted(self.held):
            if low is not None and clock < low:
                for index in self.held.pop(clock).values():
                    self.applied[index] = self.applied.get(index, 0) + 1


def grad(rank: int, clock: int, workers: int) -> dict[str, np.ndarray]:
    g = np.zeros(workers * ITERATIONS, np.float32)
    g[rank * ITERATIONS + clock] = 1.0
    return {"b": g}


ACTIONS = ["step"] * 8 + ["read", "push", "push", "dup", "copy", "expire", "shutdown", "done", "join", "join", "bound",
                         "restore", "final"]


@settings(max_examples=300, deadline=None)
@example(workers=2, staleness=0, then=None, schedule=[(1, "step"), (0, "expire"), (1, "expire"), (0, "join"), (0, "step")])
@example(workers=2, staleness=2, then=None, schedule=[(1, "step"), (1, "done"), (0, "step"), (0, "step"), (0, "step"),
                                           (0, "step"), (0, "step"), (0, "final")])
@example(workers=2, staleness=3, then=None, schedule=[(0, "step")] * 3 + [(0, "read"), (0, "bound"), (0, "restore"), (0, "push")])
@example(workers=2, staleness=2, then=None, schedule=[(0, "step"), (1, "step"), (1, "step"), (1, "step"), (0, "expire"),
                                           (1, "step"), (1, "expire"), (0, "join")])
@example(workers=2, staleness=3, then=None, schedule=[(0, "step"), (0, "step"), (0, "read"), (0, "bound"), (0, "dup"),
                                           (0, "push")])
@given(
    workers=st.integers(1, 3),
    staleness=st.sampled_from([0, 1, 2, 3, -1]),
    then=st.sampled_from([None, 1, 3, -1]),
    schedule=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(ACTIONS)), min_size=10, max_size=150),
)
def test_a_run_follows_the_reference_model(workers: int, staleness: int, then: int | None,
                                          schedule: list[tuple[int, str]]) -> None:
    """``then``: the bound the run's schedule sets at min clock 2."""
    now = [0.0]
    s = RunSpec(name="m", num_workers=workers, iterations=ITERATIONS,
                params=(ParamSpec("b", (workers * ITERATIONS,), Initializer.ZEROS),), staleness=staleness,
                optimizer=OptimizerConfig(learning_rate=1.0), aggregation=Aggregation.SUM, seed=3,
                staleness_schedule=((2, then),) if then is not None and staleness != 0 else ())
    run = Run("run-m", s, now=lambda: now[0])
    model = Model(workers)
    for _ in range(workers):
        a = run.join("w")
        model.ranks[a.rank] = Rank(a.incarnation, a.start_clock, a.start_clock)
    assert run.state is RunState.RUNNING

    def check_read(clock: int, guaranteed: int, bound: int, who: int) -> None:
        got = -run.store.params["b"]
        promised = [min(clock - bound, guaranteed) if bound >= 0 else guaranteed, guaranteed]
        for r, rank in model.ranks.items():
            if rank.state not in LIVE:
                continue
            upto = min(rank.clock, max(promised))
            for c in range(rank.start, upto):
                assert got[model.index(r, c)] >= 1, f"rank {r}'s update of clock {c} missing from a read of {clock}"
        if bound != 0:  # (its own: always, as applied on arrival)
            me = model.ranks[who]
            for c in range(me.start, me.clock):
                assert got[model.index(who, c)] >= 1, f"rank {who}'s own update of clock {c} missing"

    seen = run.min_clock
    for who, action in schedule:
        assert run.min_clock >= seen, f"the min clock went down from {seen} to {run.min_clock}"
        seen = run.min_clock
        r = who % workers
        rank = model.ranks[r]
        bound = run.spec.staleness
        if action == "bound":
            if staleness != 0 and not run.state.finished:
                run.set_staleness((1, 2, 3, -1)[who])
            continue
        if action == "restore":
            run = snapshot.restore(*snapshot.state_dict(run), now=lambda: now[0])
            continue
        if action == "join":
            if run.has_vacancy():
                a = run.join("again")
                model.ranks[a.rank] = Rank(a.incarnation, a.start_clock, a.start_clock)
                if staleness == 0:  # clocks already combined take no more gradients: none is held for ever
                    assert a.start_clock >= run.bsp.applied_clock
            continue
        if rank.state is not WorkerState.ACTIVE or run.state is not RunState.RUNNING:
            continue
        if action == "expire":
            now[0] += 100.0
            for other, o in model.ranks.items():
                if other != r and o.state is WorkerState.ACTIVE:
                    run.heartbeat(other, o.incarnation)
            run.expire(lease=50.0)
        elif action in ("shutdown", "done"):
            run.leave(r, rank.incarnation, action, "")
        elif action == "dup":
            if rank.clock > rank.start:
                before = run.store.params["b"].copy()
                assert run.push(r, rank.incarnation, rank.clock - 1, grad(r, rank.clock - 1, workers), 0).duplicate
                assert np.array_equal(before, run.store.params["b"])
            continue
        elif action == "copy":  # a copy of the rank's last read, served again; its answer never arrives
            if rank.read is not None and run.pull_ready(r, rank.incarnation, rank.read[0]):
                run.read(r, rank.read[0], None)
            continue
        elif action == "final":
            if rank.clock == ITERATIONS and run.pull_ready(r, rank.incarnation, ITERATIONS):
                read = run.read(r, ITERATIONS, None)
                check_read(ITERATIONS, read.guaranteed_clock, 0, r)
            continue
        else:
            if rank.read is None:
                if rank.clock >= ITERATIONS or not run.pull_ready(r, rank.incarnation, rank.clock):
                    continue
                low = model.min_clock()
                assert low is not None and (bound < 0 or low >= rank.clock - bound), "read served past the bound"
                read = run.read(r, rank.clock, None)
                check_read(rank.clock, read.guaranteed_clock, bound, r)
                rank.read = (rank.clock, bound)
                if action == "read":
                    continue
            if action == "read":
                continue
            clock, told = rank.read
            rank.read = None
            low = model.min_clock()
            assert low is not None and (told < 0 or low >= clock - told)
            result = run.push(r, rank.incarnation, clock, grad(r, clock, workers), 0)  # read under ``told``: accepted
            assert not result.duplicate and result.clock == clock + 1
            rank.clock = clock + 1
            if staleness == 0:
                model.held.setdefault(clock, {})[r] = model.index(r, clock)
            else:
                model.applied[model.index(r, clock)] = model.applied.get(model.index(r, clock), 0) + 1
        # What the run says about its ranks, in the model.
        for q, slot in enumerate(run.clock.slots):
            m = model.ranks[q]
            if slot.incarnation != m.incarnation:
                continue
            if slot.state is WorkerState.EVICTED and m.state is not WorkerState.EVICTED:
                m.state, m.read = WorkerState.EVICTED, None
                for by_rank in model.held.values():
                    by_rank.pop(q, None)
            elif slot.state is WorkerState.DONE:
                m.state = WorkerState.DONE
            assert slot.clock == m.clock
        if staleness == 0:
            model.complete()
            assert all(c >= run.bsp.applied_clock for c in run.bsp.pending), "a held gradient will never be applied"
        got = -run.store.params["b"]
        for index in range(workers * ITERATIONS):
            assert got[index] == model.applied.get(index, 0), f"update {divmod(index, ITERATIONS)} applied " \
                f"{got[index]:g} times, {model.applied.get(index, 0)} expected"
        # A run that waits for a rank no lease or worker will ever move is stuck.
        if run.state is RunState.RUNNING:
            held_back = [q for q, slot in enumerate(run.clock.slots) if slot.state is WorkerState.DONE
                         and slot.clock < ITERATIONS]
            assert not held_back, f"ranks {held_back} are done before their last iteration: the min clock is stuck"
    assert run.min_clock >= seen, f"the min clock went down from {seen} to {run.min_clock}"
