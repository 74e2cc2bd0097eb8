"""A click-through-rate model with an embedding table trains to the planted model's AUC (issue 16):
real server and worker processes, rows pulled and pushed by id, a cluster of two servers holding
the table's rows, and a Node worker (dense models only) left waiting instead of handed the run."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest
from procs import connect, finish, free_port, ps_server, ps_workers

from client.spec import LaunchOptions, build_run_spec
from paramserver.v1 import paramserver_pb2 as pb
from worker.datasets import load_dataset, parse_dataset

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

DATA = "synthetic-ctr:samples=400000,ids_per_field=100,factors=2"


@pytest.mark.parametrize("servers", [1, 2])
async def test_a_factorization_machine_reaches_the_planted_auc(servers: int, tmp_path: Path) -> None:
    planted = float(load_dataset(parse_dataset(DATA)).extras["planted_auc"])
    spec = build_run_spec(LaunchOptions(model="fm:2:rows=65536", dataset=DATA, workers=2, staleness=2,
                                        optimizer="adagrad", lr=0.1, batch_size=256, epochs=2))
    assert any(p.table for p in spec.params) and "tables" in spec.requires
    ports = [free_port() for _ in range(servers)]
    cluster = ("--cluster", ",".join(f"127.0.0.1:{p}" for p in ports)) if servers > 1 else ()
    with ExitStack() as stack:
        for i, port in enumerate(ports):
            stack.enter_context(ps_server("--port", str(port), *cluster, *(("--index", str(i)) if cluster else ())))
        address = f"127.0.0.1:{ports[0]}"
        async with connect(address) as c:
            run = await c.create_run(spec)
            assert len(run.shard_map.shards) == (servers if servers > 1 else 0)
            workers = stack.enter_context(ps_workers(address, 2, "--timeout-seconds", "20"))
            final = await finish(c, run.run_id, timeout=240)
            metrics = await c.get_metrics(run.run_id)
        codes = [w.wait(60) for w in workers]
    assert final.state == pb.RUN_STATE_COMPLETED, final.message
    assert codes == [0, 0]
    auc = final.last_eval.eval_auc
    assert auc >= planted - 0.01, f"AUC {auc:.4f}, the planted model's {planted:.4f}"
    assert 0 < final.last_eval.eval_loss < 0.6  # the log-loss
    evals = [p for p in metrics.points if p.eval]
    assert evals[0].eval_auc < auc  # it learned
