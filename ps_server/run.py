"""One training run: ranks, clocks, the SSP rule, exactly-once pushes and the parameter store.

All methods are plain ``def``s: on one event loop each call is atomic, and each validates
everything before it mutates anything, so an error leaves the run exactly as it was.

Clocks. A rank's clock is the number of iterations it completed. The min clock is the minimum over
ranks that are ACTIVE or DONE (an evicted or vacant rank counts as +inf). With staleness s:
  * a pull for iteration c is served once the run is running, min_clock >= c - s and the caller's
    own clock >= c (its own pushes are in); s = UNBOUNDED never waits on others;
  * a push of iteration c is accepted only while min_clock >= c - s. This is the SSP invariant,
    enforced here rather than trusted to workers: no rank completes iteration c while a live rank's
    clock is < c - s.
s = 0 (BSP) holds each clock's gradients until every live rank has pushed it, then combines them
in rank order and applies them once: exact synchronous SGD. s > 0 applies every push on arrival.

Exactly-once. Pushes of an incarnation arrive in clock order, so the de-duplication table is the
(incarnation, clock) of each rank: a push with clock < the rank's clock is a retry of one already
applied, acknowledged and not applied again; a push from an older incarnation is rejected.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np

from .errors import FailedPrecondition, InvalidArgument, OutOfRange, PsError
from .gate import Gate
from .optimizers import BLOCK, make_optimizer
from .spec import Aggregation, RunSpec, spec_from_dict, spec_to_dict
from .status import (
    Assignment,
    Counters,
    MetricPoint,
    ParamsRead,
    PushResult,
    RunEvent,
    RunState,
    RunStatus,
    WorkerState,
    WorkerStatus,
)
from .store import Gradient, ParamStore, blocks, count_non_finite

__all__ = ["ClockRecord", "Run"]


def _restore(target: np.ndarray, value: np.ndarray, key: str) -> None:
    if value.shape != target.shape or value.dtype != target.dtype:
        raise ValueError(f"{key}: checkpoint has {value.dtype}{list(value.shape)}, "
                         f"the spec needs {target.dtype}{list(target.shape)}")
    target[...] = value

_INF = 1 << 62


@dataclass
class _Slot:
    rank: int
    state: WorkerState = WorkerState.VACANT
    incarnation: int = 0
    clock: int = 0
    worker_name: str = ""
    last_seen: float = 0.0  # monotonic
    last_seen_wall: float = 0.0
    pushes: int = 0
    pulls_skipped: int = 0
    waiting_for: int | None = None
    parked_at: float | None = None
    data_plane: str = ""  # what the rank's last push came over: "tcp" or "grpc"

    @property
    def live(self) -> bool:
        return self.state in (WorkerState.ACTIVE, WorkerState.DONE)


class ClockRecord(NamedTuple):
    """The server's record of a served pull (an iteration starts) or an accepted push (it ends).

    A named tuple: two are made per iteration and up to 100,000 kept (cheaper to build than a
    dataclass, and tuples of plain values drop out of the garbage collector's scans)."""

    kind: str
    """"pull" or "push"."""
    rank: int
    clock: int
    min_clock: int
    """Min clock over live ranks when the pull was served / just before the push was applied."""
    time: float


class Run:
    def __init__(
        self,
        run_id: str,
        spec: RunSpec,
        *,
        now: Callable[[], float] = time.monotonic,
        history: int = 20_000,
        store: ParamStore | None = None,
    ) -> None:
        """``store``: the initial parameters, when built beforehand (off the event loop)."""
        self.run_id = run_id
        self.spec = spec
        self.state = RunState.PENDING
        self.message = ""
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.store = store or ParamStore(spec.params, spec.seed)
        self.optimizer = make_optimizer(spec.optimizer, spec.params)
        self.counters = Counters()
        self.gate = Gate()
        self.changes = 0
        self.points: collections.deque[MetricPoint] = collections.deque(maxlen=history)
        self.events: collections.deque[RunEvent] = collections.deque(maxlen=history)
        self.clock_records: collections.deque[ClockRecord] = collections.deque(maxlen=5 * history)
        self.last_eval: MetricPoint | None = None
        self.event_count = 0
        self._now = now
        self._slots = [_Slot(rank=r) for r in range(spec.num_workers)]
        self._min_clock: int | None = None
        self._next_incarnation = 1
        self._retired_skipped = 0
        # BSP: clock -> rank -> gradient, and the number of clocks combined and applied so far.
        self._pending: dict[int, dict[int, Mapping[str, Gradient]]] = {}
        self._applied_clock = 0
        # Checkpoints: the hook is called synchronously, so its snapshot is this exact instant.
        self.checkpoint_every = 0
        self.on_checkpoint: Callable[[Run, str], None] | None = None
        self._checkpoint_clock = 0
        self._event("created", -1, f"{spec.num_workers} ranks, staleness {spec.describe_staleness()}")

    # ------------------------------------------------------------------------------ queries
    @property
    def min_clock(self) -> int:
        # Read several times per push and pull: cached, and forgotten (``_clocks_changed``)
        # wherever a rank's clock or state changes.
        if self._min_clock is None:
            live = [s.clock for s in self._slots if s.live]
            self._min_clock = min(live) if live else max(s.clock for s in self._slots)
        return self._min_clock

    def _clocks_changed(self) -> None:
        self._min_clock = None

    @property
    def max_clock(self) -> int:
        return max(s.clock for s in self._slots)

    def has_vacancy(self) -> bool:
        return not self.state.finished and any(
            s.state in (WorkerState.VACANT, WorkerState.EVICTED) for s in self._slots
        )

    def _bound(self, clock: int) -> int:
        """The min clock a rank at ``clock`` needs: clock - s (-inf for ASP).

        Clock ``iterations`` is the read of the final parameters: it needs every rank finished.
        """
        if clock >= self.spec.iterations:
            return self.spec.iterations
        return -_INF if self.spec.unbounded else clock - self.spec.staleness

    # ------------------------------------------------------------------------------ workers
    def join(self, worker_name: str) -> Assignment:
        """Hand the first vacant (or evicted) rank to a new incarnation."""
        slot = next(
            (s for s in self._slots if s.state is WorkerState.VACANT),
            None,
        ) or next((s for s in self._slots if s.state is WorkerState.EVICTED), None)
        if slot is None or self.state.finished:
            raise FailedPrecondition(
                f"run {self.run_id} has no vacant rank (state {self.state.value}); "
                "join without run_id to take any run's vacant rank"
            )
        live = [s.clock for s in self._slots if s.live]
        start = 0 if self.state is RunState.PENDING else (min(live) if live else slot.clock)
        if slot.state is WorkerState.EVICTED:
            self._retired_skipped += slot.pulls_skipped
        slot.state = WorkerState.ACTIVE
        slot.incarnation = self._next_incarnation
        self._next_incarnation += 1
        slot.clock = start
        self._clocks_changed()
        slot.worker_name = worker_name
        slot.pulls_skipped = 0
        slot.data_plane = ""
        slot.waiting_for = None
        self._touch(slot)
        self._event("joined", slot.rank, f"{worker_name or 'a worker'} took rank {slot.rank} "
                    f"(incarnation {slot.incarnation}, clock {start})")
        if self.state is RunState.PENDING and all(s.state is WorkerState.ACTIVE for s in self._slots):
            self.state = RunState.RUNNING
            self.started = time.time()
            self._event("started", -1, f"all {len(self._slots)} ranks joined")
        self._changed()
        return Assignment(self.run_id, slot.rank, slot.incarnation, self.spec, start)

    def _slot(self, rank: int, incarnation: int) -> _Slot:
        """The rank's slot if ``incarnation`` holds it, refreshing its lease; else raise."""
        if not 0 <= rank < len(self._slots):
            raise InvalidArgument(f"rank {rank} is out of range: run {self.run_id} has ranks "
                                  f"0..{len(self._slots) - 1}")
        slot = self._slots[rank]
        if incarnation != slot.incarnation or slot.state in (WorkerState.VACANT, WorkerState.EVICTED):
            raise FailedPrecondition(
                f"incarnation {incarnation} of rank {rank} is stale (current: {slot.incarnation}, "
                f"{slot.state.value}): the worker was evicted or replaced; join again"
            )
        self._touch(slot)
        return slot

    def _touch(self, slot: _Slot) -> None:
        slot.last_seen = self._now()
        slot.last_seen_wall = time.time()

    def heartbeat(self, rank: int, incarnation: int) -> tuple[RunState, int]:
        """Refresh the lease; return the run's state and the rank's clock."""
        return self.state, self._slot(rank, incarnation).clock

    def report(self, rank: int, incarnation: int, points: Iterable[MetricPoint], pulls_skipped: int) -> RunState:
        slot = self._slot(rank, incarnation)
        points = list(points)
        if len(points) > 10_000:
            raise InvalidArgument(f"{len(points)} points in one report: send at most 10000")
        slot.pulls_skipped = max(slot.pulls_skipped, pulls_skipped)
        for p in points:
            p = replace(p, rank=rank)
            self.points.append(p)
            if p.eval and (self.last_eval is None or p.clock >= self.last_eval.clock):
                self.last_eval = p
        self._changed()
        return self.state

    def leave(self, rank: int, incarnation: int, reason: str, message: str) -> RunState:
        """reason: "done" (rank finished), "shutdown" (rank becomes vacant), "failed" (fails the run)."""
        slot = self._slot(rank, incarnation)
        if reason == "failed":
            self._event("failed", rank, message or "worker failed")
            self._finish(RunState.FAILED, f"rank {rank} failed: {message or 'no message'}")
        elif reason == "shutdown":
            self._evict(slot, f"left ({message or 'shutdown'})", kind="left")
        else:
            if slot.state is WorkerState.ACTIVE:
                slot.state = WorkerState.DONE
                self._clocks_changed()
                self._event("done", rank, f"rank {rank} left at clock {slot.clock}")
            self._after_clock_change()
        return self.state

    def expire(self, lease: float) -> list[int]:
        """Evict ACTIVE ranks not heard from for ``lease`` seconds; return their ranks."""
        now = self._now()
        expired = [s for s in self._slots if s.state is WorkerState.ACTIVE and now - s.last_seen > lease]
        for s in expired:
            self._evict(s, f"lease expired: no RPC for {now - s.last_seen:.1f}s (lease {lease:.1f}s)")
        return [s.rank for s in expired]

    def _evict(self, slot: _Slot, why: str, kind: str = "evicted") -> None:
        if slot.clock >= self.spec.iterations:  # nothing left to hand over: it is done
            slot.state = WorkerState.DONE
            self._clocks_changed()
            self._event("done", slot.rank, f"rank {slot.rank} {why} after finishing")
            self._after_clock_change()
            return
        slot.state = WorkerState.EVICTED
        self._clocks_changed()
        slot.waiting_for = None
        self.counters.evictions += kind == "evicted"
        for grads in self._pending.values():
            grads.pop(slot.rank, None)
        self._event(kind, slot.rank, f"rank {slot.rank} (incarnation {slot.incarnation}, "
                    f"clock {slot.clock}) {why}")
        self._after_clock_change()

    # ------------------------------------------------------------------------------ data plane
    def push(
        self, rank: int, incarnation: int, clock: int, grads: Mapping[str, Gradient], nbytes: int, loss: float = float("nan"),
        data_plane: str = "",
    ) -> PushResult:
        """Accept the gradient of iteration ``clock`` of a rank: apply (s > 0) or hold (s = 0).
        ``data_plane``: what it came over ("tcp", "grpc"), shown in the rank's status."""
        try:
            slot = self._slot(rank, incarnation)
        except PsError:
            self.counters.pushes_rejected += 1
            raise
        slot.data_plane = data_plane or slot.data_plane
        if clock < slot.clock:
            self.counters.pushes_duplicate += 1
            return PushResult(slot.clock, True, self.min_clock, self.state)
        try:
            flat = self._check_push(slot, clock, grads)
        except Exception:
            self.counters.pushes_rejected += 1
            raise
        min_before = self.min_clock
        self.clock_records.append(ClockRecord("push", rank, clock, min_before, time.time()))
        if self.spec.staleness == 0:
            self._pending.setdefault(clock, {})[rank] = grads
        else:
            self._step(grads, flat)
        slot.clock = clock + 1
        self._clocks_changed()
        slot.pushes += 1
        self.counters.pushes_applied += 1
        self.counters.bytes_pushed += nbytes
        if slot.clock == self.spec.iterations:
            self._event("finished", rank, f"rank {rank} completed its {self.spec.iterations} iterations")
        self._after_clock_change()
        return PushResult(slot.clock, False, self.min_clock, self.state)

    def _check_push(self, slot: _Slot, clock: int, grads: Mapping[str, Gradient]) -> np.ndarray | None:
        """Raise unless the push is acceptable; return its flat gradient (``ParamStore.check_gradient``)."""
        if self.state is not RunState.RUNNING:
            raise FailedPrecondition(f"run {self.run_id} is {self.state.value}: pushes are accepted "
                                     "only while it is running")
        if clock >= self.spec.iterations:
            raise OutOfRange(f"clock {clock} is beyond the run's {self.spec.iterations} iterations")
        if clock > slot.clock:
            raise FailedPrecondition(f"rank {slot.rank} pushed clock {clock} but its next clock is "
                                     f"{slot.clock}: pushes must arrive in clock order")
        if self.min_clock < self._bound(clock):
            raise FailedPrecondition(self._held_back_message(clock, "push"))
        return self.store.check_gradient(grads)

    def check_pull(self, rank: int, incarnation: int, clock: int) -> None:
        """Validate a worker's pull before parking it (also refreshes the lease)."""
        slot = self._slot(rank, incarnation)
        if clock > self.spec.iterations:
            raise OutOfRange(f"clock {clock} is beyond the run's {self.spec.iterations} iterations")
        if clock > slot.clock:
            # Only this rank's own pushes could make it ready, and it is waiting here: it would park
            # until its lease ran out. Typically a server restarted from a checkpoint that knows the
            # rank at an earlier clock (the worker's Heartbeat gets that clock and rewinds).
            raise FailedPrecondition(f"rank {rank} pulled clock {clock} but its next clock is {slot.clock}: "
                                     "push the clocks before it first")

    def pull_ready(self, rank: int, incarnation: int, clock: int) -> bool:
        """True when the pull may be served now; raises when it never will be."""
        slot = self._slots[rank]
        if slot.incarnation != incarnation or slot.state in (WorkerState.VACANT, WorkerState.EVICTED):
            raise FailedPrecondition(f"incarnation {incarnation} of rank {rank} was evicted while "
                                     "its pull waited; join again")
        if self.state in (RunState.STOPPED, RunState.FAILED):
            raise FailedPrecondition(f"run {self.run_id} is {self.state.value}: {self.message}")
        if self.state is RunState.PENDING:
            return False
        return slot.clock >= clock and self.min_clock >= self._bound(clock)

    def park(self, rank: int, clock: int | None) -> None:
        """Record (clock) or clear (None) what a parked pull of ``rank`` waits for, and for how long."""
        slot = self._slots[rank]
        slot.waiting_for = clock
        if clock is not None:
            self.counters.pulls_parked += 1
            slot.parked_at = self._now()
        elif slot.parked_at is not None:
            self.counters.parked_seconds += self._now() - slot.parked_at
            slot.parked_at = None

    def read(self, rank: int | None, clock: int, names: list[str] | None) -> ParamsRead:
        """Serve a pull whose wait is over (``rank`` None: an observer's read)."""
        tensors = self.store.read(names)
        guaranteed = self.min_clock if self.spec.staleness else self._applied_clock
        if rank is not None:
            self.clock_records.append(ClockRecord("pull", rank, clock, self.min_clock, time.time()))
            lag = max(0, clock - self.min_clock)
            self.counters.staleness_sum += lag
            self.counters.staleness_max = max(self.counters.staleness_max, lag)
            self.counters.pulls_served += 1  # observers' reads are not the workers' pulls
        self.counters.bytes_pulled += self.store.nbytes if tensors is self.store.params else sum(
            t.nbytes for t in tensors.values())
        return ParamsRead(guaranteed, self.counters.updates_applied, tensors, self.state,
                          self.store.derived if tensors is self.store.params else None)

    # ------------------------------------------------------------------------------ lifecycle
    def stop(self, reason: str) -> None:
        if not self.state.finished:
            self._event("stopped", -1, reason or "stopped by user")
            self._finish(RunState.STOPPED, reason or "stopped by user")

    def _finish(self, state: RunState, message: str) -> None:
        self.state = state
        self.message = message
        self.finished = time.time()
        self._pending.clear()
        self._changed()
        if self.on_checkpoint:
            self.on_checkpoint(self, state.value)

    def _after_clock_change(self) -> None:
        if self.spec.staleness == 0:
            self._apply_ready_clocks()
        if (
            self.state is RunState.RUNNING
            and not any(s.state is WorkerState.ACTIVE for s in self._slots)
            and any(s.state is WorkerState.DONE for s in self._slots)
        ):
            self._event("completed", -1, f"all ranks done at min clock {self.min_clock}")
            self._finish(RunState.COMPLETED, "all ranks finished")
        self._changed()
        every = self.checkpoint_every
        if every and self.on_checkpoint and not self.state.finished:
            m = self.min_clock
            if m // every > self._checkpoint_clock // every:
                self._checkpoint_clock = m
                self.on_checkpoint(self, f"min clock {m}")

    def _apply_ready_clocks(self) -> None:
        """BSP: combine and apply, in clock order, every clock all live ranks have pushed."""
        target = self.min_clock
        while self._applied_clock < target:
            grads = self._pending.pop(self._applied_clock, {})
            self._applied_clock += 1
            if grads:
                self._step(functools.partial(self._combine, grads))

    def _step(self, grads: Mapping[str, Gradient] | Callable[[], Mapping[str, Gradient]],
              flat: np.ndarray | None = None) -> None:
        """Apply one update (``grads`` or what calling it returns; ``flat``: the same gradient laid
        out like ``store.flat``, stepped in one piece); a run whose parameters stop being finite
        has diverged and fails.

        Parameters, optimizer state, hyper-parameters (validated to fit float32) and gradients
        are finite before the step, so a non-finite value can only come from an overflow, a 0/0
        or a division by zero in the combination or the step: the floating-point flags numpy
        checks after every ufunc call catch it without another pass over the model. Only then
        are the parameters and the optimizer state scanned, to name the culprit.
        """
        flags: list[str] = []
        with np.errstate(over="call", invalid="call", divide="call", under="ignore",
                         call=lambda kind, _flag: flags.append(kind)):
            if flat is not None:
                self.optimizer.step_flat(self.store.flat, flat)
            else:
                if callable(grads):
                    grads = grads()
                self.optimizer.step(self.store.params, grads)
        self.counters.updates_applied += 1
        if not flags or self.state is not RunState.RUNNING:
            return
        # The optimizer's state too: an Inf second moment (a huge gradient squared) would freeze
        # its parameters for good without making them non-finite.
        arrays = {**{f"parameter {n!r}": w for n, w in self.store.params.items()},
                  **{f"optimizer state {k!r}": a for k, a in self.optimizer.state_arrays().items()}}
        what = next((label for label, a in arrays.items() if count_non_finite(a)), None)
        if what is None:  # an intermediate overflowed but every value kept is still finite
            return
        why = (f"{what} became NaN/Inf at update {self.counters.updates_applied}: "
               "the training diverged; lower the learning rate")
        self._event("failed", -1, why)
        self._finish(RunState.FAILED, why)

    def _combine(self, by_rank: Mapping[int, Mapping[str, Gradient]]) -> dict[str, np.ndarray]:
        ranks = sorted(by_rank)
        out: dict[str, np.ndarray] = {}
        for name, w in self.store.params.items():
            acc = np.empty_like(w)
            flat = acc.reshape(-1)
            for lo, g in blocks(by_rank[ranks[0]][name], BLOCK):
                flat[lo : lo + g.size] = g
            for r in ranks[1:]:
                for lo, g in blocks(by_rank[r][name], BLOCK):
                    part = flat[lo : lo + g.size]
                    np.add(part, g, out=part)
            if self.spec.aggregation is Aggregation.MEAN and len(ranks) > 1:
                np.multiply(acc, np.float32(1.0 / len(ranks)), out=acc)
            out[name] = acc
        return out

    def _event(self, kind: str, rank: int, message: str) -> None:
        self.events.append(RunEvent(time.time(), kind, rank, message))
        self.event_count += 1

    def _changed(self) -> None:
        self.changes += 1
        self.gate.notify()

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """A consistent snapshot, copied: JSON-able metadata and named arrays.

        Taken between two event-loop steps, it is one instant of the run: parameters, optimizer
        state, every rank's (incarnation, clock) (the de-duplication table) and held BSP gradients
        agree with each other.
        """
        meta: dict[str, Any] = {
            "run_id": self.run_id,
            "spec": spec_to_dict(self.spec),
            "state": self.state.value,
            "message": self.message,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "slots": [
                {"rank": s.rank, "state": s.state.value, "incarnation": s.incarnation, "clock": s.clock,
                 "worker_name": s.worker_name, "pushes": s.pushes, "pulls_skipped": s.pulls_skipped}
                for s in self._slots
            ],
            "next_incarnation": self._next_incarnation,
            "retired_skipped": self._retired_skipped,
            "applied_clock": self._applied_clock,
            "optimizer_steps": self.optimizer.steps,
            "counters": dataclasses.asdict(self.counters),
            "min_clock": self.min_clock,
            "last_eval": dataclasses.asdict(self.last_eval) if self.last_eval else None,
            "points": [dataclasses.asdict(p) for p in list(self.points)[-2000:]],
            "events": [dataclasses.asdict(e) for e in list(self.events)[-500:]],
        }
        arrays = {f"param/{n}": a.copy() for n, a in self.store.params.items()}
        arrays.update({f"opt/{k}": a.copy() for k, a in self.optimizer.state_arrays().items()})
        for clock, by_rank in self._pending.items():
            for rank, grads in by_rank.items():
                arrays.update({f"pending/{clock}/{rank}/{n}": np.array(g) for n, g in grads.items()})
        return meta, arrays

    @classmethod
    def from_state(
        cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], *, now: Callable[[], float] = time.monotonic
    ) -> Run:
        """Rebuild a run from ``state_dict`` output; raises KeyError/ValueError if inconsistent.

        Every rank's lease starts afresh, so workers have a full lease to find the new server.
        """
        run = cls(meta["run_id"], spec_from_dict(meta["spec"]), now=now)
        run.events.clear()
        run.event_count = 0
        run.state = RunState(meta["state"])
        run.message = meta["message"]
        run.created, run.started, run.finished = meta["created"], meta["started"], meta["finished"]
        for s, d in zip(run._slots, meta["slots"], strict=True):
            s.state, s.incarnation, s.clock = WorkerState(d["state"]), d["incarnation"], d["clock"]
            s.worker_name, s.pushes, s.pulls_skipped = d["worker_name"], d["pushes"], d["pulls_skipped"]
            run._touch(s)
        run._clocks_changed()
        run._next_incarnation = meta["next_incarnation"]
        run._retired_skipped = meta["retired_skipped"]
        run._applied_clock = meta["applied_clock"]
        run._checkpoint_clock = meta["min_clock"]
        run.optimizer.steps = meta["optimizer_steps"]
        run.counters = Counters(**meta["counters"])
        run.last_eval = MetricPoint(**meta["last_eval"]) if meta["last_eval"] else None
        run.points.extend(MetricPoint(**p) for p in meta["points"])
        run.events.extend(RunEvent(**e) for e in meta["events"])
        run.event_count = len(run.events)
        for name, target in run.store.params.items():
            _restore(target, arrays[f"param/{name}"], f"param/{name}")
            if not run.state.finished and count_non_finite(target):  # a failed run's may be NaN
                raise ValueError(f"param/{name}: the checkpoint of a {run.state.value} run holds NaN/Inf values")
        for key, target in run.optimizer.state_arrays().items():
            _restore(target, arrays[f"opt/{key}"], f"opt/{key}")
        for key, value in arrays.items():
            if key.startswith("pending/"):
                _, clock, rank, name = key.split("/", 3)
                run._pending.setdefault(int(clock), {}).setdefault(int(rank), {})[name] = value  # type: ignore[index]
        return run

    # ------------------------------------------------------------------------------ status
    def _held_back_message(self, clock: int, what: str) -> str:
        need = self._bound(clock)
        behind = [s for s in self._slots if s.live and s.clock < need]
        who = ", ".join(f"rank {s.rank} (clock {s.clock})" for s in behind) or "nobody"
        return (f"a {what} for clock {clock} needs every live rank at clock >= {need} "
                f"(staleness {self.spec.staleness}); behind: {who}")

    def waiting_for(self) -> str:
        """One sentence: what the run is waiting for right now."""
        if self.state.finished:
            return ""
        vacant = [s.rank for s in self._slots if s.state in (WorkerState.VACANT, WorkerState.EVICTED)]
        if self.state is RunState.PENDING:
            return (f"waiting for {len(vacant)} of {len(self._slots)} ranks to join "
                    f"(vacant: {', '.join(map(str, vacant))})")
        parts = []
        if vacant:
            parts.append(f"ranks {', '.join(map(str, vacant))} vacant, waiting for a worker to join")
        waiters = [s for s in self._slots if s.waiting_for is not None]
        for w in waiters:
            assert w.waiting_for is not None
            need = self._bound(w.waiting_for)
            if w.clock < w.waiting_for:
                parts.append(f"rank {w.rank} waits for its own push of clock {w.clock}")
                continue
            holders = [s for s in self._slots if s.live and s.clock < need]
            if holders:
                who = ", ".join(f"rank {s.rank} (clock {s.clock})" for s in holders)
                parts.append(f"rank {w.rank} (clock {w.clock}) waits for {who} to reach clock {need}")
        return "; ".join(parts)

    def status(self) -> RunStatus:
        now, wall = self._now(), time.time()
        workers = tuple(
            WorkerStatus(
                rank=s.rank,
                state=s.state,
                incarnation=s.incarnation,
                clock=s.clock,
                worker_name=s.worker_name,
                last_seen=(wall - (now - s.last_seen)) if s.incarnation else 0.0,
                pushes=s.pushes,
                waiting_for_clock=s.waiting_for,
                pulls_skipped=s.pulls_skipped,
                data_plane=s.data_plane,
            )
            for s in self._slots
        )
        counters = replace(self.counters, pulls_skipped=self._retired_skipped + sum(s.pulls_skipped for s in self._slots))
        return RunStatus(
            run_id=self.run_id,
            spec=self.spec,
            state=self.state,
            message=self.message,
            created=self.created,
            started=self.started,
            finished=self.finished,
            workers=workers,
            min_clock=self.min_clock,
            max_clock=self.max_clock,
            counters=counters,
            last_eval=self.last_eval,
            waiting_for=self.waiting_for(),
        )
