"""The gRPC leaf: routes RunService and WorkerService calls to ``Control`` and the two data streams to
``DataPlane``, by the names in the proto's service descriptors, and ends a call that raised a
``PsError`` with its status: code, message, and the ErrorInfo in the ``paramserver-error-bin``
trailer (``codec.error_status``, the same status the TCP data plane sends).

The data streams pass bytes through (no request deserializer; responses are ``wire`` parts joined
by the serializer): the data plane codes the hot messages itself, with the same bytes on the wire.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from paramserver.v1 import ERROR_TRAILER, wire
from paramserver.v1 import cluster_pb2 as cpb
from paramserver.v1 import paramserver_pb2 as pb

from . import codec
from .cluster.shards import ShardService
from .control import Control
from .core.errors import PsError
from .dataplane import Caller, DataPlane

__all__ = ["SERVICE_NAMES", "abort", "add_cluster", "add_control", "add_data"]

SERVICE_NAMES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())
_CODES = {code.value[0]: code for code in grpc.StatusCode}


async def abort(context: grpc.aio.ServicerContext, status: pb.Status) -> NoReturn:
    await context.abort(_CODES.get(status.code, grpc.StatusCode.UNKNOWN), status.message,
                        trailing_metadata=((ERROR_TRAILER, status.error.SerializeToString()),))
    raise AssertionError("unreachable")  # pragma: no cover


def _unary(handler: Callable[[Any], Awaitable[Message]]) -> Callable[..., Awaitable[Message]]:
    async def call(request: Message, context: grpc.aio.ServicerContext) -> Message:
        try:
            return await handler(request)
        except PsError as exc:
            await abort(context, codec.error_status(exc))

    return call


def _streaming(handler: Callable[[Any], AsyncGenerator[Message, None]]) -> Callable[..., AsyncIterator[Message]]:
    async def call(request: Message, context: grpc.aio.ServicerContext) -> AsyncIterator[Message]:
        try:
            async with contextlib.aclosing(handler(request)) as responses:
                async for response in responses:
                    yield response
        except PsError as exc:
            await abort(context, codec.error_status(exc))

    return call


def _data(handler: Callable[[AsyncIterator[bytes], Caller], AsyncGenerator[list[wire.Part], None]]) -> Callable[..., Any]:
    async def call(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[list[wire.Part]]:
        try:
            # aclosing: however the call ends, the data plane's clean-up (push slot, operations in
            # progress) runs at once, not when the generator is collected.
            async with contextlib.aclosing(handler(requests, Caller("grpc", context.time_remaining))) as responses:
                async for parts in responses:
                    yield parts
        except PsError as exc:
            await abort(context, codec.error_status(exc))

    return call


def _register(server: grpc.aio.Server, service: ServiceDescriptor, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
    name = service.full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


def _by_descriptor(server: grpc.aio.Server, service: ServiceDescriptor, target: object) -> None:
    """Each method of ``service`` to ``target``'s method of the same name."""
    handlers = {}
    for method in service.methods:
        request, response = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
        kind = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        wrap = _streaming if method.server_streaming else _unary
        handlers[method.name] = kind(wrap(getattr(target, method.name)), request_deserializer=request.FromString,
                                     response_serializer=response.SerializeToString)
    _register(server, service, handlers)


def add_control(server: grpc.aio.Server, control: Control) -> None:
    """RunService and WorkerService, by their descriptors."""
    for service in ("RunService", "WorkerService"):
        _by_descriptor(server, pb.DESCRIPTOR.services_by_name[service], control)


def add_cluster(server: grpc.aio.Server, shards: ShardService) -> None:
    """ClusterService (a server of a cluster)."""
    _by_descriptor(server, cpb.DESCRIPTOR.services_by_name["ClusterService"], shards)


def add_data(server: grpc.aio.Server, dataplane: DataPlane) -> None:
    """The data streams, as bytes."""
    _register(server, pb.DESCRIPTOR.services_by_name["ParameterService"], {
        name: grpc.stream_stream_rpc_method_handler(_data(handler), request_deserializer=None,
                                                    response_serializer=wire.join)
        for name, handler in (("PushGradient", dataplane.push_stream), ("PullParams", dataplane.pull_stream))
    })
