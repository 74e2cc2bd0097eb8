"""All runs of a server, and the assignment of waiting workers to vacant ranks.

Runs are isolated from each other: each has its own store, optimizer, clocks and gate. Workers
join the cluster, not a run: ``join`` hands them the oldest run with a vacant rank, and a parked
join (``wait_for_work``) wakes when a run is created or a rank falls vacant. A spec is validated
once, by ``create``, before its run exists. Runs are listed newest first (by creation time), a page
at a time; finished runs are forgotten by ``remove`` or, past the retention limits, by ``prune``.
What the runs hold together (each one's ``footprint``, BSP's held gradients included: finished runs
until forgotten, and runs built but not registered yet) stays within ``max_total_bytes``: ``build``
refuses a run beyond.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial

from .errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Reason,
    ResourceExhausted,
    ShardUnavailable,
    ShuttingDown,
    counted,
    listed,
    quoted,
)
from .gate import Gate
from .placement import Placement
from .run import Run, footprint
from .shard import ShardRun
from .spec import DEFAULT_LIMITS, Limits, RunSpec, validate_spec
from .status import Assignment, RunState
from .store import ParamStore

__all__ = ["RunRegistry"]


_FINISHED = {s.value for s in RunState if s.finished}


def _size(n: int) -> str:
    """``n`` bytes, for a message: '512 bytes', '3.5 MiB', '1.50 GiB'."""
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


def _age(run: Run) -> tuple[float, str]:
    return run.created, run.run_id


def _can(run: Run, capabilities: frozenset[str]) -> bool:
    return all(r in capabilities for r in run.spec.requires)


class RunRegistry:
    def __init__(self, *, max_param_bytes: int = 4 << 30, max_total_bytes: int = 0, limits: Limits = DEFAULT_LIMITS,
                 now: Callable[[], float] = time.monotonic, configure: Callable[[Run], None] | None = None) -> None:
        """``configure``: called with every run as it is added (the checkpointer attaches to it).
        ``max_total_bytes``: what every run's ``footprint`` may add up to (0: no limit)."""
        self.max_param_bytes = max_param_bytes
        self.max_total_bytes = max_total_bytes
        self.limits = limits
        self._configure = configure
        self.generation = uuid.uuid4().hex[:12]
        self.shutting_down = False
        self._work = Gate()
        self._runs: dict[str, Run] = {}
        self._building = 0
        """Runs being built (``build``): they count against ``Limits.max_runs`` already."""
        self._unregistered: dict[Run | str, int] = {}
        """Runs built and not added yet (by id while their arrays are drawn) -> their footprint:
        they count against ``max_total_bytes`` already."""
        self._now = now

    async def create(self, spec: RunSpec, placement: Placement | None = None,
                     ready: Callable[[Run], Awaitable[None]] | None = None) -> Run:
        """Validate ``spec`` (InvalidArgument, ResourceExhausted), draw its initial values off the
        event loop (hundreds of MB take seconds) and register the new run, once ``ready(run)``
        has returned (its first checkpoint written: no one sees the run before; what ``ready``
        raises, the run is not registered)."""
        run = await self.build(f"run-{uuid.uuid4().hex[:8]}", spec, placement)
        try:
            if ready is not None:
                self._building += 1  # (it counts against --max-runs meanwhile)
                try:
                    await ready(run)
                finally:
                    self._building -= 1
        except BaseException:
            self.abandon(run)
            raise
        return self.add(run)

    async def build(self, run_id: str, spec: RunSpec, placement: Placement | None = None,
                    kind: type[Run] = Run) -> Run:
        """A new run as ``create`` makes it, not registered yet (``add`` does): a cluster's owner
        registers its shard once every server has created its own. ``placement``: the part this
        server holds, checked against its --max-param-bytes."""
        validate_spec(spec, self.limits)
        live = self._building + sum(not r.state.finished for r in self._runs.values())
        if live >= self.limits.max_runs:
            raise ResourceExhausted(f"this server holds {counted(live, 'run')} not finished, its limit (ps-server --max-runs): "
                                    "stop or delete one, or wait for one to finish")
        held = placement.held(spec.params) if placement else spec.params
        nbytes = 4 * sum(p.size for p in held)
        if nbytes > self.max_param_bytes:
            part = f"this server's shard of the run takes {nbytes} bytes" if placement else \
                f"the run's parameters take {nbytes} bytes"
            raise ResourceExhausted(f"{part}, over its limit of {self.max_param_bytes}: ask for a smaller model "
                                    "(psctl launch --model), or give the server more (ps-server --max-param-bytes"
                                    + (", or more servers)" if placement else ")"))
        need = footprint(spec, held)
        self._check_total(need, need - footprint(spec, held, finished=True), spec, placement is not None)
        self._building += 1
        self._unregistered[run_id] = need
        try:
            store = await asyncio.to_thread(ParamStore, held, spec.seed)
            run = kind(run_id, spec, now=self._now, store=store, placement=placement)
        finally:
            self._building -= 1
            self._unregistered.pop(run_id, None)
        self._unregistered[run] = run.footprint  # until ``add`` or ``abandon``
        return run

    def _check_total(self, need: int, gradients: int, spec: RunSpec, shard: bool) -> None:
        """ResourceExhausted if ``need`` more bytes (``gradients`` of them BSP's held gradients)
        would take every run held (finished ones too, and those being built) over ``max_total_bytes``."""
        used = self.held_bytes()
        if not self.max_total_bytes or used + need <= self.max_total_bytes:
            return
        held = sorted([(r.footprint, r.run_id, r.state.value) for r in self._runs.values()]
                      + [(n, r if isinstance(r, str) else r.run_id, "being created") for r, n in self._unregistered.items()],
                      key=lambda h: (-h[0], h[1]))  # (largest first)
        finished = [(n, i) for n, i, state in held if state in _FINISHED]
        part = "this server's shard of the run" if shard else "the run"
        what = f"{_size(need)} for its parameters and optimizer state" if not gradients else (
            f"{_size(need)}: {_size(need - gradients)} for its parameters and optimizer state and {_size(gradients)} "
            f"for the gradients of a clock it holds under BSP (staleness 0) until all its {spec.num_workers} ranks "
            "have pushed it, a model's from each but the last (fewer ranks hold fewer; a staleness of 1 or more "
            "applies each push on arrival and holds none)")
        raise ResourceExhausted(
            f"{part} needs {what}, and this server's runs hold "
            f"{_size(used)} of its {_size(self.max_total_bytes)} (ps-server --max-total-bytes): "
            + listed(f"{i} {_size(n)} ({state})" for n, i, state in held)
            + (f"; finished, held until deleted: {counted(len(finished), 'run')}, {_size(sum(n for n, _ in finished))}:"
               " psctl delete RUN (export it first to keep it), or keep fewer (ps-server --keep-finished-runs)"
               if finished else "; delete a run no longer needed (psctl delete --force RUN)")
            + ", or raise ps-server --max-total-bytes where the host has the memory")

    def held_bytes(self) -> int:
        """What every run's ``footprint`` adds up to, finished runs and runs being created included."""
        return sum(r.footprint for r in self._runs.values()) + sum(self._unregistered.values())

    def abandon(self, run: Run) -> None:
        """``run``, built, will not be added: it no longer counts against ``max_total_bytes``."""
        self._unregistered.pop(run, None)

    async def create_shard(self, run_id: str, spec: RunSpec, placement: Placement, created: float) -> Run:
        """This server's shard of a run whose membership another server owns (``ShardRun``); the
        one already here when it was created with the same placement (a retried request)."""
        if run_id in self._runs:
            run = self._runs[run_id]
            if run.placement != placement:
                raise InvalidArgument(f"run {run_id} is here already with another shard map")
            return run
        run = await self.build(run_id, spec, placement, ShardRun)
        run.created = created
        return self.add(run)

    def add(self, run: Run) -> Run:
        """Register a run (new, or restored from a checkpoint)."""
        if self._configure:
            self._configure(run)
        run.row_limit = self.limits.max_pull_rows
        self._unregistered.pop(run, None)
        self._runs[run.run_id] = run
        self._work.notify()
        return run

    def replace(self, run: Run, why: str) -> Run:
        """Put ``run`` (restored from a checkpoint) in place of the run of its id; the parked pulls
        and watchers of the one replaced are released with ShardUnavailable(``why``), retryable."""
        old = self._runs.get(run.run_id)
        if old is not None:
            old.on_change = None
            old.gate.fail_all(ShardUnavailable(why))
        return self.add(run)

    def get(self, run_id: str) -> Run:
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down; retry against its replacement")
        try:
            return self._runs[run_id]
        except KeyError:
            known = listed(r.run_id for r in self.runs()) if self._runs else "none yet"
            raise NotFound(f"no run {quoted(run_id)} on this server; runs: {known}") from None

    def find(self, run_id: str) -> Run | None:
        """``get`` without its errors: None when there is no such run or the server shuts down."""
        return None if self.shutting_down else self._runs.get(run_id)

    def runs(self) -> list[Run]:
        """Newest first: by creation time (a restored run keeps its own), then id."""
        return sorted(self._runs.values(), key=_age, reverse=True)

    def page(self, size: int, token: str = "") -> tuple[list[Run], str]:
        """Up to ``size`` runs, newest first, after the one ``token`` names; and the token of the
        last one when more follow (else ""). InvalidArgument for a token this server did not give."""
        runs = self.runs()
        if token:
            created, _, run_id = token.partition("/")
            try:
                after = (float(created), run_id)
            except ValueError:
                raise InvalidArgument("page_token is not one this server gave: pass next_page_token back as it "
                                      "came") from None
            runs = [r for r in runs if _age(r) < after]
        more = len(runs) > size
        runs = runs[:size]
        return runs, f"{runs[-1].created!r}/{runs[-1].run_id}" if more else ""

    def remove(self, run_id: str) -> Run:
        """Forget a run (NotFound if unknown); its parked joins and watchers are told it is gone.
        (While the server stops too: a deletion under way ends.)"""
        run = self._runs.get(run_id) or self.get(run_id)
        del self._runs[run_id]
        run.on_change = None
        run.gate.fail_all(NotFound(f"run {run_id} was deleted"))
        self._work.notify()
        return run

    def prune(self, keep: int, max_age: float, now: float, spare: Callable[[Run], bool] = lambda run: False,
              ) -> list[Run]:
        """Forget finished runs beyond the ``keep`` most recently finished (0: no limit) and those
        finished more than ``max_age`` seconds before ``now`` (wall time; 0: no limit); never
        those ``spare`` names, which do not count either."""
        finished = sorted((r for r in self._runs.values() if r.state.finished and not spare(r)),
                          key=lambda r: (r.finished or 0.0, r.run_id), reverse=True)
        old = finished[keep:] if keep else []
        if max_age:
            old += [r for r in finished[: keep or None] if (r.finished or 0.0) < now - max_age]
        return [self.remove(r.run_id) for r in old]

    def _has_work(self, run_id: str, capabilities: frozenset[str] = frozenset()) -> bool:
        if run_id:
            return self.get(run_id).has_vacancy()
        return any(r.has_vacancy() and _can(r, capabilities) for r in self._runs.values())

    def join(self, worker_name: str, run_id: str = "", capabilities: frozenset[str] = frozenset(),
             join_token: str = "") -> Assignment | None:
        """Assign a vacant rank of ``run_id`` (or of the oldest run with one that a worker of
        ``capabilities`` can train: ``RunSpec.requires``); None if none. FailedPrecondition
        (UNSUPPORTED) when the worker cannot train ``run_id``. A Join asked again with the
        ``join_token`` of one whose answer was lost gets the rank that one took (``Run.joined``)."""
        if run_id:
            run = self.get(run_id)
            if not _can(run, capabilities):
                missing = sorted(set(run.spec.requires) - capabilities)
                raise FailedPrecondition(f"run {run_id} requires {', '.join(missing)}, which this worker cannot do "
                                         f"(it can: {', '.join(sorted(capabilities)) or 'nothing declared'}); start a "
                                         "worker that can (the Python ps-worker trains every model)", Reason.CANNOT_TRAIN)
            return run.joined(join_token) or run.join(worker_name, join_token)
        again = next((a for r in self._runs.values() if (a := r.joined(join_token)) is not None), None)
        if again is not None:
            return again
        for run in sorted(self._runs.values(), key=_age):  # (a restarted server adds its runs by id)
            if run.has_vacancy() and _can(run, capabilities):
                return run.join(worker_name, join_token)
        return None

    async def wait_for_work(self, run_id: str, timeout: float, capabilities: frozenset[str] = frozenset()) -> bool:
        """True once ``run_id`` (any run a worker of ``capabilities`` can train, when empty) has a
        vacant rank; False after ``timeout``."""
        return await self._work.wait_for(partial(self._has_work, run_id, capabilities), timeout)

    def vacated(self) -> None:
        """A rank fell vacant (a worker left): wake parked joins."""
        self._work.notify()

    def expire_leases(self, lease: float) -> list[tuple[str, int]]:
        """Evict workers whose lease expired, in every unfinished run."""
        evicted = [(run.run_id, rank) for run in self._runs.values() if not run.state.finished
                   for rank in run.expire(lease)]
        if evicted:
            self._work.notify()
        return evicted

    def shut_down(self, why: ShuttingDown) -> None:
        """Refuse every call from now on and release every parked pull and join with ``why``."""
        self.shutting_down = True
        for run in self._runs.values():
            run.gate.fail_all(why)
        self._work.fail_all(why)
