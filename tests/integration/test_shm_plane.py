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
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from support import make_spec

from paramserver import errors
from paramserver.client import PsClient
from paramserver.shm_transport import ShmCall
from paramserver.streams import Pending
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import shm, tcp
from ps_server.config import ServerConfig
from ps_server.core.errors import PsError
from ps_server.dataplane import Caller, Later, PushMemo
from ps_server.server import PsServer, start_server

pytestmark = pytest.mark.timeout(60)


def segments(pid: int | str = "self") -> int:
    """Shared-memory segments (distinct memfds of this protocol) ``pid`` maps now."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return len({line.split()[4] for line in lines if "memfd:paramserver-segment" in line})


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


async def test_bsp_keeps_a_held_gradient_when_the_client_writes_its_region_again(server: PsServer) -> None:
    """At s = 0 a push is held until every rank pushed its clock: the server copies it, since the
    client may write the same region meanwhile (here: a retried push of other values)."""
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10) as c0, \
            PsClient(f"127.0.0.1:{server.port}", timeout=10) as c1:
        run = await c0.create_run(make_spec(shapes={"w": (300, 300)}, num_workers=2, staleness=0, lr=1.0,
                                            init=pb.INITIALIZER_ZEROS))
        a0 = (await c0.join("a", run.run_id)).assignment
        a1 = (await c1.join("b", run.run_id)).assignment
        ones = np.ones((300, 300), np.float32)  # > 64 KiB: decoded in place (wire.SMALL_MESSAGE)
        await c0.push(run.run_id, a0.rank, a0.incarnation, 0, {"w": ones})
        dup = await c0.push(run.run_id, a0.rank, a0.incarnation, 0, {"w": 1000 * ones})  # same region, other bytes
        assert dup.duplicate
        await c1.push(run.run_id, a1.rank, a1.incarnation, 0, {"w": 3 * ones})
        pulled = await c1.pull(run.run_id, a1.rank, a1.incarnation, 1)
        np.testing.assert_array_equal(pulled.tensors["w"], -2 * ones)  # the mean of 1 and 3, not of 1000
        assert c0.route.opened["shm"] == 1


class _Spy:
    """What ``DataPlane.push_now`` (the pushes answered in the socket's callback) returned."""

    def __init__(self, server: PsServer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kinds: list[str] = []
        real = server.dataplane.push_now

        def push_now(raw: bytes | memoryview, caller: Caller, memo: PushMemo | None = None) -> object:
            try:
                out = real(raw, caller, memo)
            except PsError as exc:
                self.kinds.append(type(exc).__name__)
                raise
            self.kinds.append("general" if out is None else "later" if isinstance(out, Later) else "answered")
            return out

        monkeypatch.setattr(server.dataplane, "push_now", push_now)


async def test_one_message_pushes_are_answered_in_the_callback_and_a_waiting_pull_by_the_task(
        server: PsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small push and its then_pull are answered in the socket's callback; at s = 0 the pull of a
    rank that pushed first must wait for the other, and is answered (by the stream's task) once it pushes."""
    spy = _Spy(server, monkeypatch)
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10) as c0, \
            PsClient(f"127.0.0.1:{server.port}", timeout=10) as c1:
        run = await c0.create_run(make_spec(shapes={"w": (3, 4)}, num_workers=2, staleness=0, lr=1.0,
                                            init=pb.INITIALIZER_ZEROS))
        a0 = (await c0.join("a", run.run_id)).assignment
        a1 = (await c1.join("b", run.run_id)).assignment
        ones = np.ones((3, 4), np.float32)
        p0: dict[str, np.ndarray] = {}
        p1: dict[str, np.ndarray] = {}
        for clock in range(3):
            first = asyncio.create_task(c0.push_pull(run.run_id, a0.rank, a0.incarnation, clock, {"w": ones}, into=p0))
            await asyncio.sleep(0.2)
            assert not first.done()  # BSP: rank 0's pull of clock + 1 waits for rank 1's push of clock
            ack1, pulled1 = await c1.push_pull(run.run_id, a1.rank, a1.incarnation, clock, {"w": 3 * ones}, into=p1)
            ack0, pulled0 = await first
            assert ack0.clock == ack1.clock == clock + 1
            assert pulled0.guaranteed_clock == pulled1.guaranteed_clock == clock + 1
            np.testing.assert_array_equal(p0["w"], -2 * (clock + 1) * ones)  # each clock: the mean of 1 and 3
            np.testing.assert_array_equal(p1["w"], p0["w"])
        assert spy.kinds == ["later", "answered"] * 3
        assert c0.route.opened["shm"] == c1.route.opened["shm"] == 1  # (both streams stayed open)
        core = server.registry.get(run.run_id).counters
        assert core.pushes_applied == 6 and core.pulls_parked == 3


async def test_a_push_rejected_in_the_callback_gets_its_status_once_and_the_stream_reopens(
        server: PsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(server, monkeypatch)
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10) as c:
        run = await c.create_run(make_spec(shapes={"w": (3, 4)}, num_workers=1, staleness=-1))
        a = (await c.join("w", run.run_id)).assignment
        with pytest.raises(errors.InvalidArgument, match="unknown tensor name"):
            await c.push(run.run_id, a.rank, a.incarnation, 0, {"w": np.ones((3, 4), np.float32),
                                                                 "v": np.ones(2, np.float32)})
        with pytest.raises(errors.FailedPrecondition, match="push the clocks before it|clock order"):
            await c.push(run.run_id, a.rank, a.incarnation, 5, {"w": np.ones((3, 4), np.float32)})
        with pytest.raises(errors.NotFound):
            await c.push("no-such-run", a.rank, a.incarnation, 0, {"w": np.ones((3, 4), np.float32)})
        assert (await c.push(run.run_id, a.rank, a.incarnation, 0, {"w": np.ones((3, 4), np.float32)})).clock == 1
        assert spy.kinds == ["InvalidArgument", "FailedPrecondition", "NotFound", "answered"]
        assert server.registry.get(run.run_id).counters.pushes_rejected == 2  # once each, not again by the general path
        assert c.route.opened["shm"] == 4 and c.route.opened["grpc"] == 0


async def test_pushes_laid_out_as_the_streams_last_skip_decoding_and_apply_the_same(
        server: PsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a stream's first push, one laid out alike (``wire.PushLayout``) is copied straight into
    the run's gradient buffer: the same parameters result as with the general path, a NaN is still
    refused with its tensor's name, and a push of the tensors in another order takes the general path."""
    laid_out: list[bool] = []
    real = server.dataplane._laid_out

    def spy(raw: memoryview, memo: PushMemo) -> Any:
        got = real(raw, memo)
        laid_out.append(got is not None)
        return got

    monkeypatch.setattr(server.dataplane, "_laid_out", spy)
    rng = np.random.default_rng(0)
    grads = [{"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
             for _ in range(4)]
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10) as c:
        run = await c.create_run(make_spec(shapes={"w": (3, 4), "b": (4,)}, num_workers=1, staleness=-1, lr=0.5,
                                           init=pb.INITIALIZER_ZEROS))
        a = (await c.join("w", run.run_id)).assignment
        params: dict[str, np.ndarray] = {}
        for clock, g in enumerate(grads[:3]):
            await c.push_pull(run.run_id, a.rank, a.incarnation, clock, g, into=params)
        assert laid_out == [True, True]  # (the first push taught the layout)
        np.testing.assert_allclose(params["w"], -0.5 * sum(g["w"] for g in grads[:3]), rtol=1e-6)
        np.testing.assert_allclose(params["b"], -0.5 * sum(g["b"] for g in grads[:3]), rtol=1e-6)
        reordered = {"b": grads[3]["b"], "w": grads[3]["w"]}
        await c.push_pull(run.run_id, a.rank, a.incarnation, 3, reordered, into=params)
        assert laid_out[-1] is False
        np.testing.assert_allclose(params["w"], -0.5 * sum(g["w"] for g in grads), rtol=1e-6)
        bad = {"w": grads[0]["w"].copy(), "b": grads[0]["b"].copy()}
        bad["w"][1, 2] = np.nan
        await c.push(run.run_id, a.rank, a.incarnation, 4, {"w": grads[0]["w"], "b": grads[0]["b"]})
        laid_out.clear()
        with pytest.raises(errors.InvalidArgument, match="gradient 'w' contains 1 NaN"):
            await c.push(run.run_id, a.rank, a.incarnation, 5, bad)
        assert laid_out == [True]
        pulled = await c.pull(run.run_id, a.rank, a.incarnation, 5)
        np.testing.assert_allclose(pulled.tensors["w"], -0.5 * (sum(g["w"] for g in grads) + grads[0]["w"]),
                                   rtol=1e-6)  # nothing of the refused push
        assert server.registry.get(run.run_id).counters.pushes_rejected == 1


async def test_a_client_gone_while_its_pull_waits_in_a_push_frees_the_stream(server: PsServer) -> None:
    c = PsClient(f"127.0.0.1:{server.port}", timeout=10)
    run = await c.create_run(make_spec(num_workers=2, staleness=0))
    a = (await c.join("a", run.run_id)).assignment
    await c.join("b", run.run_id)
    zeros = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    parked = asyncio.create_task(c.push_pull(run.run_id, a.rank, a.incarnation, 0, zeros, max_wait=30))
    core = server.registry.get(run.run_id)
    for _ in range(100):
        if core.counters.pulls_parked:
            break
        await asyncio.sleep(0.02)
    assert core.counters.pulls_parked == 1 and core.counters.pushes_applied == 1
    parked.cancel()
    await c.close()  # the connection closes: the server cancels the waiting pull, as gRPC would
    for _ in range(100):
        if core.counters.parked_seconds:
            break
        await asyncio.sleep(0.02)
    assert 0 < core.counters.parked_seconds < 5
    assert server.dataplane.statistics().in_progress == 0
    assert server.shm_plane is not None
    for _ in range(100):
        if server.shm_plane.statistics().open == 0:
            break
        await asyncio.sleep(0.02)
    assert server.shm_plane.statistics().open == 0


@contextlib.contextmanager
def _server_in_a_thread(config: ServerConfig) -> Iterator[PsServer]:
    """A server on an event loop of its own (as in its own process): it answers while the client's
    thread waits for the answer in the kernel."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(start_server(config), loop).result(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def test_the_client_exchanges_without_its_event_loop_when_the_answer_comes_at_once(
        server_config: ServerConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A push-and-pull whose answer is in the segment within the settle time is done in
    ``exchange_now`` (no lock, timer or task switch); a status or an answer that must wait goes on
    through the event loop, with the same results and errors."""
    finished: list[str] = []
    real = ShmCall._exchange_now

    def spy(self: ShmCall, *args: Any) -> Any:
        got = real(self, *args)
        finished.append("pending" if isinstance(got, Pending) else "now")
        return got

    monkeypatch.setattr(ShmCall, "_exchange_now", spy)
    with _server_in_a_thread(server_config) as server:
        async with PsClient(f"127.0.0.1:{server.port}", timeout=10) as c0, \
                PsClient(f"127.0.0.1:{server.port}", timeout=10) as c1:
            run = await c0.create_run(make_spec(shapes={"w": (30, 40)}, num_workers=2, staleness=-1, lr=1.0, iterations=100,
                                                init=pb.INITIALIZER_ZEROS))
            a0 = (await c0.join("a", run.run_id)).assignment
            a1 = (await c1.join("b", run.run_id)).assignment
            ones = np.ones((30, 40), np.float32)
            params: dict[str, np.ndarray] = {}
            await c0.push(run.run_id, a0.rank, a0.incarnation, 0, {"w": ones})  # opens the stream
            for clock in range(1, 41):
                ack, pulled = await c0.push_pull(run.run_id, a0.rank, a0.incarnation, clock, {"w": ones}, into=params)
                assert ack.clock == clock + 1 and pulled.guaranteed_clock == 0  # (rank 1 has not pushed)
                np.testing.assert_array_equal(params["w"], -(clock + 1) * ones)
            assert finished.count("now") >= 30, finished  # (a busy machine may miss the settle time now and then)
            with pytest.raises(errors.FailedPrecondition, match="clock order|before it"):
                await c0.push(run.run_id, a0.rank, a0.incarnation, 50, {"w": ones})  # a STATUS frame
            assert finished[-1] == "pending"
            await c1.push(run.run_id, a1.rank, a1.incarnation, 0, {"w": ones})
            core_ack = await c0.push(run.run_id, a0.rank, a0.incarnation, 41, {"w": ones})  # a new stream
            assert core_ack.clock == 42 and c0.route.opened["shm"] == 2


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


def _memfd(size: int, seal: bool) -> int:
    import fcntl

    fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


@pytest.mark.parametrize("case", ["shared_first", "no_fd", "unsealed", "outside", "unknown_kind"])
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
        else:
            sock.sendall(_frame(9, struct.pack("<QQ", 0, 0)))
        code, message = await asyncio.to_thread(_status, sock)
    finally:
        sock.close()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert {"shared_first": "before any SEGMENT", "no_fd": "exactly one", "unsealed": "F_SEAL_SHRINK",
            "outside": "outside the segment's region", "unknown_kind": "unknown frame kind"}[case] in message
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10) as c:  # and it serves as before
        run = await c.create_run(make_spec(num_workers=1, staleness=-1))
        a = (await c.join("w", run.run_id)).assignment
        await c.pull(run.run_id, a.rank, a.incarnation, 0)
        assert c.route.opened["shm"] == 1
