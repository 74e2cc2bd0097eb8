"""The worker contract, checked from the server's side, for every worker implementation.

Each test starts a real ps-server (port 0, or a fixed free port when it restarts the server) and
worker processes of the implementation under test (``impl``), then reads what the server
recorded: run state and message, per-rank pushes, clocks and states, counters, clock records,
metrics and events. Nothing here looks inside a worker.

Tests that take ``topology`` run on one server and on a cluster of two servers holding each run in
two shards (conftest.py): the same checks, and where the answer differs on a cluster, the
cluster's (counters and clock records are server 0's, whose shard sees every push as the other
does). The others say with ``one_server`` why a cluster would add nothing to them.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from procs import free_port, free_ports, started_with

from paramserver.client import PsClient
from paramserver.v1 import paramserver_pb2 as pb
from worker.datasets import load_dataset
from worker.models import build_model
from worker.sampling import BatchSampler, shard_indices

from .conftest import (
    Impl,
    Topology,
    connect,
    finish,
    ps_server,
    pull_all,
    run_spec,
    split_tensors,
    wait_until,
)
from .proxy import FaultProxy

pytestmark = pytest.mark.timeout(120)

COMPLETED = pb.RUN_STATE_COMPLETED


def kinds(events: list[pb.RunEvent], rank: int | None = None) -> list[str]:
    return [e.kind for e in events if rank is None or e.rank == rank]


async def wait_for_event(c: PsClient, run_id: str, kind: str, timeout: float, logs: Callable[[], str]) -> pb.RunEvent:
    """The run's first event of ``kind``, once the server has it."""
    events: list[pb.RunEvent] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                events = list((await c.get_metrics(run_id)).events)
                found = [e for e in events if e.kind == kind]
                if found:
                    return found[0]
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"no {kind!r} event within {timeout}s: {kinds(events)}\n{logs()}") from None


async def test_joins_and_completes_a_run(impl: Impl, topology: Topology) -> None:
    """Join, SSP loop with the cache, metrics, rank-0 eval on the final parameters, Leave DONE."""
    iterations = 40
    spec = run_spec(workers=2, staleness=2, iterations=iterations, eval_every=10)
    with topology.start() as srv:
        async with connect(srv.address) as c:
            run = await c.create_run(spec)
            workers = impl.start_many(srv.address, 2)
            final = await finish(c, run.run_id, logs=impl.logs)
            metrics = await c.get_metrics(run.run_id)
        codes = [w.wait(20) for w in workers]
    assert final.state == COMPLETED, (final.message, impl.logs())
    assert codes == [0, 0], impl.logs()
    assert final.counters.pushes_applied == 2 * iterations
    assert final.counters.pushes_rejected == 0
    for w in final.workers:
        assert (w.pushes, w.clock, w.state, w.incarnation) == (iterations, iterations, pb.WORKER_STATE_DONE, w.incarnation)
        if impl.spec.name_prefix:
            assert w.worker_name.startswith(impl.spec.name_prefix), w.worker_name
        else:
            assert not w.worker_name.startswith("node:"), w.worker_name
    # rank 0 evaluated every eval_every iterations and on the final parameters (pull at clock = iterations)
    assert final.last_eval.rank == 0 and final.last_eval.clock == iterations
    assert 0.8 <= final.last_eval.eval_accuracy <= 1.0, final.last_eval
    evals = {p.clock for p in metrics.points if p.eval}
    assert {10, 20, 30, iterations} <= evals, evals
    train = [p for p in metrics.points if not p.eval]
    assert {p.rank for p in train} == {0, 1}
    assert all(p.loss > 0 and p.samples > 0 for p in train)
    assert max(p.clock for p in train) == iterations
    # s = 2: the worker cache skipped pulls, and the workers said so (ReportMetrics.pulls_skipped). A rank
    # that is always the furthest ahead may never skip, so this asks it of one rank at least.
    assert final.counters.pulls_skipped > 0
    assert any(w.pulls_skipped > 0 for w in final.workers), [w.pulls_skipped for w in final.workers]
    assert kinds(list(metrics.events)).count("done") == 2


async def test_a_rank_whose_worker_was_killed_goes_on_from_the_runs_clock_under_another(impl: Impl,
                                                                                        topology: Topology) -> None:
    """A worker killed (SIGKILL) mid-run, evicted when its lease expires, and another started: the new
    one takes the rank as a new incarnation at ``Assignment.start_clock`` (the run's min clock, not 0
    nor its own clock), pushes from there on only, and the run completes, evaluated at the end."""
    iterations = 1500
    spec = run_spec(workers=2, staleness=1, iterations=iterations, eval_every=100)
    with topology.start("--lease-seconds", "2", "--heartbeat-seconds", "0.5") as srv:
        async with connect(srv.address) as c:
            run = await c.create_run(spec)
            workers = impl.start_many(srv.address, 2)
            at = await wait_until(c, run.run_id, lambda r: len(r.workers) == 2 and r.workers[1].clock >= 20, 60,
                                  "rank 1 at clock 20", impl.logs)
            victim = next(w for w in workers if w.proc.pid == int(at.workers[1].worker_name.rsplit(":", 1)[1]))
            victim.proc.kill()
            killed = (await c.get_run(run.run_id)).workers[1]  # final: its process is gone
            assert killed.clock < iterations, "rank 1 finished before it was killed: give the run more iterations"
            replacement = impl.start(srv.address)
            final = await finish(c, run.run_id, logs=impl.logs)
            metrics = await c.get_metrics(run.run_id, include_clock_records=True)
        assert replacement.wait(20) == 0, impl.logs()
    assert final.state == COMPLETED and final.message == "all ranks finished", (final.message, impl.logs())
    assert [(w.clock, w.state) for w in final.workers] == [(iterations, pb.WORKER_STATE_DONE)] * 2, impl.logs()
    assert final.workers[1].incarnation > killed.incarnation
    assert final.counters.evictions == 1
    took = [e.message for e in metrics.events if e.kind == "joined" and e.rank == 1][-1]
    start = int(took.rsplit("clock ", 1)[1].rstrip(")"))
    assert killed.clock <= start < iterations, took
    # the new incarnation pushed exactly the clocks from its start on, each once
    pushes = [r.clock for r in metrics.clock_records if r.kind == pb.ClockRecord.KIND_PUSH and r.rank == 1]
    assert pushes[-(iterations - start):] == list(range(start, iterations)), (start, pushes[-5:])
    assert final.last_eval.rank == 0 and final.last_eval.clock == iterations


async def test_staleness_bound_holds_with_a_straggler(impl: Impl, topology: Topology) -> None:
    """Every served pull and accepted push has min_clock >= clock - s (server clock records; on a
    cluster server 0's, whose shard holds part of every split tensor)."""
    s, iterations = 1, 30
    spec = run_spec(model="mlp:32", workers=3, staleness=s, iterations=iterations, slowdown=((2, 3.0),))
    with topology.start() as srv:
        async with connect(srv.address) as c:
            run = await c.create_run(spec)
            workers = impl.start_many(srv.address, 3)
            final = await finish(c, run.run_id, logs=impl.logs)
            metrics = await c.get_metrics(run.run_id, include_clock_records=True)
        for w in workers:
            w.wait(20)
    assert final.state == COMPLETED, (final.message, impl.logs())
    pulls = [r for r in metrics.clock_records if r.kind == pb.ClockRecord.KIND_PULL]
    pushes = [r for r in metrics.clock_records if r.kind == pb.ClockRecord.KIND_PUSH]
    assert len(pushes) == 3 * iterations
    assert pulls, "no pull was recorded"
    for r in pulls + pushes:
        assert r.min_clock >= r.clock - s, r
    assert sorted((r.rank, r.clock) for r in pushes) == [(k, c) for k in range(3) for c in range(iterations)]


async def test_a_bound_lowered_by_the_schedule_is_followed(impl: Impl, topology: Topology) -> None:
    """The run's schedule lowers the bound from 6 to 1 at min clock 3: the workers learn it from
    the answers (on a cluster every shard's, combined) and stop reusing parameters the new bound
    does not allow. A worker that kept s = 6 skips pulls the servers would have parked, and its
    pushes are refused (STALENESS_BOUND: the rank loses its assignment)."""
    s, step, iterations = 6, 3, 40
    spec = run_spec(model="mlp:32", workers=3, staleness=s, iterations=iterations, slowdown=((2, 8.0),),
                    staleness_schedule=f"{step}=1")
    with topology.start() as srv:
        async with connect(srv.address) as c:
            run = await c.create_run(spec)
            workers = impl.start_many(srv.address, 3)
            final = await finish(c, run.run_id, logs=impl.logs)
            metrics = await c.get_metrics(run.run_id)
        codes = [w.wait(20) for w in workers]
    assert final.state == COMPLETED, (final.message, impl.logs())
    assert codes == [0, 0, 0], impl.logs()
    assert final.counters.pushes_rejected == 0, impl.logs()
    assert final.spec.staleness == 1
    assert "staleness" in kinds(list(metrics.events))
    assert [w.pushes for w in final.workers] == [iterations] * 3


@pytest.mark.one_server("whether to pull is the worker's own decision, from the guaranteed clock, which a cluster "
                        "only combines (the least over the shards); the cache on a cluster is in "
                        "test_joins_and_completes_a_run[two-shards], BSP on a cluster in "
                        "test_large_tensors_travel_in_chunks[two-shards] and the Node BSP acceptance run")
@pytest.mark.parametrize("staleness", [0, -1], ids=["bsp", "inf"])
async def test_pulls_every_iteration_without_a_finite_bound(impl: Impl, staleness: int) -> None:
    """s = 0 (BSP) and unbounded s: no cache, one pull per iteration (plus rank 0's final pull)."""
    iterations = 20
    spec = run_spec(workers=2, staleness=staleness, iterations=iterations)
    with ps_server() as srv:
        async with connect(srv.address) as c:
            run = await c.create_run(spec)
            workers = impl.start_many(srv.address, 2)
            final = await finish(c, run.run_id, logs=impl.logs)
            metrics = await c.get_metrics(run.run_id, include_clock_records=True)
        for w in workers:
            w.wait(20)
    assert final.state == COMPLETED, (final.message, impl.logs())
    assert final.counters.pulls_skipped == 0
    assert all(w.pulls_skipped == 0 for w in final.workers)
    pulled = {rank: sorted(r.clock for r in metrics.clock_records if r.kind == pb.ClockRecord.KIND_PULL and r.rank == rank)
              for rank in (0, 1)}
    assert pulled[0] == list(range(iterations + 1)), pulled[0]  # rank 0 also pulls the final parameters
    assert pulled[1] == list(range(iterations)), pulled[1]
    if staleness == 0:
        for r in metrics.clock_records:
            assert r.min_clock >= r.clock, r


async def test_a_retried_push_is_applied_once(impl: Impl, topology: Topology) -> None:
    """The connection drops after a push reached the server: the worker retries it, the server
    acknowledges a duplicate, and every push is applied exactly once.

    On a cluster the answer lost is server 1's (the proxy stands in front of it alone) while server
    0 acknowledged the same push: the retry goes to both (an acknowledgement is not kept across a
    failure: a server may lose it to a checkpoint), and each acknowledges a duplicate."""
    iterations = 15
    spec = run_spec(workers=2, staleness=1, iterations=iterations)
    ports = topology.ports()
    # One server: workers dial the proxy. A cluster: the proxy listens where --cluster says server 1
    # is (127.0.0.2, server 1's port; server 1 listens on 127.0.0.1), so the shard map sends every
    # push and pull for server 1 through it, and server 0's calls to server 1 as well.
    listen = f"127.0.0.2:{ports[-1]}" if topology.sharded else "127.0.0.1:0"
    async with FaultProxy(f"127.0.0.1:{ports[-1]}", drop_push_clock=3, listen=listen) as proxy:
        cluster = [*(f"127.0.0.1:{p}" for p in ports[:-1]), proxy.address]
        # The proxy speaks gRPC: the servers offer no TCP or shared-memory data plane (they would bypass it).
        with topology.start("--data-port", "-1", "--no-shm", ports=ports, addresses=cluster if topology.sharded else ()) as srv:
            async with connect(srv.address) as c:
                run = await c.create_run(spec)
                workers = impl.start_many(srv.address if topology.sharded else proxy.address, 2,
                                          "--timeout-seconds", "10")
                final = await finish(c, run.run_id, logs=impl.logs)
            # (waited for off the event loop, which runs the proxy: the workers' Leave needs server 0's
            # call to server 1, through it, on a cluster)
            codes = [await asyncio.to_thread(w.wait, 20) for w in workers]
    assert proxy.dropped == [(4, False)], proxy.dropped
    assert final.state == COMPLETED, (final.message, impl.logs())
    assert codes == [0, 0], impl.logs()
    assert 4 in proxy.duplicates, (proxy.duplicates, impl.logs())  # the retry, answered as a duplicate
    if topology.sharded:
        assert split_tensors(final), final.shard_map
        assert final.counters.pushes_duplicate == 1, impl.logs()  # server 0's: the retry came to it too
    else:
        assert final.counters.pushes_duplicate >= 1
    assert final.counters.pushes_applied == 2 * iterations
    assert final.counters.pushes_rejected == 0
    assert [w.pushes for w in final.workers] == [iterations, iterations]


async def test_large_tensors_travel_in_chunks(impl: Impl, topology: Topology) -> None:
    """A 2.4 MB model (layer1.weight alone 2 MiB) with the server cutting pulls into 64 KiB chunks:
    pushes span several ~1 MiB messages, pulls many; the result equals numpy's SGD on the same batches.
    On a cluster every tensor but the last bias is split by rows over both servers."""
    iterations = 4
    spec = run_spec(model="mlp:1024,512", workers=1, staleness=0, lr=0.05, iterations=iterations, seed=3,
                    eval_every=iterations)
    with topology.start("--chunk-bytes", "65536") as srv:
        async with connect(srv.address) as c:
            run = await c.create_run(spec)
            init = await pull_all(c, run.run_id)
            impl.start(srv.address)
            final_run = await finish(c, run.run_id, logs=impl.logs)
            final = await pull_all(c, run.run_id)
    assert final_run.state == COMPLETED, (final_run.message, impl.logs())
    nbytes = 4 * sum(int(np.prod(p.shape)) for p in spec.params)
    assert nbytes > 2 << 20
    if topology.sharded:
        split = split_tensors(final_run)
        assert sorted(split) == ["layer0.bias", "layer0.weight", "layer1.bias", "layer1.weight", "layer2.weight"], split
        assert split["layer1.weight"] == [(0, 0, 512), (1, 512, 1024)], split
        held = {pc.name for pc in final_run.shard_map.shards[0].pieces}
        mine = 4 * sum((pc.row_end - pc.row_start) * int(np.prod(p.shape[1:]))
                       for pc in final_run.shard_map.shards[0].pieces for p in spec.params if p.name == pc.name)
        assert held and mine < nbytes
        assert final_run.counters.bytes_pushed == iterations * mine  # server 0's share of every push
    else:
        assert final_run.counters.bytes_pushed == iterations * nbytes
    data = load_dataset(json.loads(spec.data_spec_json))
    model = build_model(json.loads(spec.model_spec_json), data.n_features, data.n_outputs)
    shard = shard_indices(len(data.X_train), 0, 1, spec.seed)
    sampler = BatchSampler(len(shard), spec.batch_size, spec.seed, 0)
    params = {k: v.copy() for k, v in init.items()}
    for clock in range(iterations):
        idx = shard[sampler.batch(clock)]
        _, grads = model.loss_and_grad(params, data.X_train[idx], data.y_train[idx])
        for name in params:
            params[name] -= np.float32(0.05) * grads[name]
    for name in params:
        np.testing.assert_allclose(final[name], params[name], rtol=1e-4, atol=1e-5, err_msg=name)


UNTRAINABLE = {
    "unloadable-data": {"data_spec_json": '{"kind": "npz", "path": "/nonexistent/conformance.npz"}'},
    "unknown-model": {"model_spec_json": '{"kind": "transformer"}'},
    "params-not-the-models": {"params": [pb.ParamSpec(name="softmax.bias", shape=[10], dtype=pb.DATA_TYPE_FLOAT32,
                                                      initializer=pb.INITIALIZER_ZEROS),
                                         pb.ParamSpec(name="softmax.weight", shape=[63, 10], dtype=pb.DATA_TYPE_FLOAT32,
                                                      initializer=pb.INITIALIZER_ZEROS)]},
}


@pytest.mark.one_server("the worker fails while it sets up (data, model, the run's parameters), before it opens "
                        "a connection to any shard: where the parameters live plays no part")
@pytest.mark.parametrize("case", sorted(UNTRAINABLE))
async def test_a_run_the_worker_cannot_train_fails_with_a_message(impl: Impl, case: str) -> None:
    """Errors every rank would hit: the worker leaves with LEAVE_REASON_FAILED and a message."""
    spec = run_spec(workers=1, iterations=10)
    for key, value in UNTRAINABLE[case].items():
        if key == "params":
            del spec.params[:]
            spec.params.extend(value)  # type: ignore[arg-type]
        else:
            setattr(spec, key, value)
    with ps_server() as srv:
        async with connect(srv.address) as c:
            run = await c.create_run(spec)
            worker = impl.start(srv.address)
            final = await finish(c, run.run_id, logs=impl.logs)
            metrics = await c.get_metrics(run.run_id)
        worker.wait(20)
    assert final.state == pb.RUN_STATE_FAILED, (final, impl.logs())
    assert final.message.startswith("rank 0 failed: "), final.message
    assert len(final.message) > len("rank 0 failed: ") + 10, final.message
    assert "failed" in kinds(list(metrics.events), rank=0)
    assert final.counters.pushes_applied == 0


async def test_a_stopped_run_sends_the_worker_back_to_join(impl: Impl, topology: Topology) -> None:
    """StopRun mid-run: the worker drops the run, joins the next one and completes it (on a cluster:
    the stop reaches every shard, and the next run's shard map replaces the first one's)."""
    with topology.start() as srv:
        async with connect(srv.address) as c:
            long = await c.create_run(run_spec(workers=1, iterations=100_000, name="long"))
            worker = impl.start(srv.address, "--join-wait-seconds", "1", once=False)
            running = await wait_until(c, long.run_id, lambda r: r.workers[0].clock >= 5, 30, "training", impl.logs)
            await c.stop_run(long.run_id, "conformance test")
            short = await c.create_run(run_spec(workers=1, iterations=20, name="short"))
            final = await finish(c, short.run_id, logs=impl.logs)
            stopped = await c.get_run(long.run_id)
        assert final.state == COMPLETED, (final.message, impl.logs())
        assert final.workers[0].worker_name == running.workers[0].worker_name
        assert final.workers[0].pushes == 20
        assert stopped.state == pb.RUN_STATE_STOPPED
        assert stopped.workers[0].pushes < 100_000
        assert worker.proc.poll() is None, "the worker exited instead of waiting for work"
        worker.proc.send_signal(signal.SIGTERM)  # idle, parked in Join
        assert worker.wait(15) == 0


async def test_sigterm_gives_the_rank_back_and_exits_0(impl: Impl, topology: Topology) -> None:
    """SIGTERM mid-run: Leave SHUTDOWN (the rank becomes free for another worker), exit code 0 (on a
    cluster with its calls to both shards cancelled; the next incarnation is taken by both)."""
    with topology.start() as srv:
        async with connect(srv.address) as c:
            run = await c.create_run(run_spec(workers=1, iterations=100_000))
            worker = impl.start(srv.address)
            await wait_until(c, run.run_id, lambda r: r.workers[0].clock >= 5, 30, "training", impl.logs)
            worker.proc.send_signal(signal.SIGTERM)
            assert worker.wait(15) == 0, impl.logs()
            left = await c.get_run(run.run_id)
            metrics = await c.get_metrics(run.run_id)
            assert left.state == pb.RUN_STATE_RUNNING
            assert left.workers[0].state == pb.WORKER_STATE_EVICTED, left.workers[0]
            assert "left" in kinds(list(metrics.events), rank=0)
            assert left.counters.evictions == 0  # it left; the lease did not expire
            # the rank is free: a new worker takes it over where the first one left it
            impl.start(srv.address)
            taken = await wait_until(c, run.run_id, lambda r: r.workers[0].incarnation == 2
                                     and r.workers[0].clock > left.workers[0].clock + 2, 30, "the takeover", impl.logs)
            assert taken.workers[0].state == pb.WORKER_STATE_ACTIVE
            await c.stop_run(run.run_id, "done testing")


@pytest.mark.one_server("the stop's Leave goes to the server the worker joined; a cluster whose server 0 hangs is "
                        "that, to the worker")
async def test_sigterm_while_the_server_hangs_exits_0_within_seconds(impl: Impl) -> None:
    """SIGTERM mid-run while the server answers nothing (SIGSTOP): giving the rank back is bounded by
    a few seconds, not by the worker's whole call deadline (30 s by default: the stop grace period
    of Compose and Kubernetes, after which the worker was SIGKILLed, 137); it exits 0."""
    with ps_server() as srv:
        async with connect(srv.address) as c:
            run = await c.create_run(run_spec(workers=1, iterations=100_000))
            worker = impl.start(srv.address)
            await wait_until(c, run.run_id, lambda r: r.workers[0].clock >= 5, 30, "training", impl.logs)
        srv.proc.send_signal(signal.SIGSTOP)
        try:
            worker.proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            assert worker.wait(40) == 0, impl.logs()
            assert time.monotonic() - started < 10, impl.logs()
        finally:
            srv.proc.send_signal(signal.SIGCONT)


@pytest.mark.one_server("a signal to the worker's process: where the parameters live plays no part")
@pytest.mark.parametrize("nohup", [False, True], ids=["sighup", "sighup-ignored-at-start"])
async def test_sighup_stops_in_order_unless_ignored_at_start(impl: Impl, nohup: bool) -> None:
    """SIGHUP (its terminal closed) stops a worker in order, as SIGTERM: its rank given back, exit 0
    (the Node worker had no handler: killed, 129, its rank held until its lease expired). Started
    with SIGHUP ignored (nohup), the Python worker keeps it ignored and trains on; the Node worker
    cannot (Node sets an ignored SIGHUP back to its default before the worker's code runs, and
    nothing it can read shows it was ignored: worker/node/README.md), so it stops in order all the same."""
    with ps_server() as srv:
        async with connect(srv.address) as c:
            run = await c.create_run(run_spec(workers=1, iterations=100_000))
            with started_with(signal.SIG_IGN if nohup else lambda *_: None):
                worker = impl.start(srv.address)
            await wait_until(c, run.run_id, lambda r: r.workers[0].clock >= 5, 30, "training", impl.logs)
            worker.proc.send_signal(signal.SIGHUP)
            if nohup and impl.name == "python":
                with pytest.raises(subprocess.TimeoutExpired):
                    worker.proc.wait(1.0)
                clock = (await c.get_run(run.run_id)).workers[0].clock
                await wait_until(c, run.run_id, lambda r: r.workers[0].clock > clock + 2, 30, "training on", impl.logs)
                worker.proc.send_signal(signal.SIGTERM)
            assert worker.wait(15) == 0, impl.logs()
            left = await c.get_run(run.run_id)
    assert left.workers[0].state == pb.WORKER_STATE_EVICTED and left.counters.evictions == 0, left.workers[0]


@pytest.mark.one_server("the worker's own message limit, whichever server's answer goes over it: a cluster adds "
                        "nothing")
@pytest.mark.parametrize("plane", ["tcp", "grpc"])
async def test_a_message_over_the_workers_own_limit_gives_the_rank_back_and_exits_1(impl: Impl, plane: str) -> None:
    """The worker's --max-message-bytes (1 MiB) is smaller than its pulls' answers (1 MiB chunks of
    a 2 MiB tensor): it does not fail the run but gives its rank back (Leave SHUTDOWN), says which
    flag to raise and exits 1; the run goes on, the rank free for another worker."""
    args = ["--max-message-bytes", str(1 << 20), *(["--no-data-plane"] if plane == "grpc" else [])]
    if impl.name == "node":
        args += ["--chunk-bytes", str(256 << 10)]  # (at most half the limit)
    if impl.name == "python":
        args += ["--no-shm"]  # (shared memory has no message to be over the limit)
    with ps_server() as srv:
        async with connect(srv.address) as c:
            run = await c.create_run(run_spec(model="mlp:1024,512", workers=1, iterations=100_000))
            worker = impl.start(srv.address, *args)
            assert worker.wait(60) == 1, impl.logs()
            left = await c.get_run(run.run_id)
            metrics = await c.get_metrics(run.run_id)
    assert left.state == pb.RUN_STATE_RUNNING, (left.message, impl.logs())
    assert left.workers[0].state == pb.WORKER_STATE_EVICTED, left.workers[0]
    assert "left" in kinds(list(metrics.events), rank=0) and left.counters.evictions == 0
    assert "gave rank 0 back" in impl.logs() and "--max-message-bytes" in impl.logs(), impl.logs()


@pytest.mark.one_server("leases are server 0's alone, kept by heartbeats to the server the worker joined (on a "
                        "cluster forwarded to server 0), whatever the worker's pulls are parked on: a cluster changes "
                        "nothing the test checks, and it waits 4 s by design")
async def test_heartbeats_keep_a_waiting_worker_alive(impl: Impl) -> None:
    """A worker parked in a pull (its run waits for a second rank) keeps its 1.5 s lease by heartbeats.

    A warm-up run first, so that the worker's start-up after Join (loading its data) is cached and
    cannot itself outlast the short lease on a loaded machine.
    """
    with ps_server("--lease-seconds", "1.5", "--heartbeat-seconds", "0.2") as srv:
        async with connect(srv.address) as c:
            warm = await c.create_run(run_spec(workers=1, iterations=5, name="warm-up"))
            worker = impl.start(srv.address, "--join-wait-seconds", "1", once=False)
            assert (await finish(c, warm.run_id, logs=impl.logs)).state == COMPLETED, impl.logs()
            run = await c.create_run(run_spec(workers=2, iterations=20))
            await wait_until(c, run.run_id, lambda r: r.workers[0].waiting, 30, "a parked pull", impl.logs)
            await asyncio.sleep(4.0)  # over two leases parked in a pull: only heartbeats keep the rank
            waiting = await c.get_run(run.run_id)
            assert waiting.counters.evictions == 0, impl.logs()
            assert (waiting.workers[0].state, waiting.workers[0].incarnation) == (pb.WORKER_STATE_ACTIVE, 1)
            assert waiting.workers[0].waiting
            await c.stop_run(run.run_id, "done testing")
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0, impl.logs()


@pytest.mark.one_server("a cluster restarting without checkpoints is to a worker what one server restarting is: "
                        "its run is gone, back to Join; a shard restarting alone, which only a cluster has, is "
                        "test_resumes_after_a_server_restart_from_a_checkpoint[two-shards]")
async def test_waits_for_the_server_and_rides_out_a_restart(impl: Impl) -> None:
    """Started before the server; the server dies mid-run (its runs with it): the worker goes back
    to Join, reconnects to the next server on the same port and trains its run."""
    port = free_port()
    addr = f"127.0.0.1:{port}"
    worker = impl.start(addr, "--join-wait-seconds", "1", "--timeout-seconds", "5", once=False)
    await asyncio.sleep(1.0)  # nothing listens yet
    assert worker.proc.poll() is None, impl.logs()
    with ps_server("--port", str(port)) as srv:
        async with connect(srv.address) as c:
            first = await c.create_run(run_spec(workers=1, iterations=100_000))
            await wait_until(c, first.run_id, lambda r: r.workers[0].clock >= 5, 30, "training", impl.logs)
        srv.proc.kill()
    assert worker.proc.poll() is None, impl.logs()
    with ps_server("--port", str(port)) as srv:
        async with connect(srv.address) as c:
            second = await c.create_run(run_spec(workers=1, iterations=20))
            final = await finish(c, second.run_id, timeout=60, logs=impl.logs)
    assert final.state == COMPLETED, (final.message, impl.logs())
    assert final.workers[0].pushes == 20
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(15) == 0


async def test_resumes_after_a_server_restart_from_a_checkpoint(impl: Impl, topology: Topology,
                                                               tmp_path: Path) -> None:
    """kill -9 of a checkpointing server: restarted on its data dir, the run goes on with the same
    workers and incarnations (a worker ahead of the checkpoint rewinds to the clock the server knows).

    On a cluster the server killed is server 1, one shard, while the workers stay in touch with
    server 0 (they joined there): restarted, server 0 takes every shard back to the checkpoint's
    cut (a "rolled_back" event), the shards then know the workers' ranks at that earlier clock
    (CLOCK_AHEAD, and Heartbeat's clock), and the workers rewind to it; the restarted shard's TCP
    data plane is on another port, which they learn again from the run's shard map."""
    ports = topology.ports()
    # Only the on-demand checkpoint: a periodic one could land at the very clock the run was killed at,
    # and then there would be nothing to rewind.
    args = ("--checkpoint-every", "0", "--lease-seconds", "20")
    spec = run_spec(workers=2, staleness=2, iterations=100_000)
    owner = f"127.0.0.1:{ports[0]}"
    victim = len(ports) - 1
    workers = impl.start_many(owner, 2, "--timeout-seconds", "10")
    with topology.start(*args, ports=ports, per_server=lambda i: ("--data-dir", str(tmp_path / f"ckpt{i}"))) as srv:
        async with connect(owner) as c:
            run = await c.create_run(spec)
            await wait_until(c, run.run_id, lambda r: r.min_clock >= 10, 60, "progress", impl.logs)
            ckpt = await c.checkpoint_run(run.run_id)  # on disk (on every server) when it answers
            before = await wait_until(c, run.run_id, lambda r: r.min_clock >= ckpt.min_clock + 5, 60,
                                      "progress past the checkpoint", impl.logs)
        srv.servers[victim].proc.kill()
        srv.servers[victim].proc.wait()
        assert all(w.proc.poll() is None for w in workers), impl.logs()
        with srv.start_again(victim):
            async with connect(owner) as c:
                resumed = await c.get_run(run.run_id)
                if topology.sharded:  # server 0 goes on until its next look at server 1 shows it restarted
                    await wait_for_event(c, run.run_id, "rolled_back", 30, impl.logs)
                target = max(before.max_clock, resumed.max_clock) + 10
                after = await wait_until(c, run.run_id, lambda r: r.min_clock >= target, 60,
                                         "progress after the restart", impl.logs)
                await c.stop_run(run.run_id, "done testing")
            codes = [w.wait(30) for w in workers]  # --once: back from the stopped run, they exit
    assert resumed.state == pb.RUN_STATE_RUNNING
    if not topology.sharded:  # (on a cluster server 0 had not restarted: it was ahead until the roll back)
        assert ckpt.min_clock <= resumed.min_clock < before.min_clock  # the workers were ahead: they had to rewind
    assert [w.incarnation for w in after.workers] == [w.incarnation for w in before.workers]
    assert after.counters.evictions == 0
    assert all(w.state == pb.WORKER_STATE_ACTIVE for w in after.workers)
    assert all(code is not None for code in codes)


@pytest.mark.parametrize("flags", [(), ("--no-data-plane",)], ids=["default", "no-data-plane"])
async def test_pushes_and_pulls_over_the_tcp_data_plane_when_offered(impl: Impl, topology: Topology,
                                                                    flags: tuple[str, ...]) -> None:
    """The server offers its TCP data plane at Join: by default the worker trains over it (its
    streams show in the server's metrics); with --no-data-plane, over gRPC only. Same result.
    On a cluster each shard's data plane is in the shard map: every server sees the streams.
    (The servers offer no shared-memory plane here, which the Python worker would prefer on this
    host: ``test_the_python_worker_uses_shared_memory_on_the_servers_host``.)"""
    import urllib.request

    def scrape(url: str) -> str:
        return str(urllib.request.urlopen(url, timeout=5).read().decode())

    iterations = 20
    metrics_ports = free_ports(topology.servers)
    with topology.start(per_server=lambda i: ("--metrics-port", str(metrics_ports[i]), "--no-shm")) as srv:
        async with connect(srv.address) as c:
            run = await c.create_run(run_spec(workers=2, staleness=1, iterations=iterations))
            workers = impl.start_many(srv.address, 2, *flags)
            final = await finish(c, run.run_id, logs=impl.logs)
            texts = [await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics") for port in metrics_ports]
        codes = [w.wait(20) for w in workers]
    assert final.state == COMPLETED and codes == [0, 0], (final.message, impl.logs())
    assert final.counters.pushes_applied == 2 * iterations
    assert len(final.shard_map.shards) == (2 if topology.sharded else 0)
    assert all(s.data_port for s in final.shard_map.shards), final.shard_map
    for text in texts:
        (line,) = [ln for ln in text.splitlines() if ln.startswith("paramserver_data_plane_connections_total ")]
        streams = float(line.split()[1])
        if flags:
            assert streams == 0, impl.logs()
        else:
            assert streams >= 4, (line, impl.logs())  # each worker's push stream and pull stream


async def test_the_python_worker_uses_shared_memory_on_the_servers_host(impl: Impl, topology: Topology) -> None:
    """With the shared-memory plane offered (the default, on Linux) and the workers on the servers'
    host, the Python worker pushes and pulls through it, each shard's for a cluster; the Node
    worker, which cannot pass descriptors, uses TCP. Same result either way."""
    iterations = 12
    with topology.start() as srv:
        async with connect(srv.address) as c:
            run = await c.create_run(run_spec(workers=2, staleness=1, iterations=iterations))
            workers = impl.start_many(srv.address, 2)
            final = await finish(c, run.run_id, logs=impl.logs)
        codes = [w.wait(20) for w in workers]
    assert final.state == COMPLETED and codes == [0, 0], (final.message, impl.logs())
    assert final.counters.pushes_applied == 2 * iterations
    assert all(s.shm_socket.startswith("paramserver-") for s in final.shard_map.shards), final.shard_map
    plane = "shm" if impl.name == "python" else "tcp"
    assert [w.data_plane for w in final.workers] == [plane, plane], impl.logs()
