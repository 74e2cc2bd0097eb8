"""Several servers holding one run (ps_server.cluster), in this process: real gRPC between them and
to the workers, which use the SDK's ``Shards`` as the proto's "Shards" section says."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from procs import free_ports
from support import make_spec, until, with_config

from client.spec import LaunchOptions, build_run_spec
from paramserver import errors
from paramserver.client import PsClient
from paramserver.shards import Shards, pull_run
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1.wire import CodedPart, RowsPart
from ps_server.config import ServerConfig
from ps_server.server import PsServer, start_server
from worker.datasets import load_dataset
from worker.models import build_model
from worker.rates import OwnRate
from worker.sampling import BatchSampler, shard_indices

pytestmark = pytest.mark.timeout(120)


@asynccontextmanager
async def cluster(config: ServerConfig, n: int, each: Callable[[int], dict[str, object]] = lambda i: {},
                  **changes: object) -> AsyncIterator[list[PsServer]]:
    """``n`` servers: a cluster (n > 1), or one server alone (n == 1); ``each(i)``: server i's own
    changes to ``config`` (a data directory each, say), on top of ``changes``."""
    ports = free_ports(n)
    addresses = ",".join(f"127.0.0.1:{p}" for p in ports) if n > 1 else ""
    servers: list[PsServer] = []
    try:
        for i, port in enumerate(ports):
            servers.append(await start_server(with_config(config, port=port, cluster=addresses, index=i,
                                                          **{**changes, **each(i)})))
        yield servers
    finally:
        for s in reversed(servers):
            if not s.registry.shutting_down:  # (a test may have stopped one)
                await s.stop(0)


async def _join_all(c: PsClient, run_id: str, n: int) -> list[pb.Assignment]:
    return [(await c.join(f"w{i}", run_id, max_wait=0)).assignment for i in range(n)]


@asynccontextmanager
async def _at_cut_2(server_config: ServerConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    ) -> AsyncIterator[tuple[list[PsServer], PsClient, pb.Run]]:
    """Two servers with data directories, whose roll backs are the test's to start (server 0 does
    not watch its peers), and a one-rank BSP run of 20 iterations pushed through clock 2: cut 2
    checkpointed on both."""
    from ps_server.cluster.owner import ClusterOwner

    async def not_yet(self: ClusterOwner) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(ClusterOwner, "watch", not_yet)
    async with cluster(server_config, 2, lambda i: {"data_dir": str(tmp_path / str(i))}, checkpoint_every=2,
                       split_bytes=1024) as servers:
        async with PsClient(servers[0].address, timeout=10) as c:
            run = await c.create_run(make_spec(shapes={"w": (40, 30)}, num_workers=1, staleness=0, iterations=20))
            (a,) = await _join_all(c, run.run_id, 1)
            plane = Shards.beside(c, a.shard_map, a.spec)
            try:
                for clock in range(3):
                    await plane.pull(run.run_id, 0, a.incarnation, clock)
                    await plane.push(run.run_id, 0, a.incarnation, clock, {"w": np.ones((40, 30), np.float32)})
            finally:
                await plane.close()
            await asyncio.gather(*(s.checkpointer.drain() for s in servers))  # type: ignore[union-attr]
            yield servers, c, run


# ------------------------------------------------------------------------------ placement
async def test_a_run_is_placed_over_the_servers_and_starts_where_one_server_would(server_config: ServerConfig) -> None:
    """Large tensors are split by rows over every server, small ones balanced whole; the map is in
    GetRun and the assignment; the initial values are one server's, however many hold them."""
    shapes = {"big": (1000, 40), "mid": (30, 20), "b": (40,), "c": (3,)}
    spec = make_spec(shapes=shapes, num_workers=2, staleness=-1)
    async with cluster(server_config, 1) as (alone,):
        async with PsClient(alone.address) as c:
            reference = (await c.pull((await c.create_run(spec)).run_id)).tensors
    async with cluster(server_config, 3, split_bytes=4096) as servers:
        async with PsClient(servers[2].address) as c:  # any server: it forwards to server 0
            run = await c.create_run(spec)
            got = await c.get_run(run.run_id)
            assert [s.address for s in got.shard_map.shards] == [s.address for s in servers]
            big = [(s.index, pc.row_start, pc.row_end) for s in got.shard_map.shards for pc in s.pieces
                   if pc.name == "big"]
            assert big == [(0, 0, 334), (1, 334, 667), (2, 667, 1000)]
            # each shard's data planes, for workers: TCP, and shared memory on its host
            assert [(sh.data_port, sh.shm_socket) for sh in got.shard_map.shards] == \
                [(s.data_plane.port, s.shm_plane.name) for s in servers]  # type: ignore[union-attr]
            held = [sorted(pc.name for pc in s.pieces) for s in got.shard_map.shards]
            assert sum(n.count("mid") for n in held) == 1 and sum(n.count("c") for n in held) == 1
            assert [s.bytes_held for s in got.shards] == [s.registry.get(run.run_id).store.nbytes for s in servers]
            for _ in range(50):  # server 0 asks every server for its status each second
                if all(s.reachable for s in (await c.get_run(run.run_id)).shards):
                    break
                await asyncio.sleep(0.1)
            assert [s.rss_bytes > 0 for s in (await c.get_run(run.run_id)).shards] == [True] * 3
            a = (await c.join("w", run.run_id)).assignment
            assert a.shard_map == got.shard_map
            whole = (await pull_run(c, run.run_id)).tensors
            assert whole.keys() == reference.keys()
            for name in shapes:
                np.testing.assert_array_equal(whole[name], reference[name])


# ------------------------------------------------------------------------------ exactly-once, SSP
@pytest.mark.parametrize("shards", [2, 3])
@pytest.mark.parametrize("staleness", [0, 1, 2, -1], ids=["bsp", "s1", "s2", "inf"])
async def test_hidden_schedules_keep_the_bound_on_every_shard_and_apply_each_push_once(
        server_config: ServerConfig, shards: int, staleness: int) -> None:
    """Workers with random delays (a schedule the servers cannot see) push integer gradients to
    every shard, some twice, and random rows of a table spread over the shards: every shard keeps
    c - s for every pull and push it served, and the parameters are the initial ones minus the
    exact sum of the gradients, on every row."""
    workers, k = 3, 12
    shapes = {"w": (40, 30), "b": (30,), "v": (7,)}
    table = (50, 3)
    rng = random.Random(f"{shards}-{staleness}")
    async with cluster(server_config, shards, split_bytes=1024) as servers:
        async with PsClient(servers[0].address, timeout=20) as c:
            spec = make_spec(shapes=shapes, num_workers=workers, staleness=staleness, iterations=k, lr=1.0,
                             init=pb.INITIALIZER_CONSTANT, aggregation=pb.AGGREGATION_SUM)  # (BSP: each clock's sum)
            spec.params.append(pb.ParamSpec(name="t", shape=table, initializer=pb.INITIALIZER_CONSTANT, scale=1.0,
                                            table=True))
            run = await c.create_run(spec)
            assert all(any(pc.name == "t" for pc in s.pieces) for s in run.shard_map.shards)  # rows on every server
            assignments = await _join_all(c, run.run_id, workers)
            init = (await pull_run(c, run.run_id)).tensors
            expected = {n: init[n].astype(np.float64) for n in (*shapes, "t")}

            async def worker(a: pb.Assignment) -> int:
                twice = 0
                plane = Shards.beside(c, a.shard_map, a.spec)
                try:
                    for clock in range(k):
                        ids = np.array([rng.randrange(table[0]) for _ in range(rng.randrange(1, 8))], np.int64)
                        p = await plane.pull(run.run_id, a.rank, a.incarnation, clock, names=list(shapes),
                                             rows={"t": ids})
                        assert list(p.rows["t"][0]) == list(ids) and p.rows["t"][1].shape == (ids.size, table[1])
                        if staleness >= 0:
                            assert p.guaranteed_clock >= clock - staleness
                        await asyncio.sleep(rng.random() * 0.01 * (1 + a.rank))
                        g: dict[str, Any] = {n: np.full(s, float(a.rank + 1 + clock), np.float32)
                                             for n, s in shapes.items()}
                        rows = np.full((ids.size, table[1]), float(a.rank + 1), np.float32)
                        g["t"] = RowsPart(ids, rows, table)  # repeated ids summed
                        assert not (await plane.push(run.run_id, a.rank, a.incarnation, clock, g)).duplicate
                        if rng.random() < 0.25:
                            again = await plane.push(run.run_id, a.rank, a.incarnation, clock, g)
                            twice += 1
                            assert again.duplicate and again.clock == clock + 1
                        for n in shapes:
                            expected[n] -= g[n]
                        np.subtract.at(expected["t"], ids, rows)
                finally:
                    await plane.close()
                return twice

            twice = sum(await asyncio.gather(*(worker(a) for a in assignments)))
            final = (await pull_run(c, run.run_id)).tensors
            for n in (*shapes, "t"):
                np.testing.assert_array_equal(final[n], expected[n].astype(np.float32))
            for s in servers:
                shard = s.registry.get(run.run_id)
                assert shard.counters.pushes_applied == workers * k
                assert shard.counters.pushes_duplicate == twice
                records = shard.history.clock_records
                assert len(records) == 2 * workers * k
                if staleness >= 0:
                    assert all(r.min_clock >= r.clock - staleness for r in records), s.address


# ------------------------------------------------------------------------------ BSP is exact
def _bsp_training(spec: pb.RunSpec) -> Callable[[PsClient, list[pb.Assignment]], Awaitable[None]]:
    data = load_dataset(json.loads(spec.data_spec_json))
    model = build_model(json.loads(spec.model_spec_json), data.n_features, data.n_outputs)
    workers = spec.num_workers

    async def train(c: PsClient, assignments: list[pb.Assignment]) -> None:
        async def rank(a: pb.Assignment) -> None:
            shard = shard_indices(len(data.X_train), a.rank, workers, spec.seed)
            sampler = BatchSampler(len(shard), spec.batch_size, spec.seed, a.rank)
            plane: PsClient | Shards = Shards.beside(c, a.shard_map, a.spec) if a.shard_map.shards else c
            params: dict[str, np.ndarray] = {}
            for clock in range(spec.iterations):
                await plane.pull(run_id, a.rank, a.incarnation, clock, into=params)
                idx = shard[sampler.batch(clock)]
                await plane.push(run_id, a.rank, a.incarnation, clock,
                                 model.loss_and_grad(params, data.X_train[idx], data.y_train[idx])[1])
            if isinstance(plane, Shards):
                await plane.close()

        run_id = assignments[0].run_id
        await asyncio.gather(*(rank(a) for a in assignments))

    return train


async def test_bsp_on_shards_ends_bit_identical_to_one_server(server_config: ServerConfig) -> None:
    spec = build_run_spec(LaunchOptions(model="mlp:48,24", dataset="digits", workers=3, staleness=0, iterations=15,
                                        batch_size=16, seed=4, lr=0.1))
    train = _bsp_training(spec)
    finals = []
    for n in (1, 2, 3):
        async with cluster(server_config, n, split_bytes=2048) as servers:
            async with PsClient(servers[-1].address, timeout=20) as c:
                run = await c.create_run(spec)
                await train(c, await _join_all(c, run.run_id, spec.num_workers))
                finals.append((await pull_run(c, run.run_id)).tensors)
                if n > 1:
                    assert sum(len(s.pieces) for s in (await c.get_run(run.run_id)).shard_map.shards) > len(spec.params)
    for other in finals[1:]:
        for name, value in finals[0].items():
            assert np.array_equal(other[name], value), name  # bit for bit


# ------------------------------------------------------------------------------ membership
async def test_an_eviction_reaches_every_shard_before_the_rank_is_handed_on(server_config: ServerConfig) -> None:
    async with cluster(server_config, 2, split_bytes=1024, lease_seconds=1.0, heartbeat_seconds=0.2) as servers:
        async with PsClient(servers[1].address, timeout=20) as c:
            shapes = {"w": (64, 16)}
            run = await c.create_run(make_spec(shapes=shapes, num_workers=2, staleness=0, iterations=5))
            a, b = await _join_all(c, run.run_id, 2)
            plane = Shards.beside(c, a.shard_map, a.spec)
            g = {"w": np.ones((64, 16), np.float32)}
            await plane.push(run.run_id, a.rank, a.incarnation, 0, g)
            parked = asyncio.create_task(plane.pull(run.run_id, a.rank, a.incarnation, 1, max_wait=30))
            # rank b never pushes; a's heartbeats keep it alive while b's lease runs out
            for _ in range(40):
                await c.heartbeat(run.run_id, a.rank, a.incarnation, 1)
                if parked.done():
                    break
                await asyncio.sleep(0.1)
            pulled = await asyncio.wait_for(parked, 5)  # released on both shards by b's eviction
            assert pulled.guaranteed_clock == 1
            shard1 = servers[1].registry.get(run.run_id)
            assert shard1.clock.slots[b.rank].state.value == "evicted"
            again = (await c.join("w2", run.run_id, max_wait=0)).assignment
            assert again.rank == b.rank and again.incarnation > b.incarnation
            assert shard1.clock.slots[b.rank].incarnation == again.incarnation  # known before Join answered
            old = Shards.beside(c, b.shard_map, b.spec)
            with pytest.raises(errors.FailedPrecondition) as e:
                await old.push(run.run_id, b.rank, b.incarnation, 0, g)
            assert e.value.reason == pb.ERROR_REASON_STALE_INCARNATION
            await old.close()
            await plane.close()


async def test_a_rank_whose_admission_reaches_a_server_after_join_answered_pulls_there_once_it_has(
        server_config: ServerConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Server 1 answers the UpdateShard of a Join's admission after Join's wait for it is over (a
    slow server; the log names it): the worker's first pull waits there for it, then its first
    push is taken on both (the pull was refused at once, SHARD_UNAVAILABLE, and retried with
    back-off, after waiting for server 0's answer: the worker lost its first iteration)."""
    async with cluster(server_config, 2, split_bytes=1024) as servers:
        owner = servers[0].cluster
        assert owner is not None
        (peer,) = owner._peers
        call, late = peer.call, asyncio.Event()
        async with PsClient(servers[0].address, timeout=20) as c:
            shapes = {"w": (64, 16)}
            run = await c.create_run(make_spec(shapes=shapes, num_workers=2, staleness=0, iterations=5))
            (a,) = await _join_all(c, run.run_id, 1)

            async def slow(method: str, request: Any, *args: Any, **kw: Any) -> Any:
                if method == "UpdateShard":
                    await late.wait()
                return await call(method, request, *args, **kw)

            monkeypatch.setattr(peer, "call", slow)
            monkeypatch.setattr(owner, "_timeout", 0.5)  # (Join's wait for the servers' answers)
            b = (await c.join("w1", run.run_id, max_wait=0)).assignment
            shard1 = servers[1].registry.get(run.run_id)
            assert shard1.clock.slots[b.rank].incarnation < b.incarnation  # (not there yet)
            assert f"membership of {run.run_id} not yet on {peer.name}" in caplog.text
            plane = Shards.beside(c, b.shard_map, b.spec)
            pull = asyncio.ensure_future(plane.pull(run.run_id, b.rank, b.incarnation, b.start_clock, max_wait=30))
            await until(lambda: pull.done() or shard1.gate.statistics().waiting, 5)
            assert not pull.done(), pull.exception()
            late.set()
            await asyncio.wait_for(pull, 5)
            g = {"w": np.ones((64, 16), np.float32)}
            pushed = await asyncio.gather(plane.push(run.run_id, a.rank, a.incarnation, 0, g),
                                          plane.push(run.run_id, b.rank, b.incarnation, 0, g))
            assert [r.clock for r in pushed] == [1, 1] and not any(r.duplicate for r in pushed)
            assert [s.registry.get(run.run_id).bsp.applied_clock for s in servers] == [1, 1]
            await plane.close()


async def test_a_join_whose_answer_was_lost_while_the_servers_learned_its_rank_gets_that_rank_again(
        server_config: ServerConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Server 0 hands a rank over, then tells the other servers before Join answers: the worker's
    deadline passed meanwhile (a slow server), and its retry, through server 1, took a second rank;
    the first had no worker until its lease ran out. With the same join_token it gets the first."""
    async with cluster(server_config, 2, split_bytes=1024) as servers:
        owner = servers[0].cluster
        assert owner is not None
        (peer,) = owner._peers
        call, late = peer.call, asyncio.Event()

        async def slow(method: str, request: Any, *args: Any, **kw: Any) -> Any:
            if method == "UpdateShard":
                await late.wait()
            return await call(method, request, *args, **kw)

        async with PsClient(servers[1].address, timeout=20) as c:
            run = await c.create_run(make_spec(shapes={"w": (64, 16)}, num_workers=2, staleness=0, iterations=5))
            monkeypatch.setattr(peer, "call", slow)
            async with PsClient(servers[1].address, timeout=0.5) as hasty:
                with pytest.raises(errors.DeadlineExceeded):
                    await hasty.join("w0", run.run_id, max_wait=0, join_token="t0")
            took = servers[0].registry.get(run.run_id).clock.slots[0]
            assert took.worker_name == "w0"  # (it took rank 0; its answer never came)
            late.set()
            a = (await c.join("w0", run.run_id, max_wait=0, join_token="t0")).assignment
            b = (await c.join("w1", run.run_id, max_wait=0, join_token="t1")).assignment
            assert (a.rank, a.incarnation) == (0, took.incarnation) and b.rank == 1
            assert [e.rank for e in await _events(c, run.run_id, "joined")] == [0, 1]
            assert [s.incarnation for s in servers[1].registry.get(run.run_id).clock.slots] == \
                [a.incarnation, b.incarnation]


async def _push_to(plane: Shards, i: int, run_id: str, a: pb.Assignment, clock: int, g: dict[str, np.ndarray]) -> None:
    """``a``'s push of ``clock`` to shard ``i`` only: a worker that stops in the middle of its push."""
    await plane.clients[i].push(run_id, a.rank, a.incarnation, clock, plane._rows(g, plane.shard_map.shards[i]))


async def _events(c: PsClient, run_id: str, kind: str) -> list[pb.RunEvent]:
    return [e for e in (await c.get_metrics(run_id)).events if e.kind == kind]


@pytest.mark.parametrize("alive", [True, False], ids=["retried", "stopped"])
async def test_a_last_push_that_reached_server_0_only_is_waited_for_then_given_up(server_config: ServerConfig,
                                                                                   alive: bool) -> None:
    """Server 0 has rank b DONE; server 1 lacks b's last push. While b is heard from, server 1 waits
    for it (nothing is lost); once b has been silent for a lease, server 1 goes on without it,
    and the run's events say so: a's last pull is answered, the run does not hang."""
    async with cluster(server_config, 2, split_bytes=1024, lease_seconds=1.0, heartbeat_seconds=0.2) as servers:
        async with PsClient(servers[1].address, timeout=20) as c:
            run = await c.create_run(make_spec(shapes={"w": (64, 16)}, num_workers=2, staleness=0, iterations=2))
            a, b = await _join_all(c, run.run_id, 2)
            pa, pb_ = Shards.beside(c, a.shard_map, a.spec), Shards.beside(c, b.shard_map, b.spec)
            g = {"w": np.ones((64, 16), np.float32)}
            await asyncio.gather(pa.push(run.run_id, a.rank, a.incarnation, 0, g),
                                 pb_.push(run.run_id, b.rank, b.incarnation, 0, g))
            await _push_to(pb_, 0, run.run_id, b, 1, g)  # b's last push reaches server 0 only
            await pa.push(run.run_id, a.rank, a.incarnation, 1, g)
            pulled = asyncio.create_task(pa.pull(run.run_id, a.rank, a.incarnation, 2, max_wait=20))
            shard1 = servers[1].registry.get(run.run_id)
            if alive:  # b is still heard from (as a worker retrying its push): server 1 waits for it
                for _ in range(15):
                    await c.heartbeat(run.run_id, a.rank, a.incarnation, 2)
                    await c.heartbeat(run.run_id, b.rank, b.incarnation, 2)
                    await asyncio.sleep(0.2)
                assert not pulled.done() and shard1.clock.slots[b.rank].clock == 1
                await _push_to(pb_, 1, run.run_id, b, 1, g)
            else:
                for _ in range(40):
                    if pulled.done():
                        break
                    await c.heartbeat(run.run_id, a.rank, a.incarnation, 2)
                    await asyncio.sleep(0.1)
            assert (await asyncio.wait_for(pulled, 10)).guaranteed_clock == 2
            torn = await _events(c, run.run_id, "torn_push")
            if alive:
                assert not torn
                assert shard1.counters.pushes_applied == 4
            else:
                assert len(torn) == 1 and torn[0].rank == b.rank and "clocks 1..1 never reached server 1" in torn[0].message
                assert shard1.clock.slots[b.rank].clock == 2 and shard1.counters.pushes_applied == 3
            await pa.close()
            await pb_.close()


async def test_a_push_torn_by_an_eviction_is_told_in_the_runs_events(server_config: ServerConfig) -> None:
    async with cluster(server_config, 2, split_bytes=1024, lease_seconds=1.0, heartbeat_seconds=0.2) as servers:
        async with PsClient(servers[0].address, timeout=20) as c:
            run = await c.create_run(make_spec(shapes={"w": (64, 16)}, num_workers=2, staleness=1, iterations=5))
            a, b = await _join_all(c, run.run_id, 2)
            pa, pb_ = Shards.beside(c, a.shard_map, a.spec), Shards.beside(c, b.shard_map, b.spec)
            g = {"w": np.ones((64, 16), np.float32)}
            await _push_to(pb_, 1, run.run_id, b, 0, g)  # b stops in the middle of its first push
            for clock in range(2):
                await pa.push(run.run_id, a.rank, a.incarnation, clock, g)
            for _ in range(40):
                if torn := await _events(c, run.run_id, "torn_push"):
                    break
                await c.heartbeat(run.run_id, a.rank, a.incarnation, 2)
                await asyncio.sleep(0.1)
            assert len(torn) == 1 and torn[0].rank == b.rank
            assert "has it at clock 1, server 0 at 0" in torn[0].message
            assert servers[1].registry.get(run.run_id).clock.slots[b.rank].state.value == "evicted"
            await pa.close()
            await pb_.close()


async def test_a_push_torn_by_an_eviction_is_told_when_a_waiting_worker_takes_the_rank_at_once(
        server_config: ServerConfig) -> None:
    """A worker waiting in Join takes b's rank the moment b is evicted (before server 0 next asks
    the servers for their clocks): the run's events still say that b's push was torn."""
    async with cluster(server_config, 2, split_bytes=1024, lease_seconds=1.0, heartbeat_seconds=0.2) as servers:
        async with PsClient(servers[0].address, timeout=20) as c:
            run = await c.create_run(make_spec(shapes={"w": (64, 16)}, num_workers=2, staleness=1, iterations=5))
            a, b = await _join_all(c, run.run_id, 2)
            spare = asyncio.create_task(c.join("spare", max_wait=10))  # (any run: it waits for a vacancy)
            pa, pb_ = Shards.beside(c, a.shard_map, a.spec), Shards.beside(c, b.shard_map, b.spec)
            g = {"w": np.ones((64, 16), np.float32)}
            await _push_to(pb_, 1, run.run_id, b, 0, g)  # b stops in the middle of its first push
            await pa.push(run.run_id, a.rank, a.incarnation, 0, g)
            while not spare.done():
                await c.heartbeat(run.run_id, a.rank, a.incarnation, 1)
                await asyncio.sleep(0.1)
            assert (await spare).assignment.rank == b.rank
            for _ in range(30):  # (server 0 asks every server for its clocks each second)
                if torn := await _events(c, run.run_id, "torn_push"):
                    break
                await c.heartbeat(run.run_id, a.rank, a.incarnation, 1)
                await asyncio.sleep(0.1)
            assert [e.rank for e in torn] == [b.rank]
            assert "has it at clock 1, server 0 at 0" in torn[0].message
            await pa.close()
            await pb_.close()


@pytest.mark.parametrize(("staleness", "n"), [(0, 2), (0, 3), (1, 2)], ids=["bsp", "bsp-3-servers", "ssp"])
async def test_a_rank_handed_over_below_a_clock_a_torn_push_completed_elsewhere_goes_on(server_config: ServerConfig,
                                                                                        staleness: int, n: int) -> None:
    """b's push of clock 1 reaches server 1 only, where a's push of it is already (a's pushes to the
    others are on their way): under BSP it completes clock 1 there. b's worker stops; server 0
    evicts b and hands its rank to a new worker at its own min clock, 1 (a's). Under BSP the rank
    starts at 2 on every server (Join says so: server 1 had combined clock 1; server 2, which had
    not, is told before Join answers) and the run goes on to its end; under SSP (nothing combined)
    it starts at 1 on every server and pushes clock 1 again."""
    async with cluster(server_config, n, split_bytes=1024, lease_seconds=1.0, heartbeat_seconds=0.2) as servers:
        async with PsClient(servers[1].address, timeout=20) as c:
            iterations = 4
            run = await c.create_run(make_spec(shapes={"w": (64, 16)}, num_workers=2, staleness=staleness,
                                               iterations=iterations))
            a, b = await _join_all(c, run.run_id, 2)
            pa, pb_ = Shards.beside(c, a.shard_map, a.spec), Shards.beside(c, b.shard_map, b.spec)
            g = {"w": np.ones((64, 16), np.float32)}
            await asyncio.gather(pa.push(run.run_id, a.rank, a.incarnation, 0, g),
                                 pb_.push(run.run_id, b.rank, b.incarnation, 0, g))
            await _push_to(pa, 1, run.run_id, a, 1, g)  # a's push of clock 1: on server 1 now, on the others later
            await _push_to(pb_, 1, run.run_id, b, 1, g)  # b's: on server 1 only, and b stops
            owner = servers[0].registry.get(run.run_id)
            for _ in range(40):  # b's lease runs out while a is heard from
                if owner.clock.slots[b.rank].state.value == "evicted":
                    break
                await c.heartbeat(run.run_id, a.rank, a.incarnation, 1)
                await asyncio.sleep(0.1)
            assert owner.clock.slots[b.rank].state.value == "evicted" and owner.min_clock == 1
            d = (await c.join("w2", run.run_id, max_wait=0)).assignment
            assert d.rank == b.rank
            start = 2 if staleness == 0 else 1
            assert d.start_clock == start
            shards = [s.registry.get(run.run_id) for s in servers]
            assert [s.clock.slots[d.rank].clock for s in shards] == [start] * n
            for i in (0, *range(2, n)):  # a's push of clock 1 reaches the others at last
                await _push_to(pa, i, run.run_id, a, 1, g)
            pd = Shards.beside(c, d.shard_map, d.spec)

            async def train(plane: Shards, x: pb.Assignment, first: int) -> None:
                for clock in range(first, iterations):
                    pulled = await plane.pull(run.run_id, x.rank, x.incarnation, clock, max_wait=10, timeout=10)
                    if staleness == 0:
                        assert pulled.guaranteed_clock == clock
                    await plane.push(run.run_id, x.rank, x.incarnation, clock, g)
                await plane.pull(run.run_id, x.rank, x.incarnation, iterations, max_wait=10, timeout=10)
                await c.leave(run.run_id, x.rank, x.incarnation, pb.LEAVE_REASON_DONE)

            await asyncio.wait_for(asyncio.gather(train(pa, a, 2), train(pd, d, start)), 20)
            assert (await c.get_run(run.run_id)).state == pb.RUN_STATE_COMPLETED
            if staleness == 0:  # clock 1 without b's gradient on server 0, with it on server 1: as the events say
                torn = await _events(c, run.run_id, "torn_push")
                assert {e.rank for e in torn} == {b.rank}
                assert [s.counters.updates_applied for s in shards] == [iterations] * n
            for p in (pa, pb_, pd):
                await p.close()


_BOTH_STOP = [((2, [1]), (2, [1])), ((1, [1, 2]), (1, [2]))]
"""Both first workers stop at one clock, their pushes of it on server 1 (or 2) only: that server
combines it, server 0 does not, and hands both ranks over below it."""


@pytest.mark.parametrize(("stops", "n"), [(s, 2 + i) for i, s in enumerate(_BOTH_STOP)] +
                         [(seed, n) for seed in range(2) for n in (2, 3)])
async def test_bsp_workers_killed_in_the_middle_of_pushes_and_replaced_never_hang_the_run(
        server_config: ServerConfig, stops: Any, n: int) -> None:
    """Each first worker stops in the middle of its push of some clock (it reaches some of the
    servers, maybe none or all; ``stops``: (clock, servers) by rank, or a seed to draw them, both
    at one clock half the time); a worker waiting in Join takes each rank. The run completes,
    every server at the same clocks (no pull is retried for ever)."""
    iterations, ranks = 6, 2
    if isinstance(stops, int):
        rng = random.Random(stops)
        clocks = [rng.randrange(iterations - 1)] * ranks if rng.random() < 0.5 else \
            [rng.randrange(iterations - 1) for _ in range(ranks)]
        stops = [(clock, rng.sample(range(n), rng.randrange(n + 1))) for clock in clocks]
    async with cluster(server_config, n, split_bytes=1024, lease_seconds=0.5, heartbeat_seconds=0.1) as servers:
        async with PsClient(servers[0].address, timeout=20) as c:
            run = await c.create_run(make_spec(shapes={"w": (64, 16)}, num_workers=ranks, staleness=0,
                                               iterations=iterations))
            g = {"w": np.ones((64, 16), np.float32)}

            async def retried(call: Callable[[], Awaitable[Any]]) -> Any:
                while True:
                    try:
                        return await call()
                    except errors.PsError as exc:
                        if not exc.retryable:
                            raise
                        await asyncio.sleep(0.05)

            async def worker(name: str, stop: tuple[int, list[int]] | None) -> None:
                while not (joined := await c.join(name, max_wait=10)).HasField("assignment"):
                    pass  # (another waiting worker took the rank that fell vacant: wait again, as ps-worker does)
                a = joined.assignment
                plane = Shards.beside(c, a.shard_map, a.spec)
                try:
                    for clock in range(a.start_clock, iterations):
                        await retried(partial(plane.pull, run.run_id, a.rank, a.incarnation, clock, max_wait=1))
                        if stop is not None and clock == stop[0]:
                            for i in stop[1]:  # stops in the middle of its push: some servers got it
                                await _push_to(plane, i, run.run_id, a, clock, g)
                            return
                        await retried(partial(plane.push, run.run_id, a.rank, a.incarnation, clock, g))
                    await retried(lambda: plane.pull(run.run_id, a.rank, a.incarnation, iterations, max_wait=1))
                    await c.leave(run.run_id, a.rank, a.incarnation, pb.LEAVE_REASON_DONE)
                finally:
                    await plane.close()

            first = [asyncio.create_task(worker(f"w{r}", stops[r])) for r in range(ranks)]
            await until(lambda: all(s.state.value != "vacant" for s in servers[0].registry.get(run.run_id).clock.slots))
            spares = [asyncio.create_task(worker(f"spare{r}", None)) for r in range(ranks)]
            await asyncio.wait_for(asyncio.gather(*first, *spares), 60)
            assert (await c.get_run(run.run_id)).state == pb.RUN_STATE_COMPLETED, stops
            shards = [s.registry.get(run.run_id) for s in servers]
            assert [s.bsp.applied_clock for s in shards] == [iterations] * n, stops


async def test_a_stop_reaches_every_shard_and_ends_parked_pulls(server_config: ServerConfig) -> None:
    async with cluster(server_config, 3, split_bytes=1024) as servers:
        async with PsClient(servers[2].address, timeout=20) as c:
            run = await c.create_run(make_spec(shapes={"w": (90, 10)}, num_workers=2, staleness=0, iterations=5))
            a, _ = await _join_all(c, run.run_id, 2)
            plane = Shards.beside(c, a.shard_map, a.spec)
            await plane.push(run.run_id, a.rank, a.incarnation, 0, {"w": np.ones((90, 10), np.float32)})
            parked = asyncio.create_task(plane.pull(run.run_id, a.rank, a.incarnation, 1, max_wait=30))
            await asyncio.sleep(0.3)
            assert not parked.done()
            stopped = await c.stop_run(run.run_id, "enough")
            assert stopped.state == pb.RUN_STATE_STOPPED
            with pytest.raises(errors.FailedPrecondition) as e:
                await asyncio.wait_for(parked, 5)
            assert e.value.reason == pb.ERROR_REASON_RUN_NOT_RUNNING
            for s in servers:
                assert s.registry.get(run.run_id).state.value == "stopped"
            await plane.close()


# ------------------------------------------------------------------------------ forwarding, limits
async def test_any_server_answers_for_the_cluster(server_config: ServerConfig) -> None:
    async with cluster(server_config, 2) as servers:
        async with PsClient(servers[0].address) as c0, PsClient(servers[1].address) as c1:
            run = await c1.create_run(make_spec(num_workers=1))
            assert [r.run_id for r in await c0.list_runs()] == [r.run_id for r in await c1.list_runs()] == [run.run_id]
            with pytest.raises(errors.NotFound) as e:
                await c1.get_run("run-nope")
            assert e.value.reason == pb.ERROR_REASON_RUN_NOT_FOUND  # the owner's ErrorInfo, passed on
            async for snap in c1.watch_run(run.run_id, interval=0.05):
                assert snap.run.run_id == run.run_id and len(snap.run.shards) == 2
                break
            status = (await c1.get_run(run.run_id)).shards
            assert [s.index for s in status] == [0, 1] and status[0].reachable and status[0].rss_bytes > 0


async def test_a_model_larger_than_one_server_is_refused_by_one_and_trained_by_two(server_config: ServerConfig) -> None:
    shapes = {"w": (200, 100)}  # 80 kB
    spec = make_spec(shapes=shapes, num_workers=1, staleness=-1, iterations=3)
    async with cluster(server_config, 1, max_param_bytes=50_000) as (alone,):
        async with PsClient(alone.address) as c:
            with pytest.raises(errors.ResourceExhausted) as e:
                await c.create_run(spec)
            assert "max-param-bytes" in e.value.message
    async with cluster(server_config, 2, max_param_bytes=50_000, split_bytes=1024) as servers:
        async with PsClient(servers[0].address) as c:
            run = await c.create_run(spec)
            (a,) = await _join_all(c, run.run_id, 1)
            plane = Shards.beside(c, a.shard_map, a.spec)
            for clock in range(3):
                await plane.pull(run.run_id, a.rank, a.incarnation, clock)
                await plane.push(run.run_id, a.rank, a.incarnation, clock, {"w": np.ones(shapes["w"], np.float32)})
            assert [sc.route.opened["shm"] for sc in plane.clients] == [2, 2]  # each server's, through shared memory
            await plane.close()
            assert all(s.registry.get(run.run_id).store.nbytes <= 50_000 for s in servers)


@pytest.mark.parametrize(("limits", "refused_by"), [((65_000, 100_000), None), ((100_000, 65_000), 1),
                                                    ((55_000, 100_000), 0)],
                         ids=["peer-larger", "peer-smaller", "owner-smaller"])
async def test_each_server_checks_its_own_shard_against_its_own_max_param_bytes(
        server_config: ServerConfig, limits: tuple[int, int], refused_by: int | None) -> None:
    """Servers of one cluster may have different --max-param-bytes: a run is refused only by a
    server whose own shard is over its own limit, and the refusal names that server and limit."""
    spec = make_spec(shapes={"a": (150, 100), "b": (100, 100), "c": (75, 100)}, num_workers=1)  # 60 kB, 40, 30
    async with cluster(server_config, 2, lambda i: {"max_param_bytes": limits[i]}, split_bytes=1 << 30) as servers:
        async with PsClient(servers[0].address, timeout=20) as c:
            if refused_by is None:
                run = await c.create_run(spec)
                assert [s.bytes_held for s in run.shards] == [60_000, 70_000]  # server 1: over server 0's limit
                return
            with pytest.raises(errors.ResourceExhausted) as e:
                await c.create_run(spec)
            assert f"server {refused_by} ({servers[refused_by].address})" in e.value.message
            assert f"limit of {limits[refused_by]}" in e.value.message and "--max-param-bytes" in e.value.message
            assert await c.list_runs() == []  # nothing half-created
            assert all(not s.registry.runs() for s in servers)


async def test_a_server_whose_runs_hold_its_max_total_bytes_refuses_its_shard_of_another(
        server_config: ServerConfig) -> None:
    """Each server checks what its own shards hold together against its own --max-total-bytes: a
    refusal names that server and the runs it holds, and server 0 counts nothing of the run it had
    built for it (else its budget shrank with each refusal)."""
    spec = make_spec(shapes={"a": (100, 100), "b": (100, 100)}, num_workers=1)  # 40 kB each, one per server
    limits = (100_000, 60_000)
    async with cluster(server_config, 2, lambda i: {"max_total_bytes": limits[i]}, split_bytes=1 << 30) as servers:
        async with PsClient(servers[0].address, timeout=20) as c:
            first = await c.create_run(spec)
            with pytest.raises(errors.ResourceExhausted) as e:
                await c.create_run(spec)
            message = e.value.message
            assert f"server 1 ({servers[1].address})" in message and "--max-total-bytes" in message, message
            assert "shard of the run needs 40000 bytes" in message and f"{first.run_id} 40000 bytes" in message, message
            assert [r.run_id for r in servers[0].registry.runs()] == [first.run_id]
            assert [s.registry.held_bytes() for s in servers] == [40_000, 40_000]
            await c.delete_run(first.run_id, force=True)
            await c.create_run(spec)


async def test_server_0_waits_for_a_large_shard_to_be_drawn_as_long_as_its_size_needs(
        server_config: ServerConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Drawing a shard's initial values takes seconds per GiB: server 0's CreateShard deadline grows
    with the shard's bytes as the client's CreateRun deadline grows with the model's, or a model
    large enough to need several servers could never be created (here the bytes are few and the
    time per byte large: server 1 takes 1 s to create a shard server 0 would wait 0.4 s for)."""
    from ps_server.cluster import owner

    monkeypatch.setattr(owner, "BUILD_SECONDS_PER_GIB", 1 << 20)  # (a shard of 40 kB: ~40 s)
    async with cluster(server_config, 2, split_bytes=1024) as servers:
        assert servers[0].cluster is not None
        monkeypatch.setattr(servers[0].cluster, "_timeout", 0.1)
        slow = servers[1].registry
        create_shard = slow.create_shard

        async def slowly(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(1)
            return await create_shard(*args, **kwargs)

        monkeypatch.setattr(slow, "create_shard", slowly)
        async with PsClient(servers[0].address, timeout=20) as c:
            run = await c.create_run(make_spec(shapes={"w": (200, 100)}, num_workers=1))
            assert [s.bytes_held for s in run.shards] == [40_000, 40_000]
            assert servers[1].registry.find(run.run_id) is not None


async def test_a_create_run_with_a_server_down_names_it_before_the_client_gives_up(
        server_config: ServerConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Server 0 waits for a server that does not answer about as long as for any call to it (its
    shard's size adds to that only once it answers): CreateRun fails naming that server, within
    the client's deadline, not with the client's 'no answer from server 0 in time'; psctl says so,
    not that server 0 cannot be reached."""
    from typer.testing import CliRunner

    from client.cli import app

    async with cluster(server_config, 2, split_bytes=1024) as servers:
        assert servers[0].cluster is not None
        monkeypatch.setattr(servers[0].cluster, "_timeout", 1.0)
        down = servers[1].address
        await servers[1].stop(0)
        async with PsClient(servers[0].address, timeout=3) as c:
            with pytest.raises(errors.Unavailable) as e:
                await c.create_run(make_spec(num_workers=1))
            assert down in e.value.message, e.value.message
            assert await c.list_runs() == []
        result = await asyncio.to_thread(CliRunner().invoke, app, [
            "launch", "--model", "softmax", "--dataset", "digits", "--workers", "1", "--server", servers[0].address,
            "--timeout", "3"])
    assert result.exit_code == 1
    assert down in result.stderr and "Start one with" not in result.stderr, result.stderr  # server 0 answered


async def test_a_create_run_its_caller_gave_up_on_leaves_no_shard_on_any_server(server_config: ServerConfig,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Server 2 takes long to create its shard and the client's CreateRun deadline passes while
    server 0 waits for it: the run does not exist, and no server keeps a shard of it (server 1's,
    created at once, is deleted too)."""
    async with cluster(server_config, 3) as servers:
        slow = servers[2].registry
        create_shard, ended = slow.create_shard, asyncio.Event()

        async def slowly(*args: Any, **kwargs: Any) -> Any:
            try:
                await asyncio.sleep(2)
                return await create_shard(*args, **kwargs)
            finally:
                ended.set()

        monkeypatch.setattr(slow, "create_shard", slowly)
        async with PsClient(servers[0].address, timeout=0.5) as c:
            with pytest.raises(errors.DeadlineExceeded):
                await c.create_run(make_spec(num_workers=1))
        await until(lambda: not servers[1].registry.runs(), 5)
        assert servers[1].registry.runs() == [], "server 1 kept the shard of a run that does not exist"
        await asyncio.wait_for(ended.wait(), 5)  # server 2's CreateShard ended (cancelled, or created)
        assert [s.registry.runs() for s in servers] == [[], [], []]


async def test_a_run_deleted_while_server_0_tells_the_servers_of_an_eviction_does_not_end_its_lease_checks(
        server_config: ServerConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs' ranks are evicted at once, and while server 0 waits for server 1 (down) to hear of
    the first eviction, the other run is deleted: the lease checks go on (they ended with the
    deleted run's NotFound, and no lease expired on server 0 again)."""
    async with cluster(server_config, 2, lease_seconds=1.0, heartbeat_seconds=0.2, shard_timeout=60.0) as servers:
        owner, registry = servers[0].cluster, servers[0].registry
        assert owner is not None
        monkeypatch.setattr(owner, "_timeout", 0.5)
        async with PsClient(servers[0].address, timeout=10) as c:
            first, second, third = [await c.create_run(make_spec(num_workers=1)) for _ in range(3)]
            await servers[1].stop(0)
            expire, batch = registry.expire_leases, []

            def together(lease: float) -> list[tuple[str, int]]:  # (the first two runs' evictions in one sweep)
                batch.extend(expire(lease))
                ids = {run_id for run_id, _ in batch}
                if {first.run_id, second.run_id} <= ids:
                    out = sorted(batch, key=lambda e: e[0] != first.run_id)
                    batch.clear()
                    return out
                return []

            sync = owner.sync

            async def deleting(run: Any, timeout: float | None = None) -> None:
                if run.run_id == first.run_id and registry.find(second.run_id) is not None:
                    registry.remove(second.run_id)  # (as a DeleteRun during the wait)
                await sync(run, timeout)

            monkeypatch.setattr(registry, "expire_leases", together)
            for run in (first, second):
                await _join_all(c, run.run_id, 1)  # and silent from now on
            monkeypatch.setattr(owner, "sync", deleting)
            await until(lambda: registry.find(second.run_id) is None, 10)
            monkeypatch.setattr(registry, "expire_leases", expire)
            (late,) = await _join_all(c, third.run_id, 1)
            await until(lambda: registry.get(third.run_id).clock.slots[0].state.value == "evicted", 10)
            assert registry.get(third.run_id).clock.slots[0].state.value == "evicted", "leases no longer expire"


async def test_runs_forgotten_past_the_retention_limits_hold_up_neither_lease_checks_nor_each_other(
        server_config: ServerConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Server 1 is cut off (a partition: its DeleteShard is neither refused nor answered) while
    finished runs pass --keep-finished-runs: each forgotten run waits for it on its own, and a
    silent worker's lease expires meanwhile (the sweep deleted them one after another before it
    checked leases again: no lease expired for as long as server 1 was waited for, each time)."""
    async with cluster(server_config, 2, lease_seconds=1.0, heartbeat_seconds=0.2, keep_finished_runs=1) as servers:
        owner, registry = servers[0].cluster, servers[0].registry
        assert owner is not None
        (peer,) = owner._peers
        call, waiting = peer.call, []

        async def partitioned(method: str, request: Any, *args: Any, **kw: Any) -> Any:
            if method == "DeleteShard":
                waiting.append(request.run_id)
                await asyncio.Event().wait()  # (no answer, ever)
            return await call(method, request, *args, **kw)

        monkeypatch.setattr(peer, "call", partitioned)
        async with PsClient(servers[0].address, timeout=10) as c:
            old = [await c.create_run(make_spec(num_workers=1)) for _ in range(3)]
            live = await c.create_run(make_spec(num_workers=1))
            for run in old:
                await c.stop_run(run.run_id)
            await until(lambda: len(waiting) == 2, 10)
            assert sorted(waiting) == sorted(r.run_id for r in old[:2]), "the second waited for the first"
            await _join_all(c, live.run_id, 1)  # and silent from now on
            await until(lambda: registry.get(live.run_id).clock.slots[0].state.value == "evicted", 10)
            assert registry.get(live.run_id).clock.slots[0].state.value == "evicted", "no lease expires"


async def test_a_server_that_does_not_answer_an_eviction_holds_up_no_other_lease(
        server_config: ServerConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Server 1 is cut off (a partition: UpdateShard neither refused nor answered) when a rank of
    one run is evicted: a rank of another run that falls silent after is evicted on time (the sweep
    waited for server 1 to hear of the first eviction, its call's whole timeout, before it checked
    leases again)."""
    async with cluster(server_config, 2, lease_seconds=1.0, heartbeat_seconds=0.2) as servers:
        owner, registry = servers[0].cluster, servers[0].registry
        assert owner is not None
        monkeypatch.setattr(owner, "_timeout", 60.0)
        (peer,) = owner._peers
        call = peer.call

        async def partitioned(method: str, request: Any, *args: Any, **kw: Any) -> Any:
            if method == "UpdateShard":
                await asyncio.Event().wait()  # (no answer, ever)
            return await call(method, request, *args, **kw)

        async with PsClient(servers[0].address, timeout=10) as c:
            first, second = [await c.create_run(make_spec(num_workers=1)) for _ in range(2)]
            (a,) = await _join_all(c, first.run_id, 1)  # silent from now on
            (b,) = await _join_all(c, second.run_id, 1)
            monkeypatch.setattr(peer, "call", partitioned)
            state = lambda run: registry.get(run.run_id).clock.slots[0].state.value  # noqa: E731
            for _ in range(100):  # b heartbeats until a is evicted
                await c.heartbeat(second.run_id, b.rank, b.incarnation, 0)
                if state(first) == "evicted":
                    break
                await asyncio.sleep(0.1)
            assert state(first) == "evicted"
            await until(lambda: state(second) == "evicted", 10)
            assert state(second) == "evicted", "no lease expires while server 1 is waited for"


async def test_a_deletion_under_way_when_server_0_stops_is_written_down_for_its_next_start(
        server_config: ServerConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run forgotten past --keep-finished-runs while server 1 does not answer its DeleteShard (its
    disk hangs): server 0 stops meanwhile. The deletion is written down as not delivered (server 0's
    next start tells server 1), not dropped with the stop (server 1 kept the shard of a run nobody
    knew, and resumed it at each start)."""
    async with cluster(server_config, 2, lambda i: {"data_dir": str(tmp_path / str(i))}, keep_finished_runs=1,
                       split_bytes=1024) as servers:
        assert servers[0].cluster is not None and servers[1].checkpointer is not None
        monkeypatch.setattr(servers[0].cluster, "_timeout", 60.0)
        asked = asyncio.Event()

        async def hanging(run_id: str, forget: Callable[[], object] = lambda: None) -> str:
            asked.set()
            await asyncio.Event().wait()  # (no answer, ever)
            return ""

        monkeypatch.setattr(servers[1].checkpointer, "delete", hanging)
        async with PsClient(servers[0].address, timeout=10) as c:
            old, new = [await c.create_run(make_spec(shapes={"w": (40, 30)}, num_workers=1)) for _ in range(2)]
            await c.stop_run(old.run_id)
            await c.stop_run(new.run_id)
            await asyncio.wait_for(asked.wait(), 10)  # server 0 waits for server 1's answer
            await asyncio.wait_for(servers[0].stop(0), 10)
    written = json.loads((tmp_path / "0" / "undelivered-deletions.json").read_text())
    assert written == {old.run_id: [1]}


@pytest.mark.parametrize("started_by", ["delete_run", "create_run"])
async def test_a_deletion_a_caller_started_is_written_down_when_server_0_stops_under_way(
        server_config: ServerConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started_by: str) -> None:
    """Server 0 stops while a deletion goes on after its caller gave up: a DeleteRun's, or that of a
    CreateRun's shards (server 1 was slow to create its own and the deadline passed), and server 1
    does not answer its DeleteShard (its disk hangs). The stop waits for it (as for the retention
    limits' deletions) once its links are closed, and server 1 is written down as not told (the
    stop did not wait: the deletion was cut short with the event loop, nothing written, and
    server 1 kept the shard of a run nobody knew)."""
    async with cluster(server_config, 2, lambda i: {"data_dir": str(tmp_path / str(i))}, split_bytes=1024) as servers:
        assert servers[0].cluster is not None and servers[1].checkpointer is not None
        monkeypatch.setattr(servers[0].cluster, "_timeout", 60.0)
        asked, created = asyncio.Event(), asyncio.Event()

        async def hanging(run_id: str, forget: Callable[[], object] = lambda: None) -> str:
            asked.set()
            await asyncio.Event().wait()  # (no answer, ever)
            return ""

        create_shard = servers[1].registry.create_shard

        async def late(*args: Any, **kwargs: Any) -> Any:
            await created.wait()  # (until the caller has given up)
            return await create_shard(*args, **kwargs)

        monkeypatch.setattr(servers[1].registry, "create_shard", late)
        monkeypatch.setattr(servers[1].checkpointer, "delete", hanging)
        async with PsClient(servers[0].address, timeout=2) as c:
            if started_by == "delete_run":
                created.set()
                run_id = (await c.create_run(make_spec(shapes={"w": (40, 30)}, num_workers=1))).run_id
                call = asyncio.ensure_future(c.delete_run(run_id, force=True))
                await asyncio.wait_for(asked.wait(), 10)
                call.cancel()  # (the caller gives up)
                with pytest.raises(asyncio.CancelledError):
                    await call
            else:
                with pytest.raises(errors.DeadlineExceeded):
                    await c.create_run(make_spec(shapes={"w": (40, 30)}, num_workers=1))
                created.set()
                await asyncio.wait_for(asked.wait(), 10)
        await asyncio.wait_for(servers[0].stop(0), 10)
        written = json.loads((tmp_path / "0" / "undelivered-deletions.json").read_text())
        assert list(written.values()) == [[1]], written
        if started_by == "delete_run":
            assert written == {run_id: [1]} and not (tmp_path / "0" / run_id).exists()


async def test_a_delete_run_its_caller_gave_up_on_still_deletes_every_shard(
        server_config: ServerConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeleteRun deletes the run's checkpoints, forgets it, and has every server delete its shard:
    a caller that gives up meanwhile (server 0's checkpoints take long to delete) does
    not leave the shards behind, held for ever by servers nobody will tell again."""
    async with cluster(server_config, 2, lambda i: {"data_dir": str(tmp_path / str(i))}, split_bytes=1024) as servers:
        assert servers[0].checkpointer is not None
        async with PsClient(servers[0].address, timeout=10) as c:
            run = await c.create_run(make_spec(shapes={"w": (40, 30)}, num_workers=1))
        delete, deleting = servers[0].checkpointer.delete, asyncio.Event()

        async def slowly(run_id: str, forget: Callable[[], object]) -> str:
            deleting.set()
            await asyncio.sleep(1)
            return await delete(run_id, forget)

        monkeypatch.setattr(servers[0].checkpointer, "delete", slowly)
        async with PsClient(servers[0].address, timeout=10) as c:
            call = asyncio.ensure_future(c.delete_run(run.run_id, force=True))
            await asyncio.wait_for(deleting.wait(), 5)
            call.cancel()  # (the caller gives up: its deadline, Ctrl-C)
            with pytest.raises(asyncio.CancelledError):
                await call
        await until(lambda: servers[1].registry.find(run.run_id) is None, 5)
        assert servers[1].registry.find(run.run_id) is None, "server 1 kept the shard of the deleted run"
        await until(lambda: not (tmp_path / "0" / run.run_id).exists(), 5)
        assert not (tmp_path / "0" / run.run_id).exists() and not (tmp_path / "1" / run.run_id).exists()


async def test_a_shard_deleted_while_it_is_created_is_not_created(server_config: ServerConfig,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """DeleteShard reaches a server while its CreateShard of the run still draws the values (server
    0 gave up on it, and its cancellation has not reached this server's handler yet): the
    creation ends refused, and the server holds no shard of the run, whichever came first."""
    from paramserver.v1 import cluster_pb2 as cpb
    from ps_server import codec
    from ps_server.cluster.shards import ShardService
    from ps_server.core.errors import PsError

    async with cluster(server_config, 2, split_bytes=1024) as servers:
        async with PsClient(servers[0].address, timeout=10) as c:
            spec = make_spec(shapes={"w": (40, 30)}, num_workers=1)
            run = await c.create_run(spec)
        registry = servers[1].registry
        service = ShardService(registry, [s.address for s in servers], 1, lambda: 0)
        request = cpb.CreateShardRequest(run_id="run-late", spec=spec, shard_map=run.shard_map, index=1,
                                         created=codec.ts(0.0))
        build, drawing, drawn = registry.build, asyncio.Event(), asyncio.Event()

        async def slowly(*args: Any, **kwargs: Any) -> Any:
            drawing.set()
            await drawn.wait()
            return await build(*args, **kwargs)

        monkeypatch.setattr(registry, "build", slowly)
        creating = asyncio.ensure_future(service.CreateShard(request))
        await asyncio.wait_for(drawing.wait(), 5)
        await service.DeleteShard(cpb.DeleteShardRequest(run_id="run-late"))
        drawn.set()
        with pytest.raises(PsError, match="deleted"):
            await creating
        assert registry.find("run-late") is None
        with pytest.raises(PsError, match="deleted"):  # and one that comes after its deletion
            await service.CreateShard(request)
        assert registry.find("run-late") is None


async def test_a_server_that_stays_down_fails_every_run_naming_it(server_config: ServerConfig) -> None:
    """Each of the runs it held a shard of fails (the owner asks it about the first one only, each
    time, and does not wait as long again for each of the others), and shows it out of reach."""
    async with cluster(server_config, 2, shard_timeout=1.0) as servers:
        async with PsClient(servers[0].address, timeout=10) as c:
            runs = [await c.create_run(make_spec(num_workers=1, staleness=0)) for _ in range(3)]
            for run in runs:
                await _join_all(c, run.run_id, 1)
            await asyncio.sleep(0.5)  # (the owner has asked the other server about each once)
            await servers[1].stop(0)
            for run in runs:
                async for snap in c.watch_run(run.run_id, interval=0.1):
                    if snap.run.state == pb.RUN_STATE_FAILED:
                        break
                assert servers[1].address in snap.run.message and "shard-timeout" in snap.run.message
                assert not snap.run.shards[1].reachable


async def test_psctl_status_of_a_finished_run_shows_a_server_that_went_down_as_unreachable(
        server_config: ServerConfig) -> None:
    """A finished run's shards are no longer asked for their status each poll, but whether their
    servers answer still is: psctl status says a server down is unreachable, and reachable again
    once it is back."""
    from typer.testing import CliRunner

    from client.cli import app

    def shards() -> list[dict[str, Any]]:
        result = CliRunner().invoke(app, ["status", run.run_id, "--server", servers[0].address, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["shards"]  # type: ignore[no-any-return]

    async with cluster(server_config, 2, shard_timeout=60.0) as servers:
        async with PsClient(servers[0].address, timeout=10) as c:
            run = await c.create_run(make_spec(num_workers=1))
            await c.stop_run(run.run_id)
            for _ in range(100):  # server 0 has heard server 1's final status: it stops asking for it
                if (await c.get_run(run.run_id)).shards[1].state == pb.RUN_STATE_STOPPED:
                    break
                await asyncio.sleep(0.1)
            assert [s["state"] for s in await asyncio.to_thread(shards)] == ["stopped", "stopped"]
            address = servers[1].address
            await servers[1].stop(0)
            for _ in range(100):
                if not (await c.get_run(run.run_id)).shards[1].reachable:
                    break
                await asyncio.sleep(0.1)
            down = (await asyncio.to_thread(shards))[1]
            assert (down["reachable"], down["state"]) == (False, "unreachable"), down
            assert address in down["error"], down
            back = await start_server(servers[1].config)
            try:
                for _ in range(100):
                    if (await c.get_run(run.run_id)).shards[1].reachable:
                        break
                    await asyncio.sleep(0.1)
                assert [s["reachable"] for s in await asyncio.to_thread(shards)] == [True, True]
            finally:
                await back.stop(0)


async def test_a_server_back_without_a_finished_runs_shard_shows_so(server_config: ServerConfig,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The run ended while server 1 was down; server 1 came back without its shard (no
    --data-dir): the run's status shows server 1 reachable and that its shard is gone, not the
    'did not answer' of before, and server 0 stops asking it about the run."""
    async with cluster(server_config, 2, shard_timeout=60.0) as servers:
        assert servers[0].cluster is not None
        monkeypatch.setattr(servers[0].cluster, "_timeout", 0.5)
        async with PsClient(servers[0].address, timeout=10) as c:
            run = await c.create_run(make_spec(num_workers=1))
            await servers[1].stop(0)
            for _ in range(100):
                if not (await c.get_run(run.run_id)).shards[1].reachable:
                    break
                await asyncio.sleep(0.1)
            await c.stop_run(run.run_id)
            back = await start_server(servers[1].config)
            try:
                for _ in range(100):
                    if (shard := (await c.get_run(run.run_id)).shards[1]).reachable:
                        break
                    await asyncio.sleep(0.1)
                assert shard.reachable and "no longer holds its shard" in shard.error, shard
                assert shard.state == pb.RUN_STATE_STOPPED  # (settled: not asked again)
                assert servers[0].cluster._settled(servers[0].registry.get(run.run_id), servers[0].cluster._peers[0])
            finally:
                await back.stop(0)


async def test_psctl_export_with_a_server_down_names_it_not_the_server_it_asked(server_config: ServerConfig,
                                                                                tmp_path: Path) -> None:
    """Server 0 answers, server 1 is down: the export says that a server of the run did not answer
    (which one), not that the --server it reached cannot be reached, nor that the servers are going
    back to a checkpoint; the unreachable data plane is logged once, not on every retry."""
    from typer.testing import CliRunner

    from client.cli import app

    async with cluster(server_config, 2, shard_timeout=60.0) as servers:
        async with PsClient(servers[0].address, timeout=10) as c:
            run = await c.create_run(make_spec(num_workers=1))
            await servers[1].stop(0)
            result = await asyncio.to_thread(CliRunner().invoke, app, [
                "export", run.run_id, "--server", servers[0].address, "-o", str(tmp_path / "p.npz"), "--timeout", "2"])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: a server of {run.run_id} did not answer within 2s"), result.stderr
    assert servers[1].address in result.stderr and "Start one with" not in result.stderr, result.stderr
    assert result.stderr.count("unreachable") <= 1, result.stderr


@pytest.mark.parametrize("owner_restarts", [False, True], ids=["peer-restarts", "server-0-restarts-too"])
async def test_a_run_deleted_while_a_server_is_down_is_deleted_there_when_it_is_back(
        server_config: ServerConfig, tmp_path: Path, owner_restarts: bool) -> None:
    """Server 0 remembers (on disk) the servers it could not tell of a deletion and tells them when
    they answer: a restarted server does not keep, or resume, a shard of a run nobody knows."""
    async with cluster(server_config, 2, lambda i: {"data_dir": str(tmp_path / str(i))}, checkpoint_every=2,
                       split_bytes=1024) as servers:
        later: list[PsServer] = []
        try:
            async with PsClient(servers[0].address, timeout=10) as c:
                run = await c.create_run(make_spec(shapes={"w": (40, 30)}, num_workers=1))
            await servers[1].stop(0)  # its shard's last checkpoint written
            assert servers[1].checkpointer and servers[1].checkpointer.store.cuts(run.run_id)
            async with PsClient(servers[0].address, timeout=10) as c:
                await c.delete_run(run.run_id, force=True)  # server 1 is not there to hear it
            owner = servers[0]
            if owner_restarts:
                await owner.stop(0)
                owner = await start_server(servers[0].config)
                later.append(owner)
            back = await start_server(servers[1].config)
            later.append(back)
            assert back.checkpointer is not None
            await until(lambda: back.registry.find(run.run_id) is None and not (tmp_path / "1" / run.run_id).exists(), 10)
            assert back.registry.find(run.run_id) is None, "the restarted server kept the deleted run's shard"
            assert not (tmp_path / "1" / run.run_id).exists(), "the restarted server kept its checkpoints"
            assert owner.registry.find(run.run_id) is None
        finally:
            for s in reversed(later):
                await s.stop(0)


# ------------------------------------------------------------------------------ checkpoints
async def test_checkpoint_run_takes_every_servers_snapshot_at_one_cut(server_config: ServerConfig, tmp_path: Path) -> None:
    """psctl checkpoint on a cluster: every server writes its shard at the same clock (the next
    one none has reached), so the cluster can go back to it."""
    async with cluster(server_config, 2, lambda i: {"data_dir": str(tmp_path / str(i))}, checkpoint_every=0,
                       split_bytes=1024) as servers:
        async with PsClient(servers[1].address, timeout=20) as c:
            run = await c.create_run(make_spec(shapes={"w": (40, 30)}, num_workers=1, staleness=0, iterations=10))
            (a,) = await _join_all(c, run.run_id, 1)
            plane = Shards.beside(c, a.shard_map, a.spec)
            try:
                await plane.pull(run.run_id, 0, a.incarnation, 0)
                await plane.push(run.run_id, 0, a.incarnation, 0, {"w": np.ones((40, 30), np.float32)})
                done = asyncio.ensure_future(c.checkpoint_run(run.run_id))  # at clock 2: waits for it
                await asyncio.sleep(0.3)
                assert not done.done()
                await plane.push(run.run_id, 0, a.incarnation, 1, {"w": np.ones((40, 30), np.float32)})
                ckpt = await done
            finally:
                await plane.close()
            assert ckpt.min_clock == 2
            assert [s.checkpointer.store.cuts(run.run_id) for s in servers] == [[2, 0], [2, 0]]  # type: ignore[union-attr]


async def test_a_sharded_run_is_on_every_servers_disk_when_create_run_answers(server_config: ServerConfig,
                                                                             tmp_path: Path) -> None:
    """Every server writes its shard at cut 0 before CreateRun answers: a server killed before the
    first periodic cut (here server 1: a copy of its data directory as a kill -9 would leave it,
    which it restarts from) is a server that goes back to cut 0 with the others, not one that lost
    its parameters and fails the run."""
    import shutil

    async with cluster(server_config, 2, lambda i: {"data_dir": str(tmp_path / str(i))}, checkpoint_every=50,
                       split_bytes=1024) as servers:
        async with PsClient(servers[0].address, timeout=10) as c:
            run = await c.create_run(make_spec(shapes={"w": (40, 30)}, num_workers=1, staleness=0, iterations=20))
            assert [s.checkpointer.store.cuts(run.run_id) for s in servers] == [[0], [0]]  # type: ignore[union-attr]
            shutil.copytree(tmp_path / "1", tmp_path / "1-killed", ignore=shutil.ignore_patterns(".lock"))
            (a,) = await _join_all(c, run.run_id, 1)
            plane = Shards.beside(c, a.shard_map, a.spec)
            try:
                for clock in range(3):
                    await plane.pull(run.run_id, 0, a.incarnation, clock)
                    await plane.push(run.run_id, 0, a.incarnation, clock, {"w": np.ones((40, 30), np.float32)})
            finally:
                await plane.close()
            await servers[1].stop(0)
            back = await start_server(with_config(servers[1].config, data_dir=str(tmp_path / "1-killed")))
            try:
                for _ in range(100):  # server 0 polls each second
                    got, kinds = await c.get_run(run.run_id), [e.kind for e in (await c.get_metrics(run.run_id)).events]
                    if got.state == pb.RUN_STATE_FAILED or "rolled_back" in kinds:
                        break
                    await asyncio.sleep(0.1)
                assert got.state != pb.RUN_STATE_FAILED, got.message
                assert "rolled_back" in kinds, kinds
                assert [s.registry.get(run.run_id).min_clock for s in (servers[0], back)] == [0, 0]
            finally:
                await back.stop(0)


async def test_a_server_that_cannot_checkpoint_at_the_same_cuts_is_refused(server_config: ServerConfig,
                                                                            tmp_path: Path) -> None:
    async with cluster(server_config, 2, lambda i: {"data_dir": str(tmp_path / str(i)),
                                                    "checkpoint_every": (10, 20)[i]}) as servers:
        async with PsClient(servers[0].address, timeout=20) as c:
            with pytest.raises(errors.FailedPrecondition, match="same --checkpoint-every"):
                await c.create_run(make_spec(num_workers=1))
            assert await c.list_runs() == []  # nothing half-created


async def test_a_run_resumed_on_a_cluster_of_another_size_fails_saying_why(server_config: ServerConfig,
                                                                           tmp_path: Path) -> None:
    async with cluster(server_config, 2, lambda i: {"data_dir": str(tmp_path / str(i))}) as servers:
        async with PsClient(servers[0].address, timeout=20) as c:
            run = await c.create_run(make_spec(num_workers=1))
    # (stopped: the shutdown checkpoints)
    alone = await start_server(with_config(server_config, data_dir=str(tmp_path / "0")))
    try:
        async with PsClient(alone.address, timeout=20) as c:
            got = await c.get_run(run.run_id)
            assert got.state == pb.RUN_STATE_FAILED
            assert "placed over 2 server(s)" in got.message and "--cluster" in got.message
    finally:
        await alone.stop(0)


async def test_the_retention_limits_leave_a_run_of_another_cluster_size_to_the_servers_it_was_created_on(
        server_config: ServerConfig, tmp_path: Path) -> None:
    """A run of two servers resumed by three (a wrong --cluster) is not forgotten past
    --keep-finished-seconds as a finished run of theirs is: the two resume it, whole, once started
    as they were. (Server 0 deleted its checkpoints and had server 1 delete its shard, and a run of
    three servers resumed by two left the third's shard for ever.)"""
    dirs = lambda i: {"data_dir": str(tmp_path / str(i))}  # noqa: E731
    async with cluster(server_config, 2, dirs) as servers:
        async with PsClient(servers[0].address, timeout=20) as c:
            run = await c.create_run(make_spec(num_workers=1))
    async with cluster(server_config, 3, dirs, keep_finished_seconds=0.01, lease_seconds=1.0,
                       heartbeat_seconds=0.2) as servers:
        async with PsClient(servers[0].address, timeout=20) as c:
            assert (await c.get_run(run.run_id)).state == pb.RUN_STATE_FAILED
            theirs = await c.create_run(make_spec(num_workers=1))
            await c.stop_run(theirs.run_id)
            await until(lambda: servers[0].registry.find(theirs.run_id) is None, 10)
            assert servers[0].registry.find(theirs.run_id) is None, "the retention limits forget nothing"
            assert servers[0].registry.find(run.run_id) is not None
            assert [bool(s.checkpointer.store.cuts(run.run_id)) for s in servers] == [True, True, False]  # type: ignore[union-attr]
    async with cluster(server_config, 2, dirs) as servers:
        async with PsClient(servers[0].address, timeout=20) as c:
            assert (await c.get_run(run.run_id)).state == pb.RUN_STATE_PENDING


async def test_a_watch_follows_a_run_restored_while_it_was_not_parked(server_config: ServerConfig) -> None:
    """A roll back replaces the run object: WatchRun goes on with the restored one, whenever it
    happened (here while the watcher sleeps between snapshots)."""
    from ps_server.core import snapshot

    async with cluster(server_config, 2) as servers:
        async with PsClient(servers[0].address, timeout=10) as c:
            run = await c.create_run(make_spec(num_workers=2))
            registry = servers[0].registry
            copy = snapshot.restore(*snapshot.state_dict(registry.get(run.run_id)))
            seen = []
            async for snap in c.watch_run(run.run_id, interval=0.3):
                seen.append(snap.run.active_workers)
                if len(seen) == 1:
                    registry.replace(copy, "restored")  # the watcher is asleep (interval)
                    await _join_all(c, run.run_id, 2)  # changes only the restored run
                if snap.run.active_workers == 2:
                    break
            assert seen[0] == 0 and seen[-1] == 2


async def test_a_roll_back_keeps_incarnations_given_out_after_the_cut(server_config: ServerConfig) -> None:
    """Going back to a cut must not hand an incarnation number out twice: a rank given to another
    worker after the cut is evicted (its new holder joins again, with a fresh number). A bound the
    run had after the cut stays one it had (its clock records were taken under it)."""
    from ps_server.cluster.recovery import Recovery
    from ps_server.core import snapshot

    async with cluster(server_config, 2) as servers:
        async with PsClient(servers[0].address, timeout=10) as c:
            run = await c.create_run(make_spec(num_workers=2, staleness=-1))
            a, b = await _join_all(c, run.run_id, 2)
            live = servers[0].registry.get(run.run_id)
            at_cut = snapshot.restore(*snapshot.state_dict(live))
            await c.leave(run.run_id, b.rank, b.incarnation, pb.LEAVE_REASON_SHUTDOWN)
            b2 = (await c.join("w3", run.run_id, max_wait=0)).assignment  # rank 1 again, a new incarnation
            live.had(3)  # (as a schedule's step after the cut would)
            Recovery._renumber(live, at_cut)
            assert at_cut.bounds == (3, -1)
            assert at_cut.clock.next_incarnation == live.clock.next_incarnation > b2.incarnation
            assert at_cut.clock.slots[b.rank].state.value == "evicted"  # b2's rank: b2 must join again
            assert at_cut.clock.slots[a.rank].state.value == "active"  # untouched


@pytest.mark.parametrize("then_pull", [True, False], ids=["push_pull", "push"])
async def test_a_push_a_roll_back_took_from_one_shard_is_sent_again_to_every_shard(
        server_config: ServerConfig, tmp_path: Path, then_pull: bool) -> None:
    """BSP: a shard acknowledged rank 0's push of the cut's clock, then went back to the cut without
    it. The retry of that push must go to every shard, not only to the one that had not
    acknowledged: else that one completes the clock while the other waits for the push for ever
    (the worker, told to go back to that clock, pulls answers of two clocks and never pushes)."""
    async with cluster(server_config, 2, lambda i: {"data_dir": str(tmp_path / str(i))}, checkpoint_every=2,
                       split_bytes=1024) as servers:
        async with PsClient(servers[0].address, timeout=10) as c:
            run = await c.create_run(make_spec(shapes={"w": (40, 30)}, num_workers=2, staleness=0, iterations=6))
            a, b = await _join_all(c, run.run_id, 2)
            pa, pb_ = (Shards.beside(c, x.shard_map, x.spec) for x in (a, b))
            grads = {"w": np.ones((40, 30), np.float32)}

            async def both(clock: int) -> None:
                await asyncio.gather(*(p.pull(run.run_id, x.rank, x.incarnation, clock) for p, x in ((pa, a), (pb_, b))))
                await asyncio.gather(*(p.push(run.run_id, x.rank, x.incarnation, clock, grads)
                                       for p, x in ((pa, a), (pb_, b))))

            async def retrying(op: Callable[[], Awaitable[Any]]) -> Any:  # as worker.retries.Retries.call
                for _ in range(40):
                    try:
                        return await op()
                    except errors.PsError as exc:
                        if not exc.retryable:
                            raise
                        last = exc
                        await asyncio.sleep(0.05)
                raise AssertionError(f"never served: {last}")

            try:
                await both(0)
                await both(1)
                await pa.pull(run.run_id, a.rank, a.incarnation, 2)  # rank 0's parameters of clock 2
                assert servers[0].checkpointer and servers[1].checkpointer
                async with asyncio.timeout(10):  # cut 2 on disk on both servers
                    while not all(2 in s.checkpointer.store.cuts(run.run_id) for s in servers):  # type: ignore[union-attr]
                        await asyncio.sleep(0.05)
                servers[0].registry.get(run.run_id).held = "server 0 restarted"  # its push fails there
                with pytest.raises(errors.PsError) as held:
                    await pa.push(run.run_id, a.rank, a.incarnation, 2, grads)  # acknowledged by server 1 alone
                assert held.value.retryable
                assert servers[0].cluster is not None
                await servers[0].cluster.recovery.roll_back(servers[0].registry.get(run.run_id), "server 0 restarted")
                assert [s.registry.get(run.run_id).clock.slots[0].clock for s in servers] == [2, 2]  # push lost
                other = asyncio.ensure_future(pb_.push_pull(run.run_id, b.rank, b.incarnation, 2, grads))
                params: dict[str, np.ndarray] = {}
                if then_pull:  # the worker's retry of the same call
                    await retrying(partial(pa.push_pull, run.run_id, a.rank, a.incarnation, 2, grads, into=params))
                else:
                    await retrying(partial(pa.push, run.run_id, a.rank, a.incarnation, 2, grads))
                    await retrying(partial(pa.pull, run.run_id, a.rank, a.incarnation, 3, into=params))
                async with asyncio.timeout(10):
                    await other
                assert [s.registry.get(run.run_id).min_clock for s in servers] == [3, 3]
                assert [s.registry.get(run.run_id).counters.pushes_applied for s in servers] == [6, 6]  # each once
            finally:
                await pa.close()
                await pb_.close()


@pytest.mark.parametrize("when", ["restarted", "during"], ids=["a-server-restarted", "roll-back-during-the-read"])
async def test_an_export_during_a_roll_back_waits_for_one_history(
        server_config: ServerConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """psctl export of a sharded run while its servers go back to a common cut (server 1 restarted
    from an older checkpoint; or the roll back happens while the pieces are read) never puts
    together pieces of two histories: it waits for the roll back, or refuses, saying why."""
    from ps_server.cluster.owner import ClusterOwner
    from ps_server.cluster.shards import restore

    async def not_yet(self: ClusterOwner) -> None:  # the roll back is this test's to start
        await asyncio.Event().wait()

    monkeypatch.setattr(ClusterOwner, "watch", not_yet)
    async with cluster(server_config, 2, lambda i: {"data_dir": str(tmp_path / str(i))}, checkpoint_every=2,
                       split_bytes=1024) as servers:
        assert servers[0].cluster is not None and servers[1].checkpointer is not None
        async with PsClient(servers[0].address, timeout=10) as c:
            run = await c.create_run(make_spec(shapes={"w": (40, 30)}, num_workers=1, staleness=0, iterations=20))
            (a,) = await _join_all(c, run.run_id, 1)
            init = (await pull_run(c, run.run_id)).tensors["w"]
            plane = Shards.beside(c, a.shard_map, a.spec)
            try:
                for clock in range(5):  # w = init - 5; cuts 2 and 4 on both servers
                    await plane.pull(run.run_id, 0, a.incarnation, clock)
                    await plane.push(run.run_id, 0, a.incarnation, clock, {"w": np.ones((40, 30), np.float32)})
            finally:
                await plane.close()
            await asyncio.gather(*(s.checkpointer.drain() for s in servers))  # type: ignore[union-attr]
            assert all(4 in s.checkpointer.store.cuts(run.run_id) for s in servers)  # type: ignore[union-attr]

            async def roll_back() -> None:
                assert servers[0].cluster is not None
                await servers[0].cluster.recovery.roll_back(servers[0].registry.get(run.run_id),
                                                           "a server restarted")

            if when == "restarted":  # server 1 killed and restarted: its shard resumed at cut 4, held
                resumed = await restore(servers[1].registry, servers[1].checkpointer, run.run_id, 4, "restarted")
                resumed.held = "this server restarted: retry"
                with pytest.raises(errors.PsError) as refused:
                    await pull_run(c, run.run_id, wait=0.5)
                assert refused.value.retryable and "going back to a checkpoint" in refused.value.message
                assert "export again" in refused.value.message
                export = asyncio.ensure_future(pull_run(c, run.run_id))
                await asyncio.sleep(0.5)
                assert not export.done(), "the export read the shards while server 1 was held"
                await roll_back()
            else:  # server 1's piece is read before the roll back, server 0's after it
                read = PsClient.pull
                rolled = asyncio.Event()

                async def racing(self: PsClient, *args: Any, **kw: Any) -> Any:
                    if self.address == servers[0].address and not rolled.is_set():
                        await rolled.wait()
                    result = await read(self, *args, **kw)
                    if self.address == servers[1].address and not rolled.is_set():
                        await roll_back()
                        rolled.set()
                    return result

                monkeypatch.setattr(PsClient, "pull", racing)
                export = asyncio.ensure_future(pull_run(c, run.run_id))
            async with asyncio.timeout(10):
                got = (await export).tensors["w"]
            np.testing.assert_allclose(got, init - 4, rtol=1e-6)  # every piece of cut 4's history


async def test_a_watch_sees_the_end_of_a_roll_back(server_config: ServerConfig, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """psctl watch during a roll back shows server 0's shard held, then, once every server is
    back at the cut, not held and the 'rolled_back' event: the end of a roll back is a change a
    watcher is woken for, even when nothing else moves (here: its worker waits)."""
    async with _at_cut_2(server_config, tmp_path, monkeypatch) as (servers, c, run):
        assert servers[0].cluster is not None
        seen: list[pb.WatchRunResponse] = []

        async def watching() -> None:
            async for snap in c.watch_run(run.run_id, interval=0.05):
                seen.append(snap)

        from ps_server.cluster import shards

        restore = shards.restore

        async def slowly(*args: Any, **kwargs: Any) -> Any:  # server 1's RestoreShard: the watch sees it held
            await asyncio.sleep(0.5)
            return await restore(*args, **kwargs)

        monkeypatch.setattr(shards, "restore", slowly)
        watcher = asyncio.ensure_future(watching())
        try:
            await until(lambda: bool(seen), 5)
            await servers[0].cluster.recovery.roll_back(servers[0].registry.get(run.run_id), "server 1 restarted")
            await until(lambda: any(e.kind == "rolled_back" for s in seen for e in s.events), 5)
            assert any(s.run.shards[0].held for s in seen), "the watch never saw the roll back"
            assert any(e.kind == "rolled_back" for s in seen for e in s.events), "the watch never heard the end"
            assert not seen[-1].run.shards[0].held and seen[-1].run.min_clock == 2
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def test_psctl_export_of_a_run_whose_roll_back_failed_says_at_once_what_can_be_done(
        server_config: ServerConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Server 1 restarted from its checkpoint and the servers could not go back to a common cut
    (server 1 lost its older ones): the run failed, its pieces are of two histories for good. The
    export says so at once, and what the user can do, not 'export again' after the whole --timeout."""
    from typer.testing import CliRunner

    from client.cli import app
    from ps_server.cluster.shards import restore

    async with _at_cut_2(server_config, tmp_path, monkeypatch) as (servers, c, run):
        assert servers[0].cluster is not None and servers[1].checkpointer is not None
        resumed = await restore(servers[1].registry, servers[1].checkpointer, run.run_id, 2, "restarted")
        resumed.held = "this server restarted: retry"
        await asyncio.to_thread(servers[1].checkpointer.store.delete, run.run_id)  # (its disk was replaced)
        await servers[0].cluster.recovery.roll_back(servers[0].registry.get(run.run_id), "server 1 restarted")
        assert (await c.get_run(run.run_id)).state == pb.RUN_STATE_FAILED
        started = asyncio.get_running_loop().time()
        result = await asyncio.to_thread(CliRunner().invoke, app, [
            "export", run.run_id, "--server", servers[0].address, "-o", str(tmp_path / "p.npz"), "--timeout", "5"])
        took = asyncio.get_running_loop().time() - started
    assert result.exit_code == 1
    assert "export again" not in result.stderr and "in a moment" not in result.stderr, result.stderr
    assert "failed" in result.stderr and "no checkpoint cut is on every server" in result.stderr, result.stderr
    assert "--data-dir" in result.stderr, result.stderr  # where what is left of the run is
    assert took < 4, f"the export waited {took:.1f}s for what cannot happen"
    assert not (tmp_path / "p.npz").exists()


async def test_a_fast_run_keeps_a_cut_common_to_every_server_before_server_0_says_which(
        server_config: ServerConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Server 0's checkpoint writes lag (only its first cuts land: 0, at creation, and 2) and its poll has not yet told the
    others which cuts all servers have, while server 1 writes cut after cut: server 1 must not prune
    the one cut both have, or a crash now would lose the run (it must go back to that cut)."""
    from ps_server.cluster.owner import ClusterOwner

    async def not_yet(self: ClusterOwner) -> None:  # server 0's poll has not come round yet
        await asyncio.Event().wait()

    monkeypatch.setattr(ClusterOwner, "watch", not_yet)
    async with cluster(server_config, 2, lambda i: {"data_dir": str(tmp_path / str(i))}, checkpoint_every=2,
                       checkpoint_keep=2, split_bytes=1024) as servers:
        assert servers[0].checkpointer and servers[1].checkpointer and servers[0].cluster
        lagging, write = servers[0].checkpointer.store, servers[0].checkpointer.store.write

        def lags(meta: dict[str, Any], *args: Any, **kwargs: Any) -> Path:
            if meta["cut"] not in (0, 2):
                raise OSError("server 0's disk is behind (the write has not landed when it crashes)")
            return write(meta, *args, **kwargs)

        monkeypatch.setattr(lagging, "write", lags)
        async with PsClient(servers[0].address, timeout=10) as c:
            run = await c.create_run(make_spec(shapes={"w": (40, 30)}, num_workers=1, staleness=0, iterations=20))
            (a,) = await _join_all(c, run.run_id, 1)
            plane = Shards.beside(c, a.shard_map, a.spec)
            try:
                for clock in range(8):
                    await plane.pull(run.run_id, 0, a.incarnation, clock)
                    await plane.push(run.run_id, 0, a.incarnation, clock, {"w": np.ones((40, 30), np.float32)})
                    if (clock + 1) % 2 == 0:  # server 1 writes each cut before the next (none coalesced)
                        async with asyncio.timeout(10):
                            while clock + 1 not in servers[1].checkpointer.store.cuts(run.run_id):
                                await asyncio.sleep(0.02)
            finally:
                await plane.close()
            await asyncio.gather(*(s.checkpointer.drain() for s in servers))  # type: ignore[union-attr]
            on_disk = [s.checkpointer.store.cuts(run.run_id) for s in servers]  # type: ignore[union-attr]
            servers[0].registry.get(run.run_id).held = "server 0 restarted"
            restored = await servers[0].cluster.recovery.roll_back(servers[0].registry.get(run.run_id),
                                                                   "server 0 restarted")
            assert restored.state.value == "running", restored.message
            assert [s.registry.get(run.run_id).min_clock for s in servers] == [2, 2]
            assert on_disk == [[2, 0], [8, 6, 2, 0]]  # server 1: --checkpoint-keep 2, and its first two cuts


def test_server_0_changes_the_cuts_kept_only_when_every_server_keeps_one_it_keeps() -> None:
    """The cuts kept move on only once every server was told the current ones, and the older one
    kept is one every server still has: a server told late, or one that pruned the newer before it
    was told, still holds a cut server 0 holds."""
    from types import SimpleNamespace

    from ps_server.checkpointer import Checkpointer
    from ps_server.cluster.owner import ClusterOwner
    from ps_server.core.registry import RunRegistry

    mine: list[int] = []
    checkpointer = Checkpointer(SimpleNamespace(cuts=lambda run_id: list(mine)), every=5)  # type: ignore[arg-type]
    owner = ClusterOwner(RunRegistry(), ["a", "b"], [SimpleNamespace(index=1)],  # type: ignore[list-item]
                         split_bytes=0, shard_timeout=1, data_port=lambda: 0, checkpointer=checkpointer)
    run: Any = SimpleNamespace(run_id="r")

    def poll(theirs: list[int], told: bool = True) -> tuple[int, ...]:
        if told:  # GetShard answered, carrying the cuts kept now
            owner.cuts._cuts[("r", 1)], owner.cuts._told[("r", 1)] = theirs, checkpointer.protected.get("r", ())
        owner.cuts.keep_common_cut(run)
        return checkpointer.protected.get("r", ())

    mine[:] = [10, 5]
    assert poll([30, 25, 10, 5]) == (10, 5)  # the first: with the first cut, which every server keeps until told
    mine[:] = [20, 10, 5]
    assert poll([30, 25, 20, 10, 5], told=False) == (10, 5)  # server 1 has not been told (10, 5) yet: no change
    assert poll([35, 30, 20, 10]) == (20, 10)
    mine[:] = [40, 35, 20, 10]
    assert poll([40, 35, 10]) == (40, 10)  # server 1 lost 20 before it was told: 10, which it had kept, stays
    assert poll([45, 40, 10]) == (40, 10)
    checkpointer.protected.clear()  # a run with cut 0 (written at creation): the older kept is the first periodic
    mine[:] = [10, 5, 0]
    assert poll([30, 25, 10, 5, 0]) == (10, 5)  # (going back to cut 0, before any worker joined, sends them away)


def _with_table(shapes: dict[str, tuple[int, ...]], table: tuple[int, int]) -> pb.RunSpec:
    """One worker, s = 1, constant values, the dense ``shapes`` and a table "t" of ``table``'s shape."""
    spec = make_spec(shapes=shapes, num_workers=1, staleness=1, iterations=5, init=pb.INITIALIZER_CONSTANT)
    spec.params.append(pb.ParamSpec(name="t", shape=table, initializer=pb.INITIALIZER_CONSTANT, scale=1.0, table=True))
    return spec


@asynccontextmanager
async def _one_rank_on_two_shards(server_config: ServerConfig, spec: pb.RunSpec,
                                  ) -> AsyncIterator[tuple[list[PsServer], pb.Run, pb.Assignment, Shards]]:
    """Two servers splitting at 1 KiB, a run of ``spec`` on them, its one rank joined (each server
    holding some of its parameters) and that rank's pushes and pulls to both."""
    async with cluster(server_config, 2, split_bytes=1024) as servers:
        async with PsClient(servers[0].address, timeout=10) as c:
            run = await c.create_run(spec)
            (a,) = await _join_all(c, run.run_id, 1)
            assert all(s.pieces for s in a.shard_map.shards)
            plane = Shards.beside(c, a.shard_map, a.spec)
            try:
                yield servers, run, a, plane
            finally:
                await plane.close()


async def test_a_bad_request_to_a_sharded_run_is_refused_whole_before_any_shard_sees_it(
        server_config: ServerConfig) -> None:
    """Each shard sees only its rows of a push: a wrong shape, an unknown or a missing tensor, or
    a row id out of its table's range would be applied by some shards and refused (or, for ids,
    dropped) by others. The SDK refuses it as one server does, and nothing changes anywhere."""
    spec = _with_table({"w": (40, 30)}, (10, 2))
    async with _one_rank_on_two_shards(server_config, spec) as (servers, run, a, plane):
        w = np.ones((40, 30), np.float32)
        bad_ids = np.array([3, 12, -1], np.int64)
        for grads, why in [({"w": np.ones((30, 30), np.float32)}, "has shape"),
                           ({"w": w, "nope": np.ones(3, np.float32)}, "unknown tensor"),
                           ({"t": RowsPart(np.array([1]), np.ones((1, 2), np.float32), (10, 2))}, "lacks"),
                           ({"w": w, "t": RowsPart(bad_ids, np.ones((3, 2), np.float32), (10, 2))}, "out of range")]:
            with pytest.raises(errors.InvalidArgument, match=why) as refused:
                await plane.push(run.run_id, 0, a.incarnation, 0, grads)
            assert refused.value.reason == pb.ERROR_REASON_INVALID_GRADIENT
        for ask, why in [({"rows": {"t": bad_ids}}, "out of range"), ({"names": ["nope"]}, "unknown tensor"),
                         ({"rows": {"w": np.array([0])}}, "not a table")]:
            with pytest.raises(errors.InvalidArgument, match=why):
                await plane.pull(run.run_id, 0, a.incarnation, 0, **ask)  # type: ignore[arg-type]
        assert [s.registry.get(run.run_id).status().counters.pushes_applied for s in servers] == [0, 0]
        ack = await plane.push(run.run_id, 0, a.incarnation, 0,
                               {"w": w, "t": RowsPart(np.array([1, 9]), np.ones((2, 2), np.float32), (10, 2))})
        assert ack.clock == 1


@pytest.mark.parametrize(("positions", "values", "why"), [([5, 5, 1100], 3, "increase strictly"),
                                                       ([1100, 5], 2, "increase strictly"),
                                                       ([5, 1200], 2, "stay below its size 1200"),
                                                       ([5, 1100], 3, "one position per value")],
                         ids=["repeated", "decreasing", "out-of-range", "values-left-over"])
async def test_a_top_k_push_whose_positions_one_server_refuses_is_refused_whole_by_the_shards(
        server_config: ServerConfig, positions: list[int], values: int, why: str) -> None:
    """A sparse (top-k) push's positions must increase strictly and stay within the tensor: one
    server refuses one that does not, whole. Each shard sees only the positions in its rows, so
    a repeated or decreasing position (or a value without one) would be refused by one shard and
    the others' part applied (a torn push), one past the end sent to none; the SDK refuses it as
    one server does, and nothing changes anywhere."""
    compression = pb.Compression(topk_ratio=0.1)
    spec = make_spec(shapes={"w": (40, 30)}, num_workers=1, staleness=1, iterations=5, compression=compression)
    async with _one_rank_on_two_shards(server_config, spec) as (servers, run, a, plane):
        idx = np.array(positions, np.uint32)
        bad = {"w": CodedPart(np.ones(values, np.float32), pb.DATA_TYPE_FLOAT32, (40, 30), idx)}
        with pytest.raises(errors.InvalidArgument, match=why) as refused:
            await plane.push(run.run_id, 0, a.incarnation, 0, bad)
        assert refused.value.reason == pb.ERROR_REASON_INVALID_GRADIENT
        assert [s.registry.get(run.run_id).status().counters.pushes_applied for s in servers] == [0, 0]
        good = {"w": CodedPart(np.ones(2, np.float32), pb.DATA_TYPE_FLOAT32, (40, 30), np.array([5, 1100], np.uint32))}
        assert (await plane.push(run.run_id, 0, a.incarnation, 0, good)).clock == 1


async def test_a_push_whose_repeated_rows_sum_beyond_float32_is_refused_whole_by_the_shards(
        server_config: ServerConfig) -> None:
    """Rows of a repeated id are summed; one server refuses a push whose sum is beyond float32,
    whole. Only the shard holding that id would see it: refused there, the others' part applied
    (a torn push). The SDK refuses it as one server does, and nothing changes anywhere."""
    spec = _with_table({"w": (40, 30)}, (10, 2))
    async with _one_rank_on_two_shards(server_config, spec) as (servers, run, a, plane):
        w = np.ones((40, 30), np.float32)
        values = np.array([[3e38, 1], [1, 1], [3e38, 1]], np.float32)  # row 1 twice: 6e38 > float32's max
        with pytest.raises(errors.InvalidArgument, match="repeated ids sum to 1 NaN/Inf") as refused:
            await plane.push(run.run_id, 0, a.incarnation, 0,
                             {"w": w, "t": RowsPart(np.array([1, 9, 1]), values, (10, 2))})
        assert refused.value.reason == pb.ERROR_REASON_INVALID_GRADIENT
        assert [s.registry.get(run.run_id).status().counters.pushes_applied for s in servers] == [0, 0]
        values[2, 0] = -3e38  # (summed: 0, finite)
        ack = await plane.push(run.run_id, 0, a.incarnation, 0,
                               {"w": w, "t": RowsPart(np.array([1, 9, 1]), values, (10, 2))})
        assert ack.clock == 1


def _bits_bf16(values: np.ndarray) -> np.ndarray:
    """float32 ``values`` as bfloat16 wire values (their high 16 bits)."""
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


@pytest.mark.parametrize("kind", ["float32", "float16", "bfloat16", "top-k", "rows"])
async def test_a_push_with_a_nan_or_inf_is_refused_whole_by_the_shards(server_config: ServerConfig,
                                                                      kind: str) -> None:
    """One server refuses a push holding a NaN/Inf, whole. Each shard sees only its rows: the one
    holding the bad value refused its part, the others applied theirs (a torn push). The SDK
    refuses it as one server does, and no server's parameters change; a finite push whose values
    overflow the SDK's cheap test (squares past float32) goes through."""
    if kind == "rows":
        spec = _with_table({"w": (40, 30)}, (10, 2))
    else:
        compression = {"float32": pb.Compression(), "top-k": pb.Compression(topk_ratio=0.1),
                       "float16": pb.Compression(dtype=pb.DATA_TYPE_FLOAT16),
                       "bfloat16": pb.Compression(dtype=pb.DATA_TYPE_BFLOAT16)}[kind]
        spec = make_spec(shapes={"w": (40, 30)}, num_workers=1, staleness=1, iterations=5, compression=compression,
                         init=pb.INITIALIZER_CONSTANT)

    def gradient(last: float) -> dict[str, Any]:
        """Ones, but ``last`` in w's (or the table's) last row: a row of the last shard only."""
        w = np.ones((40, 30), np.float32)
        if kind == "rows":
            values = np.ones((2, 2), np.float32)
            values[1, 0] = last
            return {"w": w, "t": RowsPart(np.array([1, 9]), values, (10, 2))}
        w[39, 29] = last
        if kind == "float16":
            return {"w": CodedPart(w.reshape(-1).astype(np.float16), pb.DATA_TYPE_FLOAT16, (40, 30))}
        if kind == "bfloat16":
            return {"w": CodedPart(_bits_bf16(w.reshape(-1)), pb.DATA_TYPE_BFLOAT16, (40, 30))}
        if kind == "top-k":
            return {"w": CodedPart(np.array([1, last], np.float32), pb.DATA_TYPE_FLOAT32, (40, 30),
                                   np.array([5, 1199], np.uint32))}
        return {"w": w}

    async with cluster(server_config, 2, split_bytes=1024) as servers:
        async with PsClient(servers[0].address, timeout=10) as c:
            run = await c.create_run(spec)
            (a,) = await _join_all(c, run.run_id, 1)
            assert all(s.pieces for s in a.shard_map.shards)
            plane = Shards.beside(c, a.shard_map, a.spec)
            try:
                before = (await plane.pull(run.run_id)).tensors
                for bad in (np.nan, np.inf, -np.inf):
                    with pytest.raises(errors.InvalidArgument, match=r"contains 1 NaN/Inf value\(s\); nothing was "
                                                                     "applied") as refused:
                        await plane.push(run.run_id, 0, a.incarnation, 0, gradient(bad))
                    assert refused.value.reason == pb.ERROR_REASON_INVALID_GRADIENT
                assert [s.registry.get(run.run_id).status().counters.pushes_applied for s in servers] == [0, 0]
                after = (await plane.pull(run.run_id)).tensors
                assert all(np.array_equal(before[n], after[n]) for n in before)
                huge = 6e4 if kind == "float16" else 1e30  # (finite)
                assert (await plane.push(run.run_id, 0, a.incarnation, 0, gradient(huge))).clock == 1
            finally:
                await plane.close()


async def test_a_sharded_push_pull_of_rows_moves_only_those_rows(server_config: ServerConfig) -> None:
    """A push that asks for a few rows pulls those (and the dense tensors asked for) from the
    shards that hold them: a shard holding none is pushed to without a pull (a pull asking for
    nothing would be answered with its whole piece of the table). A pull of no rows is answered."""
    spec = _with_table({"b": (4,)}, (200_000, 8))
    async with _one_rank_on_two_shards(server_config, spec) as (servers, run, a, plane):
        ids = np.array([1, 2, 3], np.int64)  # on the first shard of the table
        await plane.pull(run.run_id, 0, a.incarnation, 0, names=["b"], rows={"t": ids})
        before = [s.registry.get(run.run_id).status().counters.bytes_pulled for s in servers]
        grads = {"b": np.ones(4, np.float32), "t": RowsPart(ids, np.ones((3, 8), np.float32), (200_000, 8))}
        ack, pulled = await plane.push_pull(run.run_id, 0, a.incarnation, 0, grads, names=["b"], rows={"t": ids})
        after = [s.registry.get(run.run_id).status().counters.bytes_pulled for s in servers]
        assert ack.clock == 1 and list(pulled.rows["t"][0]) == [1, 2, 3]
        assert max(y - x for x, y in zip(before, after, strict=True)) < 1000, (before, after)
        empty = await plane.pull(run.run_id, 0, a.incarnation, 1, rows={"t": np.empty(0, np.int64)})
        assert empty.rows["t"][1].shape == (0, 8) and empty.guaranteed_clock >= 0


async def test_a_sharded_pull_into_read_only_arrays_replaces_them_as_one_server_would(
        server_config: ServerConfig) -> None:
    # (each shard wrote into views of the caller's arrays; a read-only one was replaced in the
    # shard's dict of views only: the caller got its old values back as pulled)
    spec = _with_table({"big": (1000, 40), "b": (40,)}, (100, 8))
    async with cluster(server_config, 2, split_bytes=4096) as servers:
        async with PsClient(servers[0].address, timeout=10) as c:
            run = await c.create_run(spec)
            (a,) = await _join_all(c, run.run_id, 1)
            plane = Shards.beside(c, a.shard_map, a.spec)
            try:
                fresh = await plane.pull(run.run_id)
                assert sum(pc.name == "big" for s in a.shard_map.shards for pc in s.pieces) == 2  # rows on each
                frozen = {n: np.zeros_like(v) for n, v in fresh.tensors.items()}
                for v in frozen.values():
                    v.flags.writeable = False
                got = await plane.pull(run.run_id, into=frozen)
                for name, value in fresh.tensors.items():
                    np.testing.assert_array_equal(got.tensors[name], value)
                    assert frozen[name] is got.tensors[name]  # the new array, where the caller looks
                dense = {n: np.zeros_like(v) for n, v in fresh.tensors.items() if n != "t"}
                for v in dense.values():
                    v.flags.writeable = False
                g = {n: np.ones_like(v) for n, v in dense.items()}
                _, pulled = await plane.push_pull(run.run_id, a.rank, a.incarnation, 0, g, into=dense)
                for name in dense:
                    np.testing.assert_allclose(pulled.tensors[name], fresh.tensors[name] - 1.0, rtol=1e-6)
            finally:
                await plane.close()


@pytest.mark.parametrize("servers", [1, 2])
async def test_a_bound_changed_by_the_schedule_reaches_a_sharded_runs_workers(server_config: ServerConfig,
                                                                              servers: int) -> None:
    """The answers of every shard say the run's bound once a schedule step changed it; the
    sharded pushes and pulls pass it on as one server's do (a worker that kept the old bound
    would reuse parameters its shards then refuse pushes on)."""
    spec = make_spec(shapes={"w": (40, 30)}, num_workers=1, staleness=4, iterations=10,
                     staleness_schedule=[pb.StalenessStep(from_clock=2, staleness=1)])
    async with cluster(server_config, servers, split_bytes=1024) as ps:
        async with PsClient(ps[0].address, timeout=10) as c:
            run = await c.create_run(spec)
            (a,) = await _join_all(c, run.run_id, 1)
            plane: PsClient | Shards = Shards.beside(c, a.shard_map, a.spec) if servers > 1 else c
            try:
                for clock in range(3):
                    ack = await plane.push(run.run_id, 0, a.incarnation, clock, {"w": np.ones((40, 30), np.float32)})
                pulled = await plane.pull(run.run_id, 0, a.incarnation, 3)
            finally:
                if isinstance(plane, Shards):
                    await plane.close()
            assert [s.registry.get(run.run_id).spec.staleness for s in ps] == [1] * servers
            assert ack.HasField("staleness") and ack.staleness == 1 and pulled.staleness == 1
        async with PsClient(ps[-1].address, timeout=10) as last:  # (server 1 forwards GetRun to server 0)
            status = await last.get_run(run.run_id)
        assert (status.spec.staleness, status.tightest_staleness, status.loosest_staleness) == (1, 1, 4)


async def test_a_rank_learns_a_shards_data_plane_it_was_not_told_at_join(server_config: ServerConfig) -> None:
    """A server 0 just restarted tells its peers' data planes only once it has asked them: a rank
    that joined then went through gRPC to those for its whole assignment. Its heartbeats now ask
    again while a shard has none."""
    from types import SimpleNamespace

    from worker.trainer import _heartbeat

    spec = make_spec(shapes={"w": (40, 30)}, num_workers=1, staleness=1, iterations=50)
    async with cluster(server_config, 2, split_bytes=1024) as servers:
        async with PsClient(servers[0].address, timeout=10) as c:
            run = await c.create_run(spec)
            (a,) = await _join_all(c, run.run_id, 1)
            a.heartbeat_interval.FromTimedelta(timedelta(seconds=0.05))
            plane = Shards.beside(c, a.shard_map, a.spec)
            told = plane.clients[1].route.data_port
            plane.clients[1].route.told(0, "")  # as a restarted server 0 said at the join
            main = asyncio.get_running_loop().create_future()
            beating = asyncio.ensure_future(_heartbeat(c, a, SimpleNamespace(plane=plane, clock=0), main))  # type: ignore[arg-type]
            try:
                for _ in range(100):
                    if plane.clients[1].route.data_port:
                        break
                    await asyncio.sleep(0.02)
            finally:
                beating.cancel()
                await plane.close()
            assert told and plane.clients[1].route.data_port == told


async def test_each_shard_is_told_its_own_version_of_the_parameters_a_push_was_computed_on(
        server_config: ServerConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards count their versions apart (a push one of them has and another not yet): a pull
    returns the least, and the push computed on it tells each shard its own version of that pull,
    which a staleness-aware learning rate scales by (each was told the least); a push computed on
    it plus the worker's own steps since tells each its own version plus those steps."""
    async with cluster(server_config, 2, split_bytes=1024) as servers:
        async with PsClient(servers[0].address, timeout=10) as c:
            run = await c.create_run(make_spec(shapes={"w": (40, 30)}, num_workers=2, staleness=5, iterations=20))
            a, b = await _join_all(c, run.run_id, 2)
            plane = Shards.beside(c, a.shard_map, a.spec)
            g = {"w": np.ones((40, 30), np.float32)}
            try:
                await plane.clients[0].push(run.run_id, b.rank, b.incarnation, 0, plane._rows(g, a.shard_map.shards[0]))
                pulled = await plane.pull(run.run_id, a.rank, a.incarnation, 0)
                told: list[tuple[str, int | None]] = []
                push = PsClient.push

                async def spy(self: PsClient, *args: Any, **kw: Any) -> Any:
                    said = inspect.signature(push).bind(self, *args, **kw).arguments.get("param_version")
                    told.append((self.address, said))
                    return await push(self, *args, **kw)

                monkeypatch.setattr(PsClient, "push", spy)
                await plane.push(run.run_id, a.rank, a.incarnation, 0, g, param_version=pulled.version)
                first = sorted(told)
                told.clear()  # computed on that pull plus its own step of clock 0 (read-my-writes): one more each
                await plane.push(run.run_id, a.rank, a.incarnation, 1, g, param_version=pulled.version + 1)
            finally:
                await plane.close()
            assert pulled.version == 0
            assert first == sorted([(servers[0].address, 1), (servers[1].address, 0)])
            assert sorted(told) == sorted([(servers[0].address, 2), (servers[1].address, 1)])


async def test_each_shards_rows_of_a_workers_copy_take_the_factor_that_server_took(server_config: ServerConfig) -> None:
    """Rank 1's pushes of clocks 0 and 1 reached server 0 only (zeros: they change nothing but its
    version): rank 0's push computed on its pull of version 0 is two updates stale there, none on
    server 1, so their staleness-aware rates differ (1/2 and 1). The answer says no one factor,
    the plane says each server's for its rows, and the copy stepped with them is the servers'
    parameters, bit for bit."""
    async with cluster(server_config, 2, split_bytes=1024) as servers:
        async with PsClient(servers[0].address, timeout=10) as c:
            run = await c.create_run(make_spec(shapes={"w": (40, 30)}, num_workers=2, staleness=5, iterations=20,
                                               lr=0.3, staleness_aware_lr=True))
            a, b = await _join_all(c, run.run_id, 2)
            plane = Shards.beside(c, a.shard_map, a.spec)
            g = {"w": np.random.default_rng(3).standard_normal((40, 30), np.float32)}
            try:
                copy = await plane.pull(run.run_id, a.rank, a.incarnation, 0)
                zero = plane._rows({"w": np.zeros((40, 30), np.float32)}, a.shard_map.shards[0])
                for clock in (0, 1):
                    await plane.clients[0].push(run.run_id, b.rank, b.incarnation, clock, zero)
                resp = await plane.push(run.run_id, a.rank, a.incarnation, 0, g, param_version=copy.version)
                factors = plane.factors(resp)
                server = await pull_run(c, run.run_id)
            finally:
                await plane.close()
    assert not resp.HasField("lr_scale") and factors is not None
    (first,) = (pc for pc in a.shard_map.shards[0].pieces if pc.name == "w")
    assert first.row_start == 0 < first.row_end < 40  # (server 0 holds the first rows)
    np.testing.assert_array_equal(factors.of_rows("w", np.arange(40)), np.where(np.arange(40) < first.row_end, 0.5, 1.0))
    lr, w = a.spec.optimizer.sgd.learning_rate, copy.tensors["w"]
    assert not np.array_equal(w - np.float32(lr) * g["w"], server.tensors["w"])  # (not one rate for all rows)
    w -= OwnRate(lr, factors).whole("w", w.shape) * g["w"]
    assert np.array_equal(w, server.tensors["w"])
