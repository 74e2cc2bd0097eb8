"""A worker dies (kill -9) or freezes past its lease (SIGSTOP): the run neither hangs nor loses updates."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from procs import ENV, connect, finish, ps_server, ps_workers, record, watch_until

from client.spec import LaunchOptions, build_run_spec
from paramserver.v1 import paramserver_pb2 as pb

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

LEASE = 2.0
SERVER_ARGS = ("--port", "0", "--lease-seconds", str(LEASE), "--heartbeat-seconds", "0.5")


async def _clock_of(c, run_id: str, rank: int) -> int:  # type: ignore[no-untyped-def]
    return (await c.get_run(run_id)).workers[rank].clock


async def test_kill_9_one_worker_the_others_unblock_within_the_lease() -> None:
    spec = build_run_spec(LaunchOptions(model="mlp:64", dataset="digits", workers=4, staleness=2, epochs=12, seed=2))
    with ps_server(*SERVER_ARGS) as (_, addr), ps_workers(addr, 4) as workers:
        async with connect(addr) as c:
            run = await c.create_run(spec)
            await watch_until(c, run.run_id, lambda r: r.min_clock >= 20)
            # find the process holding rank 3 by its name (host:pid)
            status = await c.get_run(run.run_id)
            victim_pid = int(status.workers[3].worker_name.rsplit(":", 1)[1])
            victim = next(w for w in workers if w.pid == victim_pid)
            victim.kill()
            t_kill = time.monotonic()
            frozen = (await c.get_run(run.run_id)).workers[3].clock  # final: its process is gone
            # the others go past the dead rank's clock + s: they were unblocked
            async with asyncio.timeout(LEASE + 10):
                async for snap in c.watch_run(run.run_id, interval=0.05):
                    if snap.run.min_clock > frozen + 2 or any(
                            w.clock > frozen + spec.staleness + 1 for w in snap.run.workers[:3]):
                        break
            unblocked = time.monotonic() - t_kill
            final = await finish(c, run.run_id)
    assert final.state == pb.RUN_STATE_COMPLETED, final.message
    assert final.workers[3].state == pb.WORKER_STATE_EVICTED
    assert final.counters.evictions == 1
    assert unblocked <= LEASE + 1.0 + 1.0, f"others were blocked {unblocked:.2f}s"  # lease + sweep + 1 s
    assert final.last_eval.eval_accuracy >= 0.95, final.last_eval
    record("worker-kill-9", lease_seconds=LEASE, unblocked_after_seconds=round(unblocked, 2),
           final_accuracy=round(final.last_eval.eval_accuracy, 4))


async def test_sigstop_past_the_lease_then_sigcont_rejoins() -> None:
    # long enough to outlast the freeze; stopped once the frozen worker trains again
    spec = build_run_spec(LaunchOptions(model="mlp:32", dataset="digits", workers=3, staleness=1, epochs=2000, seed=3))
    with ps_server(*SERVER_ARGS) as (_, addr), ps_workers(addr, 2) as workers:
        # the third worker loops (no --once) so that it can come back after its eviction
        frozen = subprocess.Popen([sys.executable, "-m", "worker.main", "--server", addr, "--log-level", "WARNING",
                                   "--idle-exit-seconds", "5"], env=ENV)
        try:
            async with connect(addr) as c:
                run = await c.create_run(spec)
                await watch_until(c, run.run_id, lambda r: r.min_clock >= 10)
                status = await c.get_run(run.run_id)
                rank = next(w.rank for w in status.workers if w.worker_name.endswith(f":{frozen.pid}"))
                old_incarnation = status.workers[rank].incarnation
                os.kill(frozen.pid, signal.SIGSTOP)
                evicted = await watch_until(c, run.run_id, lambda r: r.workers[rank].state == pb.WORKER_STATE_EVICTED,
                                            timeout=LEASE + 10)
                assert evicted.counters.evictions == 1
                os.kill(frozen.pid, signal.SIGCONT)
                async with asyncio.timeout(60):  # it comes back as a new incarnation and trains again
                    async for snap in c.watch_run(run.run_id, interval=0.05):
                        w = snap.run.workers[rank]
                        if w.incarnation > old_incarnation and w.pushes >= evicted.workers[rank].pushes + 5:
                            break
                await c.stop_run(run.run_id, "test over")
                final = await finish(c, run.run_id)
                events = (await c.get_metrics(run.run_id)).events
            assert frozen.wait(30) == 0
        finally:
            if frozen.poll() is None:
                os.kill(frozen.pid, signal.SIGCONT)
                frozen.kill()
            frozen.wait()
        assert [w.wait(30) for w in workers] == [0, 0]
    assert final.state == pb.RUN_STATE_STOPPED, final.message
    # evicted, then its old incarnation was refused (push, pull or heartbeat), it rejoined and trained
    assert any(e.kind == "evicted" and e.rank == rank for e in events)
    rejoined = [e for e in events if e.kind == "joined" and e.rank == rank]
    assert len(rejoined) >= 2, [e.message for e in events]
    assert final.workers[rank].incarnation > old_incarnation
    record("worker-sigstop", lease_seconds=LEASE, rejected_pushes=final.counters.pushes_rejected,
           incarnations=[old_incarnation, final.workers[rank].incarnation])


def _pid_of(run: pb.Run, rank: int) -> int:
    return int(run.workers[rank].worker_name.rsplit(":", 1)[1])


@pytest.mark.parametrize("staleness", [0, 2])
async def test_kill_9_at_a_random_point_then_a_new_worker_takes_the_rank_where_the_run_is(staleness: int) -> None:
    """A worker killed at a random clock and a worker started again: the new one takes the rank at
    the run's min clock (its shard, from that clock's batch on: a rank's batches are a function of
    the clock), the run completes its iterations, every rank's clock at the end, and the final
    evaluation is of the final parameters."""
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    spec = build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=3, staleness=staleness,
                                        batch_size=16, epochs=4, seed=4))
    rank, at = rng.randrange(3), rng.randrange(5, spec.iterations // 2)
    why = f"seed {seed}: rank {rank} killed at clock {at} of {spec.iterations}"
    with ps_server(*SERVER_ARGS) as (_, addr), ps_workers(addr, 3, "--step-seconds", "0.02") as workers:
        async with connect(addr) as c:
            run = await c.create_run(spec)
            status = await watch_until(c, run.run_id, lambda r: len(r.workers) == 3 and r.workers[rank].clock >= at)
            old = status.workers[rank].incarnation
            next(w for w in workers if w.pid == _pid_of(status, rank)).kill()
            killed = (await c.get_run(run.run_id)).workers[rank].clock  # final: its process is gone
            workers.append(subprocess.Popen([sys.executable, "-m", "worker.main", "--server", addr, "--once",
                                             "--log-level", "WARNING", "--step-seconds", "0.02"], env=ENV))
            final = await finish(c, run.run_id)
            metrics = await c.get_metrics(run.run_id)
        assert workers[-1].wait(30) == 0, why
    assert final.state == pb.RUN_STATE_COMPLETED and final.message == "all ranks finished", (why, final.message)
    assert [(w.clock, w.state) for w in final.workers] == [(spec.iterations, pb.WORKER_STATE_DONE)] * 3, why
    assert final.workers[rank].incarnation > old, why
    took = [e for e in metrics.events if e.kind == "joined" and e.rank == rank][-1]
    start = int(took.message.rsplit("clock ", 1)[1].rstrip(")"))
    assert killed <= start <= final.min_clock, (why, took.message)
    # the new incarnation's points go on from where it took the rank, each clock once
    clocks = [p.clock for p in metrics.points if p.rank == rank and not p.eval and p.clock > start]
    assert clocks == sorted(set(clocks)) and clocks[-1] == spec.iterations, (why, clocks)
    evals = [p.clock for p in metrics.points if p.eval]
    assert evals == sorted(set(evals)), (why, evals)  # each clock evaluated once (a rank 0 taken over again evaluates)
    assert evals[-1] == final.last_eval.clock == spec.iterations, (why, evals)
    assert final.last_eval.eval_accuracy >= 0.85, (why, final.last_eval)


async def test_kill_9_of_rank_0_waiting_for_the_final_parameters_the_run_says_they_were_not_evaluated() -> None:
    """Rank 0 evaluates the final parameters, then leaves: killed after its last push, while it
    waits for the others to finish theirs, nobody evaluates them. The run completes (rank 0 has
    nothing left to train) and says so: its last evaluation is an earlier one (it said "all ranks
    finished", and psctl showed that earlier accuracy as the final one)."""
    spec = build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=3, staleness=-1, batch_size=16,
                                        epochs=4, seed=5, slowdown=[(2, 6.0)]))
    with ps_server(*SERVER_ARGS) as (_, addr), ps_workers(addr, 3, "--step-seconds", "0.02") as workers:
        async with connect(addr) as c:
            run = await c.create_run(spec)
            status = await watch_until(c, run.run_id, lambda r: len(r.workers) == 3
                                       and r.workers[0].clock == spec.iterations)
            assert status.workers[2].clock < spec.iterations  # rank 0 waits for rank 2
            next(w for w in workers if w.pid == _pid_of(status, 0)).kill()
            final = await finish(c, run.run_id)
    assert final.state == pb.RUN_STATE_COMPLETED, final.message
    assert final.last_eval.clock < spec.iterations
    assert final.message == (f"all ranks finished; the final parameters were not evaluated (rank 0 did not leave): "
                             f"the last evaluation is of clock {final.last_eval.clock}"), final.message
