"""Shared fixtures: a real server on 127.0.0.1:0 and a client connected to it (helpers: support.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from support import Stubs

from paramserver.client import PsClient
from paramserver.v1 import paramserver_pb2_grpc as pb_grpc
from ps_server.config import ServerConfig
from ps_server.server import PsServer, start_server


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


@pytest.fixture(params=["shm", "tcp", "grpc"])
async def client(server: PsServer, request: pytest.FixtureRequest) -> AsyncIterator[PsClient]:
    """Pushes and pulls through the shared-memory data plane or over the TCP data plane (once a
    join told where), or over gRPC only; afterwards, checks that they used no other transport."""
    transport = request.param
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10.0, chunk_bytes=server.config.chunk_bytes,
                        data_plane=transport != "grpc", shm=transport == "shm") as c:
        yield c
        opened = c.route.opened
        if transport == "shm":
            assert opened["shm_unreachable"] == opened["tcp"] == 0, opened
        else:
            assert opened["shm"] == 0 and opened["tcp_unreachable" if transport == "tcp" else "tcp"] == 0, opened


@pytest.fixture
async def stubs(server: PsServer) -> AsyncIterator[Stubs]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield Stubs(pb_grpc.RunServiceStub(channel), pb_grpc.WorkerServiceStub(channel),
                    pb_grpc.ParameterServiceStub(channel))
