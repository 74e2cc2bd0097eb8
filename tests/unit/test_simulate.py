"""psctl simulate's model: virtual time, the replay through the server's own Run against a
closed-form SSP recursion, the trace recovered from clock records, and its errors."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from client import render
from client.cli import parse_bounds
from client.simulate import processes_for, replay, report, simulate, simulate_all
from client.trace import Record, Trace
from client.virtual_time import RESOLUTION, Deadlock, run_virtual

pytestmark = pytest.mark.timeout(120)

BOUNDS = (0, 1, 2, 3, -1)


# ------------------------------------------------------------------------------ the oracle
def oracle(work: np.ndarray, latency: np.ndarray, start: np.ndarray, s: int,
           wake: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The SSP schedule in closed form: (push times Q, pull times P, seconds each rank waited).
    Q[r][c] = P[r][c] + work[r][c] with P[r][c] = max(ready, A(c - s - 1)), ready = Q[r][c-1] +
    latency[r][c] (clock 0: start[r]), A(k) = max_r Q[r][k] (every rank completed k; no constraint
    for k < 0 or s unbounded); a pull that had to wait (A later than ready, by more than virtual
    time's resolution) is served wake[r] after A."""
    ranks, clocks = work.shape
    wake = np.zeros(ranks) if wake is None else wake
    q, p, waited = np.zeros((ranks, clocks)), np.zeros((ranks, clocks)), np.zeros(ranks)
    for c in range(clocks):
        k = c - s - 1
        everyone_done = q[:, k].max() if s >= 0 and k >= 0 else -math.inf
        for r in range(ranks):
            ready = start[r] if c == 0 else q[r, c - 1] + latency[r, c]
            p[r, c] = ready if everyone_done <= ready + RESOLUTION else everyone_done + wake[r]
            waited[r] += p[r, c] - ready
            q[r, c] = p[r, c] + work[r, c]
    return q, p, waited


def trace_of(work: np.ndarray, latency: np.ndarray, start: np.ndarray, wake: np.ndarray | None = None) -> Trace:
    ranks = work.shape[0]
    return Trace(ranks=ranks, clocks=work.shape[1], first=0, staleness=0, work=work, latency=latency,
                 wake=np.zeros(ranks) if wake is None else wake, start=start, total=1.0, waited=np.zeros(ranks))


def records_of(work: np.ndarray, latency: np.ndarray, start: np.ndarray, s: int, skipped: np.ndarray,
               wake: np.ndarray | None = None, t0: float = 1000.0) -> tuple[list[Record], np.ndarray, np.ndarray]:
    """The clock records a server would have kept of the oracle's schedule under ``s`` (oldest
    first; no pull record where ``skipped``): the records, Q and the waits."""
    q, p, waited = oracle(work, latency, start, s, wake)
    records: list[Record] = []
    for r in range(work.shape[0]):
        for c in range(work.shape[1]):
            if not skipped[r, c]:
                records.append(("pull", r, c, t0 + p[r, c]))
            records.append(("push", r, c, t0 + q[r, c]))
    records.sort(key=lambda rec: rec[3])
    return records, q, waited


@st.composite
def schedules(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    ranks, clocks = draw(st.integers(2, 5)), draw(st.integers(2, 12))
    seconds = st.floats(0.001, 1.0, allow_nan=False)
    work = np.array(draw(st.lists(seconds, min_size=ranks * clocks, max_size=ranks * clocks))).reshape(ranks, clocks)
    gaps = st.floats(0.0, 0.2, allow_nan=False)
    latency = np.array(draw(st.lists(gaps, min_size=ranks * clocks, max_size=ranks * clocks))).reshape(ranks, clocks)
    start = np.array(draw(st.lists(st.floats(0.0, 0.5), min_size=ranks, max_size=ranks)))
    wake = np.array(draw(st.lists(st.floats(0.0, 0.05), min_size=ranks, max_size=ranks)))
    return work, latency, start - start.min(), wake


# ------------------------------------------------------------------------------ virtual time
def test_sleeps_and_timeouts_take_virtual_time_only() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        seen: list[tuple[str, float]] = []

        async def sleeper() -> None:
            await asyncio.sleep(3600.25)
            seen.append(("slept", loop.time()))

        async def waiter() -> None:
            try:
                async with asyncio.timeout(7.5):  # what the gate bounds its waits with
                    await asyncio.Event().wait()
            except TimeoutError:
                seen.append(("timed out", loop.time()))

        await asyncio.gather(sleeper(), waiter(), asyncio.sleep(0))
        return seen

    began = time.perf_counter()
    first = run_virtual(main())
    assert first == [("timed out", 7.5), ("slept", 3600.25)]
    assert time.perf_counter() - began < 1.0  # an hour of virtual time, at once
    assert run_virtual(main()) == first  # deterministic


def test_a_deadlock_is_raised_not_waited_for() -> None:
    async def main() -> None:
        await asyncio.Event().wait()

    with pytest.raises(Deadlock, match="no timer is due"):
        run_virtual(main())


async def test_virtual_time_refuses_to_run_inside_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="asyncio.to_thread"):
        run_virtual(asyncio.sleep(1))


# ------------------------------------------------------------------------------ the replay
@settings(max_examples=60, deadline=None)
@given(schedules())
def test_the_replay_through_the_run_is_the_ssp_recursion(
        schedule: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> None:
    work, latency, start, wake = schedule
    trace = trace_of(work, latency, start, wake)
    for s in BOUNDS:
        predicted = simulate(trace, s)
        q, _, waited = oracle(work, latency, start, s, wake)
        scale = q.max()
        np.testing.assert_allclose(predicted.push_times, q, rtol=0, atol=1e-9 * scale + 1e-8, err_msg=f"s={s}")
        np.testing.assert_allclose(predicted.parked, waited, rtol=0, atol=1e-9 * scale + 1e-8, err_msg=f"s={s}")
        assert predicted.total == pytest.approx(q[:, -1].max(), rel=1e-9)
        np.testing.assert_allclose(predicted.idle, waited / predicted.total, atol=1e-8)
        assert predicted.throughput == pytest.approx(work.size / predicted.total)
        if s == -1:
            assert not predicted.parked.any()


@pytest.mark.parametrize("s", BOUNDS)
def test_ranks_that_finish_together_do_not_wait_for_each_other(s: int) -> None:
    """Ties, up to float rounding: the gate opens as the pull arrives (0.1 + 0.2 > 0.3 by an ulp);
    the pull is not parked and pays no wake-up."""
    work = np.array([[0.1, 0.5, 0.5], [0.3, 0.5, 0.5]])
    latency = np.array([[0.0, 0.2, 0.0], [0.0, 0.0, 0.0]])
    predicted = simulate(trace_of(work, latency, np.zeros(2), wake=np.full(2, 0.5)), s)
    np.testing.assert_allclose(predicted.push_times, [[0.1, 0.8, 1.3], [0.3, 0.8, 1.3]], atol=1e-9)
    assert predicted.parked.tolist() == [0.0, 0.0]


def test_looser_bounds_are_never_slower_and_a_straggler_idles_the_others() -> None:
    rng = np.random.default_rng(3)
    work = rng.uniform(0.01, 0.02, (4, 40))
    work[2] *= 3  # rank 2 is a straggler
    trace = trace_of(work, np.full(work.shape, 0.001), np.zeros(4))
    by_s = {s: simulate(trace, s) for s in (0, 1, 4, -1)}
    times = [by_s[s].total for s in (0, 1, 4, -1)]
    assert times == sorted(times, reverse=True)
    assert int(np.argmin(by_s[0].idle)) == 2 and by_s[0].idle[2] == 0.0 and by_s[0].idle.mean() > 0.4
    assert by_s[-1].idle.max() == 0.0


@pytest.mark.parametrize("s", BOUNDS)
def test_the_simulated_run_kept_the_staleness_bound(s: int) -> None:
    """The server's own evidence, its clock records: no pull served or push accepted beyond the bound."""
    rng = np.random.default_rng(s + 10)
    work = rng.uniform(0.001, 1.0, (4, 15))
    work[0] *= 4
    prediction, run = replay(trace_of(work, rng.uniform(0, 0.1, work.shape), np.zeros(4)), s)
    records = list(run.history.clock_records)
    assert sum(r.kind == "push" for r in records) == sum(r.kind == "pull" for r in records) == work.size
    assert run.counters.pushes_applied == work.size and run.min_clock == 15
    if s >= 0:
        assert all(r.clock - r.min_clock <= s for r in records), [r for r in records if r.clock - r.min_clock > s]
        assert max(r.clock - r.min_clock for r in records if r.kind == "pull") == s  # the straggler held them
    assert run.counters.parked_seconds == pytest.approx(float(prediction.parked.sum()), abs=1e-6)


# ------------------------------------------------------------------------------ from records
@settings(max_examples=40, deadline=None)
@given(schedules(), st.sampled_from(BOUNDS), st.floats(0.0, 0.2), st.randoms(use_true_random=False))
def test_a_trace_recovers_work_latency_and_waits_from_records(
        schedule: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], s: int, gap: float, rnd: object) -> None:
    work, _, start, wakes = schedule
    wake = np.full(len(start), wakes[0])  # (one for all: a rank whose pulls never waited takes the others')
    ranks, clocks = work.shape
    # Every pull takes ``gap`` (pulls that waited hide theirs: the others' is what they are taken
    # as). A worker skips a pull only when its cache is fresh enough (the pull would not wait),
    # never clock 0 or 1 (then each rank has a pull that could not have waited), nor under BSP.
    latency, skipped = np.full(work.shape, gap), np.zeros(work.shape, bool)
    q = np.zeros(work.shape)
    for c in range(clocks):
        done = q[:, c - s - 1].max() if s >= 0 and c - s - 1 >= 0 else -math.inf
        for r in range(ranks):
            if s and c >= 2 and done <= q[r, c - 1] and rnd.random() < 0.4:  # type: ignore[attr-defined]
                skipped[r, c], latency[r, c] = True, 0.0
            ready = start[r] if c == 0 else q[r, c - 1] + latency[r, c]
            q[r, c] = (ready if done <= ready + RESOLUTION else done + wake[r]) + work[r, c]
    records, q, waited = records_of(work, latency, start, s, skipped, wake)
    trace = Trace.from_records(records, ranks, clocks, s)
    assert (trace.first, trace.clocks, trace.notes) == (0, clocks, ())
    np.testing.assert_allclose(trace.work, work, atol=1e-9)
    np.testing.assert_allclose(trace.start, start, atol=1e-9)
    np.testing.assert_allclose(trace.waited, waited, atol=1e-9)
    np.testing.assert_allclose(trace.latency[:, 1:], latency[:, 1:], atol=1e-9)
    if waited.any():  # some pull was parked: the wake-up shows
        np.testing.assert_allclose(trace.wake, wake, atol=1e-9)
    assert trace.total == pytest.approx(q[:, -1].max(), abs=1e-9)
    assert simulate(trace, s).per_clock == pytest.approx(trace.per_clock, rel=1e-9)  # the replay is the run


def test_truncated_records_start_at_the_first_clock_every_rank_has() -> None:
    rng = np.random.default_rng(5)
    work = rng.uniform(0.01, 0.05, (3, 30))
    latency = np.full(work.shape, 0.002)
    records, q, _ = records_of(work, latency, np.zeros(3), 2, np.zeros(work.shape, bool))
    kept = records[40:]  # the server dropped the oldest
    trace = Trace.from_records(kept, 3, 30, 2)
    first = trace.first
    assert first > 0 and trace.clocks == 30 - first and "records start at clock" in trace.notes[0]
    assert all(any(rec[1:3] == (r, first) and rec[0] == "push" for rec in kept) for r in range(3))
    np.testing.assert_allclose(trace.work[:, 1:], work[:, first + 1:], atol=1e-9)
    assert simulate(trace, 2).per_clock == pytest.approx(trace.per_clock, rel=0.05)


def test_a_run_still_going_is_replayed_up_to_the_clock_every_rank_pushed() -> None:
    work = np.full((2, 6), 0.01)
    work[1] *= 2
    records, _, _ = records_of(work, np.zeros(work.shape), np.zeros(2), -1, np.zeros(work.shape, bool))
    records = [rec for rec in records if not (rec[1] == 1 and rec[2] >= 4)]  # rank 1 is at clock 4
    trace = Trace.from_records(records, 2, 6, -1)
    assert trace.clocks == 4 and any("up to clock 3" in n for n in trace.notes)
    # In the 0.08 s rank 1 took for clocks 0..3, rank 0 pushed all 6 of its clocks: 10 pushes, not 8.
    assert trace.total == pytest.approx(0.08) and trace.pushes == 10
    doc = report(trace, -1, [], simulate(trace, -1))
    assert doc["recorded"]["pushes_per_second"] == pytest.approx(10 / 0.08)
    assert doc["replay"]["pushes_per_second"] == pytest.approx(8 / 0.08)  # the replay stops at clock 3
    assert any("after 3 too (2 pushes)" in n for n in doc["notes"])
    together = Trace.from_records([rec for rec in records if rec[2] < 4], 2, 6, -1)
    assert together.pushes == 8 and not any("after" in n for n in together.notes)


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(("records", "message"), [
    ([], "no push records yet"),
    ([("pull", 0, 0, 0.0)], "no push records yet"),
    ([("push", 0, 0, 1.0), ("push", 0, 1, 2.0)], r"ranks \[1\] have no push records"),
    ([("push", 0, 0, 1.0), ("push", 1, 0, 1.5)], "only 1 clock pushed by every rank"),
    ([("push", 3, 0, 1.0)], "rank 3: the run has ranks 0..1"),
    ([("pop", 0, 0, 1.0)], "kind 'pop'"),
    ([("push", r, c, 5.0) for r in range(2) for c in range(2)], "span no time"),
])
def test_records_that_cannot_be_replayed_say_why(records: list[Record], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Trace.from_records(records, 2, 10, 1)


@pytest.mark.parametrize(("text", "message"), [
    ("0,,1", "a comma-separated list"), ("1,banana", "'banana': use 0 or bsp"), ("-1", "cannot be negative"),
])
def test_bad_bounds_say_what_to_write(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_bounds(text)
    assert parse_bounds("bsp, 1,4,inf,1") == [0, 1, 4, -1]


# ------------------------------------------------------------------------------ output
def test_processes_give_the_same_predictions() -> None:
    rng = np.random.default_rng(8)
    trace = trace_of(rng.uniform(0.01, 0.02, (3, 20)), np.zeros((3, 20)), np.zeros(3))
    assert processes_for(trace, [0, -1]) == 1  # too small to be worth a process
    apart = simulate_all(trace, [0, -1], processes=2)
    assert [p.staleness for p in apart] == [0, -1]
    for together, alone in zip(apart, simulate_all(trace, [0, -1], processes=1), strict=True):
        np.testing.assert_array_equal(together.push_times, alone.push_times)


def test_the_table_and_the_figure(tmp_path: Path) -> None:
    from client.plots import save_simulation

    work = np.full((3, 10), 0.01)
    work[0] *= 2
    records, _, _ = records_of(work, np.full(work.shape, 0.001), np.zeros(3), 1, np.zeros(work.shape, bool))
    trace = Trace.from_records(records, 3, 10, 1)
    predictions = simulate_all(trace, [0, 1, -1])
    doc = {"run_id": "run-x", **report(trace, 1, predictions, predictions[1], bound_changed=True)}
    assert abs(doc["replay"]["error"]) < 1e-9 and doc["recorded"]["staleness"] == 1
    assert [f["staleness"] for f in doc["predictions"]] == [0, 1, -1] and len(doc["predictions"][0]["idle_share"]) == 3
    out = Console(width=200, record=True)
    out.print(render.simulation_view(doc))
    text = out.export_text()
    assert "recorded, 1" in text and "replay of 1" in text and "inf" in text and "bound changed" in text
    with (tmp_path / "s.png").open("wb") as fh:
        save_simulation(doc, fh, "png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
