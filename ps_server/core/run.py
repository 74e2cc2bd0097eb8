"""One training run. It orchestrates its pieces: ranks and clocks (``clock``), the staleness rule
(``ssp``), parameters and optimizer (``store``, ``optimizers``), the BSP buffer (``bsp``), its
history, and the gate its parked pulls wait on (``wait_pull``: the core owns waiting).

Every method but the waits is a plain ``def``: on one event loop each call is atomic, and each
validates everything before it mutates anything, so an error leaves the run exactly as it was.
Staleness 0 holds each clock's gradients until every live rank pushed it (``bsp``); s > 0 applies
every push on arrival (Petuum semantics).

Exactly-once: pushes of an incarnation arrive in clock order, so each rank's (incarnation, clock) is
the de-duplication table. A push below the rank's clock is a retry, acknowledged and not applied
again; a push from an older incarnation is refused (STALE_INCARNATION).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from functools import partial

import numpy as np

from . import ssp
from .bsp import BspBuffer
from .clock import Slot, VectorClock
from .errors import FailedPrecondition, InvalidArgument, PsError, Reason, ShardUnavailable, counted, listed
from .gate import Gate
from .history import History
from .optimizers import OPTIMIZERS, make_optimizer
from .placement import Placement
from .spec import DEFAULT_LIMITS, UNBOUNDED, OptimizerKind, ParamSpec, RunSpec
from .status import Assignment, Counters, MetricPoint, ParamsRead, PushResult, RunState, RunStatus, WorkerState
from .store import ParamStore
from .tensors import Gradient, Rows, Update

__all__ = ["Run", "footprint"]


def _tracks_changes(spec: RunSpec) -> bool:
    """Whether a run's steps change only what a push carries, so delta pulls pay (``track_changes``)."""
    return bool(spec.topk_ratio) and spec.optimizer.kind is OptimizerKind.SGD and not spec.optimizer.weight_decay


def footprint(spec: RunSpec, params: Iterable[ParamSpec], finished: bool = False) -> int:
    """Bytes a run of ``spec`` holding ``params`` keeps for as long as it is kept, finished too: the
    parameters (a table's rows, all of them, from its creation), one copy per optimizer state and
    the per-element versions of delta pulls (4 bytes each); and, until it is ``finished``, under
    BSP (staleness 0) the gradients of the clock being combined, held past their pushes until
    every rank has pushed it (``bsp``): a model's bytes from each rank but the last, whose push
    completes the clock (a gradient being received, as under s > 0, which holds none). What
    --max-total-bytes counts."""
    copies = 1 + len(OPTIMIZERS[spec.optimizer.kind].state_names) + _tracks_changes(spec)
    if spec.staleness == 0 and not finished:  # (a run cannot switch to or from 0)
        copies += spec.num_workers - 1
    return 4 * copies * sum(p.size for p in params)


class Run:
    row_limit = DEFAULT_LIMITS.max_pull_rows
    """Row ids of one table one pull may ask for (the server's ``Limits``)."""

    def __init__(self, run_id: str, spec: RunSpec, *, now: Callable[[], float] = time.monotonic,
                 history: int = 20_000, store: ParamStore | None = None, placement: Placement | None = None) -> None:
        """``store``: the initial parameters, when built beforehand (off the event loop)."""
        self.run_id = run_id
        self.spec = spec
        self.placement = placement  # this server's shard of a run over several: it holds those pieces
        self.state, self.message = RunState.PENDING, ""
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.store = store or ParamStore(placement.held(spec.params) if placement else spec.params, spec.seed)
        self.optimizer = make_optimizer(spec.optimizer, tuple(self.store.specs.values()))
        self.next_step = 0
        """The first step of ``spec.staleness_schedule`` not applied yet (checkpoints hold it)."""
        self.bounds = (spec.staleness, spec.staleness)
        """(tightest, loosest) bound the run has been under since it was created: the bound it was
        created with, and every one ``_change_bound`` set (a restore sets it: a checkpoint keeps it)."""
        if _tracks_changes(spec):
            self.store.track_changes()
        self.clock = VectorClock(spec.num_workers, now)
        self.bsp = BspBuffer(spec.aggregation)
        self.history = History(history)
        self.counters = Counters()
        self.gate = Gate()
        self.changes = 0  # grows with every change a watcher could see
        self.on_change: Callable[[Run], None] | None = None  # called after every change: a consistent cut
        self.held = ""  # why it takes no pushes and pulls now (a cluster's shard waiting to go back to a cut)
        self.history.event("created", -1, f"{counted(spec.num_workers, 'rank')}, staleness {spec.describe_staleness()}")

    @property
    def footprint(self) -> int:
        """What the run holds now and for as long as it is kept (``footprint``: a finished run holds
        no gradients)."""
        return footprint(self.spec, self.store.specs.values(), self.state.finished)

    @property
    def min_clock(self) -> int:
        return self.clock.min_clock

    def has_vacancy(self) -> bool:
        return not self.state.finished and bool(self.clock.vacant())

    def join(self, worker_name: str, join_token: str = "") -> Assignment:
        """Hand the first vacant (or evicted) rank to a new incarnation (``joined``: the one a Join
        with ``join_token`` took)."""
        pending = self.state is RunState.PENDING
        # (At the min clock, which never goes down: under BSP, a clock already combined takes no
        # more gradients, and a rank's pushes below it would be held for ever.)
        slot = None if self.state.finished else self.clock.assign(worker_name, 0 if pending else None, join_token)
        if slot is None:
            raise FailedPrecondition(f"run {self.run_id} has no vacant rank (state {self.state.value}); join "
                                     "without run_id to take any run's vacant rank", Reason.NO_VACANT_RANK)
        self.history.event("joined", slot.rank, f"{worker_name or 'a worker'} took rank {slot.rank} "
                           f"(incarnation {slot.incarnation}, clock {slot.clock})")
        if pending and self.clock.count(WorkerState.ACTIVE) == len(self.clock.slots):
            self.state, self.started = RunState.RUNNING, time.time()
            self._started_event()
            self._follow_schedule()  # (a step at clock 0: no clock changes before the first push)
        self._changed()
        return Assignment(self.run_id, slot.rank, slot.incarnation, slot.clock)

    def joined(self, join_token: str) -> Assignment | None:
        """The assignment a Join with ``join_token`` was answered with, while its incarnation holds
        the rank and has made no call since (that answer was lost: its worker asks again); None
        otherwise. Nothing changes: it is the same join."""
        slot = self.clock.joined(join_token)
        return None if slot is None else Assignment(self.run_id, slot.rank, slot.incarnation, slot.start)

    def _started_event(self) -> None:
        n = len(self.clock.slots)
        self.history.event("started", -1, f"all {n} ranks joined" if n > 1 else "the one rank joined")

    def start_later(self, rank: int, incarnation: int, start: int, kind: str, why: str) -> bool:
        """``incarnation`` holds ``rank`` from clock ``start``, later than it was handed over at
        (a cluster's server had already combined the clocks before it: ``ClusterOwner.sync``): its
        clocks below ``start`` count as completed without its pushes, and an event of ``kind``
        says ``why``. False, and nothing changes, unless it is the rank's active incarnation and
        ``start`` is later than its start."""
        if not self._start_later(rank, incarnation, start, kind, why):
            return False
        self._after_clock_change()
        return True

    def _start_later(self, rank: int, incarnation: int, start: int, kind: str, why: str) -> bool:
        """``start_later`` without completing the clocks it lets complete (``mirror`` does, once
        every rank is set)."""
        slot = self.clock.slots[rank]
        if self.state.finished or slot.incarnation != incarnation or slot.state is not WorkerState.ACTIVE or \
                start <= slot.start:
            return False
        self.clock.start_later(slot, start)
        self.history.event(kind, rank, why)
        return True

    def heartbeat(self, rank: int, incarnation: int) -> tuple[RunState, int]:
        """Refresh the lease; return the run's state and the rank's clock."""
        return self.state, self.clock.holder(rank, incarnation).clock

    def report(self, rank: int, incarnation: int, points: Iterable[MetricPoint], pulls_skipped: int) -> RunState:
        slot = self.clock.holder(rank, incarnation)
        self.history.add_points(rank, points)
        slot.pulls_skipped = max(slot.pulls_skipped, pulls_skipped)
        self._changed()
        return self.state

    def leave(self, rank: int, incarnation: int, reason: str, message: str) -> RunState:
        """reason: "done" (rank finished; with iterations left, as "shutdown"), "shutdown" (rank
        becomes vacant), "failed" (fails the run); nothing changes once the run has ended."""
        slot = self.clock.holder(rank, incarnation)
        if self.state.finished:
            return self.state
        if reason == "failed":
            self._finish(RunState.FAILED, f"rank {rank} failed: {message or 'no message'}", message or "worker failed", rank)
        elif reason == "shutdown":
            self._evict(slot, f"left ({message or 'shutdown'})", kind="left")
        elif slot.state is WorkerState.ACTIVE and slot.clock < self.spec.iterations:
            # (A server restored from a checkpoint knows the rank at an earlier clock than its worker
            # finished at.) DONE, its clock would hold the min clock back for good, with no lease to
            # expire: its iterations left are handed over.
            self._evict(slot, f"left done with {counted(self.spec.iterations - slot.clock, 'iteration')} left", kind="left")
        else:
            if slot.state is WorkerState.ACTIVE:
                self.clock.set_state(slot, WorkerState.DONE)
                self.history.event("done", rank, f"rank {rank} left at clock {slot.clock}")
            self._after_clock_change()
        return self.state

    def expire(self, lease: float) -> list[int]:  # evict ACTIVE ranks silent for ``lease`` seconds
        for slot, silent in (expired := self.clock.expired(lease)):
            self._evict(slot, f"lease expired: no RPC for {silent:.1f}s (lease {lease:.1f}s)")
        return [slot.rank for slot, _ in expired]

    def _evict(self, slot: Slot, why: str, kind: str = "evicted") -> None:
        if slot.clock >= self.spec.iterations:  # nothing left to hand over: it is done
            self.clock.set_state(slot, WorkerState.DONE)
            self.history.event("done", slot.rank, f"rank {slot.rank} {why} after finishing")
        else:
            self.clock.set_state(slot, WorkerState.EVICTED)
            self.counters.evictions += kind == "evicted"
            self.bsp.drop(slot.rank)
            self.history.event(kind, slot.rank, f"rank {slot.rank} (incarnation {slot.incarnation}, "
                               f"clock {slot.clock}) {why}")
        self._after_clock_change()

    def push(self, rank: int, incarnation: int, clock: int, grads: dict[str, Gradient], nbytes: int,
             loss: float = float("nan"), data_plane: str = "", param_version: int | None = None,
             flat: np.ndarray | None = None, borrowed: bool = False) -> PushResult:
        """Accept a rank's gradient of iteration ``clock``: apply (s > 0) or hold (s = 0).
        ``param_version``: the version its gradient was computed on (``RunSpec.staleness_aware_lr``).
        ``flat``: the gradient is already in ``store.flat_gradient``'s buffer (``grads`` are its views).
        ``borrowed``: ``grads`` are views of a message its sender may reuse after the server's next
        message to it: held as they are, and copied by ``keep_held`` before that message."""
        try:
            if self.held:
                raise ShardUnavailable(self.held)
            slot = self.clock.holder(rank, incarnation)
            if clock < slot.clock:
                self.counters.pushes_duplicate += 1
                return PushResult(slot.clock, True, self.min_clock, self.state, self._tell(slot, pushed=False),
                                  slot.lr_scale if clock == slot.clock - 1 else None)
            if self.state is not RunState.RUNNING:
                raise FailedPrecondition(f"run {self.run_id} is {self.state.value}: pushes are accepted only "
                                         "while it is running", Reason.RUN_NOT_RUNNING, run_state=self.state.value)
            ssp.check_push(self._push_spec(slot), self.clock, slot, clock)
            flat = self.store.check_gradient(grads) if flat is None else \
                self.store.check_flat(flat, grads)
        except PsError:
            self.counters.pushes_rejected += 1
            raise
        slot.data_plane = data_plane or slot.data_plane
        self.history.record("push", rank, clock, self.min_clock)
        if self.spec.staleness == 0:
            self.bsp.hold(clock, rank, grads, borrowed)
            slot.lr_scale = None
        else:
            scale = self._lr_scale(param_version)
            self._step(grads, flat, scale)
            slot.lr_scale = scale if self.spec.staleness_aware_lr else None
        self.clock.advance(slot, clock)
        self.counters.pushes_applied += 1
        self.counters.bytes_pushed += nbytes
        if self.store.tables:
            self.counters.rows_pushed += sum(g.ids.size for g in grads.values() if isinstance(g, Rows))
        if slot.clock == self.spec.iterations:
            self.history.event("finished", rank, f"rank {rank} completed its {counted(self.spec.iterations, 'iteration')}")
        self._after_clock_change(clocks_only=True)
        return PushResult(slot.clock, False, self.min_clock, self.state, self._tell(slot, pushed=True), slot.lr_scale)

    def keep_held(self, rank: int) -> None:
        """Copy what the rank's held gradients still borrow (``push``'s ``borrowed``)."""
        self.bsp.keep(rank)

    async def wait_pull(self, rank: int, incarnation: int, clock: int, timeout: float, names: list[str] | None = None,
                        rows: Mapping[str, np.ndarray] | None = None) -> None:
        """Return once a pull of ``clock`` by this rank may be served (``ssp``; meanwhile the rank
        shows what it waits for); raise when it never will be or after ``timeout`` seconds."""
        if self.pull_now(rank, incarnation, clock, names, rows):
            return
        slot = self.clock.slots[rank]
        ready = partial(self.pull_ready, rank, incarnation, clock)
        parked = self.clock.park(slot, clock)
        self.counters.pulls_parked += 1
        try:
            if not await self.gate.wait_for(ready, timeout, key=lambda: ssp.needed(self.spec, clock)):
                raise ssp.wait_timeout(self.spec, self.clock, clock, timeout, self.waiting_for())
        finally:
            self.counters.parked_seconds += self.clock.unpark(slot, parked)

    def pull_now(self, rank: int, incarnation: int, clock: int, names: list[str] | None = None,
                 rows: Mapping[str, np.ndarray] | None = None) -> bool:
        """Whether a pull of ``clock`` by this rank may be served now (False: ``wait_pull`` parks
        it); raises when it never could be."""
        if self.held:
            raise ShardUnavailable(self.held)
        slot = self.clock.holder(rank, incarnation)
        ssp.check_pull(self.spec, slot, clock)
        self.check_read(names, rows)  # a pull that cannot be served is refused now, not after its wait
        return self.pull_ready(rank, incarnation, clock)

    def pull_ready(self, rank: int, incarnation: int, clock: int) -> bool:
        if not self.clock.holds(rank, incarnation):
            raise FailedPrecondition(f"incarnation {incarnation} of rank {rank} was evicted while its pull "
                                     "waited; join again", Reason.STALE_INCARNATION)
        if self.state in (RunState.STOPPED, RunState.FAILED):
            raise FailedPrecondition(f"run {self.run_id} is {self.state.value}: {self.message}",
                                     Reason.RUN_NOT_RUNNING, run_state=self.state.value)
        return self.state is not RunState.PENDING and ssp.pull_ready(self.spec, self.clock, self.clock.slots[rank], clock)

    def check_read(self, names: list[str] | None, rows: Mapping[str, np.ndarray] | None) -> None:
        self.store.check_names(names)
        for name, ids in (rows or {}).items():
            self.store.check_rows(name, ids, self.row_limit)

    def read(self, rank: int | None, clock: int, names: list[str] | None,
             rows: Mapping[str, np.ndarray] | None = None, since: tuple[int, int] | None = None) -> ParamsRead:
        """Serve a pull whose wait is over (``rank`` None: an observer's read). With ``rows``
        (table -> row ids), ``names`` are the whole tensors wanted besides (None: none). ``since``:
        (lineage, version) of the whole model the caller holds: the answer may be a delta.
        ShardUnavailable while the run is ``held``, for observers too: a restarted server's shard,
        or one going back to a checkpoint, is of another history than the others' (an export
        would put two together)."""
        if self.held:
            raise ShardUnavailable(self.held)
        if rows:
            self.check_read(names, rows)
            tensors = self.store.read(names) if names else {}
            picked = {name: (ids, self.store.params[name][ids], self.store.specs[name].shape) for name, ids in rows.items()}
        else:
            tensors, picked = self.store.read(names), {}
        whole = tensors is self.store.params
        if rank is not None:
            self.history.record("pull", rank, clock, self.min_clock)
            self.counters.pulled(staleness=max(0, clock - self.min_clock))  # observers' reads do not count
        wire_dtype = self.spec.wire_dtype if rank is not None else "float32"  # observers (export) get float32
        itemsize = 4 if wire_dtype == "float32" else 2
        delta = None
        if since is not None and whole and rank is not None and since[0] == self.store.lineage and \
                since[1] <= self.counters.updates_applied:
            delta = self.store.delta(since[1], itemsize)
        if delta is not None:
            self.counters.bytes_pulled += sum(picked.size for picked in delta.values()) * (4 + itemsize)
        else:
            dense = self.store.nbytes if whole else sum(t.nbytes for t in tensors.values())
            self.counters.bytes_pulled += dense // 4 * itemsize
        self.counters.bytes_pulled += sum(ids.nbytes + values.nbytes for ids, values, _ in picked.values())
        self.counters.rows_pulled += sum(ids.size for ids, _, _ in picked.values())
        guaranteed = self.min_clock if self.spec.staleness else self.bsp.applied_clock
        told = self._tell(self.clock.slots[rank], pushed=False) if rank is not None else None
        return ParamsRead(guaranteed, self.counters.updates_applied, tensors, self.state,
                          self.store.derived if whole else None, picked, wire_dtype, delta, self.store.lineage, told)

    def _tell(self, slot: Slot, pushed: bool) -> int:
        """The bound an answer to ``slot``'s rank carries, taken into ``slot.told`` (its next push is
        checked against it too: ``_push_spec``). The answer to a push it applied (``pushed``)
        sets it: the rank computes its next clock after that answer. Any other (a read, a
        duplicate push's) only loosens it: its rank may compute under it, or it answers a copy
        whose sender has long gone on with an answer before it (a retry whose first try was
        applied, a data plane's request after the client fell back to gRPC): the bound the
        rank's next push was computed under is one of those told since its last push."""
        bound = self.spec.staleness
        slot.told = bound if pushed or slot.told is None else ssp.looser(slot.told, bound)
        return bound

    def _push_spec(self, slot: Slot) -> RunSpec:
        """The spec a push is checked against: the looser of the bound in force and the loosest the
        rank was told since its last push (its gradient was computed under one of them: ``_tell``)."""
        bound = self.spec.staleness if slot.told is None else ssp.looser(self.spec.staleness, slot.told)
        return self.spec if bound == self.spec.staleness else replace(self.spec, staleness=bound)

    def resume_schedule(self) -> None:
        """After a restore from a checkpoint that does not say ``next_step``: the schedule's steps
        the min clock had reached were applied before the checkpoint (the spec holds their bound, or
        a later UpdateRun's): only later ones remain. Their bounds were in force: ``bounds`` has
        them (a checkpoint's already did)."""
        self.next_step = sum(1 for at, _ in self.spec.staleness_schedule if at <= self.min_clock)
        for _, bound in self.spec.staleness_schedule[:self.next_step]:
            self.had(bound)

    def had(self, bound: int) -> None:
        """``bound`` was in force: ``bounds`` takes it in."""
        self.bounds = (ssp.tighter(self.bounds[0], bound), ssp.looser(self.bounds[1], bound))

    def set_staleness(self, staleness: int) -> None:
        """Change the bound while the run runs (UpdateRun; the proto states the rule): pulls parked
        now are re-evaluated at once against it; a rank's push is checked against the looser of it
        and the bounds the rank was told since its last push (``_push_spec``)."""
        old = self.spec.staleness
        if staleness < UNBOUNDED:
            raise InvalidArgument(f"staleness {staleness}: use 0 (BSP), a positive bound, or -1 (unbounded)",
                                  Reason.INVALID_REQUEST)
        if self.state.finished:
            raise FailedPrecondition(f"run {self.run_id} is {self.state.value}: its staleness cannot change",
                                     Reason.RUN_NOT_RUNNING, run_state=self.state.value)
        if (old == 0) != (staleness == 0):
            instead = ("start a new run with the bound you want (psctl launch --staleness N)" if old == 0 else
                       "choose a positive bound, or none (psctl set --staleness inf; -1 in UpdateRunRequest)")
            raise FailedPrecondition(f"run {self.run_id}: staleness {old} -> {staleness}: a running run cannot switch "
                                     f"to or from 0 (BSP holds each clock's gradients to combine them); {instead}",
                                     Reason.UNSUPPORTED)
        if staleness == old:
            return
        self._change_bound(staleness)
        self._changed()  # parked pulls look again

    def _change_bound(self, bound: int, how: str = "") -> None:
        """The bound in force becomes ``bound`` (an event saying ``how``), which joins ``bounds``."""
        old = self.spec.staleness
        self.spec = replace(self.spec, staleness=bound)
        self.had(bound)
        self.history.event("staleness", -1, f"staleness changed from {_bound(old)} to {_bound(bound)}{how}")

    def hold(self, why: str) -> None:
        """Take no pushes or pulls, observers' included, because of ``why`` ("": take them again),
        a change watchers see (``held``)."""
        self.held = why
        self._changed()

    async def changed(self, since: int, timeout: float) -> bool:
        """True once ``changes`` moved past ``since``; False after ``timeout`` seconds."""
        return await self.gate.wait_for(lambda: self.changes != since, timeout)

    def stop(self, reason: str, state: RunState = RunState.STOPPED) -> None:  # or FAILED, for the cluster's reasons
        if not self.state.finished:
            self._finish(state, reason or "stopped by user")

    def _finish(self, state: RunState, message: str, event: str = "", rank: int = -1) -> None:
        """End the run, with an event named after ``state`` saying ``event`` (or the message)."""
        self.history.event(state.value, rank, event or message)
        self.clock.end()
        self.state = state
        self.message = message
        self.finished = time.time()
        self.bsp.clear()
        self._changed()

    def _after_clock_change(self, clocks_only: bool = False) -> None:
        """``clocks_only``: a push, which changed a rank's clock and nothing else the gate's waiters
        look at (unless it completes, fails or reschedules the run, checked here)."""
        before = (self.state, self.spec.staleness)
        if self.spec.staleness == 0:
            for by_rank in self.bsp.complete(self.min_clock):
                self._step(partial(self.bsp.combine, by_rank, self.store.params))
        self._follow_schedule()
        if (self.state is RunState.RUNNING and not self.clock.any_in(WorkerState.ACTIVE)
                and self.clock.any_in(WorkerState.DONE)):
            self._complete()
        self._changed(self.min_clock if clocks_only and before == (self.state, self.spec.staleness) else None)

    def _complete(self) -> None:
        """COMPLETED; a rank evicted (or left) that nobody took again had its remaining iterations
        dropped: the message says whose, so that "completed" does not read as every shard trained,
        and, when rank 0 did not evaluate them, that the final parameters were not evaluated."""
        dropped = [s for s in self.clock.vacant() if s.clock < self.spec.iterations]
        # (rank 0's worker evaluates the final parameters, then leaves: evicted after its last push,
        # as done, it never did, and the history's last evaluation is an earlier one)
        last = self.history.last_eval
        unevaluated = "" if last is None or last.clock >= self.spec.iterations else \
            f"; the final parameters were not evaluated (rank 0 did not leave): the last evaluation is of clock {last.clock}"
        if not dropped:
            message = f"all ranks finished{unevaluated}"
            self._finish(RunState.COMPLETED, message, f"all ranks done at min clock {self.min_clock}{unevaluated}")
            return
        lost = sum(self.spec.iterations - s.clock for s in dropped)
        message = (f"the other ranks finished; {listed(f'rank {s.rank} (clock {s.clock})' for s in dropped)} left "
                   f"vacant: {counted(lost, 'iteration')} dropped{unevaluated}")
        self._finish(RunState.COMPLETED, message, f"{message}; the others done at min clock {self.min_clock}")

    def _follow_schedule(self) -> None:
        """The bound of the last step of ``RunSpec.staleness_schedule`` the min clock has reached."""
        steps = self.spec.staleness_schedule
        while self.next_step < len(steps) and self.min_clock >= steps[self.next_step][0]:
            _, bound = steps[self.next_step]
            self.next_step += 1
            if bound != self.spec.staleness and not self.state.finished:
                self._change_bound(bound, f" at min clock {self.min_clock} (the run's schedule)")

    def _lr_scale(self, param_version: int | None) -> float:
        """1 / the push's staleness (updates applied since its parameters were read; at least 1)
        with ``staleness_aware_lr``, else 1."""
        if not self.spec.staleness_aware_lr or param_version is None:
            return 1.0
        staleness = max(1, self.counters.updates_applied - param_version)
        self.counters.lr_scale_sum += 1.0 / staleness
        self.counters.lr_scaled += 1
        return 1.0 / staleness

    def _step(self, grads: Mapping[str, Update] | Callable[[], Mapping[str, Update]],
              flat: np.ndarray | None = None, lr_scale: float = 1.0) -> None:
        """Apply one update (``flat``: the same gradient laid out like ``store.flat``, stepped in one
        piece; a callable: BSP's combination, which every worker waits for: on both cores) with
        the learning rate times ``lr_scale``; a run whose parameters or optimizer state stop being
        finite has diverged and fails."""
        both_cores = callable(grads)
        if self.store.changed is not None and callable(grads):
            grads = grads()  # (BSP's combination) kept for ``mark``
        diverged = self.optimizer.step_flat(self.store.flat, flat, lr_scale) if flat is not None else \
            self.optimizer.step(self.store.params, grads, lr_scale, both_cores)
        self.counters.updates_applied += 1
        if self.store.changed is not None:
            assert not callable(grads)
            self.store.mark(grads, flat, self.counters.updates_applied)
        if diverged and self.state is RunState.RUNNING:
            self._finish(RunState.FAILED, f"{diverged} became NaN/Inf at update {self.counters.updates_applied}: "
                         "the training diverged; lower the learning rate")

    def _changed(self, min_clock: int | None = None) -> None:
        """After any change (``min_clock``: only clocks changed, and the min clock is this)."""
        self.changes += 1
        self.gate.notify(min_clock)
        if self.on_change:
            self.on_change(self)

    def waiting_for(self) -> str:  # one sentence (``ssp.waiting_for``)
        return "" if self.state.finished else ssp.waiting_for(self.spec, self.clock, self.state is RunState.PENDING)

    def status(self, workers: bool = True) -> RunStatus:  # workers: with each rank's status
        return RunStatus(run_id=self.run_id, state=self.state, message=self.message, created=self.created,
                         started=self.started, finished=self.finished, min_clock=self.min_clock,
                         workers=self.clock.statuses() if workers else (), max_clock=self.clock.max_clock,
                         counters=replace(self.counters, pulls_skipped=self.clock.pulls_skipped()),
                         last_eval=self.history.last_eval, waiting_for=self.waiting_for(),
                         active_workers=self.clock.count(WorkerState.ACTIVE), bounds=self.bounds)


def _bound(staleness: int) -> str:
    return "unbounded" if staleness == UNBOUNDED else str(staleness)
