"""The embedded cluster of ``psctl launch --local``: ps-servers (one, or a cluster of
``servers``) and N ps-workers on 127.0.0.1.

Lifecycle (one object, used as a context manager)::

    with LocalCluster(workers=4) as cluster:   # nothing runs yet
        cluster.start_server()                 # the ps-servers on free ports, non-blocking
        cluster.start_workers()                # N workers at once; they retry until it answers
        address = cluster.wait_server(15.0)    # their first stdout lines say they listen
        ...                                    # create the run, follow it; check_server() in between
    # __exit__: SIGTERM workers, then the server; SIGKILL whatever is left; nothing survives

Invariants:

* No child outlives psctl, even one killed by SIGKILL, which runs no teardown: each gets
  ``PS_PARENT_PID`` (``paramserver.runtime.child_env``), and ps-server and ps-worker then have the
  kernel send them SIGTERM when psctl dies (``exit_with_parent``; Linux).
* Every child is a session leader (``start_new_session``) and is signalled through its process
  group, so a Ctrl-C in the terminal reaches psctl only and the teardown stays ordered.
* A child is signalled only while ``Popen.poll()`` says it runs: a pid is never reaped behind our
  back, so a signal cannot hit a recycled pid.
* Teardown ignores SIGINT, SIGTERM and SIGHUP while it runs (a second Ctrl-C cannot abandon children) and is
  bounded: ``grace`` seconds per phase, then SIGKILL. SIGTERM, or SIGHUP (its terminal closed: the children, in
  sessions of their own, get none), to psctl raises ``SystemExit`` so the same
  teardown runs.
* The workers run at a lower CPU priority than the servers (``WORKER_NICE``): on shared cores
  the server, whom every worker waits for, runs as soon as a push comes.
* Children's stderr (and the server's stdout after its first line) go to ``cluster.log`` in a
  fresh temp dir; it is kept when ``keep_log`` is set (by the errors here, which name it, or by
  the caller when the run failed) and removed otherwise. ``verbose`` lets the logs through (and
  the directory, empty then, is always removed).
  Every child gets ``PSCTL_LOCAL_CLUSTER=<that dir>`` in its environment, so stray processes
  are findable, and none gets the settings of another deployment (``NOT_INHERITED``).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from types import FrameType, TracebackType
from typing import IO, Any

from paramserver.runtime import child_env

__all__ = ["CHILD_ENV", "NOT_INHERITED", "LocalCluster", "LocalClusterError"]

CHILD_ENV = {
    # (ps-server and ps-worker tune glibc's allocator themselves: paramserver.runtime.tune_malloc.)
    # Workers are the parallelism: one BLAS thread each.
    "OPENBLAS_NUM_THREADS": "1",
}
WORKER_NICE = 10
"""How much lower the workers' CPU priority is than the servers' (``ps-worker --nice``)."""
NOT_INHERITED = frozenset({
    # where a server is and what it keeps: the local one is on a free port of 127.0.0.1, alone, keeps nothing
    "PS_HOST", "PS_PORT", "PS_DATA_PORT", "PS_METRICS_PORT", "PS_DATA_DIR", "PS_CLUSTER", "PS_INDEX",
    "PS_SERVER", "PS_WORKER_RUN_ID",
    # how it is secured: the local cluster is plaintext without a token (psctl talks to it so)
    "PS_TOKEN", "PS_TOKEN_FILE", "PS_TLS_CERT", "PS_TLS_KEY", "PS_TLS_CLIENT_CA", "PS_INSECURE",
    "PS_WORKER_TOKEN_FILE", "PS_WORKER_TLS_CA", "PS_WORKER_TLS_CERT", "PS_WORKER_TLS_KEY",
    "PS_WORKER_TLS_SERVER_NAME", "PS_WORKER_INSECURE",
})
"""Settings of the environment the children do not get: exported for a standing server (a token,
its cluster, its data directory), they made the local server refuse to start or its workers wait
for another run. Tuning (``PS_WORKER_OVERLAP``, ``PS_MAX_MESSAGE_BYTES``, ...) passes through."""
MARKER_ENV = "PSCTL_LOCAL_CLUSTER"
_LISTENING = re.compile(r"listening on (\S+):(\d+)")


class LocalClusterError(RuntimeError):
    """A local server or worker could not start or died; the message names the log file."""


class LocalCluster:
    """A ps-server and ``workers`` ps-worker processes; see the module docstring."""

    def __init__(self, workers: int, *, servers: int = 1, verbose: bool = False, grace: float = 5.0) -> None:
        self.workers = workers
        self.servers = servers
        self.verbose = verbose
        self.grace = grace
        self.log_dir = tempfile.mkdtemp(prefix="psctl-local-")
        self.log_path = os.path.join(self.log_dir, "cluster.log")
        self.where = "its output is above" if verbose else f"log: {self.log_path}"
        """Where the children's output went, for error messages."""
        self.address = ""
        self.keep_log = False
        self._log: IO[bytes] | None = None
        self.addresses: list[str] = []
        """Every server's HOST:PORT; server 0 (``address``) owns the runs of a cluster."""
        self._servers: list[subprocess.Popen[bytes]] = []
        self._workers: list[subprocess.Popen[bytes]] = []
        self._closed = False
        self._old_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------------------ start
    def _env(self) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
        return child_env({**inherited, **CHILD_ENV, MARKER_ENV: self.log_dir})

    def _spawn(self, args: list[str], stdout: int | None = None) -> subprocess.Popen[bytes]:
        if self._log is None and not self.verbose:
            self._log = open(self.log_path, "ab")  # closed in close(); shared by every child
        return subprocess.Popen(
            [sys.executable, *args], stdin=subprocess.DEVNULL, stdout=stdout if stdout is not None else self._log,
            stderr=None if self.verbose else self._log, env=self._env(), start_new_session=True,
        )

    def start_server(self) -> None:
        """Start the ``ps-server``s on free ports of 127.0.0.1 without waiting for them.

        The ports are chosen here (not ``--port 0``) so that workers can start at the same time
        as the servers: they retry until one answers. Their start-up (imports, data) then overlaps
        the servers' instead of following it. Several servers are a cluster (``--cluster``).
        """
        ports = []
        for _ in range(self.servers):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                ports.append(probe.getsockname()[1])
        self.addresses = [f"127.0.0.1:{p}" for p in ports]
        self.address = self.addresses[0]
        cluster = ["--cluster", ",".join(self.addresses)] if self.servers > 1 else []
        for i, port in enumerate(ports):
            self._servers.append(self._spawn(
                ["-m", "ps_server.server", "--host", "127.0.0.1", "--port", str(port), "--grace-seconds", "1",
                 *cluster, *(["--index", str(i)] if cluster else [])],
                stdout=subprocess.PIPE,
            ))

    def wait_server(self, timeout: float) -> str:
        """Read each server's first stdout line (bounded by ``timeout``); return server 0's HOST:PORT."""
        deadline = time.monotonic() + timeout
        for i, server in enumerate(self._servers):
            assert server.stdout is not None
            line = _read_line(server.stdout, max(0.1, deadline - time.monotonic()))
            match = _LISTENING.search(line)
            if not match:
                self.keep_log = True
                if time.monotonic() < deadline:  # its output ended: it is exiting (a start-up error)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        server.wait(3.0)  # its pipe closes a moment before it can be reaped
                code = server.poll()
                why = _ended(code) if code is not None else f"did not report its port within {timeout:.0f}s"
                raise LocalClusterError(f"the local ps-server{f' {i}' * (self.servers > 1)} {why} (first output "
                                        f"{line.strip()!r}); {self.where}")
            sink = self._log if self._log is not None else sys.stderr.buffer
            threading.Thread(target=_drain, args=(server.stdout, sink), daemon=True).start()
        return self.address

    def start_workers(self) -> None:
        """Start all workers at once; each joins the run, trains it and exits (``--once``)."""
        for i in range(self.workers):  # spread over the servers: any of a cluster's takes them
            self._workers.append(self._spawn([
                "-m", "worker.main", "--server", self.addresses[i % len(self.addresses)], "--once",
                "--log-level", "WARNING",
                "--name", f"local-{i}",
                # Short parked joins: a worker only checks for SIGTERM between two joins.
                "--join-wait-seconds", "1",
                # The server first when they share the cores: every worker waits for it, each worker
                # only holds up itself (bench/RESULTS.md: more pushes per second, ranks closer).
                "--nice", str(WORKER_NICE),
            ]))

    def check_server(self, wait: float = 0.0) -> None:
        """Raise LocalClusterError if a server process has exited (or exits within ``wait`` s)."""
        for i, server in enumerate(self._servers):
            if wait > 0:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.wait(wait)  # its sockets close a moment before it can be reaped
            if (code := server.poll()) is not None:
                self.keep_log = True
                raise LocalClusterError(f"the local ps-server{f' {i}' * (self.servers > 1)} {_ended(code)}; "
                                        f"{self.where}")

    def check_workers(self) -> None:
        """Raise LocalClusterError if a worker exited with an error."""
        for i, w in enumerate(self._workers):
            if (code := w.poll()) not in (None, 0):
                self.keep_log = True
                raise LocalClusterError(f"local worker {i} {_ended(code)}; {self.where}")

    # ------------------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Stop every child (idempotent): SIGTERM workers, then the server, then SIGKILL leftovers."""
        if self._closed:
            return
        self._closed = True
        main = threading.current_thread() is threading.main_thread()
        shielded = (signal.SIGINT, *_EXITS)
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in shielded} if main else {}
        try:
            _terminate(self._workers, self.grace)
            _terminate(self._servers, self.grace)
        finally:
            for server in self._servers:
                if server.stdout is not None:
                    server.stdout.close()
            if self._log is not None:
                self._log.close()
            if not self.keep_log or self.verbose:  # (verbose: the output went to the terminal, none here)
                shutil.rmtree(self.log_dir, ignore_errors=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def __enter__(self) -> LocalCluster:
        if threading.current_thread() is threading.main_thread():
            # (one ignored stays so: nohup psctl ... keeps running when its terminal closes)
            self._old_handlers = {sig: signal.signal(sig, _raise_exit) for sig in _EXITS
                                  if signal.getsignal(sig) is not signal.SIG_IGN}
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.close()
        finally:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)


def _ended(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


_EXITS = (signal.SIGTERM, signal.SIGHUP)
"""Signals that end psctl through the teardown (``SystemExit``), not at once."""


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:  # still ours: not reaped, so its pid (and group) cannot be recycled
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.0, deadline - time.monotonic()))


def _terminate(procs: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM, wait up to ``grace``, SIGKILL the rest, reap them all."""
    for p in procs:
        _signal(p, signal.SIGTERM)
    _wait_all(procs, grace)
    for p in procs:
        _signal(p, signal.SIGKILL)
    _wait_all(procs, 5.0)


def _read_line(pipe: IO[bytes], timeout: float) -> str:
    """Read up to a newline from ``pipe`` without blocking past ``timeout``; '' on EOF or timeout."""
    fd, buf = pipe.fileno(), b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace")


def _drain(pipe: IO[bytes], log: IO[bytes] | None) -> None:
    """Copy the server's later stdout to the log (or drop it) so its pipe never fills."""
    with contextlib.suppress(OSError, ValueError):
        for line in iter(pipe.readline, b""):
            if log is not None and not log.closed:
                log.write(line)
                log.flush()
