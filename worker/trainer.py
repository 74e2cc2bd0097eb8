"""The SSP training loop of one rank: pull (or reuse the cache), compute the gradient, push, advance.

At clock c the worker needs parameters that contain every update of iterations < c - s. The last
pull says which clock it guarantees (the min clock when it was read); while that guarantee is
still >= c - s the worker reuses it and skips the pull RPC (Petuum's client cache). With s = 0
every iteration pulls (the guarantee is never enough); with unbounded staleness every iteration
pulls as well, since reusing would let a worker train alone on its own copy forever (DESIGN.md).

Read-my-writes on a cache hit: with plain SGD the worker applies its own last gradient to the cached
copy (exactly the server's rule), so a reused copy still contains the caller's own updates. For
stateful optimizers it reuses the copy as read.

Evaluation: rank 0 evaluates on the test split every ``eval_every`` iterations and, at the end, on
the final parameters (a pull at clock = iterations, which waits for every rank to finish), before
it leaves. The run completes when every rank has left, so the final accuracy is in the run's
history when psctl sees the run completed.

Failures: what is retried, rewound or ends the assignment is ``retries``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from paramserver import errors
from paramserver.client import Grad, PsClient, PullResult
from paramserver.runtime import release_free_memory
from paramserver.shards import Shards
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1.shm import IN_PLACE_BYTES

from .compression import PushCodec
from .config import WorkerConfig, parse_tail_delay
from .datasets import DatasetError, load_dataset
from .models import EvalResult, ModelSpecError, build_model
from .outcome import Outcome, TrainStats
from .overlap import Overlap
from .rates import Factor, OwnRate
from .retries import Retries, _ended, _Rewind, _state
from .sampling import BatchSampler, shard_indices
from .steady import Steady
from .straggler import Straggler
from .table_step import TableStep

__all__ = ["LogContext", "Outcome", "TrainStats", "train"]

log = logging.getLogger("ps_worker")
_current: contextvars.ContextVar[_Trainer | None] = contextvars.ContextVar("trainer", default=None)


def _own(params: dict[str, np.ndarray]) -> None:
    """Copies of the arrays of ``params`` that are borrowed (read-only views of an answer in shared
    memory, valid only until the push stream's next request)."""
    for name, p in params.items():
        if not p.flags.writeable:
            params[name] = p.copy()


class LogContext(logging.Filter):
    """Adds ``ctx`` to every record: the run, rank and clock of the assignment being trained."""

    def filter(self, record: logging.LogRecord) -> bool:
        t = _current.get()
        record.ctx = f" run={t.a.run_id} rank={t.a.rank} clock={t.clock}" if t else ""
        return True


_FINISHED = (pb.RUN_STATE_COMPLETED, pb.RUN_STATE_STOPPED, pb.RUN_STATE_FAILED)


def _now_ts() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


class _Trainer(Retries):
    def __init__(self, client: PsClient, a: pb.Assignment, config: WorkerConfig) -> None:
        self.client = client
        self.plane: PsClient | Shards = Shards.beside(client, a.shard_map, a.spec) if a.shard_map.shards else client
        """Where pushes and pulls go: the server joined, or every server of a sharded run."""
        self.a = a
        self.spec = a.spec
        self.config = config
        self.stats = TrainStats()
        self.clock = a.start_clock
        self.run_state: int = pb.RUN_STATE_RUNNING
        self.refusal: errors.PsError | None = None
        """The refusal that ended the assignment (set by the heartbeat task when it cancels the loop)."""
        self.staleness = self.spec.staleness  # as in the proto: 0 BSP, -1 unbounded
        self.slowdown = max(config.slowdown, self.spec.slowdown.get(a.rank, 1.0))
        opt = self.spec.optimizer
        self.local_sgd_lr = opt.sgd.learning_rate if opt.WhichOneof("kind") == "sgd" and not opt.sgd.weight_decay else None
        self._pending_points: list[pb.MetricPoint] = []  # eval points
        # Training points as (clock, time, loss, samples, step seconds): a report keeps ~20 of
        # the hundreds recorded between two reports, so only those become MetricPoints.
        self._train_points: list[tuple[int, float, float, int, float]] = []
        tail = parse_tail_delay(config.tail_delay)
        self._straggler = Straggler(self.slowdown, tail, np.random.default_rng([self.spec.seed, a.rank, 19]),
                                    config.step_seconds) if self.slowdown > 1.0 or tail[0] or config.step_seconds else None
        self.min_clock = 0  # the run's min clock as the last push's answer said
        self._prefetched: int | None = None  # guaranteed clock of parameters pulled with the last push
        self._last_report = time.monotonic()
        self._samples = 0
        self.tables: TableStep | None = None
        self.codec = PushCodec.of(self.spec)
        """Pushes in the run's wire form (``RunSpec.compression``); None: float32, dense."""
        self._large: bool | None = None  # a tensor of shm.IN_PLACE_BYTES or more (``_push_buffers``)
        self._released = False  # the memory of its own parameters given back (once they are borrowed)
        self._since: tuple[int, int] | None = None
        """(lineage, version) of the parameters held, for delta pulls (one server only)."""
        self._version: int | None = None
        """The server's version of the parameters held (None before the first pull)."""
        self._own = 0
        """This rank's own steps applied to the parameters held since they were pulled (``_computed_on``)."""
        self._evaluates = a.rank == 0 and self.spec.eval_every > 0
        self._overlap = Overlap(self) if config.overlap else None
        """--overlap: the gradient of the next iteration computed while the push is in flight."""
        self._steady = Steady(self) if isinstance(self.plane, PsClient) and self.codec is None and \
            not config.overlap and self._straggler is None and \
            max((4 * math.prod(p.shape) for p in self.spec.params), default=0) < IN_PLACE_BYTES else None
        """Iterations after the first may be ``Steady``'s: one server, a small dense model (no tensor
        computed in shared memory), no compression, overlap or straggler delays."""

    def setup(self) -> None:
        """Load data and model; raises DatasetError / ModelSpecError (fatal for the run)."""
        data_spec = json.loads(self.spec.data_spec_json or "{}")
        model_spec = json.loads(self.spec.model_spec_json or "{}")
        self.data = load_dataset(data_spec)
        self.model = build_model(model_spec, self.data.n_features, self.data.n_outputs)
        names = {p.name: tuple(p.shape) for p in self.spec.params}
        mine = {p.name: p.shape for p in self.model.param_specs()}
        if names != mine:
            raise ModelSpecError(f"the run's parameters {names} do not match the model's {mine}")
        n = len(self.data.X_train)
        idx = shard_indices(n, self.a.rank, self.spec.num_workers, self.spec.seed)
        if not len(idx):  # (psctl launch refuses such a run; another client may have created it)
            raise DatasetError(f"rank {self.a.rank}'s shard is empty: the training split of {self.data.name} has "
                               f"{n} example{'s' * (n != 1)} for the run's {self.spec.num_workers} ranks, and every "
                               f"rank needs at least one; create the run with at most {n} workers")
        self.X = self.data.X_train[idx]
        self.y = self.data.y_train[idx]
        self.sampler = BatchSampler(len(idx), max(1, self.spec.batch_size), self.spec.seed, self.a.rank)
        if self.model.tables():  # rows by id, a row cache (table_step); the data hashed once
            self.X = self.model.prepare(self.X)
            self.tables = TableStep(self)
            self._steady = None

    def _hold(self, res: PullResult) -> None:
        """The parameters held are now version ``res.version`` of the server's lineage (delta pulls,
        and what the next gradients were computed on: ``PushGradientRequest.param_version``)."""
        self._since = (res.lineage, res.version) if res.lineage else None
        self._version, self._own = res.version, 0

    def _computed_on(self) -> int | None:
        """What a gradient computed on the parameters held says it was computed on
        (``PushGradientRequest.param_version``): the version pulled, plus this rank's own steps
        applied to them since (read-my-writes: its own updates are in them, no staleness)."""
        return None if self._version is None else self._version + self._own

    async def pull(self, clock: int, params: dict[str, np.ndarray]) -> int:
        res = await self.call(
            lambda: self.plane.pull(self.a.run_id, self.a.rank, self.a.incarnation, clock, into=params,
                                     max_wait=self.config.timeout_seconds * 4, since=self._since),
            f"pull {clock}",
        )
        self._hold(res)
        self._learn(res.staleness)
        self.stats.pulls += 1
        self.run_state = res.run_state
        return res.guaranteed_clock

    def _learn(self, staleness: int | None) -> None:
        """An answer said the run's bound (UpdateRun may change it): it applies from the next iteration."""
        if staleness is not None and staleness != self.staleness:
            log.info("the run's staleness is now %s (was %s)", "unbounded" if staleness < 0 else staleness,
                     "unbounded" if self.staleness < 0 else self.staleness)
            self.staleness = staleness

    def cache_valid(self, guaranteed: int, clock: int) -> bool:
        return self.staleness > 0 and guaranteed >= clock - self.staleness

    async def run(self) -> None:
        params: dict[str, np.ndarray] = {}
        guaranteed = -1
        iterations = self.spec.iterations
        while True:
            try:
                while self.clock < iterations:
                    if self._steady is not None:  # iterations without the event loop, while they can be
                        got = self._steady.run(params)
                        if got is not None:
                            guaranteed = got if isinstance(got, int) else await got
                            if time.monotonic() - self._last_report >= self.config.report_seconds:
                                await self.report()
                            continue
                    guaranteed = await self.step(params, guaranteed)
                if self.a.rank == 0 and self.tables is not None:
                    await self.tables.evaluate(iterations, final=True)
                elif self.a.rank == 0:
                    await self.pull(iterations, params)
                    self.evaluate(params, iterations)
                await self.report()
                return
            except _Rewind as rewind:  # also while waiting for the final parameters
                self._prefetched = self._since = self._version = None
                if self._overlap is not None:
                    self._overlap.ahead = None
                params.clear()  # (they hold updates the server lost: never fresh enough, whatever the clock)
                if self.codec is not None:
                    self.codec.reset()
                if self.tables is not None:
                    self.tables.reset()
                self.clock = rewind.clock
                # Points not reported yet of the clocks after it are of steps the server lost: the
                # clocks trained again report theirs (the run's history keeps a clock's first point).
                self._train_points = [p for p in self._train_points if p[0] <= rewind.clock]
                self._pending_points = [p for p in self._pending_points if p.clock <= rewind.clock]
                guaranteed = -1
                self.stats.rewinds += 1
                if isinstance(self.plane, Shards):  # a restarted server may have another data plane port
                    with contextlib.suppress(errors.PsError):
                        await self.plane.refresh(self.client, self.a.run_id)

    async def step(self, params: dict[str, np.ndarray], guaranteed: int) -> int:
        """One iteration at self.clock; returns the guaranteed clock of the parameters it used."""
        if self.tables is not None:
            return await self.tables.step(params, guaranteed)
        eval_every = self.spec.eval_every
        t0 = time.perf_counter()
        c = self.clock
        s = self.staleness
        comm, parked = 0.0, False  # seconds in pulls and pushes; were they parked waiting for others?
        if self._prefetched is not None:  # pulled together with the previous push
            guaranteed, self._prefetched = self._prefetched, None
        elif params and self.cache_valid(guaranteed, c):
            self.stats.pulls_skipped += 1
        else:
            guaranteed = await self.pull(c, params)
            comm, parked = time.perf_counter() - t0, s >= 0 and self.min_clock < c - s
        if self.a.rank == 0 and eval_every and c % eval_every == 0 and c:
            self.evaluate(params, c)
            await self.report()  # show it now, not after the next (maybe long) wait
        pull_next = c + 1 < self.spec.iterations and not self.cache_valid(guaranteed, c + 1)
        out = None
        ahead = self._overlap.take() if self._overlap is not None else None
        if ahead is not None:  # computed while the last push was in flight, on older parameters
            (loss, grads, samples, t_compute), version = ahead
        else:
            out = self._push_buffers(params, c) if pull_next else None
            (loss, grads, samples, t_compute), version = self.gradient(params, c, out), self._computed_on()
        self.check_loss(loss, c)
        borrow = out is not None and s <= 0  # (a large model in shared memory that every push pulls: read in place)
        in_place = borrow and not any(p.flags.writeable for p in params.values())  # (computed on and into shared memory)
        t_push = time.perf_counter()
        push = self._push_op(c, self.codec.encode(grads) if self.codec else grads, loss, params if pull_next else None,
                             version, again=None if out is None else lambda: self.gradient(params, c)[:2], borrow=borrow)
        if self._overlap is not None and c + 1 < self.spec.iterations and (s < 0 or self.cache_valid(guaranteed, c + 1)):
            _own(params)  # (computed on while the push is in flight: no longer the server's to lend then)
            resp, pulled, comm_ahead = await self._overlap.run(push, params, grads, c, guaranteed)
            comm += comm_ahead
        else:
            resp, pulled = await self.call(push, f"push {c}")
            if pulled is None and self.local_sgd_lr is not None and self.staleness > 0:
                factor = self.own_factor(resp)
                if factor is None:
                    self._drop_copy(params)
                else:
                    self._apply_own(params, grads, factor)
                    self._own += 1
            comm += time.perf_counter() - t_push
        if pulled is not None:
            # The next iteration must pull: it was asked for with this push (then_pull), one round trip.
            self._prefetched = pulled.guaranteed_clock
            self._hold(pulled)
            if in_place and not self._released:  # the first iteration's arrays are not needed any more
                release_free_memory()  # (once, whatever it found to give back)
                self._released = True
            self.stats.pulls += 1
            parked = parked or (s >= 0 and resp.min_clock < c + 1 - s)  # the min clock right after the push
        await self.advance(resp, c, loss, samples, t0, t_compute, comm, parked)
        if borrow and self.staleness > 0:  # (the bound changed: a later iteration may use them after
            _own(params)  # its push, when borrowed ones are no longer valid)
        return guaranteed

    def gradient(self, params: dict[str, np.ndarray], c: int,
                 out: dict[str, np.ndarray] | None = None) -> tuple[float, dict[str, np.ndarray], int, float]:
        """The loss and gradient of iteration ``c``'s minibatch at ``params`` (written into
        ``out``'s arrays when the model can), its size, the seconds it took."""
        batch = self.sampler.batch(c)
        t = time.perf_counter()
        loss, grads = self.model.loss_and_grad(params, self.X[batch], self.y[batch], out)
        if out is not None and grads.keys() == out.keys():
            grads = {name: grads[name] for name in out}  # laid out as ``out``: sent from where they are
        return loss, grads, len(batch), time.perf_counter() - t

    def _push_buffers(self, params: dict[str, np.ndarray], c: int) -> dict[str, np.ndarray] | None:
        """Where to compute the gradient of ``c``, whose push carries the next pull: in the push
        stream's shared memory, when it can be sent from there without a copy
        (``PsClient.push_buffers``: a large model on the shared-memory data plane); None: in new
        arrays. Not when the push is encoded first (compression) or the gradient is still needed
        while the push is in flight (``--overlap``)."""
        if self._large is None and params:  # (a small model never can: not asked every push)
            self._large = max(a.nbytes for a in params.values()) >= IN_PLACE_BYTES
        if not self._large or self.codec is not None or self.config.overlap or not isinstance(self.plane, PsClient):
            return None
        return self.plane.push_buffers(self.a.run_id, self.a.rank, self.a.incarnation, c, params)

    def _push_op(self, c: int, grads: Mapping[str, Grad], loss: float, into: dict[str, np.ndarray] | None,
                 version: int | None, again: Callable[[], tuple[float, Mapping[str, Grad]]] | None = None,
                 borrow: bool = False) -> Callable[[], Awaitable[tuple[pb.PushGradientResponse, PullResult | None]]]:
        """The push of iteration ``c`` (its gradient computed on ``version``); with ``into``,
        together with the pull of ``c + 1`` into it (``borrow``: as read-only views of the answer's
        shared memory, ``PsClient.push_pull``). ``again``: the loss and gradient, computed anew for
        a retry (``grads`` are in the push stream's shared memory, which the server's answer to a
        try that failed may have overwritten), on parameters pulled again if ``into`` holds
        borrowed ones (the server may have written their memory over since the first try: the
        retry then says it computed on the version pulled)."""
        a, wait, since = self.a, self.config.timeout_seconds * 4, self._since
        tried = False

        async def op() -> tuple[pb.PushGradientResponse, PullResult | None]:
            nonlocal grads, loss, version, again, tried
            if tried and again is not None:
                if into is not None and not all(p.flags.writeable for p in into.values()):
                    res = await self.plane.pull(a.run_id, a.rank, a.incarnation, c, into=into, max_wait=wait)
                    self._hold(res)
                    version = res.version
                (loss, grads), again = again(), None
            tried = True
            if into is None:
                return await self.plane.push(a.run_id, a.rank, a.incarnation, c, grads, loss, param_version=version), None
            if borrow:
                assert isinstance(self.plane, PsClient)
                return await self.plane.push_pull(a.run_id, a.rank, a.incarnation, c, grads, loss, into=into,
                                                  max_wait=wait, since=since, param_version=version, borrow=True)
            return await self.plane.push_pull(a.run_id, a.rank, a.incarnation, c, grads, loss, into=into,
                                              max_wait=wait, since=since, param_version=version)
        return op

    def own_factor(self, resp: pb.PushGradientResponse) -> Factor | None:
        """The factor of the rate the server applied this rank's push with (a staleness-aware
        rate divides it by the push's staleness: ``PushGradientResponse.lr_scale``), for its own
        step on the copy it keeps: over several servers that took different ones, each server's
        for the rows it holds (``Shards.factors``); None when the answer does not say it (the
        copy must be pulled)."""
        if not self.spec.staleness_aware_lr:
            return 1.0
        if resp.HasField("lr_scale"):
            return resp.lr_scale
        return self.plane.factors(resp) if isinstance(self.plane, Shards) else None

    def _drop_copy(self, params: dict[str, np.ndarray]) -> None:
        """The parameters held are not the server's (their own step's rate is unknown): the next
        iteration pulls them, whole (a delta needs the copy it is a delta of)."""
        params.clear()
        self._since = None
        self._own = 0

    def _apply_own(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], factor: Factor = 1.0,
                   less: float = 0.0) -> None:
        """Read-my-writes on a copy the server will not send again: plain SGD's step, as the server
        takes it (the rate times ``factor``: ``own_factor``; minus ``less`` times it, a part of
        the rate stepped already)."""
        assert self.local_sgd_lr is not None
        _own(params)
        rate = OwnRate(self.local_sgd_lr, factor, less)
        if self.codec is not None:  # what the push carried, not the gradient
            self.codec.step_locally(params, rate)
            return
        for name, g in grads.items():
            params[name] -= rate.whole(name, g.shape) * g

    @staticmethod
    def check_loss(loss: float, clock: int) -> None:
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss} at clock {clock}: lower the learning rate")

    async def advance(self, resp: pb.PushGradientResponse, c: int, loss: float, samples: int, t0: float,
                      t_compute: float, comm: float, parked: bool) -> None:
        """After the push of clock ``c``: the new clock, statistics, the straggler's delay, a report."""
        self.clock = resp.clock
        self.min_clock = resp.min_clock
        self.run_state = resp.run_state
        if resp.HasField("staleness") and resp.staleness != self.staleness:
            self._learn(resp.staleness)
        self.stats.iterations += 1
        self.stats.last_loss = loss
        self._samples += samples
        if self._straggler is not None:
            owed = self._straggler.owe(t_compute, comm, parked)
            if owed > 0.0:
                slept = time.perf_counter()
                await asyncio.sleep(owed)
                self._straggler.paid(time.perf_counter() - slept)
        self._train_points.append((c + 1, time.time(), loss, self._samples, time.perf_counter() - t0))
        if time.monotonic() - self._last_report >= self.config.report_seconds:
            await self.report()

    def _train_point(self, clock: int, when: float, loss: float, samples: int, step: float) -> pb.MetricPoint:
        ts = Timestamp()
        ts.FromNanoseconds(int(when * 1e9))
        return pb.MetricPoint(rank=self.a.rank, clock=clock, time=ts, loss=loss, samples=samples, step_seconds=step)

    def evaluate(self, params: dict[str, np.ndarray], clock: int) -> None:
        self.eval_point(self.model.evaluate(params, self.data.X_test, self.data.y_test), clock)

    def eval_point(self, result: EvalResult, clock: int) -> None:
        acc = float("nan") if result.accuracy is None else result.accuracy
        auc = float("nan") if result.auc is None else result.auc
        if result.accuracy is not None:
            self.stats.final_accuracy = result.accuracy
        self._pending_points.append(
            pb.MetricPoint(rank=self.a.rank, clock=clock, time=_now_ts(), eval=True,
                           eval_loss=result.loss, eval_accuracy=acc, loss=self.stats.last_loss, eval_auc=auc)
        )
        log.info("rank %d clock %d: test loss %.4f accuracy %.4f%s", self.a.rank, clock, result.loss, acc,
                 "" if result.auc is None else f" AUC {result.auc:.4f}")

    async def report(self) -> None:
        evals, self._pending_points = self._pending_points, []
        train, self._train_points = self._train_points, []
        # Keep the history light: at most ~20 training points per report (and the last), all eval points.
        kept = train[:: max(1, len(train) // 20)]
        if train and kept[-1] is not train[-1]:
            kept.append(train[-1])
        keep = [self._train_point(*p) for p in kept] + evals
        resp = await self.call(
            lambda: self.client.report_metrics(self.a.run_id, self.a.rank, self.a.incarnation, keep,
                                               self.stats.pulls_skipped),
            "report",
        )
        self.run_state = resp.run_state
        self._last_report = time.monotonic()


async def _heartbeat(client: PsClient, a: pb.Assignment, trainer: _Trainer, main: asyncio.Task[Any]) -> None:
    """Keep the lease; cancel the training task if the run was stopped or this rank evicted."""
    interval = a.heartbeat_interval.ToTimedelta().total_seconds() or 2.0
    while True:
        await asyncio.sleep(interval)
        try:
            resp = await client.heartbeat(a.run_id, a.rank, a.incarnation, trainer.clock)
        except errors.PsError as exc:
            if exc.retryable:
                continue
            trainer.refusal = exc
            main.cancel(f"heartbeat: {exc.message}")
            return
        if resp.run_state in (pb.RUN_STATE_STOPPED, pb.RUN_STATE_FAILED):
            trainer.run_state = resp.run_state
            main.cancel(f"run {pb.RunState.Name(resp.run_state)}")
            return
        plane = trainer.plane
        if isinstance(plane, Shards) and client.data_plane and any(
                not c.route.data_port and not c.route.shm_socket for c in plane.clients):
            # (a restarted server 0 tells its peers' data planes once it has asked them: until then
            # a rank that joined goes through gRPC to them; learn them as they become known)
            with contextlib.suppress(errors.PsError):
                await plane.refresh(client, a.run_id)


async def train(client: PsClient, a: pb.Assignment, config: WorkerConfig) -> Outcome:
    """Train one assignment to its end; never raises for reasons outside this worker's control."""
    trainer = _Trainer(client, a, config)
    try:
        return await _train(client, a, trainer)
    finally:
        if isinstance(trainer.plane, Shards):
            await trainer.plane.close()


async def _train(client: PsClient, a: pb.Assignment, trainer: _Trainer) -> Outcome:
    _current.set(trainer)  # this task and the ones it starts log with run, rank and clock
    leave_reason, message = pb.LEAVE_REASON_DONE, ""
    log.info("rank %d of run %s (incarnation %d) from clock %d", a.rank, a.run_id, a.incarnation, a.start_clock)
    task = asyncio.current_task()
    assert task is not None
    # Heartbeats start first: loading data can take seconds and must not cost the lease.
    hb = asyncio.create_task(_heartbeat(client, a, trainer, task))
    try:
        await asyncio.to_thread(trainer.setup)
    except (DatasetError, ModelSpecError, ValueError, OSError) as exc:
        hb.cancel()
        message = f"{type(exc).__name__}: {exc}"
        log.error("cannot train: %s", message)
        with contextlib.suppress(errors.PsError):
            await client.leave(a.run_id, a.rank, a.incarnation, pb.LEAVE_REASON_FAILED, message)
        return Outcome(a.run_id, a.rank, False, message, trainer.stats, failed=True)
    except MemoryError:  # this machine's, not the run's: a worker with more memory may take the rank
        hb.cancel()
        return await _give_back(client, a, trainer, "this worker cannot take part as it is set up: not enough "
                                "memory for the run's data and model")
    except BaseException:
        hb.cancel()
        raise
    try:
        await trainer.run()
    except asyncio.CancelledError:
        if not hb.done():
            raise  # cancelled from outside (shutdown): the caller leaves
        task.uncancel()
        if trainer.refusal is not None:
            return _ended(trainer, trainer.refusal)
        return Outcome(a.run_id, a.rank, False, f"the run is {_state(trainer.run_state)}", trainer.stats,
                       run_state=trainer.run_state)
    except errors.PsError as exc:
        if isinstance(exc, errors.FailedPrecondition | errors.NotFound) or exc.retryable:
            return _ended(trainer, exc)  # the worker logs how it ended, once (main.py)
        if isinstance(exc, errors.OverClientLimit):  # this worker's own setting: not the run's failure
            leave_reason, message = pb.LEAVE_REASON_SHUTDOWN, f"this worker cannot take part as it is set up: {exc}"
        else:
            leave_reason, message = pb.LEAVE_REASON_FAILED, str(exc)
    except FloatingPointError as exc:
        leave_reason, message = pb.LEAVE_REASON_FAILED, str(exc)
    except MemoryError:
        leave_reason, message = pb.LEAVE_REASON_SHUTDOWN, ("this worker cannot take part as it is set up: not enough "
                                                           "memory to train")
    finally:
        hb.cancel()
    if leave_reason == pb.LEAVE_REASON_SHUTDOWN:
        return await _give_back(client, a, trainer, message)
    if leave_reason == pb.LEAVE_REASON_FAILED:
        log.error("training failed: %s", message)
    with contextlib.suppress(errors.PsError):
        await client.leave(a.run_id, a.rank, a.incarnation, leave_reason, message)
    done = leave_reason == pb.LEAVE_REASON_DONE
    return Outcome(a.run_id, a.rank, done, message or "done", trainer.stats, failed=not done)


async def _give_back(client: PsClient, a: pb.Assignment, trainer: _Trainer, message: str) -> Outcome:
    """This worker cannot take part as it is set up (``Outcome.unfit``): the rank goes back to the
    run, which goes on without it (or with another worker)."""
    log.error("gave rank %d back (the run goes on without this worker): %s", a.rank, message)
    with contextlib.suppress(errors.PsError):
        await client.leave(a.run_id, a.rank, a.incarnation, pb.LEAVE_REASON_SHUTDOWN, message)
    return Outcome(a.run_id, a.rank, False, message, trainer.stats, unfit=True)
