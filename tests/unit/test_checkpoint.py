"""Checkpoint files: round trip, corruption is skipped loudly, a crash mid-write never loses the last one."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import rename_refusing_deletions, unlink_holding_arrays

from ps_server.checkpointer import Checkpointer
from ps_server.core import checkpoint, snapshot
from ps_server.core.checkpoint import CheckpointStore, CorruptCheckpoint
from ps_server.core.errors import FailedPrecondition, NotFound
from ps_server.core.run import Run
from ps_server.core.spec import Initializer, OptimizerConfig, OptimizerKind, ParamSpec, RunSpec
from ps_server.snapshot_budget import SnapshotBudget

pytestmark = pytest.mark.timeout(120)


def make_run(staleness: int = 1) -> Run:
    spec = RunSpec(name="c", num_workers=2, iterations=20, staleness=staleness, seed=3,
                   params=(ParamSpec("w", (4, 3), Initializer.NORMAL, 1.0), ParamSpec("b", (3,))),
                   optimizer=OptimizerConfig(OptimizerKind.ADAM, 0.01))
    run = Run("run-ck", spec)
    a, b = run.join("a"), run.join("b")
    for clock in range(3):
        for rank, inc in ((0, a.incarnation), (1, b.incarnation)):
            run.push(rank, inc, clock, {"w": np.full((4, 3), clock + rank, np.float32),
                                        "b": np.ones(3, np.float32)}, 0)
    return run


def test_round_trip_restores_params_optimizer_clocks_and_dedup(tmp_path: Path) -> None:
    run = make_run()
    store = CheckpointStore(tmp_path)
    path = store.write(*snapshot.state_dict(run))
    ck = store.load(path)
    again = snapshot.restore(json.loads(json.dumps(ck.meta)), ck.arrays)
    for name in run.store.params:
        assert again.store.params[name].tobytes() == run.store.params[name].tobytes()
    for key, arr in run.optimizer.state_arrays().items():
        assert again.optimizer.state_arrays()[key].tobytes() == arr.tobytes()
    assert again.optimizer.steps == run.optimizer.steps == 6
    assert [w.clock for w in again.status().workers] == [3, 3]
    assert again.counters == run.counters  # (staleness statistics; the clock records are not kept)
    inc = again.status().workers[0].incarnation
    assert again.push(0, inc, 2, {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}, 0).duplicate
    # The same next push gives the same parameters on both.
    g = {"w": np.full((4, 3), 0.5, np.float32), "b": np.ones(3, np.float32)}
    run.push(0, inc, 3, g, 0)
    again.push(0, inc, 3, g, 0)
    assert again.store.params["w"].tobytes() == run.store.params["w"].tobytes()


def test_the_bounds_a_run_was_under_survive_and_older_manifests_still_load(tmp_path: Path) -> None:
    """A resumed run keeps the tightest and loosest bound it had (GetRun's tightest_staleness,
    loosest_staleness), not only the bound now; a manifest of before them starts from the bound it
    holds; malformed ones are refused (the older checkpoint is used)."""
    run = make_run(staleness=1)
    run.set_staleness(4)
    store = CheckpointStore(tmp_path)
    ck = store.load(store.write(*snapshot.state_dict(run)))
    again = snapshot.restore(json.loads(json.dumps(ck.meta)), ck.arrays)
    assert again.spec.staleness == 4 and again.bounds == again.status().bounds == (1, 4)
    again.set_staleness(2)
    assert again.bounds == (1, 4)
    meta, arrays = snapshot.state_dict(run)
    del meta["bounds"]
    assert snapshot.restore(meta, arrays).bounds == (4, 4)
    for bad in ([1], [1, -2], ["1", 4], [1, True], None, [4, 1], [-1, 3]):
        with pytest.raises(TypeError, match="staleness bounds"):
            snapshot.restore({**meta, "bounds": bad}, arrays)


def test_bsp_held_gradients_survive(tmp_path: Path) -> None:
    run = make_run(staleness=0)
    inc = run.status().workers[0].incarnation
    run.push(0, inc, 3, {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}, 0)
    store = CheckpointStore(tmp_path)
    ck = store.load(store.write(*snapshot.state_dict(run)))
    again = snapshot.restore(ck.meta, ck.arrays)
    inc1 = run.status().workers[1].incarnation
    g = {"w": np.full((4, 3), 2.0, np.float32), "b": np.ones(3, np.float32)}
    run.push(1, inc1, 3, g, 0)
    again.push(1, inc1, 3, g, 0)
    assert again.store.params["w"].tobytes() == run.store.params["w"].tobytes()


def test_the_bound_each_rank_was_told_survives(tmp_path: Path) -> None:
    """Rank 0 reads clock 4 under s = 5 (rank 1 at clock 0); UpdateRun lowers s to 1 and writes a
    checkpoint; the server restarts from it. Rank 0's push of clock 4, computed under 5, was
    accepted before the restart and refused (STALENESS_BOUND) after it: the worker pulled and computed it again."""
    spec = RunSpec(name="c", num_workers=2, iterations=20, staleness=5, params=(ParamSpec("b", (3,)),))
    run = Run("run-told", spec)
    a, b = run.join("a"), run.join("b")
    g = {"b": np.ones(3, np.float32)}
    for clock in range(4):
        run.read(0, clock, None)
        run.push(0, a.incarnation, clock, g, 0)
    run.read(0, 4, None)
    run.set_staleness(1)
    store = CheckpointStore(tmp_path)
    ck = store.load(store.write(*snapshot.state_dict(run)))
    again = snapshot.restore(ck.meta, ck.arrays)
    assert again.push(0, a.incarnation, 4, g, 0).clock == run.push(0, a.incarnation, 4, g, 0).clock == 5
    with pytest.raises(FailedPrecondition, match="staleness 1"):  # told 1 by that answer: from now on, 1 holds
        again.push(0, a.incarnation, 5, g, 0)
    assert again.push(1, b.incarnation, 0, g, 0).clock == 1
    del ck.meta["slots"][0]["told"]  # a checkpoint from before: the bound in force
    with pytest.raises(FailedPrecondition, match="staleness 1"):
        snapshot.restore(ck.meta, ck.arrays).push(0, a.incarnation, 4, g, 0)


def test_where_a_shard_admitted_a_rank_survives(tmp_path: Path) -> None:
    """A cluster's BSP shard combined clock 0 without evicted rank 1, and server 0 handed the rank
    over at clock 0: the shard admitted it at 1 (``Slot.start``, what its UpdateShard answers for
    server 0 to start it there too), then stopped gracefully before server 0 had that answer, and
    resumed from its final checkpoint. The start was not kept: the answer server 0 asked again
    said 0, server 0 held the rank from clock 0 and the shard from 1 (the worker's pulls got two
    guaranteed clocks, retried for ever), and server 0's update of the start was an event again. A
    checkpoint of before it was kept still loads; a start past the rank's clock does not fit."""
    from ps_server.core.placement import Placement, place
    from ps_server.core.shard import RankUpdate, ShardRun
    from ps_server.core.status import RunState, WorkerState

    spec = RunSpec(name="c", num_workers=2, iterations=20, staleness=0,
                   params=(ParamSpec("w", (2, 3)), ParamSpec("b", (3,))))
    shard = ShardRun("run-sh", spec, placement=Placement(place(spec.params, 2, 1 << 20), 1))
    g = {"b": np.ones(3, np.float32)}
    shard.mirror([RankUpdate(0, 1, WorkerState.ACTIVE, 0), RankUpdate(1, 2, WorkerState.ACTIVE, 0)],
                 RunState.RUNNING, "")
    shard.push(0, 1, 0, g, 0)
    shard.mirror([RankUpdate(1, 2, WorkerState.EVICTED, 0)], RunState.RUNNING, "")
    shard.mirror([RankUpdate(1, 3, WorkerState.ACTIVE, 0, "again")], RunState.RUNNING, "")
    assert [s.start for s in shard.clock.slots] == [0, 1]
    store = CheckpointStore(tmp_path)
    ck = store.load(store.write(*snapshot.state_dict(shard)))
    again = snapshot.restore(json.loads(json.dumps(ck.meta)), ck.arrays)
    assert isinstance(again, ShardRun) and [s.start for s in again.clock.slots] == [0, 1]
    events = len(again.history.events)
    again.mirror([RankUpdate(1, 3, WorkerState.ACTIVE, 1, "again", start=1)], RunState.RUNNING, "")
    assert len(again.history.events) == events  # (it holds the rank from there already)
    for slot in ck.meta["slots"]:
        del slot["start"]  # a checkpoint from before: its ranks' starts unknown, 0 as before
    assert [s.start for s in snapshot.restore(ck.meta, ck.arrays).clock.slots] == [0, 0]
    ck.meta["slots"][1]["start"] = 2
    with pytest.raises(ValueError, match="start"):
        snapshot.restore(ck.meta, ck.arrays)


def test_the_incarnation_a_rank_replaced_survives(tmp_path: Path) -> None:
    """Server 0 says a push was torn across servers by comparing the clock a rank's replaced
    incarnation ended at here (``Slot.replaced``) with the one another server answers
    (``UpdateShardResponse.replaced``). It was not kept: after a restart from a checkpoint server 0
    knew no replaced incarnation, and a push the replaced one had stopped in the middle of went
    unsaid. A checkpoint of before it was kept still loads (none known, as before); a replaced
    incarnation that is no pair of counts does not fit."""
    from types import SimpleNamespace

    from paramserver.v1 import cluster_pb2 as cpb
    from ps_server.cluster.owner import ClusterOwner
    from ps_server.core.registry import RunRegistry
    from ps_server.core.status import WorkerState

    run = make_run()  # both ranks at clock 3
    slot = run.clock.slots[1]
    old = slot.incarnation
    run.clock.set_state(slot, WorkerState.EVICTED)
    run.join("c")
    assert slot.replaced == (old, 3)
    store = CheckpointStore(tmp_path)
    ck = store.load(store.write(*snapshot.state_dict(run)))
    again = snapshot.restore(json.loads(json.dumps(ck.meta)), ck.arrays)
    assert [s.replaced for s in again.clock.slots] == [None, (old, 3)]
    registry = RunRegistry()
    registry.add(again)
    owner = ClusterOwner(registry, ["a", "b"], [], split_bytes=0, shard_timeout=30, data_port=lambda: 0)
    peer = SimpleNamespace(index=1, name="server 1")  # (it got the replaced incarnation's push of clock 3)
    owner._torn_replaced(again, peer, [cpb.ReplacedRank(rank=1, incarnation=old, clock=4)])  # type: ignore[arg-type]
    assert [e.message for e in again.history.events if e.kind == "torn_push"] == [
        f"rank 1 (incarnation {old}) stopped in the middle of a push: server 1 has it at clock 4, server 0 at 3; "
        "each server applies its part of a push by itself, so the gradient of clock 3 was applied on some only"]
    ck = store.load(store.write(*snapshot.state_dict(again)))  # restarted once more: said once, not again
    again = snapshot.restore(ck.meta, ck.arrays)
    registry.add(again)
    owner = ClusterOwner(registry, ["a", "b"], [], split_bytes=0, shard_timeout=30, data_port=lambda: 0)
    owner._torn_replaced(again, peer, [cpb.ReplacedRank(rank=1, incarnation=old, clock=4)])  # type: ignore[arg-type]
    assert [e.kind for e in again.history.events].count("torn_push") == 1
    for d in ck.meta["slots"]:
        del d["replaced"]  # a checkpoint from before: no replaced incarnation known, as before
    assert [s.replaced for s in snapshot.restore(ck.meta, ck.arrays).clock.slots] == [None, None]
    ck.meta["slots"][1]["replaced"] = [old]
    with pytest.raises(TypeError, match="replaced"):
        snapshot.restore(ck.meta, ck.arrays)


def test_the_token_of_the_join_that_took_a_rank_survives(tmp_path: Path) -> None:
    """A Join whose answer was lost as the server stopped (its last checkpoint holds the new
    incarnation) is asked again of the restarted server with the same join_token: it gets the rank
    that Join took, not the other vacant one (the token was not kept: a second rank, and the first
    had no worker until its lease ran out). Heard from, the rank is no Join's over a restart either;
    a checkpoint of before the token was kept loads with none, as before."""
    from ps_server.core.registry import RunRegistry

    spec = RunSpec(name="c", num_workers=2, iterations=20, staleness=1, params=(ParamSpec("w", (3,)),))
    run = Run("run-ck", spec)
    a = run.join("a", join_token="t-a")
    store = CheckpointStore(tmp_path)
    ck = store.load(store.write(*snapshot.state_dict(run)))
    registry = RunRegistry()
    registry.add(snapshot.restore(json.loads(json.dumps(ck.meta)), ck.arrays))
    assert registry.join("a", join_token="t-a") == a == registry.join("a", "run-ck", join_token="t-a")
    again = registry.get("run-ck")
    assert [e.rank for e in again.history.events if e.kind == "joined"] == [0]
    assert again.clock.vacant() == [again.clock.slots[1]]
    again.heartbeat(a.rank, a.incarnation)  # (its worker had the answer)
    ck = store.load(store.write(*snapshot.state_dict(again)))
    assert snapshot.restore(ck.meta, ck.arrays).joined("t-a") is None
    ck = store.load(store.write(*snapshot.state_dict(run)))
    for d in ck.meta["slots"]:
        del d["join_token"]  # a checkpoint from before: no token known, as before
    assert [s.join_token for s in snapshot.restore(ck.meta, ck.arrays).clock.slots] == ["", ""]
    ck.meta["slots"][0]["join_token"] = 7
    with pytest.raises(TypeError, match="join token"):
        snapshot.restore(ck.meta, ck.arrays)


@pytest.mark.parametrize("done", [False, True])
def test_a_torn_push_is_said_once_over_a_restart(tmp_path: Path, done: bool) -> None:
    """Server 0 says a push a rank stopped in the middle of, comparing its clock of the rank with
    another server's (``_torn_pushes``), once: which it said was kept in memory only, and restarted
    from a checkpoint that holds the event it said it again at its next poll. An evicted rank's
    push, and a done rank's pushes the other server is to go on without (told again, as it may not
    have been before the restart; not said again)."""
    from types import SimpleNamespace

    from ps_server.cluster import messages
    from ps_server.cluster.owner import ClusterOwner
    from ps_server.core.registry import RunRegistry
    from ps_server.core.status import WorkerState

    run = make_run()  # both ranks at clock 3
    run.clock.set_state(run.clock.slots[1], WorkerState.DONE if done else WorkerState.EVICTED)
    peer = SimpleNamespace(index=1, name="server 1")  # (it got rank 1's push of clock 3; done: not that of 2)
    store = CheckpointStore(tmp_path)
    for _ in range(2):  # restarted from its checkpoint once
        registry = RunRegistry()
        registry.add(run)
        owner = ClusterOwner(registry, ["a", "b"], [], split_bytes=0, shard_timeout=30, data_port=lambda: 0,
                             lease=-1.0)  # (its worker silent for longer than a lease)
        owner._sent[(run.run_id, 1)] = (tuple(messages.rank_updates(run)), run.state, run.message)  # (its UpdateShard)
        assert owner._torn_pushes(run, peer, [3, 2 if done else 4]) is done  # type: ignore[arg-type]
        ck = store.load(store.write(*snapshot.state_dict(run)))
        run = snapshot.restore(ck.meta, ck.arrays)
    torn = [e.message for e in run.history.events if e.kind == "torn_push"]
    assert len(torn) == 1, torn
    assert torn[0].startswith("rank 1 (incarnation 2) finished, but its pushes of clocks 2..2 never reached server 1"
                              if done else "rank 1 (incarnation 2) stopped in the middle of a push: server 1 has it "
                              "at clock 4, server 0 at 3"), torn


def test_keeps_the_newest_k(tmp_path: Path) -> None:
    run = make_run()
    store = CheckpointStore(tmp_path, keep=2)
    paths = [store.write(*snapshot.state_dict(run)) for _ in range(4)]
    assert sorted(p.name for p in (tmp_path / "run-ck").iterdir()) == [paths[2].name, paths[3].name]


@pytest.mark.parametrize("damage", ["truncate-arrays", "flip-byte", "bad-manifest", "no-manifest", "wrong-hash"])
def test_corrupt_checkpoint_is_skipped_loudly_for_the_older_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    run = make_run()
    store = CheckpointStore(tmp_path)
    good = store.write(*snapshot.state_dict(run))
    inc = run.status().workers[0].incarnation
    run.push(0, inc, 3, {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}, 0)
    bad = store.write(*snapshot.state_dict(run))
    npz, manifest = bad / "arrays.npz", bad / "manifest.json"
    if damage == "truncate-arrays":
        npz.write_bytes(npz.read_bytes()[:100])
    elif damage == "flip-byte":
        data = bytearray(npz.read_bytes())
        data[len(data) // 2] ^= 0xFF
        npz.write_bytes(bytes(data))
    elif damage == "bad-manifest":
        manifest.write_text("{not json")
    elif damage == "no-manifest":
        manifest.unlink()
    else:
        doc = json.loads(manifest.read_text())
        doc["arrays_sha256"] = "0" * 64
        manifest.write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpoint):
        store.load(bad)
    with caplog.at_level(logging.ERROR, logger="ps_server"):
        (found,) = store.latest()
    assert found.path == good
    assert f"skipping corrupt checkpoint {bad}" in caplog.text


def test_a_run_resumed_from_an_older_checkpoint_says_so_where_its_users_look(tmp_path: Path) -> None:
    """The newest checkpoint corrupt: the run resumed from the one before, and its event said only
    'resumed from its checkpoint at min clock 3' (the lost progress was in the server's log
    alone); psctl status now says which did not load and why."""
    run = make_run()
    store = CheckpointStore(tmp_path)
    store.write(*snapshot.state_dict(run))
    incs = [w.incarnation for w in run.status().workers]
    for rank, inc in enumerate(incs):
        run.push(rank, inc, 3, {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}, 0)
    bad = store.write(*snapshot.state_dict(run))
    (bad / "manifest.json").write_text("{not json")
    (resumed,) = Checkpointer(store, every=0).resume()
    event = [e for e in resumed.history.events if e.kind == "resumed"][-1]
    assert resumed.min_clock == 3 and "at min clock 3" in event.message
    assert f"{bad.name}: corrupt: unreadable manifest" in event.message and "progress lost" in event.message


WRITER = """
import sys, numpy as np
from pathlib import Path
from ps_server.core import snapshot
from ps_server.core.checkpoint import CheckpointStore
sys.path.insert(0, {tests!r})
from unit.test_checkpoint import make_run
run = make_run()
store = CheckpointStore(Path({root!r}), keep=2)
big = {{"pad": np.random.default_rng(0).random(2_000_000).astype(np.float32)}}
meta, arrays = snapshot.state_dict(run)
arrays.update(big)
store.write(meta, arrays)
print("ready", flush=True)
while True:
    store.write(meta, arrays)
"""


def test_crash_during_checkpoint_writes_always_leaves_a_valid_one(tmp_path: Path) -> None:
    """50 SIGKILLs at random points of a write loop: every 'restart' finds a valid checkpoint."""
    rng = random.Random(42)
    root = tmp_path / "data"
    tests_dir = str(Path(__file__).resolve().parent.parent)
    code = WRITER.format(tests=tests_dir, root=str(root))
    for trial in range(50):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", f"trial {trial}"
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        store = CheckpointStore(root, keep=2)
        found = store.latest()
        assert len(found) == 1, f"trial {trial}: no valid checkpoint"
        assert found[0].arrays["pad"].shape == (2_000_000,)


def test_a_crash_while_old_checkpoints_are_pruned_leaves_no_half_one(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Pruning removed an old checkpoint in place: a kill -9 midway left a ckpt- directory whose
    manifest said its cut and whose arrays were gone (a cluster's common cut, listed and not
    loadable). Every checkpoint left under its name loads."""
    import shutil

    run = make_run()
    store = CheckpointStore(tmp_path, keep=1)
    store.write(*snapshot.state_dict(run))

    def killed(path: Path, *args: object, **kw: object) -> None:  # (the process dies after the first file)
        (Path(path) / "arrays.npz").unlink(missing_ok=True)
        raise SystemExit("kill -9")

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(SystemExit):
        store.write(*snapshot.state_dict(run))
    monkeypatch.undo()
    names = store._checkpoints(tmp_path / run.run_id)
    assert [store.load(p).path for p in names] == names and store.cuts(run.run_id) == [3]
    assert len(store.latest()) == 1 and not list((tmp_path / run.run_id).glob(".tmp-*"))  # (cleared at start)


DELETER = """
import shutil, sys
from pathlib import Path
from ps_server.core.checkpoint import CheckpointStore
root = Path({root!r})
store = CheckpointStore(root)
print("ready", flush=True)
for i in range(10_000):
    shutil.copytree(root.parent / "kept", root / "run-ck")
    store.delete("run-ck")
"""


def test_a_crash_during_a_deletion_never_leaves_half_a_run(tmp_path: Path) -> None:
    """30 SIGKILLs at random points of a loop deleting a run of three checkpoints: every 'restart'
    resumes the run from its newest checkpoint, or not at all (removed in place, it could come
    back from an older one: deleted in part)."""
    import shutil

    rng = random.Random(7)
    run = make_run()
    kept = tmp_path / "kept"
    store = CheckpointStore(tmp_path / "build", keep=3)
    meta, arrays = snapshot.state_dict(run)
    arrays["pad"] = np.random.default_rng(0).random(500_000).astype(np.float32)
    for _ in range(3):
        newest = store.write(meta, arrays)
    shutil.copytree(newest.parent, kept)
    root = tmp_path / "data"
    root.mkdir()
    code = DELETER.format(root=str(root))
    for trial in range(30):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", f"trial {trial}"
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        found = CheckpointStore(root).latest()
        assert [ck.path.name for ck in found] in ([], [newest.name]), f"trial {trial}"
        shutil.rmtree(root / "run-ck", ignore_errors=True)


def test_a_runs_first_checkpoint_fsyncs_the_data_directory_too(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's directory is new: its entry in the data directory must reach the disk too, or a
    power cut after CreateRun answered loses the run with its checkpoint (the rename into place
    was fsynced in the run's directory only)."""
    synced: list[Path] = []
    fsync = checkpoint._fsync
    monkeypatch.setattr(checkpoint, "_fsync", lambda path: (synced.append(Path(path)), fsync(path))[1])
    store = CheckpointStore(tmp_path / "data")
    (tmp_path / "data").mkdir()
    first = store.write(*snapshot.state_dict(make_run()))
    assert tmp_path / "data" in synced and first.parent in synced
    synced.clear()
    store.write(*snapshot.state_dict(make_run()))
    assert synced[-1] == first.parent and tmp_path / "data" not in synced  # (once is enough)


def test_resume_falls_back_when_the_newest_checkpoint_does_not_fit_its_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint whose files are intact but whose content snapshot.restore refuses (here a
    running run with an Inf parameter) is skipped for the run's older one, not the whole run."""
    run = make_run()
    store = CheckpointStore(tmp_path)
    good = store.write(*snapshot.state_dict(run))
    meta, arrays = snapshot.state_dict(run)
    arrays["param/w"][0, 0] = np.inf
    bad = store.write(meta, arrays)
    with caplog.at_level(logging.ERROR, logger="ps_server"):
        (resumed,) = Checkpointer(store, every=0).resume()
    assert f"skipping checkpoint {bad}: it does not fit its run" in caplog.text
    assert resumed.run_id == run.run_id
    assert resumed.store.params["w"].tobytes() == store.load(good).arrays["param/w"].tobytes()


@pytest.mark.parametrize("damage", ["meta-a-list", "clock-a-string", "clock-negative", "slot-missing-field"])
def test_a_manifest_whose_content_is_malformed_is_skipped_for_the_older_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    """Intact files whose manifest holds the wrong kinds of values (another version's, or a
    writer's bug: its hash matches): the server starts and resumes the older checkpoint, instead
    of failing at start."""
    run = make_run()
    store = CheckpointStore(tmp_path)
    good = store.write(*snapshot.state_dict(run))
    bad = store.write(*snapshot.state_dict(run))
    doc = json.loads((bad / "manifest.json").read_text())
    if damage == "meta-a-list":
        doc["meta"] = []
    elif damage == "clock-a-string":
        doc["meta"]["slots"][0]["clock"] = "961"
    elif damage == "clock-negative":
        doc["meta"]["slots"][0]["clock"] = -5
    else:
        del doc["meta"]["slots"][1]["pushes"]
    doc["meta_sha256"] = checkpoint._meta_sha256(doc["meta"])  # (written so: the hash matches)
    (bad / "manifest.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.ERROR, logger="ps_server"):
        (resumed,) = Checkpointer(store, every=0).resume()
    assert f"skipping checkpoint {bad}: it does not fit its run" in caplog.text
    assert resumed.min_clock == run.min_clock and store.load(good).path == good


@pytest.mark.parametrize("damage", ["not-a-zip", "bad-member"])
def test_arrays_whose_hash_matches_but_do_not_load_are_skipped_for_the_older_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    """An arrays.npz whose SHA-256 and size are the manifest's but that is no readable archive
    (a writer's bug, another tool's copy): zipfile's BadZipFile is no OSError or ValueError, and
    it escaped ``load``: the server failed at start with a traceback instead of resuming the
    older checkpoint."""
    import hashlib

    run = make_run()
    store = CheckpointStore(tmp_path)
    good = store.write(*snapshot.state_dict(run))
    bad = store.write(*snapshot.state_dict(run))
    data = (bad / "arrays.npz").read_bytes()
    if damage == "not-a-zip":
        data = data[: len(data) // 2]
    else:  # a member's bytes changed under its CRC-32
        at = data.index(b"\x93NUMPY") + 80
        data = data[:at] + bytes(b ^ 0xFF for b in data[at : at + 8]) + data[at + 8 :]
    (bad / "arrays.npz").write_bytes(data)
    doc = json.loads((bad / "manifest.json").read_text())
    doc["arrays_sha256"], doc["arrays_bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (bad / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpoint, match="arrays.npz does not load"):
        store.load(bad)
    with caplog.at_level(logging.ERROR, logger="ps_server"):
        (resumed,) = Checkpointer(store, every=0).resume()
    assert f"skipping corrupt checkpoint {bad}" in caplog.text
    assert resumed.min_clock == run.min_clock and store.load(good).path == good


def test_a_run_whose_newest_checkpoint_is_of_a_newer_format_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server rolled back to an older version finds checkpoints a newer one wrote: it neither
    resumes the run from an older checkpoint (progress lost, and logged as corruption) nor
    writes beside it (its pruning then deleted the newer server's checkpoint): the run is left
    as it is on disk, with an error saying why."""
    run = make_run()
    store = CheckpointStore(tmp_path)
    store.write(*snapshot.state_dict(run))
    newer = store.write(*snapshot.state_dict(run))
    doc = json.loads((newer / "manifest.json").read_text())
    doc["format"] = checkpoint.FORMAT + 1
    (newer / "manifest.json").write_text(json.dumps(doc))
    before = sorted(p.name for p in (tmp_path / run.run_id).iterdir())
    with caplog.at_level(logging.ERROR, logger="ps_server"):
        assert Checkpointer(store, every=0).resume() == []
    assert f"not resuming {run.run_id}" in caplog.text and f"format {checkpoint.FORMAT + 1}" in caplog.text
    assert sorted(p.name for p in (tmp_path / run.run_id).iterdir()) == before


def test_a_changed_clock_in_a_manifest_is_corruption(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The manifest's clocks are the de-duplication table: one changed on disk (361 -> 961 would
    drop pushes 361-960 of that rank as duplicates) fails the meta's hash, and the older
    checkpoint is used. A manifest written before the hash existed still loads."""
    run = make_run()
    store = CheckpointStore(tmp_path)
    good = store.write(*snapshot.state_dict(run))
    bad = store.write(*snapshot.state_dict(run))
    doc = json.loads((bad / "manifest.json").read_text())
    doc["meta"]["slots"][0]["clock"] += 600
    (bad / "manifest.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.ERROR, logger="ps_server"):
        (found,) = store.latest()
    assert found.path == good and "the manifest's meta does not match its hash" in caplog.text
    old = json.loads((good / "manifest.json").read_text())
    del old["meta_sha256"]
    (good / "manifest.json").write_text(json.dumps(old))
    assert store.load(good).meta["slots"][0]["clock"] == run.status().workers[0].clock


def test_a_copy_beside_the_checkpoints_is_no_checkpoint(tmp_path: Path) -> None:
    """``cp -a ckpt-0000000002 ckpt-0000000002.bak``: resumed from the real newest, and the next
    checkpoint is written (the copy's name is not parsed as a sequence number)."""
    import shutil

    run = make_run()
    store = CheckpointStore(tmp_path)
    store.write(*snapshot.state_dict(run))
    newest = store.write(*snapshot.state_dict(run))
    shutil.copytree(newest, newest.with_name(newest.name + ".bak"))
    (newest.parent / "ckpt-notes.txt").write_text("mine")
    (found,) = store.latest()
    assert found.path == newest
    after = store.write(*snapshot.state_dict(run))
    assert after.name == "ckpt-0000000003"
    assert (newest.parent / "ckpt-notes.txt").exists() and newest.with_name(newest.name + ".bak").exists()


@pytest.mark.parametrize("name", ["ckpt-0000000003", "ckpt-9999999999"])
@pytest.mark.parametrize("kind", ["file", "directory"])
def test_something_named_as_a_checkpoint_that_is_none_does_not_block_the_next(tmp_path: Path, name: str,
                                                                             kind: str) -> None:
    """A file (or an empty directory) named ``ckpt-<seq>`` in a run's directory: the next write
    took that very name and failed to rename onto it, and every write after it; one named
    ``ckpt-9999999999`` took the last ten-digit name. Each write lands, newer than all before."""
    run = make_run()
    store = CheckpointStore(tmp_path, keep=2)
    store.write(*snapshot.state_dict(run))
    store.write(*snapshot.state_dict(run))
    junk = tmp_path / run.run_id / name
    junk.write_text("mine") if kind == "file" else junk.mkdir()
    incs = [w.incarnation for w in run.status().workers]
    for clock in range(3, 6):
        for rank, inc in enumerate(incs):
            run.push(rank, inc, clock, {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}, 0)
        written = store.write(*snapshot.state_dict(run))
        (found,) = store.latest()
        assert found.path == written and found.meta["slots"][0]["clock"] == clock + 1
    assert kind == "directory" or junk.read_text() == "mine"  # (a file is never a checkpoint: left alone)


def test_a_copy_of_a_runs_directory_is_no_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``cp -a run-ck run-ck.bak`` in the data directory: the copy's checkpoints are of run-ck too,
    and were resumed after the real ones (the directories in name order), so the run went back to
    the copy's older state at every restart; the copy was never pruned. Left alone, with an error;
    a checkpoint of another run among a run's own is skipped for the run's older one."""
    import shutil

    run = make_run()
    store = CheckpointStore(tmp_path)
    store.write(*snapshot.state_dict(run))
    shutil.copytree(tmp_path / run.run_id, tmp_path / f"{run.run_id}.bak")
    inc = run.status().workers[0].incarnation
    run.push(0, inc, 3, {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}, 0)
    newest = store.write(*snapshot.state_dict(run))
    with caplog.at_level(logging.WARNING, logger="ps_server"):
        resumed = Checkpointer(store, every=0).resume()
    assert [(r.run_id, r.status().workers[0].clock) for r in resumed] == [(run.run_id, 4)]
    assert f"{run.run_id}.bak" in caplog.text and "(a copy?)" in caplog.text
    assert store.latest()[0].path == newest and (tmp_path / f"{run.run_id}.bak").is_dir()
    shutil.copytree(tmp_path / f"{run.run_id}.bak" / "ckpt-0000000001", tmp_path / "run-other" / "ckpt-0000000007")
    store.write({**snapshot.state_dict(run)[0], "run_id": "run-other"}, snapshot.state_dict(run)[1])  # ckpt-8
    shutil.copytree(tmp_path / run.run_id / "ckpt-0000000002", tmp_path / "run-other" / "ckpt-0000000009")
    assert [ck.path.name for ck in store.latest()] == ["ckpt-0000000002", "ckpt-0000000008"]


def test_a_directory_it_cannot_read_beside_the_runs_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A data directory at a file system's root holds lost+found, which its server's user may not
    read: the runs are resumed, the directory named in a warning (the server refused to start)."""
    run = make_run()
    store = CheckpointStore(tmp_path)
    store.write(*snapshot.state_dict(run))
    (tmp_path / "lost+found").mkdir()
    glob = Path.glob

    def unreadable(self: Path, pattern: str) -> object:
        if self.name == "lost+found":
            raise PermissionError(13, "Permission denied", str(self))
        return glob(self, pattern)

    monkeypatch.setattr(Path, "glob", unreadable)
    with caplog.at_level(logging.WARNING, logger="ps_server"):
        (found,) = store.latest()
    assert found.meta["run_id"] == run.run_id
    assert "skipping" in caplog.text and "lost+found" in caplog.text and "Permission denied" in caplog.text


def test_leases_start_afresh_once_every_run_is_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run's leases started when that run was restored: the runs loaded before a large one
    (seconds per GB: hashes, arrays, initial values) had their leases running while the others
    loaded and the server was not serving yet, and its first sweep evicted their ranks (their
    workers had had no chance to find the server)."""
    run = make_run()
    store = CheckpointStore(tmp_path)
    store.write(*snapshot.state_dict(run))
    meta, arrays = snapshot.state_dict(run)
    store.write({**meta, "run_id": "run-large"}, arrays)  # (loaded after run-ck: names in order)
    load = store.load

    def slow(path: Path) -> checkpoint.Checkpoint:
        if path.parent.name == "run-large":
            time.sleep(1.0)
        return load(path)

    monkeypatch.setattr(store, "load", slow)
    resumed = Checkpointer(store, every=0).resume()
    assert [r.run_id for r in resumed] == ["run-ck", "run-large"]
    assert [r.clock.expired(0.5) for r in resumed] == [[], []]


def test_non_finite_parameters_of_a_running_run_are_refused() -> None:
    """A running run's parameters are finite (the divergence check relies on it), so a checkpoint
    saying otherwise is inconsistent: refused (resume then takes the run's older checkpoint). A
    failed run's checkpoint may hold them (that is why it failed) and loads."""
    run = make_run()
    meta, arrays = snapshot.state_dict(run)
    arrays["param/w"][0, 0] = np.inf
    with pytest.raises(ValueError, match="param/w.*NaN/Inf"):
        snapshot.restore(meta, arrays)
    assert snapshot.restore({**meta, "state": "failed"}, arrays).store.params["w"][0, 0] == np.inf


async def test_periodic_checkpoints_log_at_debug_and_the_story_at_info(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Issue 14: periodic checkpoint lines were 77% of a server log and said "(min clock 50, min
    clock 50)"; resumed runs were WARNINGs even when finished. Routine lines are DEBUG now."""
    store = CheckpointStore(tmp_path)
    checkpointer = Checkpointer(store, every=2)
    run = Run("run-log", RunSpec(name="l", num_workers=1, iterations=6, staleness=1, seed=1,
                                 params=(ParamSpec("w", (3,)),), optimizer=OptimizerConfig(learning_rate=0.1)))
    checkpointer.attach(run)
    a = run.join("a")
    with caplog.at_level(logging.DEBUG, logger="ps_server"):
        for clock in range(6):
            run.push(0, a.incarnation, clock, {"w": np.ones(3, np.float32)}, 0)
            await checkpointer.drain()
        run.leave(0, a.incarnation, "done", "")  # completed: the final checkpoint
        await checkpointer.drain()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "checkpoint of run-log" in r.getMessage()]
    periodic = [m for level, m in lines if "every 2 clocks" in m]
    assert len(periodic) >= 2 and all(level == logging.DEBUG for level, m in lines if m in periodic)
    assert [m for level, m in lines if level == logging.INFO] == [m for _, m in lines if "(completed)" in m]
    assert all(m.count("min clock") == 1 for _, m in lines)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="ps_server"):
        (resumed,) = Checkpointer(store, every=2).resume()
    assert resumed.state.value == "completed"
    assert [(r.levelno, r.getMessage().split(" from ")[0]) for r in caplog.records] == [(logging.INFO, "resumed run-log")]


async def test_a_checkpoint_on_demand_is_never_followed_by_an_older_one(tmp_path: Path) -> None:
    """CheckpointRun right after a periodic snapshot was scheduled (its writer not started yet)
    wrote its own, newer one first, then the periodic one after it as the newest: a server killed
    then resumed from the older one, and with --checkpoint-keep 1 the checkpoint CheckpointRun had
    named was pruned."""
    store = CheckpointStore(tmp_path, keep=1)
    checkpointer = Checkpointer(store, every=2)
    run = Run("run-order", RunSpec(name="o", num_workers=1, iterations=6, staleness=1, seed=1,
                                   params=(ParamSpec("w", (3,)),), optimizer=OptimizerConfig(learning_rate=0.1)))
    checkpointer.attach(run)
    a = run.join("a")
    await checkpointer.drain()
    for clock in range(3):  # min clock 2 schedules a periodic snapshot; 3 does not
        run.push(0, a.incarnation, clock, {"w": np.ones(3, np.float32)}, 0)
    path, clock = await checkpointer.checkpoint_now(run, "on demand")
    await checkpointer.drain()
    (found,) = store.latest()
    assert (found.path, found.meta["min_clock"]) == (path, clock) == (path, 3)


async def test_checkpoints_asked_for_at_once_hold_one_snapshot_at_a_time(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Each CheckpointRun took its snapshot (a copy of the parameters and optimizer state) as it
    came, then waited for the writes before it: 8 at once on a 120 MB run held ~670 MB more. Now
    each takes its own once the one before it is written."""
    store = CheckpointStore(tmp_path)
    checkpointer = Checkpointer(store, every=0)
    run = make_run()
    held, most = [0], [0]
    state_dict, write = snapshot.state_dict, store.write

    def taking(*args: object) -> object:
        held[0] += 1
        most[0] = max(most[0], held[0])
        return state_dict(*args)  # type: ignore[arg-type]

    def writing(*args: object) -> Path:
        time.sleep(0.05)
        held[0] -= 1
        return write(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(snapshot, "state_dict", taking)
    monkeypatch.setattr(store, "write", writing)
    written = await asyncio.gather(*(checkpointer.checkpoint_now(run, "on demand") for _ in range(4)))
    assert len({path for path, _ in written}) == 4 and most[0] == 1
    # Deleted meanwhile (DeleteRun): those asked for before are written first, then all go.
    asked = [asyncio.create_task(checkpointer.checkpoint_now(run, "on demand")) for _ in range(2)]
    await asyncio.sleep(0)
    await checkpointer.delete(run.run_id)
    await asyncio.gather(*asked)
    assert not (tmp_path / run.run_id).exists()


async def test_runs_checkpointed_together_hold_the_snapshots_there_is_room_for(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run took its snapshot (a copy of all it holds) the moment it was due, and its writer
    waited only for that run's writes: runs reaching a checkpoint together each held the one being
    written and the one waiting, up to twice every run's memory (--max-total-bytes) on top of the
    runs, where the deployment's sizing counts one copy of the largest run. Now the snapshots held
    at once fit the server's budget for them (``SnapshotBudget``: the sizing's copy), one with no room
    taken once one before it is written (the newest state then)."""
    runs = [Run(f"run-{i}", make_run().spec) for i in range(3)]
    store = CheckpointStore(tmp_path)
    checkpointer = Checkpointer(store, every=0, budget=SnapshotBudget(runs[0].footprint))  # room for one
    held: set[int] = set()  # snapshots taken, until written or dropped (freed)
    most = [0]
    state_dict, write = snapshot.state_dict, store.write

    def taking(*args: object) -> object:
        meta, arrays = state_dict(*args)  # type: ignore[arg-type]
        held.add(key := id(arrays["param/w"]))
        most[0] = max(most[0], len(held))
        weakref.finalize(arrays["param/w"], held.discard, key)
        return meta, arrays

    def writing(meta: dict[str, Any], arrays: dict[str, np.ndarray], *args: object) -> Path:
        time.sleep(0.02)
        path = write(meta, arrays, *args)  # type: ignore[arg-type]
        held.discard(id(arrays["param/w"]))
        return path

    monkeypatch.setattr(snapshot, "state_dict", taking)
    monkeypatch.setattr(store, "write", writing)
    for run in runs:
        checkpointer.attach(run)  # its first checkpoint, then a second while that one is written
        checkpointer.schedule(run, "test")
    on_demand = asyncio.ensure_future(checkpointer.checkpoint_now(runs[0], "on demand"))
    at_cut = asyncio.ensure_future(checkpointer.checkpoint_at(runs[1], 0, "cut", timeout=10))
    await asyncio.gather(on_demand, at_cut, checkpointer.drain())
    assert most[0] == 1 and checkpointer.budget.held == 0
    assert sorted(c.meta["run_id"] for c in store.latest()) == ["run-0", "run-1", "run-2"]


async def test_a_write_whose_caller_was_cancelled_lands_before_the_next(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A CheckpointRun cancelled mid-write (the server's stop cancels RPCs after --grace-seconds)
    released the run's lock while its thread went on writing: the shutdown checkpoint then wrote
    beside it, took the same ckpt-<seq>, and failed to rename into place (the last pushes lost)."""
    sha256 = checkpoint._sha256

    def slow(path: Path) -> str:  # (a large checkpoint's hash)
        time.sleep(0.3)
        return sha256(path)

    monkeypatch.setattr(checkpoint, "_sha256", slow)
    store = CheckpointStore(tmp_path)
    checkpointer = Checkpointer(store, every=0)
    run = make_run()
    asked = asyncio.create_task(checkpointer.checkpoint_now(run, "on demand"))
    await asyncio.sleep(0.1)
    asked.cancel()
    path, _ = await checkpointer.checkpoint_now(run, "shutdown", final=True)
    assert store.latest()[0].path == path and store.load(path).meta["final"]
    with pytest.raises(asyncio.CancelledError):
        await asked


async def test_a_write_that_fails_after_its_caller_was_cancelled_is_logged_and_told(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A CheckpointRun whose client gave up: its write goes on in a thread, and when it then failed
    (a full disk) nothing said so (the error went with the cancelled call). It is logged, and told
    in the run's events as a periodic checkpoint's failure is."""
    store = CheckpointStore(tmp_path)
    checkpointer = Checkpointer(store, every=0)
    run = make_run()
    writing, release = threading.Event(), threading.Event()

    def full(*args: object, **kw: object) -> Path:
        writing.set()
        release.wait(10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write", full)
    asked = asyncio.create_task(checkpointer.checkpoint_now(run, "on demand"))
    assert await asyncio.to_thread(writing.wait, 10)
    asked.cancel()
    release.set()
    with caplog.at_level(logging.ERROR, logger="ps_server"), pytest.raises(asyncio.CancelledError):
        await asked
    assert any("checkpoint of run-ck failed" in r.getMessage() and "No space left" in r.getMessage()
               for r in caplog.records)
    (failed,) = [e for e in run.history.events if e.kind == "checkpoint_failed"]
    assert "min clock 3 (on demand)" in failed.message and "No space left on device" in failed.message
    assert run.run_id in checkpointer.behind  # (the server's last checkpoint writes it even if it ended)


def test_a_deleted_run_is_never_resumed_even_when_its_files_cannot_all_be_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A file the server cannot remove (held open on NFS, a directory it may not write): the
    deletion was reported done and the run's checkpoints stayed where they were, so the next start
    resumed the deleted run. Its directory is moved out of the runs first; what is left is said,
    and removed at the next start."""
    run = make_run()
    store = CheckpointStore(tmp_path)
    store.write(*snapshot.state_dict(run))
    unlink = os.unlink
    monkeypatch.setattr(os, "unlink", unlink_holding_arrays())
    left = store.delete(run.run_id)
    assert "arrays.npz" in left and "Device or resource busy" in left and run.run_id in left
    assert store.latest() == [] and not (tmp_path / run.run_id).exists()
    with caplog.at_level(logging.WARNING, logger="ps_server"):
        assert store.latest() == []
    assert "could not be removed" in caplog.text and "Device or resource busy" in caplog.text
    monkeypatch.setattr(os, "unlink", unlink)
    assert store.latest() == [] and [p.name for p in tmp_path.iterdir()] == []  # (removed at the next start)
    assert store.delete("run-none") == ""


async def test_a_run_whose_directory_cannot_be_moved_is_not_deleted(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The data directory not writable (a rename refused): OSError, every checkpoint where it was,
    and the run checkpointed as before (its final checkpoint, dropped for the deletion, written)."""
    store = CheckpointStore(tmp_path)
    checkpointer = Checkpointer(store, every=0)
    run = make_run()
    checkpointer.attach(run)
    await checkpointer.written(run.run_id)
    monkeypatch.setattr(os, "rename", rename_refusing_deletions())
    before = sorted(p.name for p in (tmp_path / run.run_id).iterdir())
    run.stop("deleted")  # (DeleteRun with force: its final checkpoint is scheduled, then dropped)
    with pytest.raises(PermissionError):
        await checkpointer.delete(run.run_id)
    await checkpointer.written(run.run_id)
    (found,) = store.latest()
    assert found.meta["state"] == "stopped" and len(list((tmp_path / run.run_id).iterdir())) == len(before) + 1
    path, _ = await checkpointer.checkpoint_now(run, "on demand")
    assert path.exists()


async def test_a_deletion_whose_caller_was_cancelled_ends_before_anything_else(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A DeleteRun cancelled while its thread removed the run's files (the sweep's, at shutdown)
    released the run's locks at once: a CheckpointRun asked for meanwhile then wrote the deleted
    run's checkpoint beside the deletion (the run came back at the next start, or the path it was
    told was removed under it). It is refused once the deletion has ended."""
    store = CheckpointStore(tmp_path)
    checkpointer = Checkpointer(store, every=0)
    run = make_run()
    await checkpointer.checkpoint_now(run, "created")
    delete = store.delete

    def slow(run_id: str) -> str:
        time.sleep(0.3)
        return delete(run_id)

    monkeypatch.setattr(store, "delete", slow)
    deleting = asyncio.create_task(checkpointer.delete(run.run_id))
    await asyncio.sleep(0.1)
    asked = asyncio.create_task(checkpointer.checkpoint_now(run, "on demand"))
    await asyncio.sleep(0)
    deleting.cancel()
    with pytest.raises(NotFound, match="deleted"):
        await asked
    with pytest.raises(asyncio.CancelledError):
        await deleting
    assert store.latest() == [] and list(tmp_path.iterdir()) == []


async def test_a_restore_whose_caller_was_cancelled_holds_the_run_until_its_thread_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A RestoreShard cancelled while its thread deleted the checkpoints past the cut released the
    run's lock at once: the run's next checkpoint landed meanwhile and was deleted with them."""
    store = CheckpointStore(tmp_path)
    checkpointer = Checkpointer(store, every=0)
    run = make_run()
    checkpointer.attach(run)
    await checkpointer.written(run.run_id)
    incs = [w.incarnation for w in run.status().workers]
    for rank, inc in enumerate(incs):
        run.push(rank, inc, 3, {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}, 0)
    await checkpointer.checkpoint_now(run, "on demand")  # cut 4, to be discarded
    discard = store.discard_after
    discarded = threading.Event()

    def slow(run_id: str, cut: int) -> None:
        time.sleep(0.3)
        discard(run_id, cut)
        discarded.set()

    monkeypatch.setattr(store, "discard_after", slow)
    restoring = asyncio.create_task(checkpointer.restore(run.run_id, 3))
    await asyncio.sleep(0.1)
    restoring.cancel()
    path, _ = await checkpointer.checkpoint_now(run, "on demand")
    with pytest.raises(asyncio.CancelledError):
        await restoring
    assert await asyncio.to_thread(discarded.wait, 10)
    assert path.exists() and store.latest()[0].path == path


async def test_a_checkpoint_that_cannot_be_written_is_an_event_of_its_run(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk fails the periodic checkpoints: psctl status shows it (the run's events), not
    only the server's log; the next one that fits is written."""
    store = CheckpointStore(tmp_path)
    checkpointer = Checkpointer(store, every=2)
    run = Run("run-full", RunSpec(name="f", num_workers=1, iterations=6, staleness=1, seed=1,
                                  params=(ParamSpec("w", (3,)),), optimizer=OptimizerConfig(learning_rate=0.1)))
    checkpointer.attach(run)
    await checkpointer.drain()  # (the one of its creation)
    write = store.write

    def full(*args: object, **kw: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write", full)
    a = run.join("a")
    for clock in range(2):
        run.push(0, a.incarnation, clock, {"w": np.ones(3, np.float32)}, 0)
    await checkpointer.drain()
    (failed,) = [e for e in run.history.events if e.kind == "checkpoint_failed"]
    assert "min clock 2" in failed.message and "No space left on device" in failed.message
    monkeypatch.setattr(store, "write", write)
    for clock in range(2, 4):
        run.push(0, a.incarnation, clock, {"w": np.ones(3, np.float32)}, 0)
    await checkpointer.drain()
    assert store.cuts(run.run_id)[0] == 4


# ------------------------------------------------------------------------------ cuts (clusters)
def _write_cut(store: CheckpointStore, run: Run, cut: int, protect: tuple[int, ...] = ()) -> Path:
    meta, arrays = snapshot.state_dict(run, cut)
    return store.write(meta, arrays, protect)


def test_checkpoints_are_labelled_by_cut_and_loaded_by_it(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=5)
    run = make_run()
    for cut in (5, 10, 15):
        _write_cut(store, run, cut)
    assert store.cuts(run.run_id) == [15, 10, 5]  # newest first
    assert store.load_cut(run.run_id, 10).meta["cut"] == 10
    with pytest.raises(CorruptCheckpoint, match="no checkpoint of run-ck at cut 7"):
        store.load_cut(run.run_id, 7)
    store.discard_after(run.run_id, 5)  # the run went back to cut 5: 10 and 15 are another history
    assert store.cuts(run.run_id) == [5]


def test_pruning_keeps_the_protected_cut_however_old(tmp_path: Path) -> None:
    """A cluster's newest common cuts survive --checkpoint-keep, so there is always one to go back to."""
    store = CheckpointStore(tmp_path, keep=2)
    run = make_run()
    for cut in (5, 10, 15, 20):
        _write_cut(store, run, cut, protect=(5,))
    assert store.cuts(run.run_id) == [20, 15, 5]
    _write_cut(store, run, 25, protect=(10, 5))  # (10 is gone already: nothing to keep)
    assert store.cuts(run.run_id) == [25, 20, 5]
    _write_cut(store, run, 30, protect=(20, 5))
    assert store.cuts(run.run_id) == [30, 25, 20, 5]
    _write_cut(store, run, 35, protect=(25, 20))  # the common cuts moved on: 5 may go
    assert store.cuts(run.run_id) == [35, 30, 25, 20]
    _write_cut(store, run, 40)
    assert store.cuts(run.run_id) == [40, 35]


def test_a_shard_not_yet_told_which_cuts_are_common_keeps_its_first(tmp_path: Path) -> None:
    """Before server 0 says which cuts every server has, a cluster's shard keeps its oldest (the
    first cut, which every server writes) besides the newest --checkpoint-keep; once told, only those."""
    store = CheckpointStore(tmp_path, keep=2)
    run = make_run()
    for cut in (5, 10, 15, 20):
        meta, arrays = snapshot.state_dict(run, cut)
        store.write(meta, arrays, keep_oldest=True)
    assert store.cuts(run.run_id) == [20, 15, 5]
    _write_cut(store, run, 25, protect=(15,))
    assert store.cuts(run.run_id) == [25, 20, 15]


def test_a_shard_not_yet_told_keeps_cut_0_and_its_first_periodic_cut(tmp_path: Path) -> None:
    """Every server writes cut 0 at creation and its first periodic cut at once (never coalesced):
    both are common, and both are kept until server 0 says which are. Keeping cut 0 alone would
    send a fast run whose server 0's disk lags back to before its workers joined."""
    store = CheckpointStore(tmp_path, keep=2)
    run = make_run()
    for cut in (0, 5, 10, 15, 20):
        meta, arrays = snapshot.state_dict(run, cut)
        store.write(meta, arrays, keep_oldest=True)
    assert store.cuts(run.run_id) == [20, 15, 5, 0]


async def test_checkpoint_at_a_cut_waits_for_the_min_clock_to_reach_it(tmp_path: Path) -> None:
    checkpointer = Checkpointer(CheckpointStore(tmp_path), every=0)
    run = make_run()  # min clock 3
    a, b = (s.incarnation for s in run.clock.slots)
    checkpointer.attach(run)
    waiting = asyncio.ensure_future(checkpointer.checkpoint_at(run, 4, "test", timeout=10))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    run.push(0, a, 3, {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}, 0)
    run.push(1, b, 3, {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}, 0)  # min clock 4
    run.push(0, a, 4, {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}, 0)  # after the cut
    path, clock = await waiting
    ckpt = CheckpointStore(tmp_path).load(path)
    assert (clock, ckpt.meta["cut"]) == (4, 4)
    assert [s["clock"] for s in ckpt.meta["slots"]] == [4, 4]  # taken at the cut, not when written
    with pytest.raises(TimeoutError):
        await checkpointer.checkpoint_at(run, 9, "test", timeout=0.1)


async def test_a_cut_keeps_room_for_its_snapshot_while_other_runs_checkpoints_wait(tmp_path: Path) -> None:
    """With room for one snapshot, a cluster's cut still takes its own at its clock: its room is
    kept from when it is asked for, and another run's checkpoint due meanwhile waits, not copied."""
    run, other = make_run(), Run("run-other", make_run().spec)  # min clock 3
    checkpointer = Checkpointer(CheckpointStore(tmp_path), every=0, budget=SnapshotBudget(run.footprint))
    checkpointer.attach(run)
    checkpointer.attach(other)
    await checkpointer.drain()
    a, b = (s.incarnation for s in run.clock.slots)
    waiting = asyncio.ensure_future(checkpointer.checkpoint_at(run, 4, "test", timeout=10))
    while not checkpointer.budget.held:
        await asyncio.sleep(0)
    checkpointer.schedule(other, "test")
    assert checkpointer._waiting[other.run_id][-1] is None  # no room: no copy yet
    zeros = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
    run.push(0, a, 3, zeros, 0)
    run.push(1, b, 3, zeros, 0)  # min clock 4
    run.push(0, a, 4, zeros, 0)  # after the cut
    path, clock = await waiting
    meta = CheckpointStore(tmp_path).load(path).meta
    assert (clock, meta["cut"], [s["clock"] for s in meta["slots"]]) == (4, 4, [4, 4])
    await checkpointer.drain()
    assert checkpointer.budget.held == 0 and len(list((tmp_path / other.run_id).glob("ckpt-*"))) == 2


async def test_a_held_shard_stopped_gracefully_stays_held_when_it_resumes(tmp_path: Path) -> None:
    """A cluster shard resumed from a crash is held until the cluster goes back to a common cut; a
    graceful stop before that must not make its (stale) checkpoint look like a clean one."""
    from ps_server.core.placement import Placement, place

    spec = make_run().spec
    run = Run("run-sh", spec, placement=Placement(place(spec.params, 2, 1 << 20), 0))
    checkpointer = Checkpointer(CheckpointStore(tmp_path), every=0)
    await checkpointer.checkpoint_now(run, "every", 0)  # a routine checkpoint: a resume from it is held
    (resumed,) = checkpointer.resume()
    assert resumed.held
    await checkpointer.checkpoint_now(resumed, "shutdown", final=True)
    (again,) = checkpointer.resume()
    assert again.held
    again.held = ""  # the cluster went back to a common cut: its next graceful stop is a clean one
    await checkpointer.checkpoint_now(again, "shutdown", final=True)
    (clean,) = checkpointer.resume()
    assert not clean.held


async def test_a_snapshot_of_the_history_a_run_left_is_never_written(tmp_path: Path) -> None:
    """A snapshot taken before the run went back to a checkpoint, waiting for the disk meanwhile,
    is refused: written after the restore deleted the later cuts, it would be one of them again."""
    checkpointer = Checkpointer(CheckpointStore(tmp_path), every=0)
    run = make_run()  # min clock 3
    checkpointer.attach(run)
    await checkpointer.checkpoint_now(run, "test", 2)
    lock = checkpointer._locks[run.run_id]
    await lock.acquire()  # the disk is busy
    restoring = asyncio.ensure_future(checkpointer.restore(run.run_id, 2))
    await asyncio.sleep(0.05)  # (restore waits for the disk, first in line)
    late = asyncio.ensure_future(checkpointer.checkpoint_now(run, "test", 3))  # taken now, of the old history
    await asyncio.sleep(0.05)
    lock.release()
    restored = await restoring
    with pytest.raises(FailedPrecondition, match="history the run left"):
        await late
    assert CheckpointStore(tmp_path).cuts(run.run_id) == [2] and restored.min_clock == 3


async def test_a_checkpoint_asked_for_during_a_restore_is_never_one_of_the_history_left(tmp_path: Path) -> None:
    """Two checkpoints of a run asked for while it went back to a checkpoint: the first, its
    snapshot taken before, was refused; the second waited behind it and took its snapshot after,
    of the run object it was given, the one replaced, with the new epoch: the history the run
    left was written as its newest checkpoint. Both are refused."""
    checkpointer = Checkpointer(CheckpointStore(tmp_path), every=0)
    run = make_run()  # min clock 3
    checkpointer.attach(run)
    await checkpointer.checkpoint_now(run, "test", 2)
    lock = checkpointer._locks[run.run_id]
    await lock.acquire()  # the disk is busy
    restoring = asyncio.ensure_future(checkpointer.restore(run.run_id, 2))
    await asyncio.sleep(0.05)  # (restore waits for the disk, first in line)
    first = asyncio.ensure_future(checkpointer.checkpoint_now(run, "test", 3))
    second = asyncio.ensure_future(checkpointer.checkpoint_now(run, "test", 3))  # (behind the first)
    await asyncio.sleep(0.05)
    lock.release()
    await restoring
    for late in (first, second):
        with pytest.raises(FailedPrecondition, match="history the run left"):
            await late
    assert CheckpointStore(tmp_path).cuts(run.run_id) == [2]


class _Killed(BaseException):
    """A kill -9 at that point (no ``except Exception`` catches it)."""


def test_a_crash_at_any_step_of_a_discard_resumes_the_cut_or_the_history_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """discard_after removed the checkpoints past the cut one by one, newest first: a kill -9 after
    the first left the next newest, of the history the run left, to be resumed (and listed as a cut
    a cluster could go back to). At each step a crash leaves all of them, or none once restarted."""
    import shutil

    run = make_run()
    steps = {"rename": os.rename, "unlink": os.unlink, "fsync": os.fsync}
    rmtree = shutil.rmtree
    crashed_at: list[int] = []
    for n in range(100):
        root = tmp_path / str(n)
        store = CheckpointStore(root, keep=5)
        for cut in (0, 5, 10, 15):
            _write_cut(store, run, cut)
        calls = 0

        def step(real: Any, *args: object, _n: int = n, **kw: object) -> Any:
            nonlocal calls
            calls += 1
            if calls > _n:
                raise _Killed()
            return real(*args, **kw)

        for name, real in steps.items():
            monkeypatch.setattr(os, name, lambda *a, _r=real, **k: step(_r, *a, **k))
        monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: step(rmtree, *a, **k))
        try:
            store.discard_after(run.run_id, 5)
        except _Killed:
            crashed_at.append(n)
        finally:
            monkeypatch.undo()
        restarted = CheckpointStore(root, keep=5)
        (resumed,) = restarted.latest()
        cuts = restarted.cuts(run.run_id)
        assert (resumed.meta["cut"], cuts) in ((15, [15, 10, 5, 0]), (5, [5, 0])), f"crash at step {n}"
        assert sorted(p.name for p in (root / run.run_id).iterdir() if not p.name.startswith("ckpt-")) == []
        if not crashed_at or crashed_at[-1] != n:
            break
    assert crashed_at == list(range(len(crashed_at))) and len(crashed_at) >= 4  # (every step, then none)


def test_a_discard_left_unfinished_never_lends_its_names_to_new_checkpoints(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints listed as being discarded are none; one written while the list is still there
    (its removal failed) takes a name after theirs, or the restart that ends the discard removes it."""
    run = make_run()
    store = CheckpointStore(tmp_path, keep=5)
    for cut in (0, 5, 10):
        _write_cut(store, run, cut)
    unlink = os.unlink

    def refused(path: Any, *args: object, **kw: object) -> None:
        if Path(path).name == checkpoint._DISCARDING:
            raise PermissionError(13, "Permission denied")
        unlink(path, *args, **kw)

    monkeypatch.setattr(os, "unlink", refused)
    with pytest.raises(PermissionError):
        store.discard_after(run.run_id, 0)
    assert store.cuts(run.run_id) == [0]
    _write_cut(store, run, 3)
    monkeypatch.undo()
    (resumed,) = CheckpointStore(tmp_path, keep=5).latest()
    assert resumed.meta["cut"] == 3 and store.cuts(run.run_id) == [3, 0]
