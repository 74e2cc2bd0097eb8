"""All runs of a server, and the assignment of waiting workers to vacant ranks.

Runs are isolated from each other: each has its own store, optimizer, clocks and gate. Workers
join the cluster, not a run: ``join`` hands them the oldest run with a vacant rank, and a parked
join (``wait_for_work``) wakes when a run is created or a rank falls vacant. A spec is validated
once, by ``create``, before its run exists.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from functools import partial

from .errors import NotFound, ResourceExhausted, ShuttingDown
from .gate import Gate
from .run import Run
from .spec import RunSpec, validate_spec
from .status import Assignment
from .store import ParamStore

__all__ = ["RunRegistry"]


class RunRegistry:
    def __init__(self, *, max_param_bytes: int = 4 << 30, now: Callable[[], float] = time.monotonic,
                 configure: Callable[[Run], None] | None = None) -> None:
        """``configure``: called with every run as it is added (the checkpointer attaches to it)."""
        self.max_param_bytes = max_param_bytes
        self._configure = configure
        self.generation = uuid.uuid4().hex[:12]
        self.shutting_down = False
        self._work = Gate()
        self._runs: dict[str, Run] = {}
        self._now = now

    async def create(self, spec: RunSpec) -> Run:
        """Validate ``spec`` (InvalidArgument, ResourceExhausted), draw its initial values off the
        event loop (hundreds of MB take seconds) and register the new run."""
        validate_spec(spec)
        nbytes = 4 * spec.num_params
        if nbytes > self.max_param_bytes:
            raise ResourceExhausted(f"the run's parameters take {nbytes} bytes, over this server's limit of "
                                    f"{self.max_param_bytes} (PS_MAX_PARAM_BYTES)")
        store = await asyncio.to_thread(ParamStore, spec.params, spec.seed)
        return self.add(Run(f"run-{uuid.uuid4().hex[:8]}", spec, now=self._now, store=store))

    def add(self, run: Run) -> Run:
        """Register a run (new, or restored from a checkpoint)."""
        if self._configure:
            self._configure(run)
        self._runs[run.run_id] = run
        self._work.notify()
        return run

    def get(self, run_id: str) -> Run:
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down; retry against its replacement")
        try:
            return self._runs[run_id]
        except KeyError:
            known = ", ".join(reversed(self._runs)) or "none yet"
            raise NotFound(f"no run {run_id!r} on this server; runs: {known}") from None

    def runs(self) -> list[Run]:
        """Newest first."""
        return list(reversed(self._runs.values()))

    def _has_work(self, run_id: str) -> bool:
        if run_id:
            return self.get(run_id).has_vacancy()
        return any(r.has_vacancy() for r in self._runs.values())

    def join(self, worker_name: str, run_id: str = "") -> Assignment | None:
        """Assign a vacant rank of ``run_id`` (or of the oldest run with one); None if none."""
        if run_id:
            return self.get(run_id).join(worker_name)
        for run in self._runs.values():
            if run.has_vacancy():
                return run.join(worker_name)
        return None

    async def wait_for_work(self, run_id: str, timeout: float) -> bool:
        """True once ``run_id`` (any run when empty) has a vacant rank; False after ``timeout``."""
        return await self._work.wait_for(partial(self._has_work, run_id), timeout)

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
