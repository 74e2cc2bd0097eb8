"""Build the server in one function, run it in another (console script ``ps-server``).

``start_server(config)`` wires the pieces: the core (``core.registry``), the transport-neutral
control and data planes, their transports (gRPC with health and reflection, the TCP data plane),
checkpoints and metrics; binds (port 0 picks a free port, as the tests do) and starts the lease
and retention sweep (``sweep``). ``serve`` adds the ordered shutdown on SIGTERM/SIGINT/SIGHUP:
health NOT_SERVING, parked pulls and joins released with UNAVAILABLE, operations in progress given the grace period, then
``server.stop``, the deletions under way let end (``PsServer.background``) and the final
checkpoints; exit 0.
"""

from __future__ import annotations

import os

# One BLAS thread: the server is one event loop, and its BLAS calls (the finite check's dot) are
# short; OpenBLAS's extra threads would spin on the cores the workers need.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import asyncio  # noqa: E402
import contextlib
import fcntl
import ipaddress
import json
import logging
import resource
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client.exposition import ThreadingWSGIServer

from paramserver.runtime import StoppedEarly, exit_with_parent, on_stop_signals, raise_fd_limit, stop_early, tune_malloc
from paramserver.v1 import shm

from .background import Background
from .checkpointer import Checkpointer
from .cluster.deletions import Undelivered
from .cluster.owner import ClusterOwner
from .cluster.peers import PeerLink, forward
from .cluster.shards import ShardService
from .config import ServerConfig, parse_config, snapshot_budget, total_budget
from .control import Control
from .core.checkpoint import CheckpointStore
from .core.errors import NotFound, ShuttingDown
from .core.registry import RunRegistry
from .core.spec import Limits
from .core.status import RunState
from .dataplane import DataPlane
from .metrics import ServerStatistics, close_metrics, serve_metrics
from .security import ConfigError, TokenInterceptor, load_token, server_credentials
from .servicer import SERVICE_NAMES, add_cluster, add_control, add_data
from .shm_plane import ShmDataPlane
from .snapshot_budget import SnapshotBudget
from .sweep import servers_of, sweep
from .tcp_plane import StreamBudget, TcpDataPlane, stream_cap

__all__ = ["PsServer", "main", "serve", "start_server"]

log = logging.getLogger("ps_server")

BACKGROUND_END_SECONDS = 2.0
"""How long a stopping server lets the work its callers left end (``PsServer._settle_background``):
with no other server to wait for, what is left is writing down a deletion not delivered, or a
checkpoint directory being removed."""


@dataclass
class PsServer:
    server: grpc.aio.Server
    port: int
    registry: RunRegistry
    config: ServerConfig
    health: health.aio.HealthServicer
    dataplane: DataPlane
    checkpointer: Checkpointer | None = None
    data_plane: TcpDataPlane | None = None
    """The TCP data plane, when the server offers one."""
    shm_plane: ShmDataPlane | None = None
    """The shared-memory data plane, when the server offers one."""
    metrics_port: int | None = None
    metrics: ThreadingWSGIServer | None = None
    """The /metrics endpoint, when it is served (closed last by ``stop``)."""
    health_server: grpc.aio.Server | None = None
    """The plaintext health service on ``health_port`` (--health-port), when it is served."""
    health_port: int | None = None
    cluster: ClusterOwner | None = None
    """Server 0 of a cluster: its side of the cluster."""
    peers: list[PeerLink] = field(default_factory=list)
    """In a cluster, the links to the other servers."""
    data_lock: IO[str] | None = None
    """Held open while the server uses its --data-dir (``_lock_data_dir``)."""
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    background: Background = field(default_factory=Background)
    """What goes on after its caller: the sweep's (evictions told to the other servers, forgotten runs
    deleted), DeleteRun's deletions and those of a cancelled CreateRun's shards."""

    def statistics(self) -> ServerStatistics:
        tcp = self.data_plane.statistics() if self.data_plane else None
        shm = self.shm_plane.statistics() if self.shm_plane else None
        return ServerStatistics(self.dataplane.statistics().push_slot_lends,
                                tcp.connections if tcp else None, tcp.open if tcp else None,
                                shm.connections if shm else None, shm.open if shm else None)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Ordered shutdown: NOT_SERVING, release parked waiters, stop with grace, final checkpoints.

        The final checkpoints come after the last RPC, so they hold every acknowledged push.
        """
        await self.health.enter_graceful_shutdown()
        # Long-lived data streams take no new operations; parked pulls and joins are released.
        self.registry.shut_down(ShuttingDown("the server is shutting down; retry against its replacement"))
        for task in self._tasks:
            task.cancel()
        # Operations in progress get the grace period; idle long-lived data streams do not
        # (they would hold grpc's stop(grace) for its whole length).
        grace = self.config.grace_seconds if grace is None else grace
        if grace > 0:
            await self.dataplane.drain(grace)
        if self.data_plane:
            await self.data_plane.close()
        if self.shm_plane:
            await self.shm_plane.close()
        await self.server.stop(min(grace, 0.5))
        if self.health_server is not None:
            await self.health_server.stop(0)
        for peer in self.peers:
            await peer.close()
        await self._settle_background()
        try:
            await self._last_checkpoints()
        finally:
            if self.data_lock is not None:
                self.data_lock.close()
                self.data_lock = None
            if self.metrics is not None:
                await close_metrics(self.metrics)
                self.metrics = None

    async def _settle_background(self) -> None:
        """Let what goes on after its caller (``background``: the sweep's tasks, DeleteRun's and a
        cancelled CreateRun's deletions) end, now that no other server is waited for (closing a link
        ends its calls): a deletion a server was not told of is written down for the next start to
        tell it (cut short with the event loop, it was lost: that server kept its shard of a run
        nobody knew). What is still under way after ``BACKGROUND_END_SECONDS`` is cancelled."""
        await self.background.settle(BACKGROUND_END_SECONDS)

    async def _last_checkpoints(self) -> None:
        """Every unfinished run's (and an ended one's whose last checkpoint could not be written),
        after the last RPC; one that fails does not keep the others' from being written (the first
        failure is raised after them)."""
        if not self.checkpointer:
            return
        await self.checkpointer.drain()
        failed: list[Exception] = []
        for run in self.registry.runs():
            if not run.state.finished or run.run_id in self.checkpointer.behind:
                try:
                    await self.checkpointer.checkpoint_now(run, "shutdown", final=True)
                except NotFound:  # deleted meanwhile (a DeleteRun under way): nothing to keep
                    continue
                except Exception as exc:
                    log.error("the last checkpoint of %s could not be written: %s", run.run_id, exc,
                              extra={"run": run.run_id})
                    failed.append(exc)
        if failed:
            raise failed[0]


def _cannot_listen(host: str, port: int) -> str | None:
    """Why ``host``:``port`` cannot be listened on, or None."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            probe.bind(addr)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _data_dir(path: str) -> Path:
    """The checkpoint directory, created if missing; ConfigError unless it is a directory we may write."""
    root = Path(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"--data-dir {path}: not a directory; give a directory for checkpoints (created if "
                          "missing)") from None
    except OSError as exc:
        raise ConfigError(f"--data-dir {path}: cannot create it ({exc.strerror}); give a directory this user "
                          "may write") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(f"--data-dir {path}: this user may not write there; give a directory it may write")
    return root


def _lock_data_dir(root: Path, path: str) -> IO[str]:
    """The lock (``flock`` of ``<root>/.lock``, released when the file closes or the process ends)
    that keeps a second server off this data directory: two would resume the same runs, overwrite
    each other's checkpoints and delete each other's writes in progress. ConfigError if held."""
    try:
        lock = open(root / ".lock", "a+")  # noqa: SIM115 (held open for the server's life)
    except OSError as exc:
        raise ConfigError(f"--data-dir {path}: cannot open its lock file .lock ({exc.strerror}); give a directory "
                          "this user may write") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise ConfigError(f"--data-dir {path} is in use by another ps-server (pid {holder}): give each server a "
                          "directory of its own") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


async def start_server(config: ServerConfig, resumed: Callable[[], object] = lambda: None) -> PsServer:
    """The server, listening. ``resumed()`` is called once its runs are resumed from --data-dir
    (minutes for a large one, the event loop blocked), before it serves any (``serve`` has the
    ordered stop take over from ``stop_early`` there)."""
    if not config.data_dir:
        return await _start(config, None, None, resumed)
    root = _data_dir(config.data_dir)
    data_lock = _lock_data_dir(root, config.data_dir)
    try:
        copies = SnapshotBudget(snapshot_budget(config, total_budget(config)[0]))
        return await _start(config, Checkpointer(CheckpointStore(root, keep=config.checkpoint_keep),
                                                 config.checkpoint_every, copies), data_lock, resumed)
    except BaseException:  # (a port in use, or a stop while resuming: the data directory is free again)
        data_lock.close()
        raise


async def _start(config: ServerConfig, checkpointer: Checkpointer | None, data_lock: IO[str] | None,
                 on_resumed: Callable[[], object]) -> PsServer:
    total, source = total_budget(config)
    registry = RunRegistry(max_param_bytes=config.max_param_bytes, max_total_bytes=total,
                           limits=Limits(max_workers=config.max_workers, max_runs=config.max_runs),
                           configure=checkpointer.attach if checkpointer else None)
    restored = checkpointer.resume() if checkpointer else []
    for run in restored:
        servers = servers_of(run)
        if servers != max(1, len(config.peers)) and not run.state.finished:
            # (before it is registered: not checkpointed failed, so the right cluster resumes it as it was)
            run.stop(f"the run was placed over {servers} server(s) and this cluster has {max(1, len(config.peers))}: "
                     "restart the servers with the --cluster list it was created on to resume it", RunState.FAILED)
    resumed = [registry.add(run) for run in restored]
    if total and (held := registry.held_bytes()) > total:  # (resumed all the same: they were accepted)
        log.warning("the runs resumed hold %d MiB, over the %d MiB runs may hold together (%s): no run is created "
                    "until some are deleted (psctl delete)", held >> 20, total >> 20, source)
    on_resumed()
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
        # Workers ping every 2 s to detect partitions (paramserver.grpc_transport.channel_options): allow it.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 0),
    ]
    credentials = server_credentials(config)
    token = load_token(config)
    server = grpc.aio.server(options=options, interceptors=[TokenInterceptor(token)] if token else [])
    dataplane = DataPlane(registry, max_wait=config.max_wait_seconds, chunk_bytes=config.chunk_bytes,
                          max_message_bytes=config.max_message_bytes, push_slots=config.push_slots)
    budget = StreamBudget(stream_cap(resource.getrlimit(resource.RLIMIT_NOFILE)[0]))  # both planes' streams
    tcp_plane = None
    if config.data_port >= 0 and not credentials and not token:  # the framing carries neither
        tcp_plane = TcpDataPlane(dataplane, config.max_message_bytes, lambda: registry.shutting_down,
                                 config.stall_seconds, budget)
    shm_plane = None
    if config.shm and not credentials and not token and shm.available():
        shm_plane = ShmDataPlane(dataplane, config.max_message_bytes, lambda: registry.shutting_down,
                                 config.stall_seconds, 4 * config.max_param_bytes + (256 << 20), budget)
    data_port = lambda: tcp_plane.port if tcp_plane else 0  # noqa: E731 (it changes when the plane cannot start)
    shm_socket = lambda: shm_plane.name if shm_plane else ""  # noqa: E731
    addresses = config.peers
    peers = [PeerLink(i, a, config, token) for i, a in enumerate(addresses) if i != config.index]
    cluster = None
    background = Background()  # (deletions a caller left: the stop lets them end)
    if addresses and config.index:  # a shard of every run; membership is server 0's, which the rest goes to
        forward(server, next(p for p in peers if p.index == 0))
    else:
        if addresses:
            cluster = ClusterOwner(registry, addresses, peers, split_bytes=config.split_bytes,
                                   shard_timeout=config.shard_timeout, data_port=data_port, shm_socket=shm_socket,
                                   checkpointer=checkpointer, undelivered=Undelivered(checkpointer.store.root
                                                                                      if checkpointer else None),
                                   lease=config.lease_seconds, background=background)
            cluster.recovery.resumed([run for run in resumed if run.held])
        add_control(server, Control(registry, max_wait=config.max_wait_seconds, lease_seconds=config.lease_seconds,
                                    heartbeat_seconds=config.heartbeat_seconds, checkpointer=checkpointer,
                                    data_port=data_port, shm_socket=shm_socket, cluster=cluster,
                                    background=background))
    if addresses:
        add_cluster(server, ShardService(registry, addresses, config.index, data_port, checkpointer, shm_socket))
    add_data(server, dataplane)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    why = _cannot_listen(config.host, config.port)  # gRPC would only log the reason
    try:
        port = 0 if why else \
            server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # its "Failed to bind"
        port = 0
    if port == 0:
        await server.stop(None)
        raise OSError(f"--port {config.port}: cannot listen on {address} ({why or 'in use'}); choose another port "
                      f"(0: a free one) or --host")
    if tcp_plane is not None:
        try:
            await tcp_plane.start(config.host, config.data_port)
        except OSError as exc:
            if config.data_port:  # asked for: its absence is an error
                await server.stop(None)
                raise OSError(f"--data-port {config.data_port}: {exc}; choose another port (0: a free one, "
                              "-1: none)") from None
            log.warning("%s; pushes and pulls go over gRPC only", exc)
            tcp_plane = None
    if shm_plane is not None:
        try:
            shm_plane.listen()
        except OSError as exc:
            log.warning("no shared-memory data plane (%s); workers on this host use TCP", exc)
            shm_plane = None
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    ps = PsServer(server, port, registry, config, health_servicer, dataplane, checkpointer, tcp_plane,
                  cluster=cluster, peers=peers, shm_plane=shm_plane, data_lock=data_lock, background=background)
    if config.health_port >= 0:
        # The same statuses (NOT_SERVING as the stop begins), nothing else, no TLS and no token: what
        # a probe that speaks no TLS can ask, and all it learns.
        ps.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, ps.health_server)
        why = _cannot_listen(config.host, config.health_port)
        try:
            ps.health_port = 0 if why else ps.health_server.add_insecure_port(f"{config.host}:{config.health_port}")
        except RuntimeError:
            ps.health_port = 0
        if not ps.health_port:
            await ps.stop(0)
            raise OSError(f"--health-port {config.health_port}: cannot listen on {config.host}:{config.health_port} "
                          f"({why or 'in use'}); choose another port (0: a free one, -1: none)")
        await ps.health_server.start()
    if config.metrics_port >= 0:
        try:
            ps.metrics = serve_metrics(registry, config.host, config.metrics_port, ps.statistics, token=token,
                                       tls=(config.tls_cert, config.tls_key, config.tls_client_ca) if credentials else None)
            ps.metrics_port = int(ps.metrics.server_port)
        except OSError as exc:
            await ps.stop(0)
            raise OSError(f"--metrics-port {config.metrics_port}: cannot serve metrics on {config.host}:"
                          f"{config.metrics_port} ({exc.strerror or exc}); choose another port (0: a free one, "
                          "-1: none)") from None
    ps._tasks.append(asyncio.create_task(sweep(registry, config, checkpointer, cluster, ps.background)))
    if cluster is not None:
        ps._tasks.append(asyncio.create_task(cluster.watch()))
    return ps


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": self.formatTime(record), "level": record.levelname, "msg": record.getMessage()}
        for key in ("run", "rank", "clock"):
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        return json.dumps(doc)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ctx = " ".join(f"{k}={getattr(record, k)}" for k in ("run", "rank", "clock") if hasattr(record, k))
        return f"{self.formatTime(record)} {record.levelname:<7} {record.getMessage()}" + (f"  [{ctx}]" if ctx else "")


def setup_logging(config: ServerConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if config.log_json else _TextFormatter())
    root = logging.getLogger("ps_server")
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    root.propagate = False


def _say_how_secured(config: ServerConfig, port: int) -> None:
    """What a client needs, or that it needs nothing: a warning when the server listens beyond
    loopback (a forgotten PS_TOKEN serves every run to the network)."""
    tls = "mutual TLS" if config.tls_client_ca else "TLS" if config.tls_cert else ""
    needs = [what for what in (tls, "the bearer token" if load_token(config) else "") if what]
    if needs:
        log.info("clients need %s (health excepted)", " and ".join(needs))
        return
    host = config.host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    log.log(logging.INFO if loopback else logging.WARNING, "no TLS and no token: whoever reaches %s:%d may read, "
            "change and delete every run%s", config.host, port, "" if loopback else
            " (give PS_TOKEN or --token-file, with --tls-cert and --tls-key: README, Security)")


async def serve(config: ServerConfig) -> None:
    stop = asyncio.Event()
    # (once its runs are resumed, before it serves them: a stop from then on is ordered; before, it
    # raised StoppedEarly, main's)
    ps = await start_server(config, lambda: on_stop_signals(asyncio.get_running_loop(), stop.set))
    print(f"ps-server listening on {config.host}:{ps.port} (generation {ps.registry.generation})", flush=True)
    if ps.data_plane:
        log.info("TCP data plane on %s:%d (up to %d streams, from the open-file limit %d)", config.host,
                 ps.data_plane.port, ps.data_plane.max_streams, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    if ps.shm_plane:
        log.info("shared-memory data plane for workers on this host: abstract socket %s", ps.shm_plane.name)
    if ps.metrics_port is not None:
        log.info("Prometheus metrics on %s://%s:%d/metrics", "https" if config.tls_cert else "http", config.host,
                 ps.metrics_port)
    if ps.health_port:
        log.info("gRPC health alone, in plaintext, on %s:%d", config.host, ps.health_port)
    _say_how_secured(config, ps.port)
    total, source = total_budget(config)
    log.info("runs may hold %s together (%s)", f"{total >> 20} MiB" if total else "any memory", source)
    await stop.wait()
    log.info("shutting down: health NOT_SERVING, releasing parked calls, grace %.1fs", config.grace_seconds)
    await ps.stop()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> None:
    stop_early()  # first: a stop while it starts (its runs' resume, minutes for a large data directory) ends it now
    try:
        exit_with_parent()  # started by psctl launch --local or a benchmark: not to outlive it
        tune_malloc()
        raise_fd_limit()
        config = parse_config(sys.argv[1:] if argv is None else argv)
        setup_logging(config)
        try:
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(serve(config))
        except (ConfigError, OSError) as exc:  # start-up: one line, and the exit status of a usage error
            print(f"ps-server: error: {exc}", file=sys.stderr)
            sys.exit(2)
    except StoppedEarly as stopped:  # (before it served any run: nothing to checkpoint, the data directory unlocked)
        print(f"ps-server: {stopped.signal.name}: stopped while starting, before it served any run", file=sys.stderr)


if __name__ == "__main__":
    main()
