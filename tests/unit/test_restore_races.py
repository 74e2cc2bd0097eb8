"""A run going back to a checkpoint (``cluster.shards.restore``) while a call acts on it: each
test holds the restore at one of its awaits (a thread it waits for) and lets the call in there."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from paramserver.v1 import cluster_pb2 as cpb
from paramserver.v1 import paramserver_pb2 as pb
from ps_server.checkpointer import Checkpointer
from ps_server.cluster.shards import ShardService, restore
from ps_server.control import Control
from ps_server.core.checkpoint import CheckpointStore
from ps_server.core.errors import FailedPrecondition
from ps_server.core.registry import RunRegistry
from ps_server.core.run import Run
from ps_server.core.spec import ParamSpec, RunSpec
from ps_server.core.status import RunState

pytestmark = pytest.mark.timeout(60)


def _run() -> Run:
    """A run of two ranks at min clock 3."""
    run = Run("run-rb", RunSpec(name="rb", num_workers=2, iterations=20, staleness=1, params=(ParamSpec("w", (3,)),)))
    incs = [run.join("a").incarnation, run.join("b").incarnation]
    for clock in range(3):
        for rank, inc in enumerate(incs):
            run.push(rank, inc, clock, {"w": np.ones(3, np.float32)}, 0)
    return run


def _held(store: CheckpointStore, name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """``store.<name>`` made to wait, in its thread, until the second event is set; the first is
    set once it is waiting."""
    entered, go = threading.Event(), threading.Event()
    real = getattr(store, name)

    def held(*args: object) -> object:
        entered.set()
        go.wait(30)
        return real(*args)

    monkeypatch.setattr(store, name, held)
    return entered, go


async def _until(ready: Callable[[], bool]) -> None:
    while not ready():
        await asyncio.sleep(0)


async def _registered(tmp_path: Path) -> tuple[RunRegistry, Checkpointer, str]:
    store = CheckpointStore(tmp_path)
    checkpointer = Checkpointer(store, every=0)
    registry = RunRegistry(configure=checkpointer.attach)
    run = registry.add(_run())  # its first checkpoint: cut 3, its min clock
    await checkpointer.written(run.run_id)
    return registry, checkpointer, run.run_id


async def test_a_run_stopped_while_its_later_checkpoints_are_discarded_stays_stopped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """StopRun between the restore's check and its end (the checkpoints past the cut being deleted)
    stopped the run replaced: the run put in its place went on RUNNING, the stop answered and lost."""
    registry, checkpointer, run_id = await _registered(tmp_path)
    entered, go = _held(checkpointer.store, "discard_after", monkeypatch)
    restoring = asyncio.create_task(restore(registry, checkpointer, run_id, 3, "back to cut 3"))
    assert await asyncio.to_thread(entered.wait, 30)
    registry.get(run_id).stop("stopped by user")  # StopRun's step
    go.set()
    restored = await restoring
    assert registry.get(run_id) is restored
    assert (restored.state, restored.message) == (RunState.STOPPED, "stopped by user")
    await checkpointer.written(run_id)  # its final checkpoint, as the stop's would have been
    assert [c.meta["state"] for c in checkpointer.store.latest()] == ["stopped"]


async def test_a_shard_deleted_while_its_later_checkpoints_are_discarded_stays_deleted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeleteShard (DeleteRun --force on server 0 during a roll back) between the restore's check
    and its end forgot the shard at once and waited for the restore to delete its files: the
    restore then registered the checkpoint's run, a shard of a deleted run held for ever."""
    registry, checkpointer, run_id = await _registered(tmp_path)
    shards = ShardService(registry, ["a:1", "b:1"], 1, lambda: 0, checkpointer)
    entered, go = _held(checkpointer.store, "discard_after", monkeypatch)
    restoring = asyncio.create_task(restore(registry, checkpointer, run_id, 3, "back to cut 3"))
    assert await asyncio.to_thread(entered.wait, 30)
    deleting = asyncio.create_task(shards.DeleteShard(cpb.DeleteShardRequest(run_id=run_id)))
    await _until(lambda: registry.find(run_id) is None)
    go.set()
    with pytest.raises(FailedPrecondition, match="deleted"):
        await restoring
    await deleting
    assert registry.find(run_id) is None and registry.held_bytes() == 0
    assert checkpointer.store.latest() == [] and list(tmp_path.iterdir()) == []


async def test_a_run_deleted_while_its_checkpoint_loads_is_not_checkpointed_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeleteRun --force while a roll back loaded the run's checkpoint stopped the run; the restore,
    finding it stopped, gave it back its checkpoints for its final one, which landed after the
    deletion (waiting for the restore's lock) had removed the run's directory: the deleted run came
    back at the next start."""
    registry, checkpointer, run_id = await _registered(tmp_path)
    control = Control(registry, max_wait=1.0, heartbeat_seconds=1.0, lease_seconds=5.0, checkpointer=checkpointer)
    entered, go = _held(checkpointer.store, "load_cut", monkeypatch)
    restoring = asyncio.create_task(restore(registry, checkpointer, run_id, 3, "back to cut 3"))
    assert await asyncio.to_thread(entered.wait, 30)
    deleting = asyncio.create_task(control.DeleteRun(pb.DeleteRunRequest(run_id=run_id, force=True)))
    await _until(lambda: run_id in checkpointer._asked and checkpointer._asked[run_id].locked())  # at the run's lock
    go.set()
    with pytest.raises(FailedPrecondition, match="ended or changed"):
        await restoring
    await deleting
    await asyncio.gather(*(asyncio.all_tasks() - {asyncio.current_task()}))  # what either left going
    assert registry.find(run_id) is None
    assert checkpointer.store.latest() == [] and list(tmp_path.iterdir()) == []
