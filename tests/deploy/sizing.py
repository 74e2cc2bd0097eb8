"""What a parameter server and a worker take at their peak, from measurements (VmHWM from /proc:
one server, workers over TCP as between containers; docker-compose.yml and deploy/k8s state the
figures): the deployment tests check the containers' memory limits against it."""

from __future__ import annotations

from ps_server.config import ServerConfig, snapshot_budget, total_budget

__all__ = ["server_peak", "worker_peak"]

SERVER_PROCESS = 256 << 20
"""A server's own memory, with room: measured 62 MiB with the digits demo, 109 MiB with the wide MLP."""
WORKER_PROCESS = 120 << 20
"""A worker's own memory, its dataset's included: measured 70 MiB (digits), ~120 MiB (the wide MLP's)."""
WORKER_COPIES = 2
"""A worker holds ~2 bytes per byte of the model (parameters pulled, a gradient): measured 166-185
MiB for 23 MB (the wide MLP), 271 MiB for 80 MB, 692 MiB for 294 MB."""
HEADROOM = 1.25


def server_peak(config: ServerConfig, limit: int) -> int:
    """A server under a memory ``limit`` at its peak: every run it may hold (--max-total-bytes:
    parameters, optimizer state and the gradients BSP runs hold for a clock), gradients being
    received (a push slot each, up to the largest run's) and checkpoint snapshots, as many as the
    server holds at once however many runs reach a checkpoint together (``snapshot_budget``: a copy
    of the largest run, all of its footprint, as much as --max-total-bytes lets one run hold), plus
    the process."""
    total, _ = total_budget(config, lambda: (limit, "the container's limit"))
    assert total, "a server in a container needs --max-total-bytes (0: half of its limit; not -1, no limit)"
    return total + config.push_slots * config.max_param_bytes + snapshot_budget(config, total) + SERVER_PROCESS


def worker_peak(servers: int, max_param_bytes: int) -> int:
    """A worker training the largest run ``servers`` servers accept (each its --max-param-bytes), with room."""
    return int(HEADROOM * (WORKER_PROCESS + WORKER_COPIES * servers * max_param_bytes))
