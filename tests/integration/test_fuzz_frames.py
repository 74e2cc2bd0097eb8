"""Hypothesis fuzzing of the TCP and shared-memory data planes' framing: random frames, truncated
and corrupted pushes, lying lengths, bad segments. Each stream must end with a documented status
(never UNKNOWN, INTERNAL only for a message that does not parse) or be closed, within the stall
limit; the server logs no failure of its own, keeps no stream or segment open, and a push changes
the run only when it was acknowledged. And pushes and pulls that disagree with the run, segments
and regions of any size, frames cut short: no descriptor or mapping is left once the stream ends
(at once, not at a garbage collection), and a well-behaved client is served after each."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import gc
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
async def live(server_config: ServerConfig, request: pytest.FixtureRequest) -> AsyncIterator[Live]:
    """A run of one rank, asynchronous; or (``request.param`` "bsp") BSP with a second rank that
    never pushes: the rank's pulls past its first clock, which it pushed, park."""
    bsp = getattr(request, "param", "asp") == "bsp"
    ps = await start_server(dataclasses.replace(server_config, stall_seconds=0.5, push_slots=1, lease_seconds=3600))
    try:
        async with PsClient(f"127.0.0.1:{ps.port}", timeout=10, data_plane=False) as c:
            run = await c.create_run(make_spec(shapes=SHAPES, num_workers=2 if bsp else 1, staleness=0 if bsp else -1,
                                               iterations=1000))
            if bsp:
                await c.join("idle", run.run_id)
            a = (await c.join("w", run.run_id)).assignment
            if bsp:  # (its clock 0 done: its pulls of clock 1 on wait for the idle rank)
                await c.push(run.run_id, a.rank, a.incarnation, 0, {n: np.zeros(s, np.float32) for n, s in SHAPES.items()})
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


def _connect(live: Live, transport: str) -> socket.socket:
    """A new stream to the server's data plane of ``transport`` ("tcp" or "shm"), before its hello."""
    if transport == "tcp":
        assert live.server.data_plane is not None
        return socket.create_connection(("127.0.0.1", live.server.data_plane.port), timeout=10)
    assert live.server.shm_plane is not None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(shm.name_for(live.server.shm_plane.name))
    return sock


def _exchange(live: Live, transport: str, plan: dict[str, Any]) -> tuple[list[bytes], tuple[int, pb.Status] | None]:
    """Run ``plan`` on a new stream (blocking: in a thread); the MESSAGE bodies and the STATUS it got."""
    rng = plan["mutate"]
    sock = _connect(live, transport)
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
    plane = live.server.data_plane if transport == "tcp" else live.server.shm_plane
    assert plane is not None
    descriptors = _open_descriptors()
    gc.collect()
    gc.disable()  # (what a stream holds must go when it ends, not at the next collection)
    try:
        got, status = await asyncio.wait_for(asyncio.to_thread(_exchange, live, transport, plan), 20)
        await until(lambda: plane.statistics().open == 0, 5)
        await until(lambda: _open_descriptors() <= descriptors and _fuzz_mappings() == 0, 2)
        assert _fuzz_mappings() == 0 and _open_descriptors() <= descriptors
    finally:
        gc.enable()
    if status is not None:
        code, message = CODES[status[0]], status[1]
        assert code in DOCUMENTED | {grpc.StatusCode.UNIMPLEMENTED}, (code, message)
        assert message.error.reason != pb.ERROR_REASON_UNSPECIFIED, message
        if code == grpc.StatusCode.INTERNAL:
            assert message.error.reason == pb.ERROR_REASON_MALFORMED_MESSAGE, message
    assert plane.statistics().open == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    after = run.read(None, 0, None, None).tensors
    if run.counters.pushes_applied == before[0]:  # nothing applied: nothing changed
        for n, t in before[1].items():
            np.testing.assert_array_equal(after[n], t)
    assert segments() <= 1  # (the server's: none left from a stream that ended; the publication at most)


# ------------------------------------------------------------------ bad messages, segments, regions
BAD_VARINT = b"\xff" * 10 + b"\x01"
"""A varint of 11 bytes (protobuf's are 10 at most)."""


@st.composite
def chunks(draw: st.DrawFn) -> tuple[str, tuple[int, ...], int, np.ndarray]:
    """A chunk of the run's tensors, or one that disagrees with them: another name or shape, an
    offset overlapping or past the end, too many or few elements, NaN/Inf values."""
    name = draw(st.sampled_from(["w", "w", "b", "b", "x", ""]))
    shape = SHAPES.get(name, (4,))
    shape = draw(st.sampled_from([shape, shape, shape, (*shape, 1), shape[::-1], (0,), (2**40,), ()]))
    size = int(np.prod(SHAPES.get(name, (4,))))
    offset = draw(st.sampled_from([0, 0, 0, 1, size // 2, size, size + 7, 2**63]))
    n = draw(st.sampled_from([size - offset if 0 <= size - offset <= size else 0, size, 1, 0, size // 2]))
    values = np.full(n, draw(st.sampled_from([0.25, 0.25, np.nan, np.inf, -np.inf, 3e38])), np.float32)
    return name, shape, offset, values


class Body(bytes):
    """A message's bytes, shown by their length (a failing example's report stays readable)."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


@st.composite
def messages(draw: st.DrawFn, live: Live) -> bytes:
    """A PushGradientRequest that the stream's rank could send, or one it should not: bad chunks,
    an old, future or "negative" clock, an 11-byte varint, another rank or incarnation or run."""
    clock = draw(st.sampled_from([0, 0, 1, 3, 2**63, 2**64 - 1]))
    group = draw(st.lists(chunks(), min_size=0, max_size=4))
    rank = draw(st.sampled_from([live.rank] * 4 + [live.rank + 1, 2**32 - 1]))
    incarnation = draw(st.sampled_from([live.incarnation] * 4 + [0, live.incarnation + 1]))
    run_id = draw(st.sampled_from([live.run_id] * 6 + ["no-such-run", ""]))
    then_pull = wire.pull_request_bytes(run_id, rank, incarnation, clock + 1 & (2**64 - 1), 0.1) \
        if draw(st.booleans()) else None
    body = wire.join(wire.push_request_parts(run_id, rank, incarnation, clock, group,
                                             draw(st.booleans() | st.just(True)), then_pull=then_pull))
    where = draw(st.sampled_from([None] * 6 + ["end", "clock", "inside"]))
    if where == "end":
        body += b"\x20" + BAD_VARINT  # a second clock, of 11 bytes
    elif where == "clock":
        body = body[: len(body) // 2] + b"\x20" + BAD_VARINT + body[len(body) // 2 :]
    elif where == "inside":
        body = b"\x20" + BAD_VARINT + body
    return Body(body)


@st.composite
def pulls(draw: st.DrawFn, live: Live) -> bytes:
    """A PullParamsRequest the stream's rank could send, or one it should not: unknown or repeated
    names, rows of a tensor that is no table (ids cut short, out of range), a clock past the run's
    end, negative or huge waits, versions it never had."""
    if draw(st.booleans()):  # one it could send (one past its clock parks in a BSP run)
        return Body(wire.pull_request_bytes(live.run_id, live.rank, live.incarnation, draw(st.sampled_from([0, 1, 2])),
                                            draw(st.sampled_from([0.1, 2.0]))))
    request = pb.PullParamsRequest(
        run_id=draw(st.sampled_from([live.run_id] * 8 + ["no-such-run", ""])),
        rank=draw(st.sampled_from([live.rank] * 8 + [live.rank + 1, 2**32 - 1])),
        incarnation=draw(st.sampled_from([live.incarnation] * 8 + [0, live.incarnation + 1])),
        clock=draw(st.sampled_from([0, 1, 1, 2, 999, 1000, 2**64 - 1])),
        names=draw(st.lists(st.sampled_from(["w", "b", "x", ""]), max_size=3)),
        since_version=draw(st.sampled_from([0, 0, 1, 2**64 - 1])), since_lineage=draw(st.sampled_from([0, 0, 1, 7])))
    request.max_wait.seconds, request.max_wait.nanos = draw(st.sampled_from([(0, 100_000_000), (0, 0), (-5, 0),
                                                                              (2**40, 0), (0, -1)]))
    for _ in range(draw(st.integers(0, 2))):
        request.rows.add(name=draw(st.sampled_from(["w", "b", "x"])),
                         row_ids=draw(st.sampled_from([b"", b"\x01", np.arange(3, dtype="<i8").tobytes(),
                                                       np.array([-1, 2**62], "<i8").tobytes()])))
    return Body(request.SerializeToString())


@st.composite
def stream_plans(draw: st.DrawFn, live: Live) -> tuple[int, list[tuple[Any, ...]]]:
    """A stream's method and what its client sends: messages, mostly of its method (inline or in
    the segment), SEGMENT frames (of any size, with 0 to 5 descriptors, each a memfd good or bad),
    SHARED frames pointing anywhere, bytes cut off in the middle of a frame."""
    method = draw(st.sampled_from([tcp.METHOD_PUSH, tcp.METHOD_PULL]))
    items: list[tuple[Any, ...]] = [("segment", 1 << 20, 0, ["good"])] if draw(st.integers(0, 3)) else []
    for _ in range(draw(st.integers(1, 5))):
        what = draw(st.sampled_from(["message"] * 4 + ["segment", "shared", "half"]))
        if what == "message":
            body = draw(messages(live) if method == tcp.METHOD_PUSH or not draw(st.integers(0, 4)) else pulls(live))
            items.append(("message", body, draw(st.booleans())))
        elif what == "segment" and draw(st.booleans()):
            items.append(("segment", draw(st.sampled_from([0, 1, 64, 1 << 40, 2**64 - 1])),
                          draw(st.sampled_from([0, 0, 1 << 20])),
                          draw(st.lists(st.sampled_from(["good", "unsealed", "small", "pipe"]), min_size=0, max_size=5))))
        elif what == "segment":
            items.append(("segment", 1 << 20, 0, ["good"]))
        elif what == "shared":
            items.append(("shared", draw(st.sampled_from([0, 64, (1 << 20) - 8, 1 << 20, 2**64 - 1])),
                          draw(st.sampled_from([0, 8, 100, 1 << 20, 2**64 - 1]))))
        else:
            items.append(("half", draw(st.sampled_from([1, 8, 15, 16, 17, 31])), draw(st.booleans())))
    return method, items


def _descriptor(kind: str) -> tuple[int, list[int]]:
    """A descriptor to pass, of ``kind``, and every one to close once it is passed."""
    if kind == "pipe":
        r, w = os.pipe()
        return r, [r, w]
    fd = _memfd(64 if kind == "small" else 1 << 20, kind != "unsealed")
    return fd, [fd]


def _send_plan(live: Live, transport: str, method: int, items: list[tuple[Any, ...]]) -> None:
    """Send ``items`` on a new stream and read what comes back until the server closes it (in a thread)."""
    sock = _connect(live, transport)
    mm = mmap.mmap(-1, 1 << 20)  # where in-segment messages are written (the segment, once one is passed)
    with sock, contextlib.ExitStack() as stack:
        stack.callback(lambda: mm.close())
        with contextlib.suppress(OSError):
            sock.sendall(tcp.hello(method))
            at = 0
            for item in items:
                if item[0] == "message":
                    _, body, inline = item
                    if transport == "tcp" or inline or at + len(body) > len(mm):
                        sock.sendall(tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, len(body)) + body)
                        continue
                    mm[at : at + len(body)] = body
                    sock.sendall(tcp.FRAME.pack(shm.SHARED, 0, 0, 0, 16) + shm.REGION.pack(at, len(body)))
                    at = shm.align(at + len(body))
                elif item[0] == "segment":
                    _, size, reserved, kinds = item
                    passed, opened = [], []
                    for kind in kinds:
                        fd, fds = _descriptor(kind)
                        passed.append(fd)
                        opened += fds
                    try:
                        if kinds and kinds[0] == "good":
                            new = mmap.mmap(passed[0], 1 << 20)
                            mm.close()
                            mm, at = new, 0
                        frame = tcp.FRAME.pack(shm.SEGMENT, 0, 0, 0, 16) + shm.REGION.pack(size, reserved)
                        socket.send_fds(sock, [frame], passed) if passed else sock.sendall(frame)
                    finally:
                        for fd in opened:
                            os.close(fd)
                elif item[0] == "shared":
                    sock.sendall(tcp.FRAME.pack(shm.SHARED, 0, 0, 0, 16) + shm.REGION.pack(item[1], item[2]))
                else:
                    _, cut, more = item
                    frame = tcp.FRAME.pack(tcp.MESSAGE, 0, 0, 0, 64) + bytes(64)
                    sock.sendall(frame[:cut])
                    if not more:
                        break  # then nothing: the server's stall limit ends it
            else:
                sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            while sock.recv(1 << 20):
                pass


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def _fuzz_mappings() -> int:
    """Mappings of this process of the memfds the fuzz tests pass (without a garbage collection first)."""
    with open("/proc/self/maps") as f:
        return sum("memfd:fuzz " in line for line in f)


async def _served(live: Live, transport: str) -> None:
    """A well-behaved client's pull over ``transport`` is answered."""
    assert live.server.data_plane is not None and live.server.shm_plane is not None
    async with PsClient(f"127.0.0.1:{live.server.port}", timeout=10, shm=transport == "shm") as c:
        c.route.told(live.server.data_plane.port, live.server.shm_plane.name)  # (as a join would)
        await c.pull(live.run_id)
        assert c.route.opened[transport] == 1, c.route.opened


@pytest.mark.parametrize("live", ["asp", "bsp"], indirect=True)
@pytest.mark.parametrize("transport", ["tcp", "shm"])
@settings(max_examples=int(os.environ.get("FUZZ_N", 30)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
async def test_bad_messages_and_segments_leave_no_descriptor_and_change_nothing_unapplied(
        live: Live, transport: str, data: st.DataObject, caplog: pytest.LogCaptureFixture) -> None:
    """Pushes that disagree with the run (chunks of other shapes, overlapping offsets, NaN/Inf,
    varints of 11 bytes, "negative" clocks), SEGMENT frames of any size with any number of
    descriptors, SHARED frames outside the segment, frames cut off: after each stream the server
    holds no descriptor or mapping more than before (without a garbage collection: at once), its
    run's parameters changed only if a push was applied, and a well-behaved client is served."""
    caplog.set_level(logging.WARNING, "ps_server")
    method, items = data.draw(stream_plans(live))
    run = live.server.registry.get(live.run_id)
    plane = live.server.data_plane if transport == "tcp" else live.server.shm_plane
    assert plane is not None
    await _served(live, transport)  # (its streams are in the baseline: closed when its client is)
    await until(lambda: plane.statistics().open == 0, 5)
    descriptors = _open_descriptors()
    before = run.counters.pushes_applied, {n: t.copy() for n, t in run.read(None, 0, None, None).tensors.items()}
    gc.collect()
    gc.disable()  # (what a stream holds must go when it ends, not at the next collection)
    try:
        await asyncio.wait_for(asyncio.to_thread(_send_plan, live, transport, method, items), 20)
        await until(lambda: plane.statistics().open == 0, 5)
        assert plane.statistics().open == 0
        await until(lambda: _open_descriptors() <= descriptors and _fuzz_mappings() == 0, 2)
        assert _fuzz_mappings() == 0
        assert _open_descriptors() <= descriptors, sorted(os.readlink(f"/proc/self/fd/{fd}")
                                                          for fd in os.listdir("/proc/self/fd"))
    finally:
        gc.enable()
    after = run.read(None, 0, None, None).tensors
    if run.counters.pushes_applied == before[0]:
        for n, t in before[1].items():
            np.testing.assert_array_equal(after[n], t)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    await _served(live, transport)
