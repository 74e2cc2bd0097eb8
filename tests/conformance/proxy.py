"""A fault-injecting gRPC proxy between a worker and a ps-server, for the exactly-once test.

It forwards every method of the contract as raw bytes (no re-encoding), so the worker under test
talks to the real server through it. Once, it lets a PushGradient request through to the server,
receives the server's acknowledgement, and instead of forwarding it drops the worker's stream with
UNAVAILABLE: what a worker sees when the connection breaks after its push was applied. A correct
worker retries the push with the same key (run_id, rank, incarnation, clock); the server
acknowledges it as a duplicate and applies nothing twice.

In front of one server of a cluster (``listen`` on the address the cluster's ``--cluster`` names
for it, which the shard map gives workers and the other servers) it forwards the cluster's own
calls too, and drops only that shard's answer: a worker then retries the push to that shard alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc

from paramserver.v1 import cluster_pb2 as cpb
from paramserver.v1 import paramserver_pb2 as pb

__all__ = ["FaultProxy"]


def _methods() -> dict[str, tuple[bool, bool]]:
    """'/package.Service/Method' -> (client_streaming, server_streaming) for every RPC of the contract
    and of the servers of a cluster among themselves."""
    out = {}
    for service in [*pb.DESCRIPTOR.services_by_name.values(), *cpb.DESCRIPTOR.services_by_name.values()]:
        for m in service.methods:
            out[f"/{service.full_name}/{m.name}"] = (m.client_streaming, m.server_streaming)
    return out


class FaultProxy:
    """``async with FaultProxy(upstream, drop_push_clock=3) as proxy:`` workers use ``proxy.address``."""

    PUSH = "/paramserver.v1.ParameterService/PushGradient"

    def __init__(self, upstream: str, drop_push_clock: int = -1, drop_rate: float = 0.0, seed: int = 0,
                 listen: str = "127.0.0.1:0") -> None:
        """Drop the answer to the push of ``drop_push_clock`` once, or each answer with ``drop_rate``;
        ``listen``: the proxy's address (host:port, port 0 = a free one)."""
        self.upstream = upstream
        self.listen = listen
        self.drop_push_clock = drop_push_clock
        self.drop_rate = drop_rate
        self._rng = random.Random(seed)
        self.dropped: list[tuple[int, int]] = []  # (clock acknowledged, duplicate flag) of dropped answers
        self.duplicates: list[int] = []  # clock acknowledged of each answer that said duplicate (passed on)
        self.pushes_seen = 0
        self._kinds = _methods()
        self._channel: grpc.aio.Channel | None = None
        self._server: grpc.aio.Server | None = None
        self.address = ""

    async def __aenter__(self) -> FaultProxy:
        self._channel = grpc.aio.insecure_channel(self.upstream, options=[("grpc.enable_retries", 0)])
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers([_Handler(self)])
        port = self._server.add_insecure_port(self.listen)
        await self._server.start()
        self.address = f"{self.listen.rpartition(':')[0]}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None and self._channel is not None
        await self._server.stop(0)
        await self._channel.close()

    def _drop(self, method: str, response: bytes) -> bool:
        if method != self.PUSH:
            return False
        self.pushes_seen += 1
        resp = pb.PushGradientResponse.FromString(response)
        if resp.duplicate:
            self.duplicates.append(resp.clock)
        if resp.duplicate or resp.clock == 0:  # a retry's answer, or a later message of a then_pull
            return False
        if self.drop_rate:
            if self._rng.random() >= self.drop_rate:
                return False
        elif self.dropped or resp.clock != self.drop_push_clock + 1:
            return False
        self.dropped.append((resp.clock, resp.duplicate))
        return True

    # ------------------------------------------------------------------ forwarding
    async def unary_unary(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        assert self._channel is not None
        try:
            return await self._channel.unary_unary(method)(request, timeout=context.time_remaining())  # type: ignore[no-any-return]
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "", trailing_metadata=exc.trailing_metadata())
            raise

    async def unary_stream(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        assert self._channel is not None
        call = self._channel.unary_stream(method)(request, timeout=context.time_remaining())
        try:
            async for resp in call:
                yield resp
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "", trailing_metadata=exc.trailing_metadata())
        finally:
            call.cancel()

    async def stream_stream(self, method: str, requests: AsyncIterator[bytes],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        assert self._channel is not None
        call = self._channel.stream_stream(method)(timeout=context.time_remaining())

        async def pump() -> None:
            try:
                async for req in requests:
                    await call.write(req)
                await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                call.cancel()

        task = asyncio.create_task(pump())
        try:
            async for resp in call:
                if self._drop(method, resp):
                    await context.abort(grpc.StatusCode.UNAVAILABLE,
                                        "fault injection: connection dropped after the push reached the server")
                yield resp
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "", trailing_metadata=exc.trailing_metadata())
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            call.cancel()


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        kind = self.proxy._kinds.get(method)
        if kind is None:
            return None
        p = self.proxy
        if kind == (False, False):
            async def uu(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                return await p.unary_unary(method, request, context)
            return grpc.unary_unary_rpc_method_handler(uu)
        if kind == (False, True):
            async def us(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
                async for resp in p.unary_stream(method, request, context):  # the server wants an async generator
                    yield resp
            return grpc.unary_stream_rpc_method_handler(us)
        if kind == (True, True):
            async def ss(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
                async for resp in p.stream_stream(method, requests, context):
                    yield resp
            return grpc.stream_stream_rpc_method_handler(ss)
        return None
