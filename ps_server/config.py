"""The server's configuration: one frozen dataclass, loaded in one place from flags and environment.

Every field has a command-line flag (``--lease-seconds``) and an environment variable
(``PS_LEASE_SECONDS``); a flag wins over the variable, the variable over the default. The README's
configuration table lists them all.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from paramserver.settings import LOG_LEVELS, Parser, opt, parse_dataclass

__all__ = ["FROM_HOSTNAME", "ServerConfig", "index_from_hostname", "memory_limit", "parse_config", "snapshot_budget",
           "total_budget"]

FROM_HOSTNAME = "from-hostname"
_GRPC_MAX = (1 << 31) - 1
"""The largest message size gRPC takes (an int32)."""
"""The value of --index (PS_INDEX) that takes the number the host name ends in (a StatefulSet pod's ordinal)."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = opt("127.0.0.1", "Address to listen on (0.0.0.0 for all interfaces).")
    port: int = opt(50051, "gRPC port; 0 picks a free port (printed at start).")
    data_port: int = opt(0, "Port of the TCP data plane (pushes and pulls without HTTP/2, told to workers "
                         "at Join and Heartbeat); 0 picks a free port, -1 = off. Off when TLS or a token is configured.")
    shm: bool = opt(True, "Offer the shared-memory data plane to workers on this host (Linux; an abstract Unix "
                    "socket and memory both sides map); --no-shm: TCP only. Off when TLS or a token is configured.")
    max_message_bytes: int = opt(64 << 20, "Largest message accepted or sent, gRPC or data plane, in bytes.")
    chunk_bytes: int = opt(1 << 20, "Payload bytes per message when streaming tensors.")
    push_slots: int = opt(1, "Pushes of more than one message received at a time (each is held whole until "
                          "applied), and TCP data plane messages over 64 KiB being received; more wait their turn. "
                          "A push whose worker stalls 0.5 s between messages lends its slot out.")
    stall_seconds: float = opt(30.0, "A TCP data plane peer that sends nothing in the middle of a message, or "
                               "reads nothing of an answer, for this long is dropped.")
    max_param_bytes: int = opt(4 << 30, "Largest parameter set one run may hold, in bytes.")
    max_total_bytes: int = opt(0, "Bytes every run held together may take: parameters and optimizer state, of "
                               "finished runs too until they are forgotten, and the gradients a BSP run holds "
                               "for a clock (one per rank but the last); CreateRun beyond is refused "
                               "(RESOURCE_EXHAUSTED). 0 = half of the memory this server may use (its cgroup's "
                               "limit, else physical memory), -1 = no limit.")
    max_wait_seconds: float = opt(60.0, "Longest a pull or a join may stay parked on the server (told to workers "
                                  "at Join and Heartbeat: a pull asking for 0 gets this).")
    lease_seconds: float = opt(10.0, "A worker not heard from for this long is evicted.")
    heartbeat_seconds: float = opt(2.0, "Heartbeat interval the server asks workers to keep.")
    grace_seconds: float = opt(5.0, "On SIGTERM, how long in-flight RPCs may take to finish.")
    data_dir: str = opt("", "Directory for checkpoints; runs found there are resumed at start.")
    checkpoint_every: int = opt(50, "Checkpoint a run each time its min clock passes a multiple of this; 0 = only at "
                               "creation, on demand, at the end and at shutdown.")
    checkpoint_keep: int = opt(3, "Checkpoints kept per run (older ones are deleted; a cluster's server also "
                               "keeps the newest cuts every server has: up to 2 more).")
    keep_finished_runs: int = opt(50, "Finished runs kept (their parameters stay in memory); the oldest finished "
                                  "beyond this are forgotten and their checkpoints deleted. 0 = no limit.")
    keep_finished_seconds: float = opt(0.0, "Finished runs are forgotten (checkpoints deleted) this long after they "
                                       "ended. 0 = no limit.")
    max_workers: int = opt(1024, "Ranks one run may have.")
    max_runs: int = opt(1000, "Runs not finished (pending or running) held at once; CreateRun beyond is refused "
                        "(RESOURCE_EXHAUSTED).")
    cluster: str = opt("", "The servers holding runs together, as ADDR0,ADDR1,... (host:port, as workers and the "
                       "other servers reach them; the same list for every server); empty = this one alone. Give "
                       "every server of a cluster a --data-dir and the same --checkpoint-every: they checkpoint "
                       "together, and go back to a common checkpoint when one restarts.")
    index: int = opt(0, "This server's place in --cluster; server 0 owns membership (runs, ranks, leases). "
                     f"'{FROM_HOSTNAME}': the number the host name ends in after a '-' (a Kubernetes "
                     "StatefulSet pod's ordinal: paramserver-2 is 2).")
    split_bytes: int = opt(1 << 20, "In a cluster, tensors larger than this (and every table) are split by rows "
                           "over every server; smaller ones are placed whole.")
    shard_timeout: float = opt(30.0, "In a cluster, a server not answering server 0 for this long fails the runs "
                               "it holds a shard of (naming it).")
    metrics_port: int = opt(-1, "Prometheus metrics HTTP port; -1 = off, 0 = a free port.")
    health_port: int = opt(-1, "A port serving the gRPC health service alone, in plaintext, for probes that speak "
                           "no TLS (Kubernetes' gRPC probes) when the server has TLS; -1 = off, 0 = a free port.")
    tls_cert: str = opt("", "Server certificate (PEM) for TLS; with --tls-key.")
    tls_key: str = opt("", "Server private key (PEM) for TLS.")
    tls_client_ca: str = opt("", "CA (PEM) that client certificates must chain to: mutual TLS.")
    token_file: str = opt("", "File holding the bearer token every RPC must carry (health excepted).")
    token: str = opt("", "The bearer token itself; from the environment only, never a flag.", env_only=True)
    insecure: bool = opt(False, "Allow a token over plaintext (no TLS).")
    log_level: str = opt("INFO", "Log level: DEBUG, INFO, WARNING or ERROR.", choices=LOG_LEVELS)
    log_json: bool = opt(False, "Log one JSON object per line instead of text.")

    @staticmethod
    def env_name(name: str) -> str:
        return "PS_" + name.upper()

    @property
    def peers(self) -> list[str]:
        """The cluster's addresses, in index order ([] alone)."""
        return [a.strip() for a in self.cluster.split(",") if a.strip()]


def memory_limit(root: str = "/sys/fs/cgroup") -> tuple[int, str]:
    """The memory this process may use, in bytes, and what says so: its cgroup's limit (v2
    ``memory.max``, v1 ``memory/memory.limit_in_bytes``) when lower than physical memory, else
    physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in (f"{root}/memory.max", f"{root}/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < physical:  # ("max", or v1's 2^63 rounded down: none)
            return int(text), f"the cgroup's memory limit ({path})"
    return physical, "physical memory"


def total_budget(config: ServerConfig, limit: Callable[[], tuple[int, str]] = memory_limit) -> tuple[int, str]:
    """--max-total-bytes in bytes (0: no limit) and where it comes from. By default half of what
    ``limit`` says: the other half is for what the budget does not count (the process, gradients
    being received, a checkpoint's copy of a run, workers sharing the host)."""
    if config.max_total_bytes > 0:
        return config.max_total_bytes, "--max-total-bytes"
    if config.max_total_bytes < 0:
        return 0, "--max-total-bytes -1"
    available, source = limit()
    return available // 2, f"half of {source}: --max-total-bytes"


RUN_COPIES = 3
"""The most copies of its parameters a run keeps, BSP's held gradients aside: the parameters and
Adam's or FTRL's two states."""


def snapshot_budget(config: ServerConfig, total: int) -> int:
    """Bytes of checkpoint snapshots the server holds at once (0: no limit): a copy of the largest
    run it accepts, all it holds (``RUN_COPIES`` of --max-param-bytes and, under BSP, a gradient
    from each rank but the last), as much as ``total`` (``total_budget``) lets one run hold."""
    return min(total, (RUN_COPIES + config.max_workers - 1) * config.max_param_bytes)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def index_from_hostname(hostname: str) -> int:
    """The number ``hostname`` (its first label) ends in after a '-': a StatefulSet pod's ordinal
    (``paramserver-2`` -> 2). ValueError if it ends otherwise."""
    name = hostname.partition(".")[0]
    head, dash, number = name.rpartition("-")
    if not (head and dash and number.isascii() and number.isdigit()):
        raise ValueError(f"--index {FROM_HOSTNAME}: the host name {hostname!r} does not end in '-' and a number "
                         "(as a StatefulSet pod's, e.g. paramserver-1 is 1); give --index (PS_INDEX) a number")
    return int(number)


def _index_given_as_hostname(argv: list[str], env: Mapping[str, str], hostname: str,
                             ) -> tuple[list[str], Mapping[str, str], str]:
    """``argv`` and ``env`` with the index in force (the last --index, else PS_INDEX) as their only
    one, a number: the one ``hostname`` ends in if it says from-hostname (then ``hostname`` is
    returned, else ''). ValueError as ``index_from_hostname``."""
    var = ServerConfig.env_name("index")
    value, rest, flagged, i = env.get(var), [], False, 0
    while i < len(argv):
        if argv[i] == "--index" and i + 1 < len(argv):
            value, flagged, i = argv[i + 1], True, i + 2
            continue
        if argv[i].startswith("--index="):
            value, flagged = argv[i].partition("=")[2], True
        else:
            rest.append(argv[i])
        i += 1
    if env.get(var, "").strip() == FROM_HOSTNAME:  # (a flag may override it: never parsed as a number)
        env = {k: v for k, v in env.items() if k != var}
    if value is not None and value.strip() == FROM_HOSTNAME:
        return [*rest, f"--index={index_from_hostname(hostname)}"], env, hostname
    return [*rest, f"--index={value}"] if flagged else argv, env, ""


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None, *,
                 hostname: str | None = None) -> ServerConfig:
    """Build the config from ``argv`` (default: none) over ``env`` (default: os.environ);
    ``hostname`` (default: this machine's) is what --index from-hostname reads."""
    env = os.environ if env is None else env
    parser = Parser(
        prog="ps-server",
        description="paramserver's parameter server: holds runs' parameters, applies the "
        "optimizer, enforces stale-synchronous consistency. Every flag can also be set with the "
        "environment variable shown.",
        epilog="SIGTERM, SIGINT or SIGHUP (a SIGHUP ignored at start, as under nohup, stays ignored) stop "
        "the server in order: health NOT_SERVING, parked calls released, --grace-seconds for calls in "
        "progress, final checkpoints; exit status 0. One that comes while it starts, before its runs are "
        "resumed from --data-dir, ends it at once (nothing served, nothing to checkpoint): exit status 0 "
        "too. A start-up error (a bad value, a port in use) is one "
        "line and exit status 2; an unexpected error, a traceback and 1. Started with PS_PARENT_PID set to "
        "its parent's pid (psctl launch --local does), it stops as on SIGTERM when that parent dies (Linux).",
    )
    args = list(argv or [])
    try:
        args, env, derived_from = _index_given_as_hostname(args, env, socket.gethostname() if hostname is None
                                                           else hostname)
    except ValueError as exc:
        parser.error(str(exc))
    config = parse_dataclass(ServerConfig, parser, args, env, ServerConfig.env_name)
    problems = []
    for name, low, high, meaning in (("port", 0, 65535, ""), ("data_port", -1, 65535, " (-1: off)"),
                                     ("metrics_port", -1, 65535, " (-1: off)")):
        value = getattr(config, name)
        if not low <= value <= high:
            problems.append(f"{_flag(name)} {value} is not in {low}..{high}{meaning}")
    if not 1024 <= config.chunk_bytes <= config.max_message_bytes // 2:
        problems.append(f"--chunk-bytes {config.chunk_bytes} must be >= 1024 and at most half of "
                        f"--max-message-bytes ({config.max_message_bytes})")
    for name, low in (("push_slots", 1), ("max_workers", 1), ("max_runs", 1), ("max_param_bytes", 1), ("checkpoint_keep", 1),
                      ("checkpoint_every", 0), ("keep_finished_runs", 0), ("keep_finished_seconds", 0),
                      ("grace_seconds", 0)):
        if not getattr(config, name) >= low or not math.isfinite(getattr(config, name)):
            problems.append(f"{_flag(name)} {getattr(config, name)} must be a number >= {low}")
    for name in ("max_wait_seconds", "lease_seconds", "heartbeat_seconds", "stall_seconds", "shard_timeout"):
        if not 0 < getattr(config, name) < math.inf:
            problems.append(f"{_flag(name)} {getattr(config, name)} must be a positive number of seconds")
    if not 0 < config.max_message_bytes <= _GRPC_MAX:
        problems.append(f"--max-message-bytes {config.max_message_bytes} must be in 1..{_GRPC_MAX} (gRPC's limit)")
    peers = config.peers
    if peers:
        if len(set(peers)) != len(peers) or any(":" not in a for a in peers):
            problems.append(f"--cluster {config.cluster!r}: give distinct HOST:PORT addresses, separated by commas")
        elif not 0 <= config.index < len(peers):
            origin = f" (the number host name {derived_from!r} ends in)" if derived_from else ""
            problems.append(f"--index {config.index}{origin} is not in 0..{len(peers) - 1} (--cluster has "
                            f"{len(peers)} servers)")
        elif peers[config.index].rpartition(":")[2] != str(config.port):
            problems.append(f"--port {config.port} is not the port of this server's entry in --cluster "
                            f"({peers[config.index]}): use the same")
    elif config.index:
        problems.append(f"--index {config.index} needs --cluster (the list of servers)")
    if config.max_total_bytes < -1:
        problems.append(f"--max-total-bytes {config.max_total_bytes} must be a number of bytes, 0 (half of the "
                        "memory) or -1 (no limit)")
    if config.split_bytes < 1024:
        problems.append(f"--split-bytes {config.split_bytes} must be >= 1024")
    if 0 < config.heartbeat_seconds >= config.lease_seconds:
        problems.append(f"--heartbeat-seconds ({config.heartbeat_seconds}) must be shorter than --lease-seconds "
                        f"({config.lease_seconds})")
    if problems:
        parser.error("; ".join(problems))
    return config
