"""All runs of a server, and the assignment of waiting workers to vacant ranks.

Runs are isolated from each other: each has its own store, optimizer, clocks and gate. Workers
join the cluster, not a run: ``join`` hands them the oldest run with a vacant rank, and ``work``
(a gate) wakes parked joins when a run is created or a rank falls vacant.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from .errors import NotFound, ResourceExhausted, ShuttingDown
from .gate import Gate
from .run import Run
from .spec import RunSpec, validate_spec
from .status import Assignment
from .store import ParamStore

__all__ = ["RunRegistry"]


class RunRegistry:
    def __init__(
        self,
        *,
        max_param_bytes: int = 4 << 30,
        now: Callable[[], float] = time.monotonic,
        configure: Callable[[Run], None] | None = None,
    ) -> None:
        self.max_param_bytes = max_param_bytes
        self._configure = configure
        self.generation = uuid.uuid4().hex[:12]
        self.work = Gate()
        self.shutting_down = False
        # Data-plane operations in progress (a push being received or answered, a pull being
        # served): shutdown waits for these, not for idle long-lived streams.
        self.busy = 0
        self.idle = Gate()
        self._runs: dict[str, Run] = {}
        self._now = now

    def check(self, spec: RunSpec) -> None:
        """Raise InvalidArgument / ResourceExhausted unless this server can run ``spec``."""
        validate_spec(spec)
        nbytes = 4 * spec.num_params
        if nbytes > self.max_param_bytes:
            raise ResourceExhausted(
                f"the run's parameters take {nbytes} bytes, over this server's limit of "
                f"{self.max_param_bytes} (PS_MAX_PARAM_BYTES)"
            )

    def create(self, spec: RunSpec, store: ParamStore | None = None) -> Run:
        """A new run; ``store``: its initial parameters if already built (see ``check``)."""
        self.check(spec)
        run_id = f"run-{uuid.uuid4().hex[:8]}"
        return self.add(Run(run_id, spec, now=self._now, store=store))

    def add(self, run: Run) -> Run:
        """Register a run (new, or restored from a checkpoint)."""
        if self._configure:
            self._configure(run)
        self._runs[run.run_id] = run
        self.work.notify()
        return run

    def op_begin(self) -> None:
        self.busy += 1

    def op_end(self) -> None:
        self.busy -= 1
        if not self.busy:
            self.idle.notify()

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

    def has_work(self, run_id: str = "") -> bool:
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

    def expire_leases(self, lease: float) -> list[tuple[str, int]]:
        """Evict workers whose lease expired, in every unfinished run."""
        evicted = [
            (run.run_id, rank)
            for run in self._runs.values()
            if not run.state.finished
            for rank in run.expire(lease)
        ]
        if evicted:
            self.work.notify()
        return evicted
