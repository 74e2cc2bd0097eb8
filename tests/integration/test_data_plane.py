"""PushGradient / PullParams against a real server on 127.0.0.1:0 with concurrent clients."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
from support import Stubs, make_spec, with_config

from paramserver import errors
from paramserver.client import PsClient
from paramserver.errors import PsError
from paramserver.v1 import paramserver_pb2 as pb
from ps_server.config import ServerConfig
from ps_server.server import PsServer, start_server

pytestmark = pytest.mark.timeout(90)


async def _join_all(client: PsClient, run_id: str, n: int) -> list[pb.Assignment]:
    return [(await client.join(f"w{i}", run_id)).assignment for i in range(n)]


async def test_exactly_once_integer_gradients_with_duplicates(server: PsServer, client: PsClient) -> None:
    """W workers x K pushes of integer gradients, some sent twice: params = init - exact sum."""
    workers, k = 4, 25
    shapes = {"w": (17, 5), "b": (5,)}
    run = await client.create_run(make_spec(shapes=shapes, num_workers=workers, staleness=-1, iterations=k, lr=1.0,
                                                init=pb.INITIALIZER_CONSTANT))
    assignments = await _join_all(client, run.run_id, workers)
    init = (await client.pull(run.run_id)).tensors
    rng = random.Random(1)
    expected = {n: init[n].astype(np.float64) for n in shapes}
    duplicates = 0

    async def worker(a: pb.Assignment) -> int:
        sent_twice = 0
        async with PsClient(f"127.0.0.1:{server.port}") as c:
            for clock in range(k):
                await c.pull(run.run_id, a.rank, a.incarnation, clock)
                g = {n: np.full(s, float(a.rank + 1 + clock), np.float32) for n, s in shapes.items()}
                first = await c.push(run.run_id, a.rank, a.incarnation, clock, g)
                assert not first.duplicate
                if rng.random() < 0.3:
                    again = await c.push(run.run_id, a.rank, a.incarnation, clock, g)
                    assert again.duplicate and again.clock == clock + 1
                    sent_twice += 1
                for n in shapes:
                    expected[n] -= g[n]
        return sent_twice

    duplicates = sum(await asyncio.gather(*(worker(a) for a in assignments)))
    final = (await client.pull(run.run_id)).tensors
    for n in shapes:
        np.testing.assert_array_equal(final[n], expected[n].astype(np.float32))
    counters = (await client.get_run(run.run_id)).counters
    assert counters.pushes_applied == workers * k
    assert counters.pushes_duplicate == duplicates > 0


@pytest.mark.parametrize("staleness", [0, 1, 3])
async def test_ssp_invariant_with_concurrent_uneven_clients(server: PsServer, client: PsClient, staleness: int) -> None:
    """No rank completes clock c while a live rank is below c - s: checked on the server's record."""
    workers, iterations = 3, 12
    run = await client.create_run(make_spec(num_workers=workers, staleness=staleness, iterations=iterations, lr=0.01))
    assignments = await _join_all(client, run.run_id, workers)

    async def worker(a: pb.Assignment) -> None:
        delay = 0.004 * (1 + 2 * a.rank)  # rank 2 is 5x slower than rank 0
        async with PsClient(f"127.0.0.1:{server.port}") as c:
            for clock in range(iterations):
                p = await c.pull(run.run_id, a.rank, a.incarnation, clock)
                assert p.guaranteed_clock >= clock - staleness
                await asyncio.sleep(delay)
                g = {n: np.ones_like(v) for n, v in p.tensors.items()}
                await c.push(run.run_id, a.rank, a.incarnation, clock, g)

    await asyncio.gather(*(worker(a) for a in assignments))
    metrics = await client.get_metrics(run.run_id, include_clock_records=True)
    pushes = [r for r in metrics.clock_records if r.kind == pb.ClockRecord.KIND_PUSH]
    pulls = [r for r in metrics.clock_records if r.kind == pb.ClockRecord.KIND_PULL]
    assert len(pushes) == len(pulls) == workers * iterations
    for r in pushes + pulls:  # every iteration started and ended within the bound
        assert r.min_clock >= r.clock - staleness, r
    if staleness > 0:
        # the fast rank really did run ahead of the slow one, up to the bound
        assert max(r.clock - r.min_clock for r in pushes) == staleness


async def test_bsp_pull_parks_until_every_rank_pushed_and_names_the_holdout(server: PsServer, client: PsClient) -> None:
    run = await client.create_run(make_spec(num_workers=2, staleness=0, iterations=5))
    a, b = await _join_all(client, run.run_id, 2)
    p = await client.pull(run.run_id, a.rank, a.incarnation, 0)
    g = {n: np.ones_like(v) for n, v in p.tensors.items()}
    await client.push(run.run_id, a.rank, a.incarnation, 0, g)
    async with PsClient(f"127.0.0.1:{server.port}") as other:
        parked = asyncio.create_task(other.pull(run.run_id, a.rank, a.incarnation, 1))
        async with asyncio.timeout(10):  # until the server has parked it (the new channel connects first)
            while not (status := await client.get_run(run.run_id)).workers[0].waiting:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        assert not parked.done()
        assert "rank 1 (clock 0)" in status.waiting_for
        assert status.workers[0].waiting and status.workers[0].waiting_for_clock == 1
        await client.push(run.run_id, b.rank, b.incarnation, 0, g)
        got = await asyncio.wait_for(parked, 5)
    assert got.guaranteed_clock == 1 and got.version == 1
    assert (await client.get_run(run.run_id)).counters.parked_seconds >= 0.15  # it was parked ~0.2 s
    np.testing.assert_allclose(got.tensors["b"], p.tensors["b"] - 1.0)


async def test_parked_pull_times_out_with_who_it_waited_for(server: PsServer, client: PsClient) -> None:
    run = await client.create_run(make_spec(num_workers=2, staleness=0, iterations=5))
    a, _ = await _join_all(client, run.run_id, 2)
    p = await client.pull(run.run_id, a.rank, a.incarnation, 0)
    await client.push(run.run_id, a.rank, a.incarnation, 0, {n: np.ones_like(v) for n, v in p.tensors.items()})
    with pytest.raises(PsError) as err:
        await client.pull(run.run_id, a.rank, a.incarnation, 1, max_wait=0.3)
    assert isinstance(err.value, errors.DeadlineExceeded) and err.value.reason == pb.ERROR_REASON_WAIT_TIMEOUT
    assert err.value.info.needed_min_clock == 1 and list(err.value.info.ranks_behind) == [1]
    assert "rank 1 (clock 0)" in err.value.message


@pytest.mark.parametrize("transport", ["shm", "tcp", "grpc"])
async def test_a_pull_of_max_wait_0_waits_for_the_servers_limit(server_config: ServerConfig, transport: str) -> None:
    """max_wait 0 is the server's limit (the proto): the client's deadline was then only its timeout
    (1 s), and the pull failed with the client's DEADLINE_EXCEEDED (on gRPC, the server cut its
    wait at that deadline) long before the server's limit of 2.5 s."""
    ps = await start_server(with_config(server_config, max_wait_seconds=2.5))
    try:
        async with PsClient(f"127.0.0.1:{ps.port}", timeout=1.0, data_plane=transport != "grpc",
                            shm=transport == "shm") as c:
            run = await c.create_run(make_spec(num_workers=2, staleness=0, iterations=5))
            a, _ = await _join_all(c, run.run_id, 2)
            assert c.server_max_wait == 2.5  # (Join says it)
            p = await c.pull(run.run_id, a.rank, a.incarnation, 0)
            await c.push(run.run_id, a.rank, a.incarnation, 0, {n: np.ones_like(v) for n, v in p.tensors.items()})
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(PsError) as err:
                await c.pull(run.run_id, a.rank, a.incarnation, 1, max_wait=0)
            assert err.value.reason == pb.ERROR_REASON_WAIT_TIMEOUT, err.value  # the server's answer
            assert loop.time() - start >= 2.4
            for bad in (-1, float("inf"), float("nan")):
                with pytest.raises(errors.InvalidArgument, match=r"max_wait=.*: .* finite number >= 0 \(0: the server's limit\)"):
                    await c.pull(run.run_id, a.rank, a.incarnation, 1, max_wait=bad)
                with pytest.raises(errors.InvalidArgument, match=r"max_wait="):
                    await c.push_pull(run.run_id, a.rank, a.incarnation, 1, {}, max_wait=bad)
            assert c.route.opened[transport] >= 1
    finally:
        await ps.stop(0)


async def test_closing_the_client_ends_its_parked_pull_at_once(server: PsServer, client: PsClient) -> None:
    # (a socket closed under the event loop's read of it never woke that read: the pull waited out
    # its whole deadline on TCP and shared memory; on gRPC it raised CancelledError in a task nobody
    # cancelled)
    run = await client.create_run(make_spec(num_workers=2, staleness=0, iterations=5))
    a, _ = await _join_all(client, run.run_id, 2)
    p = await client.pull(run.run_id, a.rank, a.incarnation, 0)
    g = {n: np.ones_like(v) for n, v in p.tensors.items()}
    await client.push(run.run_id, a.rank, a.incarnation, 0, g)
    parked = asyncio.create_task(client.pull(run.run_id, a.rank, a.incarnation, 1, max_wait=8))
    async with asyncio.timeout(10):
        while not (await client.get_run(run.run_id)).workers[0].waiting:
            await asyncio.sleep(0.02)
    queued = asyncio.create_task(client.pull(run.run_id, a.rank, a.incarnation, 1, max_wait=8))
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await client.close()
    for task in (parked, queued):
        with pytest.raises(PsError) as err:
            await asyncio.wait_for(task, 5)
        assert err.value.code == errors.Code.CANCELLED and not err.value.retryable, err.value
    assert loop.time() - start < 2
    with pytest.raises(PsError) as err:  # and none opens a stream again
        await client.push(run.run_id, a.rank, a.incarnation, 1, g)
    assert err.value.code == errors.Code.CANCELLED


async def test_large_model_push_and_pull_in_chunks(server: PsServer, client: PsClient) -> None:
    """A tensor far beyond one message (chunked at 1 MiB) round-trips exactly."""
    shapes = {"big": (3_000_000,), "small": (7,)}
    run = await client.create_run(
        make_spec(shapes=shapes, num_workers=1, staleness=-1, iterations=3, init=pb.INITIALIZER_ZEROS))
    (a,) = await _join_all(client, run.run_id, 1)
    g = {"big": np.arange(3_000_000, dtype=np.float32) % 1000, "small": np.ones(7, np.float32)}
    await client.push(run.run_id, a.rank, a.incarnation, 0, g)
    got = await client.pull(run.run_id, a.rank, a.incarnation, 1)
    np.testing.assert_array_equal(got.tensors["big"], -g["big"])
    np.testing.assert_array_equal(got.tensors["small"], -g["small"])


async def test_runs_are_isolated(server: PsServer, client: PsClient) -> None:
    r1 = await client.create_run(make_spec(num_workers=1, staleness=-1))
    r2 = await client.create_run(make_spec(num_workers=1, staleness=-1))
    a1 = (await client.join("a", r1.run_id)).assignment
    before = (await client.pull(r2.run_id)).tensors
    g = {n: np.ones_like(v) for n, v in before.items()}
    await client.push(r1.run_id, a1.rank, a1.incarnation, 0, g)
    after = (await client.pull(r2.run_id)).tensors
    for n in before:
        assert after[n].tobytes() == before[n].tobytes()


async def test_shutdown_releases_parked_pulls_with_unavailable(server_config) -> None:  # type: ignore[no-untyped-def]
    from ps_server.server import start_server

    ps = await start_server(server_config)
    async with PsClient(f"127.0.0.1:{ps.port}") as c:
        run = await c.create_run(make_spec(num_workers=2, staleness=0))
        a = (await c.join("a")).assignment
        parked = asyncio.create_task(c.pull(run.run_id, a.rank, a.incarnation, 0))  # run not started
        await asyncio.sleep(0.1)
        await ps.stop(1.0)
        with pytest.raises(PsError) as err:
            await asyncio.wait_for(parked, 5)
        assert isinstance(err.value, errors.Unavailable) and err.value.reason == pb.ERROR_REASON_SHUTTING_DOWN


async def test_a_worker_stalled_mid_push_does_not_hold_up_the_others(server: PsServer, client: PsClient,
                                                                      stubs: Stubs) -> None:
    """Large pushes are received one at a time (--push-slots 1); a worker that goes quiet halfway
    through its push lends its slot out, so the others' pushes go through, and its own push is
    applied exactly once when the rest of it comes."""
    shapes = {"w": (64,), "b": (4,)}
    run = await client.create_run(make_spec(shapes=shapes, num_workers=2, staleness=-1, iterations=5,
                                            init=pb.INITIALIZER_ZEROS))
    stalled, other = await _join_all(client, run.run_id, 2)
    F32 = np.float32

    def req(offset: int, values: np.ndarray, final: bool) -> pb.PushGradientRequest:
        tensors = [pb.TensorChunk(name="w", shape=[64], dtype=pb.DATA_TYPE_FLOAT32, offset=offset,
                                  data=values.astype(F32).tobytes())]
        if final:
            tensors.append(pb.TensorChunk(name="b", shape=[4], dtype=pb.DATA_TYPE_FLOAT32, offset=0,
                                          data=np.zeros(4, F32).tobytes()))
        return pb.PushGradientRequest(run_id=run.run_id, rank=stalled.rank, incarnation=stalled.incarnation,
                                      clock=0, tensors=tensors, final=final)

    call = stubs.data.PushGradient(timeout=30.0)
    await call.write(req(0, np.ones(32), final=False))  # ... and nothing more for a while
    await asyncio.sleep(0.2)  # its first message is in and holds the only slot
    async with PsClient(f"127.0.0.1:{server.port}", chunk_bytes=64) as small_chunks:  # 64-byte messages: a multi-message push
        g = {"w": np.full(64, 2.0, F32), "b": np.ones(4, F32)}
        for clock in range(3):
            ack = await asyncio.wait_for(small_chunks.push(run.run_id, other.rank, other.incarnation, clock, g), 5)
            assert not ack.duplicate
    mid = await client.get_run(run.run_id)
    assert mid.counters.pushes_applied == 3 and server.dataplane.statistics().push_slot_lends >= 1
    await call.write(req(32, np.ones(32), final=True))
    await call.done_writing()
    resp = await call.read()
    assert resp.clock == 1 and not resp.duplicate
    params = (await client.pull(run.run_id)).tensors
    np.testing.assert_array_equal(params["w"], np.full(64, -7.0, F32))  # 3 x 2 from one worker, 1 from the other
    assert (await client.get_run(run.run_id)).counters.pushes_applied == 4


async def test_get_metrics_max_points_returns_the_most_recent_in_order(server: PsServer, client: PsClient) -> None:
    """A live view asks for the last N points and events only; 0 still returns the whole history."""
    run = await client.create_run(make_spec(num_workers=1, staleness=-1, iterations=100))
    (a,) = await _join_all(client, run.run_id, 1)
    points = [pb.MetricPoint(rank=0, clock=c, loss=1.0 / (c + 1), samples=c) for c in range(1, 31)]
    await client.report_metrics(run.run_id, a.rank, a.incarnation, points, 0)
    everything = await client.get_metrics(run.run_id)
    assert [p.clock for p in everything.points] == list(range(1, 31))
    recent = await client.get_metrics(run.run_id, max_points=5)
    assert [p.clock for p in recent.points] == [26, 27, 28, 29, 30]
    assert list(recent.events) == list(everything.events)[-5:] and len(everything.events) >= 1
    more = await client.get_metrics(run.run_id, max_points=1000)
    assert [p.clock for p in more.points] == list(range(1, 31))


async def test_pull_into_reused_arrays(server: PsServer) -> None:
    """A pull fills the caller's arrays in place, chunk by chunk at their offsets (tiny chunks here,
    so every tensor spans several messages); arrays it cannot fill in place (float64, wrong shape,
    not contiguous) are converted or replaced. The result equals a fresh pull's, bit for bit."""
    shapes = {"w": (37, 11), "b": (11,), "s": (1,)}
    async with PsClient(f"127.0.0.1:{server.port}", chunk_bytes=256) as c:
        run = await c.create_run(make_spec(shapes=shapes, num_workers=1, staleness=-1, iterations=3))
        fresh = (await c.pull(run.run_id)).tensors
        w = np.full((37, 11), np.nan, np.float32)
        b64 = np.zeros(11, np.float64)
        strided = np.zeros((2, 2), np.float32)[:, ::2]
        into = {"w": w, "b": b64, "s": strided}
        got = (await c.pull(run.run_id, into=into)).tensors
        assert got is into and got["w"] is w and got["b"] is b64 and got["s"] is not strided
        assert w.tobytes() == fresh["w"].tobytes()
        np.testing.assert_array_equal(b64, fresh["b"].astype(np.float64))
        assert got["s"].tobytes() == fresh["s"].tobytes()
        w[3, 4] = 7.0  # filled again in place on the next pull
        assert (await c.pull(run.run_id, into=into)).tensors["w"] is w and w.tobytes() == fresh["w"].tobytes()
