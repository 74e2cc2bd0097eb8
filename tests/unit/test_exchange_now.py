"""The client's exchange without its event loop (``TcpCall.exchange_now`` under ``Stream.exchange``)
against a peer played by the test on a socket pair: what the kernel does not take or give at once
(a request the socket takes only part of, an answer that comes in two parts) is finished through
the event loop, every byte once, in order."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from paramserver import tcp_transport
from paramserver.streams import Stream
from paramserver.tcp_transport import TcpCall
from paramserver.v1 import tcp

pytestmark = pytest.mark.timeout(30)


def _stream(sock: socket.socket) -> tuple[Stream, TcpCall]:
    call = TcpCall(sock, "PushGradient", 1 << 20)

    async def never(within: float) -> tuple[TcpCall, object]:
        raise AssertionError("the stream is open already")

    stream = Stream(never, "PushGradient", lambda: "key")
    stream._call, stream._key = call, "key"
    return stream, call


async def _recv_exact(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = b""
    while len(out) < n:
        chunk = await loop.sock_recv(sock, n - len(out))
        assert chunk, "the client closed the connection"
        out += chunk
    return out


def _pair(buffer: int | None = None) -> tuple[socket.socket, socket.socket]:
    client, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (client, peer):
        s.setblocking(False)
        if buffer:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    return client, peer


async def test_a_request_the_socket_takes_only_in_part_is_finished_through_the_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    client, peer = _pair(buffer=4096)
    try:
        stream, call = _stream(client)
        partly: list[bool] = []
        real = TcpCall._sendmsg_now

        def sendmsg_now(self: TcpCall, out: list[bytes]) -> bool:
            whole = real(self, out)
            partly.append(not whole)
            return whole

        monkeypatch.setattr(TcpCall, "_sendmsg_now", sendmsg_now)
        request = bytes(range(256)) * 200  # 51,200 bytes: far more than the socket holds at once
        answer = b"the answer"

        async def server() -> bytes:
            await asyncio.sleep(0.1)  # (this loop's: nothing is read while the client sends)
            head = await _recv_exact(peer, tcp.FRAME.size)
            kind, _, _, _, length = tcp.FRAME.unpack(head)
            body = await _recv_exact(peer, length)
            await asyncio.get_running_loop().sock_sendall(peer, tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, len(answer)) + answer)
            assert kind == tcp.MESSAGE
            return body

        served = asyncio.create_task(server())
        got = await stream.exchange([[request]], 10, until_final=False, decode=bytes)
        assert partly == [True]  # the socket took only part of it at once
        assert await served == request  # whole, once
        assert got == [answer] and call._rest == b""
    finally:
        client.close()
        peer.close()


async def test_an_answer_that_comes_in_two_parts_is_read_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp_transport, "SETTLE_MS", 5000)  # the client waits in the kernel until the first part
    client, peer = _pair()
    peer.setblocking(True)
    try:
        stream, call = _stream(client)
        partial: list[bool] = []
        real = TcpCall._recv_now

        def recv_now(self: TcpCall) -> memoryview | None:
            got = real(self)
            partial.append(self._partial is not None)
            return got

        monkeypatch.setattr(TcpCall, "_recv_now", recv_now)
        answer = bytes(range(256)) * 100

        def server() -> None:  # another thread: it answers while the client's thread waits
            head = peer.recv(tcp.FRAME.size, socket.MSG_WAITALL)
            peer.recv(tcp.FRAME.unpack(head)[4], socket.MSG_WAITALL)
            frame = tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, len(answer)) + answer
            peer.sendall(frame[: len(frame) // 2])
            time.sleep(0.2)
            peer.sendall(frame[len(frame) // 2 :])

        thread = threading.Thread(target=server)
        thread.start()
        got = await stream.exchange([[b"request"]], 10, until_final=False, decode=bytes)
        thread.join(10)
        assert partial == [True]  # the first part was read without the loop, the rest through it
        assert got == [answer] and call._partial is None
    finally:
        client.close()
        peer.close()


async def _overlapped(stream: Stream, work: float) -> tuple[list[bytes], float]:
    """As a worker with --overlap: the exchange in a task started with SETTLE False, then ``work``
    seconds of computation that holds the loop; returns the answers and when the work began."""
    token = tcp_transport.SETTLE.set(False)
    try:
        task = asyncio.ensure_future(stream.exchange([[b"push"]], 10, until_final=False, decode=bytes))
    finally:
        tcp_transport.SETTLE.reset(token)
    await asyncio.sleep(0)  # the task runs to its first wait
    began = time.monotonic()
    time.sleep(work)  # the gradient: nothing else runs on this loop meanwhile
    return await task, began


@pytest.mark.parametrize("answer_in", [0.0, 0.5])
async def test_a_request_sent_for_a_caller_with_other_work_is_answered_after_that_work(
        monkeypatch: pytest.MonkeyPatch, answer_in: float) -> None:
    """The request goes before the caller's work; the answer is read after it, without the event
    loop when it came meanwhile (answer_in 0), through the loop when it comes later (0.5 s)."""
    client, peer = _pair()
    peer.setblocking(True)
    try:
        stream, call = _stream(client)
        reads: list[bool] = []
        real_read = TcpCall.read

        async def read(self: TcpCall) -> memoryview:
            reads.append(True)
            return await real_read(self)

        monkeypatch.setattr(TcpCall, "read", read)
        monkeypatch.setattr(tcp_transport, "SETTLE_MS", 1)
        received: list[float] = []

        def server() -> None:
            head = peer.recv(tcp.FRAME.size, socket.MSG_WAITALL)
            assert peer.recv(tcp.FRAME.unpack(head)[4], socket.MSG_WAITALL) == b"push"
            received.append(time.monotonic())
            time.sleep(answer_in)
            peer.sendall(tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, 6) + b"answer")

        thread = threading.Thread(target=server)
        thread.start()
        got, began = await _overlapped(stream, 0.2)
        thread.join(10)
        assert got == [b"answer"]
        assert received and received[0] <= began + 0.1  # the push went before the work, not after
        assert reads == ([] if answer_in == 0 else [True])
        assert call._partial is None and not stream._lock.locked()
    finally:
        client.close()
        peer.close()
