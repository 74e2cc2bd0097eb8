"""Server 0's list of deletions some server has not been told of (``ps_server.cluster.deletions``)."""

from __future__ import annotations

import logging
from pathlib import Path

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
