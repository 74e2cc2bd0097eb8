"""The signals of ps-server and ps-worker as processes: SIGTERM, SIGINT and SIGHUP (a terminal
closed) each stop them in order and they exit 0 (the server: NOT_SERVING, final checkpoints; a
worker: its rank given back); a SIGHUP ignored when they started (nohup) stays ignored."""

from __future__ import annotations

import asyncio
import fcntl
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import ENV, connect, ps_server, started_with, watch_until

from client.spec import LaunchOptions, build_run_spec
from paramserver.v1 import paramserver_pb2 as pb

pytestmark = pytest.mark.timeout(120)

STOPS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]


def server(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "ps_server.server", "--port", "0", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    match = re.search(r"listening on (\S+)", proc.stdout.readline())
    assert match, proc.communicate(timeout=10)
    return proc, match.group(1)


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: signal.Signals(s).name)
def test_server_stops_in_order_and_exits_0(sig: signal.Signals) -> None:
    with started_with(lambda *_: None):
        proc, _ = server()
    try:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "shutting down: health NOT_SERVING" in err and err.rstrip().endswith("stopped"), err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_server_started_under_nohup_keeps_running_on_sighup() -> None:
    with started_with(signal.SIG_IGN):
        proc, address = server()
    try:
        proc.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(1.0)

        async def healthy() -> str:
            async with connect(address) as c:
                return await c.health()
        assert asyncio.run(healthy()) == "SERVING"
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: signal.Signals(s).name)
def test_worker_gives_its_rank_back_and_exits_0(sig: signal.Signals) -> None:
    with ps_server() as (_, address):
        async def scenario() -> int:
            async with connect(address) as c:
                run = await c.create_run(build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=1,
                                                                    iterations=1_000_000)))
                with started_with(lambda *_: None):
                    worker = subprocess.Popen([sys.executable, "-m", "worker.main", "--server", address,
                                               "--log-level", "INFO"], env=ENV, stderr=subprocess.PIPE, text=True)
                try:
                    await watch_until(c, run.run_id, lambda r: bool(r.workers) and r.workers[0].clock >= 3)
                    worker.send_signal(sig)
                    _, err = await asyncio.to_thread(worker.communicate, timeout=30)
                    assert f"stopped: gave rank 0 of {run.run_id} back" in err, err
                    left = await c.get_run(run.run_id)
                    assert left.workers[0].state == pb.WORKER_STATE_EVICTED and left.counters.evictions == 0
                    return worker.returncode
                finally:
                    if worker.poll() is None:
                        worker.kill()
                        worker.wait()
        assert asyncio.run(scenario()) == 0


SLOW_START = """
import sys, time
{patch}
def slow(*args, **kwargs):
    print("starting", flush=True)
    time.sleep(60)  # (a server resuming a data directory of many GB)
    raise AssertionError("the stop did not come")
{target} = slow
from {program} import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize(("program", "patch", "target", "args"), [
    # the server: its runs' resume, from its data directory
    ("ps_server.server", "from ps_server.checkpointer import Checkpointer", "Checkpointer.resume",
     ["--port", "0", "--data-dir", "{tmp}"]),
    # the worker: what it does first, before it reads its configuration
    ("worker.main", "import worker.main", "worker.main.tune_malloc", ["--server", "127.0.0.1:1"]),
], ids=["ps-server-resuming", "ps-worker"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: signal.Signals(s).name)
def test_a_stop_while_it_starts_ends_it_at_once_and_cleanly(program: str, patch: str, target: str, args: list[str],
                                                            sig: signal.Signals, tmp_path: Path) -> None:
    """A stop signal while the process starts (the server resuming its runs from its data directory,
    minutes for a large one) ends it at once, exit 0: nothing was served, so nothing is to be
    checkpointed or given back (it was killed, 143, or, as PID 1 in a container, where a signal
    without a handler is ignored, it went on until the grace period's SIGKILL)."""
    code = SLOW_START.format(patch=patch, target=target, program=program)
    with started_with(lambda *_: None):
        proc = subprocess.Popen([sys.executable, "-c", code, *(a.format(tmp=tmp_path) for a in args)], env=ENV,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "starting\n", proc.communicate(timeout=70)
        proc.send_signal(sig)
        started = time.monotonic()
        out, err = proc.communicate(timeout=30)
        assert time.monotonic() - started < 5, err
        assert proc.returncode == 0, err
        assert "stopped while starting" in err and "Traceback" not in err, err
        assert "listening" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if program == "ps_server.server":  # the data directory is free again
        with open(tmp_path / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
