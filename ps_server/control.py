"""The control plane, transport-neutral: RunService and WorkerService as ``request -> response``.

Each method decodes its request message (``codec``), calls the core and encodes the answer; a
``PsError`` it raises is the call's status (``codec.error_status``). The gRPC servicer routes calls
here and nothing else; so does the in-memory transport of ``ps_server.testing``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Callable, Reversible
from typing import TypeVar

from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import wire

from . import codec
from .background import Background, landed
from .checkpointer import Checkpointer
from .cluster.owner import ClusterOwner
from .core.errors import FailedPrecondition, InvalidArgument, PsError, Reason, ShardUnavailable, shortened
from .core.registry import RunRegistry
from .core.run import Run
from .core.status import Assignment

__all__ = ["Control", "delete_run"]

log = logging.getLogger("ps_server")
T = TypeVar("T")

_LEAVE_REASONS = {pb.LEAVE_REASON_DONE: "done", pb.LEAVE_REASON_SHUTDOWN: "shutdown", pb.LEAVE_REASON_FAILED: "failed"}


def _last(items: Reversible[T], n: int) -> list[T]:
    """The last ``n`` of ``items`` in order, without walking the rest (a deque of 20,000 points)."""
    out = list(itertools.islice(reversed(items), n))
    out.reverse()
    return out


def _summary(run: Run) -> pb.Run:
    out = codec.run_to_proto(run.spec, run.status(workers=False))
    out.spec.model_spec_json = out.spec.data_spec_json = ""
    return out


async def delete_run(run: Run, checkpointer: Checkpointer | None, cluster: ClusterOwner | None,
                     forget: Callable[[], object] | None = None) -> str:
    """Delete ``run``'s checkpoints, then have the other servers of a cluster delete their shards;
    what was left on disk (``left_behind``). ``forget``: the registry's ``remove`` of a run still
    registered (DeleteRun), called as its checkpoints go; if the disk refuses (their directory
    cannot be moved away: nothing is deleted), the run is kept, the other servers are not told and
    PsError says so. None: a run already forgotten (the retention limits: ``RunRegistry.prune``),
    whose refusal is logged (a restart shows it again) and the other servers told all the same."""
    left = ""
    if checkpointer is None:
        if forget is not None:
            forget()
    else:
        try:
            left = await checkpointer.delete(run.run_id, forget or (lambda: None))
        except OSError as exc:
            if forget is not None:  # nothing deleted: the run stays (a restart would resume it)
                raise PsError(f"could not delete the checkpoints of {run.run_id} in {checkpointer.store.root}: "
                              f"{exc.strerror or exc}; nothing was deleted and the run is kept ({run.state.value}): "
                              "fix the data directory and delete it again") from None
            log.error("could not delete the checkpoints of %s (%s): a restart will show it again", run.run_id,
                      exc.strerror or exc, extra={"run": run.run_id})
    if cluster is not None:
        await cluster.delete(run.run_id)
    return left


DEFAULT_PAGE, MAX_PAGE = 100, 1000
"""ListRuns' page size when the request gives none, and its most."""


class Control:
    def __init__(self, registry: RunRegistry, *, max_wait: float, heartbeat_seconds: float, lease_seconds: float,
                 checkpointer: Checkpointer | None = None, data_port: Callable[[], int] = lambda: 0,
                 shm_socket: Callable[[], str] = lambda: "", cluster: ClusterOwner | None = None,
                 background: Background | None = None) -> None:
        """``data_port``: the TCP data plane's port, told to workers at Join and Heartbeat (0: none),
        ``shm_socket`` the shared-memory data plane's name (empty: none);
        ``cluster``: server 0's side of a cluster (runs are sharded; ranks are kept on every shard);
        ``background``: where deletions go on after their caller gave up (``DeleteRun``)."""
        self._registry = registry
        self._max_wait = max_wait
        self._heartbeat = heartbeat_seconds
        self._lease = lease_seconds
        self._checkpointer = checkpointer
        # In a cluster each shard's port is in the shard map: the server that answers is not
        # always the one the worker dialled (servers 1.. forward Join and Heartbeat here).
        self._data_port = data_port if cluster is None else (lambda: 0)
        self._shm_socket = shm_socket if cluster is None else (lambda: "")
        self._cluster = cluster
        self._background = background if background is not None else Background()
        self._deletions: dict[str, asyncio.Future[pb.DeleteRunResponse]] = {}
        """The deletions under way, by run: another DeleteRun of the run waits for its answer."""

    def _run(self, run: Run) -> pb.Run:
        out = codec.run_to_proto(run.spec, run.status())
        if self._cluster is not None and run.placement is not None:
            out.shard_map.CopyFrom(self._cluster.shard_map(run))
            out.shards.extend(self._cluster.statuses(run))
        return out

    async def _sync(self, run: Run) -> None:
        if self._cluster is not None:
            await self._cluster.sync(run)

    # ------------------------------------------------------------------------------ RunService
    async def CreateRun(self, request: pb.CreateRunRequest) -> pb.CreateRunResponse:
        spec = codec.spec_from_proto(request.spec, self._registry.limits)
        # (registered once its first checkpoint is written: a server killed after the answer keeps
        # it, and a caller gone before, its deadline passed, leaves no run)
        try:
            run = await (self._cluster.create_run(spec) if self._cluster else
                         self._registry.create(spec, ready=self._checkpointer.first if self._checkpointer else None))
        except OSError as exc:  # (its first checkpoint: no run without it)
            root = self._checkpointer.store.root if self._checkpointer else "the data directory"
            raise PsError(f"could not write the new run's first checkpoint to {root}: {exc.strerror or exc}; no run "
                          "was created: fix the data directory and try again") from None
        if self._cluster is not None and self._checkpointer is not None:  # (server 0's shard at cut 0, as the
            await self._checkpointer.written(run.run_id)  # others' before their CreateShard answered)
        log.info("created %s: %s", run.run_id, run.spec.name or "(unnamed)", extra={"run": run.run_id})
        return pb.CreateRunResponse(run=self._run(run))

    async def GetRun(self, request: pb.GetRunRequest) -> pb.GetRunResponse:
        return pb.GetRunResponse(run=self._run(self._registry.get(request.run_id)))

    async def ListRuns(self, request: pb.ListRunsRequest) -> pb.ListRunsResponse:
        """A page of runs as summaries: no per-rank status, no model or data spec (GetRun has them),
        so a page costs the same however large its runs are."""
        size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        runs, token = self._registry.page(size, request.page_token)
        return pb.ListRunsResponse(runs=[_summary(r) for r in runs], next_page_token=token)

    async def DeleteRun(self, request: pb.DeleteRunRequest) -> pb.DeleteRunResponse:
        # (psctl delete twice, or a retry after a timeout: answered as the deletion under way is,
        # not NOT_FOUND once it has forgotten the run)
        if (under_way := self._deletions.get(request.run_id)) is not None:
            out = pb.DeleteRunResponse()
            out.CopyFrom(await asyncio.shield(under_way))
            return out
        run = self._registry.get(request.run_id)
        if not run.state.finished:
            if not request.force:
                raise FailedPrecondition(f"run {run.run_id} is {run.state.value}: stop it first (psctl stop), or "
                                         "delete it anyway (psctl delete --force; DeleteRunRequest.force)",
                                         Reason.RUN_NOT_FINISHED)
            run.stop("deleted")
        deleting = self._background.start(self._delete(run, self._run(run)))
        self._deletions[run.run_id] = deleting
        deleting.add_done_callback(lambda _: self._deletions.pop(run.run_id, None))
        return await landed(deleting)  # (a caller gone meanwhile: the deletion ends first)

    async def _delete(self, run: Run, last: pb.Run) -> pb.DeleteRunResponse:
        left = await delete_run(run, self._checkpointer, self._cluster, lambda: self._registry.remove(run.run_id))
        log.info("deleted %s", run.run_id, extra={"run": run.run_id})
        return pb.DeleteRunResponse(run=last, left_behind=left)

    async def StopRun(self, request: pb.StopRunRequest) -> pb.StopRunResponse:
        run = self._registry.get(request.run_id)
        run.stop(shortened(request.reason) or "stopped by user")
        await self._sync(run)
        if self._checkpointer is not None:  # (its final checkpoint: a server killed now keeps it stopped)
            await self._checkpointer.written(run.run_id)
        log.info("stopped %s", run.run_id, extra={"run": run.run_id})
        return pb.StopRunResponse(run=self._run(run))

    async def UpdateRun(self, request: pb.UpdateRunRequest) -> pb.UpdateRunResponse:
        run = self._registry.get(request.run_id)
        if request.HasField("staleness"):
            if run.placement is not None:
                raise FailedPrecondition(f"run {run.run_id} is held by several servers: its staleness cannot change "
                                         "while it runs yet", Reason.UNSUPPORTED)
            old = run.spec.staleness
            run.set_staleness(request.staleness)
            log.info("%s: staleness %d -> %d", run.run_id, old, run.spec.staleness, extra={"run": run.run_id})
            if self._checkpointer is not None and not run.state.finished:  # (a restart keeps the new bound)
                self._checkpointer.schedule(run, f"staleness {old} -> {run.spec.staleness}", logging.DEBUG)
        return pb.UpdateRunResponse(run=self._run(run))

    async def WatchRun(self, request: pb.WatchRunRequest) -> AsyncGenerator[pb.WatchRunResponse, None]:
        """A snapshot now, then one per change (at most every ``interval``), until the run finished."""
        run = self._registry.get(request.run_id)
        interval = request.interval.ToTimedelta().total_seconds() or 0.5
        history = run.history
        seen_events = max(0, history.event_count - len(history.events))
        last = 0.0  # the time of the last event sent
        while True:
            seen_changes = run.changes
            fresh = history.event_count - seen_events
            events = list(history.events)[-fresh:] if fresh else []
            seen_events = history.event_count
            last = events[-1].time if events else last
            snapshot = self._run(run)
            finished = run.state.finished  # as sent: the run may finish while the consumer is slow
            yield pb.WatchRunResponse(run=snapshot, events=[codec.event_to_proto(e) for e in events])
            if finished:
                return
            await asyncio.sleep(interval)
            try:
                while self._registry.get(run.run_id) is run and not await run.changed(seen_changes, 1.0):
                    pass
            except ShardUnavailable:
                if self._registry.get(run.run_id) is run:
                    raise
            if self._registry.get(run.run_id) is not run:  # a cluster's run went back to a checkpoint
                run = self._registry.get(run.run_id)
                history = run.history
                seen_events = history.event_count - sum(e.time > last for e in history.events)

    async def GetMetrics(self, request: pb.GetMetricsRequest) -> pb.GetMetricsResponse:
        history = self._registry.get(request.run_id).history
        n = request.max_points
        return pb.GetMetricsResponse(
            points=[codec.point_to_proto(p) for p in (_last(history.points, n) if n else history.points)],
            events=[codec.event_to_proto(e) for e in (_last(history.events, n) if n else history.events)],
            clock_records=[codec.record_to_proto(r) for r in history.clock_records] if request.include_clock_records else [],
        )

    async def CheckpointRun(self, request: pb.CheckpointRunRequest) -> pb.CheckpointRunResponse:
        run = self._registry.get(request.run_id)
        if self._checkpointer is None:
            raise FailedPrecondition("this server has no data directory: start it with one (ps-server --data-dir DIR)",
                                     Reason.NO_DATA_DIR)
        try:
            if self._cluster is not None and run.placement is not None:  # every server's snapshot at one cut
                path, clock = await self._cluster.cuts.checkpoint(run, "on demand")
            else:
                path, clock = await self._checkpointer.checkpoint_now(run, "on demand")
        except OSError as exc:  # the run goes on; the data directory needs a look
            raise PsError(f"could not write a checkpoint of {run.run_id} to {self._checkpointer.store.root}: "
                          f"{exc.strerror or exc}; fix the data directory and try again") from None
        return pb.CheckpointRunResponse(path=str(path), min_clock=clock)

    # ------------------------------------------------------------------------------ WorkerService
    def _assignment(self, a: Assignment) -> pb.Assignment:
        run = self._registry.get(a.run_id)
        out = pb.Assignment(run_id=a.run_id, rank=a.rank, incarnation=a.incarnation, start_clock=a.start_clock,
                            spec=codec.spec_to_proto(run.spec))
        if self._cluster is not None and run.placement is not None:
            out.shard_map.CopyFrom(self._cluster.shard_map(run))
        out.heartbeat_interval.FromNanoseconds(int(self._heartbeat * 1e9))
        out.lease.FromNanoseconds(int(self._lease * 1e9))
        return out

    async def Join(self, request: pb.JoinRequest) -> pb.JoinResponse:
        registry = self._registry
        if len(request.capabilities) > registry.limits.max_requires:
            raise InvalidArgument(f"capabilities has {len(request.capabilities)} entries: at most "
                                  f"{registry.limits.max_requires}")
        if len(request.join_token) > registry.limits.max_name_chars:
            raise InvalidArgument(f"join_token has {len(request.join_token)} characters: at most "
                                  f"{registry.limits.max_name_chars}")
        can, token = frozenset(request.capabilities), request.join_token
        name = request.worker_name[: registry.limits.max_name_chars]  # (kept in its rank and events)
        assignment = registry.join(name, request.run_id, can, token)
        requested = request.max_wait.ToTimedelta().total_seconds()
        if assignment is None and requested > 0:  # max_wait 0: answer at once (not the server's limit)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + min(requested, self._max_wait)
            # (a vacancy wakes every parked Join: those that find it taken wait on, to their deadline)
            while assignment is None and await registry.wait_for_work(request.run_id, deadline - loop.time(), can):
                assignment = registry.join(name, request.run_id, can, token)
        if assignment is None:
            return pb.JoinResponse(server_generation=registry.generation)
        run = registry.get(assignment.run_id)
        await self._sync(run)  # every shard knows the incarnation before its worker, and where it starts:
        if registry.find(run.run_id) is not run:  # deleted, or gone back to a checkpoint, meanwhile: the rank too
            if request.run_id:
                registry.get(request.run_id)  # (NotFound: deleted)
            return pb.JoinResponse(server_generation=registry.generation)  # (it asks again)
        slot = run.clock.slots[assignment.rank]  # later than assigned if a shard had combined clocks past it
        if slot.incarnation == assignment.incarnation:
            assignment = dataclasses.replace(assignment, start_clock=slot.clock)
        log.info("rank %d of %s to %s", assignment.rank, assignment.run_id, name,
                 extra={"run": assignment.run_id, "rank": assignment.rank})
        return pb.JoinResponse(assignment=self._assignment(assignment), server_generation=registry.generation,
                               data_port=self._data_port(), shm_socket=self._shm_socket(),
                               max_wait=wire.duration(self._max_wait))

    async def Heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        run = self._registry.get(request.run_id)
        state, clock = run.heartbeat(request.rank, request.incarnation)
        return pb.HeartbeatResponse(run_state=codec.run_state_to_proto(state), min_clock=run.min_clock,
                                    server_generation=self._registry.generation, clock=clock,
                                    data_port=self._data_port(), shm_socket=self._shm_socket(),
                                    max_wait=wire.duration(self._max_wait))

    async def ReportMetrics(self, request: pb.ReportMetricsRequest) -> pb.ReportMetricsResponse:
        now = time.time()
        run = self._registry.get(request.run_id)
        points = [codec.point_from_proto(p, now) for p in request.points]
        state = run.report(request.rank, request.incarnation, points, request.pulls_skipped)
        return pb.ReportMetricsResponse(run_state=codec.run_state_to_proto(state))

    async def Leave(self, request: pb.LeaveRequest) -> pb.LeaveResponse:
        if request.reason not in _LEAVE_REASONS:
            raise InvalidArgument("reason must be LEAVE_REASON_DONE, _SHUTDOWN or _FAILED")
        reason = _LEAVE_REASONS[request.reason]
        run = self._registry.get(request.run_id)
        state = run.leave(request.rank, request.incarnation, reason, shortened(request.message))
        await self._sync(run)
        self._registry.vacated()
        log.info("rank %d left %s: %s", request.rank, run.run_id, reason, extra={"run": run.run_id, "rank": request.rank})
        return pb.LeaveResponse(run_state=codec.run_state_to_proto(state))
