"""Tables (issue 16) through a real server, on both data planes: rows pulled and pushed by id,
repeated ids summed, bad ids refused with nothing changed, BSP combining rows, Join capabilities."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import make_spec, with_config

from paramserver import errors
from paramserver.client import PsClient
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1.wire import RowsPart
from ps_server.config import ServerConfig
from ps_server.server import start_server

pytestmark = pytest.mark.timeout(60)

ROWS, DIM = 1000, 4


def table_spec(**kw: object) -> pb.RunSpec:
    spec = make_spec(shapes={"bias": (1,)}, num_workers=kw.pop("num_workers", 1), lr=0.5, **kw)  # type: ignore[arg-type]
    spec.params.append(pb.ParamSpec(name="emb", shape=(ROWS, DIM), initializer=pb.INITIALIZER_NORMAL, scale=1.0,
                                    table=True))
    spec.requires.append("tables")
    return spec


async def joined(c: PsClient, run_id: str, n: int = 1) -> list[pb.Assignment]:
    return [(await c.join(f"w{i}", run_id, capabilities=["tables"])).assignment for i in range(n)]


def rows(ids: list[int], values: np.ndarray) -> RowsPart:
    return RowsPart(np.array(ids, np.int64), values.astype(np.float32), (ROWS, DIM))


async def test_rows_pulled_by_id_and_a_push_updates_only_its_rows_repeats_summed(client: PsClient) -> None:
    run = await client.create_run(table_spec(staleness=1))
    (a,) = await joined(client, run.run_id)
    before = (await client.pull(run.run_id, incarnation=0, names=["emb"])).tensors["emb"].copy()
    got = await client.pull(run.run_id, a.rank, a.incarnation, 0, rows={"emb": np.array([7, 3, 7, 999])},
                            names=["bias"])
    ids, values = got.rows["emb"]
    assert list(ids) == [7, 3, 7, 999] and np.array_equal(values, before[[7, 3, 7, 999]])
    assert set(got.tensors) == {"bias"}  # the whole tensors asked besides, and no others
    g = np.ones((3, DIM), np.float32)
    await client.push(run.run_id, a.rank, a.incarnation, 0, {"bias": np.zeros(1, np.float32),
                                                            "emb": rows([5, 2, 5], g)})
    after = (await client.pull(run.run_id, incarnation=0, names=["emb"])).tensors["emb"]
    expected = before.copy()
    expected[5] -= 0.5 * 2  # row 5 came twice: summed
    expected[2] -= 0.5
    np.testing.assert_array_equal(after, expected)


async def test_a_push_may_leave_a_table_out_but_not_a_dense_tensor(client: PsClient) -> None:
    run = await client.create_run(table_spec(staleness=1))
    (a,) = await joined(client, run.run_id)
    resp = await client.push(run.run_id, a.rank, a.incarnation, 0, {"bias": np.ones(1, np.float32)})
    assert resp.clock == 1
    with pytest.raises(errors.InvalidArgument, match="lacks tensor"):
        await client.push(run.run_id, a.rank, a.incarnation, 1, {"emb": rows([1], np.ones((1, DIM)))})


@pytest.mark.parametrize(("ids", "why"), [([0, ROWS], "out of range"), ([-1], "out of range")])
async def test_bad_row_ids_are_refused_and_change_nothing(client: PsClient, ids: list[int], why: str) -> None:
    run = await client.create_run(table_spec(staleness=1))
    (a,) = await joined(client, run.run_id)
    before = (await client.pull(run.run_id, incarnation=0)).tensors
    with pytest.raises(errors.InvalidArgument, match=why) as push:
        await client.push(run.run_id, a.rank, a.incarnation, 0,
                          {"bias": np.ones(1, np.float32), "emb": rows(ids, np.ones((len(ids), DIM)))})
    assert push.value.reason == pb.ERROR_REASON_INVALID_GRADIENT
    with pytest.raises(errors.InvalidArgument, match=why):
        await client.pull(run.run_id, a.rank, a.incarnation, 0, rows={"emb": np.array(ids)})
    after = await client.pull(run.run_id, incarnation=0)
    assert after.version == 0 and all(np.array_equal(before[n], after.tensors[n]) for n in before)
    assert (await client.get_run(run.run_id)).min_clock == 0


async def test_rows_of_a_tensor_that_is_no_table_and_torn_ids_are_refused(client: PsClient) -> None:
    run = await client.create_run(table_spec(staleness=1))
    (a,) = await joined(client, run.run_id)
    with pytest.raises(errors.InvalidArgument, match="not a table"):
        await client.pull(run.run_id, a.rank, a.incarnation, 0, rows={"bias": np.array([0])})
    torn = pb.PullParamsRequest(run_id=run.run_id, rank=a.rank, incarnation=a.incarnation,
                                rows=[pb.TableRows(name="emb", row_ids=b"\x01\x02\x03")])
    with pytest.raises(errors.InvalidArgument, match="whole int64"):
        await client._pull.exchange([[torn.SerializeToString()]], 10, until_final=True)
    with pytest.raises(errors.InvalidArgument, match="not a table"):
        await client.push(run.run_id, a.rank, a.incarnation, 0,
                          {"bias": RowsPart(np.array([0], np.int64), np.ones((1, 1), np.float32), (1, 1)),
                           "emb": rows([1], np.ones((1, DIM)))})


async def test_a_pull_over_the_row_limit_is_refused(server_config: ServerConfig) -> None:
    from ps_server.core.spec import Limits

    ps = await start_server(with_config(server_config))
    ps.registry.limits = Limits(max_pull_rows=10)
    try:
        async with PsClient(ps.address, timeout=10) as c:
            run = await c.create_run(table_spec(staleness=1))
            (a,) = await joined(c, run.run_id)
            with pytest.raises(errors.InvalidArgument, match="at most 10 per pull"):
                await c.pull(run.run_id, a.rank, a.incarnation, 0, rows={"emb": np.arange(11)})
            got = await c.pull(run.run_id, a.rank, a.incarnation, 0, rows={"emb": np.arange(10)})
            assert len(got.rows["emb"][0]) == 10
    finally:
        await ps.stop(0)


async def test_bsp_combines_the_ranks_rows_as_their_mean(client: PsClient) -> None:
    run = await client.create_run(table_spec(staleness=0, num_workers=2, aggregation=pb.AGGREGATION_MEAN))
    a, b = await joined(client, run.run_id, 2)
    before = (await client.pull(run.run_id, incarnation=0, names=["emb"])).tensors["emb"].copy()
    zero = np.zeros(1, np.float32)
    await client.push(run.run_id, a.rank, a.incarnation, 0, {"bias": zero, "emb": rows([1, 2], np.full((2, DIM), 2.0))})
    await client.push(run.run_id, b.rank, b.incarnation, 0, {"bias": zero, "emb": rows([2, 3], np.full((2, DIM), 4.0))})
    got = await client.pull(run.run_id, a.rank, a.incarnation, 1, rows={"emb": np.array([1, 2, 3, 4])})
    expected = before[[1, 2, 3, 4]].copy()
    expected[0] -= 0.5 * (2.0 / 2)
    expected[1] -= 0.5 * (6.0 / 2)
    expected[2] -= 0.5 * (4.0 / 2)
    np.testing.assert_allclose(got.rows["emb"][1], expected, rtol=1e-6)


async def test_a_worker_gets_only_runs_it_can_train(client: PsClient) -> None:
    dense = await client.create_run(make_spec(num_workers=1))
    table = await client.create_run(table_spec(staleness=1))
    plain = await client.join("node", max_wait=0)  # declares nothing: only the dense run
    assert plain.assignment.run_id == dense.run_id
    assert not (await client.join("node", max_wait=0)).HasField("assignment")
    with pytest.raises(errors.FailedPrecondition, match="requires tables") as refused:
        await client.join("node", table.run_id, max_wait=0)
    assert refused.value.reason == pb.ERROR_REASON_CANNOT_TRAIN
    able = await client.join("py", max_wait=0, capabilities=["tables", "model:fm"])
    assert able.assignment.run_id == table.run_id


@pytest.mark.parametrize("servers", [1, 3])
async def test_a_table_spread_over_servers_gives_the_same_rows_as_one_server(server_config: ServerConfig,
                                                                             servers: int) -> None:
    """Rows by id across shards (ids local to each shard's range, answers in the order asked),
    pushes of rows split by range; the result equals one server's, and an export puts the
    table together."""
    from test_cluster import cluster

    from paramserver.shards import Shards, pull_run

    async with cluster(server_config, servers) as ps:
        async with PsClient(ps[0].address, timeout=10) as c:
            run = await c.create_run(table_spec(staleness=2))
            assert len(run.shard_map.shards) == (servers if servers > 1 else 0)
            (a,) = await joined(c, run.run_id)
            plane: PsClient | Shards = Shards.beside(c, a.shard_map, a.spec) if a.shard_map.shards else c
            ids = np.array([999, 0, 500, 333, 334, 0], np.int64)
            first = await plane.pull(run.run_id, a.rank, a.incarnation, 0, rows={"emb": ids}, names=["bias"])
            assert list(first.rows["emb"][0]) == list(ids) and set(first.tensors) == {"bias"}
            grad = np.arange(6 * DIM, dtype=np.float32).reshape(6, DIM) / 100
            ack, pulled = await plane.push_pull(run.run_id, a.rank, a.incarnation, 0,
                                                {"bias": np.ones(1, np.float32), "emb": rows(list(ids), grad)},
                                                names=["bias"], rows={"emb": ids})
            assert ack.clock == 1
            whole = (await pull_run(c, run.run_id)).tensors
            if isinstance(plane, Shards):
                await plane.close()
    return_ = {"first": first.rows["emb"][1], "after": pulled.rows["emb"][1], "bias": pulled.tensors["bias"],
               "table": whole["emb"]}
    expected = first.rows["emb"][1].copy()
    for i, row in enumerate(ids):  # row 0 came twice: its gradients summed
        expected[ids == row] -= 0.5 * grad[i]
    np.testing.assert_allclose(return_["after"], expected, rtol=1e-6)
    np.testing.assert_array_equal(return_["table"][ids], return_["after"])
    assert return_["table"].shape == (ROWS, DIM)


async def test_a_retried_push_of_rows_is_applied_once(client: PsClient) -> None:
    run = await client.create_run(table_spec(staleness=1))
    (a,) = await joined(client, run.run_id)
    grads = {"bias": np.zeros(1, np.float32), "emb": rows([4, 4], np.ones((2, DIM)))}
    first = await client.push(run.run_id, a.rank, a.incarnation, 0, grads)
    again = await client.push(run.run_id, a.rank, a.incarnation, 0, grads)
    assert not first.duplicate and again.duplicate
    status = await client.get_run(run.run_id)
    assert status.counters.updates_applied == 1 and status.counters.pushes_duplicate == 1


@pytest.mark.parametrize("staleness", [0, 1])
async def test_a_restarted_server_resumes_tables_and_their_optimizer_state_exactly(
        server_config: ServerConfig, tmp_path: Path, staleness: int) -> None:
    """Checkpoints hold tables like dense tensors: the table, Adagrad's per-row accumulators and
    (BSP) the rows held for a clock not complete yet; the run goes on bit for bit as without the
    restart."""
    config = with_config(server_config, data_dir=str(tmp_path), checkpoint_every=1)
    spec = table_spec(staleness=staleness, num_workers=2,
                      optimizer=pb.OptimizerSpec(adagrad=pb.AdagradConfig(learning_rate=0.3)))
    zero = np.zeros(1, np.float32)

    def grad(clock: int, rank: int) -> dict[str, Any]:
        return {"bias": zero, "emb": rows([clock, 7, 100 + rank], np.full((3, DIM), 1.0 + clock + rank))}

    async def pushes(c: PsClient, a: list[pb.Assignment], clocks: range, ranks: list[int]) -> None:
        for clock in clocks:
            for r in ranks:
                await c.push(run.run_id, a[r].rank, a[r].incarnation, clock, grad(clock, r))

    ps = await start_server(config)
    async with PsClient(ps.address, timeout=10) as c:
        run = await c.create_run(spec)
        a = await joined(c, run.run_id, 2)
        await pushes(c, a, range(2), [0, 1])
        await pushes(c, a, range(2, 3), [0])  # rank 1's clock 2 missing: under BSP rank 0's rows are held
    await ps.stop(0)
    ps2 = await start_server(with_config(config, port=0))
    try:
        async with PsClient(ps2.address, timeout=10) as c:
            await pushes(c, a, range(2, 3), [1])
            await pushes(c, a, range(3, 4), [0, 1])
            resumed = (await c.pull(run.run_id, incarnation=0, names=["emb"])).tensors["emb"]
    finally:
        await ps2.stop(0)
    # the same pushes on a server that never stopped
    ps3 = await start_server(with_config(server_config, port=0))
    try:
        async with PsClient(ps3.address, timeout=10) as c:
            run = await c.create_run(spec)
            a = await joined(c, run.run_id, 2)
            await pushes(c, a, range(2), [0, 1])
            await pushes(c, a, range(2, 3), [0, 1])
            await pushes(c, a, range(3, 4), [0, 1])
            straight = (await c.pull(run.run_id, incarnation=0, names=["emb"])).tensors["emb"]
    finally:
        await ps3.stop(0)
    assert resumed.tobytes() == straight.tobytes()


async def test_the_server_counts_rows_pulled_and_pushed(client: PsClient) -> None:
    run = await client.create_run(table_spec(staleness=1))
    (a,) = await joined(client, run.run_id)
    await client.pull(run.run_id, a.rank, a.incarnation, 0, rows={"emb": np.array([1, 2, 2])})
    await client.push(run.run_id, a.rank, a.incarnation, 0,
                      {"bias": np.zeros(1, np.float32), "emb": rows([5, 5, 6], np.ones((3, DIM)))})
    counters = (await client.get_run(run.run_id)).counters
    assert (counters.rows_pulled, counters.rows_pushed) == (3, 2)
