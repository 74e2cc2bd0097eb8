"""UpdateRun: a running run's staleness bound changed at once, against a real server; answers over
shared memory, TCP and gRPC say the bound in force; psctl set."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import make_spec

from client.spec import LaunchOptions, build_run_spec
from paramserver import errors
from paramserver.client import PsClient
from paramserver.v1 import paramserver_pb2 as pb
from ps_server.codec import spec_from_proto
from ps_server.core import errors as errors_core
from ps_server.core.spec import validate_spec
from ps_server.server import PsServer

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]


async def test_raising_the_bound_releases_a_parked_pull_and_answers_say_the_new_one(client: PsClient) -> None:
    run = await client.create_run(make_spec(num_workers=2, staleness=1, iterations=20))
    a, b = [(await client.join(f"w{i}", run.run_id)).assignment for i in range(2)]
    g = {"w": np.ones((3, 4), np.float32), "b": np.ones(4, np.float32)}
    for c in (0, 1):
        ack = await client.push(run.run_id, a.rank, a.incarnation, c, g)
        assert ack.HasField("staleness") and ack.staleness == 1
    parked = asyncio.create_task(client.pull(run.run_id, a.rank, a.incarnation, 2, max_wait=30))
    await asyncio.sleep(0.2)
    assert not parked.done()  # needs rank 1 at clock 1
    updated = await client.update_run(run.run_id, staleness=-1)
    assert updated.spec.staleness == -1
    pulled = await asyncio.wait_for(parked, 10)
    assert pulled.staleness == -1
    ack = await client.push(run.run_id, a.rank, a.incarnation, 2, g)
    assert ack.staleness == -1
    metrics = await client.get_metrics(run.run_id)
    assert any(e.kind == "staleness" and "from 1 to unbounded" in e.message for e in metrics.events)
    _, pulled = await client.push_pull(run.run_id, b.rank, b.incarnation, 0, g, into={})
    assert pulled.staleness == -1


async def test_bad_updates_are_refused_saying_why(client: PsClient) -> None:
    run = await client.create_run(make_spec(num_workers=1, staleness=0, iterations=5))
    with pytest.raises(errors.FailedPrecondition, match="to or from 0"):
        await client.update_run(run.run_id, staleness=2)
    with pytest.raises(errors.InvalidArgument, match="staleness -3"):
        await client.update_run(run.run_id, staleness=-3)
    with pytest.raises(errors.NotFound):
        await client.update_run("run-nope", staleness=2)
    assert (await client.update_run(run.run_id)).spec.staleness == 0  # nothing asked, nothing changed
    await client.stop_run(run.run_id)
    with pytest.raises(errors.FailedPrecondition, match="stopped"):
        await client.update_run(run.run_id, staleness=0)


async def test_psctl_set_changes_the_bound(server: PsServer) -> None:
    async with PsClient(f"127.0.0.1:{server.port}") as c:
        run = await c.create_run(make_spec(num_workers=2, staleness=2, iterations=5))

    def psctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "client.cli", *args, "--server", f"127.0.0.1:{server.port}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)

    out = await asyncio.to_thread(psctl, "set", run.run_id, "--staleness", "inf", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["staleness"] == -1
    out = await asyncio.to_thread(psctl, "set", run.run_id, "--staleness", "4")
    assert out.returncode == 0 and out.stdout.strip() == f"{run.run_id}: staleness 4 (SSP)", out.stdout
    out = await asyncio.to_thread(psctl, "set", run.run_id, "--staleness", "0")
    assert out.returncode == 1 and "to or from 0" in out.stderr
    out = await asyncio.to_thread(psctl, "set", run.run_id)
    assert out.returncode != 0 and "--staleness" in out.stderr


def test_psctl_reads_a_schedule_in_clocks_or_shares_of_the_iterations() -> None:
    spec = build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=2, iterations=100, staleness=8,
                                        staleness_schedule="20%=2, 50=inf"))
    assert [(s.from_clock, s.staleness) for s in spec.staleness_schedule] == [(20, 2), (50, -1)]
    assert spec_from_proto(spec).staleness_schedule == ((20, 2), (50, -1))
    for bad, says in (("20%", "CLOCK=S"), ("x=2", "CLOCK=S"), ("10=-1", "cannot be negative"), ("10=zero", "use 0"),
                      ("50=0", "to or from 0"), ("50=4,20=1", "increasing clocks")):
        with pytest.raises(ValueError, match=says):
            build_run_spec(LaunchOptions(model="softmax", dataset="digits", iterations=100, staleness_schedule=bad))
    spec.staleness_schedule.append(pb.StalenessStep(from_clock=60, staleness=0))  # (another client's)
    with pytest.raises(errors_core.InvalidArgument, match="staleness_schedule"):  # (CreateRun validates so)
        validate_spec(spec_from_proto(spec))
