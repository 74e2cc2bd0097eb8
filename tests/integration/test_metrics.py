"""The Prometheus endpoint reports the runs' counters and clocks."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import make_spec, with_config

from paramserver.client import PsClient
from paramserver.security import Security
from ps_server.config import ServerConfig
from ps_server.core.run import Run
from ps_server.core.status import RunStatus
from ps_server.server import start_server

pytestmark = pytest.mark.timeout(30)


async def test_metrics_endpoint_reports_pushes_and_clocks(server_config: ServerConfig) -> None:
    ps = await start_server(with_config(server_config, metrics_port=0))
    try:
        assert ps.metrics_port
        async with PsClient(f"127.0.0.1:{ps.port}") as c:
            run = await c.create_run(make_spec(num_workers=1, staleness=-1))
            a = (await c.join("w")).assignment
            p = await c.pull(run.run_id, 0, a.incarnation, 0)
            await c.push(run.run_id, 0, a.incarnation, 0, {n: np.ones_like(v) for n, v in p.tensors.items()})
            url = f"http://127.0.0.1:{ps.metrics_port}/metrics"
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
            assert c.route.opened["shm"] == 2  # the pull's stream and the push's, both still open
        assert "paramserver_shm_plane_connections_total 2.0" in text
        assert "paramserver_shm_plane_open 2.0" in text
        assert "paramserver_data_plane_connections_total 0.0" in text
        assert f'paramserver_pushes_applied_total{{run="{run.run_id}"}} 1.0' in text
        assert f'paramserver_worker_clock{{rank="0",run="{run.run_id}"}} 1.0' in text
        assert f'paramserver_run_state{{run="{run.run_id}",state="running"}} 1.0' in text
        assert f'paramserver_parked_seconds_total{{run="{run.run_id}"}}' in text
        assert "paramserver_push_slot_lends_total 0.0" in text
    finally:
        await ps.stop(0)


async def test_metrics_need_the_servers_token_when_it_has_one(server_config: ServerConfig) -> None:
    """Run ids and counters are as private as the gRPC API: with a token, a scrape must carry it."""
    ps = await start_server(with_config(server_config, metrics_port=0, token="s3cret", insecure=True))
    url = f"http://127.0.0.1:{ps.metrics_port}/metrics"

    def scrape(token: str | None) -> tuple[int, str]:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    try:
        async with PsClient(f"127.0.0.1:{ps.port}", security=Security(token="s3cret", insecure=True)) as c:
            run = await c.create_run(make_spec(num_workers=1))
        for token in (None, "wrong"):
            status, body = await asyncio.to_thread(scrape, token)
            assert status == 401 and run.run_id not in body and "bearer token" in body
        status, body = await asyncio.to_thread(scrape, "s3cret")
        assert status == 200 and f'run="{run.run_id}"' in body
    finally:
        await ps.stop(0)


async def test_a_scrape_reads_the_runs_on_the_event_loop(server_config: ServerConfig,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The core is single-threaded: a scrape, served on the metrics thread, has the loop read the
    runs. (It read them itself, and the min clock it computed could land in the clock's cache
    after a push had moved it: a stale, lower min clock, kept until the next change; seen with
    1000 ranks and a short switch interval.)"""
    threads: list[int] = []
    status = Run.status

    def recorded(run: Run, workers: bool = True) -> RunStatus:
        threads.append(threading.get_ident())
        return status(run, workers)

    monkeypatch.setattr(Run, "status", recorded)
    ps = await start_server(with_config(server_config, metrics_port=0))
    try:
        async with PsClient(f"127.0.0.1:{ps.port}") as c:
            run = await c.create_run(make_spec(num_workers=1))
        url = f"http://127.0.0.1:{ps.metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        assert f'run="{run.run_id}"' in text
        assert threads and set(threads) == {threading.get_ident()}
    finally:
        await ps.stop(0)


async def test_stop_closes_the_metrics_endpoint(server_config: ServerConfig) -> None:
    """After stop, the port is closed (it went on serving the stopped server's numbers, its
    thread and port held for the life of the process)."""
    ps = await start_server(with_config(server_config, metrics_port=0))
    port = ps.metrics_port
    assert port
    await ps.stop(0)
    with pytest.raises(OSError):
        await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5))


async def test_a_flood_of_connections_to_the_metrics_port_holds_a_bounded_number(server_config: ServerConfig) -> None:
    """Each connection had a thread and a descriptor for up to 10 s (a silent client's timeout): a
    flood of them was bounded only by the open-file limit, which the gRPC port and the data planes
    share. Now at most ``_MAX_SCRAPES`` are served at once; more are closed as they come, and once
    the flood ends, scrapes are served again."""
    from ps_server.metrics import _MAX_SCRAPES

    ps = await start_server(with_config(server_config, metrics_port=0))
    flood: list[socket.socket] = []

    def handlers() -> int:
        return sum("process_request_thread" in t.name for t in threading.enumerate())

    def closed_by_server(s: socket.socket) -> bool:
        try:
            return s.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True

    try:
        for _ in range(5 * _MAX_SCRAPES):
            flood.append(socket.create_connection(("127.0.0.1", ps.metrics_port), timeout=5))
            flood[-1].settimeout(None)  # (blocking, so that MSG_DONTWAIT alone decides: no wait in recv)
            async with asyncio.timeout(5):  # (one at a time: the server's accept backlog is small)
                while handlers() + sum(map(closed_by_server, flood)) < len(flood):
                    await asyncio.sleep(0.002)
        assert handlers() == _MAX_SCRAPES and sum(map(closed_by_server, flood)) == 4 * _MAX_SCRAPES
    finally:
        for s in flood:
            s.close()
    try:
        url = f"http://127.0.0.1:{ps.metrics_port}/metrics"
        async with asyncio.timeout(20):
            while handlers():  # (each held connection's thread ends at its client's close)
                await asyncio.sleep(0.02)
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        assert "paramserver_push_slot_lends_total" in text
    finally:
        await ps.stop(0)


async def test_a_scrape_restricted_by_name_returns_the_families_asked_for(server_config: ServerConfig) -> None:
    """``/metrics?name[]=...`` (a federating Prometheus, a check on one figure) collects only the
    collectors that described a name asked for; ours described none, and such a scrape was empty."""
    ps = await start_server(with_config(server_config, metrics_port=0))
    try:
        async with PsClient(f"127.0.0.1:{ps.port}") as c:
            run = await c.create_run(make_spec(num_workers=1))
        names = ["paramserver_pushes_applied_total", "paramserver_run_state", "paramserver_shm_plane_open"]
        query = urllib.parse.urlencode([("name[]", n) for n in names])
        url = f"http://127.0.0.1:{ps.metrics_port}/metrics?{query}"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
        assert sorted(s.name for s in samples) == sorted(names)
        assert {s.name: s.labels for s in samples}["paramserver_run_state"] == {"run": run.run_id, "state": "pending"}
    finally:
        await ps.stop(0)
