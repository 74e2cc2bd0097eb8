"""Real processes for system tests: a ps-server subprocess, ps-worker subprocesses, following a run."""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from pathlib import Path

import numpy as np

from paramserver.client import PsClient
from paramserver.v1 import paramserver_pb2 as pb
from worker.datasets import load_dataset
from worker.models import build_model
from worker.sampling import BatchSampler, shard_indices

__all__ = ["ENV", "bsp_reference", "watch_until", "connect", "finish", "free_port", "free_ports", "ps_server", "ps_workers", "record"]

ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@contextmanager
def ps_server(*args: str, open_files: tuple[int, int] | None = None) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A ps-server subprocess and its address; ``open_files``: its (soft, hard) RLIMIT_NOFILE."""
    limit = None if open_files is None else functools.partial(resource.setrlimit, resource.RLIMIT_NOFILE, open_files)
    proc = subprocess.Popen([sys.executable, "-m", "ps_server.server", "--log-level", "WARNING", *args],
                            stdout=subprocess.PIPE, text=True, env=ENV, preexec_fn=limit)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on ([\d.]+):(\d+)", line)
        assert match, f"server did not start: {line!r}"
        yield proc, f"{match.group(1)}:{match.group(2)}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def ps_workers(address: str, n: int, *args: str) -> Iterator[list[subprocess.Popen[str]]]:
    procs = [
        subprocess.Popen([sys.executable, "-m", "worker.main", "--server", address, "--once",
                          "--log-level", "WARNING", *args], env=ENV, text=True)
        for _ in range(n)
    ]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@asynccontextmanager
async def connect(address: str) -> AsyncIterator[PsClient]:
    async with PsClient(address, timeout=20) as c:
        yield c


async def finish(client: PsClient, run_id: str, timeout: float = 180) -> pb.Run:
    async with asyncio.timeout(timeout):
        async for snap in client.watch_run(run_id, interval=0.2):
            last = snap.run
    return last


async def watch_until(client: PsClient, run_id: str, done: Callable[[pb.Run], bool], timeout: float = 60.0) -> pb.Run:
    """Follow a run until ``done(run)``; return that snapshot (TimeoutError after ``timeout``)."""
    async with asyncio.timeout(timeout):
        async for snap in client.watch_run(run_id, interval=0.05):
            if done(snap.run):
                return snap.run
    raise AssertionError(f"run {run_id} ended before the condition held")


@contextmanager
def started_with(hup: object) -> Iterator[None]:
    """Children started in here get SIGINT and SIGHUP at their default (a handler set here becomes
    SIG_DFL in the child at exec), or SIGHUP ignored (``hup`` SIG_IGN: as under nohup), whatever
    this test process was started with (a suite in the background ignores SIGINT)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    old_hup = signal.signal(signal.SIGHUP, hup)  # type: ignore[arg-type]
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
        signal.signal(signal.SIGHUP, old_hup)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free now, for servers a test starts. Taken below the kernel's ephemeral
    range when it leaves room: a port the kernel picks comes from that range, where any client's
    connection may take it as its own local port before the server binds it ("Address already in
    use" now and then in a suite that opens thousands of connections)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    with ExitStack() as held:  # held together while picked: distinct
        ports: list[int] = []
        for _ in range(200 * n):
            if len(ports) == n:
                break
            s = held.enter_context(socket.socket())
            try:
                s.bind(("127.0.0.1", random.randrange(10000, low) if low > 11000 else 0))
            except OSError:
                continue  # in use: another
            ports.append(int(s.getsockname()[1]))
        assert len(ports) == n, "no free ports"
        return ports


def segments(pid: int | str = "self") -> int:
    """Shared-memory segments of the data plane's protocol (distinct memfds: the streams' and the
    server's publications) that process ``pid`` maps now (0 when it is gone). Of this process:
    once its garbage is collected (an earlier test's objects, unreachable but not yet freed, may
    still hold a mapping)."""
    if pid == "self":
        gc.collect()
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):  # gone: it maps nothing
        return 0
    return len({line.split()[4] for line in lines if "memfd:paramserver-segment" in line})


def free_port() -> int:
    return free_ports(1)[0]


REPORT = Path(__file__).resolve().parents[1] / "bench" / "out" / "chaos.jsonl"


def record(name: str, **figures: object) -> None:
    """Append the figures a chaos test measured (bench/out/chaos.jsonl, summarised in RESULTS.md)."""
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    with REPORT.open("a") as f:
        f.write(json.dumps({"test": name, "time": time.time(), **figures}) + "\n")


def bsp_reference(spec: pb.RunSpec, init: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a BSP run with plain SGD must end with: each clock, the ranks' gradients on their own
    batches, combined in rank order (mean), applied once, as one process would."""
    workers = spec.num_workers
    data = load_dataset(json.loads(spec.data_spec_json))
    model = build_model(json.loads(spec.model_spec_json), data.n_features, data.n_outputs)
    shards = [shard_indices(len(data.X_train), r, workers, spec.seed) for r in range(workers)]
    samplers = [BatchSampler(len(s), spec.batch_size, spec.seed, r) for r, s in enumerate(shards)]
    params = {k: v.copy() for k, v in init.items()}
    lr = np.float32(spec.optimizer.sgd.learning_rate)
    for clock in range(spec.iterations):
        grads = []
        for r in range(workers):
            idx = shards[r][samplers[r].batch(clock)]
            grads.append(model.loss_and_grad(params, data.X_train[idx], data.y_train[idx])[1])
        for name in params:
            acc = grads[0][name].astype(np.float32).copy()
            for g in grads[1:]:
                acc += g[name]
            acc *= np.float32(1 / workers)
            params[name] -= lr * acc
    return params
