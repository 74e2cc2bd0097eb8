"""The SDK's gRPC transport: one channel for the control plane's calls, WatchRun, health, and the data
plane's gRPC streams. The only SDK module that imports grpc: a failed call becomes a typed error in
``error_from_rpc``, the one place that reads gRPC's status (code, message, ErrorInfo trailer).

The data streams pass bytes through: their messages are coded by ``paramserver.v1.wire`` and
``unwire`` (the same bytes on the wire as the generated stubs', without building protobuf objects
for every MiB).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from paramserver.v1 import ERROR_TRAILER, wire
from paramserver.v1 import paramserver_pb2 as pb

from . import errors
from .security import Security
from .streams import WriteFailed

__all__ = ["GrpcTransport", "channel_options", "error_from_rpc"]

M = TypeVar("M", bound=Message)

def error_from_rpc(exc: grpc.aio.AioRpcError, method: str) -> errors.PsError:
    code, details = exc.code(), exc.details() or ""
    info = None
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_TRAILER and isinstance(value, bytes):
            try:
                info = pb.ErrorInfo.FromString(value)
            except Exception:  # a trailer we cannot read is no reason to hide the status
                info = None
    if code == grpc.StatusCode.INTERNAL and info is None:
        # Every error a paramserver sends carries its ErrorInfo; an INTERNAL without one is gRPC's
        # own (grpc.aio's when a message cannot be sent because the connection broke: the server
        # died mid-push), not the server's answer: as retryable as losing the server.
        return errors.Unavailable(errors.Code.UNAVAILABLE, f"the connection broke ({details})", method=method)
    if code == grpc.StatusCode.CANCELLED:
        # A call this side cancels raises asyncio.CancelledError, never this: the server cancelled
        # it (a server stopping cancels the calls still running), as retryable as losing the server.
        return errors.Unavailable(errors.Code.UNAVAILABLE, f"the server cancelled the call ({details})", method=method)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and info is None:
        # gRPC's own check of a max message length (the server's refusals carry an ErrorInfo).
        # Whose limit it was is in gRPC's text only: its four size refusals (this side or the
        # server, receiving or sending) have the same code, no trailer, no status details, and
        # debug_error_string() repeats the text. Checking sizes ourselves would cover what this
        # side sends, not what it receives (its size is known when it arrives, past gRPC's check),
        # so the text it is, pinned by a test that runs the real library (test_client_errors).
        if "CLIENT: " in details:
            return errors.OverClientLimit(errors.Code.RESOURCE_EXHAUSTED, f"a message larger than this client's "
                                          f"limit ({details}): raise it (ps-worker --max-message-bytes, "
                                          "PsClient(max_message_bytes=...))", method=method)
        if "SERVER: " in details:
            return errors.ResourceExhausted(errors.Code.RESOURCE_EXHAUSTED, f"a message larger than the server's "
                                            f"limit ({details}): raise it (ps-server --max-message-bytes), or send "
                                            "less", method=method)
    return errors.from_status(code.value[0], details, info, method)


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),
        # Reconnect within ~2 s once a server is back (gRPC's default backoff grows to 120 s).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        # Find a dead connection (a partition sends no RST) within ~4 s, instead of waiting for
        # TCP retransmissions; the server allows pings this often (ps_server.server).
        ("grpc.keepalive_time_ms", 2_000),
        ("grpc.keepalive_timeout_ms", 2_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class _Call:
    """A gRPC stream call with the interface of ``streams.Call`` (responses as they arrive)."""

    exchange_now = None

    def __init__(self, call: Any, method: str) -> None:
        self._call = call
        self._method = method

    async def write(self, parts: Sequence[wire.Part]) -> None:
        try:
            await self._call.write(parts)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            raise WriteFailed from None

    async def read(self) -> Any:
        try:
            resp = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, self._method) from None
        except asyncio.InvalidStateError:  # read on a call that already ended
            raise errors.Unavailable(errors.Code.UNAVAILABLE, "the stream was closed", method=self._method) from None
        if resp is grpc.aio.EOF:  # also how a stream that ended with an error looks: ask its status
            code = await self._call.code()
            if code != grpc.StatusCode.OK:
                raise error_from_rpc(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), await self._call.trailing_metadata(),
                                                          await self._call.details()), self._method)
            return None
        return resp

    def cancel(self) -> None:
        self._call.cancel()


class GrpcTransport:
    """Raises ValueError when ``security`` cannot work (unreadable files, a token in clear)."""

    def __init__(self, address: str, security: Security, max_message_bytes: int) -> None:
        security.check()
        options = channel_options(max_message_bytes)
        if security.server_name:
            options.append(("grpc.ssl_target_name_override", security.server_name))
        if security.tls:
            ca, key, cert = security.read_files()
            creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
            self._channel = grpc.aio.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        self.address = address
        self._metadata = (("authorization", f"Bearer {security.token}"),) if security.token else ()
        self._unary: dict[str, Any] = {}
        self._streams = {
            method: self._channel.stream_stream(f"/paramserver.v1.ParameterService/{method}",
                                                request_serializer=wire.join, response_deserializer=None)
            for method in ("PushGradient", "PullParams")
        }
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def unary(self, service: str, method: str, request: Message, response: type[M], timeout: float) -> M:
        path = f"/paramserver.v1.{service}/{method}"
        call = self._unary.get(path)
        if call is None:
            call = self._unary[path] = self._channel.unary_unary(
                path, request_serializer=type(request).SerializeToString, response_deserializer=response.FromString)
        try:
            result: M = await call(request, timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, method) from None
        return result

    def stream(self, method: str) -> _Call:
        """A PushGradient or PullParams stream: requests as parts, responses as bytes."""
        return _Call(self._streams[method](metadata=self._metadata), method)

    def server_stream(self, service: str, method: str, request: Message, response: type[Message]) -> _Call:
        """A call that streams ``response`` messages (WatchRun); only ``read`` and ``cancel``."""
        call = self._channel.unary_stream(f"/paramserver.v1.{service}/{method}",
                                          request_serializer=type(request).SerializeToString,
                                          response_deserializer=response.FromString)
        return _Call(call(request, metadata=self._metadata), method)

    async def health(self, service: str, timeout: float) -> str:
        try:
            resp = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                                            metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, "Check") from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    async def wait_ready(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._channel.channel_ready()
        except TimeoutError:
            raise errors.Unavailable(errors.Code.UNAVAILABLE,
                                     f"no server answered at {self.address} within {timeout:.0f}s") from None

    async def close(self) -> None:
        await self._channel.close()
