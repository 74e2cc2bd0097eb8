"""DeleteRun while another call on the same run awaits something (a server of the cluster): each
test holds that call at its await and lets the deletion run to its end there."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import make_spec

from paramserver import errors
from paramserver.v1 import cluster_pb2 as cpb
from paramserver.v1 import paramserver_pb2 as pb
from ps_server.checkpointer import Checkpointer
from ps_server.cluster.deletions import Undelivered
from ps_server.cluster.owner import ClusterOwner
from ps_server.cluster.shards import ShardService
from ps_server.control import Control
from ps_server.core.checkpoint import CheckpointStore
from ps_server.core.errors import NotFound, PsError, ShardUnavailable
from ps_server.core.registry import RunRegistry
from ps_server.core.run import Run
from ps_server.core.spec import ParamSpec, RunSpec
from ps_server.testing import InMemoryServer

pytestmark = pytest.mark.timeout(60)


class _Peer:
    """Server 1 as server 0 sees it: it answers at once, but the answers of ``held`` calls wait for
    ``go``; a shard it was told to delete is gone (NotFound)."""

    def __init__(self, *held: str, fails: PsError | None = None) -> None:
        """``fails``: what the ``held`` calls raise once let go (else they answer)."""
        self.index, self.name, self.address = 1, "server 1", "b:1"
        self.held, self.asked, self.go = set(held), asyncio.Event(), asyncio.Event()
        self.fails = fails
        self.deleted: set[str] = set()

    async def call(self, method: str, request: Any, response: type[Any], timeout: float, **_: object) -> Any:
        if method == "DeleteShard":
            self.deleted.add(request.run_id)
        elif getattr(request, "run_id", None) in self.deleted:
            raise NotFound(f"server 1 holds no shard of {request.run_id}")
        if method in self.held:  # (its answer on its way)
            self.asked.set()
            await self.go.wait()
            if self.fails is not None:
                raise self.fails
        return response()


async def _cluster(tmp_path: Path, peer: _Peer, start: bool = True,
                   ) -> tuple[RunRegistry, Checkpointer, Control, ClusterOwner, str]:
    checkpointer = Checkpointer(CheckpointStore(tmp_path), every=0)
    registry = RunRegistry(configure=checkpointer.attach)
    owner = ClusterOwner(registry, ["a:1", "b:1"], [peer], split_bytes=0, shard_timeout=30,  # type: ignore[list-item]
                         data_port=lambda: 0, checkpointer=checkpointer, undelivered=Undelivered(None))
    control = Control(registry, max_wait=1.0, heartbeat_seconds=1.0, lease_seconds=5.0, checkpointer=checkpointer,
                      cluster=owner)
    run = await owner.create_run(RunSpec(name="d", num_workers=1, iterations=9,
                                         params=(ParamSpec("w", (3,)), ParamSpec("b", (2,)))))
    await checkpointer.written(run.run_id)
    if start:
        run.join("w")  # RUNNING
    return registry, checkpointer, control, owner, run.run_id


async def test_a_checkpoint_asked_for_while_the_run_is_deleted_is_not_written(tmp_path: Path) -> None:
    """CheckpointRun of a cluster's run asks every server where its shard is, then writes server 0's
    snapshot: DeleteRun --force meanwhile deleted the run, and the snapshot, taken after, was
    written into a new directory of the deleted run, which came back at the next start."""
    peer = _Peer("GetShard")
    registry, checkpointer, control, _, run_id = await _cluster(tmp_path, peer)
    asking = asyncio.create_task(control.CheckpointRun(pb.CheckpointRunRequest(run_id=run_id)))
    await asyncio.wait_for(peer.asked.wait(), 30)
    await control.DeleteRun(pb.DeleteRunRequest(run_id=run_id, force=True))
    assert registry.find(run_id) is None and list(tmp_path.iterdir()) == []
    peer.go.set()
    with pytest.raises(NotFound, match=f"no run '{run_id}' on this server"):
        await asking
    await asyncio.gather(*(asyncio.all_tasks() - {asyncio.current_task()}), return_exceptions=True)
    assert checkpointer.store.latest() == [] and list(tmp_path.iterdir()) == []


async def test_a_join_whose_run_is_deleted_while_the_servers_learn_its_rank_is_answered_without_one(
        tmp_path: Path) -> None:
    """Join gives a worker a rank, then tells the other servers before it answers: DeleteRun --force
    meanwhile, and Join looked the run up again to answer, NOT_FOUND of a run the worker had not
    named (it logged 'join refused' as an error and waited before asking again)."""
    peer = _Peer("UpdateShard")
    registry, _, control, _, run_id = await _cluster(tmp_path, peer, start=False)
    joining = asyncio.create_task(control.Join(pb.JoinRequest(worker_name="w")))
    await asyncio.wait_for(peer.asked.wait(), 30)
    await control.DeleteRun(pb.DeleteRunRequest(run_id=run_id, force=True))
    peer.go.set()
    resp = await joining
    assert not resp.HasField("assignment") and resp.server_generation == registry.generation


async def test_a_join_naming_a_run_deleted_while_the_servers_learn_its_rank_is_not_found(tmp_path: Path) -> None:
    peer = _Peer("UpdateShard")
    _, _, control, _, run_id = await _cluster(tmp_path, peer, start=False)
    joining = asyncio.create_task(control.Join(pb.JoinRequest(worker_name="w", run_id=run_id)))
    await asyncio.wait_for(peer.asked.wait(), 30)
    await control.DeleteRun(pb.DeleteRunRequest(run_id=run_id, force=True))
    peer.go.set()
    with pytest.raises(NotFound, match="no run"):
        await joining


async def test_a_shards_checkpoint_waiting_for_its_cut_ends_when_the_shard_is_deleted(tmp_path: Path) -> None:
    """CheckpointShard waits for the shard's min clock to reach the cut; DeleteShard meanwhile (DeleteRun
    --force on server 0 during its CheckpointRun) left it waiting for a run no one pushes to any more:
    after 30 s it answered that the run was not moving, and server 0's CheckpointRun waited as long."""
    checkpointer = Checkpointer(CheckpointStore(tmp_path), every=0)
    registry = RunRegistry(configure=checkpointer.attach)
    shards = ShardService(registry, ["a:1", "b:1"], 1, lambda: 0, checkpointer)
    run = registry.add(Run("run-d", RunSpec(name="d", num_workers=1, iterations=9, params=(ParamSpec("w", (3,)),))))
    run.join("w")
    await checkpointer.written(run.run_id)
    asking = asyncio.create_task(shards.CheckpointShard(cpb.CheckpointShardRequest(run_id=run.run_id, cut=2)))
    await _until(lambda: bool(checkpointer._cuts.get(run.run_id)))  # waiting for clock 2
    await shards.DeleteShard(cpb.DeleteShardRequest(run_id=run.run_id))
    with pytest.raises(NotFound, match="deleted"):
        await asyncio.wait_for(asking, 5)
    assert list(tmp_path.iterdir()) == []


async def _until(ready: Callable[[], bool]) -> None:
    while not ready():
        await asyncio.sleep(0)


async def test_a_roll_back_retried_past_the_shard_timeout_of_a_run_deleted_meanwhile_is_dropped(
        tmp_path: Path) -> None:
    """A roll back that a server does not answer is tried again each poll, and fails the run once
    that lasted over --shard-timeout: the run deleted while the servers were asked, the failing
    looked it up, NOT_FOUND ended that poll (the other runs' roll backs waited for the next, with a
    traceback in the log), and the next found the run gone."""
    peer = _Peer("ListShardCheckpoints", fails=ShardUnavailable("server 1 did not answer"))
    registry, _, control, owner, run_id = await _cluster(tmp_path, peer)
    owner.recovery._rollbacks[run_id] = ("server 1 restarted", None, -1e9)  # (failing since long ago)
    rolling = asyncio.create_task(owner.recovery._try_roll_back(run_id))
    await asyncio.wait_for(peer.asked.wait(), 30)
    await control.DeleteRun(pb.DeleteRunRequest(run_id=run_id, force=True))
    peer.go.set()
    await rolling
    assert run_id not in owner.recovery._rollbacks and registry.find(run_id) is None


async def test_two_deletions_of_a_run_at_once_are_both_answered_as_the_deletion_is() -> None:
    """psctl delete twice, or a retry after a timeout, while the deletion is under way: the second
    call looked the run up before the first forgot it, then forgot it again itself, and answered
    NOT_FOUND of a run that was deleted. It waits for the deletion under way and answers as it does."""
    async with InMemoryServer() as server, server.client() as ps:
        run = await ps.create_run(make_spec(num_workers=1))
        await ps.stop_run(run.run_id)
        first, second = await asyncio.wait_for(asyncio.gather(ps.delete_run(run.run_id), ps.delete_run(run.run_id)), 30)
        assert first == second and first.run.run_id == run.run_id and first.run.state == pb.RUN_STATE_STOPPED
        assert server.registry.find(run.run_id) is None
        with pytest.raises(errors.NotFound):  # (once deleted, the run is unknown)
            await ps.delete_run(run.run_id)


async def test_a_second_deletion_of_a_run_the_disk_refuses_is_refused_as_the_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second of two DeleteRun at once answers as the deletion under way does, a refusal too:
    the disk refused to move the run's directory away, nothing was deleted, the run is kept."""
    import os

    rename = os.rename

    def refused(src: Any, dst: Any) -> None:
        if ".deleted-" in str(dst):
            raise PermissionError(13, "Permission denied", str(src))
        rename(src, dst)

    checkpointer = Checkpointer(CheckpointStore(tmp_path), every=0)
    registry = RunRegistry(configure=checkpointer.attach)
    control = Control(registry, max_wait=1.0, heartbeat_seconds=1.0, lease_seconds=5.0, checkpointer=checkpointer)
    run = await registry.create(RunSpec(name="d", num_workers=1, iterations=9, params=(ParamSpec("w", (3,)),)),
                                ready=checkpointer.first)
    monkeypatch.setattr(os, "rename", refused)
    asked = [control.DeleteRun(pb.DeleteRunRequest(run_id=run.run_id, force=True)) for _ in range(2)]
    answers = await asyncio.wait_for(asyncio.gather(*asked, return_exceptions=True), 30)
    assert all(isinstance(a, PsError) and "nothing was deleted and the run is kept" in str(a) for a in answers), answers
    assert registry.get(run.run_id).state.finished and checkpointer.store.latest() != []
    monkeypatch.setattr(os, "rename", rename)
    first, second = await asyncio.gather(*(control.DeleteRun(pb.DeleteRunRequest(run_id=run.run_id))
                                           for _ in range(2)))
    assert first == second and first.run.run_id == run.run_id and registry.find(run.run_id) is None
    assert checkpointer.store.latest() == []


class _Restarted(_Peer):
    """Server 1 with its shard resumed from cut 0, the run's only checkpoint (the run at clock 0)."""

    async def call(self, method: str, request: Any, response: type[Any], timeout: float, **kw: object) -> Any:
        if method == "ListShardCheckpoints" and request.run_id not in self.deleted:
            return cpb.ListShardCheckpointsResponse(cuts=[0], clocks=[0])
        return await super().call(method, request, response, timeout, **kw)


def _kept_of(owner: ClusterOwner, run_id: str) -> list[str]:
    """The tables of ``owner`` that still hold an entry of ``run_id``."""
    tables = {"_sent": owner._sent, "_locks": owner._locks, "_status": owner._status, "_samples": owner._samples,
              "_torn": owner._torn, "_lost": owner._lost, "_cuts": owner.cuts._cuts, "_told": owner.cuts._told}
    return [name for name, table in tables.items() if any(key[0] == run_id for key in table)]


@pytest.mark.parametrize("held", ["UpdateShard", "RestoreShard"])
async def test_a_roll_back_of_a_run_deleted_while_it_syncs_the_servers_leaves_nothing_of_it(
        tmp_path: Path, held: str) -> None:
    """A roll back ends by sending the run's membership to every server: DeleteRun --force while
    an UpdateShard was on its way (or the RestoreShards before it), and the answer recorded what
    that server was sent of the deleted run (or its lock, and the cut it went back to, when the
    deletion came first), after the deletion had forgotten the run: entries of a deleted run,
    kept for as long as server 0 runs."""
    peer = _Restarted(held)
    registry, _, control, owner, run_id = await _cluster(tmp_path, peer)
    rolling = asyncio.create_task(owner.recovery.roll_back(registry.get(run_id), "server 1 restarted"))
    await asyncio.wait_for(peer.asked.wait(), 30)
    await control.DeleteRun(pb.DeleteRunRequest(run_id=run_id, force=True))
    peer.go.set()
    await asyncio.wait_for(rolling, 30)
    assert registry.find(run_id) is None and _kept_of(owner, run_id) == []


@pytest.mark.parametrize("fails", [None, ShardUnavailable("server 1 did not answer")])
async def test_a_poll_of_a_run_deleted_while_a_server_answers_about_it_leaves_nothing_of_it(
        tmp_path: Path, fails: PsError | None) -> None:
    """Server 0's poll asks every server for its shard's status (GetShard): DeleteRun --force while
    the answer was on its way, and server 0 kept the deleted run's cuts, status and samples heard
    in it (or, the server silent, a status saying so), after the deletion had forgotten the run."""
    peer = _Peer("GetShard", fails=fails)
    registry, _, control, owner, run_id = await _cluster(tmp_path, peer)
    polling = asyncio.create_task(owner._poll_once())
    await asyncio.wait_for(peer.asked.wait(), 30)
    await control.DeleteRun(pb.DeleteRunRequest(run_id=run_id, force=True))
    peer.go.set()
    await asyncio.wait_for(polling, 30)
    assert registry.find(run_id) is None and _kept_of(owner, run_id) == []
