"""``ps-worker``: join the cluster, train what the server assigns, wait for the next run.

A worker may start before its server and rides out server restarts: connection failures are
retried with exponential backoff and jitter, and every call has a deadline. On SIGTERM/SIGINT it
gives its rank back (Leave SHUTDOWN, so another worker can take it over) and exits 0.
"""

from __future__ import annotations

import os

# One BLAS thread per worker process: workers are the parallelism. Several processes each running
# a BLAS thread per core thrash a small machine (measured: 2.5x slower on 2 cores with 4 workers).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import asyncio  # noqa: E402
import contextlib
import logging
import random
import signal
import sys
import time
from collections.abc import Sequence

from paramserver import errors
from paramserver.client import PsClient
from paramserver.runtime import tune_malloc
from paramserver.v1 import paramserver_pb2 as pb

from .config import WorkerConfig, parse_config
from .trainer import LogContext, Outcome, train

__all__ = ["main", "work"]

log = logging.getLogger("ps_worker")


async def work(config: WorkerConfig, stop: asyncio.Event | None = None) -> list[Outcome]:
    """Join-train loop until ``stop`` is set (or after one run with ``once``); returns outcomes."""
    stop = stop or asyncio.Event()
    outcomes: list[Outcome] = []
    delay = 0.1
    idle_since = time.monotonic()
    async with PsClient(config.server, timeout=config.timeout_seconds, max_message_bytes=config.max_message_bytes,
                        security=config.security(), data_plane=config.data_plane) as client:
        while not stop.is_set():
            if config.idle_exit_seconds and time.monotonic() - idle_since > config.idle_exit_seconds:
                log.info("no work for %.0fs: exiting", config.idle_exit_seconds)
                break
            try:
                join = asyncio.ensure_future(client.join(config.display_name, config.run_id, config.join_wait_seconds))
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait({join, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not join.done():  # SIGTERM while waiting for work: nothing to give back
                    join.cancel()
                    with contextlib.suppress(asyncio.CancelledError, errors.PsError):
                        await join
                    break
                resp = join.result()
            except errors.PsError as exc:
                if not exc.retryable:
                    log.error("join refused: %s", exc)
                    if config.run_id:
                        break
                log.info("server %s not reachable (%s); retrying in %.1fs", config.server, exc.code.name, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            if not resp.HasField("assignment"):
                continue
            a = resp.assignment
            task = asyncio.create_task(train(client, a, config))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                with contextlib.suppress(errors.PsError):
                    await client.leave(a.run_id, a.rank, a.incarnation, pb.LEAVE_REASON_SHUTDOWN, "worker stopped")
                log.info("stopped: gave rank %d of %s back", a.rank, a.run_id)
                break
            outcome = task.result()
            outcomes.append(outcome)
            log.info("run %s rank %d: %s", outcome.run_id, outcome.rank, outcome.reason)
            idle_since = time.monotonic()
            if config.once:
                break
    return outcomes


async def _main(config: WorkerConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    outcomes = await work(config, stop)
    # 1 only when this worker failed its run; a run stopped or a rank evicted is not its failure
    return 1 if config.once and outcomes and outcomes[-1].failed else 0


def main(argv: Sequence[str] | None = None) -> None:
    tune_malloc()
    config = parse_config(sys.argv[1:] if argv is None else argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(LogContext())
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s [{config.display_name}%(ctx)s] %(message)s"))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler])
    try:
        sys.exit(asyncio.run(_main(config)))
    except ValueError as exc:  # security settings that cannot work: one line, a usage error's status
        print(f"ps-worker: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
