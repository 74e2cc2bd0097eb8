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


def _shm_stream(name: str) -> tuple[socket.socket, bytes]:
    """A raw shared-memory push stream that passed a segment (as every worker's does); what the
    server answered its hello with (blocking: in a thread)."""
    import fcntl
    import os

    from paramserver.v1 import shm

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(shm.name_for(name))
    try:
        sock.sendall(tcp.hello(tcp.METHOD_PUSH))
        head = sock.recv(tcp.HELLO.size)
    except (BrokenPipeError, ConnectionResetError):  # (closed unanswered: a flood of refusals)
        head = b""
    if head == tcp.hello(tcp.METHOD_PUSH):
        fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 1 << 16)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        socket.send_fds(sock, [tcp.FRAME.pack(shm.SEGMENT, 0, 0, 0, shm.REGION.size) + shm.REGION.pack(1 << 16, 0)],
                        [fd])
        os.close(fd)
    return sock, head


async def test_streams_of_both_data_planes_share_the_descriptors_and_grpc_is_still_served() -> None:
    """A shared-memory stream holds two descriptors (its socket, and its segment's mapping: mmap
    keeps a duplicate), and the TCP and shared-memory planes draw on one open-file limit: streams
    of both, up to the cap, leave gRPC and health checks their descriptors."""
    files = 200
    cap = stream_cap(files)
    data_port = free_port()
    with ps_server("--port", "0", "--data-port", str(data_port), open_files=(files, files)) as (_, addr):
        async with connect(addr) as c:
            run = await c.create_run(make_spec(num_workers=1))
            name = (await c.join("w", run.run_id)).shm_socket
        assert name
        opened = [await _open_stream(data_port) for _ in range(cap // 2)]
        opened += [await asyncio.to_thread(_shm_stream, name) for _ in range(cap)]
        try:
            await asyncio.sleep(0.5)  # (the server maps the segments)
            accepted = [s for s, head in opened if head[:4] == tcp.MAGIC]
            assert len(accepted) == cap // 2 + (cap - cap // 2) // 2  # TCP: one descriptor each, shm: two
            for sock, head in [(s, head) for s, head in opened if s not in accepted][:3]:  # (the first refused)
                sock.setblocking(False)
                kind, status, body = await tcp.read_frame(sock, 1 << 20, head=head)
                assert kind == tcp.STATUS and status == grpc.StatusCode.UNAVAILABLE.value[0]
                assert pb.Status.FromString(bytes(body)).error.reason == pb.ERROR_REASON_STREAM_LIMIT
            async with connect(addr) as c:  # a new gRPC client, and a health check, still get answers
                assert await asyncio.wait_for(c.health(timeout=10), 15) == "SERVING"
                run = await c.create_run(make_spec(num_workers=1))
                assert (await c.get_run(run.run_id)).run_id == run.run_id
        finally:
            for sock, _ in opened:
                sock.close()
