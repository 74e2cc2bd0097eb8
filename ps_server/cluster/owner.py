"""Server 0 of a cluster: creates each run's shards, keeps their ranks as its own, watches them.

- ``create_run`` places the run's tensors (``core.placement``), builds its own shard, has every
  other server create its own, and registers the run only when all have: no worker can join a
  run some server lacks. If one fails, those created are deleted and CreateRun fails, naming it.
- ``sync`` sends a run's membership (every rank's incarnation, state and clock, and the run's
  state) to every other server, each in order, and waits for their answers; Join, Leave, StopRun
  and the lease sweep call it before they answer, so an eviction reaches every shard before the
  rank is handed to another worker, and an admitted incarnation is known everywhere before its
  worker hears of it. ``watch`` sends it again whenever a shard's copy differs (a late or lost
  update, a restarted server).
- ``watch`` also asks every server for its shard's status each ``poll`` seconds (GetRun shows
  them). A shard that failed (its parameters diverged) fails the run with its message; a server
  that does not answer for ``shard_timeout`` seconds, or has lost its shard (restarted without a
  checkpoint), fails the runs it held shards of, naming it. Nothing waits on a dead server longer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Callable, Sequence

from paramserver.v1 import cluster_pb2 as cpb
from paramserver.v1 import paramserver_pb2 as pb

from .. import codec
from ..core.errors import NotFound, PsError, ResourceExhausted
from ..core.placement import Placement, place
from ..core.registry import RunRegistry
from ..core.run import Run
from ..core.spec import RunSpec
from ..core.status import RunState
from . import messages
from .peers import PeerLink

__all__ = ["ClusterOwner"]

log = logging.getLogger("ps_server")

_RATE_WINDOW = 5
"""Status samples a shard's pushes per second are measured over (one per poll)."""


class ClusterOwner:
    def __init__(self, registry: RunRegistry, addresses: Sequence[str], peers: Sequence[PeerLink], *,
                 split_bytes: int, shard_timeout: float, data_port: Callable[[], int], poll: float = 1.0,
                 call_timeout: float = 5.0) -> None:
        """``peers``: links to servers 1.. in index order."""
        self._registry = registry
        self.addresses = list(addresses)
        self._peers = list(peers)
        self._split_bytes = split_bytes
        self._shard_timeout = shard_timeout
        self._data_port = data_port
        self._poll = poll
        self._timeout = call_timeout
        self._ports = [0] * len(self.addresses)
        self._sent: dict[tuple[str, int], tuple[object, ...]] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._status: dict[tuple[str, int], pb.ShardStatus] = {}
        self._samples: dict[tuple[str, int], collections.deque[tuple[float, int]]] = {}
        self._silent_since: dict[int, float] = {}

    # ------------------------------------------------------------------------------ runs
    async def create_run(self, spec: RunSpec) -> Run:
        placement = Placement(place(spec.params, len(self.addresses), self._split_bytes), 0)
        for i, nbytes in enumerate(placement.shard_map.bytes_held(spec.params)):
            if nbytes > self._registry.max_param_bytes:  # (every server has its own limit; this is ours)
                raise ResourceExhausted(f"server {i}'s shard of the run would take {nbytes} bytes, over the limit "
                                        f"of {self._registry.max_param_bytes}: ask for less, or use more servers "
                                        "(ps-server --max-param-bytes, --cluster)")
        run = await self._registry.build(f"run-{uuid.uuid4().hex[:8]}", spec, placement)
        created = codec.ts(run.created)
        shard_map = self.shard_map(run)
        results = await asyncio.gather(*(
            peer.call("CreateShard", cpb.CreateShardRequest(run_id=run.run_id, spec=codec.spec_to_proto(spec),
                                                            shard_map=shard_map, index=peer.index, created=created),
                      cpb.CreateShardResponse, 4 * self._timeout, wait_for_ready=True)
            for peer in self._peers), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.delete(run.run_id)
            raise failed[0]
        for peer, resp in zip(self._peers, results, strict=True):
            assert isinstance(resp, cpb.CreateShardResponse)
            self._ports[peer.index] = resp.data_port
        return self._registry.add(run)

    def shard_map(self, run: Run) -> pb.ShardMap:
        """``run``'s shard map with every server's address and TCP data plane port as last heard."""
        assert run.placement is not None
        self._ports[0] = self._data_port()
        return messages.shard_map_to_proto(run.placement.shard_map, self.addresses, self._ports)

    async def delete(self, run_id: str) -> None:
        """Have every other server forget its shard (best effort: a server that does not answer
        keeps it until it is deleted again)."""
        results = await asyncio.gather(*(peer.call("DeleteShard", cpb.DeleteShardRequest(run_id=run_id),
                                                   cpb.DeleteShardResponse, self._timeout) for peer in self._peers),
                                       return_exceptions=True)
        for peer, r in zip(self._peers, results, strict=True):
            if isinstance(r, BaseException):
                log.warning("%s kept its shard of %s: %s", peer.name, run_id, r, extra={"run": run_id})
            self._forget(run_id, peer.index)
        self._forget(run_id, 0)

    def _forget(self, run_id: str, index: int) -> None:
        for table in (self._sent, self._locks, self._status, self._samples):
            table.pop((run_id, index), None)

    # ------------------------------------------------------------------------------ membership
    async def sync(self, run: Run, timeout: float | None = None) -> None:
        """Send ``run``'s membership to every server whose copy differs; wait for their answers
        (at most ``timeout`` seconds; a server that does not answer gets it from ``watch``)."""
        if not self._peers:
            return
        sends = [asyncio.ensure_future(self._send(run, peer)) for peer in self._peers]
        done, _ = await asyncio.wait(sends, timeout=timeout or self._timeout)
        for task in done:
            if task.exception() is not None:
                log.info("membership of %s not yet on a server: %s", run.run_id, task.exception(),
                         extra={"run": run.run_id})

    async def _send(self, run: Run, peer: PeerLink) -> None:
        key = (run.run_id, peer.index)
        async with self._locks.setdefault(key, asyncio.Lock()):
            ranks = messages.rank_updates(run)  # as it is now, not as it was when this send was asked
            copy = (tuple(ranks), run.state, run.message)
            if self._sent.get(key) == copy:
                return
            await peer.call("UpdateShard", cpb.UpdateShardRequest(
                run_id=run.run_id, ranks=messages.rank_updates_to_proto(ranks),
                run_state=codec.run_state_to_proto(run.state), message=run.message), cpb.UpdateShardResponse,
                self._timeout)
            self._sent[key] = copy

    # ------------------------------------------------------------------------------ status
    def statuses(self, run: Run) -> list[pb.ShardStatus]:
        """Every shard's status: this server's now, the others' as last heard."""
        own = messages.shard_status(run, self.addresses[0])
        own.pushes_per_second = self._rate((run.run_id, 0))
        out = [own]
        assert run.placement is not None
        held = run.placement.shard_map.bytes_held(run.spec.params)
        for peer in self._peers:
            status = self._status.get((run.run_id, peer.index))
            out.append(status if status is not None else pb.ShardStatus(
                index=peer.index, address=peer.address, reachable=False, error="not heard from yet",
                bytes_held=held[peer.index]))
        return out

    def _rate(self, key: tuple[str, int]) -> float:
        samples = self._samples.get(key)
        if not samples or len(samples) < 2 or samples[-1][0] <= samples[0][0]:
            return 0.0
        return (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])

    def _sample(self, key: tuple[str, int], pushes: int) -> None:
        self._samples.setdefault(key, collections.deque(maxlen=_RATE_WINDOW)).append((time.monotonic(), pushes))

    async def watch(self) -> None:
        """Forever: each ``poll`` seconds, every server's shard of every run, as the module says."""
        while True:
            await asyncio.sleep(self._poll)
            runs = [r for r in self._registry.runs() if r.placement is not None and
                    (not r.state.finished or any((r.run_id, p.index) not in self._sent for p in self._peers))]
            for run in runs:
                self._sample((run.run_id, 0), run.counters.pushes_applied)
            await asyncio.gather(*(self._check(peer, runs) for peer in self._peers))

    async def _check(self, peer: PeerLink, runs: list[Run]) -> None:
        now = time.monotonic()
        for run in runs:
            key = (run.run_id, peer.index)
            try:
                await self._send(run, peer)
                resp = await peer.call("GetShard", cpb.GetShardRequest(run_id=run.run_id), cpb.GetShardResponse,
                                       self._timeout)
            except NotFound:
                self._fail(run, f"{peer.name} no longer holds its shard of the run (it restarted without a "
                                "checkpoint): the parameters it held are lost")
                continue
            except PsError as exc:
                since = self._silent_since.setdefault(peer.index, now)
                old = self._status.get(key)
                assert run.placement is not None
                self._status[key] = pb.ShardStatus(
                    index=peer.index, address=peer.address, reachable=False, error=f"{exc} (for {now - since:.0f}s)",
                    bytes_held=run.placement.shard_map.bytes_held(run.spec.params)[peer.index],
                    min_clock=old.min_clock if old else 0, max_clock=old.max_clock if old else 0,
                    pushes_applied=old.pushes_applied if old else 0,
                    state=old.state if old else pb.RUN_STATE_UNSPECIFIED)
                if now - since > self._shard_timeout:
                    self._fail(run, f"{peer.name} has not answered for {now - since:.0f}s (--shard-timeout "
                                    f"{self._shard_timeout:g}): its shard of the run is out of reach ({exc})")
                return  # the next run would wait as long again
            self._silent_since.pop(peer.index, None)
            self._sample(key, resp.status.pushes_applied)
            resp.status.pushes_per_second = self._rate(key)
            self._status[key] = resp.status
            if resp.status.state == pb.RUN_STATE_FAILED and not run.state.finished:
                self._fail(run, f"{peer.name}'s shard failed: {resp.status.error}")

    def _fail(self, run: Run, message: str) -> None:
        if run.state.finished:
            return
        log.error("%s failed: %s", run.run_id, message, extra={"run": run.run_id})
        run.stop(message, RunState.FAILED)
        self._registry.vacated()
