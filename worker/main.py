"""``ps-worker``: join the cluster, train what the server assigns, wait for the next run.

A worker may start before its server and rides out server restarts: connection failures are
retried with exponential backoff and jitter, and every call has a deadline. On SIGTERM/SIGINT/SIGHUP it
gives its rank back (Leave SHUTDOWN, so another worker can take it over; for up to
``STOP_LEAVE_SECONDS``) and exits 0.
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
import secrets
import sys
import time
from collections.abc import Sequence

from paramserver import errors
from paramserver.client import PsClient
from paramserver.runtime import StoppedEarly, exit_with_parent, on_stop_signals, stop_early, tune_malloc
from paramserver.security import tls_problem
from paramserver.shm_transport import native
from paramserver.v1 import paramserver_pb2 as pb

from .config import WorkerConfig, parse_config
from .trainer import LogContext, Outcome, train

__all__ = ["STOP_LEAVE_SECONDS", "ending", "main", "work"]

log = logging.getLogger("ps_worker")

STOP_LEAVE_SECONDS = 5.0
"""How long a stopped worker tries to give its rank back (Leave): well within the stop grace periods
of Compose and Kubernetes (30 s), whatever ``--timeout-seconds`` is. If the server does not answer,
the rank's lease expires and the server hands it on then."""

CAPABILITIES = ("tables", "compression", "model:linear", "model:softmax", "model:mlp", "model:logistic", "model:fm", "model:mf")
"""What this worker says it can train at Join (``RunSpec.requires``): every model here, tables and
compressed runs too."""


async def work(config: WorkerConfig, stop: asyncio.Event | None = None) -> list[Outcome]:
    """Join-train loop until ``stop`` is set (or after one run with ``once``); returns outcomes.

    The log tells the worker's story at INFO, a line per event: connected to the server (once it
    answers, and again after it was out of reach), each assignment (trainer), how it ended, exiting.
    """
    stop = stop or asyncio.Event()
    outcomes: list[Outcome] = []
    delay = 0.1
    idle_since = time.monotonic()
    connected = False
    told = ""  # the TLS problem last logged
    why = "asked to stop"
    again = ""
    """With ``--once``: the run whose rank this worker lost before the run ended (evicted, or the
    run went back to a checkpoint from before it joined), asked for once more by id."""
    token = ""  # the Join's token, kept over its retries until one is answered with a rank (JoinRequest.join_token)
    security = config.security()
    async with PsClient(config.server, timeout=config.timeout_seconds, max_message_bytes=config.max_message_bytes,
                        security=security, data_plane=config.data_plane,
                        shm=config.shm) as client:
        while not stop.is_set():
            if config.idle_exit_seconds and time.monotonic() - idle_since > config.idle_exit_seconds:
                why = f"no work for {config.idle_exit_seconds:.0f}s"
                break
            try:
                # Until the server has answered once, ask without waiting: say "connected" at once.
                wait = config.join_wait_seconds if connected else 0.0
                token = token or secrets.token_hex(16)
                join = asyncio.ensure_future(client.join(config.display_name, config.run_id or again, wait,
                                                         CAPABILITIES, token))
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait({join, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not join.done():  # SIGTERM while waiting for work: nothing to give back
                    join.cancel()
                    with contextlib.suppress(asyncio.CancelledError, errors.PsError):
                        await join
                    break
                resp = join.result()
                if resp.HasField("assignment"):  # (the next Join is another one)
                    # (Not after an answer without work: a Join of this token the server still holds parked,
                    # its caller gone with a connection the server did not see drop, may take a rank yet, and
                    # the next Join, parked beside it, is answered with that rank: ``Run.joined``.)
                    token = ""
            except errors.PsError as exc:
                connected = False
                if not exc.retryable and again:  # (its rank went to another worker, or the run ended)
                    log.info("run %s has no rank for this worker any more (%s)", again, exc)
                    why = "one run done (--once)"
                    break
                if not exc.retryable:
                    log.error("join refused: %s", exc)
                    if config.run_id:
                        why = f"cannot join run {config.run_id}"
                        break
                    log.info("asking again in %.1fs", delay)
                else:
                    problem = ""
                    if exc.code == errors.Code.UNAVAILABLE:
                        problem = await asyncio.to_thread(tls_problem, config.server, security)
                    if problem and problem != told:  # (once: it stays until the settings change)
                        log.error("cannot talk to the server at %s: %s", config.server, problem)
                    told = problem or told
                    log.info("server %s not reachable (%s); retrying in %.1fs", config.server, exc.code.name, delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay * (0.5 + random.random())):
                        await stop.wait()
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            if not connected:
                connected = True
                log.info("connected to %s%s", config.server, "" if resp.HasField("assignment") else ", waiting for work")
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
                try:
                    await client.leave(a.run_id, a.rank, a.incarnation, pb.LEAVE_REASON_SHUTDOWN, "worker stopped",
                                       timeout=min(config.timeout_seconds, STOP_LEAVE_SECONDS))
                    log.info("stopped: gave rank %d of %s back", a.rank, a.run_id)
                except errors.PsError as exc:
                    log.warning("stopped: could not give rank %d of %s back (%s); the server hands it on once "
                                "this worker's lease expires", a.rank, a.run_id, exc.code.name)
                break
            outcome = task.result()
            outcomes.append(outcome)
            level, story = ending(outcome)
            rejoin = config.once and outcome.evicted and not config.run_id
            # --run-id: that run is over for this worker once its rank is done or the run ended (joined
            # again, it was refused, logged as an error); a rank lost otherwise asks for one again
            over = bool(config.run_id) and (outcome.completed or outcome.failed or bool(outcome.run_state))
            log.log(level, "%s%s", story, ": asking that run for a rank again" if rejoin else
                    "" if config.once or over else ": back to waiting for work")
            idle_since = time.monotonic()
            if outcome.unfit:  # it would be again, in this run and in any like it: stop, saying why
                why = "this worker cannot take part in runs like this one as it is set up (the error above)"
                break
            if rejoin:
                again = outcome.run_id  # (that run may still want it: it goes on with the next rank free)
                continue
            if config.once:
                why = "one run done (--once)"
                break
            if over:
                why = f"run {config.run_id} is over (--run-id)"
                break
    log.info("exiting: %s", why)
    return outcomes


def ending(outcome: Outcome) -> tuple[int, str]:
    """How an assignment ended, for the log: (level, sentence). A run stopped by its user, or a
    rank finished, is news (INFO); a run failed elsewhere, an eviction or a lost server, a warning.
    This worker's own failure was logged as an error where it happened (trainer)."""
    run, rank = outcome.run_id, outcome.rank
    if outcome.completed:
        return logging.INFO, f"run {run}: rank {rank} done ({outcome.stats.iterations} iterations)"
    if outcome.failed:
        return logging.INFO, f"run {run}: gave rank {rank} up after the error above"
    if outcome.unfit:
        return logging.INFO, f"run {run}: rank {rank} given back after the error above"
    if outcome.run_state == pb.RUN_STATE_STOPPED:
        return logging.INFO, f"run {run} was stopped"
    if outcome.run_state == pb.RUN_STATE_FAILED:
        return logging.WARNING, f"run {run} failed (see 'psctl status {run}')"
    if outcome.run_state:
        return logging.INFO, f"run {run}: {outcome.reason}"
    if outcome.evicted:
        return logging.WARNING, (f"run {run}: rank {rank} is no longer this worker's (evicted: silent past its "
                                 "lease, or the run went back to a checkpoint from before it joined)")
    return logging.WARNING, f"run {run}: rank {rank} ended: {outcome.reason}"


async def _main(config: WorkerConfig) -> int:
    stop = asyncio.Event()
    on_stop_signals(asyncio.get_running_loop(), stop.set)
    outcomes = await work(config, stop)
    # 1 when this worker failed its run (the one run of --once or --run-id), or did not get the run
    # it was told to join (--run-id: refused, such as a run that does not exist, or no work before
    # --idle-exit-seconds), or cannot take part as it is set up (it gave its rank back); a run
    # stopped, a rank evicted or a stop asked for is not its failure
    if config.run_id and not outcomes and not stop.is_set():
        return 1
    if outcomes and outcomes[-1].unfit:
        return 1
    return 1 if (config.once or config.run_id) and outcomes and outcomes[-1].failed else 0


def main(argv: Sequence[str] | None = None) -> None:
    stop_early()  # first: a stop before _main's handlers (as PID 1 in a container it was ignored) ends it now
    try:
        exit_with_parent()  # started by psctl launch --local or a benchmark: not to outlive it
        tune_malloc()
        config = parse_config(sys.argv[1:] if argv is None else argv)
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(LogContext())
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s [{config.display_name}%(ctx)s] "
                                               "%(message)s"))
        logging.basicConfig(level=config.log_level.upper(), handlers=[handler])
        if config.nice:
            log.info("CPU priority lowered by %d (nice %d now)", config.nice, os.nice(config.nice))
        if config.shm and config.data_plane and native is None:
            log.info("pushes through shared memory go by the Python path: paramserver._exchange was not built "
                     "(install with a C compiler and Python's headers for less CPU per push)")
        try:
            sys.exit(asyncio.run(_main(config)))
        except ValueError as exc:  # security settings that cannot work: one line, a usage error's status
            print(f"ps-worker: error: {exc}", file=sys.stderr)
            sys.exit(2)
    except StoppedEarly as stopped:  # (before it asked for work: no rank to give back)
        print(f"ps-worker: {stopped.signal.name}: stopped while starting, before it asked for work", file=sys.stderr)


if __name__ == "__main__":
    main()
