"""The server's end of the TCP data plane (``paramserver.v1.tcp`` documents the framing).

Each connection is one PushGradient or PullParams stream, served by the same
``ParameterServicer`` method as the gRPC stream, with a stand-in for gRPC's servicer context: the
semantics (exactly-once, the SSP wait, slots, every error and its status code) are the
servicer's, not this module's. What this module adds is the transport: requests are received
into fresh buffers (the decoded chunks are views of them: no copy after the kernel's), and
responses are written as their parts with ``sendmsg`` (the parameters' bytes go from the store's
arrays to the socket; gRPC copies each message twice first).

A response's parameter bytes are read while it is being sent; a push applied meanwhile may show in
it, which the PullParams contract allows ("maybe newer ones too"). Steps run on the event loop, as
sending does, so a message never shows a step half done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import NoReturn

import grpc

from paramserver.v1 import tcp, wire

from .registry import RunRegistry
from .servicer import ParameterServicer

__all__ = ["TcpDataPlane"]

log = logging.getLogger("ps_server")

_HELLO_SECONDS = 5.0
_LINGER_SECONDS = 2.0


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Context:
    """What ``ParameterServicer`` uses of a gRPC servicer context."""

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
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        lsock = socket.socket(family, socket.SOCK_STREAM)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind((host, port))
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
        reader: asyncio.Task[None] | None = None
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
            await tcp.send_parts(conn, [tcp.hello(method)])
            queue: asyncio.Queue[memoryview | _BadFrame] = asyncio.Queue(maxsize=1)
            me = asyncio.current_task()
            assert me is not None
            reader = asyncio.create_task(self._read(conn, queue, me))
            try:
                # aclosing: however this ends, the servicer's own clean-up (slot, in-flight count)
                # runs now, not when the generator is collected.
                async with contextlib.aclosing(handler(self._requests(queue), _Context())) as responses:
                    async for parts in responses:
                        n = wire.parts_len(parts)
                        await tcp.send_parts(conn, [tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, n), *parts])
            except (_Aborted, _BadFrame) as exc:
                await _stopped(reader)  # one reader of the socket at a time: _end reads what is left
                await self._end(conn, exc.code, exc.details)
        except (ConnectionError, OSError):
            pass  # the client went away: nothing to answer
        finally:
            if reader is not None:
                reader.cancel()
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

    async def _read(self, conn: socket.socket, queue: asyncio.Queue[memoryview | _BadFrame], serving: asyncio.Task[None]) -> None:
        """Frames into ``queue`` (one read ahead). A closed connection cancels the stream's
        handler wherever it is (a parked pull too), as gRPC cancels a call whose client is gone."""
        try:
            while True:
                kind, _, body = await tcp.read_frame(conn, self._max_bytes)
                if kind != tcp.MESSAGE:
                    raise ValueError("a client sends MESSAGE frames only")
                await queue.put(body)
        except ValueError as exc:  # the stream cannot go on: its handler ends it with this status
            too_large = isinstance(exc, tcp.FrameTooLarge)
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if too_large else grpc.StatusCode.INVALID_ARGUMENT
            await queue.put(_BadFrame(code, str(exc)))
        except (ConnectionError, OSError):
            serving.cancel()

    @staticmethod
    async def _requests(queue: asyncio.Queue[memoryview | _BadFrame]) -> AsyncIterator[memoryview]:
        """The stream's requests; it never ends of itself (a closed connection cancels the handler)."""
        while True:
            item = await queue.get()
            if isinstance(item, _BadFrame):
                raise item
            yield item

    async def _end(self, conn: socket.socket, code: grpc.StatusCode, details: str) -> None:
        """Send the stream's final status, then close without resetting: the client reads it even
        if it is still writing (whatever it sends meanwhile is read and dropped)."""
        body = details.encode("utf-8", "replace")
        with contextlib.suppress(OSError):
            await tcp.send_parts(conn, [tcp.FRAME.pack(tcp.STATUS, 0, 0, code.value[0], len(body)), body])
            conn.shutdown(socket.SHUT_WR)
            loop = asyncio.get_running_loop()
            sink = bytearray(1 << 16)
            async with asyncio.timeout(_LINGER_SECONDS):
                while await loop.sock_recv_into(conn, sink):
                    pass


class _BadFrame(_Aborted):
    """A frame the stream cannot go on from, handed to the servicer's request iterator."""


async def _stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
