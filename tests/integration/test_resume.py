"""A server restarted on its data directory resumes runs exactly where its checkpoint left them."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import make_spec, with_config

from paramserver import errors
from paramserver.client import PsClient
from paramserver.v1 import paramserver_pb2 as pb
from ps_server.config import ServerConfig
from ps_server.security import ConfigError
from ps_server.server import start_server

pytestmark = pytest.mark.timeout(60)


async def test_shutdown_checkpoint_and_resume(server_config: ServerConfig, tmp_path: Path) -> None:
    config = with_config(server_config, data_dir=str(tmp_path), checkpoint_every=2)
    ps = await start_server(config)
    async with PsClient(f"127.0.0.1:{ps.port}") as c:
        run = await c.create_run(make_spec(num_workers=2, staleness=1, iterations=10,
                                           optimizer=pb.OptimizerSpec(adam=pb.AdamConfig(learning_rate=0.1))))
        a = [(await c.join(f"w{i}")).assignment for i in range(2)]
        for clock in range(3):
            for x in a:
                p = await c.pull(run.run_id, x.rank, x.incarnation, clock)
                await c.push(run.run_id, x.rank, x.incarnation, clock, {n: np.ones_like(v) for n, v in p.tensors.items()})
        before = (await c.pull(run.run_id)).tensors
        status = await c.get_run(run.run_id)
    await ps.stop(0)
    assert len(list((tmp_path / run.run_id).glob("ckpt-*"))) >= 2  # periodic ones, then the final one

    ps2 = await start_server(with_config(config, port=0))
    try:
        async with PsClient(f"127.0.0.1:{ps2.port}") as c:
            after_status = await c.get_run(run.run_id)
            after = (await c.pull(run.run_id)).tensors
            assert after_status.state == pb.RUN_STATE_RUNNING
            assert [w.clock for w in after_status.workers] == [3, 3]
            assert [w.incarnation for w in after_status.workers] == [w.incarnation for w in status.workers]
            assert after_status.counters.pushes_applied == 6
            last = (await c.get_metrics(run.run_id)).events[-1]  # psctl status and watch say so
            assert last.kind == "resumed" and "min clock 3" in last.message, last
            for n in before:
                assert after[n].tobytes() == before[n].tobytes()
            # de-duplication survived: the last push again is acknowledged, not applied
            g = {n: np.ones_like(v) for n, v in after.items()}
            assert (await c.push(run.run_id, a[0].rank, a[0].incarnation, 2, g)).duplicate
            # and training goes on where it stopped
            resp = await c.push(run.run_id, a[0].rank, a[0].incarnation, 3, g)
            assert resp.clock == 4 and not resp.duplicate
            hb = await c.heartbeat(run.run_id, a[1].rank, a[1].incarnation, 3)
            assert hb.clock == 3 and hb.server_generation != ""
    finally:
        await ps2.stop(0)


async def test_a_join_whose_answer_was_lost_as_the_server_stopped_gets_its_rank_after_the_restart(
        server_config: ServerConfig, tmp_path: Path) -> None:
    """The server stopped after it had given a Join a rank and before the answer reached the worker
    (its last checkpoint holds the new incarnation); the worker asks the restarted server again with
    the same join_token. It took the other vacant rank, and the first had no worker until its lease
    ran out (the token was not in the checkpoint)."""
    config = with_config(server_config, data_dir=str(tmp_path), checkpoint_every=0)
    ps = await start_server(config)
    async with PsClient(f"127.0.0.1:{ps.port}") as c:
        run = await c.create_run(make_spec(num_workers=2))
        first = (await c.join("w0", max_wait=0, join_token="t0")).assignment
    await ps.stop(0)

    ps2 = await start_server(with_config(config, port=0))
    try:
        async with PsClient(f"127.0.0.1:{ps2.port}") as c:
            again = (await c.join("w0", max_wait=0, join_token="t0")).assignment
            assert (again.rank, again.incarnation) == (first.rank, first.incarnation)
            other = (await c.join("w1", max_wait=0, join_token="t1")).assignment
            assert other.rank != first.rank
            status = await c.get_run(run.run_id)
            assert status.state == pb.RUN_STATE_RUNNING
            assert [w.incarnation for w in status.workers] == sorted([first.incarnation, other.incarnation])
    finally:
        await ps2.stop(0)


async def test_checkpoint_on_demand(server_config: ServerConfig, tmp_path: Path) -> None:
    ps = await start_server(with_config(server_config, data_dir=str(tmp_path), checkpoint_every=0))
    try:
        async with PsClient(f"127.0.0.1:{ps.port}") as c:
            run = await c.create_run(make_spec(num_workers=1))
            resp = await c.checkpoint_run(run.run_id)
            assert Path(resp.path).is_dir() and (Path(resp.path) / "manifest.json").is_file()
            with pytest.raises(errors.NotFound) as err:
                await c.checkpoint_run("run-nope")
            assert err.value.reason == pb.ERROR_REASON_RUN_NOT_FOUND
    finally:
        await ps.stop(0)


async def test_a_checkpoint_on_demand_past_its_deadline_says_it_is_still_written(
        server_config: ServerConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """psctl checkpoint of a large run on a slow disk: a bare DEADLINE_EXCEEDED read as 'no
    checkpoint', while the server wrote it on. The error says so, and it lands."""
    import threading
    import time

    ps = await start_server(with_config(server_config, data_dir=str(tmp_path), checkpoint_every=0))
    try:
        assert ps.checkpointer is not None
        async with PsClient(f"127.0.0.1:{ps.port}", timeout=0.3) as c:
            run = await c.create_run(make_spec(num_workers=1))
            write = ps.checkpointer.store.write
            landed: list[Path] = []
            done = threading.Event()

            def slow(*args: Any) -> Any:
                time.sleep(1.0)
                landed.append(write(*args))
                done.set()
                return landed[-1]

            monkeypatch.setattr(ps.checkpointer.store, "write", slow)
            with pytest.raises(errors.DeadlineExceeded, match="still being written.*--timeout"):
                await c.checkpoint_run(run.run_id)
            assert await asyncio.to_thread(done.wait, 10)
            assert ps.checkpointer.store.latest()[0].path == landed[0]
    finally:
        await ps.stop(0)


async def test_a_checkpoint_on_demand_waits_as_long_as_its_run_is_large(monkeypatch: pytest.MonkeyPatch) -> None:
    """CheckpointRun had the client's timeout whatever the run's size (psctl checkpoint: 60 s): a
    run of GBs could not be checkpointed within it, and a small one waited 60 s for a server that
    did not answer. The deadline grows as create_run's, by what the checkpoint holds (and by the
    wait for the cut of a running sharded run); psctl checkpoint's --timeout is 10 s."""
    from typer.testing import CliRunner

    from client.cli import app

    gib = pb.ParamSpec(name="w", shape=[1 << 28])  # 1 GiB of float32
    sgd, adam = pb.OptimizerSpec(sgd=pb.SgdConfig(learning_rate=0.1)), pb.OptimizerSpec(adam=pb.AdamConfig())
    two = pb.ShardMap(shards=[pb.Shard(), pb.Shard()])
    runs = {"run-small": pb.Run(spec=pb.RunSpec(params=[pb.ParamSpec(name="w", shape=[3])], optimizer=sgd)),
            "run-adam": pb.Run(spec=pb.RunSpec(params=[gib], optimizer=adam)),
            "run-sharded": pb.Run(spec=pb.RunSpec(params=[gib], optimizer=sgd), shard_map=two,
                                  state=pb.RUN_STATE_RUNNING)}
    timeouts: list[float] = []

    async def call(self: PsClient, service: str, method: str, request: Any, response: Any,
                   timeout: float | None = None) -> Any:
        if method == "GetRun":
            return pb.GetRunResponse(run=runs[request.run_id])
        assert method == "CheckpointRun" and timeout is not None
        timeouts.append(timeout)
        return pb.CheckpointRunResponse(path="/data/ckpt", min_clock=3)

    monkeypatch.setattr(PsClient, "_call", call)
    async with PsClient("127.0.0.1:1", timeout=10) as c:
        for run_id in runs:
            await c.checkpoint_run(run_id)
    assert timeouts == [pytest.approx(10), 10 + 3 * 30.0, 10 + 30.0 + 30.0]  # (Adam: twice the parameters)
    timeouts.clear()
    result = await asyncio.to_thread(CliRunner().invoke, app, ["checkpoint", "run-small", "--server", "127.0.0.1:1"])
    assert result.exit_code == 0, result.output
    assert timeouts == [pytest.approx(10)]


async def test_checkpoint_without_data_dir_is_failed_precondition(client: PsClient) -> None:
    run = await client.create_run(make_spec(num_workers=1))
    with pytest.raises(errors.FailedPrecondition) as err:
        await client.checkpoint_run(run.run_id)
    assert err.value.reason == pb.ERROR_REASON_NO_DATA_DIR
    assert "--data-dir" in err.value.message



async def test_a_run_created_is_on_disk_when_create_run_answers(server_config: ServerConfig, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that dies before a run's first periodic checkpoint (a copy of its data directory,
    as a kill -9 would leave it, read by another server) still has the run, from the moment
    CreateRun answered: it answered before the first checkpoint was written (seconds for a large
    model), and a server killed then lost the run its client had been given."""
    import time

    config = with_config(server_config, data_dir=str(tmp_path / "data"), checkpoint_every=50)
    ps = await start_server(config)
    try:
        assert ps.checkpointer is not None
        write = ps.checkpointer.store.write

        def slow(*args: Any) -> Any:  # (a large model's write)
            time.sleep(0.5)
            return write(*args)

        monkeypatch.setattr(ps.checkpointer.store, "write", slow)
        async with PsClient(f"127.0.0.1:{ps.port}") as c:
            run = await c.create_run(make_spec(num_workers=1, staleness=1, iterations=10))
        shutil.copytree(tmp_path / "data", tmp_path / "left")  # what a kill -9 now would leave
    finally:
        await ps.stop(0)
    again = await start_server(with_config(config, port=0, data_dir=str(tmp_path / "left")))
    try:
        async with PsClient(f"127.0.0.1:{again.port}") as c:
            assert (await c.get_run(run.run_id)).state == pb.RUN_STATE_PENDING
    finally:
        await again.stop(0)


async def test_a_create_run_whose_deadline_passes_leaves_no_run(server_config: ServerConfig, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A large Adam run on a slow disk: CreateRun waits for the first checkpoint (parameters and
    twice their size of state), past the deadline the SDK gave it for drawing the parameters
    only. The client was told DEADLINE_EXCEEDED and nothing more, and the run stayed: registered,
    joined by workers, trained with no one following it (a retry made a second). The SDK's
    deadline counts the checkpoint; one that passes says what happened, and no run is left, in
    memory or on disk."""
    import threading
    import time

    config = with_config(server_config, data_dir=str(tmp_path), checkpoint_every=50)
    ps = await start_server(config)
    try:
        assert ps.checkpointer is not None
        write = ps.checkpointer.store.write
        landed = threading.Event()

        def slow(*args: Any) -> Any:  # (a 4 GiB Adam run's 12 GiB on a slow disk)
            time.sleep(1.0)
            try:
                return write(*args)
            finally:
                landed.set()

        monkeypatch.setattr(ps.checkpointer.store, "write", slow)
        spec = make_spec(num_workers=1, staleness=1, iterations=10,
                         optimizer=pb.OptimizerSpec(adam=pb.AdamConfig(learning_rate=0.1)))
        async with PsClient(f"127.0.0.1:{ps.port}", timeout=0.3) as c:
            with pytest.raises(errors.DeadlineExceeded, match="most likely no run was created.*--timeout"):
                await c.create_run(spec)
            assert await asyncio.to_thread(landed.wait, 10)
            deadline = time.monotonic() + 10
            while ps.registry.runs() or any(tmp_path.glob("run-*")) or any(tmp_path.glob(".deleted-*")):
                assert time.monotonic() < deadline, "the run of the CreateRun given up on is still there"
                await asyncio.sleep(0.05)
            assert (await c.list_runs()) == []
        # The deadline counts the checkpoint: parameters, and the optimizer's state (Adam: twice them).
        timeouts: list[float] = []
        monkeypatch.setattr(PsClient, "_call", lambda self, *a, timeout: timeouts.append(timeout) or _created())
        gib = pb.ParamSpec(name="w", shape=[1 << 28])  # 1 GiB of float32
        for optimizer in (pb.OptimizerSpec(sgd=pb.SgdConfig(learning_rate=0.1)),
                          pb.OptimizerSpec(adam=pb.AdamConfig(learning_rate=0.1))):
            await PsClient("127.0.0.1:1", timeout=10).create_run(pb.RunSpec(params=[gib], optimizer=optimizer))
        assert timeouts == [10 + 2 * 30.0, 10 + 4 * 30.0]
    finally:
        await ps.stop(0)


async def test_a_create_run_answered_as_its_deadline_passed_says_to_check_the_runs(
        server_config: ServerConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """CreateRun is not retried (nothing in the SDK, psctl or the workers does: a retry would create
    a second run) and its timeout said 'no run was created': true of a call the server gave up on
    before it answered, not of one answered as the deadline passed, and a user who believed it
    created the run twice. The error says to look for it (psctl runs) before creating it again."""
    from ps_server.control import Control

    create, answered, released = Control.CreateRun, asyncio.Event(), asyncio.Event()

    async def late(self: Control, request: pb.CreateRunRequest) -> pb.CreateRunResponse:
        response = await create(self, request)
        answered.set()
        await released.wait()  # (the answer on its way while the client's deadline passes)
        return response

    monkeypatch.setattr(Control, "CreateRun", late)
    ps = await start_server(server_config)
    try:
        async with PsClient(f"127.0.0.1:{ps.port}", timeout=0.5) as c:
            with pytest.raises(errors.DeadlineExceeded, match=r"check the runs \(psctl runs\) for a new run named "
                                                              "'late' before creating it again"):
                await c.create_run(make_spec(num_workers=1, name="late"))
            assert answered.is_set() and [r.spec.name for r in await c.list_runs()] == ["late"]
    finally:
        released.set()
        await ps.stop(0)


async def test_a_run_whose_first_checkpoint_cannot_be_written_is_not_created(
        server_config: ServerConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk at CreateRun: the run was created all the same, one a restart would lose."""
    ps = await start_server(with_config(server_config, data_dir=str(tmp_path)))
    try:
        assert ps.checkpointer is not None

        def full(*args: Any) -> Any:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(ps.checkpointer.store, "write", full)
        async with PsClient(f"127.0.0.1:{ps.port}") as c:
            with pytest.raises(errors.PsError, match="No space left on device; no run was created") as e:
                await c.create_run(make_spec(num_workers=1))
            assert e.value.code == errors.Code.INTERNAL and (await c.list_runs()) == []
    finally:
        await ps.stop(0)


async def _created() -> pb.CreateRunResponse:
    return pb.CreateRunResponse()


async def test_a_last_checkpoint_that_fails_leaves_the_others_written(server_config: ServerConfig, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ps = await start_server(with_config(server_config, data_dir=str(tmp_path), checkpoint_every=0))
    async with PsClient(f"127.0.0.1:{ps.port}") as c:
        first, second = [(await c.create_run(make_spec(num_workers=1))).run_id for _ in range(2)]
    assert ps.checkpointer is not None
    await ps.checkpointer.drain()
    real = ps.checkpointer.checkpoint_now

    failed: list[str] = []

    async def full_disk(run: Any, reason: str, cut: int | None = None, final: bool = False) -> Any:
        if not failed:  # the first run's last checkpoint does not fit
            failed.append(run.run_id)
            raise OSError(28, "No space left on device")
        return await real(run, reason, cut, final)

    monkeypatch.setattr(ps.checkpointer, "checkpoint_now", full_disk)
    with pytest.raises(OSError, match="No space"):
        await ps.stop(0)
    (other,) = {first, second} - set(failed)
    store = ps.checkpointer.store
    assert store.load(store._checkpoints(tmp_path / other)[0]).meta["final"]  # the other run's last one


async def test_a_run_deleted_during_the_last_checkpoints_is_no_failure(server_config: ServerConfig, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped run whose final checkpoint had failed is written again at shutdown; deleted
    meanwhile (a DeleteRun under way), that last checkpoint was refused, NOT_FOUND, and the
    server's stop failed (ps-server exited 2) over a run that was meant to go."""
    import threading
    import time

    ps = await start_server(with_config(server_config, data_dir=str(tmp_path)))
    assert ps.checkpointer is not None
    checkpointer = ps.checkpointer
    async with PsClient(f"127.0.0.1:{ps.port}") as c:
        run = await c.create_run(make_spec(num_workers=1))
        await c.stop_run(run.run_id)
    checkpointer.behind.add(run.run_id)  # (its final checkpoint did not fit the disk)
    delete = checkpointer.store.delete
    deleting = threading.Event()

    def slow(run_id: str) -> str:
        deleting.set()
        time.sleep(0.5)
        return delete(run_id)

    monkeypatch.setattr(checkpointer.store, "delete", slow)
    deleted = asyncio.ensure_future(checkpointer.delete(run.run_id, lambda: ps.registry.remove(run.run_id)))
    assert await asyncio.to_thread(deleting.wait, 10)
    await ps.stop(0)
    await deleted
    assert checkpointer.store.latest() == []


async def test_a_second_server_on_a_data_directory_in_use_is_refused(server_config: ServerConfig,
                                                                     tmp_path: Path) -> None:
    """Two servers on one directory would resume the same runs and overwrite each other's
    checkpoints: the second is refused, naming the first; once that one stopped, it may start."""
    config = with_config(server_config, data_dir=str(tmp_path))
    first = await start_server(config)
    try:
        with pytest.raises(ConfigError, match=rf"in use by another ps-server \(pid {os.getpid()}\)"):
            await start_server(with_config(config, port=0))
    finally:
        await first.stop(0)
    second = await start_server(with_config(config, port=0))
    await second.stop(0)


async def test_a_server_that_failed_to_start_leaves_its_data_directory_free(server_config: ServerConfig,
                                                                            tmp_path: Path) -> None:
    """A start that failed after the data directory was locked (its port in use) kept the lock for
    as long as its error was referenced: the next start in the process, on a free port, was
    refused as 'in use by another ps-server', naming this very process."""
    import socket

    config = with_config(server_config, data_dir=str(tmp_path))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError, match="cannot listen") as failed:
            await start_server(with_config(config, port=busy.getsockname()[1]))
    assert failed.value is not None  # (still referenced, as an embedder holding it would)
    again = await start_server(with_config(config, port=0))
    await again.stop(0)


async def test_a_run_of_another_cluster_is_left_as_it_is(server_config: ServerConfig, tmp_path: Path) -> None:
    """A run placed over two servers, its data directory given to a lone server (a wrong
    --cluster): the run is failed, 'restart the servers with the --cluster list it was created on
    to resume it', but its failure was checkpointed too, so that the right cluster resumed it
    failed. Its checkpoints are left as they were."""

    from ps_server.core import snapshot
    from ps_server.core.checkpoint import CheckpointStore
    from ps_server.core.placement import Placement, place
    from ps_server.core.run import Run
    from ps_server.core.spec import ParamSpec, RunSpec
    from ps_server.core.store import ParamStore

    spec = RunSpec(name="c", num_workers=1, iterations=20, params=(ParamSpec("w", (4, 3)), ParamSpec("b", (3,))))
    placement = Placement(place(spec.params, 2, 1), 0)
    run = Run("run-placed", spec, placement=placement, store=ParamStore(placement.held(spec.params), 0))
    CheckpointStore(tmp_path).write(*snapshot.state_dict(run))
    ps = await start_server(with_config(server_config, data_dir=str(tmp_path)))
    try:
        async with PsClient(f"127.0.0.1:{ps.port}") as c:
            got = await c.get_run(run.run_id)
            assert got.state == pb.RUN_STATE_FAILED and "--cluster list it was created on" in got.message
    finally:
        await ps.stop(0)
    (left,) = CheckpointStore(tmp_path).latest()
    assert left.path.name == "ckpt-0000000001" and left.meta["state"] == "pending"


async def test_a_stop_answered_is_on_disk_and_a_new_bound_soon_after(server_config: ServerConfig,
                                                                     tmp_path: Path) -> None:
    """StopRun answers once the run's final checkpoint is written (a server killed right after
    resumed the run as running); UpdateRun schedules one (a restart kept the old bound), which
    keeps the bound it replaced too (tightest_staleness: what psctl simulate replays under)."""
    config = with_config(server_config, data_dir=str(tmp_path / "data"), checkpoint_every=0)
    ps = await start_server(config)
    try:
        async with PsClient(f"127.0.0.1:{ps.port}") as c:
            stopped = await c.create_run(make_spec(num_workers=1, staleness=2))
            changed = await c.create_run(make_spec(num_workers=1, staleness=2))
            await c.stop_run(stopped.run_id, "enough")
            shutil.copytree(tmp_path / "data", tmp_path / "left")  # what a kill -9 now would leave
            await c.update_run(changed.run_id, staleness=5)
            assert ps.checkpointer is not None
            await ps.checkpointer.written(changed.run_id)
            shutil.copytree(tmp_path / "data", tmp_path / "later")
    finally:
        await ps.stop(0)
    for left, run_id, check in ((tmp_path / "left", stopped.run_id, lambda r: r.state == pb.RUN_STATE_STOPPED),
                                (tmp_path / "later", changed.run_id,
                                 lambda r: (r.spec.staleness, r.tightest_staleness, r.loosest_staleness) == (5, 2, 5))):
        again = await start_server(with_config(config, port=0, data_dir=str(left)))
        try:
            async with PsClient(f"127.0.0.1:{again.port}") as c:
                assert check(await c.get_run(run_id)), left.name
        finally:
            await again.stop(0)


async def test_a_stop_whose_checkpoint_failed_is_written_at_shutdown(server_config: ServerConfig, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk was full when a run was stopped (its final checkpoint failed: an event); space
    freed, the server stopped gracefully: its last checkpoints wrote unfinished runs only, and the
    restarted server resumed the stopped run as running, from the checkpoint before."""
    config = with_config(server_config, data_dir=str(tmp_path), checkpoint_every=0)
    ps = await start_server(config)
    try:
        async with PsClient(f"127.0.0.1:{ps.port}") as c:
            run = await c.create_run(make_spec(num_workers=1))
            assert ps.checkpointer is not None
            await ps.checkpointer.drain()
            store = ps.checkpointer.store
            real = store.write

            def full(*args: Any) -> Any:
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(store, "write", full)
            stopped = await c.stop_run(run.run_id, "enough")
            assert stopped.state == pb.RUN_STATE_STOPPED
            monkeypatch.setattr(store, "write", real)  # space freed
    finally:
        await ps.stop(0)
    again = await start_server(with_config(config, port=0))
    try:
        async with PsClient(f"127.0.0.1:{again.port}") as c:
            assert (await c.get_run(run.run_id)).state == pb.RUN_STATE_STOPPED
    finally:
        await again.stop(0)
