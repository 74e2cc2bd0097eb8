"""The client's end of the TCP data plane (the framing: ``paramserver.v1.tcp``).

A ``TcpCall`` is one PushGradient or PullParams stream on its own connection, with the interface
of every data-plane call (``streams.Call``): write a request's parts, read a response, cancel.
A STATUS frame ends the stream with the server's status, turned into the typed error here.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import select
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import tcp, wire

from . import errors
from .streams import Pending, WriteFailed

__all__ = ["SETTLE", "SETTLE_MS", "TcpCall", "dial_host", "greet", "status_error", "too_large"]

SETTLE_MS = 2
QUICK_BYTES = 64 << 10
"""Requests and answers up to this size may go without the event loop (``TcpCall.exchange_now``)."""
SETTLE: contextvars.ContextVar[bool] = contextvars.ContextVar("paramserver_settle", default=True)
"""False in a task whose caller has other work to do while the answer comes (a worker computing
its next gradient while its push is in flight): its request goes at once, and its answer is looked
for only when the task runs again, after that work (``Pending.later``): it never blocks the loop in
``settle`` before."""


def dial_host(address: str) -> str | None:
    """The host part of a gRPC target such as ``host:port``, ``[::1]:port`` or
    ``dns:///host:port``; None for targets it cannot name one host of (unix sockets, lists)."""
    if address.startswith("dns:///"):
        address = address[len("dns:///"):]
    if address.startswith("["):
        host, sep, _ = address[1:].partition("]")
        return host if sep else None
    host, sep, port = address.rpartition(":")
    if not sep or not host or ":" in host or not port.isdigit() or host in ("unix", "ipv4", "ipv6"):
        return None
    return host


def status_error(code: int, body: memoryview, method: str) -> errors.PsError:
    """The error a STATUS frame ends a stream with: its body is a serialized ``Status`` of the same
    code (a version 1 server's refusal is the bare message: read as text, with no ErrorInfo)."""
    try:
        status = pb.Status.FromString(bytes(body))
    except Exception:
        status = None
    if status is None or status.code != code:
        return errors.from_status(code, bytes(body).decode("utf-8", "replace"), method=method)
    return errors.from_status(code, status.message, status.error, method)


def too_large(exc: tcp.FrameTooLarge, method: str) -> errors.OverClientLimit:
    """An answer over this client's limit: not worth retrying as it is (the same answer would come)."""
    return errors.OverClientLimit(
        errors.Code.RESOURCE_EXHAUSTED, f"an answer of {exc.length} bytes is larger than this client's limit of "
        f"{exc.limit} bytes: raise it (ps-worker --max-message-bytes, PsClient(max_message_bytes=...))", method=method)


async def greet(sock: socket.socket, method: str, where: str, flags: int = 0) -> int:
    """Send the hello of ``method`` with ``flags`` and read the server's echo (``TcpCall.open``
    says what it raises); the flags the server will use."""
    code = tcp.METHOD_PUSH if method == "PushGradient" else tcp.METHOD_PULL
    await tcp.send_parts(sock, [tcp.hello(code, flags)])
    answer = bytearray(tcp.HELLO.size)
    await tcp.recv_exact(sock, memoryview(answer))
    if answer[0] == tcp.STATUS and not answer.startswith(tcp.MAGIC):  # refused, e.g. shutting down
        _, status, body = await tcp.read_frame(sock, 1 << 16, head=bytes(answer))
        refused = status_error(status, body, method)
        if refused.code == errors.Code.UNIMPLEMENTED:  # another version of the framing: use gRPC
            raise ConnectionError(f"{where} does not speak this data plane: {refused.message}")
        if refused.reason == pb.ERROR_REASON_STREAM_LIMIT:  # full: the next way (as the proto says), for a while
            raise ConnectionError(f"{where} takes no more streams: {refused.message}")
        raise refused
    echoed = tcp.HELLO.unpack(answer)[3]
    if bytes(answer) != tcp.hello(code, echoed) or echoed & ~flags:
        raise ConnectionError(f"{where} is not a paramserver data plane of this version")
    return int(echoed)


class TcpCall:
    """A PushGradient or PullParams stream on the server's TCP data plane."""

    def __init__(self, sock: socket.socket, method: str, max_bytes: int) -> None:
        self.sock = sock
        self._method = method
        self._max_bytes = max_bytes
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._skip = 0  # answers to go through the event loop only
        self._backoff = 0
        self._head = bytearray(tcp.FRAME.size)
        self._rest = b""  # a request ``exchange_now`` could send only part of (the next write or read sends it)
        self._partial: tuple[memoryview, int] | None = None  # an answer it could read only part of
        self.exchange_now = self._exchange_now

    def _exchange_now(self, requests: Iterator[Sequence[wire.Part]], until_final: bool,
                      final: Callable[[Any], bool], decode: Callable[[Any], Any]) -> list[Any] | Pending:
        """``Call.exchange_now``: a small request is written with one ``sendmsg``, and its answers
        read as soon as ``settle`` sees them in the kernel; no event loop. For a caller with other
        work to do (``SETTLE`` False), the answers are read after that work (``Pending.later``)."""
        first = next(requests, None)
        if first is None:
            return Pending(requests)
        sent = self._send_now(first)
        if sent is None:
            return Pending(itertools.chain([first], requests))  # nothing went: all through the event loop
        out: list[Any] = []
        if not sent:  # (the server ended the stream, or took part of the request: the read sends the rest)
            return Pending(requests, out)
        more = next(requests, None)
        if more is not None:  # a push of several messages: the rest through the event loop
            return Pending(itertools.chain([more], requests), out)
        if not SETTLE.get():
            return Pending(None, out, lambda: self._answers_now(out, until_final, final, decode))
        return self._answers_now(out, until_final, final, decode)

    def _answers_now(self, out: list[Any], until_final: bool, final: Callable[[Any], bool],
                     decode: Callable[[Any], Any]) -> list[Any] | Pending:
        while True:
            self.settle()
            raw = self._recv_now()
            if raw is None:
                return Pending(None, out)
            resp = decode(raw)
            out.append(resp)
            if not until_final or final(resp):
                return out

    def _send_now(self, parts: Sequence[wire.Part]) -> bool | None:
        """Send a small request now: True when it went whole, False when only part of it did (the
        rest is kept for the next write or read) or the server ended the stream; None when it is
        not sent this way (too large: nothing was sent)."""
        n = wire.parts_len(parts)
        if n > QUICK_BYTES or len(parts) >= tcp.IOV_MAX:
            return None
        return self._sendmsg_now([tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, n), *parts])

    def _sendmsg_now(self, out: Sequence[wire.Part]) -> bool:
        try:
            self._rest = tcp.send_now(self.sock, out)
        except OSError:
            return False  # the server ended the stream: the read says why
        return not self._rest

    def _recv_now(self) -> memoryview | None:
        """An answer whose frame is in the socket; None when it is not there yet (or is a status,
        or too large: the read takes it; a part already read is kept for it)."""
        try:
            taken = tcp.take_message(self.sock, self._head, min(QUICK_BYTES, self._max_bytes))
        except OSError:
            return None  # (the read says what broke)
        if taken is None:
            return None
        body, got = taken
        if got < body.nbytes:
            self._partial = body, got
            return None
        return body

    async def _flush(self) -> None:
        if self._rest:
            try:
                await tcp.send_parts(self.sock, [self._rest])
            except OSError:
                raise WriteFailed from None
            finally:
                self._rest = b""

    def settle(self) -> None:
        """Wait up to ``SETTLE_MS`` for the answer in the kernel, before going through the event loop.

        An answer usually comes within a fraction of a millisecond; waiting for it with one poll()
        costs less CPU than the event loop's registration, wake-up and task switch. The loop is
        held up that long at most (a heartbeat is late by 2 ms, never missed); a longer wait (a
        parked pull) goes through the loop as before. When an answer did not come in time, the
        next 16, 32, ... 1024 answers skip this (a server in this very event loop, as in tests,
        can never answer while it waits; nor can SSP-parked pulls)."""
        if self._skip:
            self._skip -= 1
            return
        if self._poll.poll(SETTLE_MS):
            self._backoff = 0
        else:
            self._backoff = min(1024, 2 * self._backoff or 16)
            self._skip = self._backoff

    @classmethod
    async def open(cls, host: str, port: int, method: str, max_bytes: int) -> TcpCall:
        """Connect and greet; OSError (or TimeoutError) when the data plane cannot be reached,
        speaks another version or has as many streams as it takes, errors.PsError when the server refuses the stream (Unavailable
        while it shuts down)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            tcp.tune(sock)
            await loop.sock_connect(sock, addr)
            await greet(sock, method, f"{host}:{port}")
        except BaseException:
            sock.close()
            raise
        return cls(sock, method, max_bytes)

    async def write(self, parts: Sequence[wire.Part]) -> None:
        await self._flush()
        try:
            await tcp.send_parts(self.sock, [tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, wire.parts_len(parts)), *parts])
        except OSError:
            # The server ended the stream (an error answer, or it is gone) while we were still
            # writing: what it said, if anything, is what the next read returns.
            raise WriteFailed from None

    async def read(self) -> memoryview:
        try:
            await self._flush()
        except WriteFailed:
            pass  # the server ended the stream: what it said is read below
        if SETTLE.get():
            self.settle()
        try:
            if self._partial is not None:  # an answer ``exchange_now`` read the start of
                body, got = self._partial
                self._partial = None
                await tcp.recv_exact(self.sock, body[got:])
                return body
            kind, status, body = await tcp.read_frame(self.sock, self._max_bytes)
        except tcp.FrameTooLarge as exc:
            raise too_large(exc, self._method) from None
        except (OSError, ValueError) as exc:
            raise errors.Unavailable(errors.Code.UNAVAILABLE, f"the data plane connection broke ({exc})",
                                     method=self._method) from None
        if kind == tcp.STATUS:
            raise status_error(status, body, self._method)
        return body

    def cancel(self) -> None:
        self.sock.close()
