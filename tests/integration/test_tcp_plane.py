"""The TCP data plane (paramserver.v1.tcp): used once a join tells its port, off when asked or when
the server requires a token, gRPC when it cannot be reached, and the framing's own errors.

The PushGradient / PullParams semantics over it (exactly-once, SSP, bad input, big models) are
tested by the data-plane and bad-input suites, which run every test over both transports
(``client`` fixture in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import struct

import grpc
import numpy as np
import pytest
from support import make_spec, until

from paramserver import errors
from paramserver.client import PsClient
from paramserver.errors import PsError
from paramserver.tcp_transport import dial_host
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import tcp
from ps_server.config import ServerConfig
from ps_server.server import PsServer, start_server

pytestmark = pytest.mark.timeout(60)


async def _raw(port: int, first: bytes) -> tuple[socket.socket, asyncio.AbstractEventLoop]:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, first)
    return sock, loop


async def _status(sock: socket.socket, plain: bool = False) -> tuple[grpc.StatusCode, str]:
    """Read frames until the STATUS frame; then the server must close the connection. Its body is a
    serialized Status (``plain``: the bare message, as to a version 1 client)."""
    while True:
        kind, status, body = await tcp.read_frame(sock, 1 << 20)
        if kind == tcp.STATUS:
            break
    loop = asyncio.get_running_loop()
    assert await asyncio.wait_for(loop.sock_recv(sock, 1), 5) == b""  # closed after the status
    if plain:
        return {c.value[0]: c for c in grpc.StatusCode}[status], bytes(body).decode()
    parsed = pb.Status.FromString(bytes(body))
    assert parsed.code == status and parsed.error.reason != pb.ERROR_REASON_UNSPECIFIED, parsed
    return {c.value[0]: c for c in grpc.StatusCode}[status], parsed.message


async def test_pushes_and_pulls_go_over_tcp_once_join_tells_the_port(server: PsServer) -> None:
    assert server.data_plane is not None
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10, shm=False) as c:
        run = await c.create_run(make_spec(shapes={"w": (300, 1000)}, num_workers=1, staleness=-1, lr=1.0,
                                           init=pb.INITIALIZER_ZEROS))
        assert c.route.transport == "grpc"  # nothing known yet
        a = (await c.join("w", run.run_id)).assignment
        assert c.route.data_port == server.data_plane.port and c.route.transport == "tcp"
        g = np.arange(300_000, dtype=np.float32).reshape(300, 1000)  # > 1 MiB: several messages
        ack = await c.push(run.run_id, a.rank, a.incarnation, 0, {"w": g})
        assert ack.clock == 1 and not ack.duplicate
        dup = await c.push(run.run_id, a.rank, a.incarnation, 0, {"w": g})
        assert dup.duplicate
        pulled = await c.pull(run.run_id, a.rank, a.incarnation, 1)
        np.testing.assert_array_equal(pulled.tensors["w"], -g)
        _, both = await c.push_pull(run.run_id, a.rank, a.incarnation, 1, {"w": g})
        np.testing.assert_array_equal(both.tensors["w"], -2 * g)
        assert c.route.opened == {"shm": 0, "tcp": 2, "grpc": 0, "shm_unreachable": 0, "tcp_unreachable": 0}
        assert server.data_plane.statistics().connections == 2
        assert [w.data_plane for w in (await c.get_run(run.run_id)).workers] == ["tcp"]  # psctl status shows it


async def test_a_bad_push_over_tcp_gets_its_status_and_the_next_push_reconnects(server: PsServer) -> None:
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10, shm=False) as c:
        run = await c.create_run(make_spec(shapes={"w": (600, 1000)}, num_workers=1, staleness=-1))
        a = (await c.join("w", run.run_id)).assignment
        bad = np.zeros((600, 1000), np.float32)
        bad[599, 999] = np.nan  # in the push's last message: the server has read the rest first
        with pytest.raises(PsError) as err:
            await c.push(run.run_id, a.rank, a.incarnation, 0, {"w": bad})
        assert isinstance(err.value, errors.InvalidArgument) and "NaN" in err.value.message
        assert err.value.reason == pb.ERROR_REASON_INVALID_GRADIENT
        assert (await c.push(run.run_id, a.rank, a.incarnation, 0, {"w": np.ones_like(bad)})).clock == 1
        assert c.route.opened["tcp"] == 2 and c.route.opened["grpc"] == 0


async def test_an_unreachable_data_plane_falls_back_to_grpc(server: PsServer) -> None:
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10, shm=False) as c:
        run = await c.create_run(make_spec(num_workers=1, staleness=-1))
        a = (await c.join("w", run.run_id)).assignment
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        c.route.data_port = closed.getsockname()[1]  # bound, not listening: connections are refused
        try:
            p = await c.pull(run.run_id, a.rank, a.incarnation, 0)
            await c.push(run.run_id, a.rank, a.incarnation, 0, {n: np.ones_like(v) for n, v in p.tensors.items()})
        finally:
            closed.close()
        # The first stream tried TCP; the second did not try again (for a while, then it will).
        assert c.route.opened == {"shm": 0, "tcp": 0, "grpc": 2, "shm_unreachable": 0, "tcp_unreachable": 1}
        assert c.route.transport == "grpc"
        assert [w.data_plane for w in (await c.get_run(run.run_id)).workers] == ["grpc"]
        # A heartbeat tells the port again (as after a server restart): TCP from the next stream.
        hb = await c.heartbeat(run.run_id, a.rank, a.incarnation, 1)
        assert hb.data_port == c.route.data_port == server.data_plane.port and c.route.transport == "tcp"  # type: ignore[union-attr]
        await c.pull(run.run_id, a.rank, a.incarnation, 1)
        assert c.route.opened["tcp"] == 1


@pytest.mark.parametrize("timeout, push_timeout", [(2.0, None), (10.0, 1.0)])
async def test_a_data_plane_that_never_answers_falls_back_within_a_short_deadline(
        server: PsServer, timeout: float, push_timeout: float | None) -> None:
    # (the connect was given min(timeout, 3 s) whatever was left of the call's deadline: with a
    # deadline of 3 s or less that deadline came first, TCP was never found unreachable, and every
    # push timed out on it again)
    async with PsClient(f"127.0.0.1:{server.port}", timeout=timeout, shm=False) as c:
        run = await c.create_run(make_spec(num_workers=1, staleness=-1))
        a = (await c.join("w", run.run_id)).assignment
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections are taken (the backlog), the hello is never answered
        c.route.data_port = silent.getsockname()[1]
        try:
            g = {"w": np.ones((3, 4), np.float32), "b": np.ones(4, np.float32)}
            ack = await c.push(run.run_id, a.rank, a.incarnation, 0, g, timeout=push_timeout)
        finally:
            silent.close()
        assert ack.clock == 1
        assert c.route.opened == {"shm": 0, "tcp": 0, "grpc": 1, "shm_unreachable": 0, "tcp_unreachable": 1}


@pytest.mark.parametrize("shm", [False, True])
async def test_a_data_plane_at_its_stream_limit_is_left_for_grpc(server: PsServer, shm: bool) -> None:
    # (the refusal, UNAVAILABLE with STREAM_LIMIT, was raised to the caller, whose retry asked the
    # same data plane again, for as long as it stayed full: a worker lost its assignment over it)
    assert server.data_plane is not None and server.shm_plane is not None
    assert server.data_plane.budget is server.shm_plane.budget
    server.data_plane.budget.limit = 0  # the first stream is one too many
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10, shm=shm) as c:
        run = await c.create_run(make_spec(num_workers=1, staleness=-1))
        a = (await c.join("w", run.run_id)).assignment
        p = await c.pull(run.run_id, a.rank, a.incarnation, 0)
        ack = await c.push(run.run_id, a.rank, a.incarnation, 0, {n: np.ones_like(v) for n, v in p.tensors.items()})
        assert ack.clock == 1
        assert c.route.opened == {"shm": 0, "tcp": 0, "grpc": 2, "shm_unreachable": int(shm), "tcp_unreachable": 1}


async def test_data_port_minus_one_and_a_token_turn_the_data_plane_off(server_config: ServerConfig, tmp_path) -> None:  # type: ignore[no-untyped-def]
    off = await start_server(dataclasses.replace(server_config, data_port=-1))
    try:
        assert off.data_plane is None
        async with PsClient(f"127.0.0.1:{off.port}", timeout=10, shm=False) as c:
            run = await c.create_run(make_spec(num_workers=1, staleness=-1))
            resp = await c.join("w", run.run_id)
            assert resp.data_port == 0 and c.route.transport == "grpc"
            await c.pull(run.run_id, resp.assignment.rank, resp.assignment.incarnation, 0)
            assert c.route.opened == {"shm": 0, "tcp": 0, "grpc": 1, "shm_unreachable": 0, "tcp_unreachable": 0}
    finally:
        await off.stop(0)
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    guarded = await start_server(dataclasses.replace(server_config, token_file=str(secret), insecure=True))
    try:
        assert guarded.data_plane is None and guarded.shm_plane is None  # no token on them: it would bypass it
    finally:
        await guarded.stop(0)


async def test_a_client_that_goes_away_frees_its_parked_pull(server: PsServer) -> None:
    c = PsClient(f"127.0.0.1:{server.port}", timeout=10, shm=False)
    run = await c.create_run(make_spec(num_workers=2, staleness=0))
    a = (await c.join("a", run.run_id)).assignment
    await c.join("b", run.run_id)
    await c.push(run.run_id, a.rank, a.incarnation, 0, {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)})
    parked = asyncio.create_task(c.pull(run.run_id, a.rank, a.incarnation, 1, max_wait=30))  # waits for rank 1
    core = server.registry.get(run.run_id)
    await until(lambda: core.counters.pulls_parked)
    assert core.counters.pulls_parked == 1 and "rank 1" in core.waiting_for()
    parked.cancel()
    await c.close()  # the connection closes: the server cancels the parked pull, as gRPC would
    await until(lambda: core.counters.parked_seconds)
    assert 0 < core.counters.parked_seconds < 5
    assert server.dataplane.statistics().in_progress == 0


async def test_framing_errors_end_the_stream_with_a_status(server: PsServer) -> None:
    assert server.data_plane is not None
    port = server.data_plane.port
    sock, _ = await _raw(port, b"GET / HTTP/1.1\r\n\r\n")
    code, details = await _status(sock)
    assert code == grpc.StatusCode.UNIMPLEMENTED and "PSDP" in details
    sock.close()

    sock, _ = await _raw(port, tcp.HELLO.pack(tcp.MAGIC, tcp.VERSION, 9, 0))
    code, details = await _status(sock)
    assert code == grpc.StatusCode.UNIMPLEMENTED and "unknown method 9" in details
    sock.close()

    # A client of version 1 of the framing reads STATUS bodies as text: it is refused in that form
    # (and then uses gRPC).
    sock, _ = await _raw(port, tcp.HELLO.pack(tcp.MAGIC, 1, tcp.METHOD_PUSH, 0))
    code, details = await _status(sock, plain=True)
    assert code == grpc.StatusCode.UNIMPLEMENTED and f"version {tcp.VERSION}" in details
    sock.close()

    sock, loop = await _raw(port, tcp.hello(tcp.METHOD_PUSH))
    echo = await asyncio.wait_for(loop.sock_recv(sock, 8), 5)
    assert echo == tcp.hello(tcp.METHOD_PUSH)
    await loop.sock_sendall(sock, tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, server.config.max_message_bytes + 1))
    code, details = await _status(sock)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in details
    sock.close()

    sock, loop = await _raw(port, tcp.hello(tcp.METHOD_PULL))
    await asyncio.wait_for(loop.sock_recv(sock, 8), 5)
    await loop.sock_sendall(sock, tcp.FRAME.pack(7, 0, 0, 0, 0))
    code, details = await _status(sock)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "kind 7" in details
    sock.close()

    sock, loop = await _raw(port, tcp.hello(tcp.METHOD_PULL))
    await asyncio.wait_for(loop.sock_recv(sock, 8), 5)
    body = pb.PullParamsRequest(run_id="nope").SerializeToString()
    await loop.sock_sendall(sock, tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, len(body)) + body)
    code, details = await _status(sock)
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    sock.close()
    assert server.dataplane.statistics().in_progress == 0


def test_dial_host_names_the_host_of_a_grpc_target() -> None:
    assert dial_host("ps:50051") == "ps"
    assert dial_host("dns:///ps.example:50051") == "ps.example"
    assert dial_host("[::1]:50051") == "::1"
    assert dial_host("127.0.0.1:0") == "127.0.0.1"
    for target in ("unix:/tmp/ps.sock", "ps", "ipv4:10.0.0.1:50051,10.0.0.2:50051", "::1"):
        assert dial_host(target) is None, target
    assert struct.calcsize("<BBHIQ") == tcp.FRAME.size == 16 and tcp.HELLO.size == 8


class _DropFirstAnswer:
    """A TCP proxy in front of the data plane that forwards everything, except that on its first
    connection it closes both sides as soon as the server starts answering: a push that reached
    the server, whose acknowledgement is lost."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.connections = 0
        self.dropped = 0

    async def __aenter__(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        sr, sw = await asyncio.open_connection("127.0.0.1", self.upstream)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, answers: bool) -> None:
            seen = 0
            while data := await r.read(1 << 16):
                seen += len(data)
                if first and answers and seen > tcp.HELLO.size:  # past the hello: the answer
                    self.dropped += 1
                    cw.close()
                    sw.close()
                    return
                w.write(data)
                await w.drain()
            w.close()

        await asyncio.gather(pump(cr, sw, False), pump(sr, cw, True), return_exceptions=True)


async def test_a_push_whose_answer_is_lost_on_tcp_is_retried_and_applied_once(server: PsServer) -> None:
    assert server.data_plane is not None
    async with _DropFirstAnswer(server.data_plane.port) as proxy_port, \
            PsClient(f"127.0.0.1:{server.port}", timeout=10, shm=False) as c:
        run = await c.create_run(make_spec(shapes={"w": (4,)}, num_workers=1, staleness=-1, lr=1.0,
                                           init=pb.INITIALIZER_ZEROS))
        a = (await c.join("w", run.run_id)).assignment
        c.route.data_port = proxy_port
        g = {"w": np.array([1, 2, 3, 4], np.float32)}
        with pytest.raises(PsError) as err:
            await c.push(run.run_id, a.rank, a.incarnation, 0, g)
        assert err.value.retryable, err.value
        ack = await c.push(run.run_id, a.rank, a.incarnation, 0, g)  # the retry: a new connection
        assert ack.duplicate and ack.clock == 1
        pulled = await c.pull(run.run_id, a.rank, a.incarnation, 1)
        np.testing.assert_array_equal(pulled.tensors["w"], -g["w"])
        core = server.registry.get(run.run_id)
        assert core.counters.pushes_applied == 1 and core.counters.pushes_duplicate == 1
        assert c.route.opened["tcp"] == 3 and c.route.opened["grpc"] == 0


async def test_a_server_shutting_down_refuses_new_tcp_streams_with_unavailable(server: PsServer) -> None:
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10, shm=False) as c:
        run = await c.create_run(make_spec(num_workers=1, staleness=-1))
        a = (await c.join("w", run.run_id)).assignment
        server.registry.shutting_down = True  # as PsServer.stop sets it first
        with pytest.raises(PsError) as err:
            await c.pull(run.run_id, a.rank, a.incarnation, 0)
        assert isinstance(err.value, errors.Unavailable) and err.value.retryable
        assert err.value.reason == pb.ERROR_REASON_SHUTTING_DOWN and "shutting down" in err.value.message
        # Retryable, not a reason to leave the data plane: the next stream tries TCP again.
        assert c.route.opened["tcp_unreachable"] == 0 and c.route.transport == "tcp"
        server.registry.shutting_down = False


async def test_a_port_change_told_during_a_parked_pull_does_not_disturb_it(server: PsServer) -> None:
    """Heartbeats run beside pushes and pulls: news of another port must move the streams at their
    next operation, not close them under one."""
    assert server.data_plane is not None
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10, shm=False) as c:
        run = await c.create_run(make_spec(num_workers=2, staleness=0))
        a = (await c.join("a", run.run_id)).assignment
        b = (await c.join("b", run.run_id)).assignment
        zeros = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
        await c.push(run.run_id, a.rank, a.incarnation, 0, zeros)
        parked = asyncio.create_task(c.pull(run.run_id, a.rank, a.incarnation, 1))  # waits for b
        await asyncio.sleep(0.2)
        assert not parked.done()
        c.route.data_port = 1  # as if the server had said another port; its heartbeat says the real one
        await c.heartbeat(run.run_id, a.rank, a.incarnation, 1)
        assert c.route.data_port == server.data_plane.port
        async with PsClient(f"127.0.0.1:{server.port}", timeout=10, data_plane=False) as other:
            await other.push(run.run_id, b.rank, b.incarnation, 0, zeros)
        result = await asyncio.wait_for(parked, 5)
        assert result.guaranteed_clock >= 1
        assert c.route.opened == {"shm": 0, "tcp": 2, "grpc": 0, "shm_unreachable": 0, "tcp_unreachable": 0}


async def test_a_sender_stalled_mid_message_holds_one_push_slot_until_it_is_dropped(server_config: ServerConfig) -> None:
    """Issue 14: a large message is received holding a push slot, not lent out while it comes in,
    so the slots bound the memory of messages being received (another large one is not read
    meanwhile); a sender that stops in the middle is dropped after ``stall_seconds``; small messages
    need no slot."""
    ps = await start_server(dataclasses.replace(server_config, stall_seconds=2.0, push_slots=1))
    assert ps.data_plane is not None
    port = ps.data_plane.port
    try:
        stalled, loop = await _raw(port, tcp.hello(tcp.METHOD_PUSH))
        await asyncio.wait_for(loop.sock_recv(stalled, tcp.HELLO.size), 5)
        await loop.sock_sendall(stalled, tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, 32 << 20) + bytes(1 << 20))
        await asyncio.sleep(0.2)
        started = loop.time()

        other, _ = await _raw(port, tcp.hello(tcp.METHOD_PUSH))
        await asyncio.wait_for(loop.sock_recv(other, tcp.HELLO.size), 5)
        sending = asyncio.create_task(loop.sock_sendall(other, tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, 32 << 20)
                                                        + bytes(32 << 20)))  # more than the socket buffers hold
        async with PsClient(f"127.0.0.1:{ps.port}", timeout=10, shm=False) as c:  # a small push needs no slot
            run = await c.create_run(make_spec(num_workers=1, staleness=-1))
            a = (await c.join("w", run.run_id)).assignment
            ack = await c.push(run.run_id, a.rank, a.incarnation, 0,
                               {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)})
            assert ack.clock == 1 and c.route.transport == "tcp"
        await asyncio.sleep(1.0)  # twice the slots' patience: the stalled sender still holds the slot
        assert not sending.done(), "a second large message was received while the first was incomplete"

        assert await asyncio.wait_for(loop.sock_recv(stalled, 1), 10) == b""  # dropped...
        assert loop.time() - started > 1.5  # ...after stall_seconds, not before
        await asyncio.wait_for(sending, 10)  # the slot is free: the other message is received
        code, details = await _status(other)  # zeros are no PushGradientRequest (INTERNAL, as gRPC says it)
        assert code == grpc.StatusCode.INTERNAL and "does not parse" in details
        stalled.close()
        other.close()
    finally:
        await ps.stop(0)


async def test_port_probes_that_close_before_the_hello_leave_no_error(server: PsServer,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A load balancer's or Kubernetes' TCP check connects and closes: nothing to answer, no traceback."""
    import gc

    assert server.data_plane is not None
    loop = asyncio.get_running_loop()
    for _ in range(10):
        s = socket.socket()
        s.setblocking(False)
        await loop.sock_connect(s, ("127.0.0.1", server.data_plane.port))
        s.close()
    await until(lambda: server.data_plane.statistics().open == 0)
    await asyncio.sleep(0.05)
    gc.collect()  # (an exception no one retrieved is logged when its task is collected)
    assert server.data_plane.statistics().open == 0
    assert not [r for r in caplog.records if "exception" in r.getMessage().lower()]
    async with PsClient(server.address, shm=False) as c:  # and it serves as before
        run = await c.create_run(make_spec(num_workers=1))
        a = (await c.join("w", run.run_id)).assignment
        grads = {p.name: np.zeros(tuple(p.shape), np.float32) for p in run.spec.params}
        ack = await c.push(run.run_id, 0, a.incarnation, 0, grads)
        assert ack.clock == 1 and not ack.duplicate


async def test_a_failure_of_the_server_itself_is_an_internal_status_not_a_hang_up(
        server: PsServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from ps_server.core.run import Run

    def broken(*args: object, **kw: object) -> None:
        raise RuntimeError("a bug")

    async with PsClient(f"127.0.0.1:{server.port}", timeout=10, shm=False) as c:
        run = await c.create_run(make_spec(shapes={"w": (3,)}, num_workers=1, staleness=-1))
        a = (await c.join("w", run.run_id)).assignment
        monkeypatch.setattr(Run, "push", broken)
        with pytest.raises(PsError) as err:
            await c.push(run.run_id, a.rank, a.incarnation, 0, {"w": np.ones(3, np.float32)})
        assert err.value.code == errors.Code.INTERNAL and not err.value.retryable
        assert "RuntimeError: a bug" in err.value.message
        assert c.route.opened["tcp"] == 1
    assert "handler failed" in caplog.text


async def test_a_sender_stalled_inside_a_frame_header_is_dropped(server_config: ServerConfig) -> None:
    """Half a frame header, then nothing: the client is in the middle of a frame (dropped after
    ``stall_seconds``), not idle between two."""
    ps = await start_server(dataclasses.replace(server_config, stall_seconds=1.0))
    assert ps.data_plane is not None
    try:
        for method in (tcp.METHOD_PUSH, tcp.METHOD_PULL):
            sock, loop = await _raw(ps.data_plane.port, tcp.hello(method))
            await asyncio.wait_for(loop.sock_recv(sock, tcp.HELLO.size), 5)
            await loop.sock_sendall(sock, tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, 100)[:8])
            started = loop.time()
            assert await asyncio.wait_for(loop.sock_recv(sock, 1), 5) == b""
            assert loop.time() - started > 0.5
            sock.close()
    finally:
        await ps.stop(0)


def _flood(server: PsServer, transport: str, n: int) -> list[socket.socket]:
    """``n`` streams that stop early, in turn: before the hello, in the middle of it, in the middle
    of a frame's header, in the middle of a message (blocking: in a thread)."""
    from paramserver.v1 import shm

    assert server.data_plane is not None and server.shm_plane is not None
    first = tcp.hello(tcp.METHOD_PUSH) + tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, 1000) + bytes(10)
    socks = []
    for i in range(n):
        if transport == "tcp":
            sock = socket.create_connection(("127.0.0.1", server.data_plane.port), timeout=10)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(shm.name_for(server.shm_plane.name))
        socks.append(sock)
        sock.sendall(first[: [0, 5, tcp.HELLO.size + 7, len(first)][i % 4]])
    return socks


@pytest.mark.parametrize("transport", ["tcp", "shm"])
async def test_streams_that_never_greet_or_stop_mid_frame_are_dropped_and_others_are_served(
        server_config: ServerConfig, monkeypatch: pytest.MonkeyPatch, transport: str) -> None:
    """Up to 1,000 streams that stop before their hello, in it, or in the middle of a frame, all
    open at once: a well-behaved client is served meanwhile, and the server drops each of them
    (its hello's limit, ``stall_seconds``), the descriptors they held back to the budget."""
    import os
    import resource

    from ps_server import tcp_plane

    monkeypatch.setattr(tcp_plane, "_HELLO_SECONDS", 1.0)
    ps = await start_server(dataclasses.replace(server_config, stall_seconds=1.0))
    plane = ps.data_plane if transport == "tcp" else ps.shm_plane
    assert plane is not None
    socks: list[socket.socket] = []
    try:
        descriptors = len(os.listdir("/proc/self/fd"))
        n = min(1000, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - descriptors - 200) // 2)  # (both ends here)
        socks = await asyncio.to_thread(_flood, ps, transport, n)
        async with PsClient(f"127.0.0.1:{ps.port}", timeout=10, shm=transport == "shm") as c:
            run = await c.create_run(make_spec(num_workers=1, staleness=-1))
            a = (await c.join("w", run.run_id)).assignment
            ack = await asyncio.wait_for(c.push(run.run_id, a.rank, a.incarnation, 0, {"w": np.ones((3, 4), np.float32),
                                                                                       "b": np.ones(4, np.float32)}), 5)
            assert ack.clock == 1
        await until(lambda: plane.statistics().open == 0, 10)
        assert plane.statistics().open == 0 and plane.budget.used == 0
        async with PsClient(f"127.0.0.1:{ps.port}", timeout=10, shm=transport == "shm") as c:  # on the data plane again
            assert ps.data_plane is not None and ps.shm_plane is not None
            c.route.told(ps.data_plane.port, ps.shm_plane.name)  # (as a join would)
            await asyncio.wait_for(c.pull(run.run_id), 5)
            assert c.route.opened[transport] == 1, c.route.opened
        for sock in socks:  # every one was closed by the server
            sock.setblocking(True)
            sock.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(1 << 16):
                    pass
            sock.close()
        socks = []
        await until(lambda: len(os.listdir("/proc/self/fd")) <= descriptors, 5)
        assert len(os.listdir("/proc/self/fd")) <= descriptors
    finally:
        for sock in socks:
            sock.close()
        await ps.stop(0)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
async def test_a_burst_of_connections_waits_in_the_listen_queue_while_the_server_is_busy(
        server: PsServer, transport: str) -> None:
    """Connections that come faster than the server accepts them (workers reconnecting at once
    after a restart, a flood) wait in the listen queue. It held 64: the kernel dropped the rest's
    SYNs, and each connect took a retransmission, 1 s, 3 s, 7 s later (1,000 streams opened at once
    took 5-14 s), past the client's 3 s connect deadline: it fell back to gRPC."""
    from paramserver.v1 import shm

    assert server.data_plane is not None and server.shm_plane is not None
    socks = []
    try:
        for _ in range(200):  # while the event loop is blocked here: nothing is accepted
            if transport == "tcp":
                sock = socket.socket()
                sock.settimeout(0.5)
                socks.append(sock)
                sock.connect(("127.0.0.1", server.data_plane.port))
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(0.5)
                socks.append(sock)
                sock.connect(shm.name_for(server.shm_plane.name))
    finally:
        for sock in socks:
            sock.close()
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10, shm=transport == "shm") as c:
        run = await c.create_run(make_spec(num_workers=1, staleness=-1))
        a = (await c.join("w", run.run_id)).assignment
        await c.pull(run.run_id, a.rank, a.incarnation, 0)
        assert c.route.opened[transport] == 1, c.route.opened
