"""Bad input never changes state (DESIGN.md, reliability rules), against a real server.

Every case sends one bad request to a live run and checks three things: the exact status code
the proto documents, that the parameters read back by an observer pull are bit-identical, and
that the run's counters and clocks say the push was rejected and nothing else happened.
Malformed chunk streams that ``PsClient.push`` would never produce are written directly on a
``PushGradient`` stream.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from grpc import StatusCode as Code
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import make_spec, with_config

from paramserver import errors
from paramserver.client import PsClient
from paramserver.errors import PsError
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import paramserver_pb2_grpc as pb_grpc
from ps_server.config import ServerConfig
from ps_server.server import PsServer, start_server

pytestmark = pytest.mark.timeout(60)

ITERATIONS = 10
SHAPES = {"w": (3, 4), "b": (4,)}
F32 = np.dtype("<f4")


def good_grads(value: float = 0.25) -> dict[str, np.ndarray]:
    return {n: np.full(s, value, np.float32) for n, s in SHAPES.items()}


_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass
class Live:
    run_id: str
    incarnations: dict[int, int]  # rank -> incarnation


@dataclass
class Snapshot:
    params: dict[str, bytes]
    run: pb.Run

    def workers(self) -> list[tuple[int, int, int, int, int]]:
        return [(w.rank, w.state, w.incarnation, w.clock, w.pushes) for w in self.run.workers]


async def snapshot(client: PsClient, run_id: str) -> Snapshot:
    pulled = await client.pull(run_id)  # incarnation 0: an observer's read, never waits
    params = {n: a.tobytes() for n, a in pulled.tensors.items()}
    return Snapshot(params, await client.get_run(run_id))


async def join_all(client: PsClient, run_id: str, n: int) -> dict[int, int]:
    incs = {}
    for i in range(n):
        resp = await client.join(f"worker-{i}", run_id=run_id, max_wait=0)
        assert resp.HasField("assignment"), resp
        incs[resp.assignment.rank] = resp.assignment.incarnation
    return incs


@pytest.fixture
async def live(client: PsClient) -> Live:
    """A running SSP run (2 ranks, staleness 2) where both ranks already pushed clock 0."""
    run = await client.create_run(make_spec(shapes=SHAPES, num_workers=2, staleness=2, iterations=ITERATIONS, lr=0.5))
    incs = await join_all(client, run.run_id, 2)
    initial = await snapshot(client, run.run_id)
    assert initial.run.state == pb.RUN_STATE_RUNNING
    for rank, inc in incs.items():
        resp = await client.push(run.run_id, rank, inc, 0, good_grads())
        assert resp.clock == 1 and not resp.duplicate
    after = await snapshot(client, run.run_id)
    # The snapshot comparison can fail: valid pushes do change the parameters it reads.
    assert after.params.keys() == initial.params.keys() == set(SHAPES)
    assert all(after.params[n] != initial.params[n] for n in SHAPES)
    assert after.run.counters.pushes_applied == 2 and after.run.counters.pushes_rejected == 0
    return Live(run.run_id, incs)


async def assert_push_rejected(
    client: PsClient,
    run_id: str,
    send: Callable[[], Awaitable[tuple[Code, str]]],
    code: Code,
    match: Sequence[str] = (),
    *,
    counted: bool = True,
) -> str:
    """Send a bad push; check its status code and that it changed nothing but pushes_rejected."""
    before = await snapshot(client, run_id)
    got, details = await send()
    assert got == code, f"expected {code.name}, got {got.name}: {details}"
    for m in match:
        assert m in details, f"{m!r} not in the message {details!r}"
    after = await snapshot(client, run_id)
    assert after.params == before.params, "a rejected push changed the parameters"
    assert after.workers() == before.workers(), "a rejected push changed the workers' clocks"
    c0, c1 = before.run.counters, after.run.counters
    assert (c1.pushes_applied, c1.updates_applied, c1.bytes_pushed, c1.pushes_duplicate) == (
        c0.pushes_applied, c0.updates_applied, c0.bytes_pushed, c0.pushes_duplicate
    )
    assert after.run.state == before.run.state
    if counted:
        assert c1.pushes_rejected == c0.pushes_rejected + 1, (
            f"pushes_rejected went {c0.pushes_rejected} -> {c1.pushes_rejected} for a rejected push"
        )
    return details


def via_client(client: PsClient, *args: Any, **kw: Any) -> Callable[[], Awaitable[tuple[Code, str]]]:
    async def send() -> tuple[Code, str]:
        try:
            resp = await client.push(*args, **kw)
        except PsError as exc:
            return _GRPC_CODES[exc.code], exc.message
        return Code.OK, f"accepted: {resp}"

    return send


async def raw_push(
    client: PsClient, requests: Sequence[pb.PushGradientRequest], *, half_close: bool = True
) -> tuple[Code, str, list[pb.PushGradientResponse]]:
    """Drive a PushGradient stream by hand; return its final status and responses."""
    async with grpc.aio.insecure_channel(client.address) as channel:
        call = pb_grpc.ParameterServiceStub(channel).PushGradient(timeout=10.0)
        responses: list[pb.PushGradientResponse] = []
        try:
            for req in requests:
                await call.write(req)
            if half_close:
                await call.done_writing()
            while (resp := await call.read()) is not grpc.aio.EOF:
                responses.append(resp)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the server ended the stream; its status is read below
        return await call.code(), await call.details() or "", responses


def via_stream(client: PsClient, requests: Sequence[pb.PushGradientRequest]) -> Callable[[], Awaitable[tuple[Code, str]]]:
    async def send() -> tuple[Code, str]:
        code, details, _ = await raw_push(client, requests)
        return code, details

    return send


def chunk(name: str, shape: Sequence[int], offset: int, data: bytes | np.ndarray,
          dtype: int = pb.DATA_TYPE_FLOAT32) -> pb.TensorChunk:
    if isinstance(data, np.ndarray):
        data = data.astype(F32).tobytes()
    return pb.TensorChunk(name=name, shape=list(shape), dtype=dtype, offset=offset, data=data)


def good_chunks(value: float = 0.25, skip: str = "") -> list[pb.TensorChunk]:
    return [chunk(n, s, 0, np.full(s, value, np.float32)) for n, s in SHAPES.items() if n != skip]


def request(live: Live, tensors: Sequence[pb.TensorChunk], *, rank: int = 0, clock: int = 1,
            final: bool = True, incarnation: int | None = None) -> pb.PushGradientRequest:
    inc = live.incarnations[rank] if incarnation is None else incarnation
    return pb.PushGradientRequest(run_id=live.run_id, rank=rank, incarnation=inc, clock=clock,
                                  tensors=tensors, final=final)


# ------------------------------------------------------------------------------ pushes via PsClient
def _with(**changes: np.ndarray) -> dict[str, np.ndarray]:
    g = good_grads()
    g.update(changes)
    return g


def _poison(value: float) -> dict[str, np.ndarray]:
    g = good_grads()
    g["w"][2, 1] = value
    return g


CLIENT_CASES: list[Any] = [
    pytest.param(dict(grads=_with(w=np.ones((4, 3), np.float32))), Code.INVALID_ARGUMENT, ["'w'", "[4, 3]", "[3, 4]"],
                 id="wrong-shape"),
    pytest.param(dict(grads=_with(w=np.ones(12, np.float32))), Code.INVALID_ARGUMENT, ["'w'", "[12]"],
                 id="flattened-shape"),
    pytest.param(dict(grads=_with(extra=np.ones(2, np.float32))), Code.INVALID_ARGUMENT, ["'extra'"],
                 id="unknown-tensor"),
    pytest.param(dict(grads={"w": good_grads()["w"]}), Code.INVALID_ARGUMENT, ["'b'"], id="missing-tensor"),
    pytest.param(dict(grads={}), Code.INVALID_ARGUMENT, ["'b'", "'w'"], id="empty-gradient"),
    pytest.param(dict(grads=_poison(np.nan)), Code.INVALID_ARGUMENT, ["'w'", "NaN"], id="nan"),
    pytest.param(dict(grads=_poison(np.inf)), Code.INVALID_ARGUMENT, ["'w'", "Inf"], id="inf"),
    pytest.param(dict(grads=_poison(-np.inf)), Code.INVALID_ARGUMENT, ["'w'", "Inf"], id="minus-inf"),
    pytest.param(dict(grads=_with(w=np.zeros(700_000, np.float32))), Code.RESOURCE_EXHAUSTED, [],
                 id="far-larger-than-model"),
    pytest.param(dict(clock=2), Code.FAILED_PRECONDITION, ["clock 2", "next clock is 1"], id="clock-ahead"),
    pytest.param(dict(clock=ITERATIONS), Code.OUT_OF_RANGE, [f"{ITERATIONS} iterations"], id="clock-at-iterations"),
    pytest.param(dict(clock=2**63), Code.OUT_OF_RANGE, [], id="clock-huge"),
    pytest.param(dict(rank=2), Code.INVALID_ARGUMENT, ["rank 2", "0..1"], id="rank-out-of-range"),
    pytest.param(dict(incarnation=999), Code.FAILED_PRECONDITION, ["incarnation 999", "stale"],
                 id="incarnation-never-issued"),
]


@pytest.mark.parametrize("change, code, match", CLIENT_CASES)
async def test_bad_push(client: PsClient, live: Live, change: dict[str, Any], code: Code, match: list[str]) -> None:
    rank = change.get("rank", 0)
    args = dict(run_id=live.run_id, rank=rank, incarnation=live.incarnations.get(rank, 1), clock=1,
                grads=good_grads())
    args.update(change)
    await assert_push_rejected(client, live.run_id, via_client(client, **args), code, match)
    # The stream recovers and the same worker's next good push is applied.
    ok = await client.push(live.run_id, 0, live.incarnations[0], 1, good_grads())
    assert ok.clock == 2 and not ok.duplicate


async def test_retry_is_acknowledged_not_reapplied(client: PsClient, live: Live) -> None:
    before = await snapshot(client, live.run_id)
    resp = await client.push(live.run_id, 0, live.incarnations[0], 0, good_grads(5.0))
    assert resp.duplicate and resp.clock == 1
    after = await snapshot(client, live.run_id)
    assert after.params == before.params
    assert after.run.counters.pushes_duplicate == before.run.counters.pushes_duplicate + 1
    assert after.run.counters.pushes_applied == before.run.counters.pushes_applied


# ------------------------------------------------------------------------------ raw malformed streams
F16 = pb.DATA_TYPE_FLOAT16
W = SHAPES["w"]

RAW_CASES: list[Any] = [
    pytest.param(lambda L: [request(L, [chunk("w", W, 0, np.ones(12, np.float16).tobytes(), F16),
                                        *good_chunks(skip="w")])],
                 Code.INVALID_ARGUMENT, ["'w'", "DATA_TYPE_FLOAT16"], id="float16-chunk"),
    pytest.param(lambda L: [request(L, [chunk("w", W, 0, b"\0" * 48, 99), *good_chunks(skip="w")])],
                 Code.INVALID_ARGUMENT, ["'w'", "99"], id="unknown-dtype-value"),
    pytest.param(lambda L: [request(L, [chunk("w", W, 0, np.ones(10)), *good_chunks(skip="w")])],
                 Code.INVALID_ARGUMENT, ["'w'", "10 of 12"], id="bytes-shorter-than-shape"),
    pytest.param(lambda L: [request(L, [chunk("w", W, 0, np.ones(13)), *good_chunks(skip="w")])],
                 Code.INVALID_ARGUMENT, ["'w'"], id="bytes-longer-than-shape"),
    pytest.param(lambda L: [request(L, [chunk("w", W, 0, b"\0" * 46), *good_chunks(skip="w")])],
                 Code.INVALID_ARGUMENT, ["'w'", "46 bytes"], id="bytes-not-multiple-of-4"),
    pytest.param(lambda L: [request(L, [chunk("w", W, 4, np.ones(8)), chunk("w", W, 0, np.ones(4)),
                                        *good_chunks(skip="w")])],
                 Code.INVALID_ARGUMENT, ["'w'", "offset 4"], id="out-of-order-offsets"),
    pytest.param(lambda L: [request(L, [chunk("w", W, 0, np.ones(6)), chunk("w", W, 3, np.ones(9)),
                                        *good_chunks(skip="w")])],
                 Code.INVALID_ARGUMENT, ["'w'", "offset 3"], id="overlapping-chunks"),
    pytest.param(lambda L: [request(L, [chunk("w", W, 0, np.ones(6))], final=False),
                            request(L, [chunk("w", W, 7, np.ones(5)), *good_chunks(skip="w")])],
                 Code.INVALID_ARGUMENT, ["'w'", "offset 7"], id="gap-between-requests"),
    pytest.param(lambda L: [request(L, [chunk("w", W, 0, np.ones(12)), chunk("w", W, 12, np.ones(1)),
                                        *good_chunks(skip="w")])],
                 Code.INVALID_ARGUMENT, ["'w'"], id="chunk-past-the-end"),
    pytest.param(lambda L: [request(L, [chunk("w", W, -1, np.ones(12)), *good_chunks(skip="w")])],
                 Code.INVALID_ARGUMENT, ["'w'", "offset -1"], id="negative-offset"),
    pytest.param(lambda L: [request(L, [chunk("w", W, 0, np.ones(6)), chunk("w", (2, 6), 6, np.ones(6)),
                                        *good_chunks(skip="w")])],
                 Code.INVALID_ARGUMENT, ["'w'", "shape"], id="chunks-disagree-on-shape"),
    pytest.param(lambda L: [request(L, [chunk("w", (-3, -4), 0, b""), *good_chunks(skip="w")])],
                 Code.INVALID_ARGUMENT, ["'w'", "negative"], id="negative-dimension"),
    pytest.param(lambda L: [request(L, [chunk("w", (1,) * 65, 0, np.ones(1)), *good_chunks(skip="w")])],
                 Code.INVALID_ARGUMENT, ["'w'"], id="65-dimensions"),
    pytest.param(lambda L: [request(L, [chunk("w", (1 << 62, 1 << 62, 0), 0, b""), *good_chunks(skip="w")])],
                 Code.INVALID_ARGUMENT, ["'w'"], id="empty-shape-with-huge-dims"),
    pytest.param(lambda L: [request(L, [chunk("w", (1 << 40, 1 << 20), 0, np.ones(4))])],
                 Code.RESOURCE_EXHAUSTED, ["'w'"], id="huge-declared-shape"),
    pytest.param(lambda L: [request(L, [chunk("w", W, 0, np.ones(6))], final=False),
                            request(L, [chunk("w", W, 6, np.ones(6)), *good_chunks(skip="w")], clock=2)],
                 Code.INVALID_ARGUMENT, ["final"], id="unfinished-push-then-other-clock"),
    pytest.param(lambda L: [request(L, [chunk("w", W, 0, np.ones(6))], final=False),
                            request(L, [chunk("w", W, 6, np.ones(6)), *good_chunks(skip="w")], rank=1)],
                 Code.INVALID_ARGUMENT, ["final"], id="unfinished-push-then-other-rank"),
    pytest.param(lambda L: [request(L, [chunk("w", W, 0, np.ones(6))], final=False)],
                 Code.INVALID_ARGUMENT, ["final"], id="stream-ends-inside-push"),
]


@pytest.mark.parametrize("build, code, match", RAW_CASES)
async def test_malformed_push_stream(
    client: PsClient, live: Live, build: Callable[[Live], list[pb.PushGradientRequest]], code: Code, match: list[str]
) -> None:
    await assert_push_rejected(client, live.run_id, via_stream(client, build(live)), code, match)


async def test_raw_stream_control_a_good_multi_request_push_is_applied(client: PsClient, live: Live) -> None:
    """The raw-stream helper itself: a well-formed chunked push is accepted and changes the params."""
    before = await snapshot(client, live.run_id)
    code, details, responses = await raw_push(client, [
        request(live, [chunk("w", W, 0, np.ones(5))], final=False),
        request(live, [chunk("w", W, 5, np.ones(7)), *good_chunks(skip="w")]),
    ])
    assert code == Code.OK, details
    assert [(r.clock, r.duplicate) for r in responses] == [(2, False)]
    after = await snapshot(client, live.run_id)
    assert after.params["w"] != before.params["w"]
    assert after.run.counters.pushes_applied == before.run.counters.pushes_applied + 1


async def test_refusals_carry_their_reason_and_facts(client: PsClient, live: Live) -> None:
    """What a worker acts on comes as fields: the reason, the clock it should be at, who is behind."""
    with pytest.raises(errors.FailedPrecondition) as e:
        await client.push(live.run_id, 0, live.incarnations[0], 3, good_grads())
    assert e.value.reason == pb.ERROR_REASON_CLOCK_AHEAD and e.value.info.next_clock == 1
    with pytest.raises(errors.FailedPrecondition) as e:
        await client.pull(live.run_id, 0, live.incarnations[0], 2, max_wait=1.0)
    assert e.value.reason == pb.ERROR_REASON_CLOCK_AHEAD and e.value.info.next_clock == 1
    with pytest.raises(errors.InvalidArgument) as e:
        await client.push(live.run_id, 0, live.incarnations[0], 1, _poison(np.nan))
    assert e.value.reason == pb.ERROR_REASON_INVALID_GRADIENT
    with pytest.raises(errors.OutOfRange) as e:
        await client.push(live.run_id, 0, live.incarnations[0], ITERATIONS, good_grads())
    assert e.value.reason == pb.ERROR_REASON_CLOCK_OUT_OF_RANGE


# ------------------------------------------------------------------------------ stale incarnation, pending run
async def test_stale_incarnation_after_rank_is_retaken(client: PsClient, live: Live) -> None:
    old = live.incarnations[0]
    left = await client.leave(live.run_id, 0, old, pb.LEAVE_REASON_SHUTDOWN, "sigterm")
    assert left.run_state == pb.RUN_STATE_RUNNING
    resp = await client.join("replacement", run_id=live.run_id, max_wait=0)
    assert resp.assignment.rank == 0 and resp.assignment.incarnation > old
    new = resp.assignment.incarnation
    await assert_push_rejected(
        client, live.run_id, via_client(client, live.run_id, 0, old, 1, good_grads()),
        Code.FAILED_PRECONDITION, [f"incarnation {old}", "stale"],
    )
    # The old incarnation is refused everywhere else too.
    for call in (
        client.heartbeat(live.run_id, 0, old, 1),
        client.report_metrics(live.run_id, 0, old, [], 0),
        client.leave(live.run_id, 0, old, pb.LEAVE_REASON_DONE),
        client.pull(live.run_id, 0, old, 1, max_wait=1.0),
    ):
        with pytest.raises(PsError) as e:
            await call
        assert e.value.code == errors.Code.FAILED_PRECONDITION, e.value
        assert e.value.reason == pb.ERROR_REASON_STALE_INCARNATION, e.value
    # ... while the new incarnation works.
    ok = await client.push(live.run_id, 0, new, resp.assignment.start_clock, good_grads())
    assert not ok.duplicate


async def test_push_before_the_run_started(client: PsClient) -> None:
    run = await client.create_run(make_spec(shapes=SHAPES, num_workers=2, staleness=0, iterations=ITERATIONS))
    incs = await join_all(client, run.run_id, 1)
    assert (await client.get_run(run.run_id)).state == pb.RUN_STATE_PENDING
    rank, inc = next(iter(incs.items()))
    await assert_push_rejected(
        client, run.run_id, via_client(client, run.run_id, rank, inc, 0, good_grads()),
        Code.FAILED_PRECONDITION, ["pending"],
    )


# ------------------------------------------------------------------------------ pulls
async def test_pull_unknown_tensor_name_is_invalid_argument(client: PsClient, live: Live) -> None:
    """The proto: PullParams answers INVALID_ARGUMENT for an unknown tensor name (as PushGradient does)."""
    before = await snapshot(client, live.run_id)
    with pytest.raises(PsError) as e:
        await client.pull(live.run_id, names=["w", "nope"])
    assert e.value.code == errors.Code.INVALID_ARGUMENT, e.value
    assert "'nope'" in e.value.message
    assert (await snapshot(client, live.run_id)).params == before.params


async def test_a_pull_of_an_unknown_name_is_refused_before_it_would_park(client: PsClient) -> None:
    """A pull that must wait (rank 1 has not joined) but names an unknown tensor is refused at once,
    not after the whole wait."""
    run = await client.create_run(make_spec(shapes=SHAPES, num_workers=2, staleness=0, iterations=ITERATIONS))
    a = (await client.join("w", run.run_id, max_wait=0)).assignment  # the run is pending: pulls park
    started = asyncio.get_running_loop().time()
    with pytest.raises(errors.InvalidArgument) as e:
        await client.pull(run.run_id, a.rank, a.incarnation, 0, names=["w", "nope"], max_wait=30.0)
    assert "'nope'" in e.value.message and asyncio.get_running_loop().time() - started < 5.0


async def test_pull_by_name_control(client: PsClient, live: Live) -> None:
    got = await client.pull(live.run_id, names=["b"])
    assert list(got.tensors) == ["b"] and got.tensors["b"].shape == SHAPES["b"]


async def test_pull_clock_beyond_iterations(client: PsClient, live: Live) -> None:
    with pytest.raises(PsError) as e:
        await client.pull(live.run_id, 0, live.incarnations[0], ITERATIONS + 1, max_wait=1.0)
    assert e.value.code == errors.Code.OUT_OF_RANGE, e.value


# ------------------------------------------------------------------------------ unknown run
async def test_unknown_run_is_not_found_everywhere(client: PsClient, live: Live) -> None:
    before = await snapshot(client, live.run_id)
    nope = "run-doesnotexist"

    async def watch() -> None:
        async for _ in client.watch_run(nope, idle_timeout=5.0):
            pass

    calls: dict[str, Awaitable[Any]] = {
        "PushGradient": client.push(nope, 0, live.incarnations[0], 1, good_grads()),
        "PullParams": client.pull(nope),
        "PullParams(worker)": client.pull(nope, 0, live.incarnations[0], 1, max_wait=1.0),
        "GetRun": client.get_run(nope),
        "StopRun": client.stop_run(nope, "test"),
        "UpdateRun": client.update_run(nope, staleness=2),
        "Heartbeat": client.heartbeat(nope, 0, live.incarnations[0], 1),
        "ReportMetrics": client.report_metrics(nope, 0, live.incarnations[0], [], 0),
        "Leave": client.leave(nope, 0, live.incarnations[0], pb.LEAVE_REASON_DONE),
        "GetMetrics": client.get_metrics(nope),
        "Join": client.join("w", run_id=nope, max_wait=0),
        "WatchRun": watch(),
    }
    for method, call in calls.items():
        with pytest.raises(PsError) as e:
            await call
        assert e.value.code == errors.Code.NOT_FOUND, f"{method}: {e.value}"
        assert e.value.reason == pb.ERROR_REASON_RUN_NOT_FOUND, f"{method}: {e.value.info}"
        assert nope in e.value.message, f"{method}: the message should name the unknown run"
        assert live.run_id in e.value.message, f"{method}: the message should list the existing runs"
    after = await snapshot(client, live.run_id)
    assert after.params == before.params
    assert after.workers() == before.workers()
    assert after.run.state == pb.RUN_STATE_RUNNING
    c0, c1 = before.run.counters, after.run.counters
    push_counters = ("pushes_applied", "pushes_duplicate", "pushes_rejected", "updates_applied", "bytes_pushed")
    assert [getattr(c1, f) for f in push_counters] == [getattr(c0, f) for f in push_counters]


# ------------------------------------------------------------------------------ CreateRun
def _spec(**kw: Any) -> pb.RunSpec:
    return make_spec(shapes=SHAPES, **kw)


def _no_params() -> pb.RunSpec:
    s = _spec()
    del s.params[:]
    return s


def _duplicate_names() -> pb.RunSpec:
    s = _spec()
    s.params.append(pb.ParamSpec(name="w", shape=[2], initializer=pb.INITIALIZER_ZEROS))
    return s


BAD_SPECS: list[Any] = [
    pytest.param(_no_params, "params", id="no-params"),
    pytest.param(lambda: _spec(num_workers=0), "num_workers", id="zero-workers"),
    pytest.param(lambda: _spec(iterations=0), "iterations", id="zero-iterations"),
    pytest.param(lambda: _spec(lr=0.0), "learning_rate", id="zero-learning-rate"),
    pytest.param(lambda: _spec(lr=-0.1), "learning_rate", id="negative-learning-rate"),
    pytest.param(lambda: _spec(model_spec_json="{not json"), "model_spec_json", id="bad-model-json"),
    pytest.param(lambda: _spec(model_spec_json="[1, 2]"), "model_spec_json", id="model-json-not-object"),
    pytest.param(lambda: _spec(data_spec_json="nope"), "data_spec_json", id="bad-data-json"),
    pytest.param(lambda: _spec(staleness=-2), "staleness", id="staleness-minus-2"),
    pytest.param(_duplicate_names, "'w'", id="duplicate-param-names"),
    pytest.param(lambda: make_spec(shapes={"w": (3, 0)}), "shape", id="zero-size-dimension"),
    pytest.param(lambda: make_spec(shapes={"w": ()}), "shape", id="scalar-shape"),
    pytest.param(lambda: make_spec(shapes={"": (2,)}), "name", id="empty-param-name"),
    pytest.param(lambda: _spec(optimizer=pb.OptimizerSpec()), "optimizer", id="no-optimizer"),
    pytest.param(lambda: _spec(optimizer=pb.OptimizerSpec(momentum=pb.MomentumConfig(learning_rate=0.1, momentum=1.5))),
                 "momentum", id="momentum-above-1"),
    pytest.param(lambda: _spec(slowdown={7: 2.0}), "slowdown", id="slowdown-rank-out-of-range"),
    # finite as doubles, infinite as float32 (the parameters' type): every update would be NaN/Inf
    pytest.param(lambda: _spec(lr=1e39), "learning_rate", id="learning-rate-beyond-float32"),
    pytest.param(lambda: _spec(optimizer=pb.OptimizerSpec(sgd=pb.SgdConfig(learning_rate=0.1, weight_decay=1e39))),
                 "weight_decay", id="weight-decay-beyond-float32"),
    pytest.param(lambda: _spec(optimizer=pb.OptimizerSpec(adam=pb.AdamConfig(learning_rate=0.1, epsilon=1e39))),
                 "epsilon", id="epsilon-beyond-float32"),
    pytest.param(lambda: _spec(optimizer=pb.OptimizerSpec(adagrad=pb.AdagradConfig(learning_rate=0.1, epsilon=1e-7,
                                                                                 initial_accumulator=-1.0))),
                 "initial_accumulator", id="negative-initial-accumulator"),
    pytest.param(lambda: _scaled(pb.INITIALIZER_CONSTANT, 1e39), "scale", id="constant-beyond-float32"),
    pytest.param(lambda: _scaled(pb.INITIALIZER_NORMAL, 3e38), "scale", id="normal-draws-beyond-float32"),
]


def _scaled(init: int, scale: float) -> pb.RunSpec:
    s = _spec()
    s.params[0].initializer = init
    s.params[0].scale = scale
    return s


@pytest.mark.parametrize("build, field", BAD_SPECS)
async def test_create_run_rejects_bad_spec(client: PsClient, build: Callable[[], pb.RunSpec], field: str) -> None:
    before = len(await client.list_runs())
    with pytest.raises(PsError) as e:
        await client.create_run(build())
    assert e.value.code == errors.Code.INVALID_ARGUMENT, e.value
    assert field in e.value.message, f"the message should name {field!r}: {e.value.message!r}"
    assert len(await client.list_runs()) == before, "a rejected spec created a run"


async def test_create_run_control_good_spec(client: PsClient) -> None:
    run = await client.create_run(_spec())
    assert run.state == pb.RUN_STATE_PENDING and [p.name for p in run.spec.params] == list(SHAPES)


@pytest.fixture
async def small_server(server_config: ServerConfig) -> AsyncIterator[PsServer]:
    ps = await start_server(with_config(server_config, max_param_bytes=1024))
    try:
        yield ps
    finally:
        await ps.stop(0)


@pytest.fixture
async def small_client(small_server: PsServer) -> AsyncIterator[PsClient]:
    async with PsClient(f"127.0.0.1:{small_server.port}", timeout=10.0) as c:
        yield c


async def test_create_run_over_max_param_bytes(small_client: PsClient) -> None:
    with pytest.raises(PsError) as e:
        await small_client.create_run(make_spec(shapes={"w": (16, 16), "b": (1,)}))  # 1028 bytes
    assert e.value.code == errors.Code.RESOURCE_EXHAUSTED, e.value
    assert "1028" in e.value.message and "1024" in e.value.message
    assert await small_client.list_runs() == []
    ok = await small_client.create_run(make_spec(shapes={"w": (16, 16)}))  # exactly 1024 bytes
    assert ok.state == pb.RUN_STATE_PENDING


# ------------------------------------------------------------------------------ random requests
PUSH_CODES = {
    Code.OK,
    Code.NOT_FOUND,
    Code.INVALID_ARGUMENT,
    Code.RESOURCE_EXHAUSTED,
    Code.FAILED_PRECONDITION,
    Code.OUT_OF_RANGE,
}
FUZZ_ITERATIONS = 3

names = st.sampled_from(["w", "b", "x", ""]) | st.text(max_size=4)
dims = st.integers(0, 5) | st.sampled_from([0, -1, 12, 1 << 31, 1 << 62, 2**63 - 1])
shapes = st.sampled_from([*(list(s) for s in SHAPES.values()), [1] * 65]) | st.lists(dims, max_size=5)


@st.composite
def random_chunk(draw: st.DrawFn) -> pb.TensorChunk:
    shape = draw(shapes)
    n = draw(st.integers(0, 14) | st.just(max(0, math.prod(shape))) if math.prod(shape) < 64 else st.integers(0, 14))
    if draw(st.booleans()):
        values = draw(st.lists(st.floats(width=32), min_size=n, max_size=n))  # NaN and Inf included
        data = np.array(values, F32).tobytes()
    else:
        data = draw(st.binary(max_size=4 * n + 3))
    return pb.TensorChunk(
        name=draw(names),
        shape=shape,
        dtype=draw(st.sampled_from([pb.DATA_TYPE_FLOAT32] * 3 + [0, 2, 3, 17])),
        offset=draw(st.integers(-2, 14) | st.just(1 << 62)),
        data=data,
    )


@st.composite
def valid_chunks(draw: st.DrawFn) -> list[pb.TensorChunk]:
    out = []
    for n, s in SHAPES.items():
        size = math.prod(s)
        values = draw(st.lists(st.floats(-10, 10, width=32), min_size=size, max_size=size))
        out.append(chunk(n, s, 0, np.array(values, np.float32)))
    return out


push_plan = st.fixed_dictionaries({
    "staleness": st.sampled_from([0, 1, -1]),
    "run": st.sampled_from(["live", "live", "live", "unknown", ""]),
    "rank": st.sampled_from([0, 0, 1, 2, 2**32 - 1]),
    "incarnation": st.sampled_from(["own", "own", "own", "other", "zero", "huge"]),
    "clock": st.sampled_from([0, 1, 1, 2, FUZZ_ITERATIONS, 2**64 - 1]),
    "chunks": valid_chunks() | st.lists(random_chunk(), max_size=4),
    "split": st.integers(1, 3),
    "final": st.booleans() | st.just(True),
})


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(plan=push_plan)
async def test_random_push_requests_never_internal(client: PsClient, plan: dict[str, Any]) -> None:
    run = await client.create_run(make_spec(shapes=SHAPES, num_workers=2, staleness=plan["staleness"],
                                            iterations=FUZZ_ITERATIONS, lr=0.5))
    incs = await join_all(client, run.run_id, 2)
    # One accepted clock for rank 0, so that clock 0 is a retry and clock 1 is its next push.
    await client.push(run.run_id, 0, incs[0], 0, good_grads())
    run_id = {"live": run.run_id, "unknown": "run-unknown", "": ""}[plan["run"]]
    rank = plan["rank"]
    incarnation = {"own": incs.get(rank, 1), "other": incs[1] if rank == 0 else incs[0], "zero": 0,
                   "huge": 2**64 - 1}[plan["incarnation"]]
    chunks: list[pb.TensorChunk] = plan["chunks"]
    k = max(1, math.ceil(len(chunks) / plan["split"]))
    parts = [chunks[i:i + k] for i in range(0, len(chunks), k)] or [[]]
    requests = [
        pb.PushGradientRequest(run_id=run_id, rank=rank, incarnation=incarnation, clock=plan["clock"],
                               tensors=part, final=plan["final"] and i == len(parts) - 1, loss=0.5)
        for i, part in enumerate(parts)
    ]
    before = await snapshot(client, run.run_id)
    code, details, responses = await raw_push(client, requests)
    assert code in PUSH_CODES, f"undocumented status {code.name}: {details}"
    after = await snapshot(client, run.run_id)
    if code == Code.OK:
        assert plan["final"] and len(responses) == 1
        return
    assert responses == []
    assert after.params == before.params, f"a push rejected with {code.name} changed the parameters"
    assert after.workers() == before.workers()
    assert after.run.counters.pushes_applied == before.run.counters.pushes_applied


async def test_join_with_max_wait_zero_answers_at_once_when_there_is_no_work(server: PsServer, client: PsClient) -> None:
    """JoinRequest.max_wait 0 means "answer at once" (it used to mean the server's limit, 10 s here)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    resp = await client.join("idle", max_wait=0)
    assert not resp.HasField("assignment") and resp.server_generation
    assert loop.time() - t0 < server.config.max_wait_seconds / 2


async def test_a_join_token_over_its_limit_is_refused_and_takes_no_rank(server: PsServer, client: PsClient) -> None:
    """The server keeps a Join's token in the rank it took (a retry is answered with that rank): one
    over 256 characters is refused, saying the limit."""
    run = await client.create_run(make_spec(num_workers=1))
    with pytest.raises(errors.InvalidArgument, match="join_token has 257 characters: at most 256"):
        await client.join("w", max_wait=0, join_token="t" * 257)
    assert (await client.join("w", run.run_id, max_wait=0, join_token="t" * 256)).assignment.rank == 0


async def test_a_parked_join_whose_vacancy_another_took_waits_on(server: PsServer) -> None:
    """Two Joins wait for work; the one rank falls vacant: one of them takes it, the other waits on
    for the rest of its max_wait (it answered at once, with no work, and its worker had to ask
    again) and takes the rank when it falls vacant again."""
    async with PsClient(f"127.0.0.1:{server.port}", timeout=30.0) as c:
        run = await c.create_run(make_spec(num_workers=1))
        held = (await c.join("a", max_wait=0)).assignment
        parked = [asyncio.ensure_future(c.join(name, max_wait=20)) for name in ("b", "c")]
        async with asyncio.timeout(10):
            while server.registry._work.statistics().waiting < 2:
                await asyncio.sleep(0.01)
        await c.leave(run.run_id, held.rank, held.incarnation, pb.LEAVE_REASON_SHUTDOWN)
        done, waiting = await asyncio.wait(parked, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        (first,), (second,) = done, waiting
        taken = first.result().assignment
        assert first.result().HasField("assignment") and taken.run_id == run.run_id
        await asyncio.sleep(0.3)
        assert not second.done(), second.result()
        await c.leave(run.run_id, taken.rank, taken.incarnation, pb.LEAVE_REASON_SHUTDOWN)
        resp = await asyncio.wait_for(second, 10)
        assert resp.HasField("assignment") and resp.assignment.incarnation > taken.incarnation


async def test_a_join_retried_while_the_first_is_parked_is_answered_with_the_rank_the_first_took(
        server: PsServer) -> None:
    """A worker's Join waits for work; its caller gives up (a connection the server has not seen
    drop) and asks again with the same join_token while the first is still parked. The rank that
    falls vacant goes to one of them, and both are answered with it: the retry takes no second rank
    and does not wait on (the rank the first took would have had no worker until its lease ran out)."""
    async with PsClient(f"127.0.0.1:{server.port}", timeout=30.0) as c:
        run = await c.create_run(make_spec(num_workers=1))
        held = (await c.join("a", max_wait=0)).assignment
        parked = [asyncio.ensure_future(c.join("b", max_wait=20, join_token="t-b")) for _ in range(2)]
        async with asyncio.timeout(10):
            while server.registry._work.statistics().waiting < 2:
                await asyncio.sleep(0.01)
        await c.leave(run.run_id, held.rank, held.incarnation, pb.LEAVE_REASON_SHUTDOWN)
        first, retry = await asyncio.wait_for(asyncio.gather(*parked), 10)
        assert first.assignment == retry.assignment and first.assignment.incarnation > held.incarnation
        assert [e.message.split(" (")[0] for e in (await c.get_metrics(run.run_id)).events if e.kind == "joined"] == [
            "a took rank 0", "b took rank 0"]


async def test_skipped_pulls_reported_beyond_what_a_count_can_hold_leave_the_run_readable(
        client: PsClient, live: Live) -> None:
    """Each rank may report up to 2^64 - 1 skipped pulls (uint64): their sum did not fit the run's
    counter, and every GetRun and ListRuns of the server failed (psctl runs and status, the
    dashboard, the metrics' readers) while the run trained on. The sum now stops at 2^64 - 1."""
    most = 2**64 - 1
    for rank, incarnation in live.incarnations.items():
        await client.report_metrics(live.run_id, rank, incarnation, [], most)
    run = await client.get_run(live.run_id)
    assert run.counters.pulls_skipped == most and [w.pulls_skipped for w in run.workers] == [most, most]
    assert live.run_id in [r.run_id for r in await client.list_runs()]
