"""The gRPC links between the servers of a cluster: ClusterService calls to a peer, and servers 1..
forwarding RunService and WorkerService calls to server 0.

A peer is reached as workers reach it, at its --cluster address, with the server's own security:
its token, and under TLS its certificate as the client's (mutual TLS) with the CA of
--tls-client-ca (else its own certificate, a self-signed cluster's) as the root. A failed call
becomes the core's error of its status and reason, prefixed with the server it came from; a
server that does not answer is ``ShardUnavailable`` (retryable), naming it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from paramserver.grpc_transport import channel_options
from paramserver.v1 import ERROR_TRAILER
from paramserver.v1 import paramserver_pb2 as pb

from ..config import ServerConfig
from ..core import errors

__all__ = ["PeerLink", "forward"]

M = TypeVar("M", bound=Message)

_ERRORS: dict[int, type[errors.PsError]] = {
    5: errors.NotFound, 3: errors.InvalidArgument, 8: errors.ResourceExhausted, 9: errors.FailedPrecondition,
    11: errors.OutOfRange, 4: errors.WaitTimeout, 14: errors.ShardUnavailable,
}
_REASONS = {f"ERROR_REASON_{r.name}": r for r in errors.Reason}


def _channel(address: str, config: ServerConfig, token: str) -> tuple[grpc.aio.Channel, tuple[tuple[str, str], ...]]:
    options = channel_options(config.max_message_bytes)
    if config.tls_cert:
        root = Path(config.tls_client_ca or config.tls_cert).read_bytes()
        creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=Path(config.tls_key).read_bytes(),
                                             certificate_chain=Path(config.tls_cert).read_bytes())
        channel = grpc.aio.secure_channel(address, creds, options=options)
    else:
        channel = grpc.aio.insecure_channel(address, options=options)
    return channel, (("authorization", f"Bearer {token}"),) if token else ()


class PeerLink:
    """ClusterService calls to one other server."""

    def __init__(self, index: int, address: str, config: ServerConfig, token: str) -> None:
        self.index = index
        self.address = address
        self.channel, self._metadata = _channel(address, config, token)
        self._calls: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return f"server {self.index} ({self.address})"

    async def call(self, method: str, request: Message, response: type[M], timeout: float,
                   wait_for_ready: bool = False) -> M:
        """``wait_for_ready``: a server not up yet is waited for (within ``timeout``), not failed at once."""
        return await self._unary(f"/paramserver.v1.ClusterService/{method}", request, response, timeout,
                                 wait_for_ready)

    async def probe(self, timeout: float) -> None:
        """Whether the server answers at all (its health service): ShardUnavailable if not."""
        await self._unary("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest(),
                          health_pb2.HealthCheckResponse, timeout)

    async def _unary(self, path: str, request: Message, response: type[M], timeout: float,
                     wait_for_ready: bool = False) -> M:
        call = self._calls.get(path)
        if call is None:
            call = self._calls[path] = self.channel.unary_unary(
                path, request_serializer=type(request).SerializeToString, response_deserializer=response.FromString)
        try:
            result: M = await call(request, timeout=timeout, metadata=self._metadata, wait_for_ready=wait_for_ready)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return result

    def _error(self, exc: grpc.aio.AioRpcError) -> errors.PsError:
        code, details = exc.code(), exc.details() or ""
        info = None
        for key, value in exc.trailing_metadata() or ():
            if key == ERROR_TRAILER and isinstance(value, bytes):
                info = pb.ErrorInfo.FromString(value)
        if info is None or code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return errors.ShardUnavailable(f"{self.name} did not answer ({code.name}: {details})")
        cls = _ERRORS.get(code.value[0], errors.PsError)
        return cls(f"{self.name}: {details}", _REASONS.get(pb.ErrorReason.Name(info.reason)))

    async def close(self) -> None:
        await self.channel.close()


def forward(server: grpc.aio.Server, owner: PeerLink) -> None:
    """Serve RunService and WorkerService by passing each call to server 0 as it came (bytes, the
    caller's token, its deadline) and its answer back as it went (status, ErrorInfo trailer)."""
    for service in ("RunService", "WorkerService"):
        descriptor = pb.DESCRIPTOR.services_by_name[service]
        handlers = {}
        for method in descriptor.methods:
            path = f"/{descriptor.full_name}/{method.name}"
            if method.server_streaming:
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(_streamed(owner, path))
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(_passed(owner, path))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))


def _outgoing(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((k, v) for k, v in context.invocation_metadata() or () if k == "authorization")


async def _relay_error(context: grpc.aio.ServicerContext, exc: grpc.aio.AioRpcError, owner: PeerLink) -> None:
    if exc.code() in (grpc.StatusCode.UNAVAILABLE,) and not any(k == ERROR_TRAILER for k, _ in
                                                                  exc.trailing_metadata() or ()):
        info = pb.ErrorInfo(reason=pb.ERROR_REASON_SHARD_UNAVAILABLE)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{owner.name}, which this server forwards the call to, "
                            f"did not answer ({exc.details()}): retry", trailing_metadata=(
                                (ERROR_TRAILER, info.SerializeToString()),))
    await context.abort(exc.code(), exc.details() or "", trailing_metadata=tuple(exc.trailing_metadata() or ()))


def _passed(owner: PeerLink, path: str) -> Any:
    call = owner.channel.unary_unary(path, request_serializer=None, response_deserializer=None)

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            result: bytes = await call(request, timeout=context.time_remaining(), metadata=_outgoing(context))
        except grpc.aio.AioRpcError as exc:
            await _relay_error(context, exc, owner)
            raise AssertionError("unreachable") from None  # pragma: no cover
        return result

    return handler


def _streamed(owner: PeerLink, path: str) -> Any:
    call = owner.channel.unary_stream(path, request_serializer=None, response_deserializer=None)

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        stream = call(request, timeout=context.time_remaining(), metadata=_outgoing(context))
        try:
            async for response in stream:
                yield response
        except grpc.aio.AioRpcError as exc:
            await _relay_error(context, exc, owner)
        finally:
            stream.cancel()

    return handler
