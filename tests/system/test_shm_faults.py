"""Faults on the shared-memory data plane: kill -9 of a worker while it writes a push into shared
memory, of the server while a worker reads parameters from it, and what a crash leaves behind
(nothing: segments are memfds passed over the socket, freed by the kernel with the last process
that maps them; the socket's name is abstract, not a file)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from procs import ENV, connect, ps_server, segments

from paramserver import errors
from paramserver.v1 import paramserver_pb2 as pb

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

SHAPE = (1000, 1000)  # 4 MB a push: the kill lands in the middle of a copy into the segment now and then


async def until(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


PUSHER = r"""
import asyncio, sys
import numpy as np
from paramserver.client import PsClient

async def main(addr, run_id, in_place):
    like = {"w": np.zeros(SHAPE, np.float32)}
    async with PsClient(addr, timeout=20) as c:
        a = (await c.join("pusher", run_id)).assignment
        for clock in range(10_000):
            bufs = c.push_buffers(run_id, a.rank, a.incarnation, clock, like) if in_place == "True" else None
            assert bufs is not None or in_place != "True" or clock == 0  # (no segment before the first push)
            g = bufs["w"] if bufs is not None else np.empty(SHAPE, np.float32)  # (in the segment: sent in place)
            g[...] = clock + 1  # push k: every element k + 1
            ack = await c.push(run_id, a.rank, a.incarnation, clock, {"w": g})
            assert not ack.duplicate
            print(clock, c.route.transport, flush=True)

asyncio.run(main(*sys.argv[1:]))
""".replace("SHAPE", repr(SHAPE))


@pytest.mark.parametrize("in_place", [False, True])
async def test_kill_9_of_a_worker_while_it_writes_a_push_applies_no_torn_or_partial_push(in_place: bool) -> None:
    """In place: the pusher writes each gradient into its segment itself (``PsClient.push_buffers``),
    as a large model's worker does, and the kill lands in that write now and then."""
    from support import make_spec

    before = set(os.listdir("/dev/shm"))
    with ps_server("--port", "0", "--lease-seconds", "30") as (server, addr):
        async with connect(addr) as c:
            for delay in (0.3, 0.45, 0.6):  # three runs, their pushers killed at different moments
                run = await c.create_run(make_spec(shapes={"w": SHAPE}, num_workers=1, staleness=-1, lr=1.0,
                                                   init=pb.INITIALIZER_ZEROS, iterations=100_000))
                pusher = subprocess.Popen([sys.executable, "-c", PUSHER, addr, run.run_id, str(in_place)], env=ENV,
                                          stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
                assert pusher.stdout is not None
                first = pusher.stdout.readline().split()
                assert first[1] == "shm", first  # it goes through shared memory
                assert await until(lambda: segments(server.pid) >= 1)
                await asyncio.sleep(delay)
                pusher.send_signal(signal.SIGKILL)
                pusher.wait(10)
                # The server lets go of the dead worker's memory as its stream ends.
                assert await until(lambda: segments(server.pid) == 0), "the server still maps the dead worker's segment"
                status = await c.get_run(run.run_id)
                k = status.workers[0].clock
                assert k >= 1 and status.counters.pushes_applied == k
                w = (await c.pull(run.run_id)).tensors["w"]
                # Pushes 1..k (push j: every element j) applied whole, each once, none torn.
                assert np.all(w == w.flat[0]), "a push was applied partly or torn"
                assert w.flat[0] == -k * (k + 1) // 2
        server.send_signal(signal.SIGKILL)
        server.wait(10)
    # The pushers are gone, and the server let go of each one's segment before it was killed
    # itself: no process maps them, so the kernel has freed them; and no file is left behind.
    assert segments("self") == 0 and set(os.listdir("/dev/shm")) <= before


@pytest.mark.parametrize("published", [False, True])
async def test_kill_9_of_the_server_while_a_worker_reads_ends_its_pull_and_frees_the_memory(published: bool) -> None:
    """Published: a BSP run, whose answers the worker reads from the server's publication (its
    pushes carry their pulls), mapped besides its own segments."""
    from support import make_spec

    before = set(os.listdir("/dev/shm"))
    with ps_server("--port", "0") as (server, addr):
        async with connect(addr) as c:
            run = await c.create_run(make_spec(shapes={"w": (2000, 2000)}, num_workers=1,
                                               staleness=0 if published else -1, iterations=100_000))
            a = (await c.join("reader", run.run_id)).assignment
            params: dict[str, np.ndarray] = {}
            await c.pull(run.run_id, a.rank, a.incarnation, 0, into=params)
            assert c.route.opened["shm"] == 1 and segments("self") == 1
            zeros = {"w": np.zeros((2000, 2000), np.float32)}
            if published:
                await c.push_pull(run.run_id, a.rank, a.incarnation, 0, zeros, into=params)
                assert segments("self") == 3  # the pull and push streams' segments, the publication

            async def read_forever() -> None:
                clock = 1
                while True:
                    if published:
                        await c.push_pull(run.run_id, a.rank, a.incarnation, clock, zeros, into=params)
                        clock += 1
                    else:
                        await c.pull(run.run_id, a.rank, a.incarnation, 0, into=params)

            reader = asyncio.create_task(read_forever())
            await asyncio.sleep(0.3)
            server.send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(errors.Unavailable):
                await asyncio.wait_for(reader, 15)
            assert time.monotonic() - t0 < 5  # found at once (the socket closes), not after a timeout
            # The broken stream's segment (and publication) are unmapped; an idle pull stream's
            # (published: the push stream broke) goes when it is used next, or the client closes.
            assert segments("self") == (1 if published else 0)
            server.wait(10)
        assert segments("self") == 0
    assert set(os.listdir("/dev/shm")) <= before
