"""The cluster's messages to and from the core's values (as ``codec`` does for the contract)."""

from __future__ import annotations

import os
import resource
from collections.abc import Sequence

from paramserver.v1 import cluster_pb2 as cpb
from paramserver.v1 import paramserver_pb2 as pb

from .. import codec
from ..core.placement import Piece, ShardMap
from ..core.run import Run
from ..core.shard import RankUpdate
from ..core.status import RunState, WorkerState

__all__ = ["rank_updates", "rank_updates_from_proto", "rank_updates_to_proto", "rss_bytes", "run_state_from_proto",
           "shard_map_from_proto", "shard_map_to_proto", "shard_status", "worker_state_from_proto"]

_RUN_STATES = {codec.run_state_to_proto(s): s for s in RunState}
_WORKER_STATES = {codec.worker_state_to_proto(s): s for s in WorkerState}


def run_state_from_proto(state: int) -> RunState:
    return _RUN_STATES[state]  # type: ignore[index]


def worker_state_from_proto(state: int) -> WorkerState:
    return _WORKER_STATES[state]  # type: ignore[index]


def shard_map_to_proto(shard_map: ShardMap, addresses: Sequence[str], data_ports: Sequence[int],
                       shm_sockets: Sequence[str] = ()) -> pb.ShardMap:
    return pb.ShardMap(shards=[
        pb.Shard(index=i, address=addresses[i] if i < len(addresses) else "", data_port=data_ports[i] if i < len(data_ports) else 0,
                 shm_socket=shm_sockets[i] if i < len(shm_sockets) else "",
                 pieces=[pb.Piece(name=pc.name, row_start=pc.start, row_end=pc.end) for pc in pieces])
        for i, pieces in enumerate(shard_map.shards)
    ])


def shard_map_from_proto(m: pb.ShardMap) -> ShardMap:
    return ShardMap(tuple(tuple(Piece(pc.name, pc.row_start, pc.row_end) for pc in s.pieces) for s in m.shards))


def rank_updates(run: Run) -> list[RankUpdate]:
    """Every rank of ``run`` as its owner holds it."""
    return [RankUpdate(s.rank, s.incarnation, s.state, s.clock, s.worker_name, start=s.start) for s in run.clock.slots]


def rank_updates_to_proto(updates: Sequence[RankUpdate]) -> list[cpb.RankUpdate]:
    return [cpb.RankUpdate(rank=u.rank, incarnation=u.incarnation, state=codec.worker_state_to_proto(u.state),
                           clock=u.clock, worker_name=u.worker_name, lost_pushes=u.lost_pushes, start_clock=u.start)
            for u in updates]


def rank_updates_from_proto(updates: Sequence[cpb.RankUpdate], ranks: int) -> list[RankUpdate]:
    out = []
    for u in updates:
        if u.rank >= ranks or u.state not in _WORKER_STATES:
            raise ValueError(f"rank update {u.rank} (state {u.state}) does not fit a run of {ranks} ranks")
        out.append(RankUpdate(u.rank, u.incarnation, worker_state_from_proto(u.state), u.clock, u.worker_name,
                              u.lost_pushes, u.start_clock))
    return out


def rss_bytes() -> int:
    """This process's resident memory now (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def shard_status(run: Run, address: str) -> pb.ShardStatus:
    """This server's shard of ``run``, as GetShard answers (and GetRun shows server 0's)."""
    assert run.placement is not None
    return pb.ShardStatus(index=run.placement.index, address=address, reachable=True,
                          bytes_held=run.store.nbytes, min_clock=run.min_clock, max_clock=run.clock.max_clock,
                          pushes_applied=run.counters.pushes_applied, rss_bytes=rss_bytes(),
                          state=codec.run_state_to_proto(run.state),
                          error=run.message if run.state is RunState.FAILED else "", lineage=run.store.lineage,
                          held=run.held)
