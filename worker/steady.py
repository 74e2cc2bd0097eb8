"""The steady state of a small dense model's training: iterations without the event loop.

After its first iteration, a rank training a small dense model on one server pushes each gradient
with the pull of its next clock (then_pull), and reuses nothing (the cache is not valid, or s <= 0).
On the shared-memory data plane with the C exchange built, ``PsClient.push_pull_now`` is that push
and pull in one call, whose answer comes within it (``paramserver.exchange``). ``Steady.run`` does
such iterations one after another in one synchronous loop: the gradient, the push, the clock and
statistics ``advance`` keeps. Among five processes on two cores every call of Python a push makes
is paid again, cold (bench/RESULTS.md, Performance round 2, sections 18 to 20): coroutines,
protobuf acknowledgements and result objects are made only when an answer did not come in time.

It returns to the trainer's loop for everything else: an evaluation, a report due (the event loop
then runs the heartbeat too), a clock whose cached parameters are still valid, the last iteration
(its final pull), and an answer the C exchange did not give, awaited, with the retry rules for a
failure as ``step``'s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import numpy as np

from paramserver import errors
from paramserver.client import Grad, PsClient, PullResult
from paramserver.exchange import Answer
from paramserver.shards import Shards
from paramserver.v1 import paramserver_pb2 as pb

from .config import WorkerConfig
from .models.base import Model
from .outcome import TrainStats
from .sampling import BatchSampler

__all__ = ["Steady"]

T = TypeVar("T")


class Loop(Protocol):
    """What the steady iterations use of the training loop (``trainer._Trainer``): its clocks and
    what it holds of the parameters pulled, kept as its own iterations keep them."""

    a: pb.Assignment
    spec: pb.RunSpec
    config: WorkerConfig
    model: Model
    X: Any
    y: Any
    sampler: BatchSampler
    plane: PsClient | Shards
    stats: TrainStats
    clock: int
    staleness: int
    min_clock: int
    run_state: int
    _train_points: list[tuple[int, float, float, int, float]]
    _evaluates: bool
    _last_report: float
    _prefetched: int | None
    _since: tuple[int, int] | None
    _version: int | None
    _own: int
    _samples: int

    async def call(self, op: Callable[[], Awaitable[T]], what: str) -> T: ...
    def check_loss(self, loss: float, clock: int) -> None: ...
    def _learn(self, staleness: int | None) -> None: ...
    def _hold(self, res: PullResult) -> None: ...
    def _push_op(self, c: int, grads: Mapping[str, Grad], loss: float, into: dict[str, np.ndarray] | None,
                 version: int | None) -> Callable[[], Awaitable[tuple[pb.PushGradientResponse, PullResult | None]]]: ...
    async def advance(self, resp: pb.PushGradientResponse, c: int, loss: float, samples: int, t0: float,
                      t_compute: float, comm: float, parked: bool) -> None: ...


class Steady:
    """The steady iterations of one trainer (``_Trainer._steady``: one server, a small dense model,
    no compression, overlap or straggler delays)."""

    def __init__(self, t: Loop) -> None:
        assert isinstance(t.plane, PsClient)
        self.t = t
        self.plane: PsClient = t.plane

    def run(self, params: dict[str, np.ndarray]) -> int | Awaitable[int] | None:
        """Steady iterations from the trainer's clock on, while each is one (``_prefetched``: the
        last push brought the parameters, and no iteration of another kind is due) and its answer
        comes within the call. Returns the guaranteed clock of the parameters the last one used
        (the trainer's loop then reports when a report is due); an awaitable of it when an
        iteration's answer is to be awaited; None when no iteration was steady."""
        t = self.t
        a, stats, sampler, model, X, y, points = t.a, t.stats, t.sampler, t.model, t.X, t.y, t._train_points
        run_id, rank, incarnation = a.run_id, a.rank, a.incarnation
        push_pull_now = self.plane.push_pull_now
        last = t.spec.iterations - 1
        every = t.spec.eval_every if t._evaluates else 0
        wait = t.config.timeout_seconds * 4
        report_at = t._last_report + t.config.report_seconds
        perf_counter, monotonic = time.perf_counter, time.monotonic
        # The gradients are computed into the same arrays every iteration: the C exchange copies
        # them into its request before the call returns, and a push it did not answer is done
        # (``_after``) before the next gradient is computed.
        out = {name: np.empty_like(p) for name, p in params.items()} or None
        guaranteed = None
        while True:
            c = t.clock
            held, s = t._prefetched, t.staleness
            if held is None or c >= last or (s > 0 and held >= c + 1 - s) or (every and c and not c % every) or \
                    (guaranteed is not None and monotonic() >= report_at):
                return guaranteed
            t._prefetched = None
            t0 = perf_counter()
            batch = sampler.batch(c)
            loss, grads = model.loss_and_grad(params, X[batch], y[batch], out)
            if not math.isfinite(loss):
                t.check_loss(loss, c)
            version = None if t._version is None else t._version + t._own
            try:
                got = push_pull_now(run_id, rank, incarnation, c, grads, loss, params, wait, t._since, version)
            except errors.PsError as exc:
                return self._after(exc, c, held, grads, loss, params, version, len(batch), t0)
            if type(got) is not Answer:
                return self._after(got, c, held, grads, loss, params, version, len(batch), t0)
            # As ``_hold`` and ``advance`` keep them (repeated here: every call is paid per push).
            t._prefetched = got.guaranteed_clock
            t._since = (got.lineage, got.version) if got.lineage else None
            t._version, t._own = got.version, 0
            stats.pulls += 1
            t.clock, t.min_clock, t.run_state = got.clock, got.min_clock, got.run_state
            if got.staleness is not None and got.staleness != s:
                t._learn(got.staleness)
            stats.iterations += 1
            stats.last_loss = loss
            t._samples += len(batch)
            points.append((c + 1, time.time(), loss, t._samples, perf_counter() - t0))
            guaranteed = held

    async def _after(self, got: Awaitable[tuple[pb.PushGradientResponse, PullResult]] | errors.PsError, c: int,
                     held: int, grads: dict[str, np.ndarray], loss: float, params: dict[str, np.ndarray],
                     version: int | None, samples: int, t0: float) -> int:
        """The rest of iteration ``c`` when its answer is to be awaited (``got``), or its push failed
        (the retry rules take that failure as any try's, then try again as ``step`` would)."""
        t = self.t
        t_push = time.perf_counter()
        first: errors.PsError | None = None
        if isinstance(got, errors.PsError):
            first = got
        else:
            try:
                resp, pulled = await got
            except errors.PsError as exc:
                first = exc
        if first is not None:
            push = t._push_op(c, grads, loss, params, version)

            async def again() -> tuple[pb.PushGradientResponse, PullResult | None]:
                nonlocal first
                if first is not None:
                    failed, first = first, None
                    raise failed
                return await push()
            resp, maybe = await t.call(again, f"push {c}")
            assert maybe is not None
            pulled = maybe
        t._prefetched = pulled.guaranteed_clock
        t._hold(pulled)
        t.stats.pulls += 1
        s = t.staleness
        await t.advance(resp, c, loss, samples, t0, t_push - t0, time.perf_counter() - t_push,
                        s >= 0 and resp.min_clock < c + 1 - s)
        return held

