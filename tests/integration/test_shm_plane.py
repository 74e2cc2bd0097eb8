"""The shared-memory data plane (paramserver.v1.shm): used once a join tells its name, TCP when it
cannot be reached or is off, its framing's own errors, BSP gradients kept past the client's next
write, and no memory left mapped by a stream that ended.

The PushGradient / PullParams semantics over it (exactly-once, SSP, bad input, big models, tables)
are tested by the data-plane, bad-input and tables suites, which run every test over each
transport (``client`` fixture in conftest.py); kill -9 of either side: tests/system/test_shm_faults.py."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import mmap
import os
import socket
import struct
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from procs import segments
from support import make_spec, until

from paramserver import errors, shm_transport
from paramserver.client import PsClient
from paramserver.shm_transport import ShmCall
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import shm, tcp
from ps_server import shm_plane
from ps_server.config import ServerConfig
from ps_server.dataplane import Shared
from ps_server.server import PsServer, start_server

pytestmark = pytest.mark.timeout(60)


async def test_pushes_and_pulls_go_through_shared_memory_once_join_tells_the_name(server: PsServer) -> None:
    assert server.shm_plane is not None and server.shm_plane.name.startswith("paramserver-")
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10) as c:
        run = await c.create_run(make_spec(shapes={"w": (3000, 1000), "b": (7,)}, num_workers=1, staleness=-1,
                                           lr=1.0, init=pb.INITIALIZER_ZEROS))
        assert c.route.transport == "grpc"  # nothing known yet
        joined = await c.join("w", run.run_id)
        a = joined.assignment
        assert joined.shm_socket == server.shm_plane.name and c.route.transport == "shm"
        g = {"w": np.arange(3_000_000, dtype=np.float32).reshape(3000, 1000), "b": np.ones(7, np.float32)}
        ack = await c.push(run.run_id, a.rank, a.incarnation, 0, g)  # 12 MB: larger than the first segment
        assert ack.clock == 1 and not ack.duplicate
        assert (await c.push(run.run_id, a.rank, a.incarnation, 0, g)).duplicate
        pulled = await c.pull(run.run_id, a.rank, a.incarnation, 1)
        np.testing.assert_array_equal(pulled.tensors["w"], -g["w"])
        params: dict[str, np.ndarray] = {}
        for clock in (1, 2):  # the second round: the segment has grown to fit, everything in it
            _, both = await c.push_pull(run.run_id, a.rank, a.incarnation, clock, g, into=params)
            np.testing.assert_array_equal(both.tensors["w"], -(clock + 1) * g["w"])
            np.testing.assert_array_equal(params["b"], -(clock + 1) * g["b"])
        assert c.route.opened == {"shm": 2, "tcp": 0, "grpc": 0, "shm_unreachable": 0, "tcp_unreachable": 0}
        assert server.shm_plane.statistics().connections == 2
        assert [w.data_plane for w in (await c.get_run(run.run_id)).workers] == ["shm"]  # psctl status shows it
        assert segments() == 2  # each stream's segment (both ends in this process); the outgrown ones unmapped
    for _ in range(50):  # the client went: the server unmaps its segments as the streams end
        if segments() == 0:
            break
        await asyncio.sleep(0.05)
    assert segments() == 0


async def test_an_unreachable_shm_socket_falls_back_to_tcp_and_no_shm_turns_it_off(
        server: PsServer, server_config: ServerConfig) -> None:
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10) as c:
        run = await c.create_run(make_spec(num_workers=1, staleness=-1))
        a = (await c.join("w", run.run_id)).assignment
        c.route.shm_socket = "paramserver-" + "0" * 32  # as if on another host: nobody listens there
        p = await c.pull(run.run_id, a.rank, a.incarnation, 0)
        await c.push(run.run_id, a.rank, a.incarnation, 0, {n: np.ones_like(v) for n, v in p.tensors.items()})
        assert c.route.opened == {"shm": 0, "tcp": 2, "grpc": 0, "shm_unreachable": 1, "tcp_unreachable": 0}
        assert [w.data_plane for w in (await c.get_run(run.run_id)).workers] == ["tcp"]
        hb = await c.heartbeat(run.run_id, a.rank, a.incarnation, 1)  # tells the real name: shm again
        assert hb.shm_socket == c.route.shm_socket == server.shm_plane.name  # type: ignore[union-attr]
        await c.pull(run.run_id, a.rank, a.incarnation, 1)
        assert c.route.opened["shm"] == 1
    off = await start_server(dataclasses.replace(server_config, shm=False))
    try:
        assert off.shm_plane is None
        async with PsClient(f"127.0.0.1:{off.port}", timeout=10) as c:
            run = await c.create_run(make_spec(num_workers=1, staleness=-1))
            joined = await c.join("w", run.run_id)
            assert joined.shm_socket == "" and c.route.transport == "tcp"
    finally:
        await off.stop(0)


async def test_a_push_of_several_messages_grows_the_segment_to_hold_them_all(server: PsServer,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A model larger than a message (here messages of 1 MiB) pushes several per turn: the next
    turn's segment holds the whole turn (plain pushes: their answers are small)."""
    import paramserver.client

    monkeypatch.setattr(paramserver.client, "MESSAGE_BYTES", 1 << 20)
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10, chunk_bytes=1 << 20) as c:
        run = await c.create_run(make_spec(shapes={"w": (3000, 1000)}, num_workers=1, staleness=-1, lr=1.0,
                                           init=pb.INITIALIZER_ZEROS))
        a = (await c.join("w", run.run_id)).assignment
        g = np.ones((3000, 1000), np.float32)  # 12 MB: 12 messages, the first well inside the first 4 MiB
        for clock in range(3):
            await c.push(run.run_id, a.rank, a.incarnation, clock, {"w": g})
        np.testing.assert_array_equal((await c.pull(run.run_id, a.rank, a.incarnation, 3)).tensors["w"], -3 * g)
        call = c._push._call
        assert isinstance(call, ShmCall) and call._segment is not None
        assert call._segment.region.nbytes >= 12_000_000 and call._want >= 12_000_000


async def test_without_memfd_the_messages_go_through_the_socket(server: PsServer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(size: int) -> None:
        raise PermissionError("memfd_create: operation not permitted")  # as under a strict seccomp profile

    monkeypatch.setattr(shm, "create_segment", refused)
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10) as c:
        run = await c.create_run(make_spec(shapes={"w": (500, 500)}, num_workers=1, staleness=-1, lr=1.0,
                                           init=pb.INITIALIZER_ZEROS))
        a = (await c.join("w", run.run_id)).assignment
        g = np.ones((500, 500), np.float32)
        for clock in range(3):
            _, p = await c.push_pull(run.run_id, a.rank, a.incarnation, clock, {"w": g})
            np.testing.assert_array_equal(p.tensors["w"], -(clock + 1) * g)
        assert c.route.opened["shm"] == 1 and segments() == 0  # the same stream, no segment


@contextlib.asynccontextmanager
async def bsp_pair(server: PsServer) -> AsyncIterator[tuple[PsClient, PsClient, pb.Run, pb.Assignment, pb.Assignment]]:
    """Two clients that joined one run at s = 0 (SGD, learning rate 1) of one 300 x 300 tensor
    ``w`` of zeros: (c0, c1, the run, their assignments)."""
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10) as c0, \
            PsClient(f"127.0.0.1:{server.port}", timeout=10) as c1:
        run = await c0.create_run(make_spec(shapes={"w": (300, 300)}, num_workers=2, staleness=0, lr=1.0,
                                            init=pb.INITIALIZER_ZEROS))
        a0 = (await c0.join("a", run.run_id)).assignment
        a1 = (await c1.join("b", run.run_id)).assignment
        yield c0, c1, run, a0, a1


async def test_bsp_keeps_a_held_gradient_when_the_client_writes_its_region_again(server: PsServer) -> None:
    """At s = 0 a push is held until every rank pushed its clock; one without a then_pull is
    acknowledged at once, so the server copies it: the client may write the same region meanwhile
    (here: a retried push of other values)."""
    async with bsp_pair(server) as (c0, c1, run, a0, a1):
        ones = np.ones((300, 300), np.float32)  # > 64 KiB: decoded in place (wire.SMALL_MESSAGE)
        await c0.push(run.run_id, a0.rank, a0.incarnation, 0, {"w": ones})
        dup = await c0.push(run.run_id, a0.rank, a0.incarnation, 0, {"w": 1000 * ones})  # same region, other bytes
        assert dup.duplicate
        await c1.push(run.run_id, a1.rank, a1.incarnation, 0, {"w": 3 * ones})
        pulled = await c1.pull(run.run_id, a1.rank, a1.incarnation, 1)
        np.testing.assert_array_equal(pulled.tensors["w"], -2 * ones)  # the mean of 1 and 3, not of 1000
        assert c0.route.opened["shm"] == 1


async def test_bsp_holds_a_gradient_whose_pull_waits_in_place_and_copies_it_when_the_pull_fails(
        server: PsServer) -> None:
    """A push with a then_pull at s = 0 is held as it is in the segment (its answer waits for the
    clock, which combines it before anything is sent); when the pull fails instead (here: its wait
    runs out), the gradient is copied before the status goes out: the client may write the segment
    again from then on, and the clock still combines what was pushed."""
    async with bsp_pair(server) as (c0, c1, run, a0, a1):
        ones = np.ones((300, 300), np.float32)
        await c0.pull(run.run_id, a0.rank, a0.incarnation, 0)  # (opens the streams)
        await c0.push(run.run_id, a0.rank, a0.incarnation, 0, {"w": ones})  # the push stream's segment
        core = server.registry.get(run.run_id)
        call = c0._push.idle_call()
        assert isinstance(call, ShmCall) and call._segment is not None
        memory = np.frombuffer(call._segment.region[0:], np.uint8)  # (a view of a slice: keeps it mapped after the stream ends)
        for clock in (0, 1):
            await c1.push(run.run_id, a1.rank, a1.incarnation, clock, {"w": 3 * ones})
        await c0.push_pull(run.run_id, a0.rank, a0.incarnation, 1, {"w": 5 * ones}, into={})  # completes clock 1
        assert core.bsp.applied_clock == 2 and not core.bsp.borrowed
        with pytest.raises(errors.DeadlineExceeded):  # clock 2 waits for rank 1, longer than the pull may
            await c0.push_pull(run.run_id, a0.rank, a0.incarnation, 2, {"w": 7 * ones}, max_wait=0.2)
        held = core.bsp.pending[2][0]["w"]
        assert isinstance(held, np.ndarray) and held.flags.owndata and not core.bsp.borrowed  # copied
        memory[:] = 0xFF  # the client writes its segment again (NaN everywhere)
        await c1.push(run.run_id, a1.rank, a1.incarnation, 2, {"w": ones})
        final = await c1.pull(run.run_id, a1.rank, a1.incarnation, 3)
        np.testing.assert_array_equal(final.tensors["w"], -(2 + 4 + 4) * ones)  # means: (1+3)/2, (5+3)/2, (7+1)/2


def _publish_from(nbytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm_plane, "_PUBLISH_MIN", nbytes)
    monkeypatch.setattr(shm_plane.ShmDataPlane, "_caller",
                        dataclasses.replace(shm_plane.ShmDataPlane._caller, share_bytes=nbytes))


async def test_bsp_answers_of_a_clock_are_published_once_and_every_rank_reads_that_copy(
        server: PsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """At s = 0 the answers of a clock are the same bytes for every rank: the server writes them
    once, into a publication of its own that it passes each client (mapped read only), instead of
    once into each client's segment. A publication is written again only once every client that
    was given it has sent its next request, or gone."""
    _publish_from(64 << 10, monkeypatch)  # (this model's 360 KB answers)
    writes: list[int] = []
    put = shm.put

    def spy(region: memoryview, at: int, parts: list[bytes | memoryview], n: int) -> bytes:
        if n > 64 << 10:
            writes.append(id(region.obj))
        return put(region, at, parts, n)

    monkeypatch.setattr(shm, "put", spy)
    assert server.shm_plane is not None
    publisher = server.shm_plane._publisher
    async with bsp_pair(server) as (c0, c1, run, a0, a1):
        ones = np.ones((300, 300), np.float32)
        p0: dict[str, np.ndarray] = {}
        p1: dict[str, np.ndarray] = {}
        await asyncio.gather(c0.pull(run.run_id, a0.rank, a0.incarnation, 0, into=p0),
                             c1.pull(run.run_id, a1.rank, a1.incarnation, 0, into=p1))
        for clock in range(3):
            writes.clear()
            (ack0, r0), (ack1, r1) = await asyncio.gather(  # rank 0 borrows (views of the publication), rank 1 copies
                c0.push_pull(run.run_id, a0.rank, a0.incarnation, clock, {"w": ones}, into=p0, borrow=True),
                c1.push_pull(run.run_id, a1.rank, a1.incarnation, clock, {"w": 3 * ones}, into=p1))
            np.testing.assert_array_equal(p0["w"], -2 * (clock + 1) * ones)  # the mean of 1 and 3, each clock
            np.testing.assert_array_equal(p1["w"], p0["w"])
            publication = c0._push.idle_call()._publications[1].region  # type: ignore[union-attr]
            at = shm.address(p0["w"].data.cast("B")) - shm.address(publication)
            assert not p0["w"].flags.writeable and 0 <= at < publication.nbytes  # in the publication itself
            assert at % shm.ALIGN == 0  # placed so: computed on at full speed
            assert p1["w"].flags.writeable and p1["w"].flags.owndata
            assert ack0.clock == ack1.clock == clock + 1 and r0.version == r1.version == clock + 1
            assert sorted([ack0.min_clock, ack1.min_clock]) == [clock, clock + 1]  # (each rank's, after its push)
            [pub] = publisher._publications  # one, written once a clock: no answer went into a client's segment
            assert pub.segment is not None
            pushes = [id(call._segment.region.obj) for call in (c0._push.idle_call(), c1._push.idle_call())
                      if isinstance(call, ShmCall) and call._segment is not None]
            assert sorted(writes) == sorted([id(pub.segment.region.obj), *pushes]) and len(pushes) == 2
            assert {len(link._reading) for link in pub.readers} == {1} and len(pub.readers) == 2
        for c in (c0, c1):
            call = c._push.idle_call()
            assert isinstance(call, ShmCall) and list(call._publications) == [1]
            assert call._publications[1].region.readonly
        assert segments() == 2 + 2 + 1  # each client's push and pull segments, and the publication
    for _ in range(250):  # the clients are gone: once the server sees it, nobody reads it any more
        if not pub.readers:
            break
        await asyncio.sleep(0.02)
    assert not pub.readers


async def test_a_client_that_does_not_ask_for_publications_gets_its_answers_in_its_segment(
        server: PsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Publications are a hello flag's: an older client (or another language's) that does not set
    it is answered as before; the TCP plane never grants it."""
    _publish_from(64 << 10, monkeypatch)
    greet = shm_transport.greet
    monkeypatch.setattr(shm_transport, "greet", lambda sock, method, where, flags=0: greet(sock, method, where))
    assert server.shm_plane is not None
    async with bsp_pair(server) as (c0, c1, run, a0, a1):
        ones = np.ones((300, 300), np.float32)
        for clock in range(2):
            (_, r0), (_, r1) = await asyncio.gather(
                c0.push_pull(run.run_id, a0.rank, a0.incarnation, clock, {"w": ones}, into={}),
                c1.push_pull(run.run_id, a1.rank, a1.incarnation, clock, {"w": 3 * ones}, into={}))
            np.testing.assert_array_equal(r0.tensors["w"], -2 * (clock + 1) * ones)
            np.testing.assert_array_equal(r1.tensors["w"], r0.tensors["w"])
        assert not server.shm_plane._publisher._publications and c0.route.opened["shm"] == 1
    assert server.data_plane is not None

    def echo(sock: socket.socket) -> bytes:
        with sock:
            sock.settimeout(5)
            sock.sendall(tcp.hello(tcp.METHOD_PUSH, shm.FLAG_PUBLISHED | 2))  # (and a flag no one knows)
            return sock.recv(tcp.HELLO.size)

    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.connect(shm.name_for(server.shm_plane.name))
    assert await asyncio.to_thread(echo, unix) == tcp.hello(tcp.METHOD_PUSH, shm.FLAG_PUBLISHED)
    inet = socket.create_connection(("127.0.0.1", server.data_plane.port))
    assert await asyncio.to_thread(echo, inet) == tcp.hello(tcp.METHOD_PUSH, 0)


def test_a_publication_being_read_is_never_written_and_a_freed_one_is_reused() -> None:
    publisher = shm_plane._Publisher()
    try:
        def answer(key: str, fill: int) -> tuple[Shared, int]:
            data = np.full(1 << 20, fill, np.uint8)
            return Shared([key.encode(), memoryview(data)], "store"), 1 + data.nbytes

        first = publisher.publish(*answer("a", 1))
        assert first is not None and first.segment is not None
        data = first.at + 1  # (placed so that its data, after a 1-byte head, is aligned)
        assert data % shm.ALIGN == 0 and bytes(first.segment.region[first.at : data]) == b"a"
        reader, other = object(), object()
        first.readers.add(reader)  # type: ignore[arg-type]
        assert publisher.publish(*answer("a", 1)) is first  # the same bytes: not written again
        second = publisher.publish(*answer("b", 2))  # the first is being read: another one
        assert second is not None and second is not first and second.number == 2
        second.readers.add(other)  # type: ignore[arg-type]
        assert publisher.publish(*answer("c", 3)) is None  # both read: the caller copies as before
        assert bytes(first.segment.region[data : data + 4]) == b"\x01" * 4  # untouched
        first.readers.clear()  # its reader sent its next request
        third = publisher.publish(*answer("c", 3))
        assert third is first and bytes(first.segment.region[data : data + 4]) == b"\x03" * 4
    finally:
        publisher.close()


def _inside(views: dict[str, np.ndarray], c: PsClient) -> bool:
    """Whether every array of ``views`` lies in ``c``'s push stream's segment."""
    call = c._push.idle_call()
    assert isinstance(call, ShmCall) and call._segment is not None
    region = call._segment.region
    lo = shm.address(region)
    return all(lo <= shm.address(v.data.cast("B")) and shm.address(v.data.cast("B")) + v.nbytes <= lo + region.nbytes
               for v in views.values())


async def test_a_gradient_computed_into_the_segment_is_pushed_as_written(server: PsServer) -> None:
    """``PsClient.push_buffers``: once the push stream has a segment, arrays in it where the push of
    a clock puts its tensors; a gradient written into them is pushed as written (``shm.put``
    leaves them in place), the answer comes over them, and the next clock's buffers are there again.
    Pushed in another order they are still correct (read before written over); None where they
    cannot be: before the stream's first push, a small model, another transport."""
    shapes = {"a": (300, 200), "b": (50,), "c": (200, 100)}  # a and c: more than shm.IN_PLACE_BYTES
    spec = make_spec(shapes=shapes, num_workers=2, staleness=-1, lr=1.0, init=pb.INITIALIZER_ZEROS)
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10) as c, \
            PsClient(f"127.0.0.1:{server.port}", timeout=10, shm=False) as tcp_client:
        run = await c.create_run(spec)
        a = (await c.join("w", run.run_id)).assignment
        t = (await tcp_client.join("t", run.run_id, max_wait=0)).assignment
        params = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
        assert c.push_buffers(run.run_id, a.rank, a.incarnation, 0, params) is None  # no segment yet
        first = {n: np.full(s, 1.0, np.float32) for n, s in shapes.items()}
        await c.push_pull(run.run_id, a.rank, a.incarnation, 0, first, into=params)
        expected = {n: -v for n, v in first.items()}
        rng = np.random.default_rng(0)
        for clock, order in ((1, "abc"), (2, "cba")):
            bufs = c.push_buffers(run.run_id, a.rank, a.incarnation, clock, params)
            assert bufs is not None and list(bufs) == list(shapes) and _inside(bufs, c)
            grads = {}
            for n in order:
                bufs[n][...] = rng.standard_normal(shapes[n], dtype=np.float32)
                expected[n] = expected[n] - bufs[n]
                grads[n] = bufs[n]
            _, pulled = await c.push_pull(run.run_id, a.rank, a.incarnation, clock, grads, into=params)
            for n in shapes:
                np.testing.assert_array_equal(params[n], expected[n])
        small = {"b": params["b"]}
        assert c.push_buffers(run.run_id, a.rank, a.incarnation, 3, small) is None  # copying is cheaper
        zeros = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
        await tcp_client.push(run.run_id, t.rank, t.incarnation, 0, zeros)
        assert tcp_client.route.transport == "tcp" and tcp_client.push_buffers(run.run_id, t.rank, t.incarnation, 1, zeros) is None
        assert c.route.opened["shm"] == 1


async def test_parameters_borrowed_from_the_segment_stay_clear_of_the_next_gradient(server: PsServer) -> None:
    """Asynchronous, on the server's host: ``push_pull(borrow=True)`` puts read-only views of the
    answer in the push stream's segment into ``into``, each tensor aligned (the server places the
    answer so); ``push_buffers(like=those)`` gives buffers beside them, not over them (the segment
    grows once to hold both), so the next gradient is computed on the parameters into the segment.
    Every answer is the parameters the server holds, clock after clock."""
    shapes = {"a": (1000, 600), "b": (50,), "c": (200, 100)}  # 2.5 MB: an answer and a push outgrow 4 MiB
    spec = make_spec(shapes=shapes, num_workers=1, staleness=-1, lr=1.0, init=pb.INITIALIZER_ZEROS)
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10) as c:
        run = await c.create_run(spec)
        a = (await c.join("w", run.run_id)).assignment
        params = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
        expected = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
        rng = np.random.default_rng(1)
        grads = {n: rng.standard_normal(s, dtype=np.float32) for n, s in shapes.items()}
        computed_in_place = 0
        for clock in range(5):
            expected = {n: expected[n] - grads[n] for n in shapes}
            await c.push_pull(run.run_id, a.rank, a.incarnation, clock, grads, into=params, borrow=True)
            for n in shapes:
                np.testing.assert_array_equal(params[n], expected[n])
            assert all(not v.flags.writeable and v.ctypes.data % 16 == 0 for v in params.values())
            assert _inside(params, c)
            bufs = c.push_buffers(run.run_id, a.rank, a.incarnation, clock + 1, params)
            if bufs is None:  # (the first segment holds an answer or a push of this size, not both)
                assert clock == 0
                grads = {n: rng.standard_normal(s, dtype=np.float32) for n, s in shapes.items()}
                continue
            assert _inside(bufs, c)
            assert not any(np.may_share_memory(g, p) for g in bufs.values() for p in params.values())
            for n in shapes:  # a gradient computed on the borrowed parameters, into the segment
                np.multiply(params[n], 0.5, out=bufs[n])
                bufs[n] += rng.standard_normal(shapes[n], dtype=np.float32)
            grads = bufs
            computed_in_place += 1
        assert computed_in_place == 4


def _connect(server: PsServer, method: int = tcp.METHOD_PUSH) -> socket.socket:
    assert server.shm_plane is not None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(shm.name_for(server.shm_plane.name))
    sock.sendall(tcp.hello(method))
    assert sock.recv(tcp.HELLO.size) == tcp.hello(method)
    return sock


def _frame(kind: int, body: bytes) -> bytes:
    return tcp.FRAME.pack(kind, 0, 0, 0, len(body)) + body


def _status(sock: socket.socket) -> tuple[grpc.StatusCode, str]:
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    kind, _, _, code, length = tcp.FRAME.unpack(data[: tcp.FRAME.size])
    assert kind == tcp.STATUS
    status = pb.Status.FromString(data[tcp.FRAME.size : tcp.FRAME.size + length])
    return {c.value[0]: c for c in grpc.StatusCode}[code], status.message


def _memfd(size: int, seal: bool, name: str = "test") -> int:
    import fcntl

    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


@pytest.mark.parametrize("case", ["shared_first", "no_fd", "unsealed", "outside", "fd_with_shared", "unknown_kind"])
async def test_bad_frames_end_the_stream_with_a_status_that_says_what_to_fix(server: PsServer, case: str) -> None:
    sock = await asyncio.to_thread(_connect, server)
    region = shm.REGION.pack(8192, 0)
    try:
        if case == "shared_first":
            sock.sendall(_frame(shm.SHARED, shm.REGION.pack(0, 10)))
        elif case == "no_fd":
            sock.sendall(_frame(shm.SEGMENT, region))
        elif case in ("unsealed", "outside"):
            fd = _memfd(8192, seal=case == "outside")
            socket.send_fds(sock, [_frame(shm.SEGMENT, region)], [fd])
            os.close(fd)
            if case == "outside":
                sock.sendall(_frame(shm.SHARED, shm.REGION.pack(8000, 200)))
        elif case == "fd_with_shared":  # (the server reads it with no room for descriptors: they are dropped)
            fd = _memfd(8192, seal=True)
            socket.send_fds(sock, [_frame(shm.SEGMENT, region)], [fd])
            socket.send_fds(sock, [_frame(shm.SHARED, shm.REGION.pack(0, 10))], [fd])
            os.close(fd)
        else:
            sock.sendall(_frame(9, struct.pack("<QQ", 0, 0)))
        code, message = await asyncio.to_thread(_status, sock)
    finally:
        sock.close()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert {"shared_first": "before any SEGMENT", "no_fd": "exactly one", "unsealed": "F_SEAL_SHRINK",
            "outside": "outside the segment's region", "fd_with_shared": "descriptors came with a SHARED frame",
            "unknown_kind": "unknown frame kind"}[case] in message
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10) as c:  # and it serves as before
        run = await c.create_run(make_spec(num_workers=1, staleness=-1))
        a = (await c.join("w", run.run_id)).assignment
        await c.pull(run.run_id, a.rank, a.incarnation, 0)
        assert c.route.opened["shm"] == 1


async def test_a_sender_stalled_after_a_frame_header_is_dropped_and_frees_its_push_slot(
        server_config: ServerConfig) -> None:
    """A client that sends an inline MESSAGE's header (a large one: received under the push slot)
    or a SHARED frame's header, then nothing, is in the middle of a frame: dropped after
    ``stall_seconds``, as on TCP, and another's large push gets the slot."""
    ps = await start_server(dataclasses.replace(server_config, stall_seconds=1.0, push_slots=1))
    try:
        stalled = [await asyncio.to_thread(_connect, ps) for _ in range(2)]
        stalled[0].sendall(tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, 1 << 20))  # its body never comes
        stalled[1].sendall(tcp.FRAME.pack(shm.SHARED, 0, 0, 0, shm.REGION.size))  # nor its region
        async with PsClient(f"127.0.0.1:{ps.port}", timeout=10) as c:
            run = await c.create_run(make_spec(shapes={"w": (1000, 1000)}, num_workers=1, staleness=-1))
            a = (await c.join("w", run.run_id)).assignment
            c.route.shm_socket = ""  # over TCP: a push of several messages, which needs the slot
            ack = await c.push(run.run_id, a.rank, a.incarnation, 0, {"w": np.ones((1000, 1000), np.float32)})
            assert ack.clock == 1 and c.route.opened["tcp"] == 1
        for sock in stalled:
            assert await asyncio.wait_for(asyncio.to_thread(sock.recv, 1), 5) == b""
            sock.close()
    finally:
        await ps.stop(0)


@pytest.mark.parametrize("case", ["write_sealed", "read_only"])
async def test_a_segment_the_server_cannot_map_for_writing_gets_a_status(server: PsServer, case: str) -> None:
    """A memfd sealed against writes, or passed read only: the server answers it writes into the
    segment (INVALID_ARGUMENT), it does not just hang up."""
    import fcntl

    sock = await asyncio.to_thread(_connect, server)
    try:
        fd = _memfd(8192, seal=True)
        if case == "write_sealed":
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
            passed = fd
        else:
            passed = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        socket.send_fds(sock, [_frame(shm.SEGMENT, shm.REGION.pack(8192, 0))], [passed])
        os.close(fd)
        if passed != fd:
            os.close(passed)
        code, message = await asyncio.to_thread(_status, sock)
    finally:
        sock.close()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "map" in message, message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to connect as another user")
async def test_another_user_of_the_host_is_refused(server: PsServer, caplog: pytest.LogCaptureFixture) -> None:
    """An abstract socket has no file permissions: anyone in the network namespace may connect
    (and /proc/net/unix shows its name). The server admits its own user and root only
    (SO_PEERCRED): another user's process is closed on before its hello is read."""
    import subprocess
    import sys

    assert server.shm_plane is not None
    name = server.shm_plane.name
    script = ("import asyncio, os, sys\n"
              "from paramserver.shm_transport import ShmCall\n"
              "os.setgid(65534); os.setuid(65534)  # (after the imports: root's files)\n"
              "try:\n"
              f"    asyncio.run(ShmCall.open_shm({name!r}, 'PullParams', 1 << 20))\n"
              "except Exception as exc:\n"
              "    sys.exit('closed' if isinstance(exc, ConnectionError) else repr(exc))\n")
    other = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script], capture_output=True, text=True,
                                    timeout=30, cwd="/")
    assert other.returncode == 1 and other.stderr.strip() == "closed", other.stderr
    assert any("refused process" in r.getMessage() and "user 65534" in r.getMessage() for r in caplog.records)
    call = await ShmCall.open_shm(name, "PullParams", 1 << 20)  # this server's user: admitted
    call.cancel()


def _mapped(name: str) -> int:
    """Mappings of this process of memfds named ``name`` (no garbage collection first)."""
    with open("/proc/self/maps") as f:
        return sum(f"memfd:{name} " in line for line in f)


@contextlib.asynccontextmanager
async def _segment_unmapped_at_end(server: PsServer, name: str, method: int = tcp.METHOD_PUSH,
                                   ) -> AsyncIterator[tuple[socket.socket, mmap.mmap]]:
    """A stream to ``server`` whose segment is a 1 MiB memfd named ``name``, mapped here too; when
    the block is done (both closed on the way out), the server has closed the stream, unmapped the
    segment and closed its descriptor, with the garbage collector off from the start (what is freed
    must be freed without it)."""
    fds = len(os.listdir("/proc/self/fd"))
    gc.collect()
    gc.disable()
    try:
        sock = await asyncio.to_thread(_connect, server, method)
        fd = _memfd(1 << 20, seal=True, name=name)
        with sock, mmap.mmap(fd, 1 << 20) as mm:
            socket.send_fds(sock, [_frame(shm.SEGMENT, shm.REGION.pack(1 << 20, 0))], [fd])
            os.close(fd)
            yield sock, mm
        await until(lambda: server.shm_plane is not None and server.shm_plane.statistics().open == 0, 5)
        await until(lambda: _mapped(name) == 0 and len(os.listdir("/proc/self/fd")) <= fds, 2)
        assert _mapped(name) == 0
        assert len(os.listdir("/proc/self/fd")) <= fds
    finally:
        gc.enable()


@pytest.mark.parametrize("end", ["answered", "closed", "closed_unknown_run"])
async def test_a_rejected_push_of_several_messages_unmaps_the_segment_when_its_stream_ends(
        server: PsServer, end: str) -> None:
    """A push of several messages rejected once its last one is in (an unknown run: NOT_FOUND), or
    rejected at its first (chunks that overlap, an unknown run) and then cut short by its client
    closing the stream, held its requests, views of the client's segment, in a cycle with its error: the
    segment stayed mapped, and its descriptor open, after the stream ended, until the garbage
    collector ran."""
    from paramserver.v1 import wire

    run_id = "no-such-run"
    if end == "closed":
        async with PsClient(f"127.0.0.1:{server.port}", timeout=10) as c:
            run_id = (await c.create_run(make_spec(num_workers=1, staleness=-1))).run_id
    requests = [([("w", (3, 4), 0, np.ones(12, np.float32))] * (2 if end == "closed" else 1), False)]
    if end == "answered":
        requests.append(([], True))
    async with _segment_unmapped_at_end(server, "rejected-push") as (sock, mm):
        at = 0
        for group, final in requests:
            body = wire.join(wire.push_request_parts(run_id, 0, 1, 0, group, final))
            mm[at : at + len(body)] = body
            sock.sendall(_frame(shm.SHARED, shm.REGION.pack(at, len(body))))
            at = shm.align(at + len(body))
        if end == "answered":
            code, _ = await asyncio.to_thread(_status, sock)
            assert code == grpc.StatusCode.NOT_FOUND
        else:
            await until(lambda: server.dataplane.statistics().in_progress == 1, 5)  # (rejected, draining the rest)
            sock.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(asyncio.to_thread(sock.recv, 1), 5) == b""


async def test_a_one_message_push_refused_in_the_reader_callback_unmaps_the_segment_when_its_stream_ends(
        server: PsServer) -> None:
    """A one-message push is answered in the socket's reader callback (``Link.serve``); refused
    there for an unknown run (NOT_FOUND, raised while a KeyError was handled), its error went
    without its traceback but with the KeyError's: that one's frames held the request, a view of
    the client's segment, in a cycle with the callback's future until the garbage collector ran."""
    from paramserver.v1 import wire

    async with _segment_unmapped_at_end(server, "refused-push") as (sock, mm):
        body = wire.join(wire.push_request_parts("no-such-run", 0, 1, 0, [("w", (3, 4), 0, np.ones(12, np.float32))],
                                                 True))
        mm[: len(body)] = body
        sock.sendall(_frame(shm.SHARED, shm.REGION.pack(0, len(body))))
        code, _ = await asyncio.to_thread(_status, sock)
        assert code == grpc.StatusCode.NOT_FOUND


async def test_a_parked_pull_whose_client_goes_away_unmaps_the_segment_at_once(server: PsServer) -> None:
    """A pull parked for its SSP bound, in the client's segment, is cancelled when its client
    closes the stream. The cancelled task kept its CancelledError, whose traceback held the
    stream's frames (the request, a view of the segment) and they the task: the segment stayed
    mapped, and its descriptor open, until the garbage collector ran."""
    from paramserver.v1 import wire

    async with PsClient(f"127.0.0.1:{server.port}", timeout=10, data_plane=False) as c:
        run = await c.create_run(make_spec(num_workers=2, staleness=0))
        a = (await c.join("w", run.run_id)).assignment
        await c.join("w", run.run_id)
        await c.push(run.run_id, a.rank, a.incarnation, 0, {"w": np.ones((3, 4), np.float32), "b": np.ones(4, np.float32)})
    async with _segment_unmapped_at_end(server, "parked-pull", tcp.METHOD_PULL) as (sock, mm):
        body = wire.pull_request_bytes(run.run_id, a.rank, a.incarnation, 1, 30.0)  # (waits for the other rank)
        mm[: len(body)] = body
        sock.sendall(_frame(shm.SHARED, shm.REGION.pack(0, len(body))))
        await until(lambda: server.dataplane.statistics().in_progress == 1, 5)
        sock.close()
        mm.close()
        await until(lambda: server.shm_plane is not None and server.shm_plane.statistics().open == 0, 5)
        assert server.dataplane.statistics().in_progress == 0
