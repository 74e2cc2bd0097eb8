"""Shared fixtures: a real server on 127.0.0.1:0 and a client connected to it."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from paramserver.v1 import paramserver_pb2 as pb
from ps_server.config import ServerConfig
from ps_server.server import PsServer, start_server
from worker.client import PsClient


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


@pytest.fixture
def server_config() -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, max_wait_seconds=10.0, lease_seconds=30.0, grace_seconds=0.5)


@pytest.fixture
async def server(server_config: ServerConfig) -> AsyncIterator[PsServer]:
    ps = await start_server(server_config)
    try:
        yield ps
    finally:
        await ps.stop(0)


@pytest.fixture
async def client(server: PsServer) -> AsyncIterator[PsClient]:
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10.0, chunk_bytes=server.config.chunk_bytes) as c:
        yield c


def with_config(config: ServerConfig, **changes: Any) -> ServerConfig:
    return dataclasses.replace(config, **changes)
