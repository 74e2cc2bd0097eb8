"""Pushes and pulls of a run whose parameters several servers hold (``Assignment.shard_map``).

``Shards`` has PsClient's data plane methods (``push``, ``push_pull``, ``pull``) and does what the
proto's "Shards" section asks of a worker: each iteration goes to every shard at once, each with
the rows of each tensor that shard holds (views, not copies), and pulled pieces are written into
the rows of the caller's arrays. A call is complete when every shard answered; when some did not,
the error is raised and the shards that did are remembered, so the caller's retry of the same
call (the next call, if it has the same arguments) goes only to the others (exactly-once per shard; a shard that already applied a push would
only acknowledge it again anyway). Answers combine as the least guarantee: the least clock, min
clock and guaranteed clock, duplicate only if every shard says so, and a finished run's state
over a running one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import numpy as np

from paramserver.v1 import paramserver_pb2 as pb

from . import errors
from .client import PsClient
from .sink import PullResult

__all__ = ["Shards", "pull_run"]

_STATE_ORDER: dict[int, int] = {pb.RUN_STATE_FAILED: 0, pb.RUN_STATE_STOPPED: 1, pb.RUN_STATE_COMPLETED: 2, pb.RUN_STATE_PENDING: 3,
                pb.RUN_STATE_RUNNING: 4}


def _state(states: Sequence[int]) -> int:
    return min(states, key=lambda s: _STATE_ORDER.get(s, 5))


class Shards:
    """The data plane of one sharded run; ``close`` closes the connections it opened."""

    def __init__(self, shard_map: pb.ShardMap, shapes: Mapping[str, tuple[int, ...]],
                 connect: Callable[[pb.Shard], PsClient]) -> None:
        """``shapes``: every tensor's whole shape (the run spec's); ``connect``: a client of a shard."""
        self.shard_map = shard_map
        self.shapes = dict(shapes)
        self.clients = [connect(s) for s in shard_map.shards]
        self._done: tuple[object, dict[int, Any]] = ((), {})

    @classmethod
    def beside(cls, client: PsClient, shard_map: pb.ShardMap, spec: pb.RunSpec) -> Shards:
        """Clients of every shard, configured as ``client`` is (timeout, security, data plane)."""
        def connect(shard: pb.Shard) -> PsClient:
            c = PsClient(shard.address, timeout=client.timeout, chunk_bytes=client.chunk_bytes,
                         max_message_bytes=client.max_message_bytes, security=client.security,
                         data_plane=client.data_plane)
            c.route.told(shard.data_port)
            return c

        return cls(shard_map, {p.name: tuple(p.shape) for p in spec.params}, connect)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)

    # ------------------------------------------------------------------------------ slicing
    def _rows(self, arrays: Mapping[str, np.ndarray], shard: pb.Shard) -> dict[str, np.ndarray]:
        """``shard``'s pieces of ``arrays``: views of their rows (a scalar is its one row)."""
        out = {}
        for pc in shard.pieces:
            a = arrays[pc.name]
            out[pc.name] = a if a.ndim == 0 else a[pc.row_start:pc.row_end]
        return out

    def _arrays(self, into: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """``into`` with an array of the whole shape for every tensor (new where missing or unfit)."""
        out = {} if into is None else into
        for name, shape in self.shapes.items():
            a = out.get(name)
            if a is None or a.shape != shape or a.dtype != np.float32 or not a.flags.c_contiguous:
                out[name] = np.empty(shape, np.float32)
        return out

    async def _each(self, key: object, call: Callable[[int, PsClient, pb.Shard], Awaitable[Any]]) -> list[Any]:
        """``call`` on every shard not yet answered for ``key``; their answers in shard order, or
        the first refusal that is not retryable, else the first retryable one."""
        if self._done[0] != key:
            self._done = (key, {})
        answered = self._done[1]
        todo = [i for i in range(len(self.clients)) if i not in answered]
        results = await asyncio.gather(*(call(i, self.clients[i], self.shard_map.shards[i]) for i in todo),
                                       return_exceptions=True)
        failures = []
        for i, r in zip(todo, results, strict=True):
            if isinstance(r, BaseException):
                failures.append(r)
            else:
                answered[i] = r
        if failures:
            fatal = [f for f in failures if not (isinstance(f, errors.PsError) and f.retryable)]
            raise (fatal or failures)[0]
        self._done = ((), {})  # complete: the same call again is sent again (a retry after success)
        return [answered[i] for i in range(len(self.clients))]

    # ------------------------------------------------------------------------------ the data plane
    async def push(self, run_id: str, rank: int, incarnation: int, clock: int, grads: Mapping[str, np.ndarray],
                   loss: float = 0.0, timeout: float | None = None) -> pb.PushGradientResponse:
        acks = await self._each(("push", run_id, rank, incarnation, clock), lambda i, c, s: c.push(
            run_id, rank, incarnation, clock, self._rows(grads, s), loss, timeout))
        return _combined(acks)

    async def push_pull(self, run_id: str, rank: int, incarnation: int, clock: int, grads: Mapping[str, np.ndarray],
                        loss: float = 0.0, *, into: dict[str, np.ndarray] | None = None,
                        max_wait: float | None = None) -> tuple[pb.PushGradientResponse, PullResult]:
        out = self._arrays(into)
        answers = await self._each(("push_pull", run_id, rank, incarnation, clock), lambda i, c, s: c.push_pull(
            run_id, rank, incarnation, clock, self._rows(grads, s), loss, into=self._rows(out, s), max_wait=max_wait))
        return _combined([a for a, _ in answers]), _pulled([p for _, p in answers], out)

    async def pull(self, run_id: str, rank: int = 0, incarnation: int = 0, clock: int = 0, *,
                   into: dict[str, np.ndarray] | None = None, names: Sequence[str] = (),
                   max_wait: float | None = None, timeout: float | None = None) -> PullResult:
        out = self._arrays(into)
        wanted = set(names)

        async def one(i: int, c: PsClient, s: pb.Shard) -> PullResult | None:
            mine = [pc.name for pc in s.pieces if not wanted or pc.name in wanted]
            if wanted and not mine:
                return None  # this shard holds none of the names asked for
            return await c.pull(run_id, rank, incarnation, clock, into=self._rows(out, s), names=mine if wanted else (),
                                max_wait=max_wait, timeout=timeout)

        pulled = [p for p in await self._each(("pull", run_id, rank, incarnation, clock, tuple(names)), one) if p]
        if wanted:
            out = {n: a for n, a in out.items() if n in wanted}
        return _pulled(pulled, out)


def _combined(acks: Sequence[pb.PushGradientResponse]) -> pb.PushGradientResponse:
    return pb.PushGradientResponse(clock=min(a.clock for a in acks), duplicate=all(a.duplicate for a in acks),
                                   min_clock=min(a.min_clock for a in acks),
                                   run_state=_state([a.run_state for a in acks]))  # type: ignore[arg-type]


def _pulled(results: Sequence[PullResult], out: dict[str, np.ndarray]) -> PullResult:
    return PullResult(min(r.guaranteed_clock for r in results), min(r.version for r in results),
                      _state([r.run_state for r in results]), out)


async def pull_run(client: PsClient, run_id: str) -> PullResult:
    """A run's whole current parameters, an observer's read (never waits): from the server
    ``client`` talks to, or from every server of a sharded run, its pieces put together."""
    run = await client.get_run(run_id)
    if not run.shard_map.shards:
        return await client.pull(run_id)
    shards = Shards.beside(client, run.shard_map, run.spec)
    try:
        return await shards.pull(run_id)
    finally:
        await shards.close()
