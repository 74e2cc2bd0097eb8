"""Lifecycle states and read-only snapshots of a run: values the status RPC and psctl render.

Plain values with no behaviour; the run's spec is not repeated in them (a run's ``spec`` is its own
attribute).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Assignment",
    "Counters",
    "MetricPoint",
    "ParamsRead",
    "PushResult",
    "RunEvent",
    "RunState",
    "RunStatus",
    "WorkerState",
    "WorkerStatus",
]


class RunState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (RunState.COMPLETED, RunState.STOPPED, RunState.FAILED)


class WorkerState(enum.Enum):
    VACANT = "vacant"
    ACTIVE = "active"
    DONE = "done"
    EVICTED = "evicted"
    STOPPED = "stopped"  # active when the run was stopped or failed


@dataclass
class Counters:
    pushes_applied: int = 0
    pushes_duplicate: int = 0
    pushes_rejected: int = 0
    pulls_served: int = 0
    pulls_parked: int = 0
    pulls_skipped: int = 0
    bytes_pushed: int = 0
    bytes_pulled: int = 0
    updates_applied: int = 0
    evictions: int = 0
    staleness_sum: int = 0
    staleness_max: int = 0
    parked_seconds: float = 0.0
    """Time pulls spent parked by the SSP rule, summed over pulls."""
    rows_pulled: int = 0
    """Rows of tables sent by pulls."""
    rows_pushed: int = 0
    """Rows of tables received by pushes (a row repeated in one push counted once)."""
    lr_scaled: int = 0
    """Pushes whose learning rate was divided by their staleness (``RunSpec.staleness_aware_lr``)."""
    lr_scale_sum: float = 0.0
    """The sum of those pushes' scales (1 / staleness)."""

    def pulled(self, staleness: int) -> None:
        """A worker's pull was served, ``staleness`` clocks ahead of the min clock."""
        self.pulls_served += 1
        self.staleness_sum += staleness
        self.staleness_max = max(self.staleness_max, staleness)


@dataclass(frozen=True)
class MetricPoint:
    rank: int
    clock: int
    time: float
    loss: float
    eval: bool = False
    eval_loss: float = float("nan")
    eval_accuracy: float = float("nan")
    samples: int = 0
    step_seconds: float = 0.0
    eval_auc: float = float("nan")


@dataclass(frozen=True)
class RunEvent:
    time: float
    kind: str
    rank: int
    message: str


@dataclass(frozen=True)
class WorkerStatus:
    rank: int
    state: WorkerState
    incarnation: int
    clock: int
    worker_name: str
    last_seen: float
    """Wall time of the last RPC, 0 if never."""
    pushes: int
    waiting_for_clock: int | None
    """Min clock a parked pull of this rank waits for, None when not waiting."""
    pulls_skipped: int
    data_plane: str = ""
    """What the rank's last push came over: "tcp" (the TCP data plane), "grpc", "" (none yet)."""


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    state: RunState
    message: str
    created: float
    started: float | None
    finished: float | None
    workers: tuple[WorkerStatus, ...]
    min_clock: int
    max_clock: int
    counters: Counters
    last_eval: MetricPoint | None
    waiting_for: str
    active_workers: int = 0
    bounds: tuple[int, int] | None = None
    """(tightest, loosest) staleness bound the run has been under (``Run.bounds``)."""


@dataclass(frozen=True)
class Assignment:
    run_id: str
    rank: int
    incarnation: int
    start_clock: int


@dataclass(frozen=True)
class PushResult:
    clock: int
    duplicate: bool
    min_clock: int
    run_state: RunState
    staleness: int | None = None
    """The run's bound now (it may change while the run runs: ``Run.set_staleness``)."""
    lr_scale: float | None = None
    """The factor the push's learning rate was multiplied by (``RunSpec.staleness_aware_lr``; a
    duplicate's: the rank's last push's), for the worker's own step; None: no such run, or unknown."""


@dataclass(frozen=True)
class ParamsRead:
    guaranteed_clock: int
    version: int
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    """Name -> numpy array (live views: encode them before the next state change)."""
    run_state: RunState = RunState.RUNNING
    derived: dict[Any, Any] | None = None
    """``ParamStore.derived`` when ``tensors`` is the whole model (else None): where the transport
    keeps what it derives from the store's arrays once (their message layout)."""
    rows: dict[str, tuple[np.ndarray, np.ndarray, tuple[int, ...]]] = field(default_factory=dict)
    """Table name -> (row ids as asked, those rows' values (a copy), the table's shape)."""
    wire_dtype: str = "float32"
    """What the answer carries (``RunSpec.wire_dtype``): the transport converts ``tensors``."""
    delta: dict[str, np.ndarray] | None = None
    """A delta pull's answer: tensor name -> positions (uint32) changed since the caller's version;
    tensors not named did not change (None: the answer is whole)."""
    lineage: int = 0
    """The store's lineage (``ParamStore.lineage``)."""
    staleness: int | None = None
    """The run's bound now (None: an observer's read)."""
