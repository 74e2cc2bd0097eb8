"""One iteration of a model with tables (issue 16): rows pulled and pushed by id, never whole.

Per iteration at clock c: the batch's rows (``Model.rows_needed``: its hashed feature ids) come
from the row cache where fresh enough (``tables.RowCache``, SSP), the rest from one pull that
also brings the dense parameters (the bias) unless those are fresh too; the gradient of the rows
the batch touched goes back as rows (``wire.RowsPart``). Like the dense loop, the push of clock c
asks for what clock c + 1 will need (``then_pull``: the next batch's missing rows), so an
iteration is one round trip. Rank 0 evaluates on the test split with the rows it needs (log-loss,
accuracy and AUC).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import numpy as np

from paramserver.client import PsClient
from paramserver.shards import Shards
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1.wire import RowsPart

from .config import WorkerConfig
from .datasets import Dataset
from .models.base import EvalResult, Model
from .rates import Factor, OwnRate
from .sampling import BatchSampler
from .sparse import RowBlock, SparseBatch
from .tables import RowCache

__all__ = ["TableStep"]

Rows = dict[str, np.ndarray]
T = TypeVar("T")


class Loop(Protocol):
    """What an iteration here uses of the training loop (``trainer._Trainer``)."""

    a: pb.Assignment
    spec: pb.RunSpec
    config: WorkerConfig
    model: Model
    data: Dataset
    X: Any
    y: Any
    sampler: BatchSampler
    plane: PsClient | Shards
    clock: int
    staleness: int
    min_clock: int
    local_sgd_lr: float | None
    run_state: int
    stats: Any

    async def call(self, op: Callable[[], Awaitable[T]], what: str) -> T: ...
    def cache_valid(self, guaranteed: int, clock: int) -> bool: ...
    def own_factor(self, resp: pb.PushGradientResponse) -> Factor | None: ...
    def check_loss(self, loss: float, clock: int) -> None: ...
    async def advance(self, resp: pb.PushGradientResponse, c: int, loss: float, samples: int, t0: float,
                      t_compute: float, comm: float, parked: bool) -> None: ...
    def eval_point(self, result: EvalResult, clock: int) -> None: ...
    async def report(self) -> None: ...


class TableStep:
    def __init__(self, t: Loop) -> None:
        self.t = t
        self.tables = {p.name: tuple(p.shape) for p in t.spec.params if p.table}
        self.dense = [p.name for p in t.spec.params if not p.table]
        self.caches = {n: RowCache(shape[1], t.staleness) for n, shape in self.tables.items()}
        self.dense_clock = -1  # guaranteed clock of the dense parameters held
        self.prefetched: tuple[int, int, dict[str, tuple[np.ndarray, np.ndarray]]] | None = None
        self.version: int | None = None
        """The server's version of the parameters its last pull read: what the next gradients are
        computed on (``PushGradientRequest.param_version``, as the dense loop's), with ``own``."""
        self.own = 0
        """This rank's own steps applied to what it keeps since that pull (read-my-writes): in
        what it computes on, so no staleness (``computed_on``)."""
        self.X_test: SparseBatch = t.model.prepare(t.data.X_test)
        self._next: tuple[int, tuple[Any, Any, dict[str, np.ndarray]]] | None = None

    def reset(self) -> None:
        """After a rewind: the server may have gone back to a checkpoint, so nothing cached holds."""
        for name, cache in self.caches.items():
            self.caches[name] = RowCache(cache.dim, cache.staleness, cache.capacity)
        self.dense_clock = -1
        self.prefetched = None
        self.version = None
        self.own = 0

    def computed_on(self) -> int | None:
        """``PushGradientRequest.param_version`` of a gradient computed now: the version pulled
        plus this rank's own steps applied since (as the dense loop's ``_computed_on``)."""
        return None if self.version is None else self.version + self.own

    def _batch(self, clock: int) -> tuple[Any, Any, dict[str, np.ndarray]]:
        """The batch of ``clock`` and the rows it needs (made once: the push before asks for them)."""
        if self._next is not None and self._next[0] == clock:
            return self._next[1]
        t = self.t
        batch = t.sampler.batch(clock)
        X = t.X[batch]
        made = X, t.y[batch], t.model.rows_needed(X)
        self._next = (clock, made)
        return made

    def _follow_bound(self) -> None:
        """The run's bound may change (UpdateRun, a schedule's step): the caches follow it, and
        rows prefetched under another bound are asked for again (what the cache holds for an
        iteration depends on the bound)."""
        for cache in self.caches.values():
            if cache.staleness != self.t.staleness:
                cache.staleness = self.t.staleness
                self.prefetched = None

    def _missing(self, needed: Rows, clock: int) -> Rows:
        return {n: self.caches[n].missing(ids, clock) for n, ids in needed.items()}

    def _dense_fresh(self, params: dict[str, np.ndarray], clock: int) -> bool:
        return bool(params) and all(n in params for n in self.dense) and self.t.cache_valid(self.dense_clock, clock)

    async def step(self, params: dict[str, Any], _guaranteed: int) -> int:
        t = self.t
        self._follow_bound()
        t0 = time.perf_counter()
        c = t.clock
        X, y, needed = self._batch(c)
        comm, s = 0.0, t.staleness
        parked = False  # were its pulls parked waiting for other ranks (a straggler's work leaves that out)?
        if self.prefetched is not None and self.prefetched[0] == c:
            _, guaranteed, pulled = self.prefetched
        else:
            missing = self._missing(needed, c)
            if any(ids.size for ids in missing.values()) or not self._dense_fresh(params, c):
                res = await t.call(lambda: t.plane.pull(t.a.run_id, t.a.rank, t.a.incarnation, c, into=params,
                                                        names=self.dense, rows=missing,
                                                        max_wait=t.config.timeout_seconds * 4), f"pull {c}")
                t.stats.pulls += 1
                t.run_state = res.run_state
                guaranteed, pulled = res.guaranteed_clock, res.rows
                self.dense_clock, self.version, self.own = guaranteed, res.version, 0
                comm = time.perf_counter() - t0
                parked = s >= 0 and t.min_clock < c - s  # the min clock the last answer said
            else:
                guaranteed, pulled = self.dense_clock, {}
                t.stats.pulls_skipped += 1
        self.prefetched = None
        for name, ids in needed.items():
            got_ids, got = pulled.get(name, (np.empty(0, np.int64), np.empty((0, self.caches[name].dim), np.float32)))
            params[name] = RowBlock(ids, self.caches[name].block(ids, c, got_ids, got, guaranteed))
        if t.a.rank == 0 and t.spec.eval_every and c % t.spec.eval_every == 0 and c:
            await self.evaluate(c, final=False)
            await t.report()
        t_compute = time.perf_counter()
        loss, grads = t.model.loss_and_grad(params, X, y)
        t_compute = time.perf_counter() - t_compute
        t.check_loss(loss, c)
        wire_grads = {n: RowsPart(g.ids, np.ascontiguousarray(g.values, np.float32), self.tables[n])
                      if isinstance(g, RowBlock) else g for n, g in grads.items()}
        local_sgd = t.local_sgd_lr is not None and t.staleness > 0
        t_push = time.perf_counter()
        ask = None
        if c + 1 < t.spec.iterations:
            _, _, nxt = self._batch(c + 1)
            missing = self._missing(nxt, c + 1)
            if any(ids.size for ids in missing.values()) or not t.cache_valid(self.dense_clock, c + 1):
                ask = missing
        if ask is not None:
            resp, res = await t.call(
                lambda: t.plane.push_pull(t.a.run_id, t.a.rank, t.a.incarnation, c, wire_grads, loss, into=params,
                                          names=self.dense, rows=ask, max_wait=t.config.timeout_seconds * 4,
                                          param_version=self.computed_on()),
                f"push {c}")
            t.stats.pulls += 1
            self.dense_clock, self.version, self.own = res.guaranteed_clock, res.version, 0
            self.prefetched = (c + 1, res.guaranteed_clock, res.rows)
            parked = parked or (s >= 0 and resp.min_clock < c + 1 - s)  # the min clock right after the push
        else:
            resp = await t.call(lambda: t.plane.push(t.a.run_id, t.a.rank, t.a.incarnation, c, wire_grads, loss,
                                                     param_version=self.computed_on()), f"push {c}")
        if local_sgd:
            self._own_step(params, grads, resp, dense=ask is None)
        comm += time.perf_counter() - t_push
        await t.advance(resp, c, loss, len(y), t0, t_compute, comm, parked)
        return guaranteed

    def _own_step(self, params: dict[str, Any], grads: dict[str, Any], resp: pb.PushGradientResponse,
                  dense: bool) -> None:
        """Read-my-writes for the rows kept, as for the dense parameters (``dense``: those too,
        when the push brought none): with plain SGD the worker applies its own step to them, at
        the rate the server applied it with (``own_factor``); rows just pulled replace the cached
        ones, with the server's step. Other optimizers' steps only the server takes, so reused rows
        lack the worker's last s steps (measured: re-pulling them instead did not train better,
        bench/RESULTS.md "Tables"). When the answer does not say the rate, nothing kept is the
        server's: the next iteration pulls all it needs."""
        t = self.t
        assert t.local_sgd_lr is not None
        factor = t.own_factor(resp)
        if factor is None:
            self.reset()
            return
        rate = OwnRate(t.local_sgd_lr, factor)
        for name, g in grads.items():
            if isinstance(g, RowBlock):
                self.caches[name].apply_sgd(g.ids, g.values.astype(np.float32), rate.rows(name, g.ids))
            elif dense:
                params[name] -= rate.whole(name, g.shape) * g
        if dense:  # (a push that brought a pull: its version has this step already)
            self.own += 1

    async def evaluate(self, clock: int, final: bool) -> EvalResult:
        """Log-loss, accuracy and AUC on the test split, with the rows it needs: at the end,
        waiting for every rank's last push (a pull of clock = iterations); else as they are now."""
        t = self.t
        needed = t.model.rows_needed(self.X_test)
        params: dict[str, Any] = {}
        values: dict[str, list[np.ndarray]] = {n: [] for n in needed}
        limit = 1 << 20  # the server's default bound on rows per pull
        longest = max([ids.size for ids in needed.values()] + [1])
        for lo in range(0, longest, limit):
            part = {n: ids[lo : lo + limit] for n, ids in needed.items()}
            rank, inc, at = (t.a.rank, t.a.incarnation, clock) if final else (0, 0, 0)
            res = await t.call(lambda part=part, rank=rank, inc=inc, at=at: t.plane.pull(  # type: ignore[misc]
                t.a.run_id, rank, inc, at, into=params, names=self.dense, rows=part,
                max_wait=t.config.timeout_seconds * 4), f"pull {clock}")
            for n, ids in part.items():  # (a table asked for with no ids has no rows in the answer)
                values[n].append(res.rows[n][1] if ids.size else np.empty((0, self.tables[n][1]), np.float32))
        for n, ids in needed.items():
            params[n] = RowBlock(ids, np.concatenate(values[n]))
        result: EvalResult = t.model.evaluate(params, self.X_test, t.data.y_test)
        t.eval_point(result, clock)
        return result

