"""The stale-synchronous rule: when a rank may read (pull) and complete (push) an iteration.

With staleness s, a rank about to compute iteration c needs every live rank to have completed
c - s iterations, i.e. the min clock >= c - s (``needed``; s unbounded needs nothing). Its pull of
c waits until then (and until its own pushes before c are in); its push of c is refused before
then, so the invariant holds even against a misbehaving worker: no rank completes iteration c while
a live rank's clock is < c - s. Clock ``iterations`` is the read of the final parameters: it needs
every rank finished.

Pure functions of the spec and the vector clock; the run applies them and parks on its gate.
"""

from __future__ import annotations

from .clock import Slot, VectorClock
from .errors import FailedPrecondition, OutOfRange, Reason, WaitTimeout, counted, listed
from .spec import UNBOUNDED, RunSpec
from .status import WorkerState

__all__ = ["check_pull", "check_push", "looser", "needed", "pull_ready", "tighter", "wait_timeout", "waiting_for"]

_SENTENCES = 5  # waiting ranks described one by one in ``waiting_for``; the others are counted


def looser(a: int, b: int) -> int:
    """The looser of two bounds (-1, unbounded, is the loosest)."""
    return UNBOUNDED if UNBOUNDED in (a, b) else max(a, b)


def tighter(a: int, b: int) -> int:
    """The tighter of two bounds (0, BSP, is the tightest; -1, unbounded, the loosest)."""
    return b if a == UNBOUNDED else a if b == UNBOUNDED else min(a, b)


def needed(spec: RunSpec, clock: int) -> int | None:
    """The min clock a rank needs before it computes iteration ``clock`` (None: never waits)."""
    if clock >= spec.iterations:
        return spec.iterations
    return None if spec.unbounded else clock - spec.staleness


def _describe(slots: list[Slot]) -> str:
    return listed(f"rank {s.rank} (clock {s.clock})" for s in slots) if slots else "nobody"


def _clock_ahead(slot: Slot, clock: int, what: str) -> FailedPrecondition:
    return FailedPrecondition(f"rank {slot.rank} {what} clock {clock} but its next clock is {slot.clock}: "
                              + ("pushes must arrive in clock order" if what == "pushed" else
                                 "push the clocks before it first"), Reason.CLOCK_AHEAD, next_clock=slot.clock)


def check_push(spec: RunSpec, vc: VectorClock, slot: Slot, clock: int) -> None:
    """Raise unless ``slot``'s push of iteration ``clock`` (not a retry) may be applied now."""
    if clock >= spec.iterations:
        raise OutOfRange(f"clock {clock} is beyond the run's {spec.iterations} iterations")
    if clock > slot.clock:
        raise _clock_ahead(slot, clock, "pushed")
    need = needed(spec, clock)
    if need is not None and vc.min_clock < need:
        behind = vc.behind(need)
        raise FailedPrecondition(
            f"a push for clock {clock} needs every live rank at clock >= {need} (staleness {spec.staleness}); "
            f"behind: {_describe(behind)}", Reason.STALENESS_BOUND, needed_min_clock=need,
            ranks_behind=[s.rank for s in behind])


def check_pull(spec: RunSpec, slot: Slot, clock: int) -> None:
    """Raise if ``slot``'s pull of ``clock`` could never be served."""
    if clock > spec.iterations:
        raise OutOfRange(f"clock {clock} is beyond the run's {spec.iterations} iterations")
    if clock > slot.clock:
        # Only this rank's own pushes could make it ready, and it is waiting here: it would park
        # until its lease ran out. Typically a server restarted from a checkpoint that knows the
        # rank at an earlier clock (the worker goes back to that clock).
        raise _clock_ahead(slot, clock, "pulled")


def pull_ready(spec: RunSpec, vc: VectorClock, slot: Slot, clock: int) -> bool:
    need = needed(spec, clock)
    return slot.clock >= clock and (need is None or vc.min_clock >= need)


def wait_timeout(spec: RunSpec, vc: VectorClock, clock: int, timeout: float, sentence: str) -> WaitTimeout:
    need = needed(spec, clock)
    behind = vc.behind(need) if need is not None else []
    return WaitTimeout(f"waited {timeout:.1f}s: {sentence}", needed_min_clock=need,
                       ranks_behind=[s.rank for s in behind])


def waiting_for(spec: RunSpec, vc: VectorClock, pending: bool) -> str:
    """One sentence: what a run waits for right now (who holds whose pull back)."""
    vacant = [s.rank for s in vc.vacant()]
    if pending:
        return f"waiting for {len(vacant)} of {counted(len(vc.slots), 'rank')} to join (vacant: {listed(vacant)})"
    parts = []
    if vacant:
        many = len(vacant) > 1
        if vc.any_in(WorkerState.ACTIVE):  # (a vacant rank holds nobody back: the min clock is the live ranks')
            parts.append(f"rank{'s' * many} {listed(vacant)} vacant: the others go on without "
                         f"{'them' if many else 'it'} until a worker joins")
        else:
            parts.append(f"rank{'s' * many} {listed(vacant)} vacant, waiting for a worker to join")
    waiting = [(w, w.waiting_for) for w in vc.slots if w.waiting_for is not None]
    for w, clock in waiting[:_SENTENCES]:
        if w.clock < clock:
            parts.append(f"rank {w.rank} waits for its own push of clock {w.clock}")
            continue
        need = needed(spec, clock)
        holders = vc.behind(need) if need is not None else []
        if holders:
            parts.append(f"rank {w.rank} (clock {w.clock}) waits for {_describe(holders)} to reach clock {need}")
    if len(waiting) > _SENTENCES:
        parts.append(f"and {len(waiting) - _SENTENCES} more ranks wait")
    return "; ".join(parts)
