"""The async client of a paramserver: what workers, psctl and the tests use to talk to a server.

Every call has a deadline. The data plane keeps one PushGradient and one PullParams stream open
and reuses them for every push and pull (several times the message rate of one call per
operation); a stream that fails or times out is dropped and reopened by the next operation.
Those streams go over the server's TCP data plane (``paramserver.v1.tcp``) once a Join or
Heartbeat told its port, else (and while it cannot be reached) over gRPC.
Pulled tensors are written into arrays the caller owns, so steady-state pulls allocate nothing.

Errors come back as ``PsClientError`` with the gRPC status code and the server's message.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any

import grpc
import numpy as np
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import paramserver_pb2_grpc as pb_grpc
from paramserver.v1 import tcp, wire
from paramserver.v1.tensors import F32, with_last

__all__ = ["PsClient", "PsClientError", "PullResult", "Security", "channel_options", "read_token"]


log = logging.getLogger("worker")

_SEND_FAILED = "Internal error from Core"
"""The details grpc.aio gives a call whose message could not be sent (``set_internal_error``)."""


class PsClientError(Exception):
    """A call failed: ``code`` is the gRPC status code, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str, method: str = "") -> None:
        super().__init__(f"{method + ': ' if method else ''}{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError, method: str) -> PsClientError:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.INTERNAL and details == _SEND_FAILED:
            # gRPC's own status when sending a message on a call fails (its connection broke: the
            # server died mid-push), not the server's answer: as retryable as losing the server.
            return cls(grpc.StatusCode.UNAVAILABLE, f"sending failed, the connection broke ({details})", method)
        return cls(code, details, method)

    @property
    def retryable(self) -> bool:
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class PullResult:
    guaranteed_clock: int
    version: int
    run_state: int
    tensors: dict[str, np.ndarray]


@dataclass(frozen=True)
class Security:
    """How to reach a secured server: TLS (``ca`` and/or a client ``cert``/``key``) and a token."""

    ca: str = ""
    """CA bundle (PEM) to verify the server; TLS is on when this or ``cert`` is set."""
    cert: str = ""
    """Client certificate (PEM), for mutual TLS."""
    key: str = ""
    token: str = field(default="", repr=False)
    insecure: bool = False
    """Allow the token over plaintext."""
    server_name: str = ""
    """Name to expect in the server's certificate, when it differs from the host dialled."""

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert)

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate needs both --tls-cert and --tls-key")
        try:
            ca = open(self.ca, "rb").read() if self.ca else None
            cert = open(self.cert, "rb").read() if self.cert else None
            key = open(self.key, "rb").read() if self.key else None
        except OSError as exc:
            raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from None
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def read_token(token: str, token_file: str) -> str:
    """The token from the environment's value or a file (never from the command line)."""
    if token and token_file:
        raise ValueError("give the token either in PS_TOKEN or with --token-file, not both")
    if token_file:
        try:
            return open(token_file).read().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --token-file {token_file}: {exc.strerror}") from None
    return token


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


@lru_cache(maxsize=256)
def _duration(seconds: float) -> Duration:
    """A Duration message, cached (a worker sends the same wait with every pull): do not mutate."""
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


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


_TCP_RETRY_SECONDS = (30.0, 600.0)
"""After the TCP data plane could not be reached, pushes and pulls use gRPC this long; doubled
after each failure in a row, up to the second figure (a firewalled port costs a connect timeout)."""


def _final(resp: Any) -> bool:
    return bool(resp.final)


def _identity(resp: Any) -> Any:
    return resp


class _TcpCall:
    """A PushGradient or PullParams stream on the server's TCP data plane (``paramserver.v1.tcp``),
    with the part of a grpc.aio stream call's interface that ``_Stream`` uses."""

    def __init__(self, sock: socket.socket, method: str, max_bytes: int) -> None:
        self._sock = sock
        self._method = method
        self._max_bytes = max_bytes

    @classmethod
    async def open(cls, host: str, port: int, method: str, max_bytes: int) -> _TcpCall:
        """Connect and greet; OSError (or TimeoutError) when the data plane cannot be reached or
        speaks another version, PsClientError when the server refuses the stream (UNAVAILABLE
        while it shuts down)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            tcp.tune(sock)
            await loop.sock_connect(sock, addr)
            code = tcp.METHOD_PUSH if method == "PushGradient" else tcp.METHOD_PULL
            await tcp.send_parts(sock, [tcp.hello(code)])
            answer = bytearray(tcp.HELLO.size)
            await tcp.recv_exact(sock, memoryview(answer))
            if answer[0] == tcp.STATUS and not answer.startswith(tcp.MAGIC):  # refused, e.g. shutting down
                _, status, body = await tcp.read_frame(sock, 1 << 16, head=bytes(answer))
                refused = _status_error(status, body, method)
                if refused.code == grpc.StatusCode.UNIMPLEMENTED:  # another version of the framing: use gRPC
                    raise ConnectionError(f"{host}:{port} does not speak this data plane: {refused.details}")
                raise refused
            if bytes(answer) != tcp.hello(code):
                raise ConnectionError(f"{host}:{port} is not a paramserver data plane of this version")
        except BaseException:
            sock.close()
            raise
        return cls(sock, method, max_bytes)

    async def write(self, parts: Sequence[wire.Part]) -> None:
        try:
            await tcp.send_parts(self._sock, [tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, wire.parts_len(parts)), *parts])
        except OSError:
            # The server ended the stream (an error answer, or it is gone) while we were still
            # writing: what it said, if anything, is what the next read returns.
            raise _WriteFailed from None

    async def read(self) -> memoryview:
        try:
            kind, status, body = await tcp.read_frame(self._sock, self._max_bytes)
        except (OSError, ValueError) as exc:
            raise PsClientError(grpc.StatusCode.UNAVAILABLE, f"the data plane connection broke ({exc})",
                                self._method) from None
        if kind == tcp.STATUS:
            raise _status_error(status, body, self._method)
        return body

    def cancel(self) -> None:
        self._sock.close()


class _WriteFailed(Exception):
    pass


_STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _status_error(status: int, body: memoryview, method: str) -> PsClientError:
    """The error a STATUS frame of the TCP data plane ends a stream with."""
    code = _STATUS_BY_VALUE.get(status, grpc.StatusCode.UNKNOWN)
    return PsClientError(code, bytes(body).decode("utf-8", "replace"), method)


class _Stream:
    """One long-lived bidirectional stream that carries one operation at a time. ``open_call``
    opens it (a grpc.aio stream call, or a ``_TcpCall``) and says where to (a key); requests are
    lists of message parts. Before each operation, a stream whose key is no longer ``wanted()``
    (the data plane port changed, or TCP is given up or back) is closed and opened anew: the
    stream is only ever replaced between operations, under its lock."""

    def __init__(self, open_call: Callable[[], Awaitable[tuple[Any, int]]], method: str,
                 wanted: Callable[[], int] = lambda: 0) -> None:
        self._open_call = open_call
        self._method = method
        self._wanted = wanted
        self._call: Any = None
        self._key = 0
        self._lock = asyncio.Lock()

    async def exchange(
        self, requests: Iterable[Any], timeout: float, *, until_final: bool, final: Callable[[Any], bool] = _final,
        decode: Callable[[Any], Any] = _identity,
    ) -> list[Any]:
        """Write ``requests``, read one response (or until ``final(response)``); bounded by timeout.

        Each response goes through ``decode`` (the stream's calls pass bytes through)."""
        async with self._lock:
            try:
                async with asyncio.timeout(timeout):
                    if self._call is not None and self._key != self._wanted():
                        self.close()
                    if self._call is None:
                        self._call, self._key = await self._open_call()
                    call = self._call
                    for req in requests:
                        try:
                            await call.write(req)
                        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, _WriteFailed):
                            # The server ended the call (an error answer, or it is gone) while we
                            # were still writing: its status is what the next read raises.
                            break
                    out = []
                    while True:
                        resp = await call.read()
                        if resp is grpc.aio.EOF:
                            raise PsClientError(grpc.StatusCode.UNAVAILABLE, "stream closed by the server", self._method)
                        resp = decode(resp)
                        out.append(resp)
                        if not until_final or final(resp):
                            return out
            except grpc.aio.AioRpcError as exc:
                self._call = None
                raise PsClientError.from_rpc(exc, self._method) from None
            except TimeoutError:
                self.close()
                raise PsClientError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:.1f}s", self._method
                ) from None
            except asyncio.InvalidStateError:  # read on a call that already ended
                self.close()
                raise PsClientError(grpc.StatusCode.UNAVAILABLE, "the stream was closed", self._method) from None
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None


class PsClient:
    """Connect with ``async with PsClient("host:port") as ps:``; every method has a deadline."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 30.0,
        chunk_bytes: int = 1 << 20,
        max_message_bytes: int = 64 << 20,
        security: Security | None = None,
        data_plane: bool = True,
    ) -> None:
        """Raises ValueError when ``security`` cannot work (unreadable files, token in clear).

        ``data_plane``: push and pull over the server's TCP data plane when ``join`` learns of
        one (not with TLS or a token); if it cannot be reached, over gRPC, retrying it later."""
        self.address = address
        self.max_message_bytes = max_message_bytes
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        sec = security or Security()
        options = channel_options(max_message_bytes)
        if sec.server_name:
            options.append(("grpc.ssl_target_name_override", sec.server_name))
        if sec.tls:
            self._channel = grpc.aio.secure_channel(address, sec.credentials(), options=options)
        elif sec.token and not sec.insecure:
            raise ValueError("refusing to send the token over plaintext: use TLS (--tls-ca) or --insecure")
        else:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        self._metadata = (("authorization", f"Bearer {sec.token}"),) if sec.token else ()
        self.runs = pb_grpc.RunServiceStub(self._channel)
        self.workers = pb_grpc.WorkerServiceStub(self._channel)
        self.data = pb_grpc.ParameterServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        # The data plane's own streams pass bytes through: messages are coded by paramserver.v1.wire
        # (the same wire bytes as the generated stub's, without building protobuf objects).
        self._grpc_calls = {
            method: partial(self._channel.stream_stream(
                f"/paramserver.v1.ParameterService/{method}", request_serializer=wire.join, response_deserializer=None,
            ), metadata=self._metadata)
            for method in ("PushGradient", "PullParams")
        }
        self._tcp_host = dial_host(address) if data_plane and not sec.tls and not sec.token else None
        self.data_port = 0
        """The server's TCP data plane port, as the last Join or Heartbeat told (0: gRPC only)."""
        self._tcp_retry_at = 0.0
        self._tcp_backoff = _TCP_RETRY_SECONDS[0]
        self.streams_opened = {"tcp": 0, "grpc": 0, "tcp_unreachable": 0}
        """Data-plane streams opened so far: over TCP, over gRPC, and how many of the gRPC ones
        because the TCP data plane could not be reached."""
        self._push = _Stream(partial(self._open, "PushGradient"), "PushGradient", self._wanted_port)
        self._pull = _Stream(partial(self._open, "PullParams"), "PullParams", self._wanted_port)

    @property
    def transport(self) -> str:
        """What the next push or pull goes over: ``tcp`` or ``grpc``."""
        usable = self._tcp_host and self.data_port and time.monotonic() >= self._tcp_retry_at
        return "tcp" if usable else "grpc"

    def _wanted_port(self) -> int:
        """Where the next push or pull stream should go: the data plane's port, 0 = gRPC."""
        return self.data_port if self.transport == "tcp" else 0

    async def _open(self, method: str) -> tuple[Any, int]:
        """A data-plane stream and its key (``_wanted_port``'s value for it)."""
        if self.transport == "tcp":
            assert self._tcp_host is not None
            try:
                async with asyncio.timeout(min(self.timeout, 3.0)):
                    call = await _TcpCall.open(self._tcp_host, self.data_port, method, self.max_message_bytes)
                if not self.streams_opened["tcp"] or self._tcp_backoff > _TCP_RETRY_SECONDS[0]:
                    log.info("pushes and pulls go over the TCP data plane at %s:%d", self._tcp_host, self.data_port)
                self.streams_opened["tcp"] += 1
                self._tcp_backoff = _TCP_RETRY_SECONDS[0]
                return call, self.data_port
            except (OSError, TimeoutError) as exc:
                self._tcp_retry_at = time.monotonic() + self._tcp_backoff
                self.streams_opened["tcp_unreachable"] += 1
                log.warning("TCP data plane at %s:%d unreachable (%s); using gRPC, trying again in %.0fs "
                            "(a firewall? give ps-server a fixed --data-port and open it, or run workers with "
                            "--no-data-plane)", self._tcp_host, self.data_port, exc or type(exc).__name__,
                            self._tcp_backoff)
                self._tcp_backoff = min(2 * self._tcp_backoff, _TCP_RETRY_SECONDS[1])
        self.streams_opened["grpc"] += 1
        return self._grpc_calls[method](), 0

    async def __aenter__(self) -> PsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._push.close()
        self._pull.close()
        await self._channel.close()

    async def _unary(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise PsClientError.from_rpc(exc, method._method.decode().rsplit("/", 1)[-1]) from None

    # -------------------------------------------------------------------------- health
    async def health(self, service: str = "", timeout: float | None = None) -> str:
        resp = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the server answers its health check (for start-up races)."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise PsClientError(
                grpc.StatusCode.UNAVAILABLE, f"no server answered at {self.address} within {timeout:.0f}s"
            ) from None

    # -------------------------------------------------------------------------- runs
    async def create_run(self, spec: pb.RunSpec) -> pb.Run:
        return (await self._unary(self.runs.CreateRun, pb.CreateRunRequest(spec=spec))).run

    async def get_run(self, run_id: str) -> pb.Run:
        return (await self._unary(self.runs.GetRun, pb.GetRunRequest(run_id=run_id))).run

    async def list_runs(self) -> list[pb.Run]:
        return list((await self._unary(self.runs.ListRuns, pb.ListRunsRequest())).runs)

    async def stop_run(self, run_id: str, reason: str = "") -> pb.Run:
        return (await self._unary(self.runs.StopRun, pb.StopRunRequest(run_id=run_id, reason=reason))).run

    async def get_metrics(self, run_id: str, include_clock_records: bool = False, max_points: int = 0) -> pb.GetMetricsResponse:
        """A run's metrics history and events; ``max_points`` > 0: only the most recent ones."""
        req = pb.GetMetricsRequest(run_id=run_id, include_clock_records=include_clock_records, max_points=max_points)
        return await self._unary(self.runs.GetMetrics, req)

    async def checkpoint_run(self, run_id: str) -> pb.CheckpointRunResponse:
        return await self._unary(self.runs.CheckpointRun, pb.CheckpointRunRequest(run_id=run_id))

    async def watch_run(self, run_id: str, interval: float = 0.5, idle_timeout: float = 60.0) -> AsyncIterator[pb.WatchRunResponse]:
        """Snapshots until the run finishes; raises DEADLINE_EXCEEDED if none comes for idle_timeout."""
        call = self.runs.WatchRun(pb.WatchRunRequest(run_id=run_id, interval=_duration(interval)),
                                  metadata=self._metadata)
        try:
            while True:
                async with asyncio.timeout(idle_timeout):
                    resp = await call.read()
                if resp is grpc.aio.EOF:
                    return
                yield resp
        except grpc.aio.AioRpcError as exc:
            raise PsClientError.from_rpc(exc, "WatchRun") from None
        except TimeoutError:
            raise PsClientError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no update for {idle_timeout:.0f}s", "WatchRun") from None
        finally:
            call.cancel()

    # -------------------------------------------------------------------------- workers
    async def join(self, worker_name: str, run_id: str = "", max_wait: float = 10.0) -> pb.JoinResponse:
        req = pb.JoinRequest(worker_name=worker_name, run_id=run_id, max_wait=_duration(max_wait))
        resp = await self._unary(self.workers.Join, req, timeout=max_wait + self.timeout)
        if resp.HasField("assignment"):
            self._data_port_is(resp.data_port)
        return resp

    def _data_port_is(self, port: int) -> None:
        """What the server says its data plane port is (a restarted server may have another).
        Open streams move over at their next operation (``_Stream``), never under one."""
        if port != self.data_port:
            self.data_port = port
            self._tcp_retry_at = 0.0

    async def heartbeat(self, run_id: str, rank: int, incarnation: int, clock: int) -> pb.HeartbeatResponse:
        req = pb.HeartbeatRequest(run_id=run_id, rank=rank, incarnation=incarnation, clock=clock)
        resp = await self._unary(self.workers.Heartbeat, req)
        self._data_port_is(resp.data_port)
        return resp

    async def report_metrics(
        self, run_id: str, rank: int, incarnation: int, points: Sequence[pb.MetricPoint], pulls_skipped: int
    ) -> pb.ReportMetricsResponse:
        req = pb.ReportMetricsRequest(
            run_id=run_id, rank=rank, incarnation=incarnation, points=points, pulls_skipped=pulls_skipped
        )
        return await self._unary(self.workers.ReportMetrics, req)

    async def leave(
        self, run_id: str, rank: int, incarnation: int, reason: pb.LeaveReason, message: str = ""
    ) -> pb.LeaveResponse:
        req = pb.LeaveRequest(run_id=run_id, rank=rank, incarnation=incarnation, reason=reason, message=message)
        return await self._unary(self.workers.Leave, req)

    # -------------------------------------------------------------------------- data plane
    async def push(
        self,
        run_id: str,
        rank: int,
        incarnation: int,
        clock: int,
        grads: Mapping[str, np.ndarray],
        loss: float = 0.0,
        timeout: float | None = None,
    ) -> pb.PushGradientResponse:
        """Push the gradient of iteration ``clock``; safe to retry with the same arguments."""
        (resp,) = await self._push.exchange(self._push_requests(run_id, rank, incarnation, clock, grads, loss, None),
                                            timeout or self.timeout, until_final=False,
                                            decode=pb.PushGradientResponse.FromString)
        return resp

    async def push_pull(
        self,
        run_id: str,
        rank: int,
        incarnation: int,
        clock: int,
        grads: Mapping[str, np.ndarray],
        loss: float = 0.0,
        *,
        into: dict[str, np.ndarray] | None = None,
        max_wait: float | None = None,
    ) -> tuple[pb.PushGradientResponse, PullResult]:
        """Push iteration ``clock``, then pull for ``clock + 1`` in the same round trip (then_pull).

        The returned response carries the push's acknowledgement (clock, duplicate, min_clock,
        run_state); the pulled parameters are in the PullResult."""
        wait = self.timeout if max_wait is None else max_wait
        then = pb.PullParamsRequest(run_id=run_id, rank=rank, incarnation=incarnation, clock=clock + 1,
                                    max_wait=_duration(wait))
        sink = _Sink(into)
        responses: list[wire.PushResponse] = await self._push.exchange(
            self._push_requests(run_id, rank, incarnation, clock, grads, loss, then), wait + self.timeout,
            until_final=True, final=_pulled_final, decode=sink.push_response)
        first = responses[0]
        ack = pb.PushGradientResponse(clock=first.clock, duplicate=first.duplicate, min_clock=first.min_clock,
                                      run_state=first.run_state)  # type: ignore[arg-type]
        return ack, sink.result(responses[-1].pulled or wire.ParamsResponse())

    def _push_requests(self, run_id: str, rank: int, incarnation: int, clock: int, grads: Mapping[str, np.ndarray],
                       loss: float, then: pb.PullParamsRequest | None) -> Iterator[list[wire.Part]]:
        """PushGradientRequests as parts (joined for gRPC), encoded lazily (sending overlaps encoding)."""
        first = True
        for group, last in with_last(wire.chunk_groups(grads, self.chunk_bytes)):
            yield wire.push_request_parts(run_id, rank, incarnation, clock, group, last, loss,
                                          then if first else None)
            first = False

    async def pull(
        self,
        run_id: str,
        rank: int = 0,
        incarnation: int = 0,
        clock: int = 0,
        *,
        into: dict[str, np.ndarray] | None = None,
        names: Sequence[str] = (),
        max_wait: float | None = None,
        timeout: float | None = None,
    ) -> PullResult:
        """Pull parameters for iteration ``clock`` (incarnation 0: an observer's read, no wait).

        Tensors are written into ``into`` (arrays reused across pulls) when given, else into new
        arrays. The call's deadline is ``max_wait`` (how long the server may park it) plus the
        client's timeout.
        """
        wait = self.timeout if max_wait is None else max_wait
        req = pb.PullParamsRequest(
            run_id=run_id, rank=rank, incarnation=incarnation, clock=clock, names=names, max_wait=_duration(wait)
        )
        sink = _Sink(into)
        responses = await self._pull.exchange([[req.SerializeToString()]], timeout or (wait + self.timeout),
                                              until_final=True, decode=sink.params_response)
        return sink.result(responses[-1])


def _pulled_final(resp: wire.PushResponse) -> bool:
    return resp.pulled is not None and resp.pulled.final


class _Sink:
    """Writes a pull's chunks into ``into`` (arrays reused; new ones when None) as each message
    arrives, then lets the message go: a pull never holds the whole model twice, and each copy
    reads bytes that gRPC has just written (warm in cache). An array of the wrong shape or not
    contiguous is replaced by a new one in ``into``; one of another dtype is filled with conversion.

    If the stream fails partway, ``into`` holds a mix of old and new values; the caller retries
    the pull, which overwrites all of it."""

    def __init__(self, into: dict[str, np.ndarray] | None) -> None:
        self.out: dict[str, np.ndarray] = {} if into is None else into

    def params(self, resp: wire.ParamsResponse) -> wire.ParamsResponse:
        out = self.out
        for chunk in resp.tensors:
            data = chunk.data  # a view of the response's bytes
            arr = out.get(chunk.name)
            shape = tuple(chunk.shape)
            if arr is None or arr.shape != shape or not arr.flags.c_contiguous:  # replaced, not filled
                if chunk.offset == 0 and len(data) == 4 * int(np.prod(shape)):
                    out[chunk.name] = np.frombuffer(data, F32).reshape(shape).copy()
                    continue
                arr = out[chunk.name] = np.empty(shape, F32)
            n = len(data)
            if arr.dtype == F32 and not n & 3 and 0 <= chunk.offset and 4 * chunk.offset + n <= arr.nbytes:
                # a plain byte copy: half the cost of numpy's for a small tensor
                arr.data.cast("B")[4 * chunk.offset : 4 * chunk.offset + n] = data
            else:
                flat = arr.reshape(-1)
                flat[chunk.offset : chunk.offset + n // 4] = np.frombuffer(data, F32)
        resp.tensors = []  # the views pinned the message
        return resp

    def params_response(self, raw: bytes | memoryview) -> wire.ParamsResponse:
        return self.params(wire.decode_params_response(raw))

    def push_response(self, raw: bytes | memoryview) -> wire.PushResponse:
        resp = wire.decode_push_response(raw)
        if resp.pulled is not None:
            self.params(resp.pulled)
        return resp

    def result(self, last: wire.ParamsResponse) -> PullResult:
        return PullResult(last.guaranteed_clock, last.version, last.run_state, self.out)
