"""A cluster of two ps-server processes loses one of them (kill -9) mid-run; restarted on its data
dir, every shard goes back to the newest cut both have, and the run completes exactly once.

BSP with plain SGD makes "exactly once" checkable to the bit: a worker's batch depends only on its
rank and clock, so a run that went back to a cut and replayed the clocks after it must end with the
parameters of the run without the fault (``bsp_reference``). Under SSP the trajectory depends on
timing, so the test counts instead: every shard applied each rank's push of each clock once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from procs import ENV, bsp_reference, connect, finish, free_port, ps_server, ps_workers, record, watch_until

from client.spec import LaunchOptions, build_run_spec
from paramserver.shards import pull_run
from paramserver.v1 import paramserver_pb2 as pb
from ps_server.core.checkpoint import CheckpointStore

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


async def _common_cut(data_dirs: Path, run_id: str, at_least: int, timeout: float = 20) -> int:
    """The newest cut of ``run_id`` on both servers' disks (``data_dirs``/0 and /1), once one is
    ``at_least`` or more. Checkpoints are written in the background: under load, a cut lands well
    after the run's min clock passed it (a kill before went back to the run's creation)."""
    found: list[list[int]] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                found = [CheckpointStore(data_dirs / str(i)).cuts(run_id) for i in range(2)]
                if (common := set(found[0]) & set(found[1])) and max(common) >= at_least:
                    return max(common)
                await asyncio.sleep(0.05)
    raise AssertionError(f"no cut of {at_least} or more on both servers after {timeout} s: their cuts {found}")


@pytest.mark.parametrize(("victim", "staleness", "how", "every"),
                         [(1, 0, "kill", 5), (0, 0, "kill", 5), (1, 2, "kill", 5), (1, 0, "sigterm", 5),
                          (0, 0, "sigterm", 5), (0, 0, "kill", 1000)],
                         ids=["shard-bsp", "owner-bsp", "shard-ssp", "shard-bsp-sigterm", "owner-bsp-sigterm",
                              "owner-bsp-before-a-cut"])
async def test_a_server_killed_mid_run_and_restarted_loses_no_update_and_applies_none_twice(
        tmp_path: Path, victim: int, staleness: int, how: str, every: int) -> None:
    """kill -9: every server goes back to the newest common cut (steps lost, reported); SIGTERM:
    the server's last checkpoint holds all it acknowledged, and the run goes on where it stopped.
    Killed before its first periodic cut, the run goes back to the one taken at its creation,
    before any worker joined: its ``--once`` workers join it again."""
    workers, iterations = 3, 60
    ports = [free_port() for _ in range(2)]
    addresses = ",".join(f"127.0.0.1:{p}" for p in ports)

    def args(i: int) -> tuple[str, ...]:
        return ("--port", str(ports[i]), "--cluster", addresses, "--index", str(i), "--data-dir", str(tmp_path / str(i)),
                "--checkpoint-every", str(every), "--split-bytes", "4096", "--lease-seconds", "30",
                "--shard-timeout", "60")

    spec = build_run_spec(LaunchOptions(model="mlp:32", dataset="digits", workers=workers, staleness=staleness,
                                        iterations=iterations, batch_size=32, seed=3, lr=0.1))
    owner = f"127.0.0.1:{ports[0]}"
    with ExitStack() as stack:
        servers = [stack.enter_context(ps_server(*args(i))) for i in range(2)]
        async with connect(owner) as c:
            run = await c.create_run(spec)
            split = {pc.name for s in run.shard_map.shards[1:] for pc in s.pieces} & \
                {pc.name for pc in run.shard_map.shards[0].pieces}
            assert split, "the test needs a tensor split over both servers"
            init = (await pull_run(c, run.run_id)).tensors
        procs = stack.enter_context(ps_workers(owner, workers, "--timeout-seconds", "15", "--log-level", "INFO"))
        held = how == "kill" and every < 23  # (a kill -9 goes back to a periodic cut: both servers must have one)
        async with connect(owner) as c:
            before = await watch_until(c, run.run_id, lambda r: r.min_clock >= 23, timeout=120)
            if held:  # the workers held still until it is on both disks, so that the run cannot end first
                for p in procs:
                    p.send_signal(signal.SIGSTOP)
                await _common_cut(tmp_path, run.run_id, at_least=every)
                before = await c.get_run(run.run_id)
        proc, _ = servers[victim]
        if how == "kill":
            proc.kill()
        else:
            proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        for p in procs if held else ():
            p.send_signal(signal.SIGCONT)
        t_kill = time.monotonic()
        time.sleep(1.0)  # the others go on: workers retry, parked on the dead server
        stack.enter_context(ps_server(*args(victim)))
        async with connect(owner) as c:
            events: list[pb.RunEvent] = []
            async with asyncio.timeout(60):
                while how == "kill" and not (events := [e for e in (await c.get_metrics(run.run_id)).events
                                                        if e.kind == "rolled_back"]):
                    await asyncio.sleep(0.2)
            t_back = time.monotonic()
            final = await finish(c, run.run_id, timeout=200)
            params = (await pull_run(c, run.run_id)).tensors
            metrics = await c.get_metrics(run.run_id)
            async with asyncio.timeout(10):  # server 0 asks every server for its shard's status each second
                while (shards := (await c.get_run(run.run_id)).shards)[1].state != pb.RUN_STATE_COMPLETED:
                    await asyncio.sleep(0.2)
        codes = [p.wait(60) for p in procs]

    assert final.state == pb.RUN_STATE_COMPLETED, final.message
    assert codes == [0] * workers
    if how == "kill":
        (event,) = events
        assert f"server {victim} " in event.message and "restarted" in event.message
        cut = int(re.search(r"cut (\d+)", event.message).group(1))  # type: ignore[union-attr]
        lost = int(re.search(r"(\d+) steps? lost", event.message).group(1))  # type: ignore[union-attr]
        assert cut % every == 0 and (0 < cut if every < 23 else cut == 0) and cut <= before.max_clock
    else:  # nothing to go back for
        assert not [e for e in metrics.events if e.kind == "rolled_back"]
        cut, lost = before.min_clock, 0
    assert [s.min_clock for s in shards] == [iterations, iterations]
    assert [s.pushes_applied for s in shards] == [workers * iterations] * 2  # each push once, per shard
    assert all(w.clock == iterations for w in final.workers)
    if staleness == 0:
        expected = bsp_reference(spec, init)
        for name, value in expected.items():
            np.testing.assert_array_equal(params[name], value, err_msg=name)
    record(f"cluster-{how}-server-{victim}-s{staleness}", killed_at_min_clock=before.min_clock, cut=cut,
           steps_lost=lost, recovery_seconds=round(t_back - t_kill, 2),
           final_accuracy=round(final.last_eval.eval_accuracy, 4))


async def test_workers_killed_again_and_again_never_hang_a_sharded_run() -> None:
    """kill -9 of a worker, six times, at whatever point of its iteration (in the middle of a push
    to both servers, some of the time): each is evicted within its lease on every server, a new
    worker takes its rank, and the BSP run completes; a push torn between the servers is told in
    the run's events, never waited for."""
    ports = [free_port() for _ in range(2)]
    addresses = ",".join(f"127.0.0.1:{p}" for p in ports)
    args = ("--cluster", addresses, "--split-bytes", "4096", "--lease-seconds", "1.5", "--heartbeat-seconds", "0.3")
    spec = build_run_spec(LaunchOptions(model="mlp:32", dataset="digits", workers=3, staleness=0, iterations=300,
                                        batch_size=32, seed=5, lr=0.1))
    owner, kills = f"127.0.0.1:{ports[0]}", 6
    rng = random.Random(7)
    with ExitStack() as stack:
        for i in range(2):
            stack.enter_context(ps_server("--port", str(ports[i]), "--index", str(i), *args))
        async with connect(owner) as c:
            run = await c.create_run(spec)
            procs = list(stack.enter_context(ps_workers(owner, 3, "--timeout-seconds", "15")))
            for _ in range(kills):
                status = await watch_until(c, run.run_id, lambda r: r.min_clock >= 10 and all(
                    w.state == pb.WORKER_STATE_ACTIVE for w in r.workers), timeout=90)
                await asyncio.sleep(rng.uniform(0, 0.3))
                rank = rng.randrange(3)
                victim = status.workers[rank].worker_name
                next(p for p in procs if p.pid == int(victim.rsplit(":", 1)[1])).kill()
                procs += stack.enter_context(ps_workers(owner, 1, "--timeout-seconds", "15"))
                await watch_until(c, run.run_id, lambda r, rank=rank, victim=victim: r.workers[rank].worker_name
                                  not in ("", victim), timeout=30)  # evicted, and taken by the new worker
            final = await finish(c, run.run_id, timeout=120)
            async with asyncio.timeout(10):  # server 0 asks every server for its shard's status each second
                while (shards := (await c.get_run(run.run_id)).shards)[1].state != pb.RUN_STATE_COMPLETED:
                    await asyncio.sleep(0.2)
            torn = [e for e in (await c.get_metrics(run.run_id)).events if e.kind == "torn_push"]
    assert final.state == pb.RUN_STATE_COMPLETED, final.message
    assert final.counters.evictions == kills, final.counters
    assert [s.min_clock for s in shards] == [spec.iterations] * 2
    record("cluster-workers-kill-9", kills=kills, torn_pushes=len(torn),
           final_accuracy=round(final.last_eval.eval_accuracy, 4))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["tcp", "grpc"])
async def test_a_worker_whose_message_limit_is_too_small_gives_its_rank_back_and_the_run_goes_on(
        transport: str) -> None:
    """One worker's --max-message-bytes is smaller than its pulls' answers: that worker says so and
    exits 1, giving its rank back; the run and the other ranks go on to the end (it failed them all)."""
    ports = [free_port() for _ in range(2)]
    addresses = ",".join(f"127.0.0.1:{p}" for p in ports)
    spec = build_run_spec(LaunchOptions(model="mlp:4096,256", dataset="digits", workers=3, staleness=1,
                                        iterations=15, batch_size=32, seed=3, lr=0.1))  # 1.1 MB per shard
    planes = ("--no-shm",) if transport == "tcp" else ("--no-shm", "--no-data-plane")
    owner = f"127.0.0.1:{ports[0]}"
    with ExitStack() as stack:
        for i in range(2):
            stack.enter_context(ps_server("--port", str(ports[i]), "--cluster", addresses, "--index", str(i),
                                          "--split-bytes", "4096"))
        async with connect(owner) as c:
            run = await c.create_run(spec)
            good = stack.enter_context(ps_workers(owner, 2, "--timeout-seconds", "15", *planes))
            await watch_until(c, run.run_id, lambda r: r.active_workers == 2, timeout=30)
            bad = subprocess.Popen([sys.executable, "-m", "worker.main", "--server", owner, "--once",
                                    "--timeout-seconds", "15", "--max-message-bytes", str(1 << 20), *planes],
                                   env=ENV, text=True, stderr=subprocess.PIPE)
            try:
                _, err = bad.communicate(timeout=60)
            finally:
                if bad.poll() is None:
                    bad.kill()
                    bad.wait()
            final = await finish(c, run.run_id, timeout=90)
        codes = [p.wait(60) for p in good]
    assert final.state == pb.RUN_STATE_COMPLETED, final.message
    assert codes == [0, 0]
    assert bad.returncode == 1
    assert "--max-message-bytes" in err and "gave rank 2 back" in err, err
    assert final.workers[2].state == pb.WORKER_STATE_EVICTED
