"""The server's end of the TCP data plane (``paramserver.v1.tcp`` documents the framing).

Each connection is one PushGradient or PullParams stream of ``DataPlane``, as a gRPC stream is:
the semantics (exactly-once, the SSP wait, slots, every error and its status) are the data
plane's, not this module's. What this module adds is the transport: requests are received into
fresh buffers (the decoded chunks are views of them: no copy after the kernel's), responses are
written as their parts with ``sendmsg`` (the parameters' bytes go from the store's arrays to the
socket; gRPC copies each message twice first), and an error ends the stream with a STATUS frame
holding ``codec.error_status``.

A response's parameter bytes are read while it is being sent; a push applied meanwhile may show in
it, which the PullParams contract allows ("maybe newer ones too"). Each element is whole: steps run
on the event loop between two sends (the optimizers write each element once, from scratch
buffers), and ``tcp.send_parts`` never sends one element's bytes from two moments.

Between pushes, a push stream is served in its socket's reader callback (``link.Link.serve``):
each small one-message push is read, applied and answered there, with no task woken.

Bounds: a dead peer is found by TCP keepalive within seconds (``tcp.tune``); a client that sends
nothing in the middle of a message, or reads nothing of an answer, for ``stall_seconds`` is
dropped; a request is read only when the data plane asks for the next one, and one over
``SMALL_FRAME`` bytes only while it holds a push slot (not lent out until it is in), so the push
slots bound the memory that large messages being received take; and the streams hold at most
``stream_cap`` descriptors at once, sized from the process's open-file limit, a budget the TCP and
the shared-memory planes share (``StreamBudget``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import resource
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import tcp, wire

from . import codec
from .core.errors import Malformed, PsError, Reason, ResourceExhausted
from .dataplane import Caller, DataPlane, Later, PushMemo
from .link import SMALL_FRAME, Link
from .slots import SlotHolder

__all__ = ["StreamBudget", "TcpDataPlane", "TcpStatistics"]

log = logging.getLogger("ps_server")

_HELLO_SECONDS = 5.0
_LINGER_SECONDS = 2.0
MAX_STREAMS = 4096
"""Streams open at once, at most; more are refused with UNAVAILABLE (each worker keeps two)."""
_REFUSING = 32
"""Descriptors of connections being refused at once beyond the cap; more are closed unanswered."""


def stream_cap(open_files: int) -> int:
    """How many streams the open-file limit allows: two thirds of it, less 64 for files and
    listeners, so that each pair of streams leaves a descriptor for its worker's gRPC connection."""
    return max(16, min(MAX_STREAMS, (open_files - 64) * 2 // 3))


class StreamBudget:
    """The descriptors the data planes' streams may hold (``stream_cap`` of the open-file limit),
    one budget for the TCP and the shared-memory planes: they draw on the same limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


_UNIMPLEMENTED, _UNAVAILABLE = 12, 14


def _refusal(code: int, reason: pb.ErrorReason, message: str) -> pb.Status:
    return pb.Status(code=code, message=message, error=pb.ErrorInfo(reason=reason))


@dataclass(frozen=True)
class TcpStatistics:
    connections: int
    """Streams (connections) accepted so far."""
    open: int
    """Streams open now."""


class TcpDataPlane:
    """Listens on its own port; ``start`` returns it, ``close`` ends every connection."""

    _caller = Caller("tcp")  # no deadline on the wire: the client bounds its operations itself
    _DESCRIPTORS = 1
    """Descriptors a stream holds: its socket."""

    def __init__(self, dataplane: DataPlane, max_message_bytes: int, closing: Callable[[], bool],
                 stall_seconds: float = 30.0, budget: StreamBudget | None = None) -> None:
        """``closing``: true once the server shuts down (new streams are refused); ``budget``: the
        one the server's other data plane draws on too (default: a budget of this plane's own)."""
        self._dataplane = dataplane
        self._max_bytes = max_message_bytes
        self._closing = closing
        self._stall = stall_seconds
        self.budget = budget or StreamBudget(stream_cap(resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
        """The descriptors this plane's streams draw on (and the server's other plane's)."""
        self.max_streams = self.budget.limit // self._DESCRIPTORS
        """Streams of this plane alone that the budget allows."""
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self._connections = 0
        self._open = 0

    def statistics(self) -> TcpStatistics:
        return TcpStatistics(self._connections, self._open)

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
        except OSError as exc:
            lsock.close()
            raise OSError(f"could not bind the TCP data plane to {host}:{port}: {exc.strerror}") from None
        self._listen(lsock)
        self.port = lsock.getsockname()[1]
        return self.port

    def _listen(self, lsock: socket.socket) -> None:
        # Connections the server has not accepted yet wait here: a burst beyond (workers reconnecting
        # at once, a flood) had its SYNs dropped, each connect retried 1 s, 3 s... later, past the
        # client's deadline. The kernel caps it (net.core.somaxconn).
        lsock.listen(MAX_STREAMS)
        lsock.setblocking(False)
        self._listener = lsock
        self._spawn(self._accept(lsock))

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
            if self.budget.used >= self.budget.limit + _REFUSING:  # a flood: no descriptor even for a refusal
                conn.close()
                continue
            if not self._admit(conn):
                conn.close()
                continue
            self._connections += 1
            self._spawn(self._serve(conn))

    def _admit(self, conn: socket.socket) -> bool:
        """Tune an accepted connection; False: close it unanswered."""
        tcp.tune(conn)
        return True

    def _link(self, conn: socket.socket) -> Link:
        return Link(conn, self._stall)

    async def _serve(self, conn: socket.socket) -> None:
        self._open += 1
        self.budget.used += self._DESCRIPTORS
        holder = self._dataplane.slot_holder()
        link = self._link(conn)
        try:
            try:
                async with asyncio.timeout(_HELLO_SECONDS):
                    method, flags = await self._hello(conn)
            except (TimeoutError, ConnectionError, OSError):
                return  # (a port probe: a load balancer's or Kubernetes' TCP check)
            handler: Callable[[AsyncIterator[bytes | memoryview], Caller], AsyncGenerator[list[wire.Part], None]]
            if method == tcp.METHOD_PUSH:
                handler = functools.partial(self._dataplane.push_stream, holder=holder)
            elif method == tcp.METHOD_PULL:
                handler = self._dataplane.pull_stream
            else:
                await self._end(conn, _refusal(_UNIMPLEMENTED, pb.ERROR_REASON_UNSUPPORTED,
                                               f"unknown method {method}: 1 = PushGradient, 2 = PullParams"))
                return
            if self._closing():
                await self._end(conn, _refusal(_UNAVAILABLE, pb.ERROR_REASON_SHUTTING_DOWN,
                                               "the server is shutting down; retry against its replacement"))
                return
            if self.budget.used > self.budget.limit:
                await self._end(conn, _refusal(_UNAVAILABLE, pb.ERROR_REASON_STREAM_LIMIT,
                                               f"more than {self.budget.limit} descriptors are held by data plane "
                                               "streams (one per TCP stream, two per shared-memory stream); "
                                               "use gRPC or retry"))
                return
            await tcp.send_parts(conn, [tcp.hello(method, link.accept(flags))], self._stall)
            serving = asyncio.current_task()
            assert serving is not None
            try:
                # aclosing: however this ends, the data plane's own clean-up (slot, operations in
                # progress) and the request reader's (its watch on the socket) run now, in that order.
                async with contextlib.aclosing(self._requests(conn, link, serving, holder,
                                                              method == tcp.METHOD_PULL)) as requests, \
                        contextlib.aclosing(handler(requests, self._caller)) as responses:
                    async for parts in responses:
                        await link.send(parts)
            except PsError as exc:
                await self._end(conn, codec.error_status(exc))
            except OSError:
                raise  # the connection's (a stalled or vanished peer): below
            except Exception as exc:  # a bug of ours: say so (INTERNAL, as gRPC says UNKNOWN), do not just hang up
                log.exception("the TCP data plane's handler failed")
                await self._end(conn, codec.error_status(PsError(f"the server failed: {type(exc).__name__}: {exc}")))
        except (ConnectionError, OSError):
            pass  # the client went away, or stopped reading: nothing to answer
        except asyncio.CancelledError:  # the client went away while its request was worked on, or the plane closes:
            pass  # ends here (a task kept it, and its traceback the stream's frames, which hold the task and the
            # requests, a client's segment: a cycle, left to the garbage collector)
        finally:
            link.close()
            conn.close()
            self._open -= 1
            self.budget.used -= self._DESCRIPTORS
            holder.release()

    async def _hello(self, conn: socket.socket) -> tuple[int, int]:
        """The method and the flags of a client's hello."""
        buf = bytearray(tcp.HELLO.size)
        await tcp.recv_exact(conn, memoryview(buf))
        magic, version, method, flags = tcp.HELLO.unpack(buf)
        if magic != tcp.MAGIC or version != tcp.VERSION:
            refusal = _refusal(_UNIMPLEMENTED, pb.ERROR_REASON_UNSUPPORTED,
                               f"not a paramserver data plane hello (want {tcp.MAGIC!r} version {tcp.VERSION})")
            await self._end(conn, refusal, plain=magic == tcp.MAGIC and version == 1)
            raise ConnectionError("bad hello")
        return int(method), int(flags)

    async def _requests(self, conn: socket.socket, link: Link, serving: asyncio.Task[None], holder: SlotHolder,
                        releases: bool) -> AsyncGenerator[memoryview, None]:
        """The stream's requests, each read when the data plane asks for it (so a push waiting for a
        slot holds nothing more, and the client's sending waits, as HTTP/2 flow control makes it
        wait on gRPC). While the data plane works on a request (a pull parked for its SSP bound),
        the socket is watched: a client that closes the connection cancels the handler, as gRPC
        cancels a call whose client is gone. The stream never ends of itself. A message over
        ``SMALL_FRAME`` is received holding the stream's push slot (``holder``, pinned meanwhile);
        a push keeps it for the rest of its messages, a pull stream (``releases``) gives it back
        at its next request. Between the pushes of a push stream, the link answers small
        one-message pushes itself (``Link.serve``): only what they cannot finish at once comes
        here (a ``Later`` is sent from here, a request goes to the handler)."""
        link.watch.serving = serving

        async def reserve(length: int) -> None:
            if length > SMALL_FRAME:
                holder.pinned = True
                await holder.acquire()

        lean = None if releases else functools.partial(self._dataplane.push_now, caller=self._caller, memo=PushMemo())
        try:
            while True:
                if releases:
                    holder.release()
                try:
                    body = None
                    while lean is not None and not holder.within:
                        got = await link.serve(lean, self._max_bytes)
                        if not isinstance(got, Later):
                            body = got
                            break
                        link.watch.watch()  # (a client that goes away while its pull waits cancels it)
                        async for parts in got:
                            await link.send(parts)
                    if body is None:
                        body = await link.read(self._max_bytes, reserve)
                except tcp.FrameTooLarge as exc:
                    raise ResourceExhausted(str(exc)) from None
                except ValueError as exc:  # the stream cannot go on: its handler ends it with this status
                    raise _BadFrame(str(exc)) from None
                finally:
                    holder.pinned = False
                link.watch.watch()
                yield body
        finally:
            link.watch.close()  # before anything else reads the socket (the final status's linger)

    async def _end(self, conn: socket.socket, status: pb.Status, plain: bool = False) -> None:
        """Send the stream's final status, then close without resetting: the client reads it even
        if it is still writing (whatever it sends meanwhile is read and dropped). ``plain``: the
        body is the bare message, as version 1 of the framing had it."""
        body = status.message.encode("utf-8", "replace") if plain else status.SerializeToString()
        with contextlib.suppress(OSError):
            await tcp.send_parts(conn, [tcp.FRAME.pack(tcp.STATUS, 0, 0, status.code, len(body)), body], self._stall)
            conn.shutdown(socket.SHUT_WR)
            loop = asyncio.get_running_loop()
            sink = bytearray(1 << 16)
            async with asyncio.timeout(_LINGER_SECONDS):
                while await loop.sock_recv_into(conn, sink):
                    pass


class _BadFrame(Malformed):
    """A frame the stream cannot go on from (INVALID_ARGUMENT, as a client's bad frame is its own fault)."""

    code = 3
    reason = Reason.MALFORMED_MESSAGE
