"""What the training loop does when a call to the server fails: retry it, go back to an earlier
clock, or end the assignment (``Outcome``), as the loop of ``worker/trainer.py`` uses it.

Failures: a push or pull that fails with a retryable error (Unavailable, DeadlineExceeded) is
retried with backoff (a retried push is exactly-once on the server), for up to 4 x
--timeout-seconds, and a pull that waited the server's whole limit for ranks still training
(WAIT_TIMEOUT naming them) for as long as they train (``Retries.call``); a refusal whose reason is
CLOCK_AHEAD (the server restarted from a checkpoint and knows this rank at an earlier clock, in
the error's ``next_clock``) sends the loop back to that clock (``_Rewind``); a push refused by the
staleness bound (STALENESS_BOUND: a server restarted from a checkpoint that has this rank's clock,
but not updates of others the parameters held contain) pulls again and computes that clock again;
a stale incarnation or a stopped run ends the assignment (``_ended``) and the worker goes back to
waiting for work.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from paramserver import errors
from paramserver.client import PsClient
from paramserver.v1 import paramserver_pb2 as pb

from .config import WorkerConfig
from .outcome import Outcome, TrainStats

__all__ = ["Retries"]

log = logging.getLogger("ps_worker")
T = TypeVar("T")


class _Rewind(Exception):
    """The server knows this rank at an earlier clock (it restarted from a checkpoint): go back."""

    def __init__(self, clock: int) -> None:
        super().__init__(f"rewind to clock {clock}")
        self.clock = clock


class Retries:
    """The retry rules of the training loop (``trainer._Trainer``), over what they read of it."""

    client: PsClient
    a: pb.Assignment
    config: WorkerConfig
    stats: TrainStats
    clock: int

    async def call(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``op``; retry transient failures (UNAVAILABLE, DEADLINE_EXCEEDED) with jittered backoff.

        After each failure the worker asks the server where it stands (Heartbeat): a server that
        restarted from a checkpoint may know this rank at an earlier clock, and then the loop
        rewinds there (``_Rewind``) instead of retrying an operation the server cannot accept.
        A retried push is safe: the server de-duplicates it. A pull parked past the server's limit
        behind ranks still training (WAIT_TIMEOUT naming them) is asked again at once, for as long
        as they train: they are live, and the bound says to wait for them.
        """
        delay, deadline = 0.05, time.monotonic() + self.config.timeout_seconds * 4
        while True:
            try:
                return await op()
            except errors.PsError as exc:
                if exc.reason == pb.ERROR_REASON_CLOCK_AHEAD and exc.info.next_clock <= self.clock:
                    self._rewind(exc.info.next_clock)
                if exc.reason == pb.ERROR_REASON_STALENESS_BOUND:
                    # Only a push computed on parameters the server no longer guarantees is refused
                    # so (a pull waits for the bound): it restarted from a checkpoint that has this
                    # rank's clock, but not updates of others the copy held. Pull again from here.
                    log.warning("push %d refused by the staleness bound: the server lost updates the parameters "
                                "held contain (it restarted); pulling again", self.clock)
                    raise _Rewind(self.clock) from None
                if exc.reason == pb.ERROR_REASON_WAIT_TIMEOUT and exc.info.ranks_behind:
                    # Parked the server's whole limit behind ranks that are live (their leases) and
                    # still training: waiting for them is this rank's part of the bound, not a failure.
                    log.info("%s waits for rank%s %s; asking again", what, "s" * (len(exc.info.ranks_behind) > 1),
                             ", ".join(map(str, exc.info.ranks_behind[:5])))
                    deadline, delay = time.monotonic() + self.config.timeout_seconds * 4, 0.05
                    continue
                if not exc.retryable or time.monotonic() > deadline:
                    raise
                self.stats.retries += 1
                log.info("%s failed (%s); retrying in %.2fs", what, exc.code.name, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)
                await self.resync()

    async def resync(self) -> None:
        try:
            hb = await self.client.heartbeat(self.a.run_id, self.a.rank, self.a.incarnation, self.clock)
        except errors.PsError as exc:
            if exc.retryable:
                return
            raise
        if hb.clock < self.clock:
            self._rewind(hb.clock)

    def _rewind(self, clock: int) -> None:
        log.warning("the server knows rank %d at clock %d (it restarted); going back from clock %d",
                    self.a.rank, clock, self.clock)
        raise _Rewind(clock)


def _state(state: int) -> str:
    name = pb.RunState.Name(state) if state in pb.RunState.values() else f"in state {state}"
    return str(name).removeprefix("RUN_STATE_").lower()


def _ended(trainer: Retries, exc: errors.PsError) -> Outcome:
    """The outcome of an assignment the server ended (the run stopped or failed, the rank was given
    to another worker, the run is gone, the server out of reach), from the refusal's class and
    reason, never its wording; the error's text stays in ``reason`` for the log."""
    a, stats = trainer.a, trainer.stats
    if exc.reason == pb.ERROR_REASON_RUN_NOT_RUNNING and exc.info.run_state:
        return Outcome(a.run_id, a.rank, False, f"the run is {_state(exc.info.run_state)}", stats,
                       run_state=exc.info.run_state)
    if exc.reason == pb.ERROR_REASON_STALE_INCARNATION:
        return Outcome(a.run_id, a.rank, False, "this rank was evicted (given to another worker)", stats, evicted=True)
    return Outcome(a.run_id, a.rank, False, str(exc), stats)
