"""What one rank's training of an assignment ends with: its statistics (``TrainStats``) and how it
ended (``Outcome``), which ps-worker turns into its log line, its exit status and what it does next."""

from __future__ import annotations

from dataclasses import dataclass

from paramserver.v1 import paramserver_pb2 as pb

__all__ = ["Outcome", "TrainStats"]


@dataclass
class TrainStats:
    iterations: int = 0
    pulls: int = 0
    pulls_skipped: int = 0
    retries: int = 0
    rewinds: int = 0
    last_loss: float = float("nan")
    final_accuracy: float | None = None


@dataclass(frozen=True)
class Outcome:
    run_id: str
    rank: int
    completed: bool
    """This rank trained all its iterations and left."""
    reason: str
    stats: TrainStats
    failed: bool = False
    """This worker could not train (bad data or model, divergence): it failed the run."""
    run_state: int = pb.RUN_STATE_UNSPECIFIED
    """The run's state when it ended under this rank (STOPPED, FAILED), as the server said in a
    refusal's ErrorInfo or a heartbeat; UNSPECIFIED when the run did not end."""
    evicted: bool = False
    """The server gave this rank to another worker (a refusal: stale incarnation)."""
    unfit: bool = False
    """This worker cannot take part in the run as it is set up (an answer over its own
    --max-message-bytes, not enough memory): it gave the rank back, and the run goes on without it."""
