"""Hypothesis fuzzing of the TCP and shared-memory data planes' framing: random frames, truncated
and corrupted pushes, lying lengths, bad segments. Each stream must end with a documented status
(never UNKNOWN, INTERNAL only for a message that does not parse) or be closed, within the stall
limit; the server logs no failure of its own, keeps no stream or segment open, and a push changes
the run only when it was acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import mmap
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import segments
from support import make_spec, until

from paramserver.client import PsClient
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import shm, tcp, wire
from ps_server.config import ServerConfig
from ps_server.server import PsServer, start_server

pytestmark = pytest.mark.timeout(300)

DOCUMENTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.INTERNAL}
CODES = {c.value[0]: c for c in grpc.StatusCode}
SHAPES = {"w": (300, 100), "b": (4,)}  # w: more than 64 KiB (the hand decoder's size)


@dataclasses.dataclass
class Live:
    server: PsServer
    run_id: str
    rank: int
    incarnation: int


@pytest.fixture
async def live(server_config: ServerConfig) -> AsyncIterator[Live]:
    ps = await start_server(dataclasses.replace(server_config, stall_seconds=0.5, push_slots=1))
    try:
        async with PsClient(f"127.0.0.1:{ps.port}", timeout=10, data_plane=False) as c:
            run = await c.create_run(make_spec(shapes=SHAPES, num_workers=1, staleness=-1, iterations=1000))
            a = (await c.join("w", run.run_id)).assignment
        yield Live(ps, run.run_id, a.rank, a.incarnation)
    finally:
        await ps.stop(0)


def _push(live: Live, clock: int, small: bool, then_pull: bool, split: int) -> list[bytes]:
    shapes = {"b": SHAPES["b"]} if small else SHAPES
    grads = {n: np.full(s, 0.25, np.float32) for n, s in shapes.items()}
    groups = list(wire.chunk_groups(grads, 1 << 20 if split == 1 else 4 * 30000 // split + 1))
    pull = wire.pull_request_bytes(live.run_id, live.rank, live.incarnation, clock + 1, 0.1) if then_pull else None
    return [wire.join(wire.push_request_parts(live.run_id, live.rank, live.incarnation, clock, g, i == len(groups) - 1,
                                              then_pull=pull))
            for i, g in enumerate(groups)]


FRAME_KINDS = st.sampled_from([tcp.MESSAGE] * 6 + [tcp.STATUS, shm.SEGMENT, shm.SHARED, 0, 7, 255])


@st.composite
def plans(draw: st.DrawFn) -> dict[str, Any]:
    """A stream's method and what the client writes: ("push", clock, small, then_pull, split)
    items (each message maybe mutated, maybe given a length that lies) and raw frames."""
    items = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.integers(0, 3)):
            items.append(("push", draw(st.sampled_from([0, 0, 1, 2, 5, 2**64 - 1])), draw(st.booleans()),
                          draw(st.booleans()), draw(st.sampled_from([1, 1, 2, 3])),
                          draw(st.randoms(use_true_random=False)).random(), draw(st.sampled_from([0] * 8 + [-1, 1]))))
        else:
            items.append(("raw", draw(FRAME_KINDS), draw(st.integers(0, 2**32 - 1) | st.just(0)),
                          draw(st.integers(0, 40) | st.sampled_from([2**64 - 1, 1 << 40, 70000])),
                          draw(st.binary(max_size=40))))
    return {"method": draw(st.sampled_from([tcp.METHOD_PUSH] * 3 + [tcp.METHOD_PULL, 0, 3])), "items": items,
            "mutate": draw(st.randoms(use_true_random=False)), "segment": draw(st.sampled_from(
                ["none", "good", "good", "small", "unsealed", "huge", "write_sealed"]))}


def _memfd(size: int, seal: bool) -> int:
    fd = os.memfd_create("fuzz", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


def _exchange(live: Live, transport: str, plan: dict[str, Any]) -> tuple[list[bytes], tuple[int, pb.Status] | None]:
    """Run ``plan`` on a new stream (blocking: in a thread); the MESSAGE bodies and the STATUS it got."""
    rng = plan["mutate"]
    if transport == "tcp":
        assert live.server.data_plane is not None
        sock = socket.create_connection(("127.0.0.1", live.server.data_plane.port), timeout=10)
    else:
        assert live.server.shm_plane is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(shm.name_for(live.server.shm_plane.name))
    region: memoryview | None = None
    mm = None
    with sock:
        sock.sendall(tcp.hello(plan["method"]))
        with contextlib.suppress(OSError):
            if transport == "shm" and plan["segment"] != "none":
                size = 64 if plan["segment"] == "small" else 1 << 20
                fd = _memfd(size, plan["segment"] != "unsealed")
                mm = mmap.mmap(fd, size)
                if plan["segment"] == "write_sealed":
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0x10)  # F_SEAL_FUTURE_WRITE: no new writable mapping
                region = memoryview(mm)
                said = size if plan["segment"] != "huge" else 1 << 40
                socket.send_fds(sock, [tcp.FRAME.pack(shm.SEGMENT, 0, 0, 0, 16) + shm.REGION.pack(said, 0)], [fd])
                os.close(fd)
            at = 0
            for item in plan["items"]:
                if item[0] == "raw":
                    _, kind, status, length, body = item
                    sock.sendall(tcp.FRAME.pack(kind, 0, 0, status, length) + body)
                    continue
                if item[0] == "push" and region is not None and item[5] > 0.9:  # a new segment first (to grow)
                    fd = _memfd(1 << 20, True)
                    new = mmap.mmap(fd, 1 << 20)
                    socket.send_fds(sock, [tcp.FRAME.pack(shm.SEGMENT, 0, 0, 0, 16) + shm.REGION.pack(1 << 20, 0)],
                                    [fd])
                    os.close(fd)
                    region.release()
                    assert mm is not None
                    mm.close()
                    mm, region, at = new, memoryview(new), 0
                _, clock, small, then_pull, split, how, lie = item
                for body in _push(live, clock, small, then_pull, split):
                    body = _mutate(body, rng)
                    if region is not None and how < 0.6 and at + len(body) <= len(region):
                        region[at : at + len(body)] = body
                        sock.sendall(tcp.FRAME.pack(shm.SHARED, 0, 0, 0, 16) +
                                     shm.REGION.pack(at + (lie > 0), max(0, len(body) + lie)))
                        at = shm.align(at + len(body))
                    else:
                        sock.sendall(tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, max(0, len(body) + lie)) + body)
            sock.shutdown(socket.SHUT_WR)
        got: list[bytes] = []
        status = None
        try:
            data = bytearray()
            while chunk := sock.recv(1 << 20):
                data += chunk
        except OSError:
            pass  # (a reset: the server closed while we wrote)
        finally:
            if region is not None:
                region.release()
            if mm is not None:
                mm.close()
    data = bytes(data)
    if data[: tcp.HELLO.size] == tcp.hello(plan["method"]):
        data = data[tcp.HELLO.size :]
    i = 0
    while i + tcp.FRAME.size <= len(data):
        kind, _, _, code, length = tcp.FRAME.unpack_from(data, i)
        i += tcp.FRAME.size
        body = data[i : i + length]
        i += length
        if kind == tcp.STATUS:
            status = (code, pb.Status.FromString(body))
            break
        got.append(body)
    return got, status


def _mutate(body: bytes, rng: Any) -> bytes:
    how = rng.choice(["as_is", "as_is", "as_is", "truncate", "flip", "random", "extend"])
    if how == "truncate":
        return body[: rng.randrange(len(body))]
    if how == "flip":
        out = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(min(len(out), 400)) if rng.random() < 0.7 else rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    if how == "random":
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if how == "extend":
        return body + bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))
    return body


@pytest.mark.parametrize("transport", ["tcp", "shm"])
@settings(max_examples=int(os.environ.get("FUZZ_N", 60)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(plan=plans())
async def test_random_frames_end_with_a_documented_status_and_change_nothing_unacknowledged(
        live: Live, transport: str, plan: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "ps_server")
    run = live.server.registry.get(live.run_id)
    before = run.counters.pushes_applied, {n: t.copy() for n, t in run.read(None, 0, None, None).tensors.items()}
    got, status = await asyncio.wait_for(asyncio.to_thread(_exchange, live, transport, plan), 20)
    if status is not None:
        code, message = CODES[status[0]], status[1]
        assert code in DOCUMENTED | {grpc.StatusCode.UNIMPLEMENTED}, (code, message)
        assert message.error.reason != pb.ERROR_REASON_UNSPECIFIED, message
        if code == grpc.StatusCode.INTERNAL:
            assert message.error.reason == pb.ERROR_REASON_MALFORMED_MESSAGE, message
    plane = live.server.data_plane if transport == "tcp" else live.server.shm_plane
    assert plane is not None
    await until(lambda: plane.statistics().open == 0, 5)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    after = run.read(None, 0, None, None).tensors
    if run.counters.pushes_applied == before[0]:  # nothing applied: nothing changed
        for n, t in before[1].items():
            np.testing.assert_array_equal(after[n], t)
    assert segments() <= 1  # (the server's: none left from a stream that ended; the publication at most)
