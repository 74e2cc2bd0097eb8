"""Helpers shared by the test layers (import as ``from support import ...``)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from paramserver.v1 import paramserver_pb2 as pb
from ps_server.config import ServerConfig

__all__ = ["Stubs", "make_spec", "rename_refusing_deletions", "train_all", "train_with_a_zero_pusher",
           "unlink_holding_arrays", "until", "with_config"]


def make_spec(
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
    num_workers: int = 2,
    staleness: int = 0,
    iterations: int = 10,
    lr: float = 1.0,
    init: int = pb.INITIALIZER_NORMAL,
    **kw: Any,
) -> pb.RunSpec:
    """A small run spec with SGD (learning rate ``lr``) over tensors of ``shapes``."""
    shapes = shapes or {"w": (3, 4), "b": (4,)}
    return pb.RunSpec(
        name=kw.pop("name", "test"),
        num_workers=num_workers,
        staleness=staleness,
        iterations=iterations,
        optimizer=kw.pop("optimizer", pb.OptimizerSpec(sgd=pb.SgdConfig(learning_rate=lr))),
        params=[pb.ParamSpec(name=n, shape=s, initializer=init, scale=1.0) for n, s in shapes.items()],
        **kw,
    )


async def until(condition: Callable[[], object], seconds: float = 2.0) -> None:
    """Return once ``condition()`` is true, or after ``seconds`` (the assertion that follows says
    what did not happen), looking every 20 ms while the event loop serves the server under test."""
    for _ in range(max(1, round(seconds / 0.02))):
        if condition():
            return
        await asyncio.sleep(0.02)


def with_config(config: ServerConfig, **changes: Any) -> ServerConfig:
    return dataclasses.replace(config, **changes)


def rename_refusing_deletions() -> Callable[[Any, Any], None]:
    """``os.rename`` (as it is now) on a data directory a run's directory cannot be moved out of
    to be deleted: to its ``.deleted-`` name, PermissionError; any other rename is done."""
    rename = os.rename

    def refused(src: Any, dst: Any) -> None:
        if ".deleted-" in str(dst):
            raise PermissionError(13, "Permission denied", str(src))
        rename(src, dst)

    return refused


def unlink_holding_arrays() -> Callable[..., None]:
    """``os.unlink`` (as it is now) on a file system that holds a checkpoint's ``arrays.npz`` busy
    (EBUSY, as a file open on NFS); any other file is removed."""
    unlink = os.unlink

    def held(path: Any, *args: Any, **kw: Any) -> None:
        if str(path).endswith("arrays.npz"):
            raise OSError(16, "Device or resource busy", path)
        unlink(path, *args, **kw)

    return held


@dataclass
class Stubs:
    """The generated gRPC stubs (fixture ``stubs``), for tests that drive RPCs by hand: malformed
    or partial calls the SDK would never make."""

    runs: Any
    workers: Any
    data: Any


async def train_all(server: Any, spec: pb.RunSpec, config: Any) -> tuple[str, list[Any]]:
    """Create the run on an in-memory server (``ps_server.testing.InMemoryServer``) and train every
    rank in this event loop, each with its own client; (run id, each rank's ``Outcome``)."""
    import asyncio

    from worker.main import CAPABILITIES
    from worker.trainer import train

    async with server.client() as admin:
        run = await admin.create_run(spec)
    clients = [server.client() for _ in range(spec.num_workers)]
    try:
        joined = [await c.join(f"w{i}", run.run_id, max_wait=0, capabilities=CAPABILITIES) for i, c in enumerate(clients)]
        outcomes = await asyncio.gather(*(train(c, j.assignment, config) for c, j in zip(clients, joined, strict=True)))
    finally:
        for c in clients:
            await c.close()
    return run.run_id, list(outcomes)


async def train_with_a_zero_pusher(server: Any, spec: pb.RunSpec, config: Any) -> tuple[str, Any]:
    """A run of two ranks: rank 0 a worker (``train``), rank 1 pushing zero gradients at every
    clock (empty ones for tables). Rank 1's pushes count as updates (rank 0's own pushes are then
    stale, and a staleness-aware rate scales them) but change nothing: the server's parameters
    hold rank 0's steps alone."""
    import numpy as np

    from worker.main import CAPABILITIES
    from worker.trainer import train

    async with server.client() as admin:
        run = await admin.create_run(spec)
    c0, c1 = server.client(), server.client()
    try:
        j0 = await c0.join("w0", run.run_id, max_wait=0, capabilities=CAPABILITIES)
        j1 = (await c1.join("w1", run.run_id, max_wait=0, capabilities=CAPABILITIES)).assignment
        dense = [p.name for p in spec.params if not p.table]

        async def zeros() -> None:
            held = (await c1.pull(run.run_id, j1.rank, j1.incarnation, 0, names=dense)).tensors if dense else {}
            zero = {n: np.zeros_like(v) for n, v in held.items()}
            for c in range(spec.iterations):  # (its then_pull waits for the bound: no push of it is refused)
                await c1.push_pull(run.run_id, j1.rank, j1.incarnation, c, zero, into={}, names=dense)
            await c1.leave(run.run_id, j1.rank, j1.incarnation, pb.LEAVE_REASON_DONE)

        outcome, _ = await asyncio.gather(train(c0, j0.assignment, config), zeros())
    finally:
        await c0.close()
        await c1.close()
    return run.run_id, outcome
