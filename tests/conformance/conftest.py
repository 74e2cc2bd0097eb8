"""Harness of the worker conformance suite: real ps-server and worker processes of any language.

Every test takes the ``impl`` fixture, parameterised over the worker implementations in
``IMPLEMENTATIONS`` (the Python worker and the Node worker), and checks the contract from the
server's side: run state, counters, per-rank records, clock records, events.

Topologies: a test that takes the ``topology`` fixture runs against one ps-server and against a
cluster of two (``--cluster``, ``--index``, a ``--split-bytes`` of 1 KiB so that every tensor
over 1 KiB is split by rows over both): ``with topology.start(...) as srv`` starts it, and
workers and the test's client use ``srv.address``, on a cluster the last server's (it forwards
Join, Heartbeat, ReportMetrics, Leave and the run calls to server 0: "any server"). A test that
does not take ``topology`` says why it runs on one server only with ``@pytest.mark.one_server(
"reason")``; collection fails for a test that starts workers and does neither.

The Node worker needs ``node`` and its packages: when ``worker/node/node_modules`` is missing the
session runs ``npm ci`` there once (no skipping: a missing ``node`` fails the Node cases). Workers
that are not Python read datasets exported by ``python -m worker.export_shard``; the session
exports the datasets the suite uses into a temporary directory and passes ``--data-dir``.

To add an implementation, add a ``WorkerImpl`` to ``IMPLEMENTATIONS``: its command line must accept
``--server HOST:PORT``, ``--once``, ``--log-level``, ``--join-wait-seconds``, ``--timeout-seconds``,
``--no-data-plane``, ``--max-message-bytes``, ``--tls-ca``/``--tls-cert``/``--tls-key``, ``--data-dir``
(when ``needs_data_dir``) and read ``PS_TOKEN`` (see worker/node/README.md: its flag table says which
flags the suite passes, and "How to write a worker in any language").
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from procs import free_ports

from client.spec import LaunchOptions, build_run_spec
from paramserver.client import PsClient
from paramserver.security import Security
from paramserver.shards import pull_run
from paramserver.v1 import paramserver_pb2 as pb
from worker.datasets import parse_dataset
from worker.export_shard import export

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "worker" / "node"
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
DATASETS = ("digits",)
"""Datasets the suite's runs use (exported once per session for non-Python workers)."""


@dataclass(frozen=True)
class WorkerImpl:
    name: str
    argv: tuple[str, ...]
    needs_data_dir: bool
    name_prefix: str
    """What the implementation's default worker_name starts with (e.g. "node:")."""


IMPLEMENTATIONS = {
    "python": WorkerImpl("python", (sys.executable, "-m", "worker.main"), False, ""),
    "node": WorkerImpl("node", ("node", str(NODE_DIR / "src" / "main.js")), True, "node:"),
}


# ------------------------------------------------------------------------------ processes
@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {self.proc.pid} did not exit within {timeout}s:\n{self.tail()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@dataclass
class Impl:
    """One worker implementation, ready to start (its data exported, its packages installed)."""

    spec: WorkerImpl
    data_dir: Path | None
    log_dir: Path
    started: list[Worker] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    def command(self, server: str, *args: str, once: bool = True) -> list[str]:
        cmd = [*self.spec.argv, "--server", server, "--log-level", "INFO", *args]
        if once:
            cmd.append("--once")
        if self.spec.needs_data_dir:
            assert self.data_dir is not None
            cmd += ["--data-dir", str(self.data_dir)]
        return cmd

    def start(self, server: str, *args: str, once: bool = True, env: dict[str, str] | None = None) -> Worker:
        log = self.log_dir / f"{self.name}-{len(self.started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(self.command(server, *args, once=once), cwd=ROOT, env={**ENV, **(env or {})},
                                    stdout=out, stderr=subprocess.STDOUT)
        w = Worker(proc, log)
        self.started.append(w)
        return w

    def start_many(self, server: str, n: int, *args: str, once: bool = True) -> list[Worker]:
        return [self.start(server, *args, once=once) for _ in range(n)]

    def logs(self) -> str:
        return "\n".join(f"--- {w.log.name} (exit {w.proc.poll()})\n{w.tail()}" for w in self.started)


@pytest.fixture(scope="session")
def node_ready() -> None:
    """``node`` is installed and worker/node's packages are in place (``npm ci`` once if not)."""
    if shutil.which("node") is None:
        pytest.fail("`node` is not installed; the Node worker is part of this suite (install Node >= 18)")
    if (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("`npm` is not installed: needed once to run `npm ci` in worker/node")
    with (Path(tempfile.gettempdir()) / "paramserver-npm-ci.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel sessions: one installs, the others wait
        if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
            done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True,
                                  text=True, timeout=300)
            if done.returncode != 0:
                pytest.fail(f"npm ci in worker/node failed:\n{done.stdout}\n{done.stderr}")


@pytest.fixture(scope="session")
def exported_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DATASETS exported for non-Python workers (worker/export_shard.py)."""
    out = tmp_path_factory.mktemp("ps-data")
    for text in DATASETS:
        export(parse_dataset(text), out)
    return out


@pytest.fixture(params=sorted(IMPLEMENTATIONS), ids=lambda name: f"{name}-worker")
def impl(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Impl]:
    spec = IMPLEMENTATIONS[request.param]
    data_dir = None
    if spec.name == "node":
        request.getfixturevalue("node_ready")
    if spec.needs_data_dir:
        data_dir = request.getfixturevalue("exported_data")
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    it = Impl(spec, data_dir, log_dir)
    try:
        yield it
    finally:
        for w in it.started:
            w.stop()


@dataclass
class Server:
    proc: subprocess.Popen[str]
    address: str

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


@contextlib.contextmanager
def ps_server(*args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """A ps-server subprocess (``--port 0`` unless a port is given); terminated at exit."""
    with ps_servers([args], env=env) as (srv,):
        yield srv


@contextlib.contextmanager
def ps_servers(argv: Sequence[Sequence[str]], env: dict[str, str] | None = None) -> Iterator[list[Server]]:
    """A ps-server subprocess for each arguments in ``argv``, all started at once (``--port 0``
    unless a port is given), listening when this yields; all terminated at exit."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for args in argv:
            if "--port" not in args:
                args = ("--port", "0", *args)
            procs.append(subprocess.Popen([sys.executable, "-m", "ps_server.server", "--log-level", "WARNING", *args],
                                          stdout=subprocess.PIPE, text=True, env={**ENV, **(env or {})}, cwd=ROOT))
        servers = []
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = re.search(r"listening on ([\d.]+):(\d+)", line)
            assert match, f"server did not start: {line!r}"
            servers.append(Server(proc, f"{match.group(1)}:{match.group(2)}"))
        yield servers
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Cluster:
    """The servers a test started: one alone, or a cluster's in index order (server 0 first)."""

    servers: list[Server]
    argv: list[tuple[str, ...]] = field(default_factory=list)
    """Each server's arguments, for ``start_again``."""
    env: dict[str, str] | None = None

    def start_again(self, index: int) -> contextlib.AbstractContextManager[Server]:
        """Server ``index`` again, with the same arguments (same port, cluster, data dir), after
        the test killed it; it takes that server's place in ``servers``."""
        @contextlib.contextmanager
        def again() -> Iterator[Server]:
            with ps_server(*self.argv[index], env=self.env) as srv:
                self.servers[index] = srv
                yield srv

        return again()

    @property
    def address(self) -> str:
        """Where workers and the test's client go: the one server, or a cluster's last one, which
        forwards control RPCs to server 0 (a worker may join through any server)."""
        return self.servers[-1].address

    @property
    def sharded(self) -> bool:
        return len(self.servers) > 1




SPLIT_BYTES = 1024
"""A cluster's ``--split-bytes`` in this suite (the least the server takes): every tensor over
1 KiB is split by rows over the servers, e.g. digits' ``softmax.weight`` (64 x 10, 2.5 KiB)."""


@contextlib.contextmanager
def ps_cluster(n: int, *args: str, ports: Sequence[int] = (), addresses: Sequence[str] = (),
               per_server: Callable[[int], Sequence[str]] = lambda i: (),
               env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """``n`` ps-servers holding runs together (``--cluster``, ``--index``, ``--split-bytes``), started
    at once, or one alone (n = 1), each with ``args`` and ``per_server(index)``; on ``ports`` if given (a
    restart on the same addresses), else free ones. ``addresses``: the ``--cluster`` list, when
    a server is to be reached elsewhere than where it listens (127.0.0.1 and its port), e.g. a
    proxy in front of it on another loopback address and the same port. All are terminated at exit."""
    if n == 1:
        argv = [(*(("--port", str(ports[0])) if ports else ()), *args, *per_server(0))]
    else:
        ports = list(ports) or free_ports(n)
        cluster = ",".join(addresses or [f"127.0.0.1:{p}" for p in ports])
        argv = [("--port", str(port), "--cluster", cluster, "--index", str(i), "--split-bytes", str(SPLIT_BYTES),
                 *args, *per_server(i)) for i, port in enumerate(ports)]
    with ps_servers(argv, env=env) as servers:
        yield Cluster(servers, argv, env)


@dataclass(frozen=True)
class Topology:
    """One server, or a cluster of ``servers``, for ``topology.start(...)`` (see ``ps_cluster``)."""

    name: str
    servers: int

    @property
    def sharded(self) -> bool:
        return self.servers > 1

    def start(self, *args: str, ports: Sequence[int] = (), addresses: Sequence[str] = (),
              per_server: Callable[[int], Sequence[str]] = lambda i: (),
              env: dict[str, str] | None = None) -> contextlib.AbstractContextManager[Cluster]:
        return ps_cluster(self.servers, *args, ports=ports, addresses=addresses, per_server=per_server, env=env)

    def ports(self) -> list[int]:
        """Free ports for every server, for a test that restarts them on the same addresses."""
        return free_ports(self.servers)


TOPOLOGIES = {"one-server": Topology("one-server", 1), "two-shards": Topology("two-shards", 2)}


@pytest.fixture(params=list(TOPOLOGIES), ids=list(TOPOLOGIES))
def topology(request: pytest.FixtureRequest) -> Topology:
    return TOPOLOGIES[request.param]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "one_server(reason): a conformance test that runs on one ps-server only, "
                                       "not on a cluster, and why")


WORKER_FIXTURES = {"impl", "node_impl", "python_impl"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every conformance test that starts workers runs on both topologies or says why not."""
    here = Path(__file__).parent
    for item in items:
        if here not in item.path.parents or not WORKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            continue
        mark = item.get_closest_marker("one_server")
        has_topology = "topology" in getattr(item, "fixturenames", ())
        if has_topology and mark is not None:
            raise pytest.UsageError(f"{item.nodeid}: runs on both topologies, yet is marked one_server")
        if not has_topology and (mark is None or not (mark.args or mark.kwargs.get("reason"))):
            raise pytest.UsageError(f"{item.nodeid}: take the `topology` fixture (one server and a 2-server "
                                    "cluster), or say why not with @pytest.mark.one_server(\"reason\")")


async def pull_all(client: PsClient, run_id: str) -> dict[str, np.ndarray]:
    """A run's whole current parameters (an observer's read): from its one server, or its pieces
    from every server of a cluster, put together."""
    return (await pull_run(client, run_id)).tensors


def split_tensors(run: pb.Run) -> dict[str, list[tuple[int, int, int]]]:
    """The tensors a run's shard map splits over several servers: name -> [(index, row_start, row_end)]."""
    where: dict[str, list[tuple[int, int, int]]] = {}
    for shard in run.shard_map.shards:
        for pc in shard.pieces:
            where.setdefault(pc.name, []).append((shard.index, pc.row_start, pc.row_end))
    return {name: sorted(pieces) for name, pieces in where.items() if len(pieces) > 1}


@contextlib.asynccontextmanager
async def connect(address: str, security: Security | None = None) -> AsyncIterator[PsClient]:
    async with PsClient(address, timeout=20, security=security) as c:
        yield c




# ------------------------------------------------------------------------------ runs
def run_spec(**options: object) -> pb.RunSpec:
    """A run spec the way psctl builds it (digits, batch 32, SGD lr 0.1 unless overridden)."""
    defaults: dict[str, object] = {"model": "softmax", "dataset": "digits", "workers": 1, "staleness": 2,
                                   "iterations": 30}
    return build_run_spec(LaunchOptions(**{**defaults, **options}))  # type: ignore[arg-type]


async def wait_until(client: PsClient, run_id: str, pred: Callable[[pb.Run], bool], timeout: float,
                     what: str = "", logs: Callable[[], str] = lambda: "") -> pb.Run:
    """Poll GetRun until ``pred(run)``; fail with the run and the workers' logs after ``timeout``."""
    run = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                run = await client.get_run(run_id)
                if pred(run):
                    return run
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what or 'a condition'}; run:\n{run}\n"
                             f"worker logs:\n{logs()}") from None


async def finish(client: PsClient, run_id: str, timeout: float = 60, logs: Callable[[], str] = lambda: "") -> pb.Run:
    """Wait until the run is finished (completed, stopped or failed)."""
    finished = (pb.RUN_STATE_COMPLETED, pb.RUN_STATE_STOPPED, pb.RUN_STATE_FAILED)
    return await wait_until(client, run_id, lambda r: r.state in finished, timeout, "the run to finish", logs)
