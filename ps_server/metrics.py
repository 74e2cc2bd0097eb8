"""Prometheus metrics, read from the runs at scrape time.

A custom collector turns each run's ``status()`` into metric families when Prometheus scrapes, so
the hot path (pushes, pulls) pays nothing for metrics: the counters it already keeps are the source.
Server-wide figures come as a ``ServerStatistics`` value from whoever wires the server: this module
knows no transport. The endpoint is the library's WSGI app behind the server's token and TLS, when
it has them: run ids and counters are nobody else's business.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from .core.registry import RunRegistry
from .core.status import RunStatus

__all__ = ["RunCollector", "ServerStatistics", "close_metrics", "serve_metrics"]


@dataclass(frozen=True)
class ServerStatistics:
    push_slot_lends: int
    """Times a push stalled mid-stream and lent its receive slot (--push-slots) to another."""
    data_plane_streams_opened: int | None = None
    """Streams opened on the TCP data plane (None: the server has none)."""
    data_plane_streams_open: int | None = None
    shm_streams_opened: int | None = None
    """Streams opened on the shared-memory data plane (None: the server offers none)."""
    shm_streams_open: int | None = None

_MAX_SCRAPES = 16
"""Connections served at once (a thread and a descriptor each, up to ``_SCRAPE_SECONDS``); more are
closed as they come, so that a flood of them cannot take the descriptors the gRPC port and the data
planes need. Prometheus scrapes a target one connection at a time."""

_SCRAPE_SECONDS = 10.0
"""Longest a scrape's connection may stay silent (the TLS handshake included)."""

_COUNTERS = {
    "pushes_applied": "Pushes applied to the parameters",
    "pushes_duplicate": "Retried pushes acknowledged without applying them again",
    "pushes_rejected": "Pushes rejected (bad input, stale incarnation, out of order)",
    "pulls_served": "Pulls served",
    "pulls_parked": "Pulls that had to wait for the SSP bound",
    "pulls_skipped": "Pulls workers skipped thanks to their SSP cache (as reported)",
    "bytes_pushed": "Gradient payload bytes received",
    "bytes_pulled": "Parameter payload bytes sent",
    "updates_applied": "Optimizer steps applied",
    "evictions": "Workers evicted after their lease expired",
    "parked_seconds": "Seconds pulls spent parked waiting for the staleness bound",
    "rows_pulled": "Rows of tables sent by pulls",
    "rows_pushed": "Rows of tables received by pushes",
}


_EVERY_PLANE = ServerStatistics(0, 0, 0, 0, 0)
"""Statistics with every optional family in them, for ``describe``."""


class RunCollector(Collector):
    def __init__(self, registry: RunRegistry, statistics: Callable[[], ServerStatistics] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``loop``: the server's, which the runs and the statistics are read on (a scrape comes on
        the metrics thread; the core is single-threaded: a status computed beside the loop can
        write a stale min clock into the clock's cache); None: read them in the caller's thread."""
        self._registry = registry
        self._statistics = statistics
        self._loop = loop

    def _read(self) -> tuple[list[RunStatus], ServerStatistics | None]:
        return [run.status() for run in self._registry.runs()], self._statistics() if self._statistics else None

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Every family ``collect`` may yield, without reading the runs: the registry takes their
        names from here, and a scrape restricted by name (``/metrics?name[]=...``) asks only the
        collectors that described a name it wants (without it, such a scrape was empty)."""
        return self._families([], _EVERY_PLANE)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        if self._loop is None:
            statuses, stats = self._read()
        else:
            async def read() -> tuple[list[RunStatus], ServerStatistics | None]:
                return self._read()

            statuses, stats = asyncio.run_coroutine_threadsafe(read(), self._loop).result(_SCRAPE_SECONDS)
        return self._families(statuses, stats)

    @staticmethod
    def _families(statuses: list[RunStatus],
                  stats: ServerStatistics | None) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for field, doc in _COUNTERS.items():
            fam = CounterMetricFamily(f"paramserver_{field}", doc, labels=["run"])
            for s in statuses:
                fam.add_metric([s.run_id], getattr(s.counters, field))
            yield fam
        clocks = GaugeMetricFamily("paramserver_worker_clock", "Iterations completed per rank", labels=["run", "rank"])
        spread = GaugeMetricFamily("paramserver_clock_spread", "Max minus min clock over ranks", labels=["run"])
        waiting = GaugeMetricFamily("paramserver_parked_pulls", "Pulls parked right now", labels=["run"])
        state = GaugeMetricFamily("paramserver_run_state", "1 for the run's current state", labels=["run", "state"])
        for s in statuses:
            for w in s.workers:
                clocks.add_metric([s.run_id, str(w.rank)], w.clock)
            spread.add_metric([s.run_id], s.max_clock - s.min_clock)
            waiting.add_metric([s.run_id], sum(w.waiting_for_clock is not None for w in s.workers))
            state.add_metric([s.run_id, s.state.value], 1)
        yield from (clocks, spread, waiting, state)
        if stats is None:
            return
        yield CounterMetricFamily("paramserver_push_slot_lends", "Times a push stalled mid-stream and lent its "
                                  "receive slot (--push-slots) to another", value=stats.push_slot_lends)
        if stats.data_plane_streams_opened is not None:
            yield CounterMetricFamily("paramserver_data_plane_connections", "Streams opened on the TCP data plane",
                                      value=stats.data_plane_streams_opened)
            yield GaugeMetricFamily("paramserver_data_plane_open", "TCP data plane streams open now",
                                    value=stats.data_plane_streams_open)
        if stats.shm_streams_opened is not None:
            yield CounterMetricFamily("paramserver_shm_plane_connections", "Streams opened on the shared-memory "
                                      "data plane", value=stats.shm_streams_opened)
            yield GaugeMetricFamily("paramserver_shm_plane_open", "Shared-memory data plane streams open now",
                                    value=stats.shm_streams_open)


def _guarded(app: Callable[..., Any], token: str) -> Callable[..., Any]:
    """The WSGI ``app`` behind the server's bearer token (constant-time compare), as gRPC is."""
    expected = f"Bearer {token}".encode()

    def guard(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        given = environ.get("HTTP_AUTHORIZATION", "").encode()
        if hmac.compare_digest(given, expected):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
        return [b"missing or wrong bearer token: scrape with the server's token (authorization: Bearer ...)\n"]

    return guard


def serve_metrics(registry: RunRegistry, host: str, port: int,
                  statistics: Callable[[], ServerStatistics] | None = None, *, token: str = "",
                  tls: tuple[str, str, str] | None = None) -> ThreadingWSGIServer:
    """Serve /metrics over HTTP on a daemon thread (the runs read on the running loop); return its server
    (``server_port``; ``close_metrics`` ends it). With ``token`` every
    scrape must carry it (``authorization: Bearer ...``); with ``tls`` (certificate, key and client
    CA files, the last empty without mutual TLS) it is HTTPS, and with a client CA a scrape must
    show a certificate it signed: the endpoint is as protected as the gRPC server. OSError when it
    cannot bind."""
    reg = CollectorRegistry()
    reg.register(RunCollector(registry, statistics, asyncio.get_running_loop()))
    app = make_wsgi_app(reg)
    bare = host.strip("[]")  # "[::1]", as gRPC writes it
    family = socket.getaddrinfo(bare or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (_BoundedServer,), {"address_family": family})
    server: ThreadingWSGIServer = make_server(bare, port, _guarded(app, token) if token else app, server_class, handler_class=_Quiet)
    if tls:
        cert, key, client_ca = tls
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        if client_ca:  # mutual TLS, as gRPC has it
            context.load_verify_locations(client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        # The handshake in the scrape's thread (at its first read), not in the accepting one: a
        # client that connects and says nothing would hold every scrape after it.
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


async def close_metrics(server: ThreadingWSGIServer) -> None:
    """Stop serving and close the port (scrapes in progress end on their own)."""
    await asyncio.to_thread(server.shutdown)
    server.server_close()


class _BoundedServer(ThreadingWSGIServer):
    """A thread per connection, at most ``_MAX_SCRAPES`` of them; a connection beyond is closed at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.scrapes = threading.BoundedSemaphore(_MAX_SCRAPES)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.scrapes.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # (its thread releases the slot)
        except BaseException:
            self.scrapes.release()  # (no thread could be started)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.scrapes.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scrape that failed (a silent client timed out, a TLS handshake refused): not news
        either, and no traceback on stderr."""


class _Quiet(WSGIRequestHandler):
    timeout = _SCRAPE_SECONDS
    """A client silent this long is dropped (its thread ends)."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base class's name)
        """Scrapes are not news: no line per request."""
