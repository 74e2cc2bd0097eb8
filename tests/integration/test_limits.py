"""One request never takes the server down: every count and size of a run is bounded, answers and
messages stay small whatever the server holds, runs can be paged, deleted and are forgotten past
the retention limits, and the event loop keeps ticking while hostile calls arrive."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import make_spec, rename_refusing_deletions, unlink_holding_arrays, with_config

from paramserver import errors
from paramserver.client import PsClient
from paramserver.v1 import paramserver_pb2 as pb
from ps_server.config import ServerConfig
from ps_server.server import PsServer, start_server

pytestmark = pytest.mark.timeout(120)


class LoopLag:
    """The longest the event loop (the server's, in these tests) went without running a 1 ms ticker."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, loop.time() - before - 0.001)

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def _spec(**kw: Any) -> pb.RunSpec:
    return make_spec(num_workers=kw.pop("num_workers", 1), **kw)


HOSTILE: list[Any] = [
    pytest.param(lambda s: setattr(s, "num_workers", 2**32 - 1), errors.ResourceExhausted, "num_workers", id="4e9-workers"),
    pytest.param(lambda s: setattr(s, "num_workers", 10**6), errors.ResourceExhausted, "num_workers", id="1e6-workers"),
    pytest.param(lambda s: s.params.extend(pb.ParamSpec(name=f"t{i}", shape=[1]) for i in range(20_000)),
                 errors.ResourceExhausted, "params", id="20000-tensors"),
    pytest.param(lambda s: s.params[0].shape.extend([1] * 40), errors.InvalidArgument, "dimensions", id="42-dims"),
    pytest.param(lambda s: setattr(s, "name", "n" * 300), errors.InvalidArgument, "name", id="long-run-name"),
    pytest.param(lambda s: setattr(s.params[0], "name", "w" * 100_000), errors.InvalidArgument, "characters",
                 id="long-tensor-name"),
    pytest.param(lambda s: setattr(s, "model_spec_json", '{"pad": "' + "x" * (10 << 20) + '"}'),
                 errors.ResourceExhausted, "model_spec_json", id="10MB-model-json"),
    pytest.param(lambda s: setattr(s, "iterations", 1 << 60), errors.ResourceExhausted, "iterations",
                 id="2^60-iterations"),
    pytest.param(lambda s: s.slowdown.update({r: 2.0 for r in range(5000)}), errors.ResourceExhausted, "slowdown",
                 id="5000-slowdowns"),
]


@pytest.mark.parametrize(("mutate", "error", "field"), HOSTILE)
async def test_every_count_and_size_of_a_spec_is_bounded(server: PsServer, client: PsClient, mutate: Any,
                                                          error: type[errors.PsError], field: str) -> None:
    """Refused at once, saying which bound; nothing created; the loop never stalls meanwhile."""
    spec = _spec()
    mutate(spec)
    async with LoopLag() as lag:
        started = time.monotonic()
        with pytest.raises(error) as e:
            await client.create_run(spec)
        took = time.monotonic() - started
    assert field in e.value.message and len(e.value.message) < 1024, e.value.message
    assert took < 5.0 and lag.worst < 0.25, (took, lag.worst)
    assert server.registry.runs() == []


async def test_a_run_at_the_limits_is_served_without_stalling_the_loop(server: PsServer, client: PsClient) -> None:
    """The largest run the limits allow: creating, reading and listing it keep the loop responsive."""
    async with LoopLag() as lag:
        run = await client.create_run(_spec(num_workers=server.config.max_workers))
        await asyncio.gather(*(client.get_run(run.run_id) for _ in range(5)), client.list_runs())
    assert len((await client.get_run(run.run_id)).workers) == server.config.max_workers
    assert lag.worst < 0.25, lag.worst


async def test_messages_stay_short_whatever_the_server_holds(server: PsServer, client: PsClient) -> None:
    """Hundreds of runs, a 1500-tensor model, a 1 MB run id: the documented codes, short messages
    (a few names, then "and N more"), never gRPC's RESOURCE_EXHAUSTED for an oversized trailer."""
    for _ in range(300):
        await client.create_run(_spec())
    with pytest.raises(errors.NotFound) as e:
        await client.get_run("run-nope")
    assert "and 295 more" in e.value.message and len(e.value.message) < 400, e.value.message
    with pytest.raises(errors.NotFound) as e:
        await client.get_run("r" * (1 << 20))
    assert "characters" in e.value.message and len(e.value.message) < 400
    shapes = {f"layer{i:04d}": (2,) for i in range(1500)}
    big = await client.create_run(make_spec(shapes=shapes, num_workers=1, staleness=1))
    a = (await client.join("w", big.run_id, max_wait=0)).assignment
    with pytest.raises(errors.InvalidArgument) as e:
        await client.push(big.run_id, a.rank, a.incarnation, 0, {"layer0000": np.zeros(2, np.float32)})
    assert "and 1494 more" in e.value.message and len(e.value.message) < 600, e.value.message
    with pytest.raises(errors.InvalidArgument) as e:
        await client.pull(big.run_id, names=[f"nope{i}" for i in range(1500)])
    assert "and 1495 more" in e.value.message and len(e.value.message) < 600, e.value.message


async def test_list_runs_pages_newest_first(server: PsServer, client: PsClient) -> None:
    created = [(await client.create_run(_spec(name=f"r{i}"))).run_id for i in range(250)]
    first = await client._call("RunService", "ListRuns", pb.ListRunsRequest(page_size=100), pb.ListRunsResponse)
    assert [r.run_id for r in first.runs] == created[::-1][:100] and first.next_page_token
    assert not first.runs[0].workers and not first.runs[0].spec.model_spec_json  # summaries
    assert first.runs[0].active_workers == 0 and first.runs[0].spec.num_workers == 1
    listed = await client.list_runs(limit=1000)
    assert [r.run_id for r in listed] == created[::-1]
    assert [r.run_id for r in await client.list_runs(limit=120)] == created[::-1][:120]
    with pytest.raises(errors.InvalidArgument):
        await client._call("RunService", "ListRuns", pb.ListRunsRequest(page_token="nonsense"), pb.ListRunsResponse)


@pytest.fixture
async def kept(server_config: ServerConfig, tmp_path: Path) -> AsyncIterator[PsServer]:
    ps = await start_server(with_config(server_config, data_dir=str(tmp_path), keep_finished_runs=2,
                                        lease_seconds=2.0, heartbeat_seconds=0.5))
    try:
        yield ps
    finally:
        await ps.stop(0)


async def _eventually(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_finished_runs_past_the_retention_limit_are_forgotten_with_their_checkpoints(
        kept: PsServer, tmp_path: Path) -> None:
    async with PsClient(f"127.0.0.1:{kept.port}") as c:
        runs = [(await c.create_run(_spec())).run_id for _ in range(4)]
        live = (await c.create_run(_spec())).run_id
        for run_id in runs:
            await c.stop_run(run_id)
            await _eventually(lambda r=run_id: (tmp_path / r).is_dir(), f"{run_id}'s final checkpoint")  # type: ignore[misc]
        await _eventually(lambda: len(kept.registry.runs()) == 3, "the two oldest finished runs forgotten")
        assert {r.run_id for r in await c.list_runs()} == {live, *runs[2:]}
        held = lambda: sorted(p.name for p in tmp_path.iterdir() if p.is_dir())  # noqa: E731
        # (the registry forgets them at once; their directories go after, each in a task of its own)
        await _eventually(lambda: held() == sorted([*runs[2:], live]), "their checkpoints deleted")  # live's: from its creation
        with pytest.raises(errors.NotFound):
            await c.get_run(runs[0])


async def test_delete_a_run_and_its_checkpoints(kept: PsServer, tmp_path: Path) -> None:
    async with PsClient(f"127.0.0.1:{kept.port}") as c:
        run = await c.create_run(_spec(num_workers=2))
        a = (await c.join("w", run.run_id, max_wait=0)).assignment  # pending: the other rank is vacant
        await c.checkpoint_run(run.run_id)
        assert (tmp_path / run.run_id).is_dir()
        with pytest.raises(errors.FailedPrecondition) as e:
            await c.delete_run(run.run_id)
        assert e.value.reason == pb.ERROR_REASON_RUN_NOT_FINISHED
        parked = asyncio.ensure_future(c.pull(run.run_id, a.rank, a.incarnation, 0, max_wait=30.0))
        await _eventually(lambda: kept.registry.get(run.run_id).gate.statistics().waiting == 1, "the pull parked")
        deleted = (await c.delete_run(run.run_id, force=True)).run
        assert deleted.state == pb.RUN_STATE_STOPPED and deleted.run_id == run.run_id
        assert not (tmp_path / run.run_id).exists()
        with pytest.raises(errors.NotFound):
            await c.get_run(run.run_id)
        with pytest.raises(errors.FailedPrecondition) as e:
            await asyncio.wait_for(parked, 5)  # released at once, never left hanging
        assert e.value.reason == pb.ERROR_REASON_RUN_NOT_RUNNING
        with pytest.raises(errors.NotFound):
            await c.push(run.run_id, a.rank, a.incarnation, 0, {"w": np.zeros((3, 4), np.float32),
                                                               "b": np.zeros(4, np.float32)})


async def test_a_delete_the_disk_refuses_says_so(kept: PsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeleteRun answered OK whatever the disk did: a run whose directory could not be removed was
    forgotten, and the next start resumed it. Its directory not movable: INTERNAL saying so, nothing
    deleted, the run kept (stopped); its files not all removable: deleted, and the answer says
    what is left (psctl delete prints it)."""
    from typer.testing import CliRunner

    from client.cli import app

    rename = os.rename
    async with PsClient(f"127.0.0.1:{kept.port}") as c:
        run = await c.create_run(_spec())
        monkeypatch.setattr(os, "rename", rename_refusing_deletions())
        with pytest.raises(errors.PsError) as e:
            await c.delete_run(run.run_id, force=True)
        assert e.value.code == errors.Code.INTERNAL and "Permission denied" in str(e.value)
        assert "nothing was deleted" in str(e.value) and "delete it again" in str(e.value)
        assert (await c.get_run(run.run_id)).state == pb.RUN_STATE_STOPPED
        await kept.checkpointer.written(run.run_id)  # type: ignore[union-attr]
        assert kept.checkpointer.store.latest()[0].meta["state"] == "stopped"  # type: ignore[union-attr]
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "unlink", unlink_holding_arrays())
        result = await asyncio.to_thread(CliRunner().invoke, app, ["delete", run.run_id, "--server",
                                                                   f"127.0.0.1:{kept.port}"])
        assert result.exit_code == 0, result.output
        assert f"{run.run_id}: deleted" in result.output
        assert "could not all be removed" in result.output and "Device or resource busy" in result.output
        with pytest.raises(errors.NotFound):
            await c.get_run(run.run_id)
        assert kept.checkpointer.store.latest() == []  # type: ignore[union-attr]


async def test_a_run_forgotten_past_the_retention_limit_whose_disk_refuses_is_logged(
        kept: PsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The retention limits delete as DeleteRun does (``control.delete_run``), but a run they forgot
    whose directory cannot be moved away stays forgotten: the refusal is logged (a restart shows
    the run again), where DeleteRun's keeps the run and raises (``test_a_delete_the_disk_refuses_says_so``)."""
    monkeypatch.setattr(os, "rename", rename_refusing_deletions())
    with caplog.at_level(logging.INFO, "ps_server"):
        async with PsClient(f"127.0.0.1:{kept.port}") as c:
            runs = [(await c.create_run(_spec())).run_id for _ in range(3)]
            for run_id in runs:
                await c.stop_run(run_id)
            await _eventually(lambda: f"forgot {runs[0]}" in caplog.text, "the oldest finished run forgotten")
            with pytest.raises(errors.NotFound):
                await c.get_run(runs[0])
    assert f"could not delete the checkpoints of {runs[0]} (Permission denied): a restart will show it again" \
        in caplog.text, caplog.text
    assert (tmp_path / runs[0]).is_dir() and [r.run_id for r in kept.registry.runs()] == runs[:0:-1]


async def test_a_checkpoint_asked_for_as_its_run_is_deleted_is_refused(kept: PsServer,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """DeleteRun forgot the run a few steps after its checkpoints were deleted: a CheckpointRun in
    between found the run, wrote it a new checkpoint, and the next start resumed the deleted run."""
    assert kept.checkpointer is not None
    real = kept.checkpointer.delete
    asked: list[asyncio.Future[pb.CheckpointRunResponse]] = []
    async with PsClient(f"127.0.0.1:{kept.port}") as c:

        async def then_asked(run_id: str, *args: Any) -> str:
            left = await real(run_id, *args)
            asked.append(asyncio.ensure_future(c._call(  # (the RPC alone: checkpoint_run asks GetRun first)
                "RunService", "CheckpointRun", pb.CheckpointRunRequest(run_id=run_id), pb.CheckpointRunResponse)))
            await asyncio.wait(asked)
            return left

        monkeypatch.setattr(kept.checkpointer, "delete", then_asked)
        run = await c.create_run(_spec())
        await c.delete_run(run.run_id, force=True)
        with pytest.raises(errors.NotFound):
            await asked[0]
    assert kept.checkpointer.store.latest() == []


async def test_a_delete_past_its_deadline_says_it_goes_on(kept: PsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeleteRun waits for the run's checkpoint being written (seconds for a large run): past
    psctl's deadline a bare DEADLINE_EXCEEDED read as 'not deleted', and the run went all the
    same. The error says the deletion goes on; it does."""
    import threading

    assert kept.checkpointer is not None
    write = kept.checkpointer.store.write
    writing = threading.Event()

    def slow(*args: Any) -> Any:
        writing.set()
        time.sleep(1.0)
        return write(*args)

    async with PsClient(f"127.0.0.1:{kept.port}", timeout=0.3) as c:
        run = await c.create_run(_spec())
        monkeypatch.setattr(kept.checkpointer.store, "write", slow)
        asked = asyncio.ensure_future(kept.checkpointer.checkpoint_now(kept.registry.get(run.run_id), "on demand"))
        assert await asyncio.to_thread(writing.wait, 10)
        with pytest.raises(errors.DeadlineExceeded, match="a deletion the server has begun goes on"):
            await c.delete_run(run.run_id, force=True)
        await asked
        await _eventually(lambda: kept.registry.find(run.run_id) is None, "the run deleted")
    assert kept.checkpointer.store.latest() == []


async def test_texts_a_worker_or_user_sends_are_cut(server: PsServer, client: PsClient) -> None:
    """A worker's name, a leave's message and a stop's reason are kept cut (a name to 256
    characters, a message to about 1024): they were kept whole, in the run's ranks and events,
    and four joins with 20 MB names made GetRun and GetMetrics answers too large to send."""
    long = "x" * (1 << 20)
    run = await client.create_run(_spec(num_workers=3))
    a = [(await client.join(long, run.run_id, max_wait=0)).assignment for _ in range(3)]
    await client.leave(run.run_id, a[0].rank, a[0].incarnation, pb.LEAVE_REASON_SHUTDOWN, long)
    await client.leave(run.run_id, a[1].rank, a[1].incarnation, pb.LEAVE_REASON_FAILED, long)
    other = await client.create_run(_spec())
    await client.stop_run(other.run_id, long)
    for run_id in (run.run_id, other.run_id):
        got = await client.get_run(run_id)
        assert all(len(w.worker_name) <= 256 for w in got.workers) and len(got.message) < 1100, got.message[:80]
        events = (await client.get_metrics(run_id)).events
        assert events and all(len(e.message) < 1400 for e in events), max(len(e.message) for e in events)
    assert (await client.get_run(run.run_id)).workers[2].worker_name == "x" * 256


async def test_runs_not_finished_are_bounded(server_config: ServerConfig) -> None:
    """CreateRun past --max-runs runs not finished is RESOURCE_EXHAUSTED naming the flag, and creates
    nothing (each run holds up to --max-param-bytes: a loop of CreateRun grew the server without
    bound); a finished run frees its place."""
    ps = await start_server(with_config(server_config, max_runs=2))
    try:
        async with PsClient(f"127.0.0.1:{ps.port}") as c:
            first, _ = [await c.create_run(_spec()) for _ in range(2)]
            with pytest.raises(errors.ResourceExhausted) as e:
                await c.create_run(_spec())
            assert "--max-runs" in e.value.message and len(ps.registry.runs()) == 2, e.value.message
            await c.stop_run(first.run_id)
            await c.create_run(_spec())
            assert len(ps.registry.runs()) == 3
    finally:
        await ps.stop(0)


async def test_a_bsp_run_is_refused_for_the_gradients_it_would_hold(server_config: ServerConfig) -> None:
    """A BSP run holds each clock's gradients until every rank has pushed it, a model's bytes from
    each rank but the last: --max-total-bytes counts them while it trains, and a run that fits by
    its parameters alone but not with them is refused at CreateRun saying so and what to change
    (it was accepted, and its ranks' pushes took the server past the limit)."""
    ps = await start_server(with_config(server_config, max_total_bytes=10_000))
    try:
        async with PsClient(f"127.0.0.1:{ps.port}") as c:
            with pytest.raises(errors.ResourceExhausted) as e:  # 4000 bytes of parameters, 2 x 4000 held
                await c.create_run(_spec(shapes={"w": (1000,)}, num_workers=3))
            message = e.value.message
            assert ("needs 12000 bytes: 4000 bytes for its parameters and optimizer state and 8000 bytes for the "
                    "gradients of a clock it holds under BSP (staleness 0) until all its 3 ranks have pushed it"
                    in message), message
            assert "a staleness of 1 or more" in message and "--max-total-bytes" in message, message
            assert not ps.registry.runs()
            bsp = await c.create_run(_spec(shapes={"w": (1000,)}, num_workers=2))  # 8000 bytes
            with pytest.raises(errors.ResourceExhausted) as e:
                await c.create_run(_spec(shapes={"w": (1000,)}, num_workers=2, staleness=1))
            assert "hold 8000 bytes of its 10000 bytes" in e.value.message, e.value.message
            await c.stop_run(bsp.run_id)  # finished, it holds its parameters alone
            assert ps.registry.held_bytes() == 4000
            await c.create_run(_spec(shapes={"w": (1000,)}, num_workers=2, staleness=1))
    finally:
        await ps.stop(0)


async def test_runs_held_together_are_bounded(server_config: ServerConfig) -> None:
    """CreateRun that would take what every run holds (parameters and optimizer state; a finished
    run's too, until deleted) past --max-total-bytes is RESOURCE_EXHAUSTED, naming what is held, by
    which runs, and what to do; it creates nothing, and a deletion makes room (each run was only
    bounded by --max-param-bytes: many together outgrew the host)."""
    ps = await start_server(with_config(server_config, max_total_bytes=19_000))
    adam = pb.OptimizerSpec(adam=pb.AdamConfig(learning_rate=0.1))
    try:
        async with PsClient(f"127.0.0.1:{ps.port}") as c:
            sgd = await c.create_run(_spec(shapes={"w": (1000,)}))  # 4000 bytes
            moments = await c.create_run(_spec(shapes={"w": (1000,)}, optimizer=adam))  # 12000: two more copies
            await c.stop_run(sgd.run_id)  # finished, still held
            for run in ps.registry.runs():
                assert run.footprint == run.store.flat.nbytes + sum(a.nbytes for a in run.optimizer.state_arrays().values())
            with pytest.raises(errors.ResourceExhausted) as e:
                await c.create_run(_spec(shapes={"w": (1000,)}))
            message = e.value.message
            assert "needs 4000 bytes" in message and "hold 16000 bytes of its 19000 bytes" in message, message
            assert f"{moments.run_id} 12000 bytes (pending), {sgd.run_id} 4000 bytes (stopped)" in message, message
            assert "finished, held until deleted: 1 run, 4000 bytes: psctl delete RUN" in message, message
            assert "--max-total-bytes" in message and len(ps.registry.runs()) == 2, message
            await c.delete_run(sgd.run_id)
            await c.create_run(_spec(shapes={"w": (1000,)}))
            assert len(ps.registry.runs()) == 2
            with pytest.raises(errors.ResourceExhausted) as e:  # nothing finished: the advice is another
                await c.create_run(_spec(shapes={"w": (1000,)}))
            assert "delete a run no longer needed (psctl delete --force RUN)" in e.value.message, e.value.message
    finally:
        await ps.stop(0)
