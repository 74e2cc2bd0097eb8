"""``PsClient``: the async client of a paramserver, used by workers, psctl and the tests.

    async with PsClient("127.0.0.1:50051") as ps:
        joined = await ps.join("my-worker")
        ack, params = await ps.push_pull(run_id, rank, incarnation, clock, grads, into=params)

Every call has a deadline and fails with a typed ``paramserver.errors.PsError``. Control calls go
over the transport (gRPC by default; ``ps_server.testing`` has an in-memory one); pushes and
pulls over two long-lived streams (``streams``) on the server's TCP data plane once a Join or
Heartbeat told its port, else on the transport. Pulled tensors are written into arrays the
caller owns (``sink``), so steady-state pulls allocate nothing.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

import numpy as np
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import unwire, wire
from paramserver.v1.shm import IN_PLACE_BYTES, MESSAGE_BYTES, available

from . import errors
from .exchange import Answer, Exchange, ack, pulled
from .security import Security
from .shm_transport import ShmCall, native
from .sink import PullResult, PullSink
from .streams import Call, Route, Stream
from .tcp_transport import TcpCall, dial_host

__all__ = ["SERVER_MAX_WAIT", "PsClient", "PullResult", "Transport"]

M = TypeVar("M", bound=Message)

SERVER_MAX_WAIT = 60.0
"""ps-server's default --max-wait-seconds: the longest a pull of ``max_wait=0`` is taken to park
until a Join or Heartbeat says the server's own (``PsClient.server_max_wait``)."""

_STATE_ARRAYS = {"sgd": 0, "momentum": 1, "adam": 2, "adagrad": 1, "ftrl": 2}
"""Arrays of optimizer state per parameter, by ``OptimizerSpec`` kind (a checkpoint holds them)."""
_CUT_WAIT = 30.0
"""Seconds a sharded run's CheckpointRun may wait for its min clock to reach the cut (ps-server's)."""


def _sizes(spec: pb.RunSpec) -> tuple[int, int]:
    """The bytes of a run's parameters, and how many arrays of optimizer state each has."""
    nbytes = sum(4 * math.prod(p.shape) for p in spec.params)
    return nbytes, _STATE_ARRAYS.get(spec.optimizer.WhichOneof("kind") or "sgd", max(_STATE_ARRAYS.values()))


class Transport(Protocol):
    """What ``PsClient`` needs below it (``grpc_transport.GrpcTransport``, ``ps_server.testing.InMemoryTransport``)."""

    async def unary(self, service: str, method: str, request: Message, response: type[M], timeout: float) -> M: ...
    def stream(self, method: str) -> Call: ...
    def server_stream(self, service: str, method: str, request: Message, response: type[Message]) -> Call: ...
    async def health(self, service: str, timeout: float) -> str: ...
    async def wait_ready(self, timeout: float) -> None: ...
    async def close(self) -> None: ...


Grad = np.ndarray | wire.RowsPart | wire.CodedPart
"""A tensor's gradient in a push: the whole array, or (a table) some of its rows."""


def _since(since: tuple[int, int] | None, into: dict[str, np.ndarray] | None) -> dict[str, int]:
    """A delta pull's fields; none without arrays to apply a delta to."""
    if since is None or into is None:
        return {}
    return {"since_lineage": since[0], "since_version": since[1]}


def _table_rows(rows: Mapping[str, np.ndarray] | None) -> list[pb.TableRows]:
    return [pb.TableRows(name=name, row_ids=np.ascontiguousarray(ids, wire.I64).tobytes())
            for name, ids in (rows or {}).items()]


def _seconds(max_wait: float, method: str, what: str, zero: str) -> float:
    """``max_wait`` of a call to ``method``; InvalidArgument (nothing is sent) unless it is a finite
    number of seconds >= 0 (``zero``: what 0 means)."""
    if not 0 <= max_wait < math.inf:
        raise errors.InvalidArgument(errors.Code.INVALID_ARGUMENT, f"max_wait={max_wait}: give the seconds the server "
                                     f"may {what}, a finite number >= 0 (0: {zero})",
                                     pb.ErrorInfo(reason=pb.ERROR_REASON_INVALID_REQUEST), method)
    return max_wait


def _pulled_final(resp: unwire.PushResponse) -> bool:
    return resp.pulled is not None and resp.pulled.final


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
        shm: bool = True,
        transport: Transport | None = None,
    ) -> None:
        """Raises ValueError when ``security`` cannot work (unreadable files, token in clear).

        ``data_plane``: push and pull over the server's TCP data plane when ``join`` learns of
        one (not with TLS or a token); if it cannot be reached, over the transport, retrying it
        later. ``shm`` (with ``data_plane``): through its shared-memory data plane when the
        server is on this host (``paramserver.v1.shm``), else over TCP. ``transport``: gRPC to
        ``address`` when None."""
        sec = security or Security()
        if transport is None:
            from .grpc_transport import GrpcTransport  # gRPC is loaded only by who uses it
            transport = GrpcTransport(address, sec, max_message_bytes)
        self.address = address
        self.security = sec
        self.data_plane = data_plane
        self.shm = shm
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.max_message_bytes = max_message_bytes
        self._transport = transport
        tcp_host = dial_host(address) if data_plane and not sec.tls and not sec.token else None
        open_shm = self._open_shm if data_plane and shm and not sec.tls and not sec.token and available() else None
        self.route = Route(tcp_host, transport.stream, self._open_tcp, min(timeout, 3.0), open_shm)
        """Where pushes and pulls go (``route.transport``: "shm", "tcp" or "grpc"; ``route.opened``)."""
        self.server_max_wait = SERVER_MAX_WAIT
        """The longest the server parks a pull, as the last Join or Heartbeat said (before one:
        ps-server's default): what a pull of ``max_wait=0`` asks for, and waits for."""
        self._push = Stream(partial(self.route.open, "PushGradient"), "PushGradient", self.route.wanted)
        self._waits: tuple[float | None, float, float] = (None, 0.0, 0.0)
        """The last push_pull's max_wait, and ``_wait``'s answer for it."""
        self._exchange = Exchange(self._push)
        self._pull = Stream(partial(self.route.open, "PullParams"), "PullParams", self.route.wanted)

    async def _open_tcp(self, host: str, port: int, method: str) -> Call:
        return await TcpCall.open(host, port, method, self.max_message_bytes)

    async def _open_shm(self, name: str, method: str) -> Call:
        return await ShmCall.open_shm(name, method, self.max_message_bytes)

    async def __aenter__(self) -> PsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Pushes and pulls under way (or asked for later) fail with CANCELLED; then the transport closes."""
        await asyncio.gather(self._push.shutdown(), self._pull.shutdown())
        await self._transport.close()

    async def _call(self, service: str, method: str, request: Message, response: type[M],
                    timeout: float | None = None) -> M:
        return await self._transport.unary(service, method, request, response, timeout or self.timeout)

    # -------------------------------------------------------------------------- health
    async def health(self, service: str = "", timeout: float | None = None) -> str:
        """The server's gRPC health status: SERVING, NOT_SERVING, ..."""
        return await self._transport.health(service, timeout or self.timeout)

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the server is reachable (for start-up races); Unavailable after ``timeout``."""
        await self._transport.wait_ready(timeout)

    # -------------------------------------------------------------------------- runs
    async def create_run(self, spec: pb.RunSpec) -> pb.Run:
        """The server draws the initial values (~8 s per GiB of parameters on one core) and, with
        --data-dir, writes the run's first checkpoint (the parameters and the optimizer's state:
        Adam's is twice their size) before it answers: the deadline grows by 30 s per GiB of
        each beyond the client's timeout. It is not retried (the server would create a second run: a
        CreateRun has no request id). A CreateRun whose deadline passed has almost always created no
        run (the server drops a run whose caller has gone before it answered), but one answered as the
        deadline passed has: DeadlineExceeded says to list the runs (``psctl runs``) before creating
        it again."""
        nbytes, state = _sizes(spec)
        timeout = self.timeout + 30.0 * nbytes * (2 + state) / (1 << 30)
        try:
            return (await self._call("RunService", "CreateRun", pb.CreateRunRequest(spec=spec), pb.CreateRunResponse,
                                     timeout=timeout)).run
        except errors.DeadlineExceeded as exc:
            named = f" named {spec.name!r}" if spec.name else ""
            raise errors.DeadlineExceeded(exc.code, f"no answer within {timeout:.0f}s: the server draws the run's "
                                          "initial values and writes its first checkpoint before it answers, and drops "
                                          "the run when its caller has gone, so most likely no run was created; but one "
                                          "answered just as the deadline passed was: check the runs (psctl runs) for a "
                                          f"new run{named} before creating it again; give a longer timeout (psctl: "
                                          "--timeout) or the server a faster --data-dir", exc.info, exc.method) from None

    async def get_run(self, run_id: str) -> pb.Run:
        return (await self._call("RunService", "GetRun", pb.GetRunRequest(run_id=run_id), pb.GetRunResponse)).run

    async def list_runs(self, limit: int = 1000) -> list[pb.Run]:
        """Up to ``limit`` runs, newest first, as summaries (no per-rank status, no model or data
        spec: ``get_run`` has them), read a page at a time."""
        runs: list[pb.Run] = []
        token = ""
        while len(runs) < limit:
            req = pb.ListRunsRequest(page_size=min(limit - len(runs), 1000), page_token=token)
            page = await self._call("RunService", "ListRuns", req, pb.ListRunsResponse)
            runs += page.runs
            token = page.next_page_token
            if not token:
                break
        return runs

    async def delete_run(self, run_id: str, force: bool = False) -> pb.DeleteRunResponse:
        """Forget a finished run and delete its checkpoints (``force``: stop it first): the run as
        it was, and what of its files the server could not remove (``left_behind``, the proto says)."""
        req = pb.DeleteRunRequest(run_id=run_id, force=force)
        try:
            return await self._call("RunService", "DeleteRun", req, pb.DeleteRunResponse)
        except errors.DeadlineExceeded as exc:  # (it waits for the run's checkpoint being written, if any)
            raise errors.DeadlineExceeded(exc.code, f"no answer within {self.timeout:.0f}s; a deletion the server "
                                          "has begun goes on once the run's checkpoint being written has landed (a "
                                          "large run's takes a while): the run is gone when psctl runs no longer "
                                          "lists it", exc.info, exc.method) from None

    async def stop_run(self, run_id: str, reason: str = "") -> pb.Run:
        req = pb.StopRunRequest(run_id=run_id, reason=reason)
        return (await self._call("RunService", "StopRun", req, pb.StopRunResponse)).run

    async def update_run(self, run_id: str, *, staleness: int | None = None) -> pb.Run:
        """Change a running run's staleness bound (UpdateRun; the proto states the rule)."""
        req = pb.UpdateRunRequest(run_id=run_id, staleness=staleness)
        return (await self._call("RunService", "UpdateRun", req, pb.UpdateRunResponse)).run

    async def get_metrics(self, run_id: str, include_clock_records: bool = False,
                          max_points: int = 0) -> pb.GetMetricsResponse:
        """A run's metrics history and events; ``max_points`` > 0: only the most recent ones."""
        req = pb.GetMetricsRequest(run_id=run_id, include_clock_records=include_clock_records, max_points=max_points)
        return await self._call("RunService", "GetMetrics", req, pb.GetMetricsResponse)

    async def checkpoint_run(self, run_id: str) -> pb.CheckpointRunResponse:
        """A checkpoint of the run now, once it is on disk. The server writes, hashes and fsyncs
        the run's parameters and optimizer state: the deadline grows by 30 s per GiB of each beyond
        the client's timeout (read with GetRun first), and by 30 s for a running sharded run (its
        servers wait for the clock they checkpoint at). Past the deadline the server still writes
        it; DeadlineExceeded says so."""
        run = await self.get_run(run_id)
        nbytes, state = _sizes(run.spec)
        timeout = self.timeout + 30.0 * nbytes * (1 + state) / (1 << 30)
        if len(run.shard_map.shards) > 1 and run.state == pb.RUN_STATE_RUNNING:
            timeout += _CUT_WAIT
        req = pb.CheckpointRunRequest(run_id=run_id)
        try:
            return await self._call("RunService", "CheckpointRun", req, pb.CheckpointRunResponse, timeout=timeout)
        except errors.DeadlineExceeded as exc:
            raise errors.DeadlineExceeded(exc.code, f"no answer within {timeout:.0f}s; a checkpoint the "
                                          "server has begun is still being written (a large run's takes a while): "
                                          "give a longer timeout (psctl: --timeout) to wait for it", exc.info,
                                          exc.method) from None

    async def watch_run(self, run_id: str, interval: float = 0.5,
                        idle_timeout: float = 60.0) -> AsyncIterator[pb.WatchRunResponse]:
        """Snapshots until the run finishes; raises errors.WatchIdle if none comes for idle_timeout."""
        req = pb.WatchRunRequest(run_id=run_id, interval=wire.duration(interval))
        call = self._transport.server_stream("RunService", "WatchRun", req, pb.WatchRunResponse)
        try:
            while True:
                try:
                    async with asyncio.timeout(idle_timeout):
                        resp = await call.read()
                except TimeoutError:
                    raise errors.WatchIdle(errors.Code.DEADLINE_EXCEEDED, f"no update for {idle_timeout:.0f}s",
                                           method="WatchRun") from None
                if resp is None:
                    return
                yield resp  # type: ignore[misc]
        finally:
            call.cancel()

    # -------------------------------------------------------------------------- workers
    async def join(self, worker_name: str, run_id: str = "", max_wait: float = 10.0,
                   capabilities: Sequence[str] = (), join_token: str = "") -> pb.JoinResponse:
        """A rank of ``run_id`` (or of any run) that a worker of ``capabilities`` can train
        (``RunSpec.requires``); no assignment when there is none within ``max_wait``. Safe to retry
        with the same ``join_token`` (random, such as ``secrets.token_hex(16)``, drawn anew once a
        Join is answered with a rank): a Join the server took whose answer was lost, or that the
        server still held parked when its caller gave up, is answered with the rank it took, not a
        second one."""
        _seconds(max_wait, "Join", "hold the call when there is no work", "answer at once")
        req = pb.JoinRequest(worker_name=worker_name, run_id=run_id, max_wait=wire.duration(max_wait),
                             capabilities=capabilities, join_token=join_token)
        resp = await self._call("WorkerService", "Join", req, pb.JoinResponse, timeout=max_wait + self.timeout)
        if resp.HasField("assignment"):
            self.route.told(resp.data_port, resp.shm_socket)
            self._told_wait(resp.max_wait if resp.HasField("max_wait") else None)
        return resp

    async def heartbeat(self, run_id: str, rank: int, incarnation: int, clock: int) -> pb.HeartbeatResponse:
        req = pb.HeartbeatRequest(run_id=run_id, rank=rank, incarnation=incarnation, clock=clock)
        resp = await self._call("WorkerService", "Heartbeat", req, pb.HeartbeatResponse)
        self.route.told(resp.data_port, resp.shm_socket)
        self._told_wait(resp.max_wait if resp.HasField("max_wait") else None)
        return resp

    def _told_wait(self, limit: Duration | None) -> None:
        """The server's limit on a parked pull, as it says (None: a server that does not say)."""
        if limit is not None and limit.ToNanoseconds() > 0:
            self.server_max_wait = limit.ToNanoseconds() / 1e9
            self._waits = (None, 0.0, 0.0)  # (a wait of 0 parks for that long)

    def _wait(self, max_wait: float | None) -> tuple[float, float]:
        """A pull's ``max_wait`` (None: the client's timeout) and how long the server may park it
        (0: the server's limit, ``server_max_wait``); InvalidArgument, before anything is sent,
        when it is negative or not finite."""
        wait = _seconds(self.timeout if max_wait is None else max_wait, "PullParams", "park the pull",
                        "the server's limit")
        return wait, wait or self.server_max_wait

    async def report_metrics(self, run_id: str, rank: int, incarnation: int, points: Sequence[pb.MetricPoint],
                             pulls_skipped: int) -> pb.ReportMetricsResponse:
        req = pb.ReportMetricsRequest(run_id=run_id, rank=rank, incarnation=incarnation, points=points,
                                      pulls_skipped=pulls_skipped)
        return await self._call("WorkerService", "ReportMetrics", req, pb.ReportMetricsResponse)

    async def leave(self, run_id: str, rank: int, incarnation: int, reason: pb.LeaveReason,
                    message: str = "", timeout: float | None = None) -> pb.LeaveResponse:
        """Give the rank back; ``timeout`` bounds the call (default: the client's timeout)."""
        req = pb.LeaveRequest(run_id=run_id, rank=rank, incarnation=incarnation, reason=reason, message=message)
        return await self._call("WorkerService", "Leave", req, pb.LeaveResponse, timeout=timeout)

    # -------------------------------------------------------------------------- data plane
    def push_buffers(self, run_id: str, rank: int, incarnation: int, clock: int,
                     like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """Arrays shaped as ``like`` (a dense model's parameters) to compute the gradient of the
        push of ``clock`` into: views of the push stream's shared-memory segment, where that push
        (``push`` or ``push_pull`` with these arrays, these arguments) puts its tensors, so that
        they are sent without a copy. None where that cannot be: another transport, no segment
        yet, a call under way, no tensor of ``shm.IN_PLACE_BYTES`` (copying is cheaper). Pushing
        other arrays is correct too (they are copied). The server's answer may be written over them:
        they hold the gradient until that push is answered or fails, so a push retried after a
        failure must be given the gradient anew (not these arrays). They lie clear of ``like``'s
        arrays that are in that memory (parameters borrowed from the last answer: ``push_pull``'s
        ``borrow``), so the gradient can be computed on those into these."""
        call = self._push.idle_call()
        if not isinstance(call, ShmCall) or max((a.nbytes for a in like.values()), default=0) < IN_PLACE_BYTES:
            return None
        group = wire.whole_group(like, max(self.chunk_bytes, MESSAGE_BYTES))  # as ``_push_requests`` lays it out
        if group is None:
            return None
        views = call.push_buffers(wire.push_request_parts(run_id, rank, incarnation, clock, group, True), like.values())
        if views is None:
            return None
        return {name: np.frombuffer(v, np.float32).reshape(a.shape) for (name, a), v in zip(like.items(), views, strict=True)}

    async def push(self, run_id: str, rank: int, incarnation: int, clock: int, grads: Mapping[str, Grad],
                   loss: float = 0.0, timeout: float | None = None, param_version: int | None = None,
                   ) -> pb.PushGradientResponse:
        """Push the gradient of iteration ``clock``; safe to retry with the same arguments. A
        table's gradient may be some of its rows (``wire.RowsPart``), or left out.
        ``param_version``: the version (``PullResult.version``) of the parameters it was computed
        on, for a run with ``staleness_aware_lr``."""
        (resp,) = await self._push.exchange(self._push_requests(run_id, rank, incarnation, clock, grads, loss, None,
                                                                param_version),
                                            timeout or self.timeout, until_final=False,
                                            decode=pb.PushGradientResponse.FromString)
        return resp  # type: ignore[no-any-return]

    async def push_pull(
        self, run_id: str, rank: int, incarnation: int, clock: int, grads: Mapping[str, Grad],
        loss: float = 0.0, *, into: dict[str, np.ndarray] | None = None, max_wait: float | None = None,
        names: Sequence[str] = (), rows: Mapping[str, np.ndarray] | None = None, since: tuple[int, int] | None = None,
        param_version: int | None = None, borrow: bool = False,
    ) -> tuple[pb.PushGradientResponse, PullResult]:
        """Push iteration ``clock``, then pull for ``clock + 1`` in the same round trip (then_pull;
        ``names``, ``rows`` and ``since`` as for ``pull``, ``param_version`` as for ``push``).
        ``borrow``: parameters the answer brings in shared memory (a large model's, on the server's
        host: in the server's publication under BSP, else in the push stream's segment) come as
        read-only views of it instead of copies (``PullSink``): valid until this stream's next
        request; compute the next gradient on them (into ``push_buffers(like=into)``), and pull
        again rather than reuse them after a failed push. It asks for the whole model (``since``
        is ignored: a delta needs arrays of one's own to write into).

        The returned response carries the push's acknowledgement (clock, duplicate, min_clock,
        run_state); the pulled parameters are in the PullResult. ``max_wait`` as for ``pull``."""
        if max_wait is None or max_wait != self._waits[0]:  # (a worker asks for the same wait every push)
            self._waits = (max_wait, *self._wait(max_wait))
        _, wait, parked = self._waits
        since = None if borrow else since
        if native is not None and into is not None and not borrow and not names and not rows:
            got = self._exchange.push_pull(run_id, rank, incarnation, clock, grads, loss, wait, since, param_version,
                                           into)
            if type(got) is Answer:
                return ack(got), pulled(got, into)
            if got is not False:  # it went: the answer (or the rest of it) is read here
                return await self._answer(iter(()), None if got is True else got, into, borrow, parked)
        then: pb.PullParamsRequest | bytes
        if names or rows:
            then = pb.PullParamsRequest(run_id=run_id, rank=rank, incarnation=incarnation, clock=clock + 1,
                                        names=names, max_wait=wire.duration(wait), rows=_table_rows(rows),
                                        **_since(since, into))
        else:  # every push of a dense model: the same request but for its clock and version
            then = wire.pull_request_bytes(run_id, rank, incarnation, clock + 1, wait,
                                           since if into is not None else None)
        requests = self._push_requests(run_id, rank, incarnation, clock, grads, loss, then, param_version)
        return await self._answer(requests, None, into, borrow, parked)

    def push_pull_now(
        self, run_id: str, rank: int, incarnation: int, clock: int, grads: Mapping[str, Grad], loss: float,
        into: dict[str, np.ndarray], max_wait: float | None = None, since: tuple[int, int] | None = None,
        param_version: int | None = None,
    ) -> Any:
        """``push_pull`` of a dense model's whole pull into ``into``, without the event loop when it
        can: on the shared-memory data plane, with the C exchange built (``paramserver.exchange``),
        a small model's push and pull are one call, and its answer, when it comes within the
        settle time, is returned as an ``exchange.Answer`` (the acknowledgement's and the pull's
        fields; the tensors are in ``into``). Otherwise it returns an awaitable of ``push_pull``'s
        answer to the same push (sent already or not: await it, once). Raises what ``push_pull``
        would when the stream broke while sending."""
        if max_wait is None or max_wait != self._waits[0]:
            self._waits = (max_wait, *self._wait(max_wait))
        _, wait, parked = self._waits
        if native is not None:
            got = self._exchange.push_pull(run_id, rank, incarnation, clock, grads, loss, wait, since, param_version,
                                           into)
            if type(got) is Answer:
                return got
            if got is not False:
                return self._answer(iter(()), None if got is True else got, into, False, parked)
        return self.push_pull(run_id, rank, incarnation, clock, grads, loss, into=into, max_wait=max_wait, since=since,
                              param_version=param_version)

    async def _answer(self, requests: Iterator[list[wire.Part]], answer: memoryview | None,
                      into: dict[str, np.ndarray] | None, borrow: bool,
                      parked: float) -> tuple[pb.PushGradientResponse, PullResult]:
        """``push_pull``'s answer to ``requests`` (sent as they are read; none: sent already),
        ``answer`` its first response when read already."""
        sink = PullSink(into, borrow)
        responses = [] if answer is None else [sink.push_response(answer)]
        if not responses or not _pulled_final(responses[-1]):
            responses += await self._push.exchange(requests, parked + self.timeout, until_final=True,
                                                   final=_pulled_final, decode=sink.push_response)
        first = responses[0]
        resp = pb.PushGradientResponse(clock=first.clock, duplicate=first.duplicate, min_clock=first.min_clock,
                                       run_state=first.run_state, staleness=first.staleness,  # type: ignore[arg-type]
                                       lr_scale=first.lr_scale)
        return resp, sink.result(responses[-1].pulled or unwire.ParamsResponse())

    def _push_requests(self, run_id: str, rank: int, incarnation: int, clock: int, grads: Mapping[str, Grad],
                       loss: float, then: pb.PullParamsRequest | bytes | None,
                       param_version: int | None = None) -> Iterator[list[wire.Part]]:
        """PushGradientRequests as parts, encoded lazily (sending overlaps encoding)."""
        first = True
        chunk = max(self.chunk_bytes, MESSAGE_BYTES) if self.route.transport == "shm" else self.chunk_bytes
        whole = wire.whole_group(grads, chunk)
        if whole is not None:  # one message
            yield wire.push_request_parts(run_id, rank, incarnation, clock, whole, True, loss, then, param_version)
            return
        for group, last in wire.with_last(wire.chunk_groups(grads, chunk)):
            yield wire.push_request_parts(run_id, rank, incarnation, clock, group, last, loss,
                                          then if first else None, param_version if first else None)
            first = False

    async def pull(
        self, run_id: str, rank: int = 0, incarnation: int = 0, clock: int = 0, *,
        into: dict[str, np.ndarray] | None = None, names: Sequence[str] = (), max_wait: float | None = None,
        timeout: float | None = None, rows: Mapping[str, np.ndarray] | None = None,
        since: tuple[int, int] | None = None,
    ) -> PullResult:
        """Pull parameters for iteration ``clock`` (incarnation 0: an observer's read, no wait).

        Tensors are written into ``into`` (arrays reused across pulls) when given, else into new
        arrays. ``rows``: table name -> row ids to pull (in ``PullResult.rows``); then ``names``
        are the whole tensors wanted besides (empty: none). ``since``: (lineage, version) of a
        previous answer that ``into`` holds, whole: the server may answer with what changed since
        (``PullResult.delta``). The call's deadline is ``max_wait`` (how long the server may park
        it; None: the client's timeout; 0: the server's limit, ``server_max_wait``) plus the
        client's timeout.
        """
        wait, parked = self._wait(max_wait)
        req = pb.PullParamsRequest(run_id=run_id, rank=rank, incarnation=incarnation, clock=clock, names=names,
                                   max_wait=wire.duration(wait), rows=_table_rows(rows), **_since(since, into))
        sink = PullSink(into)
        responses = await self._pull.exchange([[req.SerializeToString()]], timeout or (parked + self.timeout),
                                              until_final=True, decode=sink.params_response)
        return sink.result(responses[-1])
