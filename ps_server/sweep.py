"""The lease and retention sweep (``sweep``): the server's periodic task that evicts the ranks
whose lease ran out and forgets the finished runs past the retention limits.

It judges, it does not wait: what waits on other servers or on the disk (telling the other servers
of an eviction, deleting a forgotten run's checkpoints and shards) runs in tasks of the server's
``Background``, so a server that does not answer holds up no lease check. Server 0 of a cluster
sweeps for every shard; servers 1.. do not sweep. A stalled event loop postpones the sweep: its
heartbeats are queued, not missing.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .background import Background
from .checkpointer import Checkpointer
from .cluster.owner import ClusterOwner
from .config import ServerConfig
from .control import delete_run
from .core.registry import RunRegistry
from .core.run import Run

__all__ = ["servers_of", "sweep"]

log = logging.getLogger("ps_server")


async def sweep(registry: RunRegistry, config: ServerConfig, checkpointer: Checkpointer | None,
                 cluster: ClusterOwner | None, background: Background) -> None:
    """Evict workers whose lease expired; forget finished runs past the retention limits. What
    waits on other servers or on the disk (telling the other servers of an eviction, deleting a
    forgotten run) runs in tasks of its own (in ``background``): a server that does not answer
    holds up no lease check. (Servers 1.. of a cluster do neither: server 0 decides for every shard.)"""
    period = min(1.0, config.lease_seconds / 4)
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(period)
        if loop.time() - before > period + 0.5 * config.lease_seconds:
            # The event loop itself was stalled: heartbeats are queued, not missing. Let them in
            # before judging anyone.
            log.warning("event loop stalled for %.1fs; lease checks postponed", loop.time() - before - period)
            continue
        if config.peers and config.index:
            continue
        evicted = registry.expire_leases(config.lease_seconds)
        for run_id, rank in evicted:
            log.warning("evicted rank %d: lease expired", rank, extra={"run": run_id, "rank": rank})
        if cluster:  # every shard drops the ranks (each run's servers told at once; a Join handing a rank on
            # waits for them itself); a run deleted meanwhile has no one left to tell
            for run_id in dict.fromkeys(r for r, _ in evicted):
                if (run := registry.find(run_id)) is not None:
                    background.start(cluster.sync(run))
        # A run placed over another number of servers (a wrong --cluster) is not this cluster's to
        # delete: the servers it was created on resume it, and a server of it not in this cluster
        # would keep its shard for ever.
        for run in registry.prune(config.keep_finished_runs, config.keep_finished_seconds, time.time(),
                                  lambda run: servers_of(run) != max(1, len(config.peers))):
            background.start(_forget(run, checkpointer, cluster))  # (each apart: one waited for holds up no other)


def servers_of(run: Run) -> int:
    """How many servers ``run`` was placed over."""
    return len(run.placement.shard_map.shards) if run.placement else 1


async def _forget(run: Run, checkpointer: Checkpointer | None, cluster: ClusterOwner | None) -> None:
    """Delete the checkpoints, and the other servers' shards, of ``run``, forgotten (``RunRegistry.prune``)."""
    await delete_run(run, checkpointer, cluster)
    log.info("forgot %s (%s %.0fs ago): over the retention limits", run.run_id, run.state.value,
             time.time() - (run.finished or 0.0), extra={"run": run.run_id})
