"""Runs with compression (RunSpec.compression) against a real server, over shared memory, TCP and
gRPC (the ``client`` fixture): what a push carries is what the server applies, pulls come in the
run's type, the counters count wire bytes, and bad pushes are refused with nothing applied."""

from __future__ import annotations

import numpy as np
import pytest
from support import make_spec

from paramserver import errors
from paramserver.client import PsClient
from paramserver.v1 import compress, wire
from paramserver.v1 import paramserver_pb2 as pb
from worker.compression import PushCodec

pytestmark = pytest.mark.timeout(90)

SHAPES = {"w": (300, 200), "b": (200,)}  # 60k + 200 elements: the large-message paths too


def _half(values: np.ndarray, dtype: int) -> np.ndarray:
    out = np.empty(values.size, np.float32)
    compress.decode_into(compress.encode(values, dtype), dtype, out)
    return out.reshape(values.shape)


@pytest.mark.parametrize("into", [np.float64, np.float16])
async def test_a_half_precision_pull_fills_arrays_of_another_dtype_with_conversion(
        client: PsClient, into: type[np.floating]) -> None:
    # (as a float32 answer does, PullSink's docstring: it raised ValueError, "does not fit its shape")
    run = await client.create_run(make_spec(shapes=SHAPES, num_workers=1, staleness=-1,
                                            compression=pb.Compression(dtype=pb.DATA_TYPE_BFLOAT16)))
    a = (await client.join("w0", run.run_id)).assignment
    want = (await client.pull(run.run_id, a.rank, a.incarnation, 0)).tensors
    held = {n: np.zeros(s, into) for n, s in SHAPES.items()}
    got = await client.pull(run.run_id, a.rank, a.incarnation, 0, into=held)
    for n in SHAPES:
        assert got.tensors[n] is held[n]
        np.testing.assert_array_equal(held[n], want[n].astype(into))


@pytest.mark.parametrize(("dtype", "ratio"), [(pb.DATA_TYPE_FLOAT16, 0.0), (pb.DATA_TYPE_BFLOAT16, 0.0),
                                              (pb.DATA_TYPE_FLOAT32, 0.01), (pb.DATA_TYPE_FLOAT16, 0.001)])
async def test_a_compressed_run_applies_what_was_sent_and_answers_in_its_type(
        client: PsClient, dtype: int, ratio: float) -> None:
    compression = pb.Compression(dtype=dtype, topk_ratio=ratio)
    run = await client.create_run(make_spec(shapes=SHAPES, num_workers=1, staleness=-1, iterations=5, lr=0.5,
                                            compression=compression))
    a = (await client.join("w0", run.run_id)).assignment
    master = {n: t.copy() for n, t in (await client.pull(run.run_id)).tensors.items()}  # an observer's: float32
    codec = PushCodec(compression)
    rng = np.random.default_rng(0)
    params: dict[str, np.ndarray] = {}
    for clock in range(3):
        g = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
        ack, pulled = await client.push_pull(run.run_id, a.rank, a.incarnation, clock, codec.encode(g), into=params)
        assert ack.clock == clock + 1 and not ack.duplicate
        for n in SHAPES:  # the server's float32 step with what was sent (decoded), nothing else
            picked, values = codec.sent_values(n)
            flat = master[n].reshape(-1)
            if picked is None:
                flat -= np.float32(0.5) * values
            else:
                flat[picked] -= np.float32(0.5) * values
        for n in SHAPES:  # the pull: the master rounded to the run's type
            want = master[n] if dtype == pb.DATA_TYPE_FLOAT32 else _half(master[n], dtype)
            np.testing.assert_allclose(pulled.tensors[n], want, rtol=1e-6, atol=1e-7)
    counters = (await client.get_run(run.run_id)).counters
    dense = 4 * sum(int(np.prod(s)) for s in SHAPES.values())
    per_push = counters.bytes_pushed / 3
    if ratio:
        assert per_push < dense * max(3 * ratio, 0.02), per_push  # values and indices of ~ratio of the elements
    else:
        assert per_push == dense // 2
    if dtype != pb.DATA_TYPE_FLOAT32:
        assert counters.bytes_pulled == 3 * dense // 2 + dense  # three answers in half, the observer's in float32
    final = (await client.pull(run.run_id)).tensors
    for n in SHAPES:
        np.testing.assert_array_equal(final[n], master[n])  # export: the float32 master, exactly


async def test_bad_pushes_of_a_compressed_run_are_refused_and_nothing_is_applied(client: PsClient) -> None:
    run = await client.create_run(make_spec(shapes=SHAPES, num_workers=1, staleness=-1, iterations=5,
                                            compression=pb.Compression(dtype=pb.DATA_TYPE_FLOAT16)))
    a = (await client.join("w0", run.run_id)).assignment
    before = (await client.pull(run.run_id)).tensors
    g = {n: np.ones(s, np.float32) for n, s in SHAPES.items()}
    with pytest.raises(errors.InvalidArgument) as e:  # float32 in a float16 run
        await client.push(run.run_id, a.rank, a.incarnation, 0, g)
    assert "DATA_TYPE_FLOAT16 (its compression)" in e.value.message
    assert e.value.reason == pb.ERROR_REASON_INVALID_GRADIENT
    nan = {n: wire.CodedPart(compress.encode(np.where(np.arange(v.size) == 7, np.nan, v.reshape(-1)), pb.DATA_TYPE_FLOAT16),
                             pb.DATA_TYPE_FLOAT16, v.shape) for n, v in g.items()}
    with pytest.raises(errors.InvalidArgument, match="NaN"):
        await client.push(run.run_id, a.rank, a.incarnation, 0, nan)
    huge = {n: wire.CodedPart(compress.encode(v.reshape(-1) * 1e5, pb.DATA_TYPE_FLOAT16), pb.DATA_TYPE_FLOAT16, v.shape)
            for n, v in g.items()}  # beyond float16's range: infinite on the wire
    with pytest.raises(errors.InvalidArgument, match="NaN/Inf"):
        await client.push(run.run_id, a.rank, a.incarnation, 0, huge)
    sparse = {n: wire.CodedPart(np.ones(1, np.float16), pb.DATA_TYPE_FLOAT16, v.shape, np.zeros(1, np.uint32))
              for n, v in g.items()}
    with pytest.raises(errors.InvalidArgument, match="no top-k compression"):
        await client.push(run.run_id, a.rank, a.incarnation, 0, sparse)
    after = (await client.pull(run.run_id)).tensors
    for n in SHAPES:
        np.testing.assert_array_equal(after[n], before[n])
    status = await client.get_run(run.run_id)
    assert status.counters.pushes_applied == 0 and status.workers[0].clock == 0
    ok = PushCodec(pb.Compression(dtype=pb.DATA_TYPE_FLOAT16)).encode(g)
    assert (await client.push(run.run_id, a.rank, a.incarnation, 0, ok)).clock == 1  # the stream is fine after


async def test_delta_pulls_bring_a_worker_s_copy_to_the_server_s_version(client: PsClient) -> None:
    """Top-k pushes from two ranks, delta pulls by one: after each, its copy equals a whole pull of
    the same version, and the answer carried only the elements changed since (counted in bytes)."""
    compression = pb.Compression(topk_ratio=0.01, dtype=pb.DATA_TYPE_FLOAT16)
    run = await client.create_run(make_spec(shapes=SHAPES, num_workers=2, staleness=-1, iterations=30, lr=0.5,
                                            compression=compression))
    a, b = [(await client.join(f"w{i}", run.run_id)).assignment for i in range(2)]
    codecs = [PushCodec(compression), PushCodec(compression)]
    rng = np.random.default_rng(5)
    mine: dict[str, np.ndarray] = {}
    first = await client.pull(run.run_id, a.rank, a.incarnation, 0, into=mine)
    assert not first.delta and first.lineage
    since = (first.lineage, first.version)
    deltas = 0
    for clock in range(6):
        for who, codec in zip((a, b), codecs, strict=True):
            g = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
            if who is b or clock % 2:  # rank a pushes with the pull, or alone (then pulls by itself)
                await client.push(run.run_id, who.rank, who.incarnation, clock, codec.encode(g))
            else:
                before = (await client.get_run(run.run_id)).counters.bytes_pulled
                _, got = await client.push_pull(run.run_id, who.rank, who.incarnation, clock, codec.encode(g),
                                                into=mine, since=since)
                pulled = (await client.get_run(run.run_id)).counters.bytes_pulled - before
                assert got.delta and pulled < 0.1 * 2 * sum(int(np.prod(s)) for s in SHAPES.values())
                since, deltas = (got.lineage, got.version), deltas + 1
        got = await client.pull(run.run_id, a.rank, a.incarnation, clock + 1, into=mine, since=since)
        assert got.delta and got.version == 2 * (clock + 1)
        since = (got.lineage, got.version)
        whole = await client.pull(run.run_id, a.rank, a.incarnation, clock + 1)  # into new arrays: whole
        assert not whole.delta and whole.version == got.version
        for n in SHAPES:
            np.testing.assert_array_equal(mine[n], whole.tensors[n])
    assert deltas == 3
    stranger = await client.pull(run.run_id, a.rank, a.incarnation, 6, into=dict(mine), since=(since[0] + 1, since[1]))
    assert not stranger.delta  # another lineage (a server restarted from a checkpoint): whole
    observer = await client.pull(run.run_id, into=dict(mine), since=since)
    assert not observer.delta


async def test_runs_whose_steps_change_everything_answer_whole(client: PsClient) -> None:
    """Momentum moves every parameter at every step: a delta would not be smaller, none is made."""
    run = await client.create_run(make_spec(shapes=SHAPES, num_workers=1, staleness=-1, iterations=5,
                                            optimizer=pb.OptimizerSpec(momentum=pb.MomentumConfig(learning_rate=0.1)),
                                            compression=pb.Compression(topk_ratio=0.01)))
    a = (await client.join("w0", run.run_id)).assignment
    codec = PushCodec(pb.Compression(topk_ratio=0.01))
    mine: dict[str, np.ndarray] = {}
    first = await client.pull(run.run_id, a.rank, a.incarnation, 0, into=mine)
    g = {n: np.ones(s, np.float32) for n, s in SHAPES.items()}
    _, got = await client.push_pull(run.run_id, a.rank, a.incarnation, 0, codec.encode(g), into=mine,
                                    since=(first.lineage, first.version))
    assert not got.delta and got.version == 1


async def test_a_compressed_push_sent_twice_is_applied_once(client: PsClient) -> None:
    compression = pb.Compression(topk_ratio=0.01, dtype=pb.DATA_TYPE_BFLOAT16)
    run = await client.create_run(make_spec(shapes=SHAPES, num_workers=1, staleness=-1, iterations=5,
                                            compression=compression))
    a = (await client.join("w0", run.run_id)).assignment
    parts = PushCodec(compression).encode({n: np.ones(s, np.float32) for n, s in SHAPES.items()})
    first = await client.push(run.run_id, a.rank, a.incarnation, 0, parts)
    again = await client.push(run.run_id, a.rank, a.incarnation, 0, parts)  # a retry: the same bytes
    assert (first.duplicate, again.duplicate) == (False, True)
    c = (await client.get_run(run.run_id)).counters
    assert (c.pushes_applied, c.pushes_duplicate, c.updates_applied) == (1, 1, 1)
