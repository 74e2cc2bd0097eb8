"""A run as a checkpoint and back: JSON-able metadata and named arrays (``checkpoint`` writes them).

``state_dict`` is taken between two event-loop steps, so it is one instant of the run: parameters,
optimizer state, every rank's (incarnation, clock) (the de-duplication table), the clock its
incarnation holds it from, the (incarnation, clock) the one it replaced ended at, the token of the
Join that handed it over (until its first call), the loosest bound it was told since its last push,
and the held BSP gradients agree with each other. ``restore`` rebuilds the run and refuses
(KeyError, ValueError) a checkpoint that does not fit its own spec, so a damaged one is never
loaded silently.
"""

from __future__ import annotations

import dataclasses
import numbers
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .placement import Piece, Placement, ShardMap
from .run import Run
from .shard import ShardRun
from .spec import UNBOUNDED, spec_from_dict, spec_to_dict
from .ssp import tighter
from .status import Counters, MetricPoint, RunEvent, RunState, WorkerState
from .tensors import Rows, count_non_finite

__all__ = ["restore", "state_dict"]


def state_dict(run: Run, cut: int | None = None, copy: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A consistent snapshot of ``run``, copied, labelled ``cut`` (default: its min clock).
    ``copy=False``: its arrays themselves, for a run nothing changes while they are written (a
    new run, not registered yet: a copy of a 4 GiB Adam run is 12 GiB, made on the event loop)."""
    meta: dict[str, Any] = {
        "run_id": run.run_id,
        "cut": run.min_clock if cut is None else cut,
        "spec": spec_to_dict(run.spec),
        "state": run.state.value,
        "bounds": list(run.bounds),
        "message": run.message,
        "created": run.created,
        "started": run.started,
        "finished": run.finished,
        "slots": [
            {"rank": s.rank, "state": s.state.value, "incarnation": s.incarnation, "clock": s.clock, "start": s.start,
             "worker_name": s.worker_name, "pushes": s.pushes, "pulls_skipped": s.pulls_skipped, "told": s.told,
             "replaced": None if s.replaced is None else list(s.replaced), "join_token": s.join_token}
            for s in run.clock.slots
        ],
        "next_incarnation": run.clock.next_incarnation,
        "retired_skipped": run.clock.retired_skipped,
        "applied_clock": run.bsp.applied_clock,
        "next_step": run.next_step,
        "optimizer_steps": run.optimizer.steps,
        "counters": dataclasses.asdict(run.counters),
        "min_clock": run.min_clock,
        "last_eval": dataclasses.asdict(run.history.last_eval) if run.history.last_eval else None,
        "points": [dataclasses.asdict(p) for p in list(run.history.points)[-2000:]],
        "events": [dataclasses.asdict(e) for e in list(run.history.events)[-500:]],
        "placement": None if run.placement is None else {
            "index": run.placement.index,
            "shards": [[[pc.name, pc.start, pc.end] for pc in pieces] for pieces in run.placement.shard_map.shards],
        },
    }
    arrays = {f"param/{n}": a.copy() if copy else a for n, a in run.store.params.items()}
    arrays.update({f"opt/{k}": a.copy() if copy else a for k, a in run.optimizer.state_arrays().items()})
    for clock, by_rank in run.bsp.pending.items():
        for rank, grads in by_rank.items():
            for n, g in grads.items():
                if isinstance(g, Rows):  # a table's rows: ids and values
                    arrays[f"rows/{clock}/{rank}/ids/{n}"] = np.array(g.ids)
                    arrays[f"rows/{clock}/{rank}/values/{n}"] = np.array(g.values)
                else:
                    arrays[f"pending/{clock}/{rank}/{n}"] = np.array(g)
    return meta, arrays


def _fill(target: np.ndarray, value: np.ndarray, key: str) -> None:
    if value.shape != target.shape or value.dtype != target.dtype:
        raise ValueError(f"{key}: checkpoint has {value.dtype}{list(value.shape)}, "
                         f"the spec needs {target.dtype}{list(target.shape)}")
    target[...] = value


def _count(value: object) -> int:
    """A count or clock of a checkpoint's manifest; TypeError unless it is one."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise TypeError(f"{value!r} is not a count")
    return int(value)


def _bounds(value: object) -> tuple[int, int]:
    """The (tightest, loosest) bounds of a checkpoint's manifest; TypeError unless they are two
    bounds, the first the tighter."""
    try:
        if not isinstance(value, list) or len(value) != 2 or None in value:
            raise TypeError
        tightest, loosest = _bound(value[0]), _bound(value[1])
        if tightest is None or loosest is None or tighter(tightest, loosest) != tightest:
            raise TypeError
    except TypeError:
        raise TypeError(f"{value!r} is not a pair of staleness bounds (tightest, loosest)") from None
    return tightest, loosest


def _bound(value: object) -> int | None:
    """The loosest staleness bound a rank was told since its last push, of a checkpoint's manifest (None: none, or a
    checkpoint from before they were kept); TypeError unless it is one."""
    if value is None:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < UNBOUNDED:
        raise TypeError(f"{value!r} is not a staleness bound")
    return int(value)


def _replaced(value: object) -> tuple[int, int] | None:
    """The (incarnation, clock) a rank's replaced incarnation ended at, of a checkpoint's manifest (None: none,
    or a checkpoint from before they were kept); TypeError unless it is one."""
    if value is None:
        return None
    try:
        if not isinstance(value, list) or len(value) != 2:
            raise TypeError
        return _count(value[0]), _count(value[1])
    except TypeError:
        raise TypeError(f"{value!r} is not the (incarnation, clock) of a replaced incarnation") from None


def _token(value: object) -> str:
    """The ``JoinRequest.join_token`` a rank was handed over with, of a checkpoint's manifest ("": none); TypeError
    unless it is a string."""
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a join token")
    return value


def restore(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], *,
            now: Callable[[], float] = time.monotonic) -> Run:
    """Rebuild a run from ``state_dict`` output; raises KeyError/ValueError if inconsistent.
    Every rank's lease starts afresh, so workers have a full lease to find the new server."""
    placed = meta.get("placement")  # absent in checkpoints of before clusters
    placement = None if placed is None else Placement(
        ShardMap(tuple(tuple(Piece(n, s, e) for n, s, e in pieces) for pieces in placed["shards"])), placed["index"])
    kind = ShardRun if placement is not None and placement.index != 0 else Run  # server 0 owns membership
    run = kind(meta["run_id"], spec_from_dict(meta["spec"]), now=now, placement=placement)
    run.state = RunState(meta["state"])
    run.message = meta["message"]
    run.created, run.started, run.finished = meta["created"], meta["started"], meta["finished"]
    for s, d in zip(run.clock.slots, meta["slots"], strict=True):  # (numbers as numbers: a wrong one is refused here)
        s.state, s.incarnation, s.clock = WorkerState(d["state"]), _count(d["incarnation"]), _count(d["clock"])
        s.worker_name, s.pushes, s.pulls_skipped = str(d["worker_name"]), _count(d["pushes"]), _count(d["pulls_skipped"])
        s.told = _bound(d.get("told"))  # (its push is checked against it too: ``Run._push_spec``)
        # (a cluster's servers compare it: ``UpdateShardResponse.start_clocks``; absent before it was kept)
        s.start = _count(d.get("start", 0))
        if s.start > s.clock:
            raise ValueError(f"rank {s.rank} starts at clock {s.start}, past its clock {s.clock}")
        # (a cluster's servers compare it: ``UpdateShardResponse.replaced``; absent before it was kept: none)
        s.replaced = _replaced(d.get("replaced"))
        # (a Join whose answer was lost asks the restarted server again with it: ``Run.joined``; absent before it was
        # kept: none)
        s.join_token = _token(d.get("join_token", ""))
    run.clock.restored()
    if "bounds" in meta:  # (absent in checkpoints of before it: the bound they hold, widened by ``resume_schedule``)
        run.bounds = _bounds(meta["bounds"])
    if "next_step" in meta:
        run.next_step = _count(meta["next_step"])
    else:  # (a checkpoint from before they held it)
        run.resume_schedule()
    run.clock.next_incarnation = _count(meta["next_incarnation"])
    run.clock.retired_skipped = _count(meta["retired_skipped"])
    run.bsp.applied_clock = _count(meta["applied_clock"])
    run.optimizer.steps = _count(meta["optimizer_steps"])
    run.counters = Counters(**meta["counters"])
    run.history.restore((MetricPoint(**p) for p in meta["points"]), (RunEvent(**e) for e in meta["events"]),
                        MetricPoint(**meta["last_eval"]) if meta["last_eval"] else None)
    for name, target in run.store.params.items():
        _fill(target, arrays[f"param/{name}"], f"param/{name}")
        if not run.state.finished and count_non_finite(target):  # a failed run's may be NaN
            raise ValueError(f"param/{name}: the checkpoint of a {run.state.value} run holds NaN/Inf values")
    for key, target in run.optimizer.state_arrays().items():
        _fill(target, arrays[f"opt/{key}"], f"opt/{key}")
    for key, value in arrays.items():
        if key.startswith("pending/"):
            _, clock, rank, name = key.split("/", 3)
            run.bsp.pending.setdefault(int(clock), {}).setdefault(int(rank), {})[name] = value  # type: ignore[index]
        elif key.startswith("rows/") and key.split("/", 4)[3] == "ids":
            _, clock, rank, _, name = key.split("/", 4)
            values = arrays[f"rows/{clock}/{rank}/values/{name}"]
            shape = run.store.specs[name].shape
            run.bsp.pending.setdefault(int(clock), {}).setdefault(int(rank), {})[name] = Rows(value, values, shape)  # type: ignore[index]
    return run
