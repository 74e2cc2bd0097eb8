"""docker-compose.yml for real: build the image, a standing cluster, runs submitted from the host.

The flow: build the image; ``up --scale worker=3``: two parameter servers (``ps`` = server 0, with
the published port, and ``ps-1`` = server 1, one cluster) and three workers, which start only once
server 0's gRPC health check passes; ``psctl launch --wait --json`` from the host against the
published port trains an MLP on digits on the three workers (test accuracy >= 0.95), its
parameters held by both servers (``psctl status --json``: the shard map names both, with their
TCP data ports, each held bytes and applied pushes); ``up --scale worker=4``; a second run with four
ranks, one on each worker, again over both servers; ``psctl runs`` and ``psctl export`` (which
reads every server) inside the compose network, in the client service; the dashboard service (its
profile on) lists both runs from the host; a third run, in progress through a ``stop`` (every
container exits 0: SIGTERM reached Python through ``init``) and a ``start`` of the cluster, which
resumes it from the servers' checkpoints; ``stop`` again; ``down -v``, after which no container, network
or volume of the project is left. Every step has a timeout, and the cluster is torn down
(``down -v --remove-orphans``) whatever happens.

Needs a running Docker engine and docker-compose 1.29 or ``docker compose`` v2 (``PS_COMPOSE``
overrides which). ``deploy/ci-docker.sh`` installs and starts them and runs
``pytest -m docker tests/docker``. Without them this test fails: it never skips.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
PSCTL = Path(sys.executable).with_name("psctl")
IMAGE = "paramserver:compose-test"  # its own tag: the test never replaces a user's paramserver:latest
MIN_ACCURACY = 0.95
LAUNCH = ["--model", "mlp:64", "--dataset", "digits", "--staleness", "2"]
SERVERS = ["ps", "ps-1"]  # the compose services of server 0 and server 1
CLUSTER = ["ps:50051", "ps-1:50051"]  # their PS_CLUSTER: addresses in the compose network
DATA_PORT = 50052  # every server's PS_DATA_PORT


def _run(cmd: Sequence[str], *, timeout: float, env: dict[str, str] | None = None, check: bool = True,
         ) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}\n{_tail(exc.stdout)}\n"
                             f"{_tail(exc.stderr)}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {shlex.join(cmd)}\n--- stdout\n{_tail(proc.stdout)}\n"
                             f"--- stderr\n{_tail(proc.stderr)}")
    return proc


def _tail(text: str | bytes | None, lines: int = 60) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-lines:])


def _compose_command() -> list[str]:
    if os.environ.get("PS_COMPOSE"):
        return shlex.split(os.environ["PS_COMPOSE"])
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` (v2) nor docker-compose (v1) is installed: run deploy/ci-docker.sh")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _timestamp(text: str) -> float:
    """Docker's RFC 3339 times with nanoseconds ('2026-01-02T03:04:05.123456789Z' or '+00:00')."""
    text = text.strip().replace("Z", "+00:00")
    head, _, rest = text.partition(".")
    if rest:
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits):]
        text = f"{head}.{digits[:6]}{zone}"
    return datetime.fromisoformat(text).timestamp()


class Cluster:
    """One compose project with a unique name and a free published port."""

    def __init__(self) -> None:
        self.compose_cmd = _compose_command()
        self.project = f"pstest{os.getpid()}{secrets.token_hex(3)}"
        self.port = _free_port()
        self.server = f"127.0.0.1:{self.port}"
        self.dashboard_port = _free_port()
        self.env = {**os.environ, "PS_PUBLISHED_PORT": str(self.port), "PS_PUBLISHED_ADDRESS": "127.0.0.1",
                    "PS_IMAGE": IMAGE, "PS_LOG_LEVEL": "INFO", "COMPOSE_PROFILES": "dashboard",
                    "PS_DASHBOARD_PORT": str(self.dashboard_port)}
        self.durations: dict[str, float] = {}

    def compose(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([*self.compose_cmd, "-p", self.project, *args], timeout=timeout, env=self.env, check=check)

    def timed(self, name: str, start: float) -> None:
        self.durations[name] = round(time.monotonic() - start, 1)

    def containers(self, service: str) -> list[dict[str, Any]]:
        """docker inspect of the service's containers, stopped ones too (not `compose ps`: v2 hides those)."""
        ids = _run(["docker", "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={self.project}",
                    "--filter", f"label=com.docker.compose.service={service}",
                    "--filter", "label=com.docker.compose.oneoff=False"], timeout=30).stdout.split()
        if not ids:
            return []
        return list(json.loads(_run(["docker", "inspect", *ids], timeout=30).stdout))

    def psctl(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return _run([str(PSCTL), *args, "--server", self.server], timeout=timeout, check=False)

    def dashboard_runs(self, timeout: float) -> list[dict[str, Any]]:
        """GET /api/runs of the dashboard service through its published port (once it listens)."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.dashboard_port}/api/runs", timeout=10) as r:
                    return list(json.loads(r.read()))
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the dashboard did not answer in {timeout:.0f}s: {exc}") from None
                time.sleep(1)

    def wait_healthy(self, timeout: float) -> None:
        """Server 0 answers on the published port, and every server's container is healthy."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.psctl("health", timeout=15)
            health = {s: [c["State"].get("Health", {}).get("Status") for c in self.containers(s)] for s in SERVERS}
            if got.returncode == 0 and "SERVING" in got.stdout and all(h == ["healthy"] for h in health.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the servers are not all healthy: {health}; server 0 on {self.server}: "
                                     f"{got.stdout} {got.stderr}")
            time.sleep(1)

    def launch(self, workers: int, timeout: float = 240) -> dict[str, Any]:
        got = self.psctl("launch", "--wait", "--json", *LAUNCH, "--workers", str(workers), timeout=timeout)
        lines = [ln for ln in got.stdout.splitlines() if ln.strip().startswith("{")]
        assert got.returncode == 0 and lines, (
            f"psctl launch exit {got.returncode}\n{_tail(got.stdout)}\n{_tail(got.stderr)}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def status(self, run_id: str) -> dict[str, Any]:
        """``psctl status RUN --json``: the run, its ranks and its shards."""
        got = self.psctl("status", run_id, "--json", timeout=30)
        assert got.returncode == 0, got.stderr
        status: dict[str, Any] = json.loads(got.stdout)
        return status

    def run_workers(self, run_id: str) -> list[dict[str, Any]]:
        """The run's ranks as ``psctl status --json`` shows them."""
        workers: list[dict[str, Any]] = self.status(run_id)["workers"]
        return workers

    def run_hosts(self, run_id: str) -> list[str]:
        """The container hostnames of the run's ranks (worker names are 'hostname:pid')."""
        return sorted(w["worker_name"].rpartition(":")[0] for w in self.run_workers(run_id))

    def assert_held_by_both_servers(self, run_id: str) -> None:
        """The run's shard map names both servers (their compose addresses and TCP data ports), and
        each held a share of its parameters and applied pushes to it."""
        status = self.status(run_id)
        params = status["run"]["spec"]["params"]
        total = sum(4 * math.prod(p["shape"]) for p in params)
        shard_map = status["run"]["shard_map"]["shards"]
        assert [(s["index"], s["address"], s["data_port"]) for s in shard_map] == [
            (i, a, DATA_PORT) for i, a in enumerate(CLUSTER)], shard_map
        assert all(s["pieces"] for s in shard_map), f"a server holds nothing of the run: {shard_map}"
        shards = status["shards"]
        assert [(s["index"], s["address"]) for s in shards] == list(enumerate(CLUSTER)), shards
        for s in shards:
            assert s["reachable"] and s["bytes_held"] > 0 and s["pushes_applied"] > 0, s
        assert sum(s["bytes_held"] for s in shards) == total, (shards, params)

    def wait_run(self, run_id: str, done: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """The run (``psctl status --json``'s) once ``done(run)``; servers not answering yet are waited for."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            got = self.psctl("status", run_id, "--json", timeout=30)
            if got.returncode == 0:
                last = json.loads(got.stdout)["run"]
                if done(last):
                    return dict(last)
            if time.monotonic() > deadline:
                state = (last["state"], last["min_clock"]) if last else got.stderr.strip()
                raise AssertionError(f"run {run_id} not as expected within {timeout:.0f}s: {state}")
            time.sleep(1)

    def assert_all_exited_0(self) -> None:
        """Every container of the servers, the workers and the dashboard exited 0 (a stop's SIGTERM
        handled, within the grace period)."""
        for service in ("ps", "ps-1", "worker", "dashboard"):
            for container in self.containers(service):
                state = container["State"]
                assert state["Status"] == "exited" and state["ExitCode"] == 0, (
                    f"{container['Name']}: {state['Status']} exit {state['ExitCode']} (137 = killed after the "
                    "grace period)")

    def leftovers(self) -> list[str]:
        found = []
        label = f"label=com.docker.compose.project={self.project}"
        for kind, cmd in (("container", ["docker", "ps", "-a", "-q", "--filter", label]),
                          ("network", ["docker", "network", "ls", "-q", "--filter", label]),
                          ("volume", ["docker", "volume", "ls", "-q", "--filter", label]),
                          ("network", ["docker", "network", "ls", "-q", "--filter", f"name={self.project}_"]),
                          ("volume", ["docker", "volume", "ls", "-q", "--filter", f"name={self.project}_"])):
            found += [f"{kind} {x}" for x in _run(cmd, timeout=30).stdout.split()]
        return sorted(set(found))


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    info = subprocess.run(["docker", "info"], capture_output=True, text=True) if shutil.which("docker") else None
    if info is None or info.returncode != 0:
        pytest.fail("no Docker engine answers (`docker info` failed): run deploy/ci-docker.sh, which installs "
                    f"docker.io and docker-compose and starts dockerd\n{info.stderr if info else 'docker: not found'}")
    c = Cluster()
    try:
        yield c
    finally:
        report = getattr(request.node, "rep_call", None)  # set by tests/docker/conftest.py
        if report is None or report.failed:
            logs = c.compose("logs", "--no-color", "--tail", "80", timeout=60, check=False)
            print(f"--- compose logs of {c.project}\n{_tail(logs.stdout, 400)}")
        c.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=180, check=False)
        print(f"durations (s): {json.dumps(c.durations)}")


def test_compose_cluster_trains_scales_and_leaves_nothing(cluster: Cluster) -> None:
    c = cluster
    t0 = time.monotonic()
    assert PSCTL.exists(), f"{PSCTL} is missing: install the project into the venv that runs pytest"
    c.compose("config", "-q", timeout=60)

    # The base image: present, pulled, or built from Debian packages (no registry here).
    start = time.monotonic()
    _run([str(ROOT / "deploy" / "build-base-image.sh")], timeout=400)
    c.timed("base_image", start)

    start = time.monotonic()
    c.compose("build", timeout=400)
    c.timed("build", start)

    # A standing cluster: two servers and three workers; the workers start only after server 0 is healthy.
    start = time.monotonic()
    c.compose("up", "-d", "--scale", "worker=3", timeout=180)
    c.wait_healthy(60)
    c.timed("up_3_workers", start)
    (server,) = c.containers("ps")
    (server1,) = c.containers("ps-1")
    for s in (server, server1):
        assert s["Config"]["User"] in ("10001:10001", "10001"), f"{s['Name']} runs as root"
        assert s["HostConfig"]["Init"] is True
    assert not server1["NetworkSettings"]["Ports"].get("50051/tcp"), "server 1 publishes a port"
    first_healthy = min(_timestamp(h["End"]) for h in server["State"]["Health"]["Log"] if h["ExitCode"] == 0)
    workers = c.containers("worker")
    assert len(workers) == 3
    for w in workers:
        assert _timestamp(w["State"]["StartedAt"]) >= first_healthy - 0.5, (
            f"{w['Name']} started before the server was healthy")
        assert w["HostConfig"]["Init"] is True
        assert not w["NetworkSettings"]["Ports"].get("50051/tcp"), "a worker publishes a port"

    # Run 1: three ranks, one per worker, submitted from the host through the published port.
    start = time.monotonic()
    run1 = c.launch(workers=3)
    c.timed("run_3_workers", start)
    assert run1["state"] == "completed", run1
    assert run1["workers"] == 3
    assert run1["test_accuracy"] is not None and run1["test_accuracy"] >= MIN_ACCURACY, run1
    hosts3 = sorted(w["Config"]["Hostname"] for w in workers)
    assert c.run_hosts(run1["run_id"]) == hosts3
    # They pushed and pulled over the servers' TCP data planes (ps:50052 and ps-1:50052 in the
    # compose network), each server holding its share of the parameters.
    assert [w["data_plane"] for w in c.run_workers(run1["run_id"])] == ["tcp"] * 3
    c.assert_held_by_both_servers(run1["run_id"])

    # Scale to four (the three keep running) and train on all of them.
    start = time.monotonic()
    c.compose("up", "-d", "--scale", "worker=4", "--no-recreate", timeout=180)
    c.timed("scale_to_4", start)
    workers4 = c.containers("worker")
    assert len(workers4) == 4
    assert {w["Id"] for w in workers} <= {w["Id"] for w in workers4}, "scaling recreated the running workers"
    start = time.monotonic()
    run2 = c.launch(workers=4)
    c.timed("run_4_workers", start)
    assert run2["state"] == "completed", run2
    assert run2["workers"] == 4
    assert run2["test_accuracy"] is not None and run2["test_accuracy"] >= MIN_ACCURACY, run2
    assert c.run_hosts(run2["run_id"]) == sorted(w["Config"]["Hostname"] for w in workers4)
    c.assert_held_by_both_servers(run2["run_id"])

    # psctl inside the compose network (the client service, PSCTL_SERVER=ps:50051), where every
    # server's address resolves: the runs, and an export, which reads each server's share.
    start = time.monotonic()
    script = f"psctl runs --json && psctl export {shlex.quote(run1['run_id'])} -o /tmp/run.npz --json"
    got = c.compose("run", "--rm", "client", "sh", "-c", script, timeout=120)
    c.timed("client_run", start)
    runs = json.loads([ln for ln in got.stdout.splitlines() if ln.startswith("[")][-1])
    assert {run1["run_id"], run2["run_id"]} <= {r["run_id"] for r in runs}
    exported = json.loads([ln for ln in got.stdout.splitlines() if ln.startswith("{")][-1])
    shapes = {p["name"]: p["shape"] for p in c.status(run1["run_id"])["run"]["spec"]["params"]}
    assert exported["tensors"] == shapes and exported["run_state"] == "completed", exported

    # The dashboard service (profile "dashboard", on in this test): both runs, from the host.
    start = time.monotonic()
    assert [r["run_id"] for r in c.dashboard_runs(timeout=60)][:2] == [run2["run_id"], run1["run_id"]]
    c.timed("dashboard", start)

    # A run in progress outlives a stop and start of the whole cluster: SIGTERM reaches every process
    # (init: true), the servers write their final checkpoints and every container exits 0 within the
    # grace period; started again, the servers resume the run from their volumes and the workers
    # carry it on.
    start = time.monotonic()
    got = c.psctl("launch", "--json", *LAUNCH, "--workers", "4", "--epochs", "100000", timeout=60)
    assert got.returncode == 0, got.stderr
    run3 = json.loads(got.stdout)["run_id"]
    stopped_at = c.wait_run(run3, lambda r: r["state"] == "running" and r["min_clock"] >= 20, timeout=90)["min_clock"]
    c.compose("stop", timeout=180)
    c.assert_all_exited_0()
    c.compose("start", timeout=180)
    c.wait_healthy(90)
    c.wait_run(run3, lambda r: r["state"] == "running" and r["min_clock"] > stopped_at + 20, timeout=120)
    assert c.psctl("stop", run3, timeout=60).returncode == 0
    c.timed("stop_and_start_mid_run", start)

    # Graceful stop: SIGTERM reaches Python (init: true) and every process exits 0 within the grace period.
    start = time.monotonic()
    c.compose("stop", timeout=180)
    c.timed("stop", start)
    c.assert_all_exited_0()

    start = time.monotonic()
    c.compose("down", "-v", "--remove-orphans", timeout=180)
    c.timed("down", start)
    assert c.leftovers() == []
    c.timed("total", t0)
    cluster_part = c.durations["total"] - c.durations["base_image"] - c.durations["build"]
    assert cluster_part <= 300, f"up, runs, scale and teardown took {cluster_part:.0f}s (budget 300 s): {c.durations}"
