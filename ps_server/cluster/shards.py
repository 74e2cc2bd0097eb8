"""ClusterService on every server of a cluster: the owner's calls to its shard of a run.

Transport-neutral, as ``control``: each method takes and returns the cluster's messages; a
``PsError`` it raises is the call's status. Server 0 answers them too (Hello, GetShard), but the
owner never sends itself UpdateShard: its shard is the membership.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from paramserver.v1 import cluster_pb2 as cpb

from .. import codec
from ..checkpointer import Checkpointer
from ..core.errors import FailedPrecondition, InvalidArgument, NotFound
from ..core.placement import Placement, check_map
from ..core.registry import RunRegistry
from ..core.shard import ShardRun
from . import messages

__all__ = ["ShardService"]

log = logging.getLogger("ps_server")


class ShardService:
    def __init__(self, registry: RunRegistry, cluster: Sequence[str], index: int, data_port: Callable[[], int],
                 checkpointer: Checkpointer | None = None) -> None:
        self._registry = registry
        self._cluster = list(cluster)
        self._index = index
        self._data_port = data_port
        self._checkpointer = checkpointer

    async def Hello(self, request: cpb.HelloRequest) -> cpb.HelloResponse:
        return cpb.HelloResponse(index=self._index, cluster=self._cluster, data_port=self._data_port(),
                                 server_generation=self._registry.generation)

    async def CreateShard(self, request: cpb.CreateShardRequest) -> cpb.CreateShardResponse:
        shards = request.shard_map.shards
        if request.index != self._index or len(shards) != len(self._cluster) or \
                [s.address for s in shards] != self._cluster:
            raise FailedPrecondition(f"this server is {self._index} ({self._cluster[self._index]}) of the cluster, "
                                     f"not the shard {request.index} the request is for: check every server's "
                                     "--cluster and --index")
        spec = codec.spec_from_proto(request.spec, self._registry.limits)
        shard_map = messages.shard_map_from_proto(request.shard_map)
        try:
            check_map(shard_map, spec.params)
        except ValueError as exc:
            raise InvalidArgument(f"the shard map of {request.run_id} does not fit its spec: {exc}") from None
        run = await self._registry.create_shard(request.run_id, spec, Placement(shard_map, self._index),
                                                request.created.ToNanoseconds() / 1e9)
        log.info("holding shard %d of %s: %d bytes", self._index, run.run_id, run.store.nbytes,
                 extra={"run": run.run_id})
        return cpb.CreateShardResponse(data_port=self._data_port())

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
        return cpb.UpdateShardResponse(run_state=codec.run_state_to_proto(state))

    async def GetShard(self, request: cpb.GetShardRequest) -> cpb.GetShardResponse:
        run = self._registry.get(request.run_id)
        return cpb.GetShardResponse(status=messages.shard_status(run, self._cluster[self._index]))

    async def DeleteShard(self, request: cpb.DeleteShardRequest) -> cpb.DeleteShardResponse:
        try:
            self._registry.remove(request.run_id)
        except NotFound:
            pass
        if self._checkpointer is not None:
            await self._checkpointer.delete(request.run_id)
        return cpb.DeleteShardResponse()
