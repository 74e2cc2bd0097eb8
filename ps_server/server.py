"""Build the gRPC server in one function, run it in another (console script ``ps-server``).

``start_server(config)`` wires registry, servicers, health and reflection, binds (port 0 picks a
free port, as the tests do) and starts the lease sweeper. ``serve`` adds the ordered shutdown on
SIGTERM/SIGINT: health NOT_SERVING, parked pulls and joins released with UNAVAILABLE, then
``server.stop(grace)`` and exit 0.
"""

from __future__ import annotations

import os

# One BLAS thread: the server is one event loop, and its BLAS calls (the finite check's dot) are
# short; OpenBLAS's extra threads would spin on the cores the workers need.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import asyncio  # noqa: E402
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from paramserver.runtime import tune_malloc
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import paramserver_pb2_grpc as pb_grpc
from paramserver.v1 import wire

from .checkpoint import CheckpointStore
from .checkpointer import Checkpointer
from .config import ServerConfig, parse_config
from .errors import ShuttingDown, WaitTimeout
from .metrics import serve_metrics
from .registry import RunRegistry
from .security import ConfigError, TokenInterceptor, load_token, server_credentials
from .servicer import ParameterServicer, RunServicer, WorkerServicer
from .slots import PushSlots
from .tcp_plane import TcpDataPlane

__all__ = ["PsServer", "main", "serve", "start_server"]

log = logging.getLogger("ps_server")

SERVICE_NAMES = tuple(pb.DESCRIPTOR.services_by_name[n].full_name for n in pb.DESCRIPTOR.services_by_name)


def add_parameter_service(servicer: ParameterServicer, server: grpc.aio.Server) -> None:
    """Like the generated ``add_ParameterServiceServicer_to_server``, but the servicer reads and
    writes the messages' bytes itself (``paramserver.v1.wire``; responses as parts, joined here),
    which saves building protobuf objects for every MiB of tensors. The wire bytes are unchanged."""
    handlers = {
        "PushGradient": grpc.stream_stream_rpc_method_handler(
            servicer.PushGradient, request_deserializer=None, response_serializer=wire.join),
        "PullParams": grpc.stream_stream_rpc_method_handler(
            servicer.PullParams, request_deserializer=None, response_serializer=wire.join),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("paramserver.v1.ParameterService", handlers),))
    server.add_registered_method_handlers("paramserver.v1.ParameterService", handlers)


@dataclass
class PsServer:
    server: grpc.aio.Server
    port: int
    registry: RunRegistry
    config: ServerConfig
    health: health.aio.HealthServicer
    push_slots: PushSlots
    checkpointer: Checkpointer | None = None
    data_plane: TcpDataPlane | None = None
    metrics_port: int | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Ordered shutdown: NOT_SERVING, release parked waiters, stop with grace, final checkpoints.

        The final checkpoints come after the last RPC, so they hold every acknowledged push.
        """
        await self.health.enter_graceful_shutdown()
        self.registry.shutting_down = True  # long-lived data streams stop taking new operations
        down = ShuttingDown("the server is shutting down; retry against its replacement")
        for run in self.registry.runs():
            run.gate.fail_all(down)
        self.registry.work.fail_all(down)
        for task in self._tasks:
            task.cancel()
        # Operations in progress get the grace period; idle long-lived data streams do not
        # (they would hold grpc's stop(grace) for its whole length).
        grace = self.config.grace_seconds if grace is None else grace
        if grace > 0:
            registry = self.registry
            with contextlib.suppress(WaitTimeout):
                await registry.idle.wait_for(lambda: registry.busy == 0, grace, lambda: f"{registry.busy} in progress")
        if self.data_plane:
            await self.data_plane.close()
        await self.server.stop(min(grace, 0.5))
        if self.checkpointer:
            await self.checkpointer.drain()
            for run in self.registry.runs():
                if not run.state.finished:
                    await self.checkpointer.checkpoint_now(run, "shutdown")


async def _sweep_leases(registry: RunRegistry, config: ServerConfig) -> None:
    period = min(1.0, config.lease_seconds / 4)
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(period)
        if loop.time() - before > period + 0.5 * config.lease_seconds:
            # The event loop itself was stalled: heartbeats are queued, not missing. Let them in
            # before judging anyone.
            log.warning("event loop stalled for %.1fs; lease checks postponed", loop.time() - before - period)
            continue
        for run_id, rank in registry.expire_leases(config.lease_seconds):
            log.warning("evicted rank %d: lease expired", rank, extra={"run": run_id, "rank": rank})


async def start_server(config: ServerConfig) -> PsServer:
    checkpointer = None
    if config.data_dir:
        store = CheckpointStore(Path(config.data_dir), keep=config.checkpoint_keep)
        checkpointer = Checkpointer(store, config.checkpoint_every)
    registry = RunRegistry(max_param_bytes=config.max_param_bytes,
                           configure=checkpointer.attach if checkpointer else None)
    if checkpointer:
        checkpointer.resume(registry)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
        # Workers ping every 2 s to detect partitions (worker.client.channel_options): allow it.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 0),
    ]
    credentials = server_credentials(config)
    token = load_token(config)
    server = grpc.aio.server(options=options, interceptors=[TokenInterceptor(token)] if token else [])
    push_slots = PushSlots(config.push_slots)
    parameter_servicer = ParameterServicer(registry, config, push_slots)
    worker_servicer = WorkerServicer(registry, config)
    add_parameter_service(parameter_servicer, server)
    pb_grpc.add_RunServiceServicer_to_server(RunServicer(registry, config, checkpointer), server)
    pb_grpc.add_WorkerServiceServicer_to_server(worker_servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {config.host}:{config.port}: is another server using the port?")
    data_plane = None
    if config.data_port >= 0 and not credentials and not token:  # the framing carries neither
        plane = TcpDataPlane(parameter_servicer, registry, config.max_message_bytes)
        try:
            worker_servicer.data_port = await plane.start(config.host, config.data_port)
            data_plane = plane
        except OSError as exc:
            if config.data_port:  # asked for: its absence is an error
                raise
            log.warning("%s; pushes and pulls go over gRPC only", exc)
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    ps = PsServer(server, port, registry, config, health_servicer, push_slots, checkpointer, data_plane)
    if config.metrics_port >= 0:
        ps.metrics_port = serve_metrics(registry, config.host, config.metrics_port, push_slots, data_plane)
    ps._tasks.append(asyncio.create_task(_sweep_leases(registry, config)))
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


async def serve(config: ServerConfig) -> None:
    ps = await start_server(config)
    print(f"ps-server listening on {config.host}:{ps.port} (generation {ps.registry.generation})", flush=True)
    if ps.data_plane:
        log.info("TCP data plane on %s:%d", config.host, ps.data_plane.port)
    if ps.metrics_port is not None:
        log.info("Prometheus metrics on http://%s:%d/metrics", config.host, ps.metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: health NOT_SERVING, releasing parked calls, grace %.1fs", config.grace_seconds)
    await ps.stop()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> None:
    tune_malloc()
    config = parse_config(sys.argv[1:] if argv is None else argv)
    setup_logging(config)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(config))
    except (ConfigError, OSError) as exc:
        sys.exit(f"ps-server: error: {exc}")


if __name__ == "__main__":
    main()
