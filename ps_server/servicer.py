"""gRPC servicers: decode the request, call the core, encode the answer. Nothing else lives here.

Errors: core methods raise ``errors.PsError``; ``_abort`` turns them into a status code through
``codec.STATUS_CODES``, the one mapping table.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Reversible
from functools import partial
from typing import NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError

from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import paramserver_pb2_grpc as pb_grpc
from paramserver.v1 import wire
from paramserver.v1.tensors import with_last

from . import codec
from .checkpointer import Checkpointer
from .config import ServerConfig
from .errors import FailedPrecondition, InvalidArgument, PsError, WaitTimeout
from .registry import RunRegistry
from .run import Run
from .slots import PushSlots
from .status import Assignment, ParamsRead
from .store import ParamStore

__all__ = ["ParameterServicer", "RunServicer", "WorkerServicer"]

log = logging.getLogger("ps_server")
R = TypeVar("R")


async def _abort(context: grpc.aio.ServicerContext, exc: PsError) -> NoReturn:
    await context.abort(codec.status_code(exc), str(exc))
    raise AssertionError("unreachable")  # pragma: no cover


def _wait_limit(config: ServerConfig, requested: float, context: grpc.aio.ServicerContext) -> float:
    """The park limit: the request's wish, capped by the server's limit and the call deadline."""
    limit = config.max_wait_seconds if requested <= 0 else min(requested, config.max_wait_seconds)
    remaining = context.time_remaining()
    return limit if remaining is None else max(0.0, min(limit, remaining))


async def _decode(parse: Callable[[bytes | memoryview], R], raw: bytes | memoryview, context: grpc.aio.ServicerContext) -> R:
    """A request through ``parse``; unparseable bytes end the call as gRPC's deserializer would."""
    try:
        return parse(raw)
    except DecodeError:
        await context.abort(grpc.StatusCode.INTERNAL, "Exception deserializing request!")
        raise AssertionError("unreachable") from None  # pragma: no cover


def _last(items: Reversible[R], n: int) -> list[R]:
    """The last ``n`` of ``items`` in order, without walking the rest (a deque of 20,000 points)."""
    out = list(itertools.islice(reversed(items), n))
    out.reverse()
    return out


def _changed_since(run: Run, changes: int) -> bool:
    return run.changes != changes


class ParameterServicer(pb_grpc.ParameterServiceServicer):
    def __init__(self, registry: RunRegistry, config: ServerConfig, slots: PushSlots) -> None:
        self._registry = registry
        self._config = config
        self._slots = slots

    async def PushGradient(
        self, request_iterator: AsyncIterator[bytes | memoryview], context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[list[wire.Part], None]:
        """Serialized ``PushGradientRequest``s in, ``PushGradientResponse``s out as ``wire`` parts
        (joined by gRPC's serializer, or written as they are by the TCP data plane)."""
        assembler: codec.TensorAssembler | None = None
        key: tuple[str, int, int, int] | None = None
        run: Run | None = None
        # A bad push is answered once its last request is in: aborting while the client is still
        # writing makes it see INTERNAL instead of the real status. Until then the rest of the push
        # is read and dropped (bounded, in case its end never comes).
        failed: PsError | None = None
        drained = 0
        then_pull: pb.PullParamsRequest | None = None
        in_op = False  # a push is being received or answered: shutdown waits for it
        slot = self._slots.holder()  # a multi-message push is received holding a slot (slots.py)
        requests = aiter(request_iterator)
        try:
            while True:
                try:
                    raw = await slot.next(requests)
                except StopAsyncIteration:
                    break
                if not in_op:
                    self._registry.op_begin()
                    in_op = True
                req = await _decode(wire.decode_push_request, raw, context)
                this = (req.run_id, req.rank, req.incarnation, req.clock)
                try:
                    if failed is None:
                        try:
                            if assembler is None:  # a new push on this stream
                                run = None
                                then_pull = req.then_pull
                                run = self._registry.get(req.run_id)
                                assembler = codec.TensorAssembler(max_bytes=2 * run.store.nbytes + (1 << 20))
                                key = this
                            elif key != this:
                                raise InvalidArgument(f"push {key} was not finished (final unset) when a "
                                                      f"request for {this} arrived")
                            assembler.add(req.tensors)
                        except PsError as exc:
                            failed = exc
                    else:
                        drained += len(raw)
                        limit = max(assembler.max_bytes if assembler else 0, 2 * self._config.max_message_bytes)
                        if drained > limit:
                            raise failed
                    if not req.final:
                        if failed is None:
                            await slot.acquire()
                        else:
                            slot.release()  # only draining now
                        continue
                    slot.release()
                    if failed is not None:
                        raise failed
                    assert assembler is not None and run is not None
                    try:
                        grads = assembler.finish()
                    except PsError as exc:
                        failed = exc
                        raise
                    result = run.push(req.rank, req.incarnation, req.clock, grads, assembler.nbytes, req.loss,
                                      getattr(context, "data_plane", "grpc"))
                    # Drop the push's messages now (the gradient views keep them alive), not when
                    # the next push on this stream replaces them: four idle streams would hold four.
                    del grads, raw, req
                    assembler = None
                except PsError as exc:
                    if exc is failed and run is not None:
                        run.counters.pushes_rejected += 1
                    log.info("push rejected: %s", exc, extra={"run": req.run_id, "rank": req.rank, "clock": req.clock})
                    await _abort(context, exc)
                ack = (result.clock, result.duplicate, result.min_clock, codec.run_state_to_proto(result.run_state))
                if then_pull is None:
                    yield wire.push_response_parts(*ack)
                    self._registry.op_end()
                    in_op = False
                    continue
                try:  # the pull that rides on this push: one round trip per iteration
                    read = await self._pull(then_pull, context)
                except PsError as exc:
                    await _abort(context, exc)
                first = True
                for pulled in self._params_messages(read):
                    yield wire.push_response_parts(*ack, pulled=pulled) if first else wire.push_response_parts(pulled=pulled)
                    first = False
                self._registry.op_end()
                in_op = False
            if failed is not None or assembler is not None:
                if run is not None:
                    run.counters.pushes_rejected += 1
                await _abort(context, failed or InvalidArgument(f"the stream ended inside push {key} (final never set)"))
        finally:
            slot.release()
            if in_op:
                self._registry.op_end()

    async def PullParams(
        self, request_iterator: AsyncIterator[bytes | memoryview], context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[list[wire.Part], None]:
        """Serialized ``PullParamsRequest``s in, ``PullParamsResponse``s out as ``wire`` parts."""
        async for raw in request_iterator:
            req = await _decode(pb.PullParamsRequest.FromString, raw, context)
            self._registry.op_begin()  # a pull being served: shutdown waits for it
            try:
                try:
                    read = await self._pull(req, context)
                except PsError as exc:
                    await _abort(context, exc)
                for params in self._params_messages(read):
                    yield wire.params_response_parts(*params)
            finally:
                self._registry.op_end()

    async def _pull(self, req: pb.PullParamsRequest, context: grpc.aio.ServicerContext) -> ParamsRead:
        """Wait as the SSP rule says, then read (an observer's read, incarnation 0, never waits)."""
        run = self._registry.get(req.run_id)
        names = list(req.names) or None
        if req.incarnation == 0:
            return run.read(None, req.clock, names)
        await self._wait(run, req, context)
        return run.read(req.rank, req.clock, names)

    def _params_messages(self, read: ParamsRead) -> Iterator[wire.ParamsParts]:
        """A read as the arguments of ``wire.params_response_parts``, in groups of ~chunk_bytes.

        Chunks are encoded lazily, between sends: a model of hundreds of MB is never copied whole.
        A multi-message read can therefore include updates applied while it streams ("maybe newer
        ones too"); it always includes every update it guarantees.
        """
        state = codec.run_state_to_proto(read.run_state)
        for group, last in with_last(iter(self._groups(read))):
            yield read.guaranteed_clock, read.version, group, last, state

    def _groups(self, read: ParamsRead) -> list[wire.Group]:
        """The read's chunks in message groups; for the whole model, built once per run and
        reused: the same views of the live parameters every time (a small model's pull then
        makes no numpy call before its encoding's one copy)."""
        key = ("groups", self._config.chunk_bytes)
        groups: list[wire.Group] | None = read.derived.get(key) if read.derived is not None else None
        if groups is None:
            groups = [[(name, shape, offset, part.data) for name, shape, offset, part in group]
                      for group in wire.chunk_groups(read.tensors, self._config.chunk_bytes)]
            if read.derived is not None:
                read.derived[key] = groups
        return groups

    async def _wait(self, run: Run, req: pb.PullParamsRequest, context: grpc.aio.ServicerContext) -> None:
        rank, inc, clock = req.rank, req.incarnation, req.clock
        run.check_pull(rank, inc, clock)

        def ready() -> bool:
            return run.pull_ready(rank, inc, clock)

        if ready():
            return
        timeout = _wait_limit(self._config, req.max_wait.ToTimedelta().total_seconds(), context)
        run.park(rank, clock)
        try:
            await run.gate.wait_for(ready, timeout, run.waiting_for)
        finally:
            run.park(rank, None)


class RunServicer(pb_grpc.RunServiceServicer):
    def __init__(self, registry: RunRegistry, config: ServerConfig, checkpointer: Checkpointer | None) -> None:
        self._registry = registry
        self._config = config
        self._checkpointer = checkpointer

    async def CheckpointRun(
        self, request: pb.CheckpointRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckpointRunResponse:
        try:
            run = self._registry.get(request.run_id)
            if self._checkpointer is None:
                raise FailedPrecondition("this server has no data directory: start it with --data-dir DIR")
            path, clock = await self._checkpointer.checkpoint_now(run, "on demand")
        except PsError as exc:
            await _abort(context, exc)
        return pb.CheckpointRunResponse(path=str(path), min_clock=clock)

    async def CreateRun(self, request: pb.CreateRunRequest, context: grpc.aio.ServicerContext) -> pb.CreateRunResponse:
        try:
            spec = codec.spec_from_proto(request.spec)
            self._registry.check(spec)
            # Drawing hundreds of MB of initial values takes seconds: not on the event loop.
            store = await asyncio.to_thread(ParamStore, spec.params, spec.seed)
            run = self._registry.create(spec, store)
        except PsError as exc:
            await _abort(context, exc)
        log.info("created %s: %s", run.run_id, run.spec.name or "(unnamed)", extra={"run": run.run_id})
        return pb.CreateRunResponse(run=codec.status_to_proto(run.status()))

    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.GetRunResponse:
        try:
            run = self._registry.get(request.run_id)
        except PsError as exc:
            await _abort(context, exc)
        return pb.GetRunResponse(run=codec.status_to_proto(run.status()))

    async def ListRuns(self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext) -> pb.ListRunsResponse:
        return pb.ListRunsResponse(runs=[codec.status_to_proto(r.status()) for r in self._registry.runs()])

    async def StopRun(self, request: pb.StopRunRequest, context: grpc.aio.ServicerContext) -> pb.StopRunResponse:
        try:
            run = self._registry.get(request.run_id)
        except PsError as exc:
            await _abort(context, exc)
        run.stop(request.reason or "stopped by user")
        log.info("stopped %s", run.run_id, extra={"run": run.run_id})
        return pb.StopRunResponse(run=codec.status_to_proto(run.status()))

    async def WatchRun(
        self, request: pb.WatchRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchRunResponse]:
        try:
            run = self._registry.get(request.run_id)
        except PsError as exc:
            await _abort(context, exc)
        interval = request.interval.ToTimedelta().total_seconds() or 0.5
        seen_events = max(0, run.event_count - len(run.events))
        while True:
            seen_changes = run.changes
            fresh = run.event_count - seen_events
            events = list(run.events)[-fresh:] if fresh else []
            seen_events = run.event_count
            status = run.status()
            yield pb.WatchRunResponse(
                run=codec.status_to_proto(status), events=[codec.event_to_proto(e) for e in events]
            )
            if status.state.finished:
                return
            await asyncio.sleep(interval)
            try:
                await run.gate.wait_for(partial(_changed_since, run, seen_changes), 3600.0, lambda: "no change")
            except WaitTimeout:
                pass

    async def GetMetrics(self, request: pb.GetMetricsRequest, context: grpc.aio.ServicerContext) -> pb.GetMetricsResponse:
        try:
            run = self._registry.get(request.run_id)
        except PsError as exc:
            await _abort(context, exc)
        n = request.max_points
        return pb.GetMetricsResponse(
            points=[codec.point_to_proto(p) for p in (_last(run.points, n) if n else run.points)],
            events=[codec.event_to_proto(e) for e in (_last(run.events, n) if n else run.events)],
            clock_records=[codec.record_to_proto(r) for r in run.clock_records] if request.include_clock_records else [],
        )


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    def __init__(self, registry: RunRegistry, config: ServerConfig) -> None:
        self._registry = registry
        self._config = config
        self.data_port = 0
        """The TCP data plane's port, told to workers at Join and Heartbeat (0: none)."""

    def _assignment(self, a: Assignment) -> pb.Assignment:
        hb = pb.Assignment(
            run_id=a.run_id, rank=a.rank, incarnation=a.incarnation, spec=codec.spec_to_proto(a.spec),
            start_clock=a.start_clock,
        )
        hb.heartbeat_interval.FromNanoseconds(int(self._config.heartbeat_seconds * 1e9))
        hb.lease.FromNanoseconds(int(self._config.lease_seconds * 1e9))
        return hb

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinResponse:
        registry = self._registry
        try:
            assignment = registry.join(request.worker_name, request.run_id)
            requested = request.max_wait.ToTimedelta().total_seconds()
            if assignment is None and requested > 0:  # max_wait 0: answer at once (not the server's limit)
                timeout = _wait_limit(self._config, requested, context)
                if timeout > 0:
                    try:
                        await registry.work.wait_for(lambda: registry.has_work(request.run_id), timeout, lambda: "")
                    except WaitTimeout:
                        return pb.JoinResponse(server_generation=registry.generation)
                    assignment = registry.join(request.worker_name, request.run_id)
        except PsError as exc:
            await _abort(context, exc)
        if assignment is None:
            return pb.JoinResponse(server_generation=registry.generation)
        log.info("rank %d of %s to %s", assignment.rank, assignment.run_id, request.worker_name,
                 extra={"run": assignment.run_id, "rank": assignment.rank})
        return pb.JoinResponse(assignment=self._assignment(assignment), server_generation=registry.generation,
                               data_port=self.data_port)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        try:
            run = self._registry.get(request.run_id)
            state, clock = run.heartbeat(request.rank, request.incarnation)
        except PsError as exc:
            await _abort(context, exc)
        return pb.HeartbeatResponse(
            run_state=codec.run_state_to_proto(state), min_clock=run.min_clock,
            server_generation=self._registry.generation, clock=clock, data_port=self.data_port,
        )

    async def ReportMetrics(
        self, request: pb.ReportMetricsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportMetricsResponse:
        now = time.time()
        try:
            run = self._registry.get(request.run_id)
            state = run.report(
                request.rank, request.incarnation,
                [codec.point_from_proto(p, now) for p in request.points], request.pulls_skipped,
            )
        except PsError as exc:
            await _abort(context, exc)
        return pb.ReportMetricsResponse(run_state=codec.run_state_to_proto(state))

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext) -> pb.LeaveResponse:
        reasons = {pb.LEAVE_REASON_DONE: "done", pb.LEAVE_REASON_SHUTDOWN: "shutdown", pb.LEAVE_REASON_FAILED: "failed"}
        try:
            if request.reason not in reasons:
                raise InvalidArgument("reason must be LEAVE_REASON_DONE, _SHUTDOWN or _FAILED")
            run = self._registry.get(request.run_id)
            state = run.leave(request.rank, request.incarnation, reasons[request.reason], request.message)
        except PsError as exc:
            await _abort(context, exc)
        self._registry.work.notify()
        log.info("rank %d left %s: %s", request.rank, run.run_id, reasons[request.reason],
                 extra={"run": run.run_id, "rank": request.rank})
        return pb.LeaveResponse(run_state=codec.run_state_to_proto(state))

