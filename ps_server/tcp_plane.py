"""The server's end of the TCP data plane (``paramserver.v1.tcp`` documents the framing).

Each connection is one PushGradient or PullParams stream, served by the same
``ParameterServicer`` method as the gRPC stream, with a stand-in for gRPC's servicer context: the
semantics (exactly-once, the SSP wait, slots, every error and its status code) are the
servicer's, not this module's. What this module adds is the transport: requests are received
into fresh buffers (the decoded chunks are views of them: no copy after the kernel's), and
responses are written as their parts with ``sendmsg`` (the parameters' bytes go from the store's
arrays to the socket; gRPC copies each message twice first).

A response's parameter bytes are read while it is being sent; a push applied meanwhile may show in
it, which the PullParams contract allows ("maybe newer ones too"). Each element is whole: steps run
on the event loop between two sends (the optimizers write each element once, from scratch
buffers), and ``tcp.send_parts`` never sends one element's bytes from two moments.

Bounds: a dead peer is found by TCP keepalive within seconds (``tcp.tune``), a client that reads
nothing of an answer for ``_STALL_SECONDS`` is dropped, a request is read only when the servicer
asks for the next one, and at most ``MAX_STREAMS`` streams are open at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncGenerator, Callable
from typing import NoReturn

import grpc

from paramserver.v1 import tcp, wire

from .registry import RunRegistry
from .servicer import ParameterServicer

__all__ = ["TcpDataPlane"]

log = logging.getLogger("ps_server")

_HELLO_SECONDS = 5.0
_LINGER_SECONDS = 2.0
_STALL_SECONDS = 30.0
"""A client that takes none of an answer for this long is dropped (alive, but not reading)."""
MAX_STREAMS = 1024
"""Streams open at once; more are refused with UNAVAILABLE (each worker keeps two)."""


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Context:
    """What ``ParameterServicer`` uses of a gRPC servicer context, and the transport's name."""

    data_plane = "tcp"

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise _Aborted(code, details)

    def time_remaining(self) -> float | None:
        return None  # no deadline on the wire: the client bounds its operations itself


class TcpDataPlane:
    """Listens on its own port; ``start`` returns it, ``close`` ends every connection."""

    def __init__(self, servicer: ParameterServicer, registry: RunRegistry, max_message_bytes: int) -> None:
        self._servicer = servicer
        self._registry = registry
        self._max_bytes = max_message_bytes
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.connections = 0
        """Connections accepted so far (a figure for tests and metrics)."""
        self.open = 0
        """Connections open now."""

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host``:``port`` (0: a free port); OSError when it cannot."""
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # "[::1]", as gRPC writes it
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(bare or None, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        except OSError as exc:
            raise OSError(f"could not bind the TCP data plane to {host}:{port}: {exc.strerror}") from None
        lsock = socket.socket(family, kind, proto)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind(addr)
            lsock.listen(64)
            lsock.setblocking(False)
        except OSError as exc:
            lsock.close()
            raise OSError(f"could not bind the TCP data plane to {host}:{port}: {exc.strerror}") from None
        self._listener = lsock
        self.port = lsock.getsockname()[1]
        self._spawn(self._accept(lsock))
        return self.port

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop accepting and end every connection (clients see the stream closed: retryable)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(lsock)
            except OSError as exc:  # out of file descriptors, say: keep serving the others
                log.warning("TCP data plane: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            tcp.tune(conn)
            self.connections += 1
            self._spawn(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        self.open += 1
        try:
            try:
                method = await asyncio.wait_for(self._hello(conn), _HELLO_SECONDS)
            except (TimeoutError, ConnectionError, OSError):
                return
            handler: Callable[..., AsyncGenerator[list[wire.Part], None]]
            if method == tcp.METHOD_PUSH:
                handler = self._servicer.PushGradient
            elif method == tcp.METHOD_PULL:
                handler = self._servicer.PullParams
            else:
                await self._end(conn, grpc.StatusCode.UNIMPLEMENTED,
                                f"unknown method {method}: 1 = PushGradient, 2 = PullParams")
                return
            if self._registry.shutting_down:
                await self._end(conn, grpc.StatusCode.UNAVAILABLE,
                                "the server is shutting down; retry against its replacement")
                return
            if self.open > MAX_STREAMS:
                await self._end(conn, grpc.StatusCode.UNAVAILABLE,
                                f"more than {MAX_STREAMS} TCP data plane streams are open; use gRPC or retry")
                return
            await tcp.send_parts(conn, [tcp.hello(method)], _STALL_SECONDS)
            serving = asyncio.current_task()
            assert serving is not None
            try:
                # aclosing: however this ends, the servicer's own clean-up (slot, in-flight count)
                # and the request reader's (its watch on the socket) run now, in that order.
                async with contextlib.aclosing(self._requests(conn, serving)) as requests, \
                        contextlib.aclosing(handler(requests, _Context())) as responses:
                    async for parts in responses:
                        n = wire.parts_len(parts)
                        await tcp.send_parts(conn, [tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, n), *parts], _STALL_SECONDS)
            except _Aborted as exc:
                await self._end(conn, exc.code, exc.details)
        except (ConnectionError, OSError):
            pass  # the client went away, or stopped reading: nothing to answer
        finally:
            conn.close()
            self.open -= 1

    async def _hello(self, conn: socket.socket) -> int:
        buf = bytearray(tcp.HELLO.size)
        await tcp.recv_exact(conn, memoryview(buf))
        magic, version, method, _ = tcp.HELLO.unpack(buf)
        if magic != tcp.MAGIC or version != tcp.VERSION:
            await self._end(conn, grpc.StatusCode.UNIMPLEMENTED,
                            f"not a paramserver data plane hello (want {tcp.MAGIC!r} version {tcp.VERSION})")
            raise ConnectionError("bad hello")
        return int(method)

    async def _requests(self, conn: socket.socket, serving: asyncio.Task[None]) -> AsyncGenerator[memoryview, None]:
        """The stream's requests, each read when the servicer asks for it (so a push waiting for a
        slot holds nothing more, and the client's sending waits, as HTTP/2 flow control makes it
        wait on gRPC). While the servicer works on a request (a pull parked for its SSP bound),
        the socket is watched: a client that closes the connection cancels the handler, as gRPC
        cancels a call whose client is gone. The stream never ends of itself."""
        loop = asyncio.get_running_loop()
        fd = conn.fileno()

        def closed() -> None:  # the socket turned readable while nobody reads: data, or the end?
            try:
                data = conn.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            loop.remove_reader(fd)  # data: the next read sees it (and any end after it)
            if not data:
                serving.cancel()

        while True:
            try:
                kind, _, body = await tcp.read_frame(conn, self._max_bytes)
            except tcp.FrameTooLarge as exc:
                raise _BadFrame(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
            except ValueError as exc:  # the stream cannot go on: its handler ends it with this status
                raise _BadFrame(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            if kind != tcp.MESSAGE:
                raise _BadFrame(grpc.StatusCode.INVALID_ARGUMENT, "a client sends MESSAGE frames only")
            loop.add_reader(fd, closed)
            try:
                yield body
            finally:
                loop.remove_reader(fd)

    async def _end(self, conn: socket.socket, code: grpc.StatusCode, details: str) -> None:
        """Send the stream's final status, then close without resetting: the client reads it even
        if it is still writing (whatever it sends meanwhile is read and dropped)."""
        body = details.encode("utf-8", "replace")
        with contextlib.suppress(OSError):
            await tcp.send_parts(conn, [tcp.FRAME.pack(tcp.STATUS, 0, 0, code.value[0], len(body)), body], _STALL_SECONDS)
            conn.shutdown(socket.SHUT_WR)
            loop = asyncio.get_running_loop()
            sink = bytearray(1 << 16)
            async with asyncio.timeout(_LINGER_SECONDS):
                while await loop.sock_recv_into(conn, sink):
                    pass


class _BadFrame(_Aborted):
    """A frame the stream cannot go on from, raised from the servicer's request iterator."""
