"""Deletions server 0 could not deliver: which server still holds a shard of a deleted run.

DeleteRun (and the retention limits) forget a run on server 0 at once, and tell every other server
to delete its shard. A server that does not answer then (down, restarting, cut off) would keep its
shard and checkpoints for ever: once the run is gone from server 0 nobody can delete it again, and
a restarted server resumes it. So server 0 writes down each (run, server) not told, and its watch
tells them again each poll until they answer (``ClusterOwner``); DeleteShard of a run a server
does not hold succeeds, so telling twice is harmless.

The list is on disk (``<data-dir>/undelivered-deletions.json``, replaced atomically), so a restart
of server 0 does not forget it. Without --data-dir it lives as long as the process, as server 0's
runs do: a restart forgets both, and the other servers keep their shards of those runs until they
restart (without a --data-dir of their own) or their run directories are removed by hand; server 0
says so when it starts. It holds at
most ``LIMIT`` runs: past that the oldest is dropped, loudly (its shards then stay where they are
until deleted by hand). Server 0 never deletes a shard it was not asked to delete: a shard of a run
it does not know may be one it lost (a wrong --data-dir), which an operator may still want back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["LIMIT", "Undelivered"]

log = logging.getLogger("ps_server")

LIMIT = 10_000
"""Most runs whose deletion is waiting for some server."""

FILE = "undelivered-deletions.json"


class Undelivered:
    def __init__(self, directory: Path | None = None) -> None:
        """``directory``: where the list is kept (server 0's --data-dir), None: in memory only."""
        self._path = directory / FILE if directory is not None else None
        self._pending: dict[str, set[int]] = {}
        """run id -> the servers not told yet, oldest deletion first."""
        self._lock = asyncio.Lock()
        if self._path is None:
            log.warning("server 0 of the cluster has no --data-dir: its runs, and the deletions of runs some server "
                        "has not been told of yet, last as long as this process; after a restart the other servers "
                        "keep their shards of them (memory, and checkpoints in their --data-dir) until they restart "
                        "without one or the runs' directories are removed by hand. Give server 0 a --data-dir to "
                        "keep both")
        elif self._path.exists():
            try:
                loaded = json.loads(self._path.read_text())
                self._pending = {str(run_id): {int(i) for i in servers} for run_id, servers in loaded.items() if servers}
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                log.error("%s does not load (%s): deletions of runs some server had not been told of are forgotten; "
                          "their shards stay on those servers until deleted by hand", self._path, exc)
            if self._pending:
                log.warning("%d deleted run(s) still to be deleted on some server: told when each answers",
                            len(self._pending))

    def runs(self, index: int) -> list[str]:
        """The runs server ``index`` has not been told were deleted, oldest first."""
        return [run_id for run_id, servers in self._pending.items() if index in servers]

    def __len__(self) -> int:
        return len(self._pending)

    async def add(self, run_id: str, servers: Iterable[int]) -> None:
        servers = set(servers)
        if not servers:
            return
        self._pending.setdefault(run_id, set()).update(servers)
        while len(self._pending) > LIMIT:
            old = next(iter(self._pending))
            log.error("more than %d deleted runs are waiting for a server to hear of it: %s is forgotten, its shard "
                      "stays on server(s) %s until deleted by hand (bring those servers back)", LIMIT, old,
                      sorted(self._pending.pop(old)), extra={"run": old})
        await self._save()

    async def done(self, run_id: str, index: int) -> None:
        """Server ``index`` has deleted its shard of ``run_id``."""
        servers = self._pending.get(run_id)
        if servers is None or index not in servers:
            return
        servers.discard(index)
        if not servers:
            del self._pending[run_id]
        await self._save()

    async def _save(self) -> None:
        """Write the list as it is now (one write at a time: the last one holds the latest list)."""
        if self._path is None:
            return
        async with self._lock:
            text = json.dumps({run_id: sorted(s) for run_id, s in self._pending.items()})
            try:
                await asyncio.to_thread(_replace, self._path, text)
            except OSError as exc:  # (kept in memory: still told while this process lives)
                log.error("could not write %s (%s): a restart of server 0 would forget deletions some server has "
                          "not been told of", self._path, exc.strerror or exc)


def _replace(path: Path, text: str) -> None:
    """``path`` holds ``text``, whole, whatever happens: written beside it, fsynced, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
