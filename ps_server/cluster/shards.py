"""ClusterService on every server of a cluster: the owner's calls to its shard of a run.

Transport-neutral, as ``control``: each method takes and returns the cluster's messages; a
``PsError`` it raises is the call's status. Server 0 answers them too (GetShard), but the
owner never sends itself UpdateShard: its shard is the membership.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence

from paramserver.v1 import cluster_pb2 as cpb

from .. import codec
from ..checkpointer import Checkpointer
from ..core.checkpoint import CorruptCheckpoint
from ..core.errors import FailedPrecondition, InvalidArgument, NotFound, PsError, Reason
from ..core.placement import Placement, check_map
from ..core.registry import RunRegistry
from ..core.run import Run
from ..core.shard import ShardRun
from . import messages

__all__ = ["ShardService", "restore"]

log = logging.getLogger("ps_server")

CUT_WAIT = 30.0
"""Seconds CheckpointShard waits for the shard's min clock to reach the cut."""

DELETED_KEPT = 10_000
"""Most run ids a server remembers were deleted (a CreateShard of one is refused)."""


async def restore(registry: RunRegistry, checkpointer: Checkpointer, run_id: str, cut: int, why: str) -> Run:
    """Put ``run_id``'s checkpoint of ``cut`` in place of the run (its parked pulls get ``why``).
    FailedPrecondition, and nothing changes, when the checkpoint does not fit, or the run ended or
    was deleted while it loaded (deleted before it was put in place, too: it stays deleted); a run
    that ended after (StopRun while the checkpoints past the cut were deleted) ends as it did, at
    the cut, its final checkpoint taken there."""
    old = registry.get(run_id)

    def check(run: Run) -> None:
        if run.placement != old.placement:
            raise FailedPrecondition(f"the checkpoint of {run_id} at cut {cut} holds another shard map than the run")
        if registry.get(run_id) is not old or old.state.finished:
            raise FailedPrecondition(f"{run_id} ended or changed while its checkpoint at cut {cut} loaded: it stays "
                                     "as it is")

    try:
        run = await checkpointer.restore(run_id, cut, check)
    except (CorruptCheckpoint, KeyError, ValueError, TypeError) as exc:
        raise FailedPrecondition(f"cannot restore {run_id} at cut {cut}: {exc}") from None
    except FailedPrecondition:
        if old.state.finished and old.on_change is not None:  # stopped meanwhile (not deleted): its final checkpoint
            checkpointer.attach(old)
            checkpointer.schedule(old, old.state.value)
        raise
    if registry.find(run_id) is not old:  # deleted while the checkpoints past the cut were (DeleteShard)
        raise FailedPrecondition(f"{run_id} was deleted while it went back to its checkpoint at cut {cut}")
    registry.replace(run, why)
    if old.state.finished:  # ended while the checkpoints past the cut were deleted: the run in its place ends so
        run.stop(old.message, old.state)
        checkpointer.schedule(run, run.state.value)
    log.warning("%s went back to its checkpoint at cut %d (min clock %d; it was at %d)", run_id, cut,
                run.min_clock, old.min_clock, extra={"run": run_id})
    return run


class ShardService:
    def __init__(self, registry: RunRegistry, cluster: Sequence[str], index: int, data_port: Callable[[], int],
                 checkpointer: Checkpointer | None = None, shm_socket: Callable[[], str] = lambda: "") -> None:
        self._registry = registry
        self._cluster = list(cluster)
        self._index = index
        self._data_port = data_port
        self._shm_socket = shm_socket
        self._checkpointer = checkpointer
        self._deleted: collections.OrderedDict[str, None] = collections.OrderedDict()
        """The runs deleted here, newest last: a CreateShard that comes, or ends, after its run's
        DeleteShard (server 0 gave up on it, and its cancellation is late) leaves no shard."""

    def _not_deleted(self, run_id: str) -> None:
        if run_id in self._deleted:
            raise FailedPrecondition(f"run {run_id} was deleted (server 0 gave up creating it): its shard is not "
                                     "created")

    async def CreateShard(self, request: cpb.CreateShardRequest) -> cpb.CreateShardResponse:
        shards = request.shard_map.shards
        if request.index != self._index or len(shards) != len(self._cluster) or \
                [s.address for s in shards] != self._cluster:
            raise FailedPrecondition(f"this server is {self._index} ({self._cluster[self._index]}) of the cluster, "
                                     f"not the shard {request.index} the request is for: check every server's "
                                     "--cluster and --index")
        every = self._checkpointer.every if self._checkpointer else 0
        if request.checkpoints and (self._checkpointer is None or every != request.checkpoint_every):
            mine = f"--checkpoint-every {every}" if self._checkpointer else "no --data-dir"
            raise FailedPrecondition(f"server 0 checkpoints every {request.checkpoint_every} clocks and this server "
                                     f"({self._cluster[self._index]}) has {mine}: give every server of the cluster "
                                     "a --data-dir and the same --checkpoint-every, so that their checkpoints "
                                     "are taken at the same clocks")
        spec = codec.spec_from_proto(request.spec, self._registry.limits)
        shard_map = messages.shard_map_from_proto(request.shard_map)
        try:
            check_map(shard_map, spec.params)
        except ValueError as exc:
            raise InvalidArgument(f"the shard map of {request.run_id} does not fit its spec: {exc}") from None
        self._not_deleted(request.run_id)
        run = await self._registry.create_shard(request.run_id, spec, Placement(shard_map, self._index),
                                                request.created.ToNanoseconds() / 1e9)
        if request.run_id in self._deleted:  # while its values were drawn
            await self._delete(request.run_id)
            self._not_deleted(request.run_id)
        if self._checkpointer is not None:  # cut 0, on every server before the run exists: a server killed
            await self._checkpointer.written(run.run_id)  # now goes back to it with the others
        log.info("holding shard %d of %s: %d bytes", self._index, run.run_id, run.store.nbytes,
                 extra={"run": run.run_id})
        return cpb.CreateShardResponse(data_port=self._data_port(), shm_socket=self._shm_socket())

    async def UpdateShard(self, request: cpb.UpdateShardRequest) -> cpb.UpdateShardResponse:
        run = self._registry.get(request.run_id)
        if not isinstance(run, ShardRun):
            raise FailedPrecondition(f"{run.run_id}'s membership is this server's own: it takes no updates")
        try:
            ranks = messages.rank_updates_from_proto(request.ranks, len(run.clock.slots))
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        state = run.mirror(ranks, messages.run_state_from_proto(request.run_state), request.message)
        self._registry.vacated()
        return cpb.UpdateShardResponse(run_state=codec.run_state_to_proto(state),
                                       start_clocks=[s.start for s in run.clock.slots],
                                       replaced=[cpb.ReplacedRank(rank=s.rank, incarnation=s.replaced[0],
                                                                  clock=s.replaced[1])
                                                 for s in run.clock.slots if s.replaced is not None])

    async def GetShard(self, request: cpb.GetShardRequest) -> cpb.GetShardResponse:
        run = self._registry.get(request.run_id)
        cuts = []
        if self._checkpointer is not None:
            if request.keep_cuts:
                self._checkpointer.protected[run.run_id] = tuple(request.keep_cuts)
            cuts = self._checkpointer.store.cuts(run.run_id)
        return cpb.GetShardResponse(status=messages.shard_status(run, self._cluster[self._index]),
                                    resumed=bool(run.held), data_port=self._data_port(),
                                    shm_socket=self._shm_socket(),
                                    cuts=cuts, clocks=[s.clock for s in run.clock.slots])

    def _checkpoints(self) -> Checkpointer:
        if self._checkpointer is None:
            raise FailedPrecondition(f"{self._cluster[self._index]} (server {self._index}) has no data directory: "
                                     "start every server of the cluster with --data-dir DIR", Reason.NO_DATA_DIR)
        return self._checkpointer

    async def CheckpointShard(self, request: cpb.CheckpointShardRequest) -> cpb.CheckpointShardResponse:
        checkpointer = self._checkpoints()
        run = self._registry.get(request.run_id)
        try:
            path, clock = await checkpointer.checkpoint_at(run, request.cut, request.reason or "asked by server 0",
                                                           CUT_WAIT)
        except TimeoutError:
            raise FailedPrecondition(f"server {self._index}'s shard of {run.run_id} did not reach clock {request.cut} "
                                     f"within {CUT_WAIT:g}s (it is at min clock {run.min_clock}): the run is not "
                                     "moving; try again when it is") from None
        except OSError as exc:
            raise PsError(f"could not write a checkpoint of {run.run_id} to {checkpointer.store.root} on server "
                          f"{self._index}: {exc.strerror or exc}") from None
        return cpb.CheckpointShardResponse(path=str(path), min_clock=clock)

    async def ListShardCheckpoints(self, request: cpb.ListShardCheckpointsRequest) -> cpb.ListShardCheckpointsResponse:
        run = self._registry.get(request.run_id)
        return cpb.ListShardCheckpointsResponse(cuts=self._checkpoints().store.cuts(run.run_id),
                                                clocks=[s.clock for s in run.clock.slots])

    async def RestoreShard(self, request: cpb.RestoreShardRequest) -> cpb.RestoreShardResponse:
        run = await restore(self._registry, self._checkpoints(), request.run_id, request.cut,
                            f"server {self._index}'s shard of {request.run_id} went back to its checkpoint at cut "
                            f"{request.cut}: retry")
        return cpb.RestoreShardResponse(status=messages.shard_status(run, self._cluster[self._index]))

    async def DeleteShard(self, request: cpb.DeleteShardRequest) -> cpb.DeleteShardResponse:
        self._deleted[request.run_id] = None
        while len(self._deleted) > DELETED_KEPT:
            self._deleted.popitem(last=False)
        await self._delete(request.run_id)
        return cpb.DeleteShardResponse()

    async def _delete(self, run_id: str) -> None:
        try:
            self._registry.remove(run_id)
        except NotFound:
            pass
        if self._checkpointer is not None:
            try:
                await self._checkpointer.delete(run_id)
            except OSError as exc:  # (server 0 tells it again each poll until it answers OK)
                raise PsError(f"could not delete the checkpoints of {run_id} in {self._checkpointer.store.root} "
                              f"on server {self._index}: {exc.strerror or exc}") from None
