"""The data plane's long-lived streams, and which transport they take.

A worker keeps one PushGradient and one PullParams stream open and reuses them for every push and
pull (several times the message rate of one call per operation). ``Stream`` carries one operation
at a time on such a stream, bounded by a timeout; a stream that fails or times out is dropped and
reopened by the next operation. ``Route`` decides where a stream opens: on the server's
shared-memory data plane once a Join or Heartbeat told its name (a worker on its host), else on
its TCP data plane once told its port, else (and for a while after either could not be reached)
on the client's transport (gRPC, or the in-memory one of ``ps_server.testing``).
Streams move only between operations, never under one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from paramserver.v1 import wire

from . import errors

__all__ = ["Call", "Pending", "Route", "Stream", "WriteFailed"]

log = logging.getLogger("paramserver")

TCP_RETRY_SECONDS = (30.0, 600.0)
"""After the TCP data plane could not be reached, streams use the transport this long; doubled
after each failure in a row, up to the second figure (a firewalled port costs a connect timeout)."""


class WriteFailed(Exception):
    """The server ended the stream while a request was being written: the next read says why."""


@dataclass
class Pending:
    """What ``exchange_now`` could not finish at once: the requests still to write (None: all went)
    and the responses read so far. ``later``: the request went and its caller has other work to do
    meanwhile (``tcp_transport.SETTLE`` is False): the answers, read without the event loop once
    that work is done (as ``exchange_now`` would have), or what is still pending then."""

    unwritten: Iterator[Sequence[wire.Part]] | None
    out: list[Any] = field(default_factory=list)
    later: Callable[[], list[Any] | Pending] | None = None


class Call(Protocol):
    """One open PushGradient or PullParams stream of some transport."""

    async def write(self, parts: Sequence[wire.Part]) -> None:
        """Send one request (its parts in order); WriteFailed when the server ended the stream."""

    async def read(self) -> bytes | memoryview | None:
        """The next response; None when the server closed the stream; errors.PsError when it
        ended it with an error."""

    def cancel(self) -> None:
        """End the stream (an unfinished push is dropped by the server)."""

    @property
    def exchange_now(self) -> Callable[[Iterator[Sequence[wire.Part]], bool, Callable[[Any], bool],
                                        Callable[[Any], Any]], list[Any] | Pending] | None:
        """Without the event loop: write the requests and read the responses (as ``Stream.exchange``)
        if they come within a moment, else ``Pending``; None on transports that cannot."""


def _final(resp: Any) -> bool:
    return bool(resp.final)


def _identity(resp: Any) -> Any:
    return resp


class Stream:
    """One long-lived stream that carries one operation at a time. ``open_call`` opens it, within
    the seconds given (what is left of the operation's deadline), and says where to (a key);
    before each operation, a stream whose key is no longer ``wanted()`` (the data plane's port
    changed, or TCP is given up or back) is closed and opened anew, under the lock."""

    def __init__(self, open_call: Callable[[float], Awaitable[tuple[Call, object]]], method: str,
                 wanted: Callable[[], object]) -> None:
        self._open_call = open_call
        self._method = method
        self._wanted = wanted
        self._call: Call | None = None
        self._key: object = None
        self._lock = asyncio.Lock()
        self._closed = False
        """``shutdown`` came: no more operations (each ends with CANCELLED)."""
        self._deadline: asyncio.Timeout | None = None
        """The deadline of the operation under way (``shutdown`` ends it at once)."""
        self._busy = 0
        """Operations under the lock or waiting for it. (``Lock.locked()`` is False from a release
        until the next waiter runs: an operation tried without the loop in that moment would write
        its request before the waiter's and read the waiter's answer.)"""

    async def exchange(
        self, requests: Iterable[Sequence[wire.Part]], timeout: float, *, until_final: bool,
        final: Callable[[Any], bool] = _final, decode: Callable[[Any], Any] = _identity,
    ) -> list[Any]:
        """Write ``requests``, read one response (or until ``final(response)``), each through
        ``decode``; bounded by ``timeout``. Raises errors.PsError.

        On an open stream whose transport can (``Call.exchange_now``) and no other operation under
        way or waiting, the operation is first tried without the event loop (no lock, timer or task
        switch: nothing else can run meanwhile);
        what that does not finish at once goes on here. A request sent for a caller with other work
        to do (``Pending.later``) lets that work run first, under the lock, and then looks for its
        answer the same way: by then it is usually there, and the caller never waits in the loop."""
        if self._closed:
            raise self._shut_error()
        pending, todo = None, iter(requests)
        call = self._call
        if call is not None and call.exchange_now is not None and not self._busy and self._key == self._wanted():
            try:
                got = call.exchange_now(todo, until_final, final, decode)
            except BaseException:
                self.close()
                raise
            if not isinstance(got, Pending):
                return got
            pending = got
        self._busy += 1
        try:
            async with self._lock:
                try:
                    if pending is not None and pending.later is not None:
                        await asyncio.sleep(0)  # the caller's work (the answer comes meanwhile)
                        if self._call is call:
                            got = pending.later()
                            if not isinstance(got, Pending):
                                return got
                            pending = got
                    async with asyncio.timeout(timeout) as self._deadline:
                        if self._closed:
                            raise self._shut_error()
                        if pending is None:
                            if self._call is not None and self._key != self._wanted():
                                self.close()
                            if self._call is None:
                                left = (self._deadline.when() or math.inf) - asyncio.get_running_loop().time()
                                self._call, self._key = await self._open_call(left)
                        elif self._call is not call:
                            raise errors.Unavailable(errors.Code.UNAVAILABLE, "the stream was closed", method=self._method)
                        call = self._call
                        assert call is not None
                        unwritten = todo if pending is None else pending.unwritten
                        for req in unwritten or ():
                            try:
                                await call.write(req)
                            except WriteFailed:
                                break  # the server ended the stream: its status is what the read raises
                        out = [] if pending is None else pending.out
                        while True:
                            raw = await call.read()
                            if raw is None:
                                raise errors.Unavailable(errors.Code.UNAVAILABLE, "stream closed by the server",
                                                         method=self._method)
                            resp = decode(raw)
                            out.append(resp)
                            if not until_final or final(resp):
                                return out
                except TimeoutError:
                    self.close()
                    if self._closed:
                        raise self._shut_error() from None
                    raise errors.DeadlineExceeded(errors.Code.DEADLINE_EXCEEDED, f"no answer within {timeout:.1f}s",
                                                  method=self._method) from None
                except BaseException as exc:
                    self.close()
                    task = asyncio.current_task()
                    if self._closed and isinstance(exc, asyncio.CancelledError) and task and not task.cancelling():
                        raise self._shut_error() from None  # (gRPC's read of a call its closed channel cancelled)
                    raise
                finally:
                    self._deadline = None
        finally:
            self._busy -= 1

    def _shut_error(self) -> errors.PsError:
        return errors.PsError(errors.Code.CANCELLED, "the client was closed", method=self._method)

    async def shutdown(self) -> None:
        """No more operations (``PsClient.close``): the one under way and those waiting end at once
        with CANCELLED, and the call is closed once they have. (The operation's own task closes
        it: a socket closed under a read of the event loop's would never wake that read, which
        then waited out its whole deadline.)"""
        self._closed = True
        if self._deadline is not None and not self._deadline.expired():
            self._deadline.reschedule(asyncio.get_running_loop().time())
        async with self._lock:
            self.close()

    def idle_call(self) -> Call | None:
        """The open call the next operation will use, when none is under way now (None: no
        call open, one in progress, or the next operation opens another)."""
        if self._call is None or self._busy or self._key != self._wanted():
            return None
        return self._call

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None


class Route:
    """Where data streams open: the shared-memory data plane named ``shm_socket`` when there is
    one and ``shm`` allows it, else the TCP data plane at ``tcp_host``:``data_port`` when there is
    one (``tcp_host`` None: never), else ``fallback(method)``. ``opened`` counts streams by route."""

    def __init__(self, tcp_host: str | None, fallback: Callable[[str], Call],
                 open_tcp: Callable[[str, int, str], Awaitable[Call]], connect_timeout: float,
                 open_shm: Callable[[str, str], Awaitable[Call]] | None = None) -> None:
        self._tcp_host = tcp_host
        self._fallback = fallback
        self._open_tcp = open_tcp
        self._open_shm = open_shm
        self._connect_timeout = connect_timeout
        self.data_port = 0
        """The server's TCP data plane port, as the last Join or Heartbeat told (0: none)."""
        self.shm_socket = ""
        """The server's shared-memory data plane, as the last Join or Heartbeat told ("": none)."""
        self._retry_at = {"shm": 0.0, "tcp": 0.0}
        self._backoff = {"shm": TCP_RETRY_SECONDS[0], "tcp": TCP_RETRY_SECONDS[0]}
        self.opened = {"shm": 0, "tcp": 0, "grpc": 0, "shm_unreachable": 0, "tcp_unreachable": 0}
        """Streams opened so far: on shared memory, on TCP, on the transport (named "grpc", as it
        usually is), and how many times shared memory or TCP could not be reached."""

    @property
    def transport(self) -> str:
        """What the next stream opens on: ``shm``, ``tcp`` or ``grpc``."""
        now = time.monotonic()
        if self._open_shm is not None and self.shm_socket and now >= self._retry_at["shm"]:
            return "shm"
        return "tcp" if self._tcp_host and self.data_port and now >= self._retry_at["tcp"] else "grpc"

    def wanted(self) -> object:
        """The key of where the next stream should go (a stream elsewhere is reopened)."""
        if self._open_shm is not None and self.shm_socket and not self._retry_at["shm"]:
            return ("shm", self.shm_socket)  # (shared memory, never given up: as ``transport`` says, without the clock)
        kind = self.transport
        return ("shm", self.shm_socket) if kind == "shm" else ("tcp", self.data_port) if kind == "tcp" else "grpc"

    def told(self, port: int, shm_socket: str = "") -> None:
        """Where the server says its data planes are (a restarted server may have others)."""
        if port != self.data_port:
            self.data_port = port
            self._retry_at["tcp"] = 0.0
        if shm_socket != self.shm_socket:
            self.shm_socket = shm_socket
            self._retry_at["shm"] = 0.0

    def _failed(self, kind: str, exc: BaseException, where: str, then: str) -> None:
        self._retry_at[kind] = time.monotonic() + self._backoff[kind]
        self.opened[f"{kind}_unreachable"] += 1
        log.log(logging.INFO if kind == "shm" else logging.WARNING, "%s unreachable (%s); using %s, trying again in %.0fs%s",
                where, str(exc) or type(exc).__name__, then, self._backoff[kind],
                "" if kind == "shm" else " (a firewall? give ps-server a fixed --data-port and open it, or run "
                "workers with --no-data-plane)")
        self._backoff[kind] = min(2 * self._backoff[kind], TCP_RETRY_SECONDS[1])

    async def open(self, method: str, within: float = math.inf) -> tuple[Call, object]:
        """A stream of ``method`` and its key (``wanted``'s value for it), opened ``within`` seconds:
        shared memory and TCP get half of what is left each at most, so that a data plane that
        does not answer is found unreachable, and the operation falls back, before its deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        if self.transport == "shm":
            assert self._open_shm is not None
            try:
                async with asyncio.timeout(min(self._connect_timeout, (deadline - loop.time()) / 2)):
                    call = await self._open_shm(self.shm_socket, method)
                if not self.opened["shm"] or self._backoff["shm"] > TCP_RETRY_SECONDS[0]:
                    log.info("pushes and pulls go through shared memory (the server is on this host)")
                self.opened["shm"] += 1
                self._backoff["shm"] = TCP_RETRY_SECONDS[0]
                return call, ("shm", self.shm_socket)
            except (OSError, TimeoutError) as exc:  # another host or network namespace: TCP
                self._failed("shm", exc, "the shared-memory data plane", "TCP")
        if self.transport == "tcp":
            assert self._tcp_host is not None
            try:
                async with asyncio.timeout(min(self._connect_timeout, (deadline - loop.time()) / 2)):
                    call = await self._open_tcp(self._tcp_host, self.data_port, method)
                if not self.opened["tcp"] or self._backoff["tcp"] > TCP_RETRY_SECONDS[0]:
                    log.info("pushes and pulls go over the TCP data plane at %s:%d", self._tcp_host, self.data_port)
                self.opened["tcp"] += 1
                self._backoff["tcp"] = TCP_RETRY_SECONDS[0]
                return call, ("tcp", self.data_port)
            except (OSError, TimeoutError) as exc:
                self._failed("tcp", exc, f"TCP data plane at {self._tcp_host}:{self.data_port}", "gRPC")
        self.opened["grpc"] += 1
        return self._fallback(method), "grpc"
