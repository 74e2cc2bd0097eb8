"""TLS (optionally mutual) and a bearer token, checked in one server interceptor.

The token comes from the environment (``PS_TOKEN``) or a file (``--token-file``), never from the
command line, where other users of the machine could read it. Every RPC except the standard
health service must carry ``authorization: Bearer <token>``; the comparison is constant-time
(``hmac.compare_digest``). A token over plaintext is refused at start-up unless the operator says
``--insecure``: it would cross the network readable by anyone on the path.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from paramserver.security import check_ca, check_key_pair, read_token
from paramserver.v1 import ERROR_TRAILER
from paramserver.v1 import paramserver_pb2 as pb

from .config import ServerConfig

__all__ = ["ConfigError", "TokenInterceptor", "load_token", "server_credentials"]

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class ConfigError(Exception):
    """The security settings cannot work; the message says what to change."""


def load_token(config: ServerConfig) -> str:
    try:
        return read_token(config.token, config.token_file)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config, or None for plaintext; checks the combination is sound."""
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    if config.tls_client_ca and not config.tls_cert:
        raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key too")
    if not config.tls_cert:
        if load_token(config) and not config.insecure:
            raise ConfigError(
                "a token over plaintext is refused: give --tls-cert and --tls-key, or --insecure to send it in clear"
            )
        return None

    def read(flag: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {flag} {path}: {exc.strerror}") from None

    cert, key = read("--tls-cert", config.tls_cert), read("--tls-key", config.tls_key)
    ca = read("--tls-client-ca", config.tls_client_ca) if config.tls_client_ca else None
    # Loaded here first: gRPC only logs why it cannot, and its port then looks busy.
    try:
        check_key_pair("--tls-cert", config.tls_cert, "--tls-key", config.tls_key)
        if ca is not None:
            check_ca("--tls-client-ca", config.tls_client_ca, ca)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without the right bearer token (UNAUTHENTICATED); health stays open."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        given = next((v for k, v in (details.invocation_metadata or ()) if k == "authorization"), "")
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        if hmac.compare_digest(given_bytes, self._expected):
            return handler
        why = "missing bearer token" if not given else "wrong bearer token"
        return _deny(handler, f"{why}: set PS_TOKEN to the server's token, or name its file (ps-worker --token-file, "
                              "psctl's PSCTL_TOKEN_FILE)")


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    info = pb.ErrorInfo(reason=pb.ERROR_REASON_UNAUTHENTICATED).SerializeToString()

    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message, trailing_metadata=((ERROR_TRAILER, info),))

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)
