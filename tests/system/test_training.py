"""Real processes: a ps-server subprocess and ps-worker subprocesses training real models."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from procs import bsp_reference, connect, finish, free_port, ps_server, ps_workers, segments

from client.spec import LaunchOptions, build_run_spec
from paramserver.v1 import paramserver_pb2 as pb
from worker.datasets import load_dataset

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

async def test_digits_mlp_four_workers_ssp2_reaches_095() -> None:
    spec = build_run_spec(LaunchOptions(model="mlp:64", dataset="digits", workers=4, staleness=2, epochs=10))
    with ps_server("--port", "0") as (_, addr), ps_workers(addr, 4) as workers:
        async with connect(addr) as c:
            run = await c.create_run(spec)
            final = await finish(c, run.run_id)
        codes = [w.wait(30) for w in workers]
    assert final.state == pb.RUN_STATE_COMPLETED, final.message
    assert final.last_eval.eval_accuracy >= 0.95, final.last_eval
    assert final.last_eval.clock == spec.iterations
    assert final.counters.pushes_applied == 4 * spec.iterations
    assert all(w.pushes == spec.iterations for w in final.workers)
    assert codes == [0, 0, 0, 0]


async def test_linear_regression_recovers_true_weights() -> None:
    dataset = "synthetic-regression:samples=2000,features=10,noise=0.01,seed=3"
    spec = build_run_spec(LaunchOptions(model="linear", dataset=dataset, workers=4, staleness=1, lr=0.05,
                                        epochs=30, batch_size=32))
    with ps_server("--port", "0") as (_, addr), ps_workers(addr, 4):
        async with connect(addr) as c:
            run = await c.create_run(spec)
            final = await finish(c, run.run_id)
            params = (await c.pull(run.run_id, clock=spec.iterations)).tensors
    assert final.state == pb.RUN_STATE_COMPLETED, final.message
    data = load_dataset(json.loads(spec.data_spec_json))
    w_true = data.extras["true_weight"].reshape(params["linear.weight"].shape)
    b_true = data.extras["true_bias"].reshape(params["linear.bias"].shape)
    # Tolerance: noise 0.01 on 1600 samples bounds the least-squares error near 1e-3; SGD with a
    # constant step adds its own noise. 0.02 per coordinate is far below |W*| ~ 1.
    np.testing.assert_allclose(params["linear.weight"], w_true, atol=0.02)
    np.testing.assert_allclose(params["linear.bias"], b_true, atol=0.02)


@pytest.mark.parametrize("model", ["mlp:16", "mlp:512", "mlp:4096"])
async def test_bsp_equals_single_process_reference(model: str) -> None:
    """s = 0 with SGD: the same combined gradients in the same order give the same parameters.
    mlp:512's first layer (128 KiB) is computed in the push stream's shared memory
    (``PsClient.push_buffers``); mlp:4096's answers (1.2 MB) are published: written once a clock
    into a segment of the server's that the workers read (its last one stays mapped by the server)."""
    opts = LaunchOptions(model=model, dataset="digits", workers=3, staleness=0, lr=0.1, iterations=25,
                         batch_size=16, seed=5)
    spec = build_run_spec(opts)
    with ps_server("--port", "0") as (server, addr):
        async with connect(addr) as c:
            run = await c.create_run(spec)
            init = (await c.pull(run.run_id)).tensors
            with ps_workers(addr, 3):
                final_run = await finish(c, run.run_id)
            final = (await c.pull(run.run_id)).tensors
            publications = 1 if model == "mlp:4096" else 0  # (the workers are gone: their segments too)
            for _ in range(100):
                if segments(server.pid) == publications:
                    break
                await asyncio.sleep(0.05)
            assert segments(server.pid) == publications
    assert final_run.state == pb.RUN_STATE_COMPLETED, final_run.message
    params = bsp_reference(spec, init)
    for name in params:
        np.testing.assert_allclose(final[name], params[name], rtol=1e-5, atol=1e-6)
    assert not np.allclose(final["layer0.weight"], init["layer0.weight"])  # it did train


async def test_straggler_never_lets_fast_workers_past_the_bound() -> None:
    """One rank 3x slower, s = 1: the server's record shows every iteration within the bound."""
    opts = LaunchOptions(model="mlp:32", dataset="digits", workers=3, staleness=1, iterations=40,
                         slowdown=((2, 3.0),))
    spec = build_run_spec(opts)
    with ps_server("--port", "0") as (_, addr), ps_workers(addr, 3):
        async with connect(addr) as c:
            run = await c.create_run(spec)
            final = await finish(c, run.run_id)
            metrics = await c.get_metrics(run.run_id, include_clock_records=True)
    assert final.state == pb.RUN_STATE_COMPLETED, final.message
    pulls = [r for r in metrics.clock_records if r.kind == pb.ClockRecord.KIND_PULL]
    pushes = [r for r in metrics.clock_records if r.kind == pb.ClockRecord.KIND_PUSH]
    assert len(pushes) == 3 * spec.iterations
    for r in pulls + pushes:
        # starting (pull) or completing (push) iteration c needs every live rank at >= c - s,
        # i.e. the slow rank completed iteration c - s - 1.
        assert r.min_clock >= r.clock - 1, r
    fast_ahead = max(r.clock - r.min_clock for r in pushes if r.rank != 2)
    assert fast_ahead == 1  # the fast ranks did run ahead, exactly to the bound


async def test_worker_waits_for_a_server_and_survives_a_restart() -> None:
    port = free_port()
    addr = f"127.0.0.1:{port}"
    with ps_workers(addr, 1, "--join-wait-seconds", "1") as (worker,):
        await asyncio.sleep(1.0)  # the worker starts first: nothing listens yet
        assert worker.poll() is None
        with ps_server("--port", str(port)):
            await asyncio.sleep(1.5)  # it is now parked in Join on this server
        assert worker.poll() is None  # the server went away while the worker waited for work
        with ps_server("--port", str(port)) as (_, addr2):
            async with connect(addr2) as c:
                spec = build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=1, iterations=30))
                run = await c.create_run(spec)
                final = await finish(c, run.run_id, timeout=60)
            assert worker.wait(30) == 0
    assert final.state == pb.RUN_STATE_COMPLETED, final.message
    assert final.workers[0].pushes == 30
