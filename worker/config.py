"""The worker's configuration: one frozen dataclass, from flags over environment variables.

Every field has a flag (``--join-wait-seconds``) and a variable (``PS_WORKER_JOIN_WAIT_SECONDS``),
except the server address, which is ``--server`` / ``PS_SERVER`` like everywhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["WorkerConfig", "parse_config"]


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class WorkerConfig:
    server: str = _opt("127.0.0.1:50051", "Parameter server address HOST:PORT.")
    name: str = _opt("", "Name shown in psctl status (default: host:pid).")
    run_id: str = _opt("", "Only join this run (default: any run with a vacant rank).")
    once: bool = _opt(False, "Exit after one run instead of waiting for the next.")
    timeout_seconds: float = _opt(30.0, "Deadline of each RPC, beyond the time a pull may be parked.")
    join_wait_seconds: float = _opt(10.0, "How long one Join call may wait on the server for work.")
    idle_exit_seconds: float = _opt(0.0, "Exit when no work came for this long; 0 = wait forever.")
    slowdown: float = _opt(1.0, "Straggler injection: make every iteration this many times slower.")
    report_seconds: float = _opt(0.5, "How often training metrics are reported to the server.")
    max_message_bytes: int = _opt(64 << 20, "Largest gRPC message sent or received.")
    log_level: str = _opt("INFO", "Log level: DEBUG, INFO, WARNING, ERROR.")

    @property
    def display_name(self) -> str:
        return self.name or f"{socket.gethostname()}:{os.getpid()}"

    @staticmethod
    def env_name(name: str) -> str:
        return "PS_SERVER" if name == "server" else "PS_WORKER_" + name.upper()


def _convert(f: dataclasses.Field[Any], text: str) -> Any:
    if f.type in ("bool", bool):
        return text.strip().lower() in ("1", "true", "yes", "on")
    return {"int": int, "float": float}.get(str(f.type), str)(text)


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> WorkerConfig:
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="ps-worker",
        description="A paramserver training worker: joins the cluster, trains its rank's shard of "
        "the run it is assigned, and waits for the next run. Every flag can also be set with the "
        "environment variable shown.",
    )
    fields = dataclasses.fields(WorkerConfig)
    for f in fields:
        var = WorkerConfig.env_name(f.name)
        default = f.default
        if var in env:
            try:
                default = _convert(f, env[var])
            except ValueError:
                parser.error(f"environment variable {var}={env[var]!r} is not a valid {f.type}")
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{f.metadata['help']} [{var}]")
        else:
            parser.add_argument(flag, type=lambda t, f=f: _convert(f, t), default=default,
                                help=f"{f.metadata['help']} [{var}] (default: {default})")
    ns = parser.parse_args(list(argv or []))
    config = WorkerConfig(**{f.name: getattr(ns, f.name) for f in fields})
    if config.slowdown < 1.0:
        parser.error(f"--slowdown {config.slowdown}: use a factor >= 1 (1 = normal speed)")
    if ":" not in config.server:
        parser.error(f"--server {config.server!r}: use HOST:PORT")
    return config
