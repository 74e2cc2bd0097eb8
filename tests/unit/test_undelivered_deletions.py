"""Server 0's list of deletions some server has not been told of (``ps_server.cluster.deletions``)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from ps_server.cluster import deletions
from ps_server.cluster.deletions import Undelivered


async def test_the_list_survives_a_restart_and_shrinks_as_servers_are_told(tmp_path: Path) -> None:
    first = Undelivered(tmp_path)
    await first.add("run-a", [1, 2])
    await first.add("run-b", [2])
    await first.add("run-c", [])  # every server told: nothing to keep
    await first.done("run-a", 1)
    again = Undelivered(tmp_path)  # server 0 restarted
    assert (again.runs(1), again.runs(2), len(again)) == ([], ["run-a", "run-b"], 2)
    await again.done("run-a", 2)
    await again.done("run-b", 2)
    assert len(Undelivered(tmp_path)) == 0


async def test_an_unreadable_list_is_said_and_a_full_one_drops_its_oldest(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / deletions.FILE).write_text("{not json")
    with caplog.at_level(logging.ERROR, "ps_server"):
        pending = Undelivered(tmp_path)
    assert len(pending) == 0 and "does not load" in caplog.text
    monkeypatch.setattr(deletions, "LIMIT", 2)
    for run_id in ("run-a", "run-b", "run-c"):
        await pending.add(run_id, [1])
    assert pending.runs(1) == ["run-b", "run-c"] and "run-a is forgotten" in caplog.text


async def test_without_a_data_directory_the_list_is_in_memory_and_server_0_says_what_a_restart_loses(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "ps_server"):
        pending = Undelivered(None)
    assert "no --data-dir" in caplog.text and "restart" in caplog.text and "by hand" in caplog.text, caplog.text
    await pending.add("run-a", [1])
    assert pending.runs(1) == ["run-a"]  # still told while this process lives
    await pending.done("run-a", 1)
    assert len(pending) == 0


class _Peer:
    """A server of the cluster as ``ClusterOwner.delete`` sees it: ``answers`` its DeleteShard, or never does."""

    def __init__(self, index: int, answers: bool) -> None:
        self.index, self.name, self.answers = index, f"server {index}", answers
        self.asked = asyncio.Event()

    async def call(self, method: str, request: Any, response: type[Any], timeout: float) -> Any:
        self.asked.set()
        if not self.answers:
            await asyncio.Event().wait()  # (a disk that hangs: neither an answer nor an error)
        return response()


@pytest.mark.timeout(10)
async def test_a_deletion_cancelled_while_a_server_has_not_answered_is_written_down(tmp_path: Path) -> None:
    """Server 0's deletion is cancelled (its stop, or a task's caller) while server 2 has not answered
    its DeleteShard: server 2 is written down as not told (it was not: nothing told it again, and it
    kept the shard of a run nobody knew); server 1, which answered, is not."""
    from ps_server.cluster.owner import ClusterOwner
    from ps_server.core.registry import RunRegistry

    peers = [_Peer(1, answers=True), _Peer(2, answers=False)]
    owner = ClusterOwner(RunRegistry(), ["a", "b", "c"], peers,  # type: ignore[arg-type]
                         split_bytes=0, shard_timeout=1, data_port=lambda: 0, undelivered=Undelivered(tmp_path))
    deleting = asyncio.ensure_future(owner.delete("run-a"))
    await asyncio.wait_for(asyncio.gather(*(p.asked.wait() for p in peers)), 5)  # (server 1 has answered)
    deleting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await deleting
    assert Undelivered(tmp_path).runs(2) == ["run-a"]
    assert Undelivered(tmp_path).runs(1) == []
