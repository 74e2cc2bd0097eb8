"""The lean path of a small push, on the shared-memory and the TCP data planes: the server reads,
applies and answers a one-message push in its socket's reader callback (``DataPlane.push_now``,
``Link.serve``), reading a push laid out as its stream's last one without decoding its chunks
(``unwire.PushLayout``); the client writes a request and reads its answer without its event loop
when the answer comes at once (``TcpCall.exchange_now``). What either cannot finish at once (a
pull that must wait, a status, a frame still coming in, a push of several messages) goes on
through the event loop with the same results and errors."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from support import make_spec, until

from client.spec import LaunchOptions, build_run_spec
from paramserver import client as client_module
from paramserver import errors, shm_transport, tcp_transport
from paramserver.client import PsClient
from paramserver.exchange import Answer
from paramserver.shm_transport import ShmCall
from paramserver.streams import Pending
from paramserver.tcp_transport import TcpCall
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import tcp, wire
from ps_server.config import ServerConfig
from ps_server.core.errors import PsError
from ps_server.dataplane import Caller, Later, PushMemo
from ps_server.server import PsServer, start_server
from worker.config import WorkerConfig
from worker.main import CAPABILITIES
from worker.trainer import train

pytestmark = pytest.mark.timeout(60)

TRANSPORTS = ["shm", "tcp"]


def connect(server: PsServer, transport: str, **kw: Any) -> PsClient:
    return PsClient(f"127.0.0.1:{server.port}", timeout=10, shm=transport == "shm", **kw)


def plane(server: PsServer, transport: str) -> Any:
    return server.shm_plane if transport == "shm" else server.data_plane


class Spy:
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


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_one_message_pushes_are_answered_in_the_callback_and_a_waiting_pull_by_the_task(transport: str,
        server: PsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small push and its then_pull are answered in the socket's callback; at s = 0 the pull of a
    rank that pushed first must wait for the other, and is answered (by the stream's task) once it pushes."""
    spy = Spy(server, monkeypatch)
    async with connect(server, transport) as c0, \
            connect(server, transport) as c1:
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
        assert c0.route.opened[transport] == c1.route.opened[transport] == 1  # (both streams stayed open)
        core = server.registry.get(run.run_id).counters
        assert core.pushes_applied == 6 and core.pulls_parked == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_push_rejected_in_the_callback_gets_its_status_once_and_the_stream_reopens(transport: str,
        server: PsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(server, monkeypatch)
    async with connect(server, transport) as c:
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
        assert c.route.opened[transport] == 4 and c.route.opened["grpc"] == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_pushes_laid_out_as_the_streams_last_skip_decoding_and_apply_the_same(transport: str,
        server: PsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a stream's first push, one laid out alike (``unwire.PushLayout``) is copied straight into
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
    async with connect(server, transport) as c:
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


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_client_gone_while_its_pull_waits_in_a_push_frees_the_stream(transport: str, server: PsServer) -> None:
    c = connect(server, transport)
    run = await c.create_run(make_spec(num_workers=2, staleness=0))
    a = (await c.join("a", run.run_id)).assignment
    await c.join("b", run.run_id)
    zeros = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    parked = asyncio.create_task(c.push_pull(run.run_id, a.rank, a.incarnation, 0, zeros, max_wait=30))
    core = server.registry.get(run.run_id)
    await until(lambda: core.counters.pulls_parked)
    assert core.counters.pulls_parked == 1 and core.counters.pushes_applied == 1
    parked.cancel()
    await c.close()  # the connection closes: the server cancels the waiting pull, as gRPC would
    await until(lambda: core.counters.parked_seconds)
    assert 0 < core.counters.parked_seconds < 5
    assert server.dataplane.statistics().in_progress == 0
    await until(lambda: plane(server, transport).statistics().open == 0)
    assert plane(server, transport).statistics().open == 0


@contextlib.contextmanager
def server_in_a_thread(config: ServerConfig) -> Iterator[PsServer]:
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


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_client_exchanges_without_its_event_loop_when_the_answer_comes_at_once(transport: str,
        server_config: ServerConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A push-and-pull whose answer is in the segment within the settle time is done in
    ``exchange_now`` (no lock, timer or task switch); a status or an answer that must wait goes on
    through the event loop, with the same results and errors."""
    finished: list[str] = []
    real = TcpCall._exchange_now

    def spy(self: TcpCall, *args: Any) -> Any:
        got = real(self, *args)
        finished.append("pending" if isinstance(got, Pending) else "now")
        return got

    monkeypatch.setattr(TcpCall, "_exchange_now", spy)
    monkeypatch.setattr(tcp_transport, "SETTLE_MS", 500)  # (a busy machine may not run the server within 2 ms)
    monkeypatch.setattr(client_module, "native", None)  # (the C exchange's: test_the_c_exchange_...)
    with server_in_a_thread(server_config) as server:
        async with connect(server, transport) as c0, \
                connect(server, transport) as c1:
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
            assert finished.count("now") >= 30, finished
            with pytest.raises(errors.FailedPrecondition, match="clock order|before it"):
                await c0.push(run.run_id, a0.rank, a0.incarnation, 50, {"w": ones})  # a STATUS frame
            assert finished[-1] == "pending"
            await c1.push(run.run_id, a1.rank, a1.incarnation, 0, {"w": ones})
            core_ack = await c0.push(run.run_id, a0.rank, a0.incarnation, 41, {"w": ones})  # a new stream
            assert core_ack.clock == 42 and c0.route.opened[transport] == 2




@pytest.mark.skipif(shm_transport.native is None, reason="the C exchange was not built (no compiler at install)")
async def test_the_c_exchange_answers_as_the_python_path(server_config: ServerConfig,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A small dense model's push-and-pull on shared memory goes through the C exchange
    (``ShmCall.push_pull_now``): the same acknowledgements and parameters as the Python path's,
    step for step; the first pull (no arrays held yet), a status and an answer that must wait are
    left to the Python path, with the same results and errors."""
    calls: list[str] = []
    real = ShmCall.push_pull_now

    def spy(self: ShmCall, *args: Any) -> Any:
        got = real(self, *args)
        calls.append("decoded" if isinstance(got, tuple) else "bytes" if isinstance(got, memoryview) else str(got))
        return got

    monkeypatch.setattr(ShmCall, "push_pull_now", spy)
    monkeypatch.setattr(tcp_transport, "SETTLE_MS", 500)  # (a busy machine may not run the server within 2 ms)
    shapes = {"w": (30, 40), "b": (7,)}
    grads = {"b": np.linspace(-1, 1, 7, dtype=np.float32), "w": np.arange(1200, dtype=np.float32).reshape(30, 40) / 1e3}
    seen: dict[bool, list[tuple[Any, ...]]] = {}
    for use in (True, False):
        monkeypatch.setattr(client_module, "native", shm_transport.native if use else None)
        with server_in_a_thread(server_config) as server:
            async with connect(server, "shm") as c:
                run = await c.create_run(make_spec(shapes=shapes, num_workers=1, staleness=-1, lr=0.5, iterations=100,
                                                   init=pb.INITIALIZER_ZEROS))
                a = (await c.join("a", run.run_id)).assignment
                params: dict[str, np.ndarray] = {}
                steps = seen[use] = []
                for clock in range(30):
                    ack, pulled = await c.push_pull(run.run_id, a.rank, a.incarnation, clock, grads, loss=0.25 * clock,
                                                    into=params)
                    steps.append((ack.clock, ack.duplicate, ack.min_clock, ack.run_state, ack.HasField("staleness"),
                                  pulled.guaranteed_clock, pulled.version, pulled.run_state, pulled.staleness,
                                  pulled.lineage != 0, params["w"].tobytes(), params["b"].tobytes()))
                    assert pulled.tensors is params
                np.testing.assert_allclose(params["w"], -0.5 * 30 * grads["w"], rtol=1e-5)
                if use:
                    assert calls.count("decoded") >= 20, calls  # (the first push opened the stream: the Python path)
                    fresh: dict[str, np.ndarray] = {}  # (no arrays to copy into: the answer goes to the sink)
                    ack, pulled = await c.push_pull(run.run_id, a.rank, a.incarnation, 30, grads, into=fresh)
                    assert calls[-1] == "bytes" and ack.clock == 31 and pulled.tensors is fresh
                    np.testing.assert_allclose(fresh["w"], -0.5 * 31 * grads["w"], rtol=1e-5)
                    with pytest.raises(errors.FailedPrecondition, match="clock order|before it"):
                        await c.push_pull(run.run_id, a.rank, a.incarnation, 50, grads, into=params)  # a STATUS frame
                    assert calls[-1] == "True"
                    await c.push_pull(run.run_id, a.rank, a.incarnation, 31, grads, into=params)  # a new stream
                    ack, _ = await c.push_pull(run.run_id, a.rank, a.incarnation, 32, grads, into=params)
                    assert ack.clock == 33 and calls[-1] == "decoded" and c.route.opened["shm"] == 2
                    grads_b = {**grads, "w": grads["w"].T.copy()}  # another shape: the Python path refuses it
                    with pytest.raises(errors.InvalidArgument, match="shape"):
                        await c.push_pull(run.run_id, a.rank, a.incarnation, 33, grads_b, into=params)
                    other = await c.create_run(make_spec(shapes={"w": (40, 30), "b": (7,)}, num_workers=1, staleness=-1,
                                                         iterations=100, init=pb.INITIALIZER_ZEROS))
                    a2 = (await c.join("b", other.run_id)).assignment
                    grads2, held2 = {"b": grads["b"], "w": np.ones((40, 30), np.float32)}, {}
                    n0 = len(calls)
                    for clock in range(3):  # (another model's tensors of the same names: laid out anew)
                        ack, _ = await c.push_pull(other.run_id, a2.rank, a2.incarnation, clock, grads2, into=held2)
                    assert ack.clock == 3 and calls[n0:] == ["decoded", "decoded"], calls[n0:]
                    before = len(calls)
                else:
                    assert len(calls) == before  # (off: never called)
    assert seen[True] == seen[False]


async def test_push_pull_now_answers_within_the_call_or_gives_the_answer_to_await(
        server_config: ServerConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """``PsClient.push_pull_now``: with the C exchange, on shared memory, a push whose answer
    comes in time is answered within the call (an ``Answer``, the parameters in the caller's
    arrays); otherwise, and without the C exchange, it gives an awaitable of ``push_pull``'s
    answer to the same push, sent once: the same clocks and parameters either way, a status as
    ``push_pull``'s error."""
    monkeypatch.setattr(tcp_transport, "SETTLE_MS", 500)  # (a busy machine may not run the server within 2 ms)
    grads = {"w": np.arange(1200, dtype=np.float32).reshape(30, 40) / 1e3, "b": np.ones(7, np.float32)}  # (answers over 4 KiB: in the segment)
    for use in (True, False):
        monkeypatch.setattr(client_module, "native", shm_transport.native if use else None)
        with server_in_a_thread(server_config) as server:
            async with connect(server, "shm") as c:
                run = await c.create_run(make_spec(shapes={"w": (30, 40), "b": (7,)}, num_workers=1, staleness=0, lr=0.5,
                                                   iterations=100, init=pb.INITIALIZER_ZEROS))
                a = (await c.join("a", run.run_id)).assignment
                params: dict[str, np.ndarray] = {}
                kinds: list[str] = []
                for clock in range(20):
                    got = c.push_pull_now(run.run_id, a.rank, a.incarnation, clock, grads, 0.5, params, 5.0)
                    if isinstance(got, Answer):
                        kinds.append("answer")
                        fields = (got.clock, got.min_clock, got.guaranteed_clock, got.version, got.final,
                                  got.run_state, got.pulled_run_state, got.duplicate)
                    else:
                        kinds.append("await")
                        ack, pulled = await got
                        assert pulled.tensors is params
                        fields = (ack.clock, ack.min_clock, pulled.guaranteed_clock, pulled.version, True,
                                  ack.run_state, pulled.run_state, ack.duplicate)
                    assert fields == (clock + 1, clock + 1, clock + 1, clock + 1, True, pb.RUN_STATE_RUNNING,
                                      pb.RUN_STATE_RUNNING, False), (clock, fields)
                    for name, g in grads.items():
                        np.testing.assert_allclose(params[name], -0.5 * (clock + 1) * g, rtol=1e-5)
                assert server.registry.get(run.run_id).counters.pushes_applied == 20
                if use:  # (the first opened the stream: awaited)
                    assert kinds[0] == "await" and kinds.count("answer") >= 15, kinds
                else:
                    assert kinds == ["await"] * 20
                with pytest.raises(errors.FailedPrecondition, match="clock order|before it"):  # a status
                    got = c.push_pull_now(run.run_id, a.rank, a.incarnation, 50, grads, 0.5, params, 5.0)
                    assert not isinstance(got, Answer)
                    await got
                assert server.registry.get(run.run_id).counters.pushes_applied == 20


async def test_a_worker_on_shared_memory_trains_its_steady_iterations_within_the_c_exchange(
        server_config: ServerConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank training a small model on the server's host does its steady iterations in
    ``Steady.run``'s loop, each answered within the C exchange's call; evaluations, reports and
    its last iteration in the trainer's: the run completes with every push applied once."""
    monkeypatch.setattr(tcp_transport, "SETTLE_MS", 500)
    answered: list[int] = []
    real = PsClient.push_pull_now

    def spy(self: PsClient, *args: Any) -> Any:
        got = real(self, *args)
        if isinstance(got, Answer):
            answered.append(args[3])
        return got

    monkeypatch.setattr(PsClient, "push_pull_now", spy)
    spec = build_run_spec(LaunchOptions(model="mlp:16", dataset="digits", workers=1, staleness=0,
                                        iterations=120, batch_size=16, lr=0.2, eval_every=50))
    with server_in_a_thread(server_config) as server:
        async with connect(server, "shm") as c:
            run = await c.create_run(spec)
            a = (await c.join("w", run.run_id, capabilities=CAPABILITIES)).assignment
            outcome = await train(c, a, WorkerConfig(timeout_seconds=5.0, report_seconds=0.05))
            counters = server.registry.get(run.run_id).counters
            assert c.route.transport == "shm"
    assert outcome.completed and outcome.stats.iterations == 120 and outcome.stats.retries == 0
    assert counters.pushes_applied == 120 and counters.pushes_duplicate == 0
    assert len(answered) >= 80 and 0 not in answered and 50 not in answered and 119 not in answered, answered
    assert answered == sorted(set(answered))


def tcp_push_stream(server: PsServer) -> socket.socket:
    assert server.data_plane is not None
    sock = socket.create_connection(("127.0.0.1", server.data_plane.port), timeout=5)
    sock.sendall(tcp.hello(tcp.METHOD_PUSH))
    assert sock.recv(tcp.HELLO.size) == tcp.hello(tcp.METHOD_PUSH)
    return sock


def read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    head = b""
    while len(head) < tcp.FRAME.size:
        head += sock.recv(tcp.FRAME.size - len(head))
    kind, _, _, status, length = tcp.FRAME.unpack(head)
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return kind, status, body


async def test_a_tcp_push_whose_frame_comes_in_two_parts_is_answered_once_it_is_whole(server: PsServer) -> None:
    """The callback reads what came; the stream's task waits for the rest, then answers the same."""
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10, shm=False) as c:
        run = await c.create_run(make_spec(shapes={"w": (30, 40)}, num_workers=1, staleness=-1, lr=1.0,
                                           init=pb.INITIALIZER_ZEROS))
        a = (await c.join("w", run.run_id)).assignment
    ones = np.ones((30, 40), np.float32)
    sock = await asyncio.to_thread(tcp_push_stream, server)
    try:
        for clock in range(3):
            body = wire.join(wire.push_request_parts(run.run_id, a.rank, a.incarnation, clock,
                                                     next(wire.chunk_groups({"w": ones}, 1 << 20)), True))
            frame = tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, len(body)) + body
            sock.sendall(frame[: 16 + len(body) // 2])
            await asyncio.sleep(0.2)  # the server has read half of it by now, and waits
            sock.sendall(frame[16 + len(body) // 2 :])
            kind, _, answer = await asyncio.to_thread(read_frame, sock)
            assert kind == tcp.MESSAGE and pb.PushGradientResponse.FromString(answer).clock == clock + 1
    finally:
        sock.close()
    core = server.registry.get(run.run_id)
    assert core.counters.pushes_applied == 3 and core.counters.pushes_rejected == 0


async def test_a_tcp_sender_stalled_in_the_middle_of_a_small_frame_is_dropped(server_config: ServerConfig) -> None:
    config = ServerConfig(**{**server_config.__dict__, "stall_seconds": 0.5})
    server = await start_server(config)
    try:
        sock = await asyncio.to_thread(tcp_push_stream, server)
        sock.sendall(tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, 1000) + b"x" * 10)
        assert server.data_plane is not None
        t0 = time.monotonic()
        closed = await asyncio.to_thread(sock.recv, 100)  # the server closes the connection
        assert closed == b"" and time.monotonic() - t0 < 5
        await until(lambda: server.data_plane.statistics().open == 0)
        assert server.data_plane.statistics().open == 0
        sock.close()
    finally:
        await server.stop(0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_operation_never_overtakes_one_waiting_for_the_stream(transport: str, server: PsServer) -> None:
    """Task A's pull parks; task B queues for the pull stream; when A's pull is let go, A's next
    pull must not go out without the loop before B's (the lock is free for a moment before B runs):
    each gets its own answer."""
    async with connect(server, transport) as c:
        run = await c.create_run(make_spec(shapes={"w": (3, 4), "b": (4,)}, num_workers=2, staleness=0,
                                           init=pb.INITIALIZER_ZEROS))
        a0 = (await c.join("a", run.run_id)).assignment
        a1 = (await c.join("b", run.run_id)).assignment
        zeros = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
        await c.pull(run.run_id, names=["w"])  # the pull stream is open
        await c.push(run.run_id, a0.rank, a0.incarnation, 0, zeros)

        async def parked_then_another() -> list[str]:
            await c.pull(run.run_id, a0.rank, a0.incarnation, 1)  # parks until rank 1 pushes clock 0
            return sorted((await c.pull(run.run_id, names=["w"])).tensors)

        a = asyncio.create_task(parked_then_another())
        await asyncio.sleep(0.2)
        b = asyncio.create_task(c.pull(run.run_id, names=["b"]))  # waits for the stream
        await asyncio.sleep(0.2)
        await c.push(run.run_id, a1.rank, a1.incarnation, 0, zeros)
        assert await a == ["w"]
        assert sorted((await b).tensors) == ["b"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_pushes_of_two_tasks_on_one_client_each_get_their_own_acknowledgement(transport: str,
                                                                                    server: PsServer) -> None:
    """As above, with pushes: rank 0's push whose pull parks, then its next push, against rank 2's
    push queued for the same stream meanwhile: each acknowledged with its own clock, each applied once."""
    async with connect(server, transport) as c, connect(server, transport) as other:
        run = await c.create_run(make_spec(shapes={"w": (3, 4)}, num_workers=3, staleness=10, iterations=50,
                                           init=pb.INITIALIZER_ZEROS))
        r0 = (await c.join("a", run.run_id)).assignment
        r1 = (await other.join("b", run.run_id)).assignment
        r2 = (await c.join("c", run.run_id)).assignment
        g = {"w": np.ones((3, 4), np.float32)}
        for k in range(10):
            await c.push(run.run_id, r0.rank, r0.incarnation, k, g)
        await c.push(run.run_id, r2.rank, r2.incarnation, 0, g)

        async def parked_then_another() -> int:
            await c.push_pull(run.run_id, r0.rank, r0.incarnation, 10, g)  # its pull of 11 waits for rank 1
            return (await c.push(run.run_id, r0.rank, r0.incarnation, 11, g)).clock

        a = asyncio.create_task(parked_then_another())
        await asyncio.sleep(0.3)
        b = asyncio.create_task(c.push(run.run_id, r2.rank, r2.incarnation, 1, g))  # waits for the stream
        await asyncio.sleep(0.3)
        await other.push(run.run_id, r1.rank, r1.incarnation, 0, g)
        assert await a == 12
        assert (await b).clock == 2
        got = await c.get_run(run.run_id)
        assert got.counters.pushes_applied == 10 + 1 + 2 + 1 + 1 and got.counters.pushes_duplicate == 0


async def test_an_answer_over_the_clients_limit_is_refused_not_retried(server: PsServer) -> None:
    """A model larger than the client's --max-message-bytes, over TCP: the answer would be the same
    however often it asked (a worker retried it for ever, its run stuck at clock 0):
    RESOURCE_EXHAUSTED naming the limit, as over gRPC. (Through shared memory the answer is in the
    client's own segment, which grows to fit.)"""
    transport = "tcp"
    async with connect(server, transport, max_message_bytes=1 << 20) as c:
        run = await c.create_run(make_spec(shapes={"w": (600, 600)}, num_workers=1))
        a = (await c.join("w0", run.run_id)).assignment
        await c.push(run.run_id, a.rank, a.incarnation, 0, {"w": np.zeros((600, 600), np.float32)})  # (the stream opens)
        with pytest.raises(errors.ResourceExhausted, match="larger than this client's limit of 1048576 bytes"):
            await c.pull(run.run_id, a.rank, a.incarnation, 1, max_wait=1.0)
        assert c.route.opened[transport] >= 1
