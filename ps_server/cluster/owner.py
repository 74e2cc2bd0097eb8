"""Server 0 of a cluster: creates each run's shards, keeps their ranks as its own, watches them.

- ``create_run`` places the run's tensors (``core.placement``), builds its own shard, has every
  other server create its own, and registers the run only when all have: no worker can join a
  run some server lacks. If one fails, those created are deleted and CreateRun fails, naming it;
  so they are when CreateRun is cancelled meanwhile (its caller's deadline passed while a server
  was slow to create its shard): no shard outlives a run that was never registered.
- ``delete`` has every other server delete its shard; one that does not answer is told again by
  ``watch`` each poll until it does (``deletions``: kept on disk, so a restart does not forget).
- ``sync`` sends a run's membership (every rank's incarnation, state and clock, and the run's
  state) to every other server, each in order, and waits for their answers; Join, Leave, StopRun
  and the lease sweep call it before they answer, so an eviction reaches every shard before the
  rank is handed to another worker, and an admitted incarnation is known everywhere before its
  worker hears of it. ``watch`` sends it again whenever a shard's copy differs (a late or lost
  update, a restarted server). A BSP shard that had combined clocks past a rank's hand-over (a
  torn push completed them there) admits it after them; server 0 then starts it there too and
  tells the others before Join answers (``_started_later``): every server holds it from one clock.
- ``watch`` also asks every server for its shard's status each ``poll`` seconds (GetRun shows
  them; a finished run's final status is not asked again, but a server that stops answering shows
  as unreachable in every run's status, and one with nothing to be asked about is probed). A
  shard that failed (its parameters diverged) fails the run with its message; a server
  that does not answer for ``shard_timeout`` seconds, or has lost its shard (restarted without a
  checkpoint), fails the runs it held shards of, naming it. Nothing waits on a dead server longer.
- A push is applied by each server on its own: ``watch`` compares the clocks every shard has of
  the ranks that stopped (evicted or done) with this server's, says in the run's events when a
  push reached some servers only, and tells a shard to go on without a done rank's pushes it will
  never get (``_torn_pushes``), which it would otherwise wait for for ever. A rank handed over
  before that is compared by the clocks its replaced incarnation ended at (``_torn_replaced``).
- Checkpoints are cluster-wide cuts (``cuts``), and a server that restarts from one has the run
  go back to the newest cut every server has (``recovery``): ``watch`` hears of both each poll.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from paramserver.v1 import cluster_pb2 as cpb
from paramserver.v1 import paramserver_pb2 as pb

from .. import codec
from ..background import Background
from ..checkpointer import Checkpointer
from ..core.errors import NotFound, PsError, ResourceExhausted
from ..core.placement import Placement, place
from ..core.registry import RunRegistry
from ..core.run import Run
from ..core.shard import RankUpdate
from ..core.spec import RunSpec
from ..core.status import RunState, WorkerState
from . import messages
from .cuts import Cuts
from .deletions import Undelivered
from .recovery import Recovery

if TYPE_CHECKING:  # (the links are gRPC's; this module is not)
    from .peers import PeerLink

__all__ = ["ClusterOwner"]

log = logging.getLogger("ps_server")

_FINISHED = (pb.RUN_STATE_COMPLETED, pb.RUN_STATE_STOPPED, pb.RUN_STATE_FAILED)

BUILD_SECONDS_PER_GIB = 30.0
"""How long CreateShard may take per GiB of the shard beyond the usual wait: drawing initial values
takes ~8 s per GiB on one core (the SDK's CreateRun deadline grows as much per GiB of the model)."""

_RATE_WINDOW = 5
"""Status samples a shard's pushes per second are measured over (one per poll)."""


def _stopped_mid_push(rank: int, incarnation: int, peer: str, theirs: int, ours: int) -> str:
    """The run's event for an incarnation ``peer`` has at clock ``theirs`` and server 0 at ``ours``."""
    return (f"rank {rank} (incarnation {incarnation}) stopped in the middle of a push: {peer} has it at clock "
            f"{theirs}, server 0 at {ours}; each server applies its part of a push by itself, so the gradient of "
            f"clock {min(theirs, ours)} was applied on some only")


class ClusterOwner:
    def __init__(self, registry: RunRegistry, addresses: Sequence[str], peers: Sequence[PeerLink], *,
                 split_bytes: int, shard_timeout: float, data_port: Callable[[], int],
                 shm_socket: Callable[[], str] = lambda: "",
                 checkpointer: Checkpointer | None = None, undelivered: Undelivered | None = None,
                 poll: float = 1.0, call_timeout: float = 5.0, lease: float = 10.0,
                 background: Background | None = None) -> None:
        """``peers``: links to servers 1.. in index order; ``undelivered``: the deletions not yet
        delivered (kept in server 0's --data-dir; default: in memory); ``lease``: --lease-seconds;
        ``background``: where deletions go on after their caller gave up (``create_run``)."""
        self._registry = registry
        self.addresses = list(addresses)
        self._peers = list(peers)
        self._split_bytes = split_bytes
        self._shard_timeout = shard_timeout
        self._data_port = data_port
        self._shm_socket = shm_socket
        self._poll = poll
        self._timeout = call_timeout
        self._lease = lease
        self._ports = [0] * len(self.addresses)
        self._shm = [""] * len(self.addresses)
        self._sent: dict[tuple[str, int], tuple[tuple[RankUpdate, ...], RunState, str]] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._status: dict[tuple[str, int], pb.ShardStatus] = {}
        self._samples: dict[tuple[str, int], collections.deque[tuple[float, int]]] = {}
        self._background = background if background is not None else Background()
        self._gone: set[tuple[str, int]] = set()
        """(run id, server)s that answered they do not hold their shard (restarted without it): a
        finished run's is not asked again."""
        self._silent_since: dict[int, tuple[float, PsError]] = {}
        """server -> since when it has not answered, and its last error."""
        self._checkpointer = checkpointer
        self._undelivered = undelivered if undelivered is not None else Undelivered()
        self.cuts = Cuts(registry, peers, checkpointer, call_timeout=call_timeout)
        self._torn: dict[tuple[str, int], set[tuple[int, int]]] = {}
        """(run id, server) -> the (rank, incarnation)s whose push was found torn there (told once)."""
        self._lost: dict[tuple[str, int], dict[int, tuple[int, int]]] = {}
        """(run id, server) -> rank -> (incarnation, clock) of a DONE rank whose pushes up to that clock
        the server never got and never will: it is told to go on without them (``RankUpdate.lost_pushes``)."""
        self.recovery = Recovery(registry, peers, checkpointer, self.cuts, call_timeout=call_timeout,
                                 shard_timeout=shard_timeout, sync=self.sync, fail=self._fail, unsent=self._unsent)

    # ------------------------------------------------------------------------------ runs
    async def create_run(self, spec: RunSpec) -> Run:
        placement = Placement(place(spec.params, len(self.addresses), self._split_bytes), 0)
        try:  # each server checks its own shard against its own --max-param-bytes (CreateShard, the others)
            run = await self._registry.build(f"run-{uuid.uuid4().hex[:8]}", spec, placement)
        except ResourceExhausted as exc:  # named as a peer's refusal is (``PeerLink``)
            raise ResourceExhausted(f"server 0 ({self.addresses[0]}): {exc}", exc.reason) from None
        try:
            return await self._create_shards(run, spec, placement)
        finally:  # (a no-op once added) it counts against --max-total-bytes until added or abandoned
            self._registry.abandon(run)

    async def _create_shards(self, run: Run, spec: RunSpec, placement: Placement) -> Run:
        """Have every other server create its shard of ``run``, then register it (this one's)."""
        created = codec.ts(run.created)
        shard_map = self.shard_map(run)
        held = placement.shard_map.bytes_held(spec.params)

        def create(peer: PeerLink) -> Awaitable[cpb.CreateShardResponse]:
            request = cpb.CreateShardRequest(
                run_id=run.run_id, spec=codec.spec_to_proto(spec), shard_map=shard_map, index=peer.index,
                created=created, checkpoints=self._checkpointer is not None,
                checkpoint_every=self._checkpointer.every if self._checkpointer else 0)
            # As long as any call for one that does not answer (the error names it, before CreateRun's
            # caller gives up), and the time to draw its shard's values for one that does.
            wait = self._timeout + BUILD_SECONDS_PER_GIB * held[peer.index] / (1 << 30)
            return peer.call("CreateShard", request, cpb.CreateShardResponse, wait, wait_for_ready=True)

        try:
            results = await asyncio.gather(*(create(peer) for peer in self._peers), return_exceptions=True)
        except asyncio.CancelledError:  # CreateRun's caller gave up (its deadline) while a server was slow:
            await self._background.landed(self.delete(run.run_id))  # the shards created meanwhile go too
            raise
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.delete(run.run_id)
            raise failed[0]
        for peer, resp in zip(self._peers, results, strict=True):
            assert isinstance(resp, cpb.CreateShardResponse)
            self._ports[peer.index], self._shm[peer.index] = resp.data_port, resp.shm_socket
        return self._registry.add(run)

    def shard_map(self, run: Run) -> pb.ShardMap:
        """``run``'s shard map with every server's address and TCP data plane port as last heard."""
        assert run.placement is not None
        self._ports[0], self._shm[0] = self._data_port(), self._shm_socket()
        return messages.shard_map_to_proto(run.placement.shard_map, self.addresses, self._ports, self._shm)

    async def delete(self, run_id: str) -> None:
        """Have every other server forget its shard; one that does not answer is told again each
        poll until it does (``deletions``), and so is one that had not answered when this was
        cancelled (a stop; it may never have heard)."""
        calls = [(peer, asyncio.ensure_future(peer.call("DeleteShard", cpb.DeleteShardRequest(run_id=run_id),
                                                        cpb.DeleteShardResponse, self._timeout)))
                 for peer in self._peers]
        try:
            if calls:
                await asyncio.wait([call for _, call in calls])
        finally:  # (cancelled too: ``add`` notes them in memory before it awaits the disk)
            missed = []
            for peer, call in calls:
                if not call.done() or call.cancelled():
                    call.cancel()
                    why: object = "no answer before the deletion was cancelled"
                else:
                    why = call.exception()
                if why is not None:
                    log.warning("%s still holds its shard of %s (%s): it is told again when it answers", peer.name,
                                run_id, why, extra={"run": run_id})
                    missed.append(peer.index)
                self._forget(run_id, peer.index)
            self._forget(run_id, 0)
            await self._undelivered.add(run_id, missed)

    async def _deliver(self, peer: PeerLink) -> None:
        """Tell ``peer`` of the deletions it missed, oldest first, until one fails (the next poll
        goes on from there)."""
        for run_id in self._undelivered.runs(peer.index):
            try:
                await peer.call("DeleteShard", cpb.DeleteShardRequest(run_id=run_id), cpb.DeleteShardResponse,
                                self._timeout)
            except PsError:
                return
            log.info("%s deleted its shard of %s, deleted earlier while it did not answer", peer.name, run_id,
                     extra={"run": run_id})
            await self._undelivered.done(run_id, peer.index)

    def _deleted(self, run_id: str, index: int) -> bool:
        """True, and what is kept of ``run_id`` for server ``index`` forgotten, if the run was
        deleted: an answer of that server that came after ``delete`` forgot the run would keep an
        entry of it for as long as this server runs."""
        if self._registry.find(run_id) is not None:
            return False
        self._forget(run_id, index)
        return True

    def _forget(self, run_id: str, index: int) -> None:
        for table in (self._sent, self._locks, self._status, self._samples, self._torn, self._lost):
            table.pop((run_id, index), None)
        self.cuts.forget((run_id, index))
        self._gone.discard((run_id, index))

    # ------------------------------------------------------------------------------ membership
    async def sync(self, run: Run, timeout: float | None = None) -> None:
        """Send ``run``'s membership to every server whose copy differs; wait for their answers
        (at most ``timeout`` seconds; a server that does not answer gets it from ``watch``). A
        rank one of them starts later than this server handed it over at (``_started_later``)
        starts there here too, and the others are told before this returns: Join answers with
        the clock every server holds the rank from."""
        if not self._peers:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self._timeout)
        while True:
            sends = {asyncio.ensure_future(self._send(run, peer)): peer for peer in self._peers}
            done, pending = await asyncio.wait(sends, timeout=max(0.0, deadline - loop.time()))
            for task in done:
                if task.exception() is not None:
                    log.info("membership of %s not yet on a server: %s", run.run_id, task.exception(),
                             extra={"run": run.run_id})
            if pending:  # (its send goes on; a worker's pulls there wait for it: ``ShardRun.wait_pull``)
                log.warning("membership of %s not yet on %s: no answer within %.1fs", run.run_id,
                            ", ".join(sends[task].name for task in pending), timeout or self._timeout,
                            extra={"run": run.run_id})
            if not any(task.exception() is None and task.result() for task in done):
                return

    async def _send(self, run: Run, peer: PeerLink) -> bool:
        """Send ``run``'s membership to ``peer`` if its copy differs; True when its answer moved a
        rank's start here (the other servers are to learn it)."""
        key = (run.run_id, peer.index)
        try:
            async with self._locks.setdefault(key, asyncio.Lock()):
                lost = self._lost.get(key, {})
                ranks = [dataclasses.replace(u, lost_pushes=True) if lost.get(u.rank) == (u.incarnation, u.clock) else u
                         for u in messages.rank_updates(run)]  # as it is now, not as it was when this send was asked
                copy = (tuple(ranks), run.state, run.message)
                if self._sent.get(key) == copy:
                    return False
                resp = await peer.call("UpdateShard", cpb.UpdateShardRequest(
                    run_id=run.run_id, ranks=messages.rank_updates_to_proto(ranks),
                    run_state=codec.run_state_to_proto(run.state), message=run.message), cpb.UpdateShardResponse,
                    self._timeout)
                self._sent[key] = copy
                self._torn_replaced(run, peer, resp.replaced)
                return self._started_later(run, peer, ranks, resp.start_clocks)
        finally:  # (the run deleted while this awaited: ``delete`` forgot its entries already, or will)
            self._deleted(run.run_id, peer.index)

    def _torn_replaced(self, run: Run, peer: PeerLink, replaced: Sequence[cpb.ReplacedRank]) -> None:
        """``_torn_pushes`` for the incarnations ``peer`` says it replaced (their last clock there):
        a rank handed over before ``watch`` compared its clocks (a worker waiting in Join takes it
        the moment it is evicted) is compared here."""
        if self._registry.find(run.run_id) is not run or run.state.finished:
            return
        told = self._torn.setdefault((run.run_id, peer.index), set())
        for r in replaced:
            ours = run.clock.slots[r.rank].replaced if r.rank < len(run.clock.slots) else None
            if ours is None or ours[0] != r.incarnation or ours[1] == r.clock or (r.rank, r.incarnation) in told:
                continue
            told.add((r.rank, r.incarnation))
            why = _stopped_mid_push(r.rank, r.incarnation, peer.name, r.clock, ours[1])
            if any(e.kind == "torn_push" and e.message == why for e in run.history.events):
                continue  # (said before this server restarted: the checkpoint kept the event and ``replaced``)
            run.history.event("torn_push", r.rank, why)
            log.warning("%s", why, extra={"run": run.run_id, "rank": r.rank})

    def _started_later(self, run: Run, peer: PeerLink, sent: Sequence[RankUpdate], starts: Sequence[int]) -> bool:
        """A BSP shard admits a rank after the clocks it had combined already (a push of one
        reached it and not this server: its worker stopped in the middle of it, or its push here
        is still on its way), as those take no more gradients; the rank then starts there on
        this server too (its clocks below count as completed without its pushes), and the run's
        events say so. Else the worker's pulls would get two guaranteed clocks for ever, one
        from this server and one from ``peer``, and never be answered. True when a start moved."""
        if self._registry.find(run.run_id) is not run or len(starts) != len(sent):
            return False  # (gone back to a checkpoint meanwhile: its ranks are the checkpoint's)
        moved = False
        for u in sent:
            start = starts[u.rank]
            if u.state is not WorkerState.ACTIVE or start <= u.clock:  # (the rank is there already)
                continue
            clocks = f"clock {u.clock}" if start == u.clock + 1 else f"clocks {u.clock}..{start - 1}"
            why = (f"rank {u.rank} (incarnation {u.incarnation}) starts at clock {start} on every server, not "
                   f"{u.clock}: {peer.name} had already combined {clocks}, which take no more gradients (a push that "
                   f"a worker stopped in the middle of reached {peer.name} and not server 0: the servers that lack "
                   f"it combine {clocks} without it)")
            if run.start_later(u.rank, u.incarnation, start, "torn_push", why):
                moved = True
                log.warning("%s", why, extra={"run": run.run_id, "rank": u.rank})
        return moved

    # ------------------------------------------------------------------------------ status
    def statuses(self, run: Run) -> list[pb.ShardStatus]:
        """Every shard's status: this server's now, the others' as last heard."""
        own = messages.shard_status(run, self.addresses[0])
        own.pushes_per_second = self._rate((run.run_id, 0))
        out = [own]
        assert run.placement is not None
        held = run.placement.shard_map.bytes_held(run.spec.params)
        for peer in self._peers[: len(held) - 1]:  # (a run of another cluster size fails at start)
            status = self._status.get((run.run_id, peer.index))
            silent = self._silent_since.get(peer.index)
            if status is None:
                status = pb.ShardStatus(index=peer.index, address=peer.address, reachable=False,
                                        error="not heard from yet", bytes_held=held[peer.index])
            elif status.reachable and silent is not None:  # (a finished run's, as last heard: not asked again)
                heard, status = status, pb.ShardStatus()
                status.CopyFrom(heard)
                status.reachable, status.error = False, self._silence(silent)
            out.append(status)
        return out

    @staticmethod
    def _silence(silent: tuple[float, PsError]) -> str:
        since, exc = silent
        return f"{exc} (for {time.monotonic() - since:.0f}s)"

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
            try:
                await self._poll_once()
            except Exception:  # (a bug here must not end the watch: nothing else would notice)
                log.exception("watching the cluster's servers failed this time; trying again")

    async def _poll_once(self) -> None:
        runs = [r for r in self._registry.runs() if r.placement is not None and
                len(r.placement.shard_map.shards) == len(self.addresses) and
                (not r.state.finished or not all(self._settled(r, p) for p in self._peers))]
        for run in runs:
            self._sample((run.run_id, 0), run.counters.pushes_applied)
        await asyncio.gather(*(self._check(peer, runs) for peer in self._peers),
                             *(self._deliver(peer) for peer in self._peers))
        for run in runs:
            self.cuts.keep_common_cut(run)
        await self.recovery.poll()

    def _settled(self, run: Run, peer: PeerLink) -> bool:
        """``peer`` has this finished run's end, and its final status is here (no need to ask again)."""
        key = (run.run_id, peer.index)
        status = self._status.get(key)
        return (key in self._sent or key in self._gone) and status is not None and status.state in _FINISHED

    async def _check(self, peer: PeerLink, runs: list[Run]) -> None:
        now = time.monotonic()
        if not runs:  # none to ask about (finished ones are not asked again): whether it answers at all
            try:
                await peer.probe(self._timeout)
            except PsError as exc:
                self._silent_since[peer.index] = (self._silent_since.get(peer.index, (now, exc))[0], exc)
            else:
                self._silent_since.pop(peer.index, None)
            return
        for i, run in enumerate(runs):
            key = (run.run_id, peer.index)
            try:
                await self._send(run, peer)
                keep = self.cuts.keep(run.run_id)
                resp = await peer.call("GetShard", cpb.GetShardRequest(run_id=run.run_id, keep_cuts=keep),
                                       cpb.GetShardResponse, self._timeout)
            except NotFound:
                if self._deleted(run.run_id, peer.index):  # (not lost: deleted meanwhile)
                    continue
                gone = f"{peer.name} no longer holds its shard of the run (it restarted without a checkpoint)"
                self._fail(run, f"{gone}: the parameters it held are lost")
                assert run.placement is not None
                self._gone.add(key)
                self._status[key] = pb.ShardStatus(
                    index=peer.index, address=peer.address, reachable=True, error=gone,
                    bytes_held=run.placement.shard_map.bytes_held(run.spec.params)[peer.index],
                    state=codec.run_state_to_proto(run.state))
                self._silent_since.pop(peer.index, None)
                continue
            except PsError as exc:
                since = self._silent_since.get(peer.index, (now, exc))[0]
                self._silent_since[peer.index] = (since, exc)
                for silent in runs[i:]:  # not asked again this time (each would wait as long): out of reach too
                    self._out_of_reach(silent, peer, exc, now - since)
                return
            self._silent_since.pop(peer.index, None)
            self._ports[peer.index], self._shm[peer.index] = resp.data_port, resp.shm_socket
            if self._deleted(run.run_id, peer.index):  # (while it answered)
                continue
            self.cuts.heard(key, resp.cuts, keep)
            if resp.resumed and not run.state.finished:
                self.recovery.restarted(run.run_id, f"{peer.name} restarted")
            self._sample(key, resp.status.pushes_applied)
            resp.status.pushes_per_second = self._rate(key)
            self._status[key] = resp.status
            if resp.status.state == pb.RUN_STATE_FAILED and not run.state.finished:
                self._fail(run, f"{peer.name}'s shard failed: {resp.status.error}")
            elif self._torn_pushes(run, peer, resp.clocks):
                await self._send(run, peer)

    def _torn_pushes(self, run: Run, peer: PeerLink, clocks: Sequence[int]) -> bool:
        """Compare ``peer``'s clocks of the ranks that no longer push (``clocks``, heard after it had
        their state: ``_check`` sends first) with this server's. A push is applied by each server
        on its own, so a worker that stops in the middle of one leaves it on some servers only: the
        run's events say so, once (a server 0 restarted from a checkpoint that holds the event does
        not say it again). A DONE rank's pushes ``peer`` lacks, once its worker has been silent for
        a lease, are lost: ``peer`` is to go on without them (True: tell it now), or it would wait
        for them for ever."""
        key = (run.run_id, peer.index)
        sent = self._sent.get(key)
        if sent is None or run.state.finished or len(clocks) != len(run.clock.slots):
            return False
        told = self._torn.setdefault(key, set())
        lost = False
        for u in sent[0]:
            slot, theirs = run.clock.slots[u.rank], clocks[u.rank]
            if theirs == u.clock or u.state not in (WorkerState.DONE, WorkerState.EVICTED) or \
                    (u.rank, u.incarnation) in told or (slot.incarnation, slot.state) != (u.incarnation, u.state):
                continue
            if u.state is WorkerState.EVICTED:
                said = why = _stopped_mid_push(u.rank, u.incarnation, peer.name, theirs, u.clock)
            elif theirs < u.clock and (silent := run.clock.silent_for(slot)) > self._lease:
                self._lost.setdefault(key, {})[u.rank] = (u.incarnation, u.clock)
                lost = True
                said = (f"rank {u.rank} (incarnation {u.incarnation}) finished, but its pushes of clocks {theirs}.."
                        f"{u.clock - 1} never reached {peer.name} (its worker stopped in the middle of a push")
                why = (f"{said} and has been silent for {silent:.0f}s): {peer.name} goes on without them, the rows it "
                       "holds of those gradients lost")
            else:
                continue
            told.add((u.rank, u.incarnation))
            if any(e.kind == "torn_push" and e.message.startswith(said) for e in run.history.events):
                continue  # (said before this server restarted: ``told`` is not kept, the checkpoint kept the event)
            run.history.event("torn_push", u.rank, why)
            log.warning("%s", why, extra={"run": run.run_id, "rank": u.rank})
        return lost

    def _out_of_reach(self, run: Run, peer: PeerLink, exc: PsError, silent: float) -> None:
        """``peer`` has not answered for ``silent`` seconds: its shard of ``run`` shows so, and the
        run fails once that is over --shard-timeout."""
        if self._deleted(run.run_id, peer.index):
            return
        old = self._status.get((run.run_id, peer.index))
        assert run.placement is not None
        self._status[(run.run_id, peer.index)] = pb.ShardStatus(
            index=peer.index, address=peer.address, reachable=False, error=f"{exc} (for {silent:.0f}s)",
            bytes_held=run.placement.shard_map.bytes_held(run.spec.params)[peer.index],
            min_clock=old.min_clock if old else 0, max_clock=old.max_clock if old else 0,
            pushes_applied=old.pushes_applied if old else 0, state=old.state if old else pb.RUN_STATE_UNSPECIFIED)
        if silent > self._shard_timeout:
            self._fail(run, f"{peer.name} has not answered for {silent:.0f}s (--shard-timeout "
                            f"{self._shard_timeout:g}): its shard of the run is out of reach ({exc})")

    def _unsent(self, run_id: str) -> None:
        """Every server is to be sent ``run_id``'s membership again (it went back to a cut)."""
        for peer in self._peers:
            self._sent.pop((run_id, peer.index), None)

    def _fail(self, run: Run, message: str) -> None:
        if run.state.finished:
            return
        log.error("%s failed: %s", run.run_id, message, extra={"run": run.run_id})
        run.stop(message, RunState.FAILED)
        self._registry.vacated()
