"""``psctl dashboard``'s HTTP side against a real ps-server and real workers: the runs list, a run's
history, the live stream (server-sent events) through a run's life and a server restart, and the
actions, which only the page itself may call. The page in a real browser: tests/browser."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from procs import connect, finish, free_port, ps_server, ps_workers, watch_until

from client.dashboard.server import make_app
from client.spec import LaunchOptions, build_run_spec
from paramserver.v1 import paramserver_pb2 as pb

pytestmark = pytest.mark.timeout(120)


def spec(**kw: Any) -> pb.RunSpec:
    o: dict[str, Any] = {"model": "softmax", "dataset": "digits", "workers": 2, "staleness": 1, "iterations": 60,
                         "batch_size": 16, "eval_every": 10, "seed": 3, **kw}
    return build_run_spec(LaunchOptions(**o))


@asynccontextmanager
async def dashboard(addr: str) -> AsyncIterator[str]:
    """The dashboard for the cluster at ``addr``, on a free port of this loop: its base URL."""
    runner = web.AppRunner(make_app(addr, timeout=5.0, interval=0.1))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def sse(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    """The (event, data) pairs of a server-sent event stream."""
    event, data = "message", []
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])


async def test_the_runs_list_and_a_finished_run_s_history() -> None:
    port = free_port()
    with ps_server("--port", str(port)) as (_, addr), ps_workers(addr, 2):
        async with connect(addr) as c:
            first = await c.create_run(spec(name="first"))
            await finish(c, first.run_id, timeout=60)
            second = await c.create_run(spec(name="second", workers=3))  # no workers for it: pending
        async with dashboard(addr) as url, aiohttp.ClientSession() as http:
            async with http.get(f"{url}/api/runs") as r:
                assert r.status == 200
                runs = await r.json()
            assert [x["run_id"] for x in runs] == [second.run_id, first.run_id]  # newest first
            assert runs[1]["state"] == "completed" and runs[1]["progress"] == 1.0 and runs[1]["name"] == "first"
            assert runs[0]["state"] == "pending" and runs[0]["workers"] == 3
            async with http.get(f"{url}/api/runs/{first.run_id}") as r:
                doc = await r.json()
            assert doc["summary"]["min_clock"] == 60 and [w["clock"] for w in doc["workers"]] == [60, 60]
            evals = [p for p in doc["points"] if p["eval"]]
            assert [p["clock"] for p in evals][-1] == 60 and 0.5 < evals[-1]["test_accuracy"] <= 1.0
            assert {p["rank"] for p in doc["points"] if not p["eval"]} == {0, 1}
            histogram = {int(k): v for k, v in doc["staleness_histogram"].items()}
            # every served pull (a worker skips some: its cache was fresh), none ahead of the bound s = 1
            assert sum(histogram.values()) == doc["summary"]["pulls_served"] > 0 and max(histogram) <= 1
            assert "completed" in [e["kind"] for e in doc["events"]]
            # the throughput chart's history, from the pushes the server recorded (MB/s is measured live only)
            rates = doc["rates"]
            width = rates[1]["t"] - rates[0]["t"]
            assert round(sum(r["pushes"] for r in rates) * width) == doc["summary"]["pushes_applied"] == 120
            assert all(r["mb"] is None for r in rates) and rates[-1]["clock"] == 59  # (the last push's: before it)
            assert [r["clock"] for r in rates] == sorted(r["clock"] for r in rates)
            async with http.get(f"{url}/api/runs/{first.run_id}/staleness") as r:
                assert await r.json() == doc["staleness_histogram"]
            async with http.get(f"{url}/") as r, http.get(f"{url}/runs/{first.run_id}") as p:
                assert r.status == p.status == 200 and "runs.js" in await r.text() and "run.js" in await p.text()
            async with http.get(f"{url}/static/vendor/uPlot.iife.min.js") as r:
                assert r.status == 200 and len(await r.read()) > 40_000
            async with http.get(f"{url}/api/runs/run-nope") as r:
                assert r.status == 404 and "run-nope" in (await r.json())["error"]
            for bad in ("api/runs?limit=x", "api/runs?limit=0", "api/runs?limit=1e9"):
                async with http.get(f"{url}/{bad}") as r:
                    assert r.status == 400 and "use a number" in (await r.json())["error"], bad


async def test_the_live_stream_shows_who_waits_on_whom_until_the_run_ends() -> None:
    """s = 1, rank 1 a 4x straggler: rank 0 is parked waiting for rank 1 to reach the clock it
    needs, and rank 1 holds the window back; points arrive; the stream ends with the run."""
    port = free_port()
    with ps_server("--port", str(port)) as (_, addr), ps_workers(addr, 2):
        async with connect(addr) as c:
            # (long enough for a dozen updates: each catches rank 0 parked only now and then)
            run = await c.create_run(spec(iterations=600, slowdown=((1, 4.0),)))
        seen: dict[str, list[Any]] = {}
        async with dashboard(addr) as url, aiohttp.ClientSession() as http:
            async with http.get(f"{url}/api/runs/{run.run_id}/live") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
                async for event, data in sse(r):
                    seen.setdefault(event, []).append(data)
                    if event == "end":
                        break
        assert seen["end"] == [{"state": "completed"}]
        clocks = [d["summary"]["min_clock"] for d in seen["status"]]
        assert clocks == sorted(clocks) and clocks[0] < 600 == clocks[-1] and len(set(clocks)) > 3
        parked = [d for d in seen["status"] if d["summary"]["state"] == "running"
                  and any(w["waiting"] for w in d["workers"])]  # (pending: rank 0 waits for the run to start)
        assert parked, "rank 0 never waited for the straggler"
        ahead = []
        for d in parked:
            waiting = [w for w in d["workers"] if w["waiting"]]
            assert [w["rank"] for w in waiting] == [0]  # never the straggler
            # waiting for a clock rank 1 has yet to reach (else released, not yet served: an update
            # can come between the two)
            ahead.append(waiting[0]["needs_min_clock"] > d["workers"][1]["clock"])
        assert any(ahead), "no update caught rank 0 waiting for what rank 1 had yet to do"
        points = [p for batch in seen["points"] for p in batch]
        assert {p["rank"] for p in points if not p["eval"]} == {0, 1} and any(p["eval"] for p in points)
        assert len({(p["rank"], p["clock"], p["eval"], p["time"]) for p in points}) == len(points)  # none twice


@asynccontextmanager
async def live_pending_run() -> AsyncIterator[tuple[subprocess.Popen[str], AsyncIterator[tuple[str, Any]]]]:
    """A ps-server process holding a pending run (no workers: nothing changes), and the events of
    the dashboard's live stream of it."""
    port = free_port()
    with ps_server("--port", str(port)) as (proc, addr):
        async with connect(addr) as c:
            run = await c.create_run(spec())
        async with dashboard(addr) as url, aiohttp.ClientSession() as http:
            async with http.get(f"{url}/api/runs/{run.run_id}/live") as r:
                yield proc, sse(r)


async def test_a_quiet_run_is_not_a_lost_server() -> None:
    """A pending run (no workers) changes nothing, so WatchRun says nothing: the stream watches
    again (a fresh status) and says nothing of a server down."""
    events: list[str] = []
    async with live_pending_run() as (_, live):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(5.0):  # beyond the watch's idle time (2 s here)
                async for event, _ in live:
                    events.append(event)
    assert "down" not in events and events.count("status") >= 2  # watched again, not given up


async def test_a_quiet_run_s_stream_sends_each_event_once() -> None:
    """Each watch begins with every event the server keeps (up to 20,000 a run): the stream sends
    on those it has not sent (it sent them all again at each watch, every 2 s here)."""
    sent: list[dict[str, Any]] = []
    statuses = 0
    async with live_pending_run() as (_, live):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(5.0):  # beyond the watch's idle time (2 s here)
                async for event, data in live:
                    statuses += event == "status"
                    sent += data if event == "events" else []
    assert statuses >= 3 and [e["kind"] for e in sent] == ["created"], sent  # watched again, the event sent once


async def test_a_hung_server_is_a_server_down() -> None:
    """A server that hangs (stopped, a network that drops packets) neither answers a watch nor
    ends it: after a quiet watch the stream asks it, within the dashboard's timeout, and says it
    is down (before, the page showed "live" with stale numbers for as long as it hung)."""
    events: list[str] = []
    async with live_pending_run() as (proc, live):
        try:
            async with asyncio.timeout(25.0):  # idle 2 s, then the dashboard's 5 s timeout
                async for event, _ in live:
                    events.append(event)
                    if event == "status" and "stopped" not in events:
                        os.kill(proc.pid, signal.SIGSTOP)
                        events.append("stopped")
                    if event == "down":
                        break
        finally:
            os.kill(proc.pid, signal.SIGCONT)
    assert "down" in events[events.index("stopped"):], events


async def test_actions_come_only_from_the_page_and_stop_a_run() -> None:
    port = free_port()
    with ps_server("--port", str(port)) as (_, addr):
        async with connect(addr) as c:
            run = await c.create_run(spec())
        async with dashboard(addr) as url, aiohttp.ClientSession() as http:
            stop = f"{url}/api/runs/{run.run_id}/stop"
            async with http.post(stop, data="x=1", headers={"Content-Type": "application/x-www-form-urlencoded"}) as r:
                assert r.status == 415  # what a form on another site could send
            async with http.post(stop, json={}, headers={"Origin": "http://evil.example"}) as r:
                assert r.status == 403 and "evil.example" in (await r.json())["error"]
            for name in ("evil.example", "evil.example:80"):  # a name pointed at 127.0.0.1 (DNS rebinding)
                async with http.get(f"{url}/api/runs", headers={"Host": name}) as r:
                    assert r.status == 403 and name in (await r.json())["error"]
            async with http.get(f"{url}/api/runs", headers={"Host": "localhost:1"}) as r:
                assert r.status == 200
            async with connect(addr) as c:
                assert (await c.get_run(run.run_id)).state == pb.RUN_STATE_PENDING  # untouched
            async with http.post(f"{url}/api/runs/{run.run_id}/checkpoint", json={}) as r:
                assert r.status == 409 and "data-dir" in (await r.json())["error"]  # no --data-dir: says so
            async with http.post(stop, json={}, headers={"Origin": url}) as r:
                assert r.status == 200 and (await r.json())["state"] == "stopped"
            async with connect(addr) as c:
                assert (await c.get_run(run.run_id)).state == pb.RUN_STATE_STOPPED


@pytest.mark.timeout(180)
async def test_the_live_stream_says_the_server_is_down_and_resumes_after_its_restart(tmp_path: Path) -> None:
    port = free_port()
    args = ("--port", str(port), "--data-dir", str(tmp_path), "--checkpoint-every", "10", "--lease-seconds", "20")
    with ps_workers(f"127.0.0.1:{port}", 2, "--timeout-seconds", "10"):
        with ps_server(*args) as (server, addr):
            async with connect(addr) as c:
                run = await c.create_run(spec(iterations=400, slowdown=((1, 3.0),)))
                await watch_until(c, run.run_id, lambda r: r.min_clock >= 20)
            async with dashboard(addr) as url, aiohttp.ClientSession() as http:
                async with http.get(f"{url}/api/runs/{run.run_id}/live") as r:
                    events = sse(r)
                    assert (await anext(events))[0] == "status"
                    server.kill()
                    server.wait(10)
                    async with asyncio.timeout(30):
                        async for event, data in events:
                            if event == "down":
                                assert data["retry_seconds"] > 0 and data["error"]
                                break
                    with ps_server(*args):
                        async with asyncio.timeout(60):
                            async for event, data in events:
                                if event == "status":
                                    assert data["summary"]["run_id"] == run.run_id
                                    break
                        async with connect(addr) as c:
                            await c.stop_run(run.run_id)


async def test_a_sharded_run_shows_one_line_per_server() -> None:
    ports = [free_port(), free_port()]
    cluster = ",".join(f"127.0.0.1:{p}" for p in ports)
    with ps_server("--port", str(ports[0]), "--cluster", cluster, "--index", "0") as (_, addr), \
            ps_server("--port", str(ports[1]), "--cluster", cluster, "--index", "1"):
        async with connect(addr) as c:
            run = await c.create_run(spec(model="mlp:32"))
        async with dashboard(addr) as url, aiohttp.ClientSession() as http, asyncio.timeout(30):
            while True:  # server 0 hears from server 1 every few seconds: "not heard from yet" until then
                async with http.get(f"{url}/api/runs/{run.run_id}") as r:
                    doc = await r.json()
                if all(s["reachable"] for s in doc["shards"]):
                    break
                await asyncio.sleep(0.2)
    shards = doc["shards"]
    assert [s["index"] for s in shards] == [0, 1] and [s["address"] for s in shards] == cluster.split(",")
    assert all(s["reachable"] and s["bytes_held"] > 0 and s["pieces"] for s in shards), shards
    assert sum(s["bytes_held"] for s in shards) >= 4 * (64 * 32 + 32 + 32 * 10 + 10)  # the whole model, once


def test_psctl_dashboard_serves_the_page_and_says_where() -> None:
    """The command as a user runs it: it prints its URL (a free port with --port 0), serves the
    page and the API until interrupted; a port already taken is an error that says what to do."""
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    with ps_server("--port", str(free_port())) as (_, addr):
        # SIGINT ignored as a shell's background job has it (Ctrl-C still stops the dashboard): set
        # here around the start and inherited, not by a preexec_fn (Python in a child forked from
        # this process, whose gRPC threads make such a child abort now and then)
        before = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            proc = subprocess.Popen([sys.executable, "-m", "client.cli", "dashboard", "--port", "0", "--server", addr],
                                    stderr=subprocess.PIPE, text=True)
        finally:
            signal.signal(signal.SIGINT, before)
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            match = re.search(r"on (http://127\.0\.0\.1:(\d+)/) \(the cluster at " + re.escape(addr), line)
            assert match, line
            with urllib.request.urlopen(match.group(1) + "api/runs", timeout=10) as r:
                assert r.status == 200 and json.loads(r.read()) == []
            taken = subprocess.run([sys.executable, "-m", "client.cli", "dashboard", "--port", match.group(2),
                                    "--server", addr], capture_output=True, text=True, timeout=60)
            assert taken.returncode == 1 and "choose another --port" in taken.stderr, taken.stderr
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(20) == 0


async def test_a_dashboard_holding_a_token_answers_only_who_has_its_key(server_config: Any) -> None:
    """psctl dashboard acts with the token (or client certificate) it was given: whoever reached
    its port, any user of the machine, listed and stopped runs of a server that asked everyone
    else for the token. It prints an address with a key of its own; the page opened there keeps
    it in a cookie, and nothing else is answered but its static files."""
    import re
    import sys
    from http.cookiejar import CookieJar
    from urllib import error, request

    from support import with_config

    from ps_server.server import start_server

    token = "dashboard-test-token"
    ps = await start_server(with_config(server_config, token=token, insecure=True))
    env = {**os.environ, "PS_TOKEN": token, "PSCTL_INSECURE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "dashboard", "--port", "0", "--server",
                             f"127.0.0.1:{ps.port}"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        line = await asyncio.to_thread(proc.stderr.readline)
        match = re.search(r"on (http://127\.0\.0\.1:\d+/)\?key=(\S+) ", line)
        assert match, line
        base, key = match.groups()
        assert token not in line

        def get(url: str, opener: request.OpenerDirector | None = None, **headers: str) -> tuple[int, str]:
            try:
                with (opener or request.build_opener()).open(request.Request(url, headers=headers), timeout=10) as r:
                    return r.status, r.read().decode()
            except error.HTTPError as exc:
                return exc.code, exc.read().decode()

        for url in (base, base + "api/runs", base + "api/runs?key=wrong", base + "runs/x"):
            status, body = await asyncio.to_thread(get, url)
            assert status == 401 and "key" in body and token not in body, (url, status, body)
        status, body = await asyncio.to_thread(get, base + "api/runs", Authorization="Bearer wrong")
        assert status == 401
        status, _ = await asyncio.to_thread(get, base + "static/common.js")
        assert status == 200  # (the page's code: no secret in it)
        status, body = await asyncio.to_thread(get, base + "api/runs", Authorization=f"Bearer {key}")
        assert status == 200 and json.loads(body) == []
        browser = request.build_opener(request.HTTPCookieProcessor(CookieJar()))
        status, body = await asyncio.to_thread(get, f"{base}?key={key}", browser)
        assert status == 200 and "<html" in body.lower()
        status, body = await asyncio.to_thread(get, base + "api/runs", browser)
        assert status == 200 and json.loads(body) == []
    finally:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        await ps.stop(0)


def test_a_dashboard_on_another_address_answers_the_names_it_is_told() -> None:
    """Listening on 0.0.0.0 (a container's dashboard, published on the host's 127.0.0.1), it
    answered every name: a page whose name was pointed at it (DNS rebinding) could read and stop
    runs. --allow-host names what it answers to, besides the loopback names."""
    import re
    import sys
    from urllib import error, request

    with ps_server("--port", str(free_port())) as (_, addr):
        proc = subprocess.Popen([sys.executable, "-m", "client.cli", "dashboard", "--port", "0", "--host", "0.0.0.0",
                                 "--allow-host", "ps.example", "--server", addr], stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            match = re.search(r"on http://0\.0\.0\.0:(\d+)/ ", line)
            assert match, line
            warning = proc.stderr.readline()
            assert "rebinding" not in warning, warning

            def status(host: str) -> int:
                req = request.Request(f"http://127.0.0.1:{match.group(1)}/api/runs", headers={"Host": host})
                try:
                    with request.urlopen(req, timeout=10) as r:
                        return int(r.status)
                except error.HTTPError as exc:
                    return exc.code

            assert [status(h) for h in ("evil.example:8265", "ps.example:8265", "127.0.0.1:8265", "localhost")] == \
                [403, 200, 200, 200]
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(20) == 0
