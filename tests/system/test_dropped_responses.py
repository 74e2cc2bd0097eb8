"""Answers to pushes dropped on the way back: workers retry, the server applies each push once.

A gRPC proxy between the workers and the server lets every push reach the server, then drops a
seeded random 15% of the answers (the connection breaks, as when a network or a process fails
right after the server applied a push). The workers retry with the same key. The run is BSP with
plain SGD, so its final parameters are known exactly: a single-process reference of the same
combined gradients. They must match, and the server's duplicate counter must equal the drops.
"""

from __future__ import annotations

import pytest
from conformance.proxy import FaultProxy
from procs import bsp_reference, connect, finish, ps_server, ps_workers, record

from client.spec import LaunchOptions, build_run_spec
from paramserver.v1 import paramserver_pb2 as pb

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


async def test_dropped_answers_are_retried_and_applied_exactly_once() -> None:
    spec = build_run_spec(LaunchOptions(model="mlp:16", dataset="digits", workers=3, staleness=0, lr=0.1,
                                        iterations=40, batch_size=16, seed=11))
    # The proxy speaks gRPC: the server offers no TCP data plane, which would bypass it
    # (test_tcp_plane.py drops answers on the TCP data plane).
    with ps_server("--port", "0", "--data-port", "-1", "--no-shm") as (_, addr):  # all through the proxy (gRPC)
        async with FaultProxy(addr, drop_rate=0.15, seed=7) as proxy:
            async with connect(addr) as c:
                run = await c.create_run(spec)
                init = (await c.pull(run.run_id)).tensors
                with ps_workers(proxy.address, 3) as workers:
                    final_run = await finish(c, run.run_id)
                    assert [w.wait(30) for w in workers] == [0, 0, 0]
                final = (await c.pull(run.run_id)).tensors
    assert final_run.state == pb.RUN_STATE_COMPLETED, final_run.message
    assert len(proxy.dropped) >= 5, "too few faults injected to mean anything"
    assert final_run.counters.pushes_duplicate == len(proxy.dropped)
    assert final_run.counters.pushes_applied == 3 * spec.iterations
    expected = bsp_reference(spec, init)
    for name in expected:
        assert abs(final[name] - expected[name]).max() <= 1e-5 * (1 + abs(expected[name]).max()), name
    record("dropped-answers", injected=len(proxy.dropped), duplicates=final_run.counters.pushes_duplicate,
           pushes_applied=final_run.counters.pushes_applied)
