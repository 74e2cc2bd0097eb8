"""The story a ps-worker's log tells at INFO, against a real server on this loop: it says when it
reaches the server, a line per assignment and per ending, and when it exits; a user's stop is one
INFO line per worker, not a warning carrying the server's raw refusal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from client.spec import LaunchOptions, build_run_spec
from paramserver.client import PsClient
from paramserver.v1 import paramserver_pb2 as pb
from ps_server.server import PsServer
from worker.config import WorkerConfig
from worker.main import work

pytestmark = pytest.mark.timeout(60)


class Story(logging.Handler):
    """Collects the worker's records; ``until(predicate)`` waits for a record that matches."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()

    def lines(self, level: int = logging.INFO) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]

    async def until(self, predicate: Callable[[list[str]], bool], timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self.lines()):
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
def story() -> Iterator[Story]:
    handler, logger = Story(), logging.getLogger("ps_worker")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def config(server: PsServer, name: str) -> WorkerConfig:
    return WorkerConfig(server=f"127.0.0.1:{server.port}", name=name, timeout_seconds=10.0, join_wait_seconds=10.0)


@contextlib.asynccontextmanager
async def workers(server: PsServer, n: int) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(work(config(server, f"w{i}"), stop)) for i in range(n)]
    try:
        yield stop
    finally:
        stop.set()
        async with asyncio.timeout(20):
            await asyncio.gather(*tasks)


async def test_an_idle_worker_says_it_reached_the_server_and_when_it_exits(server: PsServer, story: Story) -> None:
    address = f"127.0.0.1:{server.port}"
    async with workers(server, 1):
        # at once, not after a join has waited its 10 s for work
        await story.until(lambda lines: f"connected to {address}, waiting for work" in lines, timeout=5.0)
    assert story.lines() == [f"connected to {address}, waiting for work", "exiting: asked to stop"]


async def test_a_stopped_run_is_one_info_line_per_worker(server: PsServer, story: Story) -> None:
    spec = build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=2, iterations=100_000))
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10.0) as ps:
        run = await ps.create_run(spec)
        async with workers(server, 2):
            await story.until(lambda lines: sum(f"of run {run.run_id}" in ln for ln in lines) == 2)  # both train
            await ps.stop_run(run.run_id, "enough")
            stopped = f"run {run.run_id} was stopped: back to waiting for work"
            await story.until(lambda lines: lines.count(stopped) == 2)
    assert story.lines(logging.WARNING) == []
    assert not any("FAILED_PRECONDITION" in line for line in story.lines(logging.DEBUG))
    endings = [ln for ln in story.lines() if run.run_id in ln and "of run" not in ln]
    assert endings == [stopped, stopped], story.lines()
    assert story.lines()[-2:] == ["exiting: asked to stop"] * 2


async def test_a_worker_told_to_join_a_run_that_refuses_it_exits_non_zero(server: PsServer) -> None:
    """``ps-worker --run-id run-typo``: refused (no such run), the worker exits with status 1, so
    a script or a supervisor does not read it as a job done; without --run-id, idle is no failure."""
    from worker.config import parse_config
    from worker.main import _main

    told = parse_config(["--server", server.address, "--once", "--run-id", "run-typo"], env={})
    assert await _main(told) == 1
    idle = parse_config(["--server", server.address, "--idle-exit-seconds", "0.3"], env={})
    assert await _main(idle) == 0


async def test_a_worker_told_to_join_a_run_it_fails_exits_non_zero(server: PsServer, tmp_path: Path) -> None:
    """``ps-worker --run-id X`` (without --once) leaves once run X is over: when this worker failed
    it (its data cannot be read here), the exit status is 1, as with --once; it was 0."""
    import numpy as np

    from worker.config import parse_config
    from worker.main import _main

    path = tmp_path / "data.npz"
    np.savez(path, X=np.zeros((20, 3), np.float32), y=np.arange(20) % 2)
    spec = build_run_spec(LaunchOptions(model="softmax", dataset=f"npz:{path}", workers=1, iterations=5))
    path.unlink()  # the worker cannot load it
    async with PsClient(server.address, timeout=10.0) as ps:
        run = await ps.create_run(spec)
    told = parse_config(["--server", server.address, "--run-id", run.run_id, "--join-wait-seconds", "1"], env={})
    assert await _main(told) == 1


async def test_a_worker_told_to_join_a_run_exits_once_its_rank_is_done_saying_so(server: PsServer,
                                                                             story: Story) -> None:
    """``ps-worker --run-id X`` whose rank finished: one INFO line for it and one for exiting (it said
    'back to waiting for work', joined X again, and logged the refusal as an ERROR, 'join refused: ...
    no vacant rank (state completed)', before exiting 'cannot join run X', a job done)."""
    from worker.config import parse_config
    from worker.main import _main

    spec = build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=1, iterations=5))
    async with PsClient(server.address, timeout=10.0) as ps:
        run = await ps.create_run(spec)
    told = parse_config(["--server", server.address, "--run-id", run.run_id, "--join-wait-seconds", "1"], env={})
    assert await _main(told) == 0
    assert story.lines(logging.WARNING) == [], story.lines()
    endings = [ln for ln in story.lines() if "done (5 iterations)" in ln or ln.startswith("exiting")]
    assert endings == [f"run {run.run_id}: rank 0 done (5 iterations)", f"exiting: run {run.run_id} is over (--run-id)"]


async def _once_worker_evicted(server: PsServer, ps: PsClient, iterations: int) -> tuple[pb.Run, asyncio.Task[list]]:
    """A one-rank run and a ``--once`` worker training it, evicted (lease 0) at clock 5 or later."""
    run = await ps.create_run(build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=1,
                                                           iterations=iterations)))
    task = asyncio.create_task(work(WorkerConfig(server=f"127.0.0.1:{server.port}", name="w0", once=True,
                                                 timeout_seconds=10.0, join_wait_seconds=10.0)))
    async with asyncio.timeout(30):
        while (await ps.get_run(run.run_id)).min_clock < 5:
            await asyncio.sleep(0.01)
    assert server.registry.get(run.run_id).expire(0.0) == [0]
    return run, task


async def test_a_once_worker_whose_rank_is_lost_while_the_run_goes_on_joins_it_again(server: PsServer,
                                                                                     story: Story) -> None:
    """``--once`` means one run, not one rank: evicted (or sent away by a run that went back to a
    checkpoint from before it joined) while its run goes on, the worker asks that run for a rank
    again and trains it to the end (it exited, and a run of ``--once`` workers waited for ever)."""
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10.0) as ps:
        run, task = await _once_worker_evicted(server, ps, iterations=400)
        async with asyncio.timeout(60):
            outcomes = await task
        final = await ps.get_run(run.run_id)
    assert [(o.evicted, o.completed) for o in outcomes] == [(True, False), (False, True)], outcomes
    assert final.state == pb.RUN_STATE_COMPLETED and final.workers[0].incarnation == 2
    lines = story.lines()
    assert f"run {run.run_id}: rank 0 is no longer this worker's (evicted: silent past its lease, or the run went " \
           "back to a checkpoint from before it joined): asking that run for a rank again" in lines, lines
    assert lines[-1] == "exiting: one run done (--once)"


async def test_a_once_worker_whose_rank_went_to_another_exits(server: PsServer, story: Story) -> None:
    """Evicted, and its rank taken by another worker meanwhile: nothing left for it in that run."""
    async with PsClient(f"127.0.0.1:{server.port}", timeout=10.0) as ps:
        run, task = await _once_worker_evicted(server, ps, iterations=100_000)
        server.registry.join("other", run.run_id)  # (at once: before the evicted worker can ask again)
        async with asyncio.timeout(30):
            outcomes = await task
        await ps.stop_run(run.run_id, "enough")
    assert [o.evicted for o in outcomes] == [True]
    assert any(line.startswith(f"run {run.run_id} has no rank for this worker any more") for line in story.lines())
    assert story.lines()[-1] == "exiting: one run done (--once)"
