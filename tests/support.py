"""Helpers shared by the test layers (import as ``from support import ...``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from paramserver.v1 import paramserver_pb2 as pb
from ps_server.config import ServerConfig

__all__ = ["Stubs", "make_spec", "with_config"]


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


def with_config(config: ServerConfig, **changes: Any) -> ServerConfig:
    return dataclasses.replace(config, **changes)


@dataclass
class Stubs:
    """The generated gRPC stubs (fixture ``stubs``), for tests that drive RPCs by hand: malformed
    or partial calls the SDK would never make."""

    runs: Any
    workers: Any
    data: Any
