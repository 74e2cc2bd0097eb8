"""The C exchange (``paramserver/_exchange.c``) against a socket and a region this test plays the
server on: what it writes is the Python encoder's request, byte for byte; what it decodes is what
the Python decoder reads; what it does not take it leaves whole to the Python path; and no answer,
however malformed, makes it read or write outside the region or the caller's arrays."""

from __future__ import annotations

import mmap
import socket
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paramserver.shm_transport import native
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import shm, tcp, unwire, wire

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(native is None, reason="the C exchange was not built (no compiler at install)")]

REGION = 1 << 16
ANSWER_AT = 32 << 10  # (the request goes at 0)
GRADS = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([0.5, -1.5], np.float32)}


@pytest.fixture
def plane() -> Iterator[tuple[socket.socket, socket.socket, memoryview]]:
    worker, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    memory = mmap.mmap(-1, REGION)
    region = memoryview(memory)
    try:
        yield worker, server, region
    finally:
        region.release()
        memory.close()
        worker.close()
        server.close()


def expected_request(clock: int = 7, loss: float = 0.25, since: tuple[int, int] | None = (5, 300),
                     param_version: int | None = 5) -> bytes:
    """What the Python encoder writes for such a push."""
    group = wire.whole_group(GRADS, 1 << 20)
    assert group is not None
    then = wire.pull_request_bytes("run-1", 1, 2, clock + 1, 30.0, since)
    return wire.join(wire.push_request_parts("run-1", 1, 2, clock, group, True, loss, then, param_version))


def push(worker: socket.socket, region: memoryview, outs: dict[str, np.ndarray], wait_ms: int = 1000, at: int = 0,
         clock: int = 7, loss: float = 0.25, since: tuple[int, int] | None = (5, 300),
         param_version: int | None = 5) -> object:
    group = wire.whole_group(GRADS, 1 << 20)
    assert group is not None
    prefixes = wire.chunk_prefixes(group)
    assert prefixes is not None
    lineage, version = since or (0, 0)
    return native.push_pull(worker.fileno(), region, at, wire.push_fields("run-1", 1, 2), clock, tuple(GRADS.values()),
                            prefixes, loss, wire.pull_fields("run-1", 1, 2), wire.wait_field(30.0), version, lineage,
                            -1 if param_version is None else param_version, tuple(k.encode() for k in outs),
                            tuple(outs.values()), wait_ms)


def answer(params: dict[str, np.ndarray], **kw: object) -> bytes:
    pulled = pb.PullParamsResponse(guaranteed_clock=5, version=9, final=True, run_state=pb.RUN_STATE_RUNNING, lineage=77,
                                   staleness=-1, tensors=[pb.TensorChunk(name=k, shape=v.shape, dtype=pb.DATA_TYPE_FLOAT32,
                                                                         data=v.tobytes()) for k, v in params.items()])
    fields = {"clock": 8, "min_clock": 3, "run_state": pb.RUN_STATE_RUNNING, "pulled": pulled, **kw}
    return pb.PushGradientResponse(**fields).SerializeToString()  # type: ignore[arg-type]


def serve(server: socket.socket, region: memoryview, body: bytes, at: int = ANSWER_AT) -> None:
    region[at : at + len(body)] = body
    server.sendall(tcp.FRAME.pack(shm.SHARED, 0, 0, 0, shm.REGION.size) + shm.REGION.pack(at, len(body)))


def exchange(worker: socket.socket, region: memoryview, outs: dict[str, np.ndarray], wait_ms: int = 1000) -> object:
    return push(worker, region, outs, wait_ms)


@pytest.mark.parametrize(("clock", "loss", "since", "param_version"),
                         [(7, 0.25, (5, 300), 5), (0, 0.0, None, None), (1 << 40, -0.0, (1 << 62, 0), 0),
                          (127, float("nan"), (0, 128), None), (16383, -1e300, (3, 1), (1 << 63) - 1)])
def test_it_writes_the_python_encoders_request(plane: tuple[socket.socket, socket.socket, memoryview], clock: int,
                                               loss: float, since: tuple[int, int] | None,
                                               param_version: int | None) -> None:
    worker, server, region = plane
    expected = expected_request(clock, loss, since, param_version)
    assert push(worker, region, {}, wait_ms=0, at=16, clock=clock, loss=loss, since=since,
                param_version=param_version) is None  # (no answer)
    assert bytes(region[16 : 16 + len(expected)]) == expected
    assert server.recv(64) == tcp.FRAME.pack(shm.SHARED, 0, 0, 0, shm.REGION.size) + shm.REGION.pack(16, len(expected))


def test_it_decodes_the_answer_into_the_arrays(plane: tuple[socket.socket, socket.socket, memoryview]) -> None:
    worker, server, region = plane
    new = {"w": np.full((3, 4), 2.0, np.float32), "b": np.array([7.0, 8.0], np.float32)}
    serve(server, region, answer(new, staleness=4, lr_scale=0.5))
    outs = {"b": np.zeros(2, np.float32), "w": np.zeros((3, 4), np.float32)}
    got = exchange(worker, region, outs)
    body = answer(new, staleness=4, lr_scale=0.5)
    assert got == (8, False, 3, pb.RUN_STATE_RUNNING, 4, 0.5, 5, 9, True, pb.RUN_STATE_RUNNING, 77, -1,
                   ANSWER_AT, len(body))
    for k in new:
        np.testing.assert_array_equal(outs[k], new[k])


@pytest.mark.parametrize("case", ["delta", "unknown-tensor", "missing-tensor", "wrong-size", "not-final", "offset"])
def test_an_answer_it_does_not_take_is_left_whole_to_the_python_decoder(
        plane: tuple[socket.socket, socket.socket, memoryview], case: str) -> None:
    worker, server, region = plane
    params = {"w": np.ones((3, 4), np.float32), "b": np.ones(2, np.float32)}
    message = pb.PushGradientResponse.FromString(answer(params))
    if case == "delta":
        message.pulled.delta = True
    elif case == "unknown-tensor":
        message.pulled.tensors[0].name = "v"
    elif case == "missing-tensor":
        del message.pulled.tensors[1]
    elif case == "wrong-size":
        message.pulled.tensors[0].data = b"\0" * 8
    elif case == "not-final":
        message.pulled.final = False
    else:
        message.pulled.tensors[0].offset = 4
    body = message.SerializeToString()
    serve(server, region, body)
    outs = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(2, np.float32)}
    assert exchange(worker, region, outs) == (ANSWER_AT, len(body))
    assert unwire.decode_push_response(region[ANSWER_AT : ANSWER_AT + len(body)]).clock == 8  # (the Python decoder's)


def test_a_frame_it_does_not_take_stays_in_the_socket_and_no_frame_is_none(
        plane: tuple[socket.socket, socket.socket, memoryview]) -> None:
    worker, server, region = plane
    outs = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(2, np.float32)}
    assert exchange(worker, region, outs, wait_ms=10) is None  # (nothing came)
    status = tcp.FRAME.pack(tcp.STATUS, 0, 0, 9, 3) + b"bad"
    server.sendall(status)
    assert exchange(worker, region, outs) is False
    assert worker.recv(64) == status  # (whole, for the Python read)


def test_an_answer_outside_the_region_breaks_the_connection(
        plane: tuple[socket.socket, socket.socket, memoryview]) -> None:
    worker, server, region = plane
    server.sendall(tcp.FRAME.pack(shm.SHARED, 0, 0, 0, shm.REGION.size) + shm.REGION.pack(REGION - 8, 64))
    with pytest.raises(ConnectionError, match="outside the segment"):
        exchange(worker, region, {"w": np.zeros((3, 4), np.float32)})


def test_a_request_that_does_not_fit_the_region_is_refused_before_anything_is_sent(
        plane: tuple[socket.socket, socket.socket, memoryview]) -> None:
    worker, server, region = plane
    n = len(expected_request())
    with pytest.raises(ValueError, match="overruns"):
        push(worker, region, {}, at=REGION - n + 1)
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
        server.recv(64)


@settings(max_examples=300, deadline=None)
@given(body=st.one_of(st.binary(max_size=200),
                      st.tuples(st.integers(0, 400), st.integers(0, 255)).map(lambda cf: _mutated(*cf))))
def test_no_answer_makes_it_write_outside_the_callers_arrays(body: bytes) -> None:
    """Random and mutated answers: it decodes, leaves them to Python, or refuses; the arrays it was
    given are the only memory it writes besides the request, and never past their ends."""
    worker, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    memory = mmap.mmap(-1, REGION)
    region = memoryview(memory)
    try:
        guard = np.full(16, 3.0, np.float32)  # an array beside the two it may fill
        backing = np.full(3 * 4 + 2 + 16, 3.0, np.float32)
        outs = {"w": backing[:12].reshape(3, 4), "b": backing[12:14]}
        serve(server, region, bytes(body))
        got = exchange(worker, region, outs, wait_ms=100)
        assert got is not None and got is not False
        assert isinstance(got, tuple) and len(got) in (2, 14)
        assert (backing[14:] == 3.0).all() and (guard == 3.0).all()
    finally:
        region.release()
        memory.close()
        worker.close()
        server.close()


_GOOD = answer({"w": np.ones((3, 4), np.float32), "b": np.ones(2, np.float32)})


def _mutated(cut: int, flip: int) -> bytes:
    """The good answer with one byte changed (lengths and tags included), or cut short."""
    if cut >= len(_GOOD):
        return _GOOD[: cut % len(_GOOD)]
    return _GOOD[:cut] + bytes([flip]) + _GOOD[cut + 1 :]
