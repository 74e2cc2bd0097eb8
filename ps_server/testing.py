"""An in-memory paramserver for testing clients: the real server's core, control plane and data plane
in the caller's event loop, behind a ``paramserver.client.Transport`` that passes messages in memory
(httpx's MockTransport idea).

    async with InMemoryServer() as server, server.client() as ps:
        run = await ps.create_run(spec)
        joined = await ps.join("w0")
        ...

Everything a ``PsClient`` does works as against a real server: runs, joins and leases, pushes and
pulls with their SSP waits, exactly-once, errors with their codes, reasons and facts. Requests and
responses are serialized across the boundary as on the wire, and a refusal becomes the client's
typed error through the same status a gRPC trailer or a TCP STATUS frame carries. No sockets, no
threads, no gRPC. ``InMemoryTransport.fail`` injects transport failures: a call lost on its way to
the server, or an answer lost on its way back (the call was served).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from google.protobuf.message import Message

from paramserver import errors
from paramserver.client import PsClient
from paramserver.streams import WriteFailed
from paramserver.v1 import wire

from . import codec
from .control import Control
from .core.errors import PsError as ServerError
from .core.registry import RunRegistry
from .dataplane import Caller, DataPlane

__all__ = ["InMemoryServer", "InMemoryTransport"]

M = TypeVar("M", bound=Message)
_CALLER = Caller("memory")


def _refusal(exc: ServerError, method: str) -> errors.PsError:
    status = codec.error_status(exc)
    return errors.from_status(status.code, status.message, status.error, method)


class _Call:
    """A PushGradient, PullParams or WatchRun stream served by a task, messages through queues."""

    exchange_now = None

    def __init__(self, serve: Callable[[AsyncIterator[bytes]], AsyncGenerator[Any, None]], method: str,
                 encode: Callable[[Any], Any], transport: InMemoryTransport) -> None:
        self._method = method
        self._transport = transport
        self._requests: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._responses: asyncio.Queue[Any] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._serve(serve, encode))

    async def _incoming(self) -> AsyncIterator[bytes]:
        while (raw := await self._requests.get()) is not None:
            yield raw

    async def _serve(self, serve: Callable[[AsyncIterator[bytes]], AsyncGenerator[Any, None]],
                     encode: Callable[[Any], Any]) -> None:
        try:
            async with contextlib.aclosing(serve(self._incoming())) as responses:
                async for response in responses:
                    await self._responses.put(encode(response))
            await self._responses.put(None)  # the server ended the stream
        except ServerError as exc:
            await self._responses.put(_refusal(exc, self._method))

    async def write(self, parts: Sequence[wire.Part]) -> None:
        self._transport.fault(self._method, after=False)
        if self._task.done():
            raise WriteFailed
        await self._requests.put(wire.join(parts))

    async def read(self) -> Any:
        response = await self._responses.get()
        if isinstance(response, errors.PsError):
            raise response
        self._transport.fault(self._method, after=True)
        return response

    def cancel(self) -> None:
        self._task.cancel()


class InMemoryTransport:
    """``paramserver.client.Transport`` over ``control`` and ``dataplane``, in this event loop."""

    def __init__(self, control: Control, dataplane: DataPlane) -> None:
        self._control = control
        self._dataplane = dataplane
        self._calls: list[_Call] = []
        self._faults: dict[tuple[str, bool], list[errors.PsError]] = {}

    def fail(self, method: str, error: errors.PsError, *, after: bool = False, times: int = 1) -> None:
        """The next ``times`` calls (stream operations) of ``method`` fail with ``error``: before they
        reach the server, or ``after`` it served them (their answer is lost)."""
        self._faults.setdefault((method, after), []).extend([error] * times)

    def heal(self) -> None:
        """No more injected failures."""
        self._faults.clear()

    def fault(self, method: str, *, after: bool) -> None:
        pending = self._faults.get((method, after))
        if pending:
            raise pending.pop(0)

    async def unary(self, service: str, method: str, request: Message, response: type[M], timeout: float) -> M:
        self.fault(method, after=False)
        handler = getattr(self._control, method)
        try:
            async with asyncio.timeout(timeout):
                answer = await handler(type(request).FromString(request.SerializeToString()))
        except ServerError as exc:
            raise _refusal(exc, method) from None
        except TimeoutError:
            raise errors.DeadlineExceeded(errors.Code.DEADLINE_EXCEEDED, f"no answer within {timeout:.1f}s",
                                          method=method) from None
        self.fault(method, after=True)
        result: M = response.FromString(answer.SerializeToString())
        return result

    def stream(self, method: str) -> _Call:
        serve = self._dataplane.push_stream if method == "PushGradient" else self._dataplane.pull_stream
        call = _Call(lambda requests: serve(requests, _CALLER), method, wire.join, self)
        self._calls.append(call)
        return call

    def server_stream(self, service: str, method: str, request: Message, response: type[Message]) -> _Call:
        self.fault(method, after=False)
        handler = getattr(self._control, method)
        copy = type(request).FromString(request.SerializeToString())
        call = _Call(lambda _: handler(copy), method, lambda m: response.FromString(m.SerializeToString()), self)
        self._calls.append(call)
        return call

    async def health(self, service: str, timeout: float) -> str:
        self.fault("Check", after=False)
        return "SERVING"

    async def wait_ready(self, timeout: float) -> None:
        pass

    async def close(self) -> None:
        for call in self._calls:
            call.cancel()
        self._calls.clear()


class InMemoryServer:
    """The server's registry, control plane and data plane, with a lease sweeper; ``client()``
    gives a ``PsClient`` on it. Use as ``async with``."""

    def __init__(self, *, lease_seconds: float = 10.0, heartbeat_seconds: float = 2.0, max_wait_seconds: float = 60.0,
                 chunk_bytes: int = 1 << 20, max_message_bytes: int = 64 << 20) -> None:
        self.lease_seconds = lease_seconds
        self.registry = RunRegistry()
        self.dataplane = DataPlane(self.registry, max_wait=max_wait_seconds, chunk_bytes=chunk_bytes,
                                   max_message_bytes=max_message_bytes, push_slots=1)
        self.control = Control(self.registry, max_wait=max_wait_seconds, heartbeat_seconds=heartbeat_seconds,
                               lease_seconds=lease_seconds)
        self.transports: list[InMemoryTransport] = []
        self._sweeper: asyncio.Task[None] | None = None

    async def __aenter__(self) -> InMemoryServer:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        for transport in self.transports:
            await transport.close()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.lease_seconds / 4))
            self.registry.expire_leases(self.lease_seconds)

    def client(self, *, timeout: float = 10.0, chunk_bytes: int = 1 << 20) -> PsClient:
        """A client of this server (its transport is in ``transports``, for fault injection)."""
        transport = InMemoryTransport(self.control, self.dataplane)
        self.transports.append(transport)
        return PsClient("in-memory", timeout=timeout, chunk_bytes=chunk_bytes, data_plane=False, transport=transport)
