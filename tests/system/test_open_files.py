"""Open files (issue 14): the server raises its soft limit to the hard one at start, and caps TCP
data plane streams by the descriptors it has, so that a flood of streams is refused with a status
while health checks and new gRPC clients are still served."""

from __future__ import annotations

import asyncio
import re
import resource
import socket
from pathlib import Path

import grpc
import pytest
from procs import connect, free_port, ps_server
from support import make_spec

from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import tcp
from ps_server.tcp_plane import stream_cap

pytestmark = pytest.mark.timeout(90)


def _soft_limit(pid: int) -> int:
    match = re.search(r"Max open files\s+(\d+)", Path(f"/proc/{pid}/limits").read_text())
    assert match
    return int(match.group(1))


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.fail(f"this test needs a finite hard limit on open files above 256 (ulimit -Hn is {hard})")
    with ps_server("--port", "0", open_files=(256, hard)) as (proc, _):
        assert _soft_limit(proc.pid) == hard


async def _open_stream(port: int) -> tuple[socket.socket, bytes]:
    """A raw push stream; what the server answered its hello with (the echo, or a STATUS frame)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, tcp.hello(tcp.METHOD_PUSH))
    head = await asyncio.wait_for(loop.sock_recv(sock, tcp.HELLO.size), 10)
    return sock, head


async def test_streams_beyond_the_descriptors_are_refused_and_grpc_is_still_served() -> None:
    files = 200  # a hard limit the server cannot raise
    cap = stream_cap(files)
    data_port = free_port()
    with ps_server("--port", "0", "--data-port", str(data_port), open_files=(files, files)) as (_, addr):
        opened = [await _open_stream(data_port) for _ in range(cap + 20)]
        try:
            accepted = [s for s, head in opened if head == tcp.hello(tcp.METHOD_PUSH)]
            refused = [s for s, head in opened if head != tcp.hello(tcp.METHOD_PUSH)]
            assert len(accepted) == cap and len(refused) == 20
            for sock, head in [(s, head) for s, head in opened if s in refused[:3]]:
                kind, status, body = await tcp.read_frame(sock, 1 << 20, head=head)  # head: the frame's start
                assert kind == tcp.STATUS and status == grpc.StatusCode.UNAVAILABLE.value[0]
                parsed = pb.Status.FromString(bytes(body))
                assert parsed.error.reason == pb.ERROR_REASON_STREAM_LIMIT and f"more than {cap}" in parsed.message
            async with connect(addr) as c:  # a new gRPC client, and a health check, still get answers
                assert await c.health(timeout=10) == "SERVING"
                run = await c.create_run(make_spec(num_workers=1))
                assert (await c.get_run(run.run_id)).run_id == run.run_id
        finally:
            for sock, _ in opened:
                sock.close()
