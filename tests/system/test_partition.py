"""A network partition between one worker and the server, made with a network namespace and veth.

The worker runs in its own namespace (its own test host, 10.213.0.2) and reaches the server on the
host side of a veth pair (10.213.0.1). Taking the link down partitions it: no hang, eviction after
the lease, and after healing the worker rejoins and trains again. Needs root (CI runs as root).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from procs import ENV, connect, finish, ps_server, ps_workers, record, watch_until

from client.spec import LaunchOptions, build_run_spec
from paramserver.v1 import paramserver_pb2 as pb

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

HOST_IP, NS_IP = "10.213.0.1", "10.213.0.2"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


@contextmanager
def namespace() -> Iterator[tuple[str, str]]:
    """A namespace with a veth link to the host; yields (namespace, host-side interface)."""
    assert os.geteuid() == 0, "the partition test needs root to create a network namespace (CI runs as root)"
    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"ps-{tag}", f"vh{tag}", f"vn{tag}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", ns)
        sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{NS_IP}/30", "dev", ns_if)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, host_if
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


async def test_partitioned_worker_is_evicted_then_rejoins_after_healing() -> None:
    lease = 3.0
    # long enough to outlast the partition; stopped once the partitioned worker trains again
    spec = build_run_spec(LaunchOptions(model="mlp:32", dataset="digits", workers=3, staleness=2, epochs=2000, seed=4))
    with namespace() as (ns, host_if), \
            ps_server("--host", "0.0.0.0", "--port", "0", "--lease-seconds", str(lease),
                      "--heartbeat-seconds", "0.5") as (_, addr), \
            ps_workers(addr, 2) as local_workers:
        port = addr.rsplit(":", 1)[1]
        addr = f"127.0.0.1:{port}"  # the server says 0.0.0.0: dial loopback from here
        remote = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "worker.main", "--server", f"{HOST_IP}:{port}",
             "--log-level", "WARNING", "--timeout-seconds", "3", "--idle-exit-seconds", "5", "--name", "remote"],
            env=ENV)
        try:
            async with connect(addr) as c:
                run = await c.create_run(spec)
                await watch_until(c, run.run_id, lambda r: r.min_clock >= 10)
                before = (await c.get_run(run.run_id)).workers
                rank = next(w.rank for w in before if w.worker_name == "remote")
                sh("ip", "link", "set", host_if, "down")  # the partition
                t_cut = time.monotonic()
                async with asyncio.timeout(lease + 10):
                    async for snap in c.watch_run(run.run_id, interval=0.05):
                        if snap.run.workers[rank].state == pb.WORKER_STATE_EVICTED:
                            break
                evicted_after = time.monotonic() - t_cut
                # the others are not held back by the partitioned rank
                progress = (await c.get_run(run.run_id)).max_clock
                await asyncio.sleep(1.0)
                assert (await c.get_run(run.run_id)).max_clock > progress
                sh("ip", "link", "set", host_if, "up")  # heal
                t_heal = time.monotonic()
                rejoined = False
                async with asyncio.timeout(60):
                    async for snap in c.watch_run(run.run_id, interval=0.1):
                        w = snap.run.workers[rank]
                        if w.state == pb.WORKER_STATE_ACTIVE and w.incarnation > before[rank].incarnation:
                            rejoined = True
                            break
                assert rejoined, "the run ended before the partitioned worker came back"
                rejoined_after = time.monotonic() - t_heal
                async with asyncio.timeout(30):  # and it trains again
                    async for snap in c.watch_run(run.run_id, interval=0.1):
                        if snap.run.workers[rank].pushes >= before[rank].pushes + 5:
                            break
                await c.stop_run(run.run_id, "test over")
                final = await finish(c, run.run_id)
            assert remote.wait(60) == 0
        finally:
            if remote.poll() is None:
                remote.kill()
            remote.wait()
        assert [w.wait(30) for w in local_workers] == [0, 0]
    assert final.state == pb.RUN_STATE_STOPPED, final.message
    assert lease - 0.5 <= evicted_after <= lease + 2.0
    assert final.counters.evictions >= 1
    assert final.workers[rank].incarnation > before[rank].incarnation  # it came back as a new incarnation
    record("partition", lease_seconds=lease, evicted_after_seconds=round(evicted_after, 2),
           rejoined_after_heal_seconds=round(rejoined_after, 2))
