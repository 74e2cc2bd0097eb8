"""``psctl dashboard``: a local web page of the cluster's runs, live (aiohttp).

The page talks only to this process, and this process to the parameter server through the same
``PsClient`` psctl uses (TLS and token from the same environment): the parameter server gets no
new port and no new attack surface. Bound to 127.0.0.1 unless told otherwise.

    GET  /                          the runs list           (static/index.html)
    GET  /runs/{run_id}             one run, live           (static/run.html)
    GET  /api/runs                  [run facts], newest first (``facts.run_facts``, as psctl runs)
    GET  /api/runs/{run_id}         ``psctl status --json`` plus the history: curves, evaluations,
                                    events, the staleness histogram, pushes per second (``push_rates``)
    GET  /api/runs/{run_id}/staleness  the staleness histogram alone
    GET  /api/runs/{run_id}/live    server-sent events fed by WatchRun: "status" (as above, without
                                    the history), "points" (each rank's points newer than its last sent),
                                    "events" (those newer than the last sent), "down" (the parameter
                                    server is unreachable: the stream keeps retrying and says
                                    "status" again once it is back),
                                    "end" (the run finished), "gone" (the server no longer knows it)
    POST /api/runs/{run_id}/stop    StopRun
    POST /api/runs/{run_id}/checkpoint  CheckpointRun

A POST must come from the page itself: JSON content type and, when the browser sends an Origin,
this server's own (another site's page cannot make a browser post here).

A dashboard holding a token or a client certificate acts with them, so it has a key of its own
(``serve`` prints the address with it, ``?key=...``): the page opened there gets it as a cookie,
a script sends ``authorization: Bearer KEY``, and nothing else is answered but ``/static`` (the
page's code). Without them the parameter server itself asks nothing, and neither does the dashboard.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from paramserver import errors
from paramserver.client import PsClient
from paramserver.security import Security
from paramserver.v1 import paramserver_pb2 as pb

from .. import facts

__all__ = ["STATIC", "make_app", "serve"]

log = logging.getLogger("psctl.dashboard")
STATIC = Path(__file__).resolve().parent / "static"
RETRY_SECONDS = 1.0
"""How often the live stream tries the parameter server again while it is unreachable."""
FINISHED = (pb.RUN_STATE_COMPLETED, pb.RUN_STATE_STOPPED, pb.RUN_STATE_FAILED)
POINTS = 2000
"""Metrics points a live update asks for (the newest; the page keeps what it was sent)."""
RATE_SPANS = 120
"""Spans of equal time the throughput's history is counted in (``push_rates``)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Cluster:
    address: str
    security: Security | None
    timeout: float
    interval: float
    """Seconds between live updates."""
    hosts: frozenset[str] | None = None
    """The names requests may be addressed to (``Host``); None: any."""
    key: str = field(default="", repr=False)
    """What a request must carry (``_keyed``); empty: nothing."""


CLUSTER = web.AppKey("cluster", Cluster)
PS = web.AppKey("ps", PsClient)
STREAMS = web.AppKey("streams", set[asyncio.Task[Any]])
"""The live streams open now: ended at shutdown (a page would keep them open for ever)."""


LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def make_app(server: str, security: Security | None = None, timeout: float = 10.0,
             interval: float = 0.5, hosts: Collection[str] | None = LOOPBACK, key: str = "") -> web.Application:
    """The dashboard for the cluster at ``server`` (HOST:PORT); ``interval``: seconds between live
    updates; ``hosts``: refuse requests addressed to another name (None: answer any; by default
    the loopback ones, where it listens); ``key``: answer only requests carrying it (see the module)."""
    app = web.Application(middlewares=[_errors, _same_origin, _keyed])
    app[CLUSTER] = Cluster(server, security, timeout, interval, None if hosts is None else frozenset(h.lower() for h in hosts), key)
    app[STREAMS] = set()
    app.cleanup_ctx.append(_client)
    app.on_shutdown.append(_end_streams)
    app.router.add_get("/", _page("index.html"))
    app.router.add_get("/runs/{run_id}", _page("run.html"))
    app.router.add_get("/api/runs", list_runs)
    app.router.add_get("/api/runs/{run_id}", run_detail)
    app.router.add_get("/api/runs/{run_id}/live", live)
    app.router.add_get("/api/runs/{run_id}/staleness", staleness)
    app.router.add_post("/api/runs/{run_id}/stop", stop)
    app.router.add_post("/api/runs/{run_id}/checkpoint", checkpoint)
    app.router.add_static("/static", STATIC)
    return app


async def _client(app: web.Application) -> AsyncIterator[None]:
    cluster = app[CLUSTER]
    async with PsClient(cluster.address, timeout=cluster.timeout, security=cluster.security) as ps:
        app[PS] = ps
        yield


async def _end_streams(app: web.Application) -> None:
    streams = app[STREAMS]
    for task in list(streams):
        task.cancel()


def _page(name: str) -> Handler:
    async def page(_: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})
    return page


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A parameter server's error as JSON with its status: 404 for an unknown run, 503 when unreachable."""
    try:
        return await handler(request)
    except errors.PsError as exc:
        status = {errors.Code.NOT_FOUND: 404, errors.Code.UNAVAILABLE: 503, errors.Code.DEADLINE_EXCEEDED: 504,
                  errors.Code.FAILED_PRECONDITION: 409, errors.Code.INVALID_ARGUMENT: 400,
                  errors.Code.UNAUTHENTICATED: 502, errors.Code.PERMISSION_DENIED: 502}.get(exc.code, 502)
        return web.json_response({"error": str(exc), "code": exc.code.name}, status=status)


def host_name(host: str) -> str:
    """``Host`` header -> the name in it, without the port ("[::1]:8265" -> "::1")."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@web.middleware
async def _same_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The dashboard answers only requests addressed to its names (loopback ones, where it
    listens, and those it was told): a web page whose name was made to point at its address
    (DNS rebinding) cannot read or act on it."""
    hosts = request.app[CLUSTER].hosts
    if hosts is not None and host_name(request.host).lower() not in hosts:
        return web.json_response({"error": f"this dashboard answers to {', '.join(sorted(hosts))}, not {request.host} "
                                           "(psctl dashboard --allow-host NAME)"}, status=403)
    if request.method == "POST":
        origin = request.headers.get("Origin")
        if request.content_type != "application/json":
            return web.json_response({"error": "send the request as application/json (from the dashboard)"}, status=415)
        if origin is not None and origin.split("://", 1)[-1] != request.host:
            return web.json_response({"error": f"a request from {origin} may not act on this dashboard"}, status=403)
    return await handler(request)


def key_for(security: Security | None) -> str:
    """A new key when ``security`` holds a credential the dashboard would act with, else ""."""
    return secrets.token_urlsafe(24) if security is not None and (security.token or security.cert) else ""


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


@web.middleware
async def _keyed(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With a key, answer only the address printed (which sets the cookie and drops the key from
    the address bar), the cookie, or ``authorization: Bearer KEY``; ``/static`` stays open."""
    key = request.app[CLUSTER].key
    if not key or request.path.startswith("/static/"):
        return await handler(request)
    cookie = f"psctl_dashboard_{request.url.port}"  # (a browser sends 127.0.0.1's cookies to every port)
    given = request.query.get("key")
    if given is not None and request.method == "GET" and _same(given, key):
        found = web.HTTPFound(request.rel_url.without_query_params("key"))
        # Lax: sent after --open's file led the browser here, a navigation from another site (a Strict
        # one was not); another site's page cannot read with it, nor post (JSON from this origin only)
        found.set_cookie(cookie, key, httponly=True, samesite="Lax", path="/")
        raise found
    if _same(request.cookies.get(cookie, ""), key) or _same(request.headers.get("Authorization", ""), f"Bearer {key}"):
        return await handler(request)
    return web.json_response({"error": "this dashboard acts with the parameter server's credentials: open the address "
                                       "psctl dashboard printed, with its ?key=..."}, status=401)


def _ps(request: web.Request) -> PsClient:
    return request.app[PS]


def _query(request: web.Request, name: str, default: float, low: float, high: float) -> float:
    text = request.query.get(name, "")
    try:
        value = float(text) if text else default
    except ValueError:
        value = float("nan")
    if not low <= value <= high:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"?{name}={text}: use a number from {low:g} to {high:g}"}),
                                 content_type="application/json")
    return value


async def list_runs(request: web.Request) -> web.StreamResponse:
    runs = await _ps(request).list_runs(limit=int(_query(request, "limit", 200, 1, 10_000)))
    now = time.time()
    return web.json_response([facts.run_facts(r, now) for r in runs])


async def run_detail(request: web.Request) -> web.StreamResponse:
    run_id = request.match_info["run_id"]
    ps = _ps(request)
    run, metrics = await asyncio.gather(ps.get_run(run_id), ps.get_metrics(run_id, include_clock_records=True))
    return web.json_response({**status(run, metrics), **history(metrics)})


async def staleness(request: web.Request) -> web.StreamResponse:
    """The staleness histogram alone (the page refreshes it; the clock records are not in the live stream)."""
    metrics = await _ps(request).get_metrics(request.match_info["run_id"], include_clock_records=True, max_points=1)
    return web.json_response(staleness_histogram(metrics))


def status(run: pb.Run, metrics: pb.GetMetricsResponse | None) -> dict[str, Any]:
    """What a live update carries: ``psctl status --json`` (the run, its summary, workers, shards)."""
    doc = facts.status_dict(run, metrics)
    doc.pop("eval", None)
    doc.pop("events", None)
    doc["server_time"] = time.time()
    return doc


def point_rows(points: list[pb.MetricPoint]) -> list[dict[str, Any]]:
    return [{"rank": p.rank, "clock": p.clock, "time": facts.seconds(p.time), "eval": p.eval,
             "loss": facts.finite(p.loss), "test_loss": facts.finite(p.eval_loss) if p.eval else None,
             "test_accuracy": facts.finite(p.eval_accuracy) if p.eval else None,
             "test_auc": facts.auc(p) if p.eval else None, "samples": p.samples} for p in points]


def staleness_histogram(metrics: pb.GetMetricsResponse) -> dict[str, int]:
    """How many served pulls read parameters k clocks ahead of the min clock (clock - min clock:
    at most the bound), over the server's clock records."""
    counts = collections.Counter(facts.pull_leads(metrics))
    return {str(k): counts[k] for k in sorted(counts)}


def push_rates(metrics: pb.GetMetricsResponse, spans: int = RATE_SPANS) -> list[dict[str, Any]]:
    """The throughput chart's history: pushes per second over the server's clock records of pushes
    (the most recent), counted in up to ``spans`` spans of equal time (about ten pushes each, at
    least two spans); each row as
    the live ones: the span's end ``t`` (Unix seconds), ``clock`` (the min clock at its last push),
    ``pushes`` (per second) and ``mb`` (None: bytes are measured live only)."""
    pushes = [(r.time.ToNanoseconds() / 1e9, r.min_clock) for r in metrics.clock_records
              if r.kind == pb.ClockRecord.KIND_PUSH]
    if len(pushes) < 2 or not pushes[-1][0] > pushes[0][0]:
        return []
    t0 = pushes[0][0]
    n = max(2, min(spans, len(pushes) // 10))
    width = (pushes[-1][0] - t0) / n
    counts, clocks = [0] * n, [pushes[0][1]] * n
    for t, clock in pushes:
        i = min(n - 1, int((t - t0) / width))
        counts[i] += 1
        clocks[i] = clock
    for i in range(1, n):  # (a span without a push keeps the clock of the one before)
        if not counts[i]:
            clocks[i] = clocks[i - 1]
    return [{"t": t0 + (i + 1) * width, "clock": clocks[i], "pushes": counts[i] / width, "mb": None} for i in range(n)]


def history(metrics: pb.GetMetricsResponse) -> dict[str, Any]:
    return {"points": point_rows(list(metrics.points)), "events": facts.event_dicts(metrics.events),
            "staleness_histogram": staleness_histogram(metrics), "rates": push_rates(metrics)}


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


async def live(request: web.Request) -> web.StreamResponse:
    """Server-sent events for one run, until it finishes or the page goes away (see the module)."""
    run_id = request.match_info["run_id"]
    ps, interval = _ps(request), request.app[CLUSTER].interval
    await ps.get_run(run_id)  # 404 now for an unknown run, not an empty stream
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    task = asyncio.current_task()
    assert task is not None
    request.app[STREAMS].add(task)
    try:
        await _follow(ps, run_id, interval, resp)
    except ConnectionResetError:
        pass  # the page went away
    finally:
        request.app[STREAMS].discard(task)
    return resp


async def _follow(ps: PsClient, run_id: str, interval: float, resp: web.StreamResponse) -> None:
    # The newest point sent, per rank: a point's time is its worker's clock, and the hosts' clocks
    # may disagree (a page that reconnects gets the newest points again and drops those it holds).
    sent: dict[int, float] = {}
    newest_event = -1.0  # the time of the newest event sent: each watch begins with all the server keeps
    down = idle = False
    while True:
        try:
            if idle:
                # A quiet watch: ask the server (within the client's timeout) whether it is still
                # there (a hung one neither answers a watch nor ends it); the write finds a page gone.
                idle = False
                await resp.write(_sse("status", status(await ps.get_run(run_id), None)))
            # WatchRun answers on changes only: a quiet run (pending, waiting for workers) is watched
            # again after a while
            async for snap in ps.watch_run(run_id, interval=interval, idle_timeout=max(2.0, 20 * interval)):
                down = False
                metrics = await ps.get_metrics(run_id, max_points=POINTS)
                fresh = [p for p in metrics.points if (facts.seconds(p.time) or 0.0) > sent.get(p.rank, -1.0)]
                for p in fresh:
                    sent[p.rank] = max(sent.get(p.rank, -1.0), facts.seconds(p.time) or 0.0)
                await resp.write(_sse("status", status(snap.run, metrics)))
                if fresh:
                    await resp.write(_sse("points", point_rows(fresh)))
                events = [e for e in snap.events if (facts.seconds(e.time) or 0.0) > newest_event]
                if events:
                    newest_event = max(facts.seconds(e.time) or 0.0 for e in events)
                    await resp.write(_sse("events", facts.event_dicts(events)))
                if snap.run.state in FINISHED:
                    await resp.write(_sse("end", {"state": facts.state_name(snap.run.state)}))
                    return
            run = await ps.get_run(run_id)  # the stream ended: the run finished (or the server went away)
            if run.state in FINISHED:
                await resp.write(_sse("status", status(run, None)))
                await resp.write(_sse("end", {"state": facts.state_name(run.state)}))
                return
            await asyncio.sleep(RETRY_SECONDS)
        except errors.WatchIdle:
            idle = True  # nothing changed: watch again, after asking
        except errors.PsError as exc:
            if exc.code == errors.Code.NOT_FOUND:
                await resp.write(_sse("gone", {"error": str(exc)}))
                return
            if not down:
                log.info("run %s: the parameter server is unreachable (%s); retrying", run_id, exc)
            down = True
            await resp.write(_sse("down", {"error": str(exc), "retry_seconds": RETRY_SECONDS}))
            await asyncio.sleep(RETRY_SECONDS)


async def stop(request: web.Request) -> web.StreamResponse:
    run = await _ps(request).stop_run(request.match_info["run_id"], reason="stopped from the dashboard")
    return web.json_response({"run_id": run.run_id, "state": facts.state_name(run.state)})


async def checkpoint(request: web.Request) -> web.StreamResponse:
    resp = await _ps(request).checkpoint_run(request.match_info["run_id"])
    return web.json_response(facts.message_to_dict(resp))


async def serve(server: str, security: Security | None, host: str, port: int, timeout: float,
                ready: Callable[[str], None] | None = None, allow_hosts: Collection[str] = ()) -> None:
    """Run the dashboard until SIGINT, SIGTERM or cancelled; ``ready(url)`` once it listens (the
    address to open: with its key when it has one, ``key_for``). It answers requests addressed to
    the loopback names and ``allow_hosts``; to any name when it listens elsewhere and none are given."""
    key = key_for(security)
    hosts = LOOPBACK | frozenset(allow_hosts) if allow_hosts or host_name(host) in LOOPBACK else None
    runner = web.AppRunner(make_app(server, security, timeout, hosts=hosts, key=key), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        url = f"http://{'[' + host + ']' if ':' in host else host}:{bound[1]}/" + (f"?key={key}" if key else "")
        if ready:
            ready(url)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, docker stop: exit 0 (also where the shell
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)  # that started it ignored SIGINT)
        await stop.wait()
    finally:
        await runner.cleanup()
