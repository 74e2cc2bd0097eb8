"""The pure core of a run: SSP gate rule, exactly-once pushes, BSP combine, lifecycle. No gRPC."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support import until

from ps_server.core import snapshot
from ps_server.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    OutOfRange,
    Reason,
    ResourceExhausted,
    WaitTimeout,
)
from ps_server.core.registry import RunRegistry
from ps_server.core.run import Run, footprint
from ps_server.core.shard import RankUpdate, ShardRun
from ps_server.core.spec import (
    Aggregation,
    Initializer,
    OptimizerConfig,
    OptimizerKind,
    ParamSpec,
    RunSpec,
    validate_spec,
)
from ps_server.core.status import MetricPoint, RunState, WorkerState
from ps_server.core.tensors import Pieces, Rows, Sum, blocks

pytestmark = pytest.mark.timeout(120)

PARAMS = (ParamSpec("w", (2, 3), Initializer.NORMAL, 1.0), ParamSpec("b", (3,), Initializer.ZEROS))


def spec(workers: int = 3, staleness: int = 1, iterations: int = 8, agg: Aggregation = Aggregation.SUM) -> RunSpec:
    return RunSpec(
        name="t", num_workers=workers, iterations=iterations, params=PARAMS, staleness=staleness,
        optimizer=OptimizerConfig(learning_rate=1.0), aggregation=agg, seed=7,
    )


def grad(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, np.float32), "b": np.full(3, value, np.float32)}


def started(s: RunSpec) -> tuple[Run, list[int]]:
    run = Run("run-t", s)
    incs = [run.join(f"w{r}").incarnation for r in range(s.num_workers)]
    assert run.state is RunState.RUNNING
    return run, incs


def test_run_starts_when_all_ranks_joined_and_pulls_wait_until_then() -> None:
    run = Run("run-t", spec(workers=2))
    a = run.join("a")
    assert run.state is RunState.PENDING
    assert not run.pull_ready(a.rank, a.incarnation, 0)
    assert "waiting for 1 of 2 ranks to join" in run.waiting_for()
    run.join("b")
    assert run.state is RunState.RUNNING
    assert run.pull_ready(a.rank, a.incarnation, 0)


def test_a_join_asked_again_with_its_token_gets_the_rank_it_took_until_that_rank_is_heard_from() -> None:
    """A Join whose answer was lost is asked again with its join_token: the rank it took, the same
    incarnation, one "joined" event, until that incarnation's first call (its worker had the answer)
    or its end; no other Join takes that rank, and one with no token or another takes the next."""
    now = [0.0]
    registry = RunRegistry()
    run = registry.add(Run("run-t", spec(workers=3), now=lambda: now[0]))
    a = registry.join("a", join_token="t-a")
    assert a is not None and registry.join("a", join_token="t-a") == a == registry.join("a", "run-t", join_token="t-a")
    b, c = registry.join("b"), registry.join("c", join_token="t-c")
    assert b is not None and c is not None and [a.rank, b.rank, c.rank] == [0, 1, 2]
    assert [e.rank for e in run.history.events if e.kind == "joined"] == [0, 1, 2]
    run.heartbeat(a.rank, a.incarnation)  # (a had the answer)
    assert registry.join("a", join_token="t-a") is None and run.joined("t-a") is None
    now[0] = 5.0
    run.heartbeat(a.rank, a.incarnation)
    run.heartbeat(b.rank, b.incarnation)
    assert registry.expire_leases(1.0) == [("run-t", c.rank)] and run.joined("t-c") is None  # (c never heard)
    again = registry.join("c", join_token="t-c")  # (a Join as any other: the rank evicted is free)
    assert again is not None and again.incarnation > c.incarnation


def test_ssp_bound_on_pull_and_push() -> None:
    run, inc = started(spec(workers=2, staleness=1))
    # rank 0 runs ahead: clocks 0 and 1 are within the bound while rank 1 is at 0.
    for c in (0, 1):
        assert run.pull_ready(0, inc[0], c)
        run.push(0, inc[0], c, grad(1), 0)
    assert not run.pull_ready(0, inc[0], 2)  # needs min clock >= 1
    assert "rank 1 (clock 0)" in run.waiting_for() or run.waiting_for() == ""
    with pytest.raises(FailedPrecondition, match="behind: rank 1 \\(clock 0\\)"):
        run.push(0, inc[0], 2, grad(1), 0)  # a push skipping the pull is refused too
    run.push(1, inc[1], 0, grad(1), 0)
    assert run.pull_ready(0, inc[0], 2)


def test_duplicate_push_is_acknowledged_not_applied() -> None:
    run, inc = started(spec(workers=1, staleness=2))
    before = run.store.params["b"].copy()
    run.push(0, inc[0], 0, grad(2), 0)
    again = run.push(0, inc[0], 0, grad(2), 0)
    assert again.duplicate and again.clock == 1
    np.testing.assert_array_equal(run.store.params["b"], before - 2)
    assert run.counters.pushes_duplicate == 1 and run.counters.pushes_applied == 1


def test_out_of_order_and_out_of_range_pushes_change_nothing() -> None:
    run, inc = started(spec(workers=1, staleness=2, iterations=3))
    snapshot = {k: v.copy() for k, v in run.store.params.items()}
    with pytest.raises(FailedPrecondition, match="next clock is 0"):
        run.push(0, inc[0], 1, grad(1), 0)
    with pytest.raises(OutOfRange):
        run.push(0, inc[0], 3, grad(1), 0)
    with pytest.raises(InvalidArgument, match="NaN"):
        run.push(0, inc[0], 0, grad(float("nan")), 0)
    with pytest.raises(FailedPrecondition, match="stale"):
        run.push(0, inc[0] + 1, 0, grad(1), 0)
    for k, v in snapshot.items():
        assert run.store.params[k].tobytes() == v.tobytes()
    assert run.min_clock == 0 and run.counters.pushes_rejected == 4


def test_bsp_combines_in_rank_order_and_applies_once_per_clock() -> None:
    run, inc = started(spec(workers=3, staleness=0, agg=Aggregation.MEAN))
    w0 = run.store.params["w"].copy()
    run.push(2, inc[2], 0, grad(3), 0)
    run.push(0, inc[0], 0, grad(1), 0)
    assert run.counters.updates_applied == 0  # held until every live rank pushed clock 0
    np.testing.assert_array_equal(run.store.params["w"], w0)
    run.push(1, inc[1], 0, grad(2), 0)
    assert run.counters.updates_applied == 1
    expected = w0 - ((np.float32(1) + np.float32(2) + np.float32(3)) * np.float32(1 / 3))
    np.testing.assert_array_equal(run.store.params["w"], expected)
    assert run.read(0, 1, None).guaranteed_clock == 1


def test_bsp_combines_gradients_received_in_pieces() -> None:
    """A gradient that arrived in chunks (Pieces, as the transport hands it over) is combined and
    applied exactly as the same values in one array."""
    runs = [started(spec(workers=2, staleness=0, agg=Aggregation.MEAN)) for _ in range(2)]
    rng = np.random.default_rng(3)
    g = [{"w": rng.normal(size=(2, 3)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)} for _ in range(2)]
    for rank in (1, 0):
        runs[0][0].push(rank, runs[0][1][rank], 0, g[rank], 0)
        flat = g[rank]["w"].reshape(-1)
        pieced = {"w": Pieces((2, 3), [(0, flat[:2]), (2, flat[2:5]), (5, flat[5:])]), "b": g[rank]["b"]}
        runs[1][0].push(rank, runs[1][1][rank], 0, pieced, 0)
    assert runs[0][0].counters.updates_applied == runs[1][0].counters.updates_applied == 1
    for name in ("w", "b"):
        assert runs[0][0].store.params[name].tobytes() == runs[1][0].store.params[name].tobytes()
    held, inc = started(spec(workers=2, staleness=0))
    flat = g[1]["w"].reshape(-1)
    held.push(1, inc[1], 0, {"w": Pieces((2, 3), [(0, flat[:4]), (4, flat[4:])]), "b": g[1]["b"]}, 0)
    _, arrays = snapshot.state_dict(held)  # a checkpoint of a BSP clock in progress holds the pieces joined
    assert arrays["pending/0/1/w"].tobytes() == g[1]["w"].tobytes()


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 700), st.integers(1, 4), st.integers(1, 300), st.booleans(), st.data())
def test_a_sum_read_in_blocks_is_the_ranks_gradients_added_in_order(size: int, ranks: int, block: int,
                                                                      mean: bool, data: st.DataObject) -> None:
    """BSP's combination of a dense tensor (``tensors.Sum``), computed block by block as the step
    reads it, is bit for bit the first rank's gradient plus each next one in order, then times the
    scale, whatever blocks it is read in and whatever pieces the gradients arrived in."""
    rng = np.random.default_rng(size * 31 + ranks)
    flats = [rng.normal(scale=1e3, size=size).astype(np.float32) for _ in range(ranks)]
    terms: list[np.ndarray | Pieces] = []
    for flat in flats:
        cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, size - 1)), max_size=4)))) if size > 1 else []
        bounds = [0, *cuts, size]
        terms.append(Pieces((size,), [(a, flat[a:b]) for a, b in itertools.pairwise(bounds) if b > a])
                     if cuts else flat)
    scale = np.float32(1 / ranks) if mean else None
    expected = flats[0].copy()
    for flat in flats[1:]:
        expected += flat
    if scale is not None:
        expected *= scale
    got = np.concatenate([b.copy() for _, b in blocks(Sum(terms, scale, (size,)), block)])
    assert got.tobytes() == expected.tobytes()
    assert np.asarray(Sum(terms, scale, (size,))).tobytes() == expected.tobytes()


async def test_a_pull_beyond_the_ranks_own_next_clock_is_refused_not_parked() -> None:
    """Only the rank itself could make such a pull ready, and it is waiting: parked, it would hang
    until its lease ran out (seen after a server restart from a checkpoint that knows the rank at
    an earlier clock). The refusal says so, with the clock to go back to as a fact."""
    run, inc = started(spec(workers=2, staleness=-1))
    run.push(0, inc[0], 0, grad(1), 0)
    await run.wait_pull(0, inc[0], 1, timeout=0.0)  # its own next clock: served at once
    with pytest.raises(FailedPrecondition, match="rank 0 pulled clock 3 but its next clock is 1") as e:
        await run.wait_pull(0, inc[0], 3, timeout=5.0)
    assert e.value.reason is Reason.CLOCK_AHEAD and e.value.next_clock == 1
    assert run.gate.statistics().waiting == 0  # refused, not parked
    await run.wait_pull(1, inc[1], 0, timeout=0.0)


def test_eviction_releases_the_min_clock_and_drops_buffered_gradients() -> None:
    now = [0.0]
    run = Run("run-t", spec(workers=2, staleness=0), now=lambda: now[0])
    a, b = run.join("a"), run.join("b")
    run.push(0, a.incarnation, 0, grad(1), 0)
    assert not run.pull_ready(0, a.incarnation, 1)
    now[0] = 5.0
    run.heartbeat(0, a.incarnation)
    assert run.expire(lease=3.0) == [1]
    assert run.pull_ready(0, a.incarnation, 1)  # rank 1 no longer holds the min clock
    assert run.counters.evictions == 1
    # Its rank goes to the next joiner, at the current min clock, with a new incarnation.
    c = run.join("c")
    assert (c.rank, c.start_clock) == (1, 1) and c.incarnation > b.incarnation
    with pytest.raises(FailedPrecondition, match="stale"):
        run.push(1, b.incarnation, 0, grad(1), 0)


def test_the_max_clock_is_over_live_ranks_as_the_min_clock_is() -> None:
    """Rank 2 got to clock 5 and was evicted; ranks 0 and 1 are both at 2. The max clock said 5:
    a spread of 3 where there is none, and psctl named ranks 0 and 1 as holding the run back."""
    now = [0.0]
    run = Run("run-t", spec(workers=3, staleness=-1), now=lambda: now[0])
    a, b, c = run.join("a"), run.join("b"), run.join("c")
    for clock in range(5):
        run.push(2, c.incarnation, clock, grad(1), 0)
    for clock in range(2):
        run.push(0, a.incarnation, clock, grad(1), 0)
        run.push(1, b.incarnation, clock, grad(1), 0)
    now[0] = 5.0
    run.heartbeat(0, a.incarnation)
    run.heartbeat(1, b.incarnation)
    assert run.expire(lease=3.0) == [2]
    assert (run.status().min_clock, run.status().max_clock) == (2, 2)
    now[0] = 10.0
    assert run.expire(lease=3.0) == [0, 1]  # none live: both are the highest clock reached
    assert (run.status().min_clock, run.status().max_clock) == (5, 5)


def test_a_vacant_rank_of_a_running_run_is_not_said_to_hold_it_up() -> None:
    now = [0.0]
    run = Run("run-t", spec(workers=2, staleness=1, iterations=8), now=lambda: now[0])
    a, _ = run.join("a"), run.join("b")
    now[0] = 5.0
    run.heartbeat(0, a.incarnation)
    assert run.expire(lease=3.0) == [1]
    run.push(0, a.incarnation, 0, grad(1), 0)  # rank 0 goes on alone
    assert run.waiting_for() == "rank 1 vacant: the others go on without it until a worker joins", run.waiting_for()
    now[0] = 10.0
    assert run.expire(lease=3.0) == [0]  # no live rank left: the run waits for a worker
    assert run.waiting_for() == "ranks 0, 1 vacant, waiting for a worker to join", run.waiting_for()


def test_a_run_completed_without_an_evicted_rank_says_whose_iterations_were_dropped() -> None:
    now = [0.0]
    run = Run("run-t", spec(workers=2, staleness=-1, iterations=3), now=lambda: now[0])
    a, _ = run.join("a"), run.join("b")
    now[0] = 5.0
    run.heartbeat(0, a.incarnation)
    assert run.expire(lease=3.0) == [1]  # nobody takes rank 1 again: its 3 iterations are dropped
    for clock in range(3):
        run.push(0, a.incarnation, clock, grad(1), 0)
    run.leave(0, a.incarnation, "done", "")
    assert run.state is RunState.COMPLETED
    assert run.message == "the other ranks finished; rank 1 (clock 0) left vacant: 3 iterations dropped", run.message
    assert run.history.events[-1].message.startswith(run.message), run.history.events[-1]


def test_a_run_completed_without_the_final_evaluation_says_its_last_is_an_earlier_one() -> None:
    """Rank 0's worker evaluates the final parameters, then leaves: killed after its last push (all
    its iterations done), it never did, and the run said "all ranks finished" over an earlier
    evaluation, as if it were the final one."""
    now = [0.0]
    run = Run("run-t", spec(workers=2, staleness=-1, iterations=3), now=lambda: now[0])
    a, b = run.join("a"), run.join("b")
    for clock in range(3):
        run.push(0, a.incarnation, clock, grad(1), 0)
    run.report(0, a.incarnation, [MetricPoint(rank=0, clock=2, time=0.0, loss=0.5, eval=True)], 0)
    now[0] = 5.0
    run.heartbeat(1, b.incarnation)
    assert run.expire(lease=3.0) == [0]  # (waiting for the final parameters, it was killed)
    for clock in range(3):
        run.push(1, b.incarnation, clock, grad(1), 0)
    run.leave(1, b.incarnation, "done", "")
    assert run.state is RunState.COMPLETED
    assert run.message == ("all ranks finished; the final parameters were not evaluated (rank 0 did not leave): "
                           "the last evaluation is of clock 2"), run.message


def test_a_replacement_rank_0_evaluating_a_clock_evaluated_already_adds_no_second_point() -> None:
    """Rank 0's worker evaluates clock c (and reports it) when it gets there: evicted ahead of the
    min clock, the worker that takes the rank over starts at the min clock and evaluates c again.
    The history kept both, two points of one clock in the run's loss curve (as it did of a rank
    sent back to an earlier clock by a server restarted from a checkpoint)."""
    now = [0.0]
    run = Run("run-t", spec(workers=2, staleness=-1, iterations=6), now=lambda: now[0])
    a, b = run.join("a"), run.join("b")
    for clock in range(2):
        run.push(0, a.incarnation, clock, grad(1), 0)
    run.report(0, a.incarnation, [MetricPoint(rank=0, clock=2, time=0.0, loss=0.5, eval=True, eval_loss=0.4)], 0)
    now[0] = 5.0
    run.heartbeat(1, b.incarnation)
    assert run.expire(lease=3.0) == [0]
    c = run.join("c")
    assert (c.rank, c.start_clock) == (0, 0)  # (the min clock: rank 1's)
    for clock in range(2):
        run.push(0, c.incarnation, clock, grad(1), 0)
    run.report(0, c.incarnation, [MetricPoint(rank=0, clock=2, time=6.0, loss=0.5, eval=True, eval_loss=0.3),
                                  MetricPoint(rank=0, clock=2, time=6.5, loss=0.45)], 0)
    for clock in range(2, 4):
        run.push(0, c.incarnation, clock, grad(1), 0)
    run.report(0, c.incarnation, [MetricPoint(rank=0, clock=4, time=7.0, loss=0.4, eval=True, eval_loss=0.1)], 0)
    assert [(p.clock, p.eval, p.time) for p in run.history.points] == [(2, True, 0.0), (2, False, 6.5), (4, True, 7.0)]
    assert run.history.last_eval is not None and run.history.last_eval.eval_loss == 0.1
    again = Run("run-t", run.spec)  # (resumed from a checkpoint, rank 0 sent back to clock 4)
    again.history.restore(run.history.points, run.history.events, run.history.last_eval)
    again.history.add_points(0, [MetricPoint(rank=0, clock=4, time=8.0, loss=0.4, eval=True, eval_loss=0.0)])
    assert [p.eval_loss for p in again.history.points if p.eval] == [0.4, 0.1]


def test_a_rank_s_training_points_of_clocks_it_has_points_of_are_dropped_over_a_restore_too() -> None:
    """A report retried after its answer was lost carries its points again: each clock keeps the
    first, in a run resumed from a checkpoint too; a rank sent back there adds the clocks after it."""
    run = Run("run-t", spec(workers=2, staleness=-1, iterations=6))
    a = run.join("a")
    report = [MetricPoint(rank=0, clock=c, time=float(c), loss=1.0 / c) for c in (1, 2, 3)]
    run.report(0, a.incarnation, report, 0)
    run.report(0, a.incarnation, report, 0)
    run.history.add_points(1, [MetricPoint(rank=1, clock=2, time=2.5, loss=0.7)])
    assert [(p.rank, p.clock) for p in run.history.points] == [(0, 1), (0, 2), (0, 3), (1, 2)]
    again = Run("run-t", run.spec)
    again.history.restore(list(run.history.points)[:2], run.history.events, None)  # (a checkpoint at clock 2)
    again.history.add_points(0, report[1:])
    again.history.add_points(0, report[1:])
    assert [(p.rank, p.clock) for p in again.history.points] == [(0, 1), (0, 2), (0, 3)]


def test_bsp_a_rank_handed_over_when_none_is_live_starts_after_the_clocks_already_combined() -> None:
    """Rank 1 pushes clock 0, rank 0 is evicted (clock 0 is combined without it), then rank 1. The
    next worker took rank 0 at its own clock 0: its push of clock 0 was acknowledged and held for
    ever, a clock already combined (neither applied nor refused)."""
    now = [0.0]
    run = Run("run-t", spec(workers=2, staleness=0), now=lambda: now[0])
    run.join("a")
    b = run.join("b")
    run.push(1, b.incarnation, 0, grad(1), 0)
    now[0] = 5.0
    run.heartbeat(1, b.incarnation)
    assert run.expire(lease=3.0) == [0] and run.bsp.applied_clock == 1
    now[0] = 10.0
    assert run.expire(lease=3.0) == [1]
    c = run.join("c")
    assert (c.rank, c.start_clock) == (0, 1)
    d = run.join("d")
    assert (d.rank, d.start_clock) == (1, 1)
    before = run.store.params["b"].copy()
    run.push(0, c.incarnation, 1, grad(1), 0)
    run.push(1, d.incarnation, 1, grad(2), 0)
    np.testing.assert_array_equal(run.store.params["b"], before - 3)  # clock 1: both ranks' gradients
    assert not run.bsp.pending and run.bsp.applied_clock == 2


def test_a_rank_handed_over_when_none_is_live_starts_at_the_min_clock_which_never_goes_down() -> None:
    """s = 2: rank 0 is evicted at clock 1, rank 1 reads clock 3 (guaranteed: every update below 3
    of every rank) and is evicted too. The next worker took rank 0 back at its own clock 1: the
    run's min clock went from 3 down to 1, and that rank's iterations 1 and 2 were applied after a
    read that had been promised them."""
    now = [0.0]
    run = Run("run-t", spec(workers=2, staleness=2), now=lambda: now[0])
    a, b = run.join("a"), run.join("b")
    run.push(0, a.incarnation, 0, grad(1), 0)
    for c in range(3):
        run.push(1, b.incarnation, c, grad(1), 0)
    now[0] = 5.0
    run.heartbeat(1, b.incarnation)
    assert run.expire(lease=3.0) == [0] and run.min_clock == 3
    assert run.pull_ready(1, b.incarnation, 3) and run.read(1, 3, None).guaranteed_clock == 3
    now[0] = 10.0
    assert run.expire(lease=3.0) == [1] and run.min_clock == 3
    c = run.join("c")
    assert (c.rank, c.start_clock) == (0, 3) and run.min_clock == 3
    d = run.join("d")
    assert (d.rank, d.start_clock) == (1, 3)
    assert run.status().min_clock == 3


def test_bsp_a_shard_admits_a_rank_after_the_clocks_it_already_combined() -> None:
    """A cluster's shard under BSP got rank 0's push of clock 0 before server 0 did; rank 1 is
    evicted (the shard combines clock 0 without it), and server 0, whose min clock is still 0,
    hands rank 1 over at 0. The shard admitted it at 0: its push of clock 0 was held for ever, a
    clock already combined (acknowledged, never applied, in every checkpoint after)."""
    shard = ShardRun("run-t", spec(workers=2, staleness=0))
    shard.mirror([RankUpdate(0, 1, WorkerState.ACTIVE, 0), RankUpdate(1, 2, WorkerState.ACTIVE, 0)],
                 RunState.RUNNING, "")
    shard.push(0, 1, 0, grad(1), 0)
    shard.mirror([RankUpdate(1, 2, WorkerState.EVICTED, 0)], RunState.RUNNING, "")
    assert shard.bsp.applied_clock == 1
    shard.mirror([RankUpdate(1, 3, WorkerState.ACTIVE, 0, "again")], RunState.RUNNING, "")
    assert shard.clock.slots[1].clock == 1 and shard.min_clock == 1
    assert shard.push(1, 3, 0, grad(1), 0).duplicate  # (applied where it was not combined yet)
    shard.push(0, 1, 1, grad(1), 0)
    shard.push(1, 3, 1, grad(2), 0)
    assert not shard.bsp.pending and shard.bsp.applied_clock == 2
    assert [s.start for s in shard.clock.slots] == [0, 1]  # (what its UpdateShard answers: server 0 learns it)


def test_bsp_a_rank_that_starts_later_on_another_server_starts_there_on_every_one() -> None:
    """Server 0 handed rank 1 over at clock 0, and another shard had combined clock 0 already: the
    rank starts at 1 on server 0 (which combines clock 0 without it) and on a shard that admitted
    it at 0 (``RankUpdate.start``); an older incarnation, or an earlier start, moves nothing."""
    owner = Run("run-t", spec(workers=2, staleness=0))
    a, b = owner.join("a"), owner.join("b")
    owner.push(a.rank, a.incarnation, 0, grad(1), 0)
    assert not owner.start_later(b.rank, b.incarnation - 1, 1, "torn_push", "stale")
    assert owner.start_later(b.rank, b.incarnation, 1, "torn_push", "server 1 had combined clock 0")
    assert not owner.start_later(b.rank, b.incarnation, 1, "torn_push", "again")
    assert owner.clock.slots[b.rank].clock == 1 and owner.bsp.applied_clock == 1
    assert [e.message for e in owner.history.events if e.kind == "torn_push"] == ["server 1 had combined clock 0"]
    shard = ShardRun("run-t", spec(workers=2, staleness=0))
    shard.mirror([RankUpdate(0, a.incarnation, WorkerState.ACTIVE, 0), RankUpdate(1, b.incarnation, WorkerState.ACTIVE, 0)],
                 RunState.RUNNING, "")
    shard.push(a.rank, a.incarnation, 0, grad(1), 0)
    shard.mirror([RankUpdate(1, b.incarnation, WorkerState.ACTIVE, 1, start=1)], RunState.RUNNING, "")
    assert shard.clock.slots[1].clock == 1 and shard.bsp.applied_clock == 1
    assert shard.push(b.rank, b.incarnation, 0, grad(1), 0).duplicate


def test_completion_needs_every_rank_to_leave_and_final_pull_waits_for_all() -> None:
    run, inc = started(spec(workers=2, staleness=3, iterations=2))
    for c in range(2):
        run.push(0, inc[0], c, grad(1), 0)
    assert not run.pull_ready(0, inc[0], 2)  # the final read waits for rank 1
    for c in range(2):
        run.push(1, inc[1], c, grad(1), 0)
    assert run.pull_ready(0, inc[0], 2)
    run.leave(1, inc[1], "done", "")
    assert run.state is RunState.RUNNING
    run.leave(0, inc[0], "done", "")
    assert run.state is RunState.COMPLETED


def test_a_rank_done_before_its_last_iteration_is_handed_over_not_left_holding_the_min_clock() -> None:
    """A worker that finished leaves "done"; a server restored from a checkpoint since knows its rank
    at an earlier clock. DONE there, the rank held the min clock back with no lease to expire: the
    others' pulls parked until their limit, again and again, and the run never ended."""
    run, inc = started(spec(workers=2, staleness=1, iterations=4))
    run.push(1, inc[1], 0, grad(1), 0)
    run.leave(1, inc[1], "done", "")
    assert run.status().workers[1].state is WorkerState.EVICTED and run.counters.evictions == 0
    assert "left done with 3 iterations left" in run.history.events[-1].message
    for c in range(4):
        assert run.pull_ready(0, inc[0], c)
        run.push(0, inc[0], c, grad(1), 0)
    b = run.join("b")  # the rank's iterations left go to the next worker
    assert (b.rank, b.start_clock) == (1, 4)
    run.leave(1, b.incarnation, "done", "")
    run.leave(0, inc[0], "done", "")
    assert run.state is RunState.COMPLETED


def test_failed_leave_fails_the_run_and_stop_releases_waiters() -> None:
    run, inc = started(spec(workers=2))
    run.leave(1, inc[1], "failed", "npz file has no 'y'")
    assert run.state is RunState.FAILED and "npz file has no 'y'" in run.message
    run2, inc2 = started(spec(workers=2))
    run2.stop("enough")
    with pytest.raises(FailedPrecondition, match="stopped"):
        run2.pull_ready(0, inc2[0], 0)


def test_after_a_stop_no_rank_shows_active_and_leaving_changes_nothing() -> None:
    """Issue 14: status after a stop said the ranks were active. They show STOPPED, with their
    clocks (which still make the final min clock); a worker's heartbeat hears the run's state, and a
    late leave (even one saying it failed) changes nothing, nor do leases expire."""
    run, inc = started(spec(workers=3, staleness=-1))
    run.push(0, inc[0], 0, grad(1), 0)
    run.push(0, inc[0], 1, grad(1), 0)
    run.push(1, inc[1], 0, grad(1), 0)
    run.leave(2, inc[2], "shutdown", "")  # rank 2 evicted before the stop: stays so
    run.stop("enough")
    status = run.status()
    assert [w.state for w in status.workers] == [WorkerState.STOPPED, WorkerState.STOPPED, WorkerState.EVICTED]
    assert status.active_workers == 0 and [w.clock for w in status.workers] == [2, 1, 0] and status.min_clock == 1
    assert run.heartbeat(0, inc[0]) == (RunState.STOPPED, 2)
    assert run.leave(1, inc[1], "failed", "late") is RunState.STOPPED and run.leave(0, inc[0], "shutdown", "") \
        is RunState.STOPPED
    assert run.state is RunState.STOPPED and run.message == "enough" and run.expire(0.0) == []
    assert [w.state for w in run.status().workers][:2] == [WorkerState.STOPPED] * 2
    restored = snapshot.restore(*snapshot.state_dict(run))
    assert [w.state for w in restored.status().workers] == [w.state for w in run.status().workers]


def _looser(a: int, b: int) -> int:
    return -1 if -1 in (a, b) else max(a, b)


@settings(max_examples=80, deadline=None)
# Always: rank 0 three clocks ahead reads clock 3 under s = 3, the bound drops to 1, it pushes (allowed).
@example(workers=2, staleness=3, schedule=[(0, "step")] * 3 + [(0, "read"), (0, "lower"), (0, "step")])
# Always: rank 0's read outlives its eviction; rank 1 is evicted too, and its worker's Join takes rank 0
# (the first vacant) at the min clock, 1: the old read of clock 0 is not the new incarnation's.
@example(workers=2, staleness=0, schedule=[(0, "read"), (0, "evict"), (1, "step"), (1, "evict"), (1, "step"),
                                           (0, "step")])
@given(
    workers=st.integers(1, 4),
    staleness=st.sampled_from([0, 1, 2, 3, -1]),
    schedule=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["step", "step", "step", "read", "read", "dup",
                                                                    "evict", "set", "lower"])),
                      min_size=1, max_size=120),
)
def test_ssp_invariant_and_exactly_once_under_random_schedules(workers: int, staleness: int, schedule: list) -> None:
    """No rank completes iteration c while a live rank's clock is < c - s, s the bound in force when
    its read of c was served, though the bound changes while the run runs (``set_staleness``, here
    between a read and its push too): such a push is never refused; every update applied once."""
    iterations = 6
    now = [0.0]
    run = Run("run-h", spec(workers, staleness, iterations, Aggregation.SUM), now=lambda: now[0])
    initial = {k: v.astype(np.float64) for k, v in run.store.params.items()}
    incs = {r: run.join(f"w{r}").incarnation for r in range(workers)}
    applied: dict[tuple[int, int, int], float] = {}  # (rank, incarnation, clock) -> gradient value
    pending: dict[int, tuple[int, int]] = {}  # rank -> (clock read, the bound it was read under)
    loosest = staleness

    def live() -> list[int]:
        return [w.clock for w in run.status().workers if w.state in (WorkerState.ACTIVE, WorkerState.DONE)]

    for who, action in schedule:
        r = who % workers
        if action in ("set", "lower"):  # "lower": to the tightest bound, where a read in progress matters most
            if staleness != 0 and not run.state.finished:
                run.set_staleness(1 if action == "lower" else (1, 2, 3, -1)[who])
                loosest = _looser(loosest, run.spec.staleness)
            continue
        slot_state = run.status().workers[r].state
        if slot_state is WorkerState.EVICTED:
            pending.pop(r, None)
            if run.state.finished:  # every other rank evicted and the last one done: completed, no rank to take
                continue
            a = run.join(f"again{r}")  # (the first vacant rank: maybe not r)
            incs[a.rank] = a.incarnation
            pending.pop(a.rank, None)  # a read of the rank's old incarnation is not the new one's
            continue
        if slot_state is not WorkerState.ACTIVE:
            continue
        clock = run.status().workers[r].clock
        if action == "evict" and workers > 1:
            now[0] += 100.0
            for other in range(workers):
                if other != r and run.status().workers[other].state is WorkerState.ACTIVE:
                    run.heartbeat(other, incs[other])
            run.expire(lease=50.0)
            continue
        if action == "dup" and clock > 0:
            res = run.push(r, incs[r], clock - 1, grad(99), 0)
            assert res.duplicate
            continue
        if r not in pending:
            if clock >= iterations or not run.pull_ready(r, incs[r], clock):
                continue
            bound = run.spec.staleness
            if bound >= 0:
                assert min(live()) >= clock - bound, "a pull was allowed past the staleness bound"
            run.read(r, clock, None)
            pending[r] = (clock, bound)
            if action == "read":
                continue  # its push comes later, maybe after the bound changed
        clock, bound = pending.pop(r)
        value = float(1 + r + 10 * clock)
        result = run.push(r, incs[r], clock, grad(value), 0)  # never refused: read under ``bound``
        assert not result.duplicate and result.staleness == run.spec.staleness
        applied[(r, incs[r], clock)] = value
        if bound >= 0:
            assert min(live()) >= clock - bound
    for rec in run.history.clock_records:
        if rec.kind == "push" and loosest >= 0:
            assert rec.min_clock >= rec.clock - loosest
    # Exactly once: s > 0 applies every accepted push; s = 0 applies every clock all live ranks
    # pushed (buffered gradients of an evicted rank are dropped, by design).
    if staleness != 0:
        total = sum(applied.values())
        np.testing.assert_allclose(run.store.params["b"], initial["b"] - total, rtol=0, atol=1e-3)
        assert run.counters.updates_applied == len(applied)


def test_a_live_bound_change_wakes_parked_pulls_and_lets_the_iteration_in_progress_finish() -> None:
    run, inc = started(spec(workers=2, staleness=1, iterations=10))
    for c in (0, 1):
        run.read(0, c, None)
        run.push(0, inc[0], c, grad(1), 0)
    assert not run.pull_ready(0, inc[0], 2)  # rank 1 at clock 0
    run.set_staleness(3)
    assert run.pull_ready(0, inc[0], 2) and run.history.events[-1].message == "staleness changed from 1 to 3"
    run.read(0, 2, None)  # told 3
    run.push(0, inc[0], 2, grad(1), 0)
    run.read(0, 3, None)  # served under 3: min clock 0 >= 3 - 3
    run.set_staleness(1)  # lowered while rank 0 computes clock 3
    assert run.push(0, inc[0], 3, grad(1), 0).staleness == 1  # finishes under the bound it read with
    assert not run.pull_ready(0, inc[0], 4)  # from its next iteration on, 1 holds
    with pytest.raises(FailedPrecondition, match="staleness 1"):
        run.push(0, inc[0], 4, grad(1), 0)  # a push without its read is checked against what it was told
    with pytest.raises(FailedPrecondition, match="to or from 0"):
        run.set_staleness(0)
    with pytest.raises(InvalidArgument, match="staleness -2"):
        run.set_staleness(-2)
    run.set_staleness(-1)
    assert run.pull_ready(0, inc[0], 4) and run.spec.staleness == -1
    run.stop("over")
    with pytest.raises(FailedPrecondition, match="stopped"):
        run.set_staleness(2)


def test_a_copy_of_a_push_or_pull_answered_after_a_lowering_does_not_refuse_the_next_push() -> None:
    """Rank 0 reads clock 3 under s = 3; the bound is lowered to 1; a copy of its push of clock 2
    (with its then_pull) arrives again: a retry whose first try was applied, or a data plane's
    request after the client fell back to gRPC, whose sender went on with the first answer. The
    copy's answers made the server believe rank 0 computed clock 3 under 1: its push was refused."""
    run, inc = started(spec(workers=2, staleness=3, iterations=10))
    for c in range(3):
        run.read(0, c, None)
        run.push(0, inc[0], c, grad(1), 0, data_plane="tcp")
    run.read(0, 3, None)  # told 3: rank 1 at clock 0 >= 3 - 3
    run.set_staleness(1)
    again = run.push(0, inc[0], 2, grad(1), 0, data_plane="grpc")
    assert again.duplicate and again.staleness == 1  # the bound in force, told
    assert run.status().workers[0].data_plane == "tcp"  # (a duplicate is no push over gRPC)
    assert run.read(0, 3, None).staleness == 1  # the copy's then_pull
    assert run.push(0, inc[0], 3, grad(1), 0).clock == 4  # finishes under the bound it read with
    with pytest.raises(FailedPrecondition, match="staleness 1"):  # from its next push on, 1 holds
        run.push(0, inc[0], 4, grad(1), 0)


def test_a_retried_push_answered_under_a_raised_bound_lets_the_next_push_in_after_a_lowering() -> None:
    """Rank 0's push of clock 1 is applied under s = 1, its answer lost; s is raised to 3; the
    retry's answer (a duplicate) says 3 and its worker computes clock 2 under 3 (its cache); s is
    lowered to 1 before that push arrives: it is checked against 3 (a duplicate's answer does not
    set what the next push is checked against, as the applied push's does, but loosens it)."""
    run, inc = started(spec(workers=2, staleness=1, iterations=10))
    run.push(0, inc[0], 0, grad(1), 0)
    run.push(1, inc[1], 0, grad(1), 0)
    run.push(0, inc[0], 1, grad(1), 0)  # told 1 (lost)
    run.set_staleness(3)
    assert run.push(0, inc[0], 1, grad(1), 0).staleness == 3  # the retry: told 3
    run.set_staleness(1)
    assert run.push(0, inc[0], 2, grad(1), 0).clock == 3  # rank 1 at clock 1 >= 2 - 3, not >= 2 - 1


def test_a_run_keeps_the_tightest_and_loosest_bound_it_has_been_under() -> None:
    """``psctl set`` replaces the bound in the spec; ``bounds`` (GetRun's tightest_staleness and
    loosest_staleness) keeps the ones it replaced. A refused change is not a bound the run had."""
    run, _ = started(spec(workers=2, staleness=2))
    assert run.bounds == run.status().bounds == (2, 2)
    run.set_staleness(5)
    assert run.spec.staleness == 5 and run.bounds == (2, 5)
    run.set_staleness(1)
    run.set_staleness(3)
    assert run.spec.staleness == 3 and run.bounds == (1, 5)
    with pytest.raises(FailedPrecondition, match="to or from 0"):
        run.set_staleness(0)
    with pytest.raises(InvalidArgument):
        run.set_staleness(-2)
    assert run.bounds == (1, 5)
    run.set_staleness(-1)  # unbounded is the loosest, never the tightest
    assert run.bounds == (1, -1)
    ever_unbounded, _ = started(spec(workers=1, staleness=-1))
    ever_unbounded.set_staleness(4)
    assert ever_unbounded.bounds == (4, -1)


async def test_registry_assigns_oldest_run_first_and_reports_unknown_runs() -> None:
    reg = RunRegistry()
    r1 = await reg.create(spec(workers=1))
    r2 = await reg.create(spec(workers=1))
    assert reg.join("a").run_id == r1.run_id  # type: ignore[union-attr]
    assert reg.join("b").run_id == r2.run_id  # type: ignore[union-attr]
    assert reg.join("c") is None
    with pytest.raises(Exception, match=r1.run_id):
        reg.get("run-nope")


@pytest.mark.parametrize("kind", list(OptimizerKind))
@pytest.mark.parametrize("topk", [0.0, 0.5])
def test_a_runs_footprint_is_the_memory_its_arrays_keep(kind: OptimizerKind, topk: float) -> None:
    """What --max-total-bytes counts of a run, known before it is built: its parameters, its
    optimizer's state and the versions of delta pulls (SGD with top-k)."""
    s = dataclasses.replace(spec(), optimizer=OptimizerConfig(kind=kind), topk_ratio=topk)
    run = Run("run-t", s)
    arrays = [run.store.flat, *run.optimizer.state_arrays().values(), *([run.store.changed] if run.store.changed
                                                                        is not None else [])]
    assert run.footprint == sum(a.nbytes for a in arrays) == footprint(s, PARAMS)


def test_a_bsp_runs_footprint_counts_the_gradients_it_holds_for_a_clock_until_it_finishes() -> None:
    """BSP holds each rank's gradient of a clock past its push until the last rank's push
    completes the clock: a model's bytes from every rank but the last, which --max-total-bytes
    counts while the run trains (it did not: a BSP run of many ranks took the server past it)."""
    s = spec(workers=3, staleness=0)
    run, inc = started(s)
    kept = footprint(s, PARAMS, finished=True)
    assert run.footprint == footprint(s, PARAMS) == kept + 2 * 4 * 9
    run.push(0, inc[0], 0, grad(1), 0)
    run.push(1, inc[1], 0, grad(2), 0)  # the most it holds: the third push completes the clock
    held = sum(np.asarray(g).nbytes for by_rank in run.bsp.pending.values() for grads in by_rank.values()
               for g in grads.values())
    assert held == run.footprint - kept
    run.stop("enough")  # its held gradients are dropped
    assert not run.bsp.pending and run.footprint == kept


async def test_runs_being_created_count_against_the_registrys_total_until_added_or_abandoned() -> None:
    """A run built and not registered yet (its first checkpoint being written, a cluster's other
    servers creating their shards) holds its memory already: CreateRuns arriving meanwhile must not
    all pass the --max-total-bytes check."""
    one = footprint(spec(), PARAMS)
    reg = RunRegistry(max_total_bytes=2 * one)
    first = await reg.build("run-1", spec())
    second = await reg.build("run-2", spec())
    with pytest.raises(ResourceExhausted, match="run-1 36 bytes \\(being created\\)"):
        await reg.build("run-3", spec())
    reg.abandon(second)
    reg.add(first)
    third = await reg.build("run-3", spec())
    with pytest.raises(ResourceExhausted, match="run-1 36 bytes \\(pending\\), run-3 36 bytes \\(being created\\)"):
        await reg.create(spec())

    async def cannot_checkpoint(run: Run) -> None:
        raise OSError("disk full")

    reg.abandon(third)
    with pytest.raises(OSError):
        await reg.create(spec(), ready=cannot_checkpoint)
    assert [r.run_id for r in reg.runs()] == ["run-1"]
    await reg.create(spec())  # (the run whose checkpoint failed no longer counts)


def test_a_restarted_registry_still_assigns_the_oldest_run_first() -> None:
    """A restarted server adds its runs in the order of their directories (their random ids), not
    of their creation: a worker was handed a rank of whichever came first."""
    reg = RunRegistry()
    older, newer = Run("run-b", spec(workers=1)), Run("run-a", spec(workers=1))
    older.created, newer.created = 100.0, 200.0
    for run in (newer, older):  # as resumed: by run id
        reg.add(run)
    assert reg.join("a").run_id == "run-b"  # type: ignore[union-attr]
    assert reg.join("b").run_id == "run-a"  # type: ignore[union-attr]


async def test_a_rank_whose_pull_is_parked_is_not_silent() -> None:
    """Rank 0's pull waits for rank 1 (a straggler that heartbeats) longer than the lease: rank 0 was
    evicted while it waited in the server (its pull failed: STALE_INCARNATION, join again), though
    it was never behind anybody. A parked pull holds the lease; once served, a lease starts afresh."""
    now = [0.0]
    run = Run("run-t", spec(workers=2, staleness=0), now=lambda: now[0])
    a, b = run.join("a"), run.join("b")
    run.push(0, a.incarnation, 0, grad(1), 0)
    parked = asyncio.create_task(run.wait_pull(0, a.incarnation, 1, timeout=30.0))
    await until(lambda: run.clock.slots[0].waiting_for == 1)
    now[0] = 20.0
    run.heartbeat(1, b.incarnation)
    assert run.expire(lease=10.0) == []
    run.push(1, b.incarnation, 0, grad(1), 0)
    async with asyncio.timeout(5):
        await parked  # served
    now[0] = 25.0  # (its next push is on its way)
    assert run.expire(lease=10.0) == []
    now[0] = 31.0  # silent for a lease since it was served
    run.heartbeat(1, b.incarnation)
    assert run.expire(lease=10.0) == [0]


async def test_two_parked_pulls_of_one_rank_each_hold_its_lease_and_show() -> None:
    """Rank 0's pull is parked, and its retry (the client's deadline passed first) parks beside it;
    then the first ends (its RPC cancelled). The retry still waits: its rank shows it, is not
    silent, and each pull counts its own time parked. (One parked pull per rank was kept: the
    retry overwrote the first's, the first's end cleared both, and the lease sweep evicted rank 0
    while its retry waited, which then failed: STALE_INCARNATION.)"""
    now = [0.0]
    run = Run("run-t", spec(workers=2, staleness=0), now=lambda: now[0])
    a, b = run.join("a"), run.join("b")
    run.push(0, a.incarnation, 0, grad(1), 0)
    first = asyncio.create_task(run.wait_pull(0, a.incarnation, 1, timeout=30.0))
    await until(lambda: run.gate.statistics().waiting == 1)
    now[0] = 5.0
    retry = asyncio.create_task(run.wait_pull(0, a.incarnation, 1, timeout=30.0))
    await until(lambda: run.gate.statistics().waiting == 2)
    now[0] = 6.0
    first.cancel()
    await asyncio.wait([first], timeout=5)
    assert first.cancelled() and run.gate.statistics().waiting == 1
    assert run.status().workers[0].waiting_for_clock == 1 and "rank 0 (clock 1) waits for rank 1" in run.waiting_for()
    now[0] = 20.0
    run.heartbeat(1, b.incarnation)
    assert run.expire(lease=10.0) == []  # its retry waits in the server
    run.push(1, b.incarnation, 0, grad(1), 0)
    async with asyncio.timeout(5):
        await retry  # served
    assert run.status().workers[0].waiting_for_clock is None
    assert run.counters.parked_seconds == pytest.approx(6.0 + 15.0)


async def test_parked_pulls_wake_exactly_when_their_bound_holds() -> None:
    run, inc = started(spec(workers=2, staleness=0, iterations=5))
    run.push(0, inc[0], 0, grad(1), 0)
    waiter = asyncio.create_task(run.wait_pull(0, inc[0], 1, timeout=5.0))
    other = asyncio.create_task(run.wait_pull(1, inc[1], 0, timeout=5.0))  # ready: never parks
    await asyncio.sleep(0.01)
    assert other.done() and not waiter.done() and run.gate.statistics().waiting == 1
    assert run.status().workers[0].waiting_for_clock == 1 and "rank 1 (clock 0)" in run.waiting_for()
    run.push(1, inc[1], 0, grad(1), 0)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert waiter.done() and run.status().workers[0].waiting_for_clock is None
    run.push(0, inc[0], 1, grad(1), 0)
    parked = asyncio.create_task(run.wait_pull(0, inc[0], 2, timeout=5.0))  # needs rank 1 at clock 2
    await asyncio.sleep(0.01)
    run.stop("test over")
    with pytest.raises(FailedPrecondition, match="stopped") as e:
        await parked
    assert e.value.reason is Reason.RUN_NOT_RUNNING and e.value.run_state == "stopped"
    assert run.counters.pulls_parked == 2 and run.counters.parked_seconds > 0


async def test_a_parked_pull_times_out_naming_who_holds_it_back() -> None:
    run, inc = started(spec(workers=3, staleness=0))
    run.push(0, inc[0], 0, grad(1), 0)
    with pytest.raises(WaitTimeout, match=r"waited 0\.1s: rank 0 \(clock 1\) waits for rank 1 \(clock 0\), rank 2") as e:
        await run.wait_pull(0, inc[0], 1, timeout=0.1)
    assert e.value.needed_min_clock == 1 and e.value.ranks_behind == (1, 2)
    assert run.gate.statistics().waiting == 0 and run.status().workers[0].waiting_for_clock is None


def test_a_diverging_run_fails_instead_of_serving_nan() -> None:
    s = RunSpec(name="d", num_workers=1, iterations=5, params=PARAMS, staleness=1,
                optimizer=OptimizerConfig(learning_rate=1e38), seed=1)
    run = Run("run-d", s)
    a = run.join("a")
    run.push(0, a.incarnation, 0, grad(10.0), 0)  # finite gradient, but w - 1e38 * 10 overflows
    assert run.state is RunState.FAILED and "diverged" in run.message
    assert "'w'" in run.message  # named: w is random, so w - 1e39 overflows; b is zero


def test_a_bsp_combination_that_overflows_fails_the_run() -> None:
    """Each gradient is finite; their float32 sum is not, and neither is the step it feeds."""
    run, incs = started(spec(workers=2, staleness=0))
    run.push(0, incs[0], 0, grad(3e38), 0)
    assert run.state is RunState.RUNNING  # held until rank 1's push of clock 0
    run.push(1, incs[1], 0, grad(3e38), 0)
    assert run.state is RunState.FAILED and "diverged" in run.message


def _mean_of(*values: float) -> np.float32:
    """The mean as it should be: exact in float64, rounded once to float32."""
    return np.float32(sum(np.float64(np.float32(v)) for v in values) * np.float64(np.float32(1 / len(values))))


@pytest.mark.parametrize("size", [4, (1 << 19) + 5])  # one block; many blocks, on both cores, in pieces
def test_a_bsp_mean_whose_sum_overflows_float32_is_still_the_mean(size: int) -> None:
    """BSP's mean sums the ranks' gradients before it divides: 3e38 and 2e38 summed to Inf in
    float32 and failed the run as diverged, though their mean, 2.5e38, is a float32. Elements whose
    sum does not overflow keep the float32 sum's bits (a BSP run equals the reference to the bit)."""
    params = (ParamSpec("w", (size,), Initializer.ZEROS), ParamSpec("b", (2,), Initializer.ZEROS))
    s = RunSpec(name="m", num_workers=2, iterations=3, params=params, staleness=0,
                optimizer=OptimizerConfig(learning_rate=1e-30), aggregation=Aggregation.MEAN, seed=1)
    run, incs = started(s)
    g = [np.full(size, 0.1, np.float32), np.full(size, 0.7, np.float32)]
    g[0][[0, -1]], g[1][[0, -1]] = 3e38, 2e38  # the first and last elements overflow when summed
    g[0][1], g[1][1] = -3e38, -3e38
    for rank in (1, 0):
        flat = g[rank]
        w = Pieces((size,), [(0, flat[: size // 2]), (size // 2, flat[size // 2 :])]) if size > 4 else flat
        run.push(rank, incs[rank], 0, {"w": w, "b": np.array([3e38, 1.0], np.float32)}, 0)
    assert run.state is RunState.RUNNING, run.message
    lr = np.float32(1e-30)
    w = run.store.params["w"]
    assert w[0] == w[-1] == -(lr * _mean_of(3e38, 2e38)) and w[1] == -(lr * _mean_of(-3e38, -3e38))
    assert w[2] == -(lr * ((np.float32(0.1) + np.float32(0.7)) * np.float32(0.5)))  # the float32 sum's bits
    assert run.store.params["b"].tolist() == [-(lr * _mean_of(3e38, 3e38)), -(lr * np.float32(1.0))]


def test_a_bsp_mean_of_table_rows_whose_sum_overflows_float32_is_still_the_mean() -> None:
    """The same for a table: rows from every rank (merged, then scaled), and a table one rank sends whole."""
    params = (ParamSpec("emb", (4, 2), Initializer.ZEROS, table=True),)
    s = RunSpec(name="m", num_workers=2, iterations=3, params=params, staleness=0,
                optimizer=OptimizerConfig(learning_rate=1e-30), aggregation=Aggregation.MEAN, seed=1)
    run, incs = started(s)
    rows = [Rows(np.array([1, 2], np.int64), np.array([[3e38, 1.0], [2.0, 2.0]], np.float32), (4, 2)),
            Rows(np.array([1], np.int64), np.array([[2e38, 3.0]], np.float32), (4, 2))]
    for rank in (0, 1):
        run.push(rank, incs[rank], 0, {"emb": rows[rank]}, 0)
    assert run.state is RunState.RUNNING, run.message
    lr = np.float32(1e-30)
    emb = run.store.params["emb"].copy()
    assert emb[1].tolist() == [-(lr * _mean_of(3e38, 2e38)), -(lr * ((np.float32(1) + np.float32(3)) * np.float32(0.5)))]
    assert emb[2].tolist() == [-(lr * np.float32(1.0))] * 2 and not emb[[0, 3]].any()
    whole = np.zeros((4, 2), np.float32)
    whole[1] = 2e38
    run.push(0, incs[0], 1, {"emb": whole}, 0)
    run.push(1, incs[1], 1, {"emb": rows[0]}, 0)
    assert run.state is RunState.RUNNING, run.message
    assert run.store.params["emb"][1, 0] == emb[1, 0] - lr * _mean_of(2e38, 3e38)


@pytest.mark.parametrize("kind", [OptimizerKind.ADAM, OptimizerKind.ADAGRAD])
def test_an_optimizer_state_that_overflows_fails_the_run(kind: OptimizerKind) -> None:
    """A huge but finite gradient squared is Inf in the second moment / accumulator: the
    parameters stay finite but would never move again. That is divergence too."""
    s = RunSpec(name="d", num_workers=1, iterations=5, params=PARAMS, staleness=1,
                optimizer=OptimizerConfig(kind, learning_rate=0.01, epsilon=1e-7), seed=1)
    run = Run("run-d", s)
    a = run.join("a")
    run.push(0, a.incarnation, 0, grad(3e38), 0)
    assert all(np.isfinite(w).all() for w in run.store.params.values())
    assert run.state is RunState.FAILED and "optimizer state" in run.message and "diverged" in run.message


@pytest.mark.parametrize("kind", [OptimizerKind.SGD, OptimizerKind.MOMENTUM])
def test_rows_of_a_repeated_id_summing_beyond_float32_are_refused(kind: OptimizerKind) -> None:
    """Each row is finite, their sum is Inf, and stepping with an Inf raises no overflow flag: SGD
    and momentum made the row -Inf and the run went on serving it."""
    s = RunSpec(name="r", num_workers=1, iterations=5, params=(ParamSpec("emb", (4, 2), table=True),),
                staleness=1, optimizer=OptimizerConfig(kind, learning_rate=0.1))
    run = Run("run-r", s)
    a = run.join("a")
    before = run.store.params["emb"].copy()
    huge = Rows(np.array([1, 3, 1], np.int64), np.full((3, 2), 3e38, np.float32), (4, 2))
    with pytest.raises(InvalidArgument, match="'emb': the rows of repeated ids sum to 2 NaN/Inf") as e:
        run.push(0, a.incarnation, 0, {"emb": huge}, 0)
    assert e.value.reason is Reason.INVALID_GRADIENT
    assert run.state is RunState.RUNNING and np.array_equal(run.store.params["emb"], before)
    run.push(0, a.incarnation, 0, {"emb": Rows(np.array([1, 1], np.int64), np.full((2, 2), 1e38, np.float32),
                                               (4, 2))}, 0)
    assert run.state is RunState.RUNNING and np.isfinite(run.store.params["emb"]).all()


def test_a_finite_step_does_not_fail_the_run() -> None:
    run, incs = started(spec(workers=1, staleness=1))
    run.push(0, incs[0], 0, grad(1e-45), 0)  # denormal gradient: underflow is not divergence
    assert run.state is RunState.RUNNING and run.counters.updates_applied == 1


async def test_a_watch_ends_only_after_sending_the_snapshot_that_shows_the_run_finished() -> None:
    """Regression (flaky CI under load): a run that finished while the watcher's consumer was
    slow ended the stream on the last RUNNING snapshot, so the watcher never saw how it ended."""
    from paramserver.v1 import paramserver_pb2 as pb
    from ps_server.control import Control

    registry = RunRegistry()
    run = await registry.create(spec(workers=1))
    control = Control(registry, max_wait=1.0, heartbeat_seconds=1.0, lease_seconds=5.0)
    watch = control.WatchRun(pb.WatchRunRequest(run_id=run.run_id))
    first = await anext(watch)
    assert first.run.state == pb.RUN_STATE_PENDING
    run.stop("by the test")  # while the consumer still holds the first snapshot
    async with asyncio.timeout(10):
        last = [snap async for snap in watch]
    assert [s.run.state for s in last] == [pb.RUN_STATE_STOPPED]


def test_a_scheduled_bound_changes_when_the_min_clock_reaches_each_step() -> None:
    s = dataclasses.replace(spec(workers=2, staleness=1, iterations=10), staleness_schedule=((2, 4), (4, -1)))
    validate_spec(s)
    run, inc = started(s)
    for c in range(2):
        for r in (0, 1):
            run.push(r, inc[r], c, grad(1), 0)
    assert run.min_clock == 2 and run.spec.staleness == 4
    assert run.history.events[-1].message == "staleness changed from 1 to 4 at min clock 2 (the run's schedule)"
    for c in range(2, 4):
        for r in (0, 1):
            run.push(r, inc[r], c, grad(1), 0)
    assert run.spec.staleness == -1
    assert run.bounds == run.status().bounds == (1, -1)  # every step it reached, and the bound it began with
    meta, arrays = snapshot.state_dict(run)
    restored = snapshot.restore(meta, arrays)
    assert restored.spec.staleness == -1 and restored.next_step == 2  # both steps were taken
    assert restored.bounds == (1, -1)
    for bad in (((3, 2), (2, 3)), ((10, 2),), ((2, 0),), ((2, -2),)):
        with pytest.raises(InvalidArgument, match="staleness_schedule"):
            validate_spec(dataclasses.replace(s, staleness_schedule=bad))


def test_a_scheduled_step_at_clock_0_holds_from_the_start_and_after_a_restart_before_it() -> None:
    """`--staleness-schedule 10%=3` of 4 iterations is a step at clock 0. It waited for the first
    clock change (the first pulls were served under 1); a restart from the checkpoint the run gets
    when created counted it taken and the run kept 1 to its end."""
    s = dataclasses.replace(spec(workers=2, staleness=1, iterations=4), staleness_schedule=((0, 3),))
    validate_spec(s)
    run, _ = started(s)
    assert run.spec.staleness == 3
    assert run.history.events[-1].message == "staleness changed from 1 to 3 at min clock 0 (the run's schedule)"
    created = Run("run-t", s)
    created.join("a")
    restored = snapshot.restore(*snapshot.state_dict(created))
    restored.join("b")
    assert restored.state is RunState.RUNNING and restored.spec.staleness == 3


def test_a_checkpoint_holds_the_schedules_position() -> None:
    """The min clock reaches a step (4) when rank 0 is evicted; UpdateRun sets 1; rank 1 is evicted
    too, and a worker takes rank 0 back at the min clock 4 (the step's). Restored from a checkpoint
    then, the run keeps the 1 as its clocks go on (the step is not taken again over it)."""
    now = [0.0]
    s = dataclasses.replace(spec(workers=2, staleness=2, iterations=10), staleness_schedule=((4, 3),))
    run = Run("run-t", s, now=lambda: now[0])
    a, b = run.join("a"), run.join("b")
    for c in range(3):
        run.push(0, a.incarnation, c, grad(1), 0)
    for c in range(4):
        run.push(1, b.incarnation, c, grad(1), 0)
    now[0] = 10.0
    run.heartbeat(1, b.incarnation)
    assert run.expire(lease=3.0) == [0] and run.spec.staleness == 3
    run.set_staleness(1)
    now[0] = 20.0
    assert run.expire(lease=3.0) == [1]
    c = run.join("c")
    assert (c.rank, c.start_clock) == (0, 4) and run.min_clock == 4
    restored = snapshot.restore(*snapshot.state_dict(run), now=lambda: now[0])
    assert restored.next_step == 1
    restored.push(0, c.incarnation, 4, grad(1), 0)
    assert restored.min_clock == 5 and restored.spec.staleness == run.spec.staleness == 1


def test_a_one_rank_run_s_events_and_messages_count_in_the_singular() -> None:
    """(psctl status showed '1 ranks, staleness 1 (SSP)', 'all 1 ranks joined', 'completed its 1 iterations'.)"""
    now = [0.0]
    run = Run("run-t", spec(workers=1, iterations=1), now=lambda: now[0])
    assert "waiting for 1 of 1 rank to join" in run.waiting_for()
    a = run.join("a")
    run.push(0, a.incarnation, 0, grad(1), 0)
    run.leave(0, a.incarnation, "done", "")
    texts = [e.message for e in run.history.events]
    assert texts[0].startswith("1 rank, staleness 1") and "the one rank joined" in texts
    assert "rank 0 completed its 1 iteration" in texts, texts
    early = Run("run-e", spec(workers=1, iterations=2), now=lambda: now[0])
    b = early.join("b")
    early.push(0, b.incarnation, 0, grad(1), 0)
    early.leave(0, b.incarnation, "done", "")
    assert "left done with 1 iteration left" in early.history.events[-1].message, early.history.events[-1]
    lost = Run("run-l", spec(workers=2, staleness=-1, iterations=1), now=lambda: now[0])
    c, _ = lost.join("c"), lost.join("d")
    now[0] = 5.0
    lost.heartbeat(0, c.incarnation)
    assert lost.expire(lease=3.0) == [1]
    lost.push(0, c.incarnation, 0, grad(1), 0)
    lost.leave(0, c.incarnation, "done", "")
    assert lost.message.endswith("left vacant: 1 iteration dropped"), lost.message
