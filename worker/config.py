"""The worker's configuration: one frozen dataclass, from flags over environment variables.

Every field has a flag (``--join-wait-seconds``) and a variable (``PS_WORKER_JOIN_WAIT_SECONDS``),
except the server address, which is ``--server`` / ``PS_SERVER`` like everywhere else.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from paramserver.security import Security, read_token
from paramserver.settings import LOG_LEVELS, Parser, opt, parse_dataclass

__all__ = ["WorkerConfig", "parse_config", "parse_tail_delay"]




@dataclass(frozen=True)
class WorkerConfig:
    server: str = opt("127.0.0.1:50051", "Parameter server address HOST:PORT.")
    name: str = opt("", "Name shown in psctl status; none: host:pid.")
    run_id: str = opt("", "Only join this run, and exit once it is over for this worker; none: any "
                          "run with a vacant rank.")
    once: bool = opt(False, "Exit after one run instead of waiting for the next (a rank lost while the "
                              "run goes on, such as one evicted: that run is asked for a rank again).")
    timeout_seconds: float = opt(30.0, "Deadline of each RPC, beyond the time a pull may be parked.")
    join_wait_seconds: float = opt(10.0, "How long one Join call may wait on the server for work.")
    idle_exit_seconds: float = opt(0.0, "Exit when no work came for this long; 0 = wait forever.")
    slowdown: float = opt(1.0, "Straggler injection: each iteration takes this many times its own work (the median "
                          "computation plus its pulls and pushes that did not wait for other ranks); 1 = normal.")
    tail_delay: str = opt("", "Transient delays for experiments, as on a shared cluster: 'P:FACTOR' makes each "
                          "iteration FACTOR times as long with probability P (e.g. 0.05:10), drawn from the run's "
                          "seed and the rank; '' = none.")
    step_seconds: float = opt(0.0, "Emulate a slower machine, for experiments: each iteration takes at least this many "
                              "seconds of work (the worker sleeps the rest), before --slowdown and --tail-delay "
                              "multiply it; 0 = its own work.")
    nice: int = opt(0, "Lower this worker's CPU priority by this much (0-19) when it starts. Where workers share "
                    "cores with their parameter server (one host, the embedded local cluster), the server then "
                    "runs as soon as a push comes, and every worker waits less for it (psctl launch --local "
                    "uses 10; bench/RESULTS.md). 0 = as started.")
    report_seconds: float = opt(0.5, "How often training metrics are reported to the server.")
    max_message_bytes: int = opt(64 << 20, "Largest message sent or received (gRPC, TCP data plane); a "
                                 "worker whose pulls' answers are larger gives its rank back and exits 1.")
    data_plane: bool = opt(True, "Push and pull over the server's TCP data plane when it offers one (else gRPC); "
                           "--no-data-plane: gRPC only (no shared memory either).")
    shm: bool = opt(True, "Push and pull through the server's shared-memory data plane when the server runs on "
                    "this host (Linux), else over TCP; --no-shm: TCP (or gRPC) only.")
    overlap: bool = opt(False, "With staleness s >= 1 or unbounded: compute the next iteration's gradient on the "
                        "parameters held while the push is in flight, when they are recent enough for it (the "
                        "bound holds; a gradient is one round trip older). Pays when the server or network is "
                        "slow and a core idles; see bench/RESULTS.md.")
    tls_ca: str = opt("", "CA (PEM) to verify the server's certificate; turns TLS on.")
    tls_cert: str = opt("", "Client certificate (PEM) for mutual TLS.")
    tls_key: str = opt("", "Client private key (PEM) for mutual TLS.")
    tls_server_name: str = opt("", "Name expected in the server's certificate, if not the dialled host.")
    token_file: str = opt("", "File holding the server's bearer token.")
    token: str = opt("", "The bearer token itself; from the environment only, never a flag.", env_only=True)
    insecure: bool = opt(False, "Allow the token over plaintext (no TLS).")
    log_level: str = opt("INFO", "Log level: DEBUG, INFO, WARNING or ERROR.", choices=LOG_LEVELS)

    @property
    def display_name(self) -> str:
        return self.name or f"{socket.gethostname()}:{os.getpid()}"

    @staticmethod
    def env_name(name: str) -> str:
        return {"server": "PS_SERVER", "token": "PS_TOKEN"}.get(name, "PS_WORKER_" + name.upper())

    def security(self) -> Security:
        return Security(self.tls_ca, self.tls_cert, self.tls_key, read_token(self.token, self.token_file),
                        self.insecure, self.tls_server_name)




def parse_tail_delay(text: str) -> tuple[float, float]:
    """'0.05:10' -> (0.05, 10.0); '' -> (0.0, 1.0): no delays."""
    if not text:
        return 0.0, 1.0
    p, _, factor = text.partition(":")
    try:
        prob, times = float(p), float(factor)
    except ValueError:
        prob, times = -1.0, 0.0
    if not (0.0 <= prob <= 1.0 and 1.0 <= times < 1e6):
        raise ValueError(f"--tail-delay {text!r}: use P:FACTOR with P in [0, 1] and FACTOR >= 1, e.g. 0.05:10")
    return prob, times


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> WorkerConfig:
    env = os.environ if env is None else env
    parser = Parser(
        prog="ps-worker",
        description="A paramserver training worker: joins the cluster, trains its rank's shard of "
        "the run it is assigned, and waits for the next run. Every flag can also be set with the "
        "environment variable shown.",
        epilog="SIGTERM, SIGINT or SIGHUP (a SIGHUP ignored at start, as under nohup, stays ignored) stop "
        "the worker: it gives its rank back (trying for up to 5 s) and exits 0 (while it starts, before it "
        "asks for work: at once, 0 too). Exit status 1: with --once "
        "or --run-id, it failed its run, or could not join the run --run-id names; or it cannot take part as "
        "it is set up (an answer over --max-message-bytes); or an unexpected error (a traceback). 2: a usage "
        "error. Started with PS_PARENT_PID set to its parent's pid (psctl launch --local does), it stops as "
        "on SIGTERM when that parent dies (Linux).",
    )
    config = parse_dataclass(WorkerConfig, parser, argv or [], env, WorkerConfig.env_name)
    if not (config.slowdown >= 1.0 and math.isfinite(config.slowdown)):  # (as psctl launch --slowdown)
        parser.error(f"--slowdown {config.slowdown}: use a finite factor >= 1 (1 = normal speed)")
    if not 0.0 <= config.step_seconds <= 3600.0:
        parser.error(f"--step-seconds {config.step_seconds}: use seconds from 0 (off) to 3600")
    if not 0 <= config.nice <= 19:
        parser.error(f"--nice {config.nice}: use 0 (as started) to 19 (the lowest priority)")
    try:
        parse_tail_delay(config.tail_delay)
    except ValueError as e:
        parser.error(str(e))
    host, sep, port = config.server.rpartition(":")
    if not config.server.startswith(("unix:", "unix-abstract:", "vsock:")) and (  # (gRPC targets with no port)
            not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535):
        parser.error(f"--server {config.server!r}: use HOST:PORT (a port in 1..65535), for example 127.0.0.1:50051")
    for name, low, positive in (("timeout_seconds", 0, True), ("report_seconds", 0, True),
                                ("join_wait_seconds", 0, False), ("idle_exit_seconds", 0, False),
                                ("max_message_bytes", 1 << 20, False)):
        value = getattr(config, name)
        if not value >= low or (positive and value == low) or value == math.inf:
            parser.error(f"--{name.replace('_', '-')} {value}: must be a number {'>' if positive else '>='} {low}")
    if config.max_message_bytes > (1 << 31) - 1:
        parser.error(f"--max-message-bytes {config.max_message_bytes}: must be at most {(1 << 31) - 1} (gRPC's limit)")
    return config
