"""The dashboard in a real headless browser (Debian's chromium, driven by Playwright) during real
runs: a ps-server and ps-worker processes, ``psctl dashboard``'s app on this test's loop.

``DASHBOARD_SCREENSHOTS=DIR`` also saves the pages' screenshots there (the README's come from it:
``DASHBOARD_SCREENSHOTS=docs .venv/bin/pytest tests/browser``); they always go to the test's tmp_path.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from procs import connect, free_port, ps_server, ps_workers, watch_until

from client.dashboard.server import make_app
from client.spec import LaunchOptions, build_run_spec
from paramserver.v1 import paramserver_pb2 as pb

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") or ""


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    assert CHROMIUM, "no chromium: install Debian's (apt-get install chromium; make test does) or set CHROMIUM=PATH"
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            await b.close()


async def dashboard(addr: str) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(make_app(addr, timeout=5.0, interval=0.2))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def open_page(browser: Any, url: str) -> tuple[Any, list[str]]:
    """A page at ``url`` and the list its console errors and uncaught exceptions go to."""
    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    await page.goto(url)
    return page, problems


async def screenshot(page: Any, tmp_path: Path, name: str) -> None:
    await page.screenshot(path=str(tmp_path / name), full_page=True)
    if os.environ.get("DASHBOARD_SCREENSHOTS"):
        out = Path(os.environ["DASHBOARD_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, out / name)


async def clocks(page: Any) -> dict[int, int]:
    rows = await page.eval_on_selector_all(".clock-row[data-rank]", "rs => rs.map(r => [r.dataset.rank, r.dataset.clock])")
    return {int(r): int(c) for r, c in rows}


async def test_a_live_run_in_the_browser_clocks_move_the_straggler_holds_the_window_and_stop_works(
        browser: Any, tmp_path: Path) -> None:
    port = free_port()
    run_spec = build_run_spec(LaunchOptions(model="mlp:32", dataset="digits", workers=3, staleness=2, iterations=100_000,
                                            batch_size=32, eval_every=40, seed=5, name="browser-test",
                                            slowdown=((2, 4.0),)))
    with ps_server("--port", str(port)) as (_, addr), ps_workers(addr, 3):
        async with connect(addr) as c:
            other = await c.create_run(build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=2,
                                                                    name="waiting-for-workers", iterations=10)))
            await c.stop_run(other.run_id)
            run = await c.create_run(run_spec)
            await watch_until(c, run.run_id, lambda r: r.min_clock >= 5)
        runner, url = await dashboard(addr)
        try:
            page, problems = await open_page(browser, url)
            row = page.locator(f'tr[data-run="{run.run_id}"]')
            await row.wait_for()
            assert await page.locator("tbody#rows tr").count() == 2
            assert await row.locator(".badge").inner_text() == "running"
            assert "?" not in await row.inner_text()  # nothing the list cannot know
            await page.fill("[data-testid=filter]", "browser")  # the filter keeps the matching run only
            await page.wait_for_function("document.querySelectorAll('tbody#rows tr').length === 1")
            await page.fill("[data-testid=filter]", "no-such-run")
            await page.wait_for_function("document.querySelectorAll('tbody#rows tr').length === 0")
            await page.fill("[data-testid=filter]", "")
            await screenshot(page, tmp_path, "dashboard-runs.png")

            await page.click(f'a[href="/runs/{run.run_id}"]')
            await page.wait_for_selector(".clock-row[data-rank='2']")
            await page.wait_for_function("document.querySelector('[data-testid=conn]').dataset.state === 'live'")
            before = await clocks(page)
            # the bars move: every rank's clock advances on the page, fed by the live stream
            await page.wait_for_function(f"[...document.querySelectorAll('.clock-row[data-rank]')].every("
                                         f"r => Number(r.dataset.clock) > {max(before.values())} + 2)", timeout=30_000)
            # the straggler (rank 2, 4x slower) holds the SSP window back, and a parked rank says it waits for it
            holding = page.locator(".clock-row.holding[data-rank='2']")
            await holding.wait_for(timeout=30_000)
            parked = page.locator(".clock-row.parked .note", has_text="waits for rank 2 to reach")
            await parked.first.wait_for(timeout=30_000)
            await page.wait_for_function("Number(document.querySelector('#eval').dataset.points) >= 2", timeout=30_000)
            # accuracy's axis ends at 1 (a flat accuracy of 0.972, a finished run's, had an axis to 1.5)
            lo, hi, accuracy = await page.evaluate("[S.charts.eval.scales.y.min, S.charts.eval.scales.y.max, "
                                                   "S.charts.eval.data[1].filter(v => v !== null)]")
            assert 0 <= lo <= min(accuracy) and max(accuracy) <= hi <= 1.005, (lo, hi, accuracy)
            lo, hi = await page.evaluate("S.charts.eval.scales.y.range(S.charts.eval, 0.972, 0.972, 'y')")
            assert 0.8 < lo < 0.972 and 0.972 < hi <= 1.005, (lo, hi)
            await parked.first.wait_for(timeout=30_000)
            await screenshot(page, tmp_path, "dashboard-run.png")  # (the README's: a rank waits for the straggler)
            await page.wait_for_function("document.querySelector('[data-testid=window]').textContent"
                                         ".includes('held back by rank 2')", timeout=30_000)
            # the curves gain points
            loss = page.locator("#loss")
            n = int(await loss.get_attribute("data-points") or 0)
            await page.wait_for_function(f"Number(document.querySelector('#loss').dataset.points) > {n}", timeout=20_000)
            await page.wait_for_function("Number(document.querySelector('#eval').dataset.points) >= 1", timeout=30_000)
            await page.wait_for_function("Number(document.querySelector('#rate').dataset.points) >= 2", timeout=20_000)
            await page.wait_for_function("Number(document.querySelector('#stale').dataset.points) >= 2", timeout=20_000)
            assert await page.locator("#loss canvas").count() == 1
            await page.select_option("[data-testid=xaxis]", "clock")  # the same curves against the clock
            await page.wait_for_function("S.charts.key === 'clock' && S.charts.loss.data[0].length > 0 && "
                                         "S.charts.loss.data[0].every(x => Number.isInteger(x))")
            events = await page.locator("#events li").all_inner_texts()
            assert len(events) == len(set(events)) and sum("created" in e for e in events) == 1

            # stop, confirmed in the dialog
            dialogs: list[str] = []

            async def accept(dialog: Any) -> None:
                dialogs.append(dialog.message)
                await dialog.accept()

            page.on("dialog", accept)
            await page.click("[data-testid=stop]")
            await page.wait_for_function("document.querySelector('[data-testid=state]').textContent === 'stopped'",
                                         timeout=20_000)
            await page.wait_for_function("document.querySelector('[data-testid=conn]').dataset.state === 'finished'")
            assert dialogs and run.run_id in dialogs[0]
            async with connect(addr) as c:
                assert (await c.get_run(run.run_id)).state == pb.RUN_STATE_STOPPED
            assert await page.locator("[data-testid=stop]").is_disabled()
            assert problems == []
        finally:
            await runner.cleanup()


async def test_the_page_says_when_the_server_is_gone_and_carries_on_after_its_restart(
        browser: Any, tmp_path: Path) -> None:
    port = free_port()
    args = ("--port", str(port), "--data-dir", str(tmp_path / "data"), "--checkpoint-every", "20",
            "--lease-seconds", "20")
    run_spec = build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=2, staleness=2,
                                            iterations=100_000, batch_size=32, seed=2, slowdown=((1, 2.0),)))
    with ps_workers(f"127.0.0.1:{port}", 2, "--timeout-seconds", "10"):
        with ps_server(*args) as (server, addr):
            async with connect(addr) as c:
                run = await c.create_run(run_spec)
                await watch_until(c, run.run_id, lambda r: r.min_clock >= 30)
            runner, url = await dashboard(addr)
            try:
                page, problems = await open_page(browser, f"{url}/runs/{run.run_id}")
                await page.wait_for_function("document.querySelector('[data-testid=conn]').dataset.state === 'live'")
                page.on("dialog", lambda dialog: dialog.accept())
                await page.click("[data-testid=checkpoint]")  # confirmed; the server has a --data-dir
                notice = page.locator("[data-testid=notice]", has_text="checkpoint saved at min clock")
                await notice.wait_for(timeout=20_000)
                assert str(tmp_path / "data") in await notice.inner_text()
                server.kill()
                server.wait(10)
                await page.wait_for_function("document.querySelector('[data-testid=conn]').dataset.state === 'down'",
                                             timeout=30_000)
                assert "unreachable" in await page.inner_text("[data-testid=conn]")
                await screenshot(page, tmp_path, "dashboard-down.png")
                with ps_server(*args):
                    await page.wait_for_function(
                        "document.querySelector('[data-testid=conn]').dataset.state === 'live'", timeout=60_000)
                    restored = max((await clocks(page)).values())
                    await page.wait_for_function(
                        f"[...document.querySelectorAll('.clock-row[data-rank]')].some("
                        f"r => Number(r.dataset.clock) > {restored} + 5)", timeout=30_000)
                    async with connect(addr) as c:
                        await c.stop_run(run.run_id)
                # the browser's own failed requests while the server was down are expected; nothing else
                assert [p for p in problems if "Failed to load resource" not in p] == []
            finally:
                await runner.cleanup()


@pytest.mark.parametrize(("model", "dataset", "series"), [
    ("linear", "synthetic-regression", ["test RMSE", "test loss"]),
    ("mf:3", "synthetic-ratings:users=60,items=50,rank=2,density=0.5", ["test RMSE"]),
])
async def test_a_finished_regression_run_shows_its_test_rmse(browser: Any, model: str, dataset: str,
                                                            series: list[str]) -> None:
    """Linear regression's loss is half the mean squared error: the page plots the RMSE beside it;
    matrix factorisation's loss is its RMSE, alone. Every series drawn has points and every axis
    a series (the RMSE was labelled "accuracy / AUC", and a ratings run had an empty axis for it)."""
    port = free_port()
    with ps_server("--port", str(port)) as (_, addr), ps_workers(addr, 2):
        async with connect(addr) as c:
            run = await c.create_run(build_run_spec(LaunchOptions(model=model, dataset=dataset,
                                                                  workers=2, iterations=60, eval_every=10, lr=0.05)))
            await watch_until(c, run.run_id, lambda r: r.state == pb.RUN_STATE_COMPLETED)
        runner, url = await dashboard(addr)
        try:
            page, problems = await open_page(browser, f"{url}/runs/{run.run_id}")
            await page.wait_for_function("Number(document.querySelector('#eval').dataset.points) >= 2")
            assert "test RMSE" in await page.inner_text("#eval-caption")
            drawn = await page.evaluate("({labels: S.charts.eval.series.slice(1).map(s => s.label), "
                                        "scales: S.charts.eval.series.slice(1).map(s => s.scale), "
                                        "axes: S.charts.eval.axes.slice(1).map(a => a.scale), "
                                        "data: S.charts.eval.data.slice(1)})")
            assert drawn["labels"] == series and sorted(drawn["axes"]) == sorted(drawn["scales"])
            assert all(any(v is not None for v in column) for column in drawn["data"])
            if model == "linear":
                rmse, loss = drawn["data"]
                assert rmse == pytest.approx([(2 * x) ** 0.5 for x in loss]) and loss[-1] < loss[0]
            assert await page.inner_text("[data-testid=conn]") == "finished: completed"
            # the training loss on a log scale, as psctl plot's (a regression's falls by orders of magnitude: on a
            # linear axis it was a flat line at 0 after the first seconds)
            assert await page.evaluate("S.charts.loss.scales.y.distr") == 3
            grid = await page.evaluate("S.charts.loss.axes[1].grid.filter(S.charts.loss, [0.001, 0.002, 0.005, 0.01, 1, 3])")
            assert grid == [0.001, None, None, 0.01, 1, None], grid  # (a line at every 1-9 x 10^k: grey bands)
            # every value axis labels its ticks apart, small losses too (uPlot's default keeps 3 decimals:
            # ticks at 0.0005 and 0.001 both read "0.001")
            labels = await page.evaluate("S.charts.loss.axes[1].values(S.charts.loss, [0, 0.0005, 0.001, 0.0015, 0.002])")
            assert labels == ["0", "0.0005", "0.001", "0.0015", "0.002"], labels
            assert all(a.get("values") for a in await page.evaluate(
                "Object.values(S.charts).filter(c => c && c.axes).flatMap(c => c.axes.slice(1)).map(a => "
                "({values: typeof a.values === 'function'}))")), "an axis without the tick formatter"
            # the throughput of a finished run: from the pushes the server recorded (it was empty: only a
            # page open while the run went measured it)
            await page.wait_for_function("Number(document.querySelector('#rate').dataset.points) >= 2")
            # the staleness histogram: a bar per lead, each whole, the axis no wider than they are (a
            # single bar, as every BSP run's, spanned 0..100; the edge bars were cut in half)
            await page.wait_for_function("Number(document.querySelector('#stale').dataset.points) >= 1")
            leads, lo, hi = await page.evaluate("[S.charts.stale.data[0], S.charts.stale.scales.x.min, "
                                                "S.charts.stale.scales.x.max]")
            assert (lo, hi) == (leads[0] - 0.5, leads[-1] + 0.5), (leads, lo, hi)
            # a page open for a long run keeps the newest points only, as the server does (it kept them all)
            kept = await page.evaluate("addPoints([...Array(MAX_POINTS + 10).keys()].map(i => ({rank: 0, clock: i, "
                                       "eval: false, time: 1e9 + i, loss: 1}))), [S.points.size === MAX_POINTS, "
                                       "S.points.has(`0/${MAX_POINTS + 9}/false/${1e9 + MAX_POINTS + 9}`), "
                                       "S.points.has('0/0/false/1000000000')]")
            assert kept == [True, True, False], kept
            await page.evaluate("S.charts.stale.setData([[0], [7]])")  # (uPlot gives one x value a span of 100)
            one = await page.evaluate("[S.charts.stale.scales.x.min, S.charts.stale.scales.x.max]")
            assert one == [-0.5, 0.5], one
            assert problems == []
        finally:
            await runner.cleanup()


async def test_a_run_page_whose_history_could_not_be_read_reads_it_again(browser: Any) -> None:
    """The first read of a finished run's history fails (the server slow under load: 504): the page
    says so and reads it again, then draws it, its pushes/s included (it went on without it: a
    finished run's throughput chart stayed empty), and an unknown run is said to be one, once."""
    port = free_port()
    with ps_server("--port", str(port)) as (_, addr), ps_workers(addr, 2):
        async with connect(addr) as c:
            run = await c.create_run(build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=2,
                                                                  iterations=40, eval_every=20)))
            await watch_until(c, run.run_id, lambda r: r.state == pb.RUN_STATE_COMPLETED)
        runner, url = await dashboard(addr)
        try:
            page = await browser.new_page()
            asked: list[str] = []

            async def first_fails(route: Any) -> None:
                asked.append(route.request.url)
                if len(asked) == 1:
                    await route.fulfill(status=504, json={"error": "deadline exceeded", "code": "DEADLINE_EXCEEDED"})
                else:
                    await route.continue_()

            await page.route(f"**/api/runs/{run.run_id}", first_fails)
            await page.goto(f"{url}/runs/{run.run_id}")
            await page.wait_for_function("document.querySelector('[data-testid=conn]').dataset.state === 'finished'",
                                         timeout=30_000)
            assert len(asked) >= 2
            await page.wait_for_function("Number(document.querySelector('#rate').dataset.points) >= 2")
            gone = await browser.new_page()
            await gone.goto(f"{url}/runs/run-nosuch")
            await gone.wait_for_function("/run-nosuch/.test(document.querySelector('[data-testid=conn]').textContent)",
                                         timeout=30_000)
            assert await gone.get_attribute("[data-testid=conn]", "data-state") == "down"
        finally:
            await runner.cleanup()


async def test_a_malformed_run_address_is_asked_for_as_it_is(browser: Any) -> None:
    """``/runs/%E0`` is no URI component: the page names it as it is and asks the server for it
    (its script stopped at its first line before, leaving an empty page)."""
    port = free_port()
    with ps_server("--port", str(port)) as (_, addr):
        runner, url = await dashboard(addr)
        try:
            page, problems = await open_page(browser, f"{url}/runs/%E0")
            await page.wait_for_function("document.getElementById('title').textContent === '%E0'")
            assert not [p for p in problems if p.startswith("page error")], problems
        finally:
            await runner.cleanup()


async def test_a_run_page_shows_its_newest_events_and_counts_the_others(browser: Any) -> None:
    """A page left open on a long run kept every event it was sent, in its list and in the keys it
    drops repeats by: it shows the newest 1000 and says how many earlier ones it does not, and those
    the server sends again (the history, each new stream's first update) are not shown again."""
    port = free_port()
    with ps_server("--port", str(port)) as (_, addr), ps_workers(addr, 2):
        async with connect(addr) as c:
            run = await c.create_run(build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=2,
                                                                  iterations=20)))
            await watch_until(c, run.run_id, lambda r: r.state == pb.RUN_STATE_COMPLETED)
        runner, url = await dashboard(addr)
        try:
            page, problems = await open_page(browser, f"{url}/runs/{run.run_id}")
            await page.wait_for_function("document.querySelector('[data-testid=conn]').dataset.state === 'finished'")
            own = await page.locator("#events li").count()
            assert own >= 1

            async def add(start: int, n: int) -> dict[str, Any]:
                """Events ``start``..``start + n - 1`` (newer than the run's), in one update."""
                return await page.evaluate(
                    f"addEvents([...Array({n}).keys()].map(i => ({{time: 2e9 + {start} + i, kind: 'test', rank: 0, "
                    f"message: `event ${{{start} + i}}`}}))), ({{shown: document.querySelectorAll('#events li')"
                    ".length, newest: document.querySelector('#events li').textContent, oldest: document.querySelector("
                    "'#events li:last-child').textContent, seen: seenEvents.size, note: (n => n && !n.hidden ? "
                    "n.textContent : null)(document.querySelector('#events-dropped'))})")

            first = await add(0, 600)
            assert first["shown"] == own + 600 and first["note"] is None
            full = await add(600, 410)  # 1010 events in two updates, and the run's own
            assert full["shown"] == full["seen"] == 1000
            assert full["newest"].endswith("rank 0: event 1009") and full["oldest"].endswith("rank 0: event 10")
            assert full["note"].startswith(f"{own + 10} earlier events not shown")
            assert await add(0, 1010) == full  # sent again, whole: nothing new
            many = await add(5000, 3000)  # more than it shows, in one update
            assert many["shown"] == many["seen"] == 1000
            assert many["newest"].endswith("event 7999") and many["oldest"].endswith("event 7000")
            assert many["note"].startswith(f"{own + 10 + 1000 + 2000} earlier events not shown")
            assert problems == []
        finally:
            await runner.cleanup()


async def test_a_dashboard_with_a_key_works_in_the_browser_that_opened_its_address(browser: Any) -> None:
    """A dashboard holding credentials answers only who has its key: the address it prints puts it
    in a cookie (HttpOnly, SameSite Lax: a Strict one was not sent after --open's file sent the
    browser there, a navigation from another site) that the page's reads, its live stream and its
    stop carry; another browser gets 401."""
    from client.cli import _opener

    port = free_port()
    with ps_server("--port", str(port)) as (_, addr):
        async with connect(addr) as c:
            run = await c.create_run(build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=2,
                                                                  iterations=40)))
        runner = web.AppRunner(make_app(addr, timeout=5.0, interval=0.2, key="k3y"))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            page, problems = await open_page(browser, f"{url}/?key=k3y")
            assert page.url == f"{url}/"  # (the key out of the address bar and the history)
            await page.click(f'a[href="/runs/{run.run_id}"]')
            await page.wait_for_function("document.querySelector('[data-testid=conn]').dataset.state === 'live'")
            page.on("dialog", lambda dialog: dialog.accept())
            await page.click("[data-testid=stop]")
            await page.wait_for_function("document.querySelector('[data-testid=state]').textContent === 'stopped'",
                                         timeout=20_000)
            assert problems == []
            stranger = await browser.new_page()
            assert (await stranger.goto(f"{url}/api/runs")).status == 401
            assert (await stranger.goto(f"{url}/?key=wrong")).status == 401
            opener = _opener(f"{url}/?key=k3y")  # what psctl dashboard --open hands the browser
            try:
                opened, problems = await open_page(browser, opener.as_uri())
                await opened.locator(f'a[href="/runs/{run.run_id}"]').wait_for(timeout=20_000)
                assert opened.url == f"{url}/" and problems == []
            finally:
                opener.unlink()
        finally:
            await runner.cleanup()
