"""Pushes and pulls of a run whose parameters several servers hold (``Assignment.shard_map``).

``Shards`` has PsClient's data plane methods (``push``, ``push_pull``, ``pull``) and does what the
proto's "Shards" section asks of a worker: each iteration goes to every shard at once, each with
the rows of each tensor that shard holds (views, not copies), and pulled pieces are written into
the rows of the caller's arrays. A call is complete when every shard answered; when some did not,
the error is raised (at once when it is not retryable: the calls still waiting are cancelled), and
the caller's retry goes to every shard again: a shard that has the push acknowledges a duplicate
(exactly-once per shard), and nothing is kept across a failure, neither pulled answers nor
acknowledgements, as a server may go back to a checkpoint in between and lose a push it had
acknowledged. (Retrying only to the shards that had not acknowledged could hang a BSP run there: the
shard that lost the push waits for it, the others have completed its clock, and the worker, told
to go back to that clock, pulls answers of two clocks for ever.) Under BSP the shards' answers to
one pull must hold the same clock (else: retry). Of several CLOCK_AHEAD refusals (shards restored
to different clocks) the earliest clock is raised (the caller goes back to it, which may be its
own clock). Answers combine as the least guarantee: the least clock, min clock and guaranteed
clock, duplicate only if every shard says so, and a finished run's state over a running one.
Each server scales its share's rate by its own staleness for the rank: one factor for the whole
push (``lr_scale``) when all took the same, else each share's own (``factors``).

Tables (``ParamSpec.table``) are spread by row ranges: a table's rows (pulled by id, or pushed as
``wire.RowsPart``) go to the shards holding them, as ids local to each shard's range, and pulled
rows come back in the order asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import numpy as np

from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1.wire import CodedPart, RowsPart

from . import errors
from .client import PsClient
from .refusals import Refusals
from .sink import PullResult

__all__ = ["ShardFactors", "Shards", "pull_run"]


def _coded_rows(a: CodedPart, start: int, end: int) -> CodedPart:
    """Rows [start, end) of the tensor ``a`` (a scalar: all of it), sparse positions made local."""
    if not a.shape:
        return a
    row = int(np.prod(a.shape[1:], dtype=np.int64))
    lo, hi, shape = start * row, end * row, (end - start, *a.shape[1:])
    if a.indices is None:
        return CodedPart(a.values[lo:hi], a.dtype, shape)
    first, last = np.searchsorted(a.indices, [lo, hi])
    if first == last:  # none of this shard's: one explicit zero (a sparse chunk names at least one element)
        return CodedPart(np.zeros(1, a.values.dtype), a.dtype, shape, np.zeros(1, np.uint32))
    return CodedPart(a.values[first:last], a.dtype, shape, a.indices[first:last] - np.uint32(lo))


def _fit(out: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> None:
    """A new array in ``out[name]`` unless the one there takes each shard's rows in place: the
    views of its rows given to each shard's pull are written into, never replaced (a read-only
    array was left as it was, and returned as if pulled)."""
    a = out.get(name)
    if a is None or a.shape != shape or a.dtype != np.float32 or not a.flags.c_contiguous or not a.flags.writeable:
        out[name] = np.empty(shape, np.float32)


class ShardFactors:
    """The factors several servers' rates took for their shares of one push (each divides by its
    own staleness for the rank: ``PushGradientResponse.lr_scale``), by the rows each holds."""

    def __init__(self, shard_map: pb.ShardMap, factors: Sequence[float]) -> None:
        starts: dict[str, list[tuple[int, float]]] = {}
        for shard, factor in zip(shard_map.shards, factors, strict=True):
            for pc in shard.pieces:
                starts.setdefault(pc.name, []).append((pc.row_start, factor))
        self._pieces = {name: (np.array([s for s, _ in sorted(p)], np.int64), np.array([f for _, f in sorted(p)]))
                        for name, p in starts.items()}
        """Tensor name -> (its pieces' first rows, ascending; each piece's factor)."""

    def of_rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """The factor of each of the rows ``ids`` of tensor ``name`` (a scalar's one row: 0), float64
        as the servers said it."""
        starts, factors = self._pieces[name]
        return factors[np.searchsorted(starts, ids, side="right") - 1]


_STATE_ORDER: dict[int, int] = {pb.RUN_STATE_FAILED: 0, pb.RUN_STATE_STOPPED: 1, pb.RUN_STATE_COMPLETED: 2, pb.RUN_STATE_PENDING: 3,
                pb.RUN_STATE_RUNNING: 4}


def _state(states: Sequence[int]) -> int:
    return min(states, key=lambda s: _STATE_ORDER.get(s, 5))


class Shards:
    """The data plane of one sharded run; ``close`` closes the connections it opened."""

    def __init__(self, shard_map: pb.ShardMap, shapes: Mapping[str, tuple[int, ...]],
                 connect: Callable[[pb.Shard], PsClient], staleness: int = -1,
                 tables: Mapping[str, tuple[int, ...]] | None = None) -> None:
        """``shapes``: every tensor's whole shape (the run spec's); ``connect``: a client of a shard;
        ``staleness``: the run's (0: BSP, whose pulls are checked to come from one clock);
        ``tables``: the tables among them."""
        self.shard_map = shard_map
        self.shapes = {n: s for n, s in shapes.items() if n not in (tables or {})}
        self.tables = dict(tables or {})
        """Table name -> its whole shape (never held whole here: rows travel by id)."""
        self._refusals = Refusals(self.shapes, self.tables)
        """What one server would refuse whole, refused before any shard is asked."""
        self.clients = [connect(s) for s in shard_map.shards]
        self.staleness = staleness
        self._versions: tuple[int, dict[int, int]] = (-1, {})
        """The version the last pull returned (the least of its shards') and each shard's own: a
        push that says it was computed on that version tells each shard its own."""
        self._factors: tuple[pb.PushGradientResponse | None, list[float | None]] = (None, [])
        """The last push's combined answer and each shard's ``lr_scale`` (None: not said)."""

    @classmethod
    def beside(cls, client: PsClient, shard_map: pb.ShardMap, spec: pb.RunSpec) -> Shards:
        """Clients of every shard, configured as ``client`` is (timeout, security, data plane)."""
        def connect(shard: pb.Shard) -> PsClient:
            c = PsClient(shard.address, timeout=client.timeout, chunk_bytes=client.chunk_bytes,
                         max_message_bytes=client.max_message_bytes, security=client.security,
                         data_plane=client.data_plane, shm=client.shm)
            c.route.told(shard.data_port, shard.shm_socket)
            c.server_max_wait = client.server_max_wait  # (server 0's: as Join says)
            return c

        return cls(shard_map, {p.name: tuple(p.shape) for p in spec.params}, connect, spec.staleness,
                   {p.name: tuple(p.shape) for p in spec.params if p.table})

    async def refresh(self, client: PsClient, run_id: str) -> None:
        """Learn every shard's data planes again (a restarted server may have others), and the
        limit of a parked pull ``client`` was told last."""
        run = await client.get_run(run_id)
        for c, shard in zip(self.clients, run.shard_map.shards, strict=False):
            c.route.told(shard.data_port, shard.shm_socket)
            c.server_max_wait = client.server_max_wait

    def _version(self, i: int, param_version: int | None) -> int | None:
        """What shard ``i`` is told a gradient was computed on (``param_version``, as the last pull
        returned it, plus the worker's own steps since: that shard's own version of that pull, plus
        the same steps, which a staleness-aware rate scales by)."""
        combined, each = self._versions
        if param_version is None or param_version < combined or i not in each:
            return param_version
        return each[i] + param_version - combined

    def factors(self, resp: pb.PushGradientResponse) -> ShardFactors | None:
        """The factor each shard's rate took in the push ``resp`` (``push``'s or ``push_pull``'s
        answer) answered: a worker's own step on the copy it keeps takes each share's own (the
        servers' staleness for the rank differ: ``resp`` says no one factor). None when a shard did
        not say it, or ``resp`` is not this plane's last push's answer."""
        answered, factors = self._factors
        if resp is not answered or any(f is None for f in factors):
            return None
        return ShardFactors(self.shard_map, [f for f in factors if f is not None])

    def _combined(self, acks: Sequence[pb.PushGradientResponse]) -> pb.PushGradientResponse:
        out = _combined(acks)
        self._factors = (out, [a.lr_scale if a.HasField("lr_scale") else None for a in acks])
        return out

    def _pulled_versions(self, answers: Mapping[int, PullResult], result: PullResult) -> None:
        self._versions = (result.version, {i: r.version for i, r in answers.items()})

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)

    # ------------------------------------------------------------------------------ slicing
    def _rows(self, arrays: Mapping[str, Any], shard: pb.Shard) -> dict[str, Any]:
        """``shard``'s pieces of ``arrays``: views of their rows (a scalar is its one row); of a
        table's rows (``RowsPart``), those in the shard's range, with ids local to it."""
        out: dict[str, Any] = {}
        for pc in shard.pieces:
            a = arrays.get(pc.name)
            if isinstance(a, CodedPart):  # a compressed run's gradient: the shard's rows of it
                out[pc.name] = _coded_rows(a, pc.row_start, pc.row_end)
                continue
            if a is None or not isinstance(a, np.ndarray | RowsPart):  # a table left out (or the caller's rows)
                continue
            if isinstance(a, RowsPart):
                keep = (a.ids >= pc.row_start) & (a.ids < pc.row_end)
                if keep.any():
                    out[pc.name] = RowsPart(a.ids[keep] - pc.row_start, a.values[keep],
                                            (pc.row_end - pc.row_start, *a.table_shape[1:]))
                continue
            out[pc.name] = a if a.ndim == 0 else a[pc.row_start:pc.row_end]
        return out

    def _asked(self, rows: Mapping[str, np.ndarray] | None, shard: pb.Shard) -> dict[str, np.ndarray]:
        """The ids of ``rows`` that ``shard`` holds, local to its ranges; a table asked for of which
        it holds a piece is there even with none (an empty set: a pull with no names and no rows
        would ask for the whole piece)."""
        out = {}
        for pc in shard.pieces:
            ids = (rows or {}).get(pc.name)
            if ids is not None:
                ids = np.asarray(ids, np.int64)
                out[pc.name] = ids[(ids >= pc.row_start) & (ids < pc.row_end)] - pc.row_start
        return out

    def _gathered(self, rows: Mapping[str, np.ndarray] | None, answers: Mapping[int, PullResult],
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The rows asked for, in the order asked, from the shards' answers."""
        out = {}
        for name, ids in (rows or {}).items():
            ids = np.asarray(ids, np.int64)
            values = np.empty((ids.size, *self.tables[name][1:]), np.float32)
            for i, answer in answers.items():
                got = answer.rows.get(name)
                if got is None:
                    continue
                pc = next(pc for pc in self.shard_map.shards[i].pieces if pc.name == name)
                at = np.flatnonzero((ids >= pc.row_start) & (ids < pc.row_end))
                values[at] = got[1]
            out[name] = (ids, values)
        return out

    def _arrays(self, into: dict[str, np.ndarray] | None, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """``into`` with an array of the whole shape for every tensor but the tables (or for
        ``names``) (new where missing or unfit)."""
        out = {} if into is None else into
        for name, shape in self.shapes.items() if names is None else ((n, self.shapes[n]) for n in names):
            _fit(out, name, shape)
        return out

    async def _each(self, calls: Mapping[int, Callable[[], Awaitable[Any]]]) -> tuple[dict[int, Any], list[BaseException]]:
        """Every call at once; the answers by shard and the failures. A failure that is not
        retryable ends the wait at once: the calls still waiting (parked pulls) are cancelled."""
        tasks = {asyncio.ensure_future(call()): i for i, call in calls.items()}
        answers: dict[int, Any] = {}
        failures: list[BaseException] = []
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is None:
                        answers[tasks[task]] = task.result()
                    else:
                        failures.append(task.exception())  # type: ignore[arg-type]
                if any(not (isinstance(f, errors.PsError) and f.retryable) for f in failures):
                    break
        finally:
            for task in tasks:
                task.cancel()
        return answers, failures

    def _check(self, failures: list[BaseException]) -> None:
        if not failures:
            return
        fatal = [f for f in failures if not (isinstance(f, errors.PsError) and f.retryable)]
        behind = [f for f in fatal if isinstance(f, errors.PsError) and f.reason == pb.ERROR_REASON_CLOCK_AHEAD]
        if behind:  # shards restored to different clocks: go back to the earliest
            raise min(behind, key=lambda f: f.info.next_clock)
        raise (fatal or failures)[0]

    def _consistent(self, pulled: Sequence[PullResult], clock: int) -> None:
        """Under BSP every shard's answer to a pull of ``clock`` holds exactly the clocks before it;
        answers of different clocks come from both sides of a return to a checkpoint: retry."""
        if self.staleness == 0 and len({p.guaranteed_clock for p in pulled}) > 1:
            raise errors.Unavailable(errors.Code.UNAVAILABLE, f"the shards answered the pull of clock {clock} from "
                                 f"clocks {sorted({p.guaranteed_clock for p in pulled})}: a server went back to a "
                                 "checkpoint meanwhile; pull again")

    # ------------------------------------------------------------------------------ the data plane
    async def push(self, run_id: str, rank: int, incarnation: int, clock: int, grads: Mapping[str, Any],
                   loss: float = 0.0, timeout: float | None = None, param_version: int | None = None,
                   ) -> pb.PushGradientResponse:
        """As ``PsClient.push``, to every server (``param_version``: the version the last pull returned
        tells each shard its own version of that pull)."""
        self._refusals.check(grads, (), None)

        def one(i: int) -> Callable[[], Awaitable[pb.PushGradientResponse]]:
            return lambda: self.clients[i].push(run_id, rank, incarnation, clock,
                                                self._rows(grads, self.shard_map.shards[i]), loss, timeout,
                                                self._version(i, param_version))

        answers, failures = await self._each({i: one(i) for i in range(len(self.clients))})
        self._check(failures)
        return self._combined([answers[i] for i in range(len(self.clients))])

    async def push_pull(self, run_id: str, rank: int, incarnation: int, clock: int, grads: Mapping[str, Any],
                        loss: float = 0.0, *, into: dict[str, np.ndarray] | None = None,
                        max_wait: float | None = None, names: Sequence[str] = (),
                        rows: Mapping[str, np.ndarray] | None = None,
                        since: tuple[int, int] | None = None,
                        param_version: int | None = None) -> tuple[pb.PushGradientResponse, PullResult]:
        """As ``PsClient.push_pull``; ``since`` is not used: each server has its own versions, and a
        sharded pull is answered whole. With ``rows``, a shard holding none of them and none of
        ``names`` is pushed to without a pull."""
        self._refusals.check(grads, names, rows)
        out = self._arrays(into, names if rows else None)
        wanted = set(names)

        def one(i: int) -> Callable[[], Awaitable[tuple[pb.PushGradientResponse, PullResult | None]]]:
            c, s = self.clients[i], self.shard_map.shards[i]
            mine = [pc.name for pc in s.pieces if pc.name in wanted and pc.name in self.shapes] if rows else ()
            asked = self._asked(rows, s) if rows else None
            if rows and not mine and not asked:
                async def push() -> tuple[pb.PushGradientResponse, None]:
                    return await c.push(run_id, rank, incarnation, clock, self._rows(grads, s), loss,
                                        param_version=self._version(i, param_version)), None
                return push
            return lambda: c.push_pull(run_id, rank, incarnation, clock, self._rows(grads, s), loss,
                                       into=self._rows(out, s), max_wait=max_wait, names=mine, rows=asked,
                                       param_version=self._version(i, param_version))

        answers, failures = await self._each({i: one(i) for i in range(len(self.clients))})
        self._check(failures)
        pulled = {i: answer[1] for i, answer in answers.items() if answer[1] is not None}
        self._consistent(list(pulled.values()), clock + 1)
        result = _pulled(list(pulled.values()), out)
        result.rows = self._gathered(rows, pulled)
        self._pulled_versions(pulled, result)
        return self._combined([answers[i][0] for i in range(len(self.clients))]), result

    async def pull(self, run_id: str, rank: int = 0, incarnation: int = 0, clock: int = 0, *,
                   into: dict[str, np.ndarray] | None = None, names: Sequence[str] = (),
                   max_wait: float | None = None, timeout: float | None = None,
                   rows: Mapping[str, np.ndarray] | None = None, since: tuple[int, int] | None = None) -> PullResult:
        """As ``PsClient.pull``; the whole model (no ``names``, no ``rows``) includes the tables,
        put together from every shard (an export). ``since`` is not used: each server has its own
        versions, and a sharded pull is answered whole."""
        self._refusals.check(None, names, rows)
        wanted = set(names)
        whole = not wanted and not rows
        out = self._arrays(into, None if whole else [n for n in names if n in self.shapes])
        if whole:
            for name, shape in self.tables.items():
                _fit(out, name, shape)

        def one(i: int, empty: bool = False) -> Callable[[], Awaitable[PullResult]] | None:
            c, s = self.clients[i], self.shard_map.shards[i]
            mine = [pc.name for pc in s.pieces if whole or pc.name in wanted]
            asked = {n: ids for n, ids in self._asked(rows, s).items() if empty or ids.size}
            if not whole and not mine and not asked:
                return None  # this shard holds none of what was asked for
            if rows:
                return lambda: c.pull(run_id, rank, incarnation, clock, into=self._rows(out, s), names=mine, rows=asked,
                                      max_wait=max_wait, timeout=timeout)
            return lambda: c.pull(run_id, rank, incarnation, clock, into=self._rows(out, s),
                                  names=() if whole else mine, max_wait=max_wait, timeout=timeout)

        calls = {i: call for i in range(len(self.clients)) if (call := one(i)) is not None}
        if not calls:  # only empty row sets: one shard answers them (the guarantee, the run's state)
            i = next((i for i, s in enumerate(self.shard_map.shards) if self._asked(rows, s)), 0)
            calls = {i: call} if (call := one(i, empty=True)) is not None else {}
        answers, failures = await self._each(calls)
        self._check(failures)
        pulled = list(answers.values())
        if incarnation:
            self._consistent(pulled, clock)
        if not whole:
            out = {n: a for n, a in out.items() if n in wanted}
        result = _pulled(pulled, out)
        result.rows = self._gathered(rows, answers)
        if incarnation:  # (a worker's pull: what its next pushes say they were computed on)
            self._pulled_versions(answers, result)
        return result


def _bound(said: Sequence[int | None]) -> int | None:
    """The staleness bound the shards' answers say (a schedule's step, UpdateRun): the tightest,
    as a shard refuses what its own bound does not allow (None: none said one; -1: unbounded)."""
    bounds = [b for b in said if b is not None]
    if not bounds:
        return None
    return min((b for b in bounds if b >= 0), default=-1)


def _combined(acks: Sequence[pb.PushGradientResponse]) -> pb.PushGradientResponse:
    out = pb.PushGradientResponse(clock=min(a.clock for a in acks), duplicate=all(a.duplicate for a in acks),
                                  min_clock=min(a.min_clock for a in acks),
                                  run_state=_state([a.run_state for a in acks]))  # type: ignore[arg-type]
    bound = _bound([a.staleness if a.HasField("staleness") else None for a in acks])
    if bound is not None:
        out.staleness = bound
    # Each server scales its share's rate by its own staleness: one factor for the whole push only
    # when they all took the same (else it is left unset: each share's own is ``Shards.factors``).
    scales = {a.lr_scale if a.HasField("lr_scale") else None for a in acks}
    if len(scales) == 1 and (scale := scales.pop()) is not None:
        out.lr_scale = scale
    return out


def _pulled(results: Sequence[PullResult], out: dict[str, np.ndarray]) -> PullResult:
    return PullResult(min(r.guaranteed_clock for r in results), min(r.version for r in results),
                      _state([r.run_state for r in results]), out, staleness=_bound([r.staleness for r in results]))


_ENDED = (pb.RUN_STATE_COMPLETED, pb.RUN_STATE_STOPPED, pb.RUN_STATE_FAILED)


def _mixed(run: pb.Run, why: str) -> str:
    """Why an ended run's pieces cannot be put together, and what is left of it."""
    state = pb.RunState.Name(run.state).removeprefix("RUN_STATE_").lower()
    return (f"{run.run_id} {state} ({run.message or 'no message'}) while a server's shard of it was not of the "
            f"others' history ({why}): nothing goes back to a common checkpoint for a run that ended, so its "
            "pieces cannot be put together and exporting again will not change that. What is left of it is each "
            f"server's checkpoints of {run.run_id} in its --data-dir (those of a cut every server has are of one "
            "history); 'psctl status' shows its servers and 'psctl launch' starts a new run")


async def pull_run(client: PsClient, run_id: str, wait: float = 30.0) -> PullResult:
    """A run's whole current parameters, an observer's read: from the server ``client`` talks
    to, or from every server of a sharded run, its pieces put together.

    The pieces are of one history. While the servers go back to a common checkpoint (one
    restarted) a restarted or restoring shard refuses reads (``ShardStatus.held``), and server 0's
    shard is held throughout and gets a new lineage: so pieces read between two looks at server 0's
    shard (GetRun) that find it not held and of the same lineage are of one history. Otherwise the
    read waits and reads again, up to ``wait`` seconds; then Unavailable, saying so. A run that
    ended with a shard not of the others' history (its roll back failed: the run failed) never
    goes back: FailedPrecondition at once, saying what is left of it."""
    run = await client.get_run(run_id)
    if not run.shard_map.shards:
        return await client.pull(run_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    shards = Shards.beside(client, run.shard_map, run.spec)  # once: a data plane out of reach is logged once
    try:
        while True:
            before, why, away = run.shards[0], run.shards[0].held, ""
            if not why:
                try:
                    result = await shards.pull(run_id)
                except errors.PsError as exc:
                    if not exc.retryable:
                        raise
                    why = exc.message
                    if exc.reason != pb.ERROR_REASON_SHARD_UNAVAILABLE:  # no answer at all, not a held shard
                        away = why
                run = await client.get_run(run_id)
                after = run.shards[0]
                if not why and not after.held and after.lineage == before.lineage:
                    return result
                why = why or after.held or "server 0's shard went back to a checkpoint while the pieces were read"
                if not away and run.state in _ENDED:  # (a run that ended goes back to no checkpoint)
                    raise errors.FailedPrecondition(errors.Code.FAILED_PRECONDITION, _mixed(run, why))
            if loop.time() >= deadline:
                if away:
                    raise errors.Unavailable(errors.Code.UNAVAILABLE, f"a server of {run_id} did not answer within "
                                             f"{wait:g}s ({away}): export again once it is back ('psctl status "
                                             f"{run_id}' shows its servers), or with a longer --timeout")
                raise errors.Unavailable(errors.Code.UNAVAILABLE, f"the servers of {run_id} are going back to a "
                                         f"checkpoint (one restarted), and its pieces were not all of one history "
                                         f"within {wait:g}s ({why}): export again in a moment, or with a longer "
                                         f"--timeout")
            await asyncio.sleep(0.2)
            run = await client.get_run(run_id)
            for c, shard in zip(shards.clients, run.shard_map.shards, strict=False):
                c.route.told(shard.data_port, shard.shm_socket)  # (a restarted server may have others)
    finally:
        await shards.close()
