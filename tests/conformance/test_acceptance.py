"""Acceptance: the Node worker trains for real, alone and next to Python workers in one run, on one
server and on a cluster of two holding each run in two shards (conftest.py's ``topology``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from client.spec import LaunchOptions, build_run_spec
from paramserver.v1 import paramserver_pb2 as pb
from worker.datasets import load_dataset
from worker.models import build_model
from worker.sampling import BatchSampler, shard_indices

from .conftest import (
    IMPLEMENTATIONS,
    TOPOLOGIES,
    Impl,
    Topology,
    connect,
    finish,
    ps_server,
    pull_all,
    run_spec,
    split_tensors,
)

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


@pytest.fixture
def python_impl(tmp_path_factory: pytest.TempPathFactory) -> Impl:
    return Impl(IMPLEMENTATIONS["python"], None, tmp_path_factory.mktemp("python-logs"))


@pytest.fixture
def node_impl(node_ready: None, exported_data: object, tmp_path_factory: pytest.TempPathFactory) -> Impl:
    return Impl(IMPLEMENTATIONS["node"], exported_data, tmp_path_factory.mktemp("node-logs"))  # type: ignore[arg-type]


def _logs(*impls: Impl) -> str:
    return "\n".join(i.logs() for i in impls)


async def test_mixed_python_and_node_workers_train_digits_mlp_to_095(python_impl: Impl, node_impl: Impl,
                                                                    topology: Topology) -> None:
    """2 Python + 2 Node workers, one digits MLP (mlp:64) run with s = 2: >= 0.95 test accuracy."""
    spec = run_spec(model="mlp:64", workers=4, staleness=2, epochs=10, iterations=0)
    try:
        with topology.start() as srv:
            async with connect(srv.address) as c:
                run = await c.create_run(spec)
                workers = python_impl.start_many(srv.address, 2) + node_impl.start_many(srv.address, 2)
                final = await finish(c, run.run_id, timeout=150, logs=lambda: _logs(python_impl, node_impl))
            codes = [w.wait(30) for w in workers]
    finally:
        for w in python_impl.started + node_impl.started:
            w.stop()
    assert final.state == pb.RUN_STATE_COMPLETED, (final.message, _logs(python_impl, node_impl))
    assert codes == [0, 0, 0, 0], _logs(python_impl, node_impl)
    assert final.last_eval.clock == spec.iterations
    assert final.last_eval.eval_accuracy >= 0.95, final.last_eval
    # the server's record: all four ranks pushed every iteration, two of them Node workers
    assert [w.pushes for w in final.workers] == [spec.iterations] * 4
    assert final.counters.pushes_applied == 4 * spec.iterations
    names = [w.worker_name for w in final.workers]
    assert sum(n.startswith("node:") for n in names) == 2, names
    if topology.sharded:
        assert sorted(split_tensors(final)) == ["layer0.weight", "layer1.weight"], final.shard_map


@pytest.mark.one_server("Node workers alone on a cluster train to the same parameters as on one server, bit for "
                        "bit (test_node_bsp_run_equals_the_python_single_process_reference[two-shards]), and to "
                        "accuracy next to Python workers (test_mixed_python_and_node_workers_...[two-shards])")
async def test_node_workers_alone_train_softmax_on_digits_to_090(node_impl: Impl) -> None:
    spec = run_spec(model="softmax", workers=2, staleness=2, epochs=10, iterations=0)
    try:
        with ps_server() as srv:
            async with connect(srv.address) as c:
                run = await c.create_run(spec)
                workers = node_impl.start_many(srv.address, 2)
                final = await finish(c, run.run_id, timeout=120, logs=node_impl.logs)
            codes = [w.wait(30) for w in workers]
    finally:
        for w in node_impl.started:
            w.stop()
    assert final.state == pb.RUN_STATE_COMPLETED, (final.message, node_impl.logs())
    assert codes == [0, 0]
    assert final.last_eval.eval_accuracy >= 0.90, final.last_eval
    assert all(w.worker_name.startswith("node:") and w.pushes == spec.iterations for w in final.workers)


BSP_SPEC = {"model": "mlp:16", "workers": 3, "staleness": 0, "lr": 0.1, "iterations": 25, "batch_size": 16,
            "seed": 2**60 + 5}
"""(A seed past 2^53, as psctl launch --seed takes: the Node worker read it rounded, and trained on other
shards and batches than the reference.)"""
_bsp_final: dict[str, dict[str, np.ndarray]] = {}
"""The final parameters of the BSP run on each topology, as far as this session ran it."""


async def _bsp_run(node_impl: Impl, topology: Topology) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], pb.Run]:
    """The BSP run of BSP_SPEC by three Node workers: its initial and final parameters, and the run."""
    spec = run_spec(**BSP_SPEC)
    try:
        with topology.start() as srv:
            async with connect(srv.address) as c:
                run = await c.create_run(spec)
                init = await pull_all(c, run.run_id)
                node_impl.start_many(srv.address, 3)
                final_run = await finish(c, run.run_id, logs=node_impl.logs)
                final = await pull_all(c, run.run_id)
    finally:
        for w in node_impl.started:
            w.stop()
    assert final_run.state == pb.RUN_STATE_COMPLETED, (final_run.message, node_impl.logs())
    _bsp_final[topology.name] = final
    return init, final, final_run


async def test_node_bsp_run_equals_the_python_single_process_reference(node_impl: Impl, topology: Topology) -> None:
    """s = 0 with SGD and Node workers: the same parameters as numpy computing the same batches of the
    same shards in one process (tests/system's reference), to float32 rounding. The Node worker
    reproduces worker.datasets' shards and batches exactly, and worker.models' gradients.

    On two shards (layer0.weight split by rows, the other tensors whole on one or the other) the
    final parameters are also those of the same run on one server, bit for bit: each shard steps
    its rows as the one server steps them, with the same gradients combined in the same order."""
    spec = run_spec(**BSP_SPEC)
    init, final, final_run = await _bsp_run(node_impl, topology)
    data = load_dataset(json.loads(spec.data_spec_json))
    model = build_model(json.loads(spec.model_spec_json), data.n_features, data.n_outputs)
    shards = [shard_indices(len(data.X_train), r, 3, spec.seed) for r in range(3)]
    samplers = [BatchSampler(len(s), spec.batch_size, spec.seed, r) for r, s in enumerate(shards)]
    params = {k: v.copy() for k, v in init.items()}
    for clock in range(spec.iterations):
        grads = []
        for r in range(3):
            idx = shards[r][samplers[r].batch(clock)]
            grads.append(model.loss_and_grad(params, data.X_train[idx], data.y_train[idx])[1])
        for name in params:
            params[name] -= np.float32(0.1) * (sum(g[name] for g in grads) / np.float32(3))
    for name in params:
        np.testing.assert_allclose(final[name], params[name], rtol=1e-4, atol=1e-5, err_msg=name)
    assert not np.allclose(final["layer0.weight"], init["layer0.weight"])
    if topology.sharded:
        assert split_tensors(final_run) == {"layer0.weight": [(0, 0, 32), (1, 32, 64)]}, final_run.shard_map
        assert all(s.pieces for s in final_run.shard_map.shards), final_run.shard_map
        alone = _bsp_final.get("one-server")
        if alone is None:  # (this case alone was asked for)
            _, alone, _ = await _bsp_run(node_impl, TOPOLOGIES["one-server"])
        assert sorted(alone) == sorted(final)
        for name in final:
            assert final[name].dtype == alone[name].dtype == np.float32
            same = final[name].view(np.uint32) == alone[name].view(np.uint32)
            assert same.all(), f"{name}: {int((~same).sum())} of {same.size} values differ from the one-server run"


@pytest.mark.one_server("which runs a worker is given does not depend on the servers")
async def test_node_workers_leave_runs_with_tables_or_compression_alone_and_train_the_dense_one(
        node_impl: Impl) -> None:
    """The Node worker declares no capabilities: the older runs, one with a table (an FM on CTR
    data), one in float16 on the wire (RunSpec.compression), are never handed to it; it trains the
    dense float32 run created after."""
    sparse = build_run_spec(LaunchOptions(model="fm:2:rows=1024", dataset="synthetic-ctr:samples=2000", workers=1,
                                          iterations=5))
    half = build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=1, iterations=5, compress="fp16"))
    dense = run_spec(model="softmax", workers=2, staleness=2, iterations=40)
    try:
        with ps_server() as srv:
            async with connect(srv.address) as c:
                table_run = await c.create_run(sparse)
                half_run = await c.create_run(half)
                run = await c.create_run(dense)
                workers = node_impl.start_many(srv.address, 2)
                final = await finish(c, run.run_id, timeout=120, logs=node_impl.logs)
                untouched = [await c.get_run(r.run_id) for r in (table_run, half_run)]
                for r in (table_run, half_run):
                    await c.stop_run(r.run_id)
            codes = [w.wait(30) for w in workers]
    finally:
        for w in node_impl.started:
            w.stop()
    assert final.state == pb.RUN_STATE_COMPLETED, (final.message, node_impl.logs())
    assert codes == [0, 0]
    assert [(u.state, u.active_workers) for u in untouched] == [(pb.RUN_STATE_PENDING, 0)] * 2
