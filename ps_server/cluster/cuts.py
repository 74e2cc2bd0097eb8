"""Server 0's side of a cluster's checkpoints: cuts, and which of them every server keeps.

Checkpoints are cluster-wide cuts (``core.checkpoint``): every server has the same --data-dir
setting and --checkpoint-every (CreateShard refuses otherwise) and snapshots its shard the moment
its min clock reaches each multiple; CheckpointRun (``checkpoint``) picks the next clock no shard
has reached yet and waits until every server has its snapshot there. ``Cuts`` owns what server 0
last heard of every server's cuts on disk and told it to keep (GetShard.keep_cuts), and picks the
cuts kept from them (``keep_common_cut``): the cluster can always go back to one (``recovery``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from paramserver.v1 import cluster_pb2 as cpb

from ..checkpointer import Checkpointer
from ..core.errors import FailedPrecondition
from ..core.registry import RunRegistry
from ..core.run import Run
from ..core.status import RunState
from .shards import CUT_WAIT as _CUT_WAIT

if TYPE_CHECKING:  # (the links are gRPC's; this module is not)
    from .peers import PeerLink

__all__ = ["Cuts"]


class Cuts:
    def __init__(self, registry: RunRegistry, peers: Sequence[PeerLink], checkpointer: Checkpointer | None, *,
                 call_timeout: float) -> None:
        """``peers``: links to servers 1.. in index order."""
        self._registry = registry
        self._peers = list(peers)
        self._checkpointer = checkpointer
        self._timeout = call_timeout
        self._cuts: dict[tuple[str, int], list[int]] = {}
        """(run id, server) -> the cuts of its checkpoints on disk, as last heard."""
        self._told: dict[tuple[str, int], tuple[int, ...]] = {}
        """(run id, server) -> the cuts it was last told to keep (GetShard.keep_cuts) and answered."""

    def keep(self, run_id: str) -> tuple[int, ...]:
        """The cuts every server is to keep of ``run_id`` (GetShard.keep_cuts)."""
        return self._checkpointer.protected.get(run_id, ()) if self._checkpointer else ()

    def heard(self, key: tuple[str, int], cuts: Sequence[int], keep: Sequence[int]) -> None:
        """Server ``key[1]`` has ``cuts`` of run ``key[0]`` on disk, and answered a GetShard that told it ``keep``."""
        self._cuts[key] = list(cuts)
        self._told[key] = tuple(keep)

    def went_back(self, run_id: str, cut: int) -> None:
        """Every server went back to ``cut`` of ``run_id`` (``recovery``)."""
        for peer in self._peers:
            self._told[(run_id, peer.index)] = (cut,)  # (each keeps the cut it went back to: ``restore``)

    def forget(self, key: tuple[str, int]) -> None:
        for table in (self._cuts, self._told):
            table.pop(key, None)

    async def _cut(self, run: Run, peer: PeerLink, cut: int, reason: str) -> cpb.CheckpointShardResponse:
        return await peer.call("CheckpointShard", cpb.CheckpointShardRequest(run_id=run.run_id, cut=cut, reason=reason),
                               cpb.CheckpointShardResponse, _CUT_WAIT + self._timeout)

    async def checkpoint(self, run: Run, reason: str) -> tuple[Path, int]:
        """A cluster checkpoint of ``run``: every server's snapshot at the next clock none of them
        has reached (or at the end, for a finished run); raises the first refusal (the snapshots
        already written stay: they do no harm), NotFound if the run was deleted while they were asked
        where they are."""
        assert self._checkpointer is not None
        cut = run.min_clock
        if run.state is RunState.RUNNING:  # (one that has not started, or has ended, is still)
            statuses = await asyncio.gather(*(peer.call("GetShard", cpb.GetShardRequest(run_id=run.run_id),
                                                        cpb.GetShardResponse, self._timeout) for peer in self._peers))
            cut = max([cut, *(r.status.min_clock for r in statuses)]) + 1
            self._registry.get(run.run_id)  # NotFound if deleted meanwhile: its snapshot would bring it back
        own = asyncio.ensure_future(self._checkpointer.checkpoint_at(run, cut, reason, _CUT_WAIT))
        try:
            await asyncio.gather(own, *(self._cut(run, peer, cut, reason) for peer in self._peers))
        except TimeoutError:
            raise FailedPrecondition(f"{run.run_id} did not reach clock {cut} within {_CUT_WAIT:g}s (it is at min "
                                     f"clock {run.min_clock}): the run is not moving; try again when it is") from None
        return own.result()

    def keep_common_cut(self, run: Run) -> None:
        """Every server keeps its checkpoints of the newest cut all have on disk and of the newest
        one of those kept so far that all still have (its next GetShard says so; this server keeps
        both from now, the others from then, so that one is kept everywhere all along): the
        cluster can always go back to one. The cuts kept change only once every server has been
        told the current ones (a server not told yet keeps the older ones, or, before any, its
        first cut: ``Checkpointer``)."""
        if self._checkpointer is None:
            return
        keys = [(run.run_id, peer.index) for peer in self._peers]
        heard = [self._cuts.get(key) for key in keys]
        kept = self._checkpointer.protected.get(run.run_id, ())
        if any(h is None for h in heard) or any(self._told.get(key) != kept for key in keys):
            return
        common = set(self._checkpointer.store.cuts(run.run_id)).intersection(*heard)  # type: ignore[arg-type]
        if common and (not kept or max(common) != kept[0]):
            newest, still = max(common), [c for c in kept if c in common]  # (kept everywhere since told)
            older = max(still) if still else min(common - {0} or common)  # (none yet: the first periodic cut, or 0)
            self._checkpointer.protected[run.run_id] = (newest, older) if older != newest else (newest,)
