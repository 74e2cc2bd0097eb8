"""Following a run until it ends: the WatchRun stream behind ``launch --wait``, ``launch --local``
and ``watch``.

``follow`` calls ``on_snapshot`` for every snapshot and returns the final run. A watch stream that
stays quiet past its idle limit (a pending run nobody joins) is simply reopened: following waits
as long as the user does. The latest metrics (for the train loss and the trend) are fetched at
most once per ``metrics_every`` seconds, not per snapshot.

With a local cluster a watchdog runs alongside: if the server process dies, or a worker exits with
an error and the run does not end within a few seconds (a worker exits non-zero when its run
failed, and the watch should be the one to report that), following stops with the cluster's error.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from paramserver import errors
from paramserver.client import PsClient
from paramserver.v1 import paramserver_pb2 as pb

from . import facts
from .local import LocalCluster

__all__ = ["EXIT_CODES", "LineLog", "Snapshot", "follow", "follow_local"]

EXIT_CODES = {pb.RUN_STATE_COMPLETED: 0, pb.RUN_STATE_FAILED: 1, pb.RUN_STATE_STOPPED: 2}
"""Exit status of a followed run by final state (documented in ``psctl launch --help``)."""

LIVE_POINTS = 200
"""Metric points fetched per refresh while a run is live (the trend and the latest evaluations)."""

Snapshot = Callable[[pb.WatchRunResponse, pb.GetMetricsResponse | None], Awaitable[None] | None]


class LineLog:
    """A snapshot callback for a pipe or a file: one plain-text line (``facts.progress_line``, after
    the time of day) each time it changes, written at once; ``metrics`` is the latest metrics seen."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write
        self.metrics: pb.GetMetricsResponse | None = None
        self._last = ""

    def __call__(self, snap: pb.WatchRunResponse, metrics: pb.GetMetricsResponse | None) -> None:
        self.metrics = metrics
        line = facts.progress_line(snap.run, metrics)
        if line != self._last:
            self._last = line
            self.write(f"{time.strftime('%H:%M:%S')}  {line}")


async def follow(ps: PsClient, run_id: str, on_snapshot: Snapshot, *, metrics_every: float | None = 1.0,
                 interval: float = 0.5, idle_timeout: float = 30.0) -> pb.Run:
    """Watch ``run_id`` until it finishes; returns the last snapshot's run."""
    last: pb.Run | None = None
    metrics: pb.GetMetricsResponse | None = None
    fetched = 0.0
    while True:
        try:
            async for snap in ps.watch_run(run_id, interval=interval, idle_timeout=idle_timeout):
                last = snap.run
                finished = last.state in EXIT_CODES
                if metrics_every is not None and (finished or time.monotonic() - fetched >= metrics_every):
                    # Live: the recent points the view shows; at the end: the whole history.
                    recent = 0 if finished else LIVE_POINTS
                    metrics, fetched = await ps.get_metrics(run_id, max_points=recent), time.monotonic()
                result = on_snapshot(snap, metrics)
                if result is not None:
                    await result
        except errors.WatchIdle:
            continue  # quiet stream (e.g. a pending run): reopen it
        if last is not None and last.state in EXIT_CODES:
            return last
        if last is None:
            last = await ps.get_run(run_id)  # raises NOT_FOUND listing the runs
        await asyncio.sleep(0.2)  # the stream ended early (server restarting?): reopen, gently


async def _watchdog(cluster: LocalCluster, grace: float) -> None:
    while True:
        await asyncio.sleep(0.25)
        cluster.check_server()
        try:
            cluster.check_workers()
        except Exception:
            await asyncio.sleep(grace)  # let the watch report a failed run first
            raise


async def follow_local(ps: PsClient, cluster: LocalCluster, run_id: str, on_snapshot: Snapshot, *,
                       metrics_every: float | None = 1.0, grace: float = 3.0) -> pb.Run:
    """``follow`` with the cluster's watchdog; raises LocalClusterError if the cluster breaks first."""
    watched = asyncio.ensure_future(follow(ps, run_id, on_snapshot, metrics_every=metrics_every))
    dog = asyncio.ensure_future(_watchdog(cluster, grace))
    try:
        await asyncio.wait({watched, dog}, return_when=asyncio.FIRST_COMPLETED)
        if watched.done():
            if isinstance(watched.exception(), errors.PsError):
                cluster.check_server(wait=3.0)  # a dead server explains an UNAVAILABLE better than gRPC does
            return watched.result()
        return dog.result()  # type: ignore[return-value]  # _watchdog only ends by raising
    finally:
        for task in (watched, dog):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
