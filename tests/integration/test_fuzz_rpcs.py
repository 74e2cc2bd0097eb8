"""Hypothesis fuzzing of every RPC's fields against a live run (PushGradient has its own in test_bad_input).

Each call must end with OK or one of the status codes the .proto documents (never UNKNOWN or
INTERNAL), and the live run's parameters must stay bit-identical: bad input never changes state.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Stubs, make_spec

from paramserver.client import PsClient
from paramserver.v1 import paramserver_pb2 as pb
from ps_server.server import PsServer

pytestmark = pytest.mark.timeout(300)

DOCUMENTED = {
    grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
U32, U64 = 2**32 - 1, 2**64 - 1

floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -1.0, 1e-3, 0.9, 1e300])
run_ids = st.sampled_from(["LIVE", "LIVE", "", "run-nope"]) | st.text(max_size=12)
ranks = st.sampled_from([0, 1, 2, U32]) | st.integers(0, U32)
incarnations = st.sampled_from(["OWN", "OWN", 0, 1, 99, U64])
clocks = st.sampled_from([0, 1, 2, 3, 4, U64]) | st.integers(0, U64)
enum_values = st.integers(-3, 9)
durations = st.sampled_from([0, 1, 50_000_000, 200_000_000])  # nanoseconds; parks stay short


@st.composite
def run_specs(draw: st.DrawFn) -> pb.RunSpec:
    params = draw(st.lists(st.builds(
        lambda n, s, d, i, sc: pb.ParamSpec(name=n, shape=s, dtype=d, initializer=i, scale=sc),
        st.sampled_from(["w", "b", ""]) | st.text(max_size=3),
        st.lists(st.integers(-1, 4) | st.sampled_from([2**40, 2**62]), max_size=3),
        enum_values, enum_values, floats), max_size=3))
    kind = draw(st.sampled_from(["sgd", "momentum", "adam", "adagrad", None]))
    lr = draw(floats)
    opt = pb.OptimizerSpec()
    if kind == "sgd":
        opt.sgd.learning_rate = lr
    elif kind == "momentum":
        opt.momentum.learning_rate, opt.momentum.momentum = lr, draw(floats)
    elif kind == "adam":
        opt.adam.learning_rate, opt.adam.beta1, opt.adam.beta2 = lr, draw(floats), draw(floats)
    elif kind == "adagrad":
        opt.adagrad.learning_rate, opt.adagrad.epsilon = lr, draw(floats)
    return pb.RunSpec(
        name=draw(st.text(max_size=5)), model_spec_json=draw(st.sampled_from(["{}", "", "[", "1"]) | st.text(max_size=6)),
        data_spec_json=draw(st.sampled_from(["{}", "", "{\"kind\": 1}"])), num_workers=draw(st.integers(0, 4)),
        staleness=draw(st.integers(-3, 3)), optimizer=opt, aggregation=draw(enum_values),
        iterations=draw(st.integers(0, 3) | st.just(U64)), params=params, seed=draw(st.integers(0, U64)),
        slowdown=draw(st.dictionaries(st.integers(0, 5), floats, max_size=2)),
    )


points = st.lists(st.builds(lambda r, c, lo, e, acc: pb.MetricPoint(rank=r, clock=c, loss=lo, eval=e, eval_accuracy=acc),
                            ranks, clocks, floats, st.booleans(), floats), max_size=3)

CALLS = st.one_of(
    st.tuples(st.just("CreateRun"), run_specs()),
    st.tuples(st.just("GetRun"), run_ids),
    st.tuples(st.just("GetMetrics"), st.tuples(run_ids, st.booleans())),
    st.tuples(st.just("WatchRun"), run_ids),
    st.tuples(st.just("StopRun"), st.sampled_from(["", "run-nope"]) | st.text(max_size=6)),
    st.tuples(st.just("CheckpointRun"), run_ids),
    st.tuples(st.just("UpdateRun"), st.tuples(run_ids, st.none() | st.integers(-(2**31), 2**31 - 1))),
    st.tuples(st.just("Join"), st.tuples(st.text(max_size=6), run_ids, durations)),
    st.tuples(st.just("Heartbeat"), st.tuples(run_ids, ranks, incarnations, clocks)),
    st.tuples(st.just("ReportMetrics"), st.tuples(run_ids, ranks, incarnations, points, st.integers(0, U64))),
    st.tuples(st.just("Leave"), st.tuples(run_ids, ranks, incarnations, enum_values, st.text(max_size=5))),
    st.tuples(st.just("PullParams"), st.tuples(run_ids, ranks, incarnations, clocks,
                                               st.lists(st.sampled_from(["w", "b", "x", ""]), max_size=2),
                                               durations)),
)


@pytest.fixture
async def live(client: PsClient) -> AsyncIterator[tuple[pb.Run, dict[int, int]]]:
    """A running 2-rank run with both ranks held (so Join cannot take them) and one push applied."""
    run = await client.create_run(make_spec(num_workers=2, staleness=1, iterations=3))
    incs = {}
    for _ in range(2):
        a = (await client.join("w", run.run_id)).assignment
        incs[a.rank] = a.incarnation
    p = await client.pull(run.run_id, 0, incs[0], 0)
    await client.push(run.run_id, 0, incs[0], 0, {n: np.ones_like(v) for n, v in p.tensors.items()})
    yield run, incs


def _d(ns: int) -> Any:
    from google.protobuf.duration_pb2 import Duration

    return Duration(seconds=ns // 10**9, nanos=ns % 10**9)


async def _call(client: Stubs, name: str, args: Any, run: pb.Run, incs: dict[int, int]) -> grpc.StatusCode:
    def rid(x: str) -> str:
        return run.run_id if x == "LIVE" else x

    def inc(rank: int, x: Any) -> int:
        return incs.get(rank, 1) if x == "OWN" else int(x)

    try:
        if name == "CreateRun":
            await client.runs.CreateRun(pb.CreateRunRequest(spec=args), timeout=10)
        elif name == "GetRun":
            await client.runs.GetRun(pb.GetRunRequest(run_id=rid(args)), timeout=10)
        elif name == "GetMetrics":
            await client.runs.GetMetrics(pb.GetMetricsRequest(run_id=rid(args[0]), include_clock_records=args[1]),
                                         timeout=10)
        elif name == "WatchRun":
            call = client.runs.WatchRun(pb.WatchRunRequest(run_id=rid(args)), timeout=10)
            await call.read()
            call.cancel()
        elif name == "StopRun":
            await client.runs.StopRun(pb.StopRunRequest(run_id=args), timeout=10)
        elif name == "UpdateRun":
            await client.runs.UpdateRun(pb.UpdateRunRequest(run_id=rid(args[0]), staleness=args[1]), timeout=10)
        elif name == "CheckpointRun":
            await client.runs.CheckpointRun(pb.CheckpointRunRequest(run_id=rid(args)), timeout=10)
        elif name == "Join":
            await client.workers.Join(pb.JoinRequest(worker_name=args[0], run_id=rid(args[1]), max_wait=_d(args[2])),
                                      timeout=10)
        elif name == "Heartbeat":
            r, rank, i, c = args
            await client.workers.Heartbeat(pb.HeartbeatRequest(run_id=rid(r), rank=rank, incarnation=inc(rank, i),
                                                               clock=c), timeout=10)
        elif name == "ReportMetrics":
            r, rank, i, pts, skipped = args
            await client.workers.ReportMetrics(pb.ReportMetricsRequest(
                run_id=rid(r), rank=rank, incarnation=inc(rank, i), points=pts, pulls_skipped=skipped), timeout=10)
        elif name == "Leave":
            r, rank, i, reason, msg = args
            await client.workers.Leave(pb.LeaveRequest(run_id=rid(r), rank=rank, incarnation=inc(rank, i),
                                                       reason=reason, message=msg), timeout=10)
        else:
            r, rank, i, c, names, wait = args
            call = client.data.PullParams(timeout=10)
            await call.write(pb.PullParamsRequest(run_id=rid(r), rank=rank, incarnation=inc(rank, i), clock=c,
                                                  names=names, max_wait=_d(wait)))
            while not (await call.read()).final:
                pass
            call.cancel()
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(calls=st.lists(CALLS, min_size=1, max_size=4))
async def test_every_rpc_answers_documented_codes_and_keeps_parameters(
    server: PsServer, client: PsClient, stubs: Stubs, live: tuple[pb.Run, dict[int, int]],
    calls: list[tuple[str, Any]],
) -> None:
    run, incs = live
    before = {n: a.tobytes() for n, a in (await client.pull(run.run_id)).tensors.items()}
    for name, args in calls:
        code = await _call(stubs, name, args, run, incs)
        assert code in DOCUMENTED, f"{name}{args!r} answered {code.name}"
    after = {n: a.tobytes() for n, a in (await client.pull(run.run_id)).tensors.items()}
    assert after == before, f"{calls!r} changed the parameters"
    assert math.isfinite(sum(float(np.frombuffer(v, np.float32).sum()) for v in after.values()))
