"""A data-plane stream's connection on the server: requests in and responses out as frames on a
socket (``paramserver.v1.tcp``), shared by the TCP plane and the shared-memory plane (which puts
the frames' bodies in segments: ``shm_plane._ShmLink``).

Between requests a push stream is served in its socket's reader callback (``Link.serve``): each
small one-message push (every model up to 64 KiB) is read, applied and answered there
(``DataPlane.push_now``), with no task woken and no coroutine run per message; the stream's task
takes over only for what must wait (a then_pull the SSP bound parks, a push of several messages,
a frame still coming in, an answer the socket does not take at once) and for errors, which end
the stream with their status as before. ``Watch`` is the one reader callback a stream's socket
has for its whole life.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from paramserver.v1 import tcp, wire

from .core.errors import PsError
from .dataplane import Later

__all__ = ["SMALL_FRAME", "WAIT", "Got", "Lean", "Link", "Partial", "Unsent", "Wait", "Watch"]

SMALL_FRAME = 64 << 10
"""Messages up to this size are received without a push slot (a small model's push, any pull)."""


class Watch:
    """A stream's socket, watched by one reader callback from its first request to its end (not
    registered and removed again per request: two system calls and the selector's bookkeeping
    saved per message). A read waits on it; while nobody reads (the data plane works on a request,
    a pull parks), readable means the client closed the connection (the handler is cancelled, as
    gRPC cancels a call whose client is gone) or sent more (the watch steps aside until the next
    read, so that data nobody reads yet does not wake the loop again and again)."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.serving: asyncio.Task[None] | None = None
        self.lean: Callable[[], None] | None = None
        """Called when the socket is readable and no read waits (set between requests by a link that
        answers them in this callback: ``Link.serve``)."""
        self._loop = asyncio.get_running_loop()
        self._fd = conn.fileno()
        self._waiter: asyncio.Future[None] | None = None
        self._on = False

    def _ready(self) -> None:
        if self._waiter is not None:
            if not self._waiter.done():
                self._waiter.set_result(None)
            return
        if self.lean is not None:
            self.lean()
            return
        try:
            data = self.conn.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.close()  # data: the next read sees it (and any end after it)
        if not data and self.serving is not None:
            self.serving.cancel()

    def watch(self) -> None:
        if not self._on:
            self._loop.add_reader(self._fd, self._ready)
            self._on = True

    def close(self) -> None:
        if self._on:
            self._loop.remove_reader(self._fd)
            self._on = False

    async def readable(self, stall: float | None) -> None:
        """Until the socket is readable; TimeoutError after ``stall`` seconds (None: no limit)."""
        self.watch()
        self._waiter = self._loop.create_future()
        try:
            async with asyncio.timeout(stall):
                await self._waiter
        except TimeoutError:
            raise TimeoutError(f"the peer sent nothing for {stall:.0f}s in the middle of a frame") from None
        finally:
            self._waiter = None

    async def recv_exact(self, view: memoryview, stall: float | None) -> None:
        """As ``tcp.recv_exact``, waiting on the watch."""
        got, n = 0, view.nbytes
        while got < n:
            try:
                k = self.conn.recv_into(view[got:])
            except BlockingIOError:
                await self.readable(stall)
                continue
            if k == 0:
                raise ConnectionError("the connection was closed")
            got += k


Lean = Callable[[memoryview], "list[list[wire.Part]] | Later | None"]
"""``DataPlane.push_now`` of a stream."""


@dataclass
class Unsent:
    """A response the socket did not take at once, and the responses after it."""

    parts: list[wire.Part]
    then: list[list[wire.Part]]


@dataclass
class Partial:
    """A request whose frame was still coming in: ``rest`` of ``body`` is to be read."""

    body: memoryview
    rest: memoryview


class Wait:
    """Nothing (more) to read now: the callback waits for the next request."""


WAIT = Wait()
Got = memoryview | Later | Unsent | Partial | Wait | None
"""What ``Link._lean_one`` did with the socket: WAIT (answered a request, or there was none:
wait for the next), or what the task must do (see ``serve``)."""


class Link:
    """A connection's requests in and responses out: frames on the socket."""

    def __init__(self, conn: socket.socket, stall: float) -> None:
        self.conn = conn
        self.stall = stall
        self.watch = Watch(conn)
        self._head = bytearray(tcp.FRAME.size)

    def accept(self, flags: int) -> int:
        """The hello's ``flags`` this link will use (the echo's; none on TCP)."""
        return 0

    async def serve(self, lean: Lean, max_bytes: int) -> memoryview | Later | None:
        """Between requests: answer each small request in the socket's reader callback as it
        comes, with ``lean`` (``DataPlane.push_now``: no task wakes up, no coroutine runs per
        message), until one needs the task: returns a request ``lean`` does not take (for the
        data plane's general path), a ``Later`` (a push whose pull must wait), or None when the
        next frame is not one for this path (``read`` takes it). Raises what ``read`` or
        ``lean`` raise."""
        loop = asyncio.get_running_loop()
        while True:
            fut: asyncio.Future[Got] = loop.create_future()
            step = functools.partial(self._lean_step, lean, max_bytes, fut)
            self.watch.lean = step
            self.watch.watch()
            step()  # what came before the watch was on
            try:
                got = await fut
            except BaseException:
                # (the error the future holds holds this frame, which holds the future: a cycle that
                # kept the frames above, the stream's request and its segment, until a collection)
                fut = step = None  # type: ignore[assignment]
                raise
            finally:
                self.watch.lean = None
            if isinstance(got, Partial):  # the rest of the request, then on as in the callback
                await self.watch.recv_exact(got.rest, self.stall)
                got = self._answer_now(lean, got.body)
            if isinstance(got, Unsent):  # the client did not read (rare)
                await tcp.send_parts(self.conn, got.parts, self.stall)
                for parts in got.then:
                    await self.send(parts)
            elif not isinstance(got, Wait):
                return got

    def _lean_step(self, lean: Lean, max_bytes: int, fut: asyncio.Future[Got]) -> None:
        if fut.done():
            return
        try:
            got = self._lean_one(lean, max_bytes)
        except Exception as exc:
            self.watch.lean = None
            # An expected error (a rejected push, a bad frame, a closed connection) goes without its
            # traceback, nor the errors it was raised while handling (``from None`` only hides them):
            # their frames would hold the request (a client's segment) in a cycle with ``fut`` until
            # the garbage collector ran. A bug keeps them, for the log.
            if isinstance(exc, PsError | OSError | ValueError):
                exc.__context__ = exc.__cause__ = None
                exc = exc.with_traceback(None)
            fut.set_exception(exc)
            return
        if not isinstance(got, Wait):
            self.watch.lean = None
            fut.set_result(got)

    def _lean_one(self, lean: Lean, max_bytes: int) -> Got:
        """One request, if a small MESSAGE frame is in the socket (one still coming in: Partial;
        a large message, received under a slot, or a bad frame: None, ``read`` takes it)."""
        try:
            taken = tcp.take_message(self.conn, self._head, min(SMALL_FRAME, max_bytes))
        except BlockingIOError:
            return WAIT
        if taken is None:
            return None
        body, got = taken
        return Partial(body, body[got:]) if got < body.nbytes else self._answer_now(lean, body)

    def _answer_now(self, lean: Lean, body: memoryview) -> memoryview | Later | Unsent | Wait:
        out = lean(body)
        if out is None:
            return body
        if isinstance(out, Later):
            return out
        for i, parts in enumerate(out):
            unsent = self._send_now(parts)
            if unsent:
                return Unsent(unsent, out[i + 1 :])
        return WAIT

    def _send_now(self, parts: list[wire.Part]) -> list[wire.Part]:
        """``send`` without waiting: what the socket did not take at once."""
        out = [tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, wire.parts_len(parts)), *parts]
        if len(out) > tcp.IOV_MAX:
            return out
        rest = tcp.send_now(self.conn, out)
        return [rest] if rest else []

    async def read(self, max_bytes: int, reserve: Callable[[int], Awaitable[None]]) -> memoryview:
        """The next request's bytes. ValueError (FrameTooLarge) when the stream cannot go on."""
        kind, _, body = await tcp.read_frame(self.conn, max_bytes, stall=self.stall, reserve=reserve,
                                             recv=self.watch.recv_exact)
        if kind != tcp.MESSAGE:
            raise ValueError("a client sends MESSAGE frames only")
        return body

    async def send(self, parts: list[wire.Part]) -> None:
        n = wire.parts_len(parts)
        await tcp.send_parts(self.conn, [tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, n), *parts], self.stall)

    def close(self) -> None:
        self.watch.close()
