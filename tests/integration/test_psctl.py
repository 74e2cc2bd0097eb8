"""psctl against a real server: every command, its JSON, its exit status, its error messages.

The server runs on this test's event loop (the ``server`` fixture); psctl runs in-process through
typer's CliRunner, in a thread (``asyncio.to_thread``) so that its own ``asyncio.run`` gets a loop
of its own while the server keeps serving here. Runs train on real ``ps-worker`` subprocesses,
tiny ones: softmax on digits, 2 workers, 30 iterations.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from procs import free_port
from typer.testing import CliRunner, Result

from client.cli import app
from paramserver.client import PsClient
from ps_server.server import PsServer

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "softmax", "--dataset", "digits", "--workers", "2", "--iterations", "30", "--eval-every", "10"]
STALENESS_FORMS = "0 or bsp (synchronous), a positive integer s (SSP), or inf / unbounded / asp (asynchronous)"


async def psctl(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """Invoke psctl in a worker thread; the server keeps running on this loop meanwhile."""
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


@pytest.fixture
def addr(server: PsServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def start_workers(addr: str) -> Iterator[Callable[[int], list[subprocess.Popen[bytes]]]]:
    """Start real ps-worker processes (``--once``) against the test server; killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(n: int) -> list[subprocess.Popen[bytes]]:
        new = [
            subprocess.Popen(
                [sys.executable, "-m", "worker.main", "--server", addr, "--once", "--log-level", "WARNING",
                 "--join-wait-seconds", "1"],
                cwd=ROOT, env={**__import__("os").environ, "OPENBLAS_NUM_THREADS": "1"},
            )
            for _ in range(n)
        ]
        procs.extend(new)
        return new

    yield start
    for p in procs:
        p.kill()
        p.wait(10)


@pytest.fixture
async def ps(addr: str) -> AsyncIterator[PsClient]:
    async with PsClient(addr, timeout=10.0) as c:
        yield c




async def wait_for(predicate: Callable[[], Any], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("command", [["runs"], ["health"], ["status", "run-x"], ["launch", *TINY]])
async def test_unreachable_server_names_the_address_and_how_to_start_one(command: list[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    result = await psctl(*command, "--server", address, "--timeout", "3")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: cannot reach a paramserver at " + address)
    assert "ps-server --port" in result.stderr and "psctl launch --local" in result.stderr
    assert result.stdout == ""


async def test_server_address_comes_from_the_environment(addr: str) -> None:
    result = ok(await psctl("runs", "--json", env={"PSCTL_SERVER": addr}))
    assert json.loads(result.stdout) == []
    nowhere = f"127.0.0.1:{free_port()}"
    result = await psctl("health", env={"PSCTL_SERVER": nowhere})
    assert result.exit_code == 1 and nowhere in result.stderr


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--staleness", "banana"], f"--staleness 'banana': use {STALENESS_FORMS}"),
        (["--staleness", "-3"], f"--staleness '-3': a staleness cannot be negative; use {STALENESS_FORMS}"),
        (["--staleness", "-1"], f"--staleness '-1': a staleness cannot be negative; use {STALENESS_FORMS}"),
        (["--epochs", "0"], "--epochs 0: use a positive number of passes over each rank's shard"),
        (["--epochs", "-2"], "--epochs -2: use a positive number of passes"),
        (["--epochs", "nan"], "--epochs nan: use a positive number of passes"),
        (["--iterations", "-1"], "--iterations -1: use a positive number of iterations per worker"),
        (["--model", "mlp:abc"], "bad hidden sizes 'abc'"),
        (["--model", "transformer"], "cannot parse model 'transformer'"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--dataset", "npz:/nonexistent/x.npz"], "/nonexistent/x.npz"),
        (["--optimizer", "rmsprop"], "choose sgd, momentum, nesterov, adam, adagrad or ftrl"),
        (["--optimizer", "ftrl", "--l1", "-0.5"], "--l1 -0.5: use a finite number >= 0 (0 turns it off)"),
        (["--optimizer", "ftrl", "--ftrl-beta", "0"], "--ftrl-beta 0: use a finite number > 0"),
        (["--l2", "0.1"], "--l2: only --optimizer ftrl takes it (not sgd)"),
        (["--slowdown", "1:3"], "--slowdown '1:3': use RANK=FACTOR"),
        (["--slowdown", "5=2"], "rank 5 does not exist with 2 workers"),
        (["--model", "linear"], "use softmax or mlp"),
        (["--model", "mlp:8", "--dataset", "synthetic-regression"],
         "model 'mlp:8' does a classification task but dataset 'synthetic-regression' is regression: use linear"),
        (["--model", "softmax", "--dataset", "synthetic-ctr:samples=1000"], "is ctr: use logistic or fm:K"),
        (["--server", "localhost"], "--server 'localhost': use HOST:PORT"),
        (["--aggregation", "max"], "--aggregation 'max': use mean or sum"),
        (["--staleness-schedule", "20%=abc"], "--staleness-schedule '20%=abc': step '20%=abc': use 0 or bsp"),
        (["--staleness-schedule", "50%=1,20%=3"], "--staleness-schedule '50%=1,20%=3': step '20%=3' is at clock 6: "
                                                   "steps need increasing clocks below the run's 30 iterations"),
        (["--staleness-schedule", "120%=1"], "step '120%=1' is at clock 36: steps need increasing clocks"),
        (["--staleness", "0", "--staleness-schedule", "10=2"],
         "--staleness-schedule '10=2': step '10=2': the bound cannot change to or from 0 (BSP; --staleness is 0)"),
        (["--staleness-schedule", "10=bsp"], "step '10=bsp': the bound cannot change to or from 0"),
        # the server's refusals name the option that sets the field (it said "learning_rate", "num_workers")
        (["--lr", "1e39"], "learning_rate (psctl launch --lr) 1e+39 does not fit in float32"),
        (["--optimizer", "momentum", "--momentum", "1.5"], "momentum (psctl launch --momentum) must be in [0, 1)"),
        (["--weight-decay", "-1"], "weight_decay (psctl launch --weight-decay) must be >= 0"),
        (["--optimizer", "ftrl", "--l2", "1e39"], "l2 (psctl launch --l2) 1e+39 does not fit in float32"),
        (["--name", "x" * 300], "the run's name (psctl launch --name) has 300 characters: at most 256"),
        (["--dataset", "synthetic-classification:samples=3000,features=4,classes=2", "--workers", "2000"],
         "num_workers (psctl launch --workers) is 2000, over this server's limit of 1024 (ps-server --max-workers): "
         "ask for fewer"),
    ],
)
async def test_bad_launch_options_say_what_to_fix(addr: str, ps: PsClient, flags: list[str], expected: str) -> None:
    result = await psctl("launch", "--server", addr, *TINY, *flags)
    assert result.exit_code == 1, result.stdout
    assert result.stderr.startswith("Error: ") and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert await ps.list_runs() == []  # nothing was created


async def test_unknown_run_lists_the_runs_that_exist(addr: str, tmp_path: Path) -> None:
    run_id = json.loads(ok(await psctl("launch", "--server", addr, *TINY, "--json")).stdout)["run_id"]
    for command in (["status"], ["watch"], ["stop"], ["metrics"], ["export", "-o", str(tmp_path / "p.npz")],
                    ["plot", "-o", str(tmp_path / "p.png")]):
        result = await psctl(*command, "run-nope", "--server", addr)
        assert result.exit_code == 1, command
        assert "Error: NOT_FOUND: no run 'run-nope'" in result.stderr and run_id in result.stderr, result.stderr
    assert not (tmp_path / "p.npz").exists() and not (tmp_path / "p.png").exists()


# ------------------------------------------------------------------------------------------ commands
async def test_health(addr: str, server: PsServer) -> None:
    assert ok(await psctl("health", "--server", addr)).stdout == "SERVING\n"
    doc = json.loads(ok(await psctl("health", "--server", addr, "--json")).stdout)
    assert doc["status"] == "SERVING" and doc["server"] == addr
    await server.health.enter_graceful_shutdown()  # what SIGTERM does first
    result = await psctl("health", "--server", addr)
    assert result.exit_code == 1 and result.stdout == "NOT_SERVING\n"


async def test_launch_watch_status_export_plot_metrics(addr: str, ps: PsClient, start_workers: Any,
                                                        tmp_path: Path) -> None:
    launched = ok(await psctl("launch", "--server", addr, *TINY, "--name", "lifecycle", "--json"))
    run_id = json.loads(launched.stdout)["run_id"]
    human = ok(await psctl("launch", "--server", addr, *TINY, "--name", "[bold]second"))
    second = human.stdout.strip()
    assert second.startswith("run-") and "\n" not in second

    listed = json.loads(ok(await psctl("runs", "--server", addr, "--json")).stdout)
    assert [r["run_id"] for r in listed] == [second, run_id]  # newest first
    assert listed[1]["state"] == "pending" and listed[1]["name"] == "lifecycle" and listed[1]["iterations"] == 30

    pending = json.loads(ok(await psctl("status", run_id, "--server", addr, "--json")).stdout)
    assert pending["summary"]["waiting_for"].startswith("waiting for 2 of 2 ranks to join")
    assert pending["run"]["run_id"] == run_id and pending["run"]["spec"]["num_workers"] == 2
    assert [w["state"] for w in pending["workers"]] == ["vacant", "vacant"]
    view = ok(await psctl("status", run_id, "--server", addr)).stdout
    assert "PENDING" in view and "waiting for 2 of 2 ranks to join" in view and "staleness 2 (SSP)" in view

    assert "[bold]second" in ok(await psctl("status", second, "--server", addr)).stdout  # data, not markup
    ok(await psctl("stop", second, "--server", addr, "--reason", "only one at a time"))
    start_workers(2)
    watched = await psctl("watch", run_id, "--server", addr, "--json")
    assert watched.exit_code == 0, watched.stderr
    lines = [json.loads(line) for line in watched.stdout.splitlines()]
    assert len(lines) >= 2 and lines[-1]["summary"]["state"] == "completed"
    clocks = [line["summary"]["min_clock"] for line in lines]
    assert clocks == sorted(clocks) and clocks[-1] == 30
    kinds = {e["kind"] for line in lines for e in line["events"]}
    assert {"started", "completed"} <= kinds, kinds
    assert lines[-1]["eval"][-1]["clock"] == 30 and lines[-1]["last_train_loss"]  # as the human view shows

    done = json.loads(ok(await psctl("status", run_id, "--server", addr, "--json")).stdout)
    summary = done["summary"]
    assert summary["state"] == "completed" and summary["pushes_applied"] == 60 and summary["min_clock"] == 30
    assert summary["test_accuracy"] > 0.7 and summary["test_loss"] > 0
    assert done["eval"][-1]["clock"] == 30 and done["last_train_loss"]
    assert [w["state"] for w in done["workers"]] == ["done", "done"] and done["workers"][0]["pushes"] == 30
    assert [w["data_plane"] for w in done["workers"]] == ["shm", "shm"]  # the workers used shared memory
    assert [w["data_plane"] for w in pending["workers"]] == [None, None]
    assert summary["parked_seconds"] == done["run"]["counters"].get("parked_seconds", 0.0) >= 0.0
    view = ok(await psctl("status", run_id, "--server", addr)).stdout
    assert "COMPLETED" in view and "60 applied" in view and "recent events" in view and "test accuracy" in view
    assert f"parked {summary['parked_seconds']:.1f} s in all" in view
    assert "data plane shm (2 ranks)" in view

    table = ok(await psctl("runs", "--server", addr)).stdout
    assert run_id in table and "COMPLETED" in table and "STOPPED" in table and "30/30" in table

    export = json.loads(ok(await psctl("export", run_id, "--server", addr, "-o", str(tmp_path / "p.npz"),
                                       "--json")).stdout)
    with np.load(tmp_path / "p.npz") as saved:
        assert sorted(saved.files) == sorted(export["tensors"]) and len(saved.files) == export["tensor_count"]
        assert sum(saved[n].size for n in saved.files) == export["params"] == 64 * 10 + 10
        assert all(np.isfinite(saved[n]).all() for n in saved.files)
    pulled = (await ps.pull(run_id)).tensors
    with np.load(tmp_path / "p.npz") as saved:
        for name, value in pulled.items():
            np.testing.assert_array_equal(saved[name], value)
    assert "2 tensors, 650 parameters" in ok(await psctl("export", run_id, "--server", addr, "-o",
                                                        str(tmp_path / "q.npz"))).stdout

    plotted = json.loads(ok(await psctl("plot", run_id, "--server", addr, "-o", str(tmp_path / "c.png"),
                                        "--json")).stdout)
    assert plotted["eval_points"] >= 3 and (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    metrics = json.loads(ok(await psctl("metrics", run_id, "--server", addr, "--json")).stdout)
    assert any(p["eval"] for p in metrics["points"]) and {p["rank"] for p in metrics["points"]} == {0, 1}
    assert "evaluations" in ok(await psctl("metrics", run_id, "--server", addr)).stdout

    again = await psctl("watch", run_id, "--server", addr)  # a finished run: one snapshot, its exit status
    assert again.exit_code == 0 and "COMPLETED" in again.stdout
    assert (await psctl("watch", second, "--server", addr, "--json")).exit_code == 2


async def test_launch_wait_json_reports_the_final_result(addr: str, start_workers: Any) -> None:
    start_workers(2)
    result = ok(await psctl("launch", "--server", addr, *TINY, "--wait", "--json"))
    doc = json.loads(result.stdout)  # exactly one JSON object, nothing else on stdout
    assert doc["state"] == "completed" and doc["iterations"] == 30 and doc["workers"] == 2
    assert 0.7 < doc["test_accuracy"] <= 1.0 and doc["test_loss"] > 0 and doc["eval_clock"] == 30
    assert doc["pushes_applied"] == 60 and doc["pushes_duplicate"] == 0
    assert doc["pulls_served"] + doc["pulls_skipped"] >= 60 and doc["wall_seconds"] > 0
    assert 0 <= doc["staleness_mean"] <= doc["staleness_max"] <= 2


async def test_launch_wait_human_prints_a_summary(addr: str, start_workers: Any) -> None:
    start_workers(2)
    result = ok(await psctl("launch", "--server", addr, *TINY, "--wait", "--staleness", "bsp"))
    last = result.stdout.strip().splitlines()[-1]
    assert " completed in " in last and "test accuracy 0." in last and "(60 pushes, 0 duplicates)" in last
    assert re.search(r": test accuracy 0\.\d{4}, test loss \d\.\d{4} ", last), last  # which loss it is
    assert "staleness 0 (BSP)" in result.stderr  # the headline
    # stderr is not a terminal: a line per change instead of a progress bar drawn once at the end
    assert re.search(r"^\d\d:\d\d:\d\d  completed  clock 30/30  workers \d/2 active  train loss \d\.\d{4}  "
                     r"test accuracy 0\.\d{4}  \(all ranks finished\)$", result.stderr, re.M), result.stderr


async def test_a_ctr_run_with_ftrl_reports_auc_and_log_loss(addr: str, start_workers: Any) -> None:
    """fm with a table, trained by FTRL: the result has an AUC, the status names the table."""
    start_workers(2)
    ctr = ["--model", "fm:4:rows=4096", "--dataset", "synthetic-ctr:samples=2000,ids_per_field=100",
           "--workers", "2", "--iterations", "30", "--eval-every", "10", "--optimizer", "ftrl", "--lr", "0.1",
           "--l1", "0.001", "--l2", "0.01"]
    doc = json.loads(ok(await psctl("launch", "--server", addr, *ctr, "--wait", "--json")).stdout)
    assert doc["state"] == "completed" and doc["optimizer"] == "ftrl (l1 0.001, l2 0.01, beta 1)", doc
    assert 0.0 < doc["test_auc"] <= 1.0 and doc["test_loss"] > 0 and doc["model"] == "fm:4:rows=4096"
    assert doc["evals"] and all(0.0 < e["test_auc"] <= 1.0 for e in doc["evals"])
    view = ok(await psctl("status", doc["run_id"], "--server", addr)).stdout
    assert "fm.table (4096 x 5, table)" in view and "requires tables, model:fm" in view
    assert re.search(r"test AUC \d\.\d{4}   test log-loss \d\.\d{4}", view), view
    metrics = ok(await psctl("metrics", doc["run_id"], "--server", addr)).stdout
    assert re.search(r"test log-loss \d\.\d{4}  test accuracy \d\.\d{4}  test AUC \d\.\d{4}", metrics), metrics


async def test_launch_wait_exits_2_when_the_run_is_stopped(addr: str, ps: PsClient) -> None:
    waiting = asyncio.ensure_future(psctl("launch", "--server", addr, *TINY, "--wait", "--json"))

    async def created() -> bool:
        return bool(await ps.list_runs())

    await wait_for(created)
    (run,) = await ps.list_runs()
    stopped = ok(await psctl("stop", run.run_id, "--server", addr, "--reason", "test says so", "--json"))
    assert json.loads(stopped.stdout) == {"run_id": run.run_id, "state": "stopped", "message": "test says so"}
    result = await waiting
    assert result.exit_code == 2, result.stderr
    assert json.loads(result.stdout)["state"] == "stopped"


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
async def test_launch_wait_exits_1_when_the_run_fails(addr: str, start_workers: Any) -> None:
    start_workers(2)
    result = await psctl("launch", "--server", addr, "--model", "linear", "--dataset", "synthetic-regression",
                         "--workers", "2", "--iterations", "30", "--lr", "1e20", "--wait")
    assert result.exit_code == 1, result.stdout
    assert " failed in " in result.stdout and "lower the learning rate" in result.stdout


# ------------------------------------------------------------------------------ without a terminal
async def test_watch_into_a_pipe_prints_a_line_per_change_while_the_run_goes(addr: str, ps: PsClient,
                                                                           start_workers: Any) -> None:
    """stdout is a pipe: a plain line each time the run changes, as it happens (not a screen drawn
    once at the end), then the final status view, unwrapped."""
    run_id = ok(await psctl("launch", "--server", addr, *TINY[:-4], "--iterations", "100000")).stdout.strip()
    start_workers(2)
    watch = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "client.cli", "watch", run_id, "--server", addr, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert watch.stdout is not None
    try:
        running: list[str] = []
        async with asyncio.timeout(60):
            while len(running) < 2:  # two lines of the live run, read while it runs
                line = (await watch.stdout.readline()).decode()
                assert line, f"watch ended early: {(await watch.stderr.read()).decode() if watch.stderr else ''}"
                if "  running  " in line:
                    running.append(line)
        for line in running:
            assert re.fullmatch(r"\d\d:\d\d:\d\d  running  clock \d+/100000  workers 2/2 active  .*"
                                r"test accuracy (-|0\.\d{4})\n", line), line
        assert running[0] != running[1]
        await ps.stop_run(run_id, "enough")
        async with asyncio.timeout(30):
            rest = (await watch.stdout.read()).decode()
            assert await watch.wait() == 2
    finally:
        if watch.returncode is None:
            watch.kill()
            await watch.wait()
    lines = rest.splitlines()
    assert any(re.match(r"\d\d:\d\d:\d\d  stopped  clock \d+/100000 .* \(enough\)$", ln) for ln in lines), rest
    assert any("STOPPED" in ln and "enough" in ln for ln in lines)  # the final view
    (pushes,) = [ln for ln in lines if ln.startswith("pushes ")]
    assert "applied" in pushes and "skipped" in pushes, rest  # one line, not wrapped at 80 columns
    # After the stop no rank is shown active (issue 14): they were training, now they are stopped.
    status = json.loads(ok(await psctl("status", run_id, "--server", addr, "--json")).stdout)
    assert [w["state"] for w in status["run"]["workers"]] == ["stopped", "stopped"], status["run"]["workers"]
    assert status["summary"]["workers_active"] == 0 and status["run"]["state"] == status["summary"]["state"] == "stopped"


async def test_views_are_not_wrapped_at_80_columns_without_a_terminal(addr: str) -> None:
    name = "a run whose name is long enough to go past eighty columns in any table it appears in, " * 2
    run_id = ok(await psctl("launch", "--server", addr, *TINY, "--name", name.strip())).stdout.strip()
    view = ok(await psctl("status", run_id, "--server", addr)).stdout.splitlines()
    assert view[0].split() == [run_id, *name.split(), "PENDING"], view[0]
    assert any(ln.startswith("model softmax") and ln.rstrip().endswith("workers 2") for ln in view), view
    assert any(ln.split()[:2] == ["rank", "state"] and "heartbeat" in ln and ln.rstrip().endswith("name")
               for ln in view), view
    table = ok(await psctl("runs", "--server", addr)).stdout.splitlines()
    assert any(ln.startswith(run_id) and name.strip() in ln and "PENDING" in ln for ln in table), table


# ------------------------------------------------------------------------------ JSON and metrics
PROTO_ENUM = re.compile(r'"[A-Z][A-Z0-9]*_[A-Z0-9_]+"')  # "RUN_STATE_STOPPED", "KIND_PULL", ...
RFC3339 = re.compile(r'"\d{4}-\d\d-\d\dT\d\d:')


async def test_json_has_one_form_for_enums_and_times(addr: str, start_workers: Any) -> None:
    """Every --json output spells an enum value as its short lower-case name and a time as Unix
    seconds: the run's proto JSON (``run``) and psctl's facts (``summary``) agree."""
    start_workers(2)
    run_id = json.loads(ok(await psctl("launch", "--server", addr, *TINY, "--wait", "--json")).stdout)["run_id"]
    outputs = {cmd[0]: ok(await psctl(*cmd, "--server", addr, "--json")).stdout
               for cmd in (["status", run_id], ["metrics", run_id], ["runs"], ["watch", run_id], ["stop", run_id])}
    for command, out in outputs.items():
        assert not PROTO_ENUM.search(out) and not RFC3339.search(out), (command, out[:2000])
    status = json.loads(outputs["status"])
    assert status["run"]["state"] == status["summary"]["state"] == "completed"
    assert [w["state"] for w in status["run"]["workers"]] == [w["state"] for w in status["workers"]] == ["done"] * 2
    assert status["run"]["spec"]["aggregation"] == "mean" and status["run"]["spec"]["params"][0]["dtype"] == "float32"
    assert isinstance(status["run"]["created"], float) and status["run"]["created"] <= status["run"]["finished"]
    watched = json.loads(outputs["watch"])  # a finished run: one snapshot
    assert watched["run"]["state"] == watched["summary"]["state"] == "completed"
    assert {e["kind"] for e in watched["events"]} >= {"completed"}
    assert all(isinstance(e["time"], float) for e in watched["events"] + status["events"])


async def test_metrics_lists_the_events_and_its_json_has_the_clock_records(addr: str, start_workers: Any) -> None:
    start_workers(2)
    run_id = json.loads(ok(await psctl("launch", "--server", addr, *TINY, "--wait", "--json")).stdout)["run_id"]
    doc = json.loads(ok(await psctl("metrics", run_id, "--server", addr, "--json")).stdout)
    records = doc["clock_records"]
    assert {r["kind"] for r in records} == {"pull", "push"}, records[:5]
    assert sum(r["kind"] == "push" for r in records) == 60  # every push of 2 ranks x 30 iterations
    assert all(r["clock"] - r["min_clock"] <= 2 for r in records if r["kind"] == "pull")  # s = 2 held
    events = doc["events"]
    assert [e["kind"] for e in events][:1] == ["created"] and events[-1]["kind"] == "completed"
    human = ok(await psctl("metrics", run_id, "--server", addr)).stdout
    assert f"{len(events)} events, {len(records)} clock records" in human.splitlines()[0]
    lines = human.splitlines()
    for e in events:  # each event on a line: time, kind, rank, message
        rank = f"rank {e['rank']}" if e["rank"] >= 0 else "-"
        assert any(re.match(rf"  \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{{3}}  {e['kind']} +{rank} +{re.escape(e['message'])}$", ln)
                   for ln in lines), (e, human)
    assert "served pulls were at most 2 clocks ahead of the min clock" in human


async def test_simulate_takes_a_run_raised_by_psctl_set_as_recorded_under_the_bound_its_pulls_waited_for(
        addr: str, ps: PsClient) -> None:
    """Rank 1 is slow, s = 1 parks rank 0's pulls; then ``psctl set`` raises the bound to 4. The
    run is replayed as recorded under 1 (the server's tightest_staleness): rank 0 idled. Under 4
    its waits were taken for latency (idle 0.6% against 80% recorded)."""
    from support import make_spec

    run = await ps.create_run(make_spec(num_workers=2, staleness=1, iterations=40))
    ranks = [(await ps.join(f"w{i}", run.run_id)).assignment for i in range(2)]

    async def train(a: Any, seconds: float) -> None:
        for clock in range(12):
            pulled = await ps.pull(run.run_id, a.rank, a.incarnation, clock)
            await asyncio.sleep(seconds)
            await ps.push(run.run_id, a.rank, a.incarnation, clock, {n: np.zeros_like(v) for n, v in pulled.tensors.items()})

    await asyncio.gather(train(ranks[0], 0.0), train(ranks[1], 0.02))
    ok(await psctl("set", run.run_id, "--staleness", "4", "--server", addr))
    doc = json.loads(ok(await psctl("simulate", run.run_id, "--server", addr, "--staleness", "4", "--json")).stdout)
    recorded = doc["recorded"]
    assert (recorded["staleness"], recorded["bound_changed"], doc["replay"]["staleness"]) == (1, True, 1), doc
    assert recorded["idle_share"][0] > 0.5 > recorded["idle_share"][1], doc  # rank 0 waited for rank 1
    assert any("bound changed while it ran" in note for note in doc["notes"])


async def test_simulate_replays_a_real_run_under_other_bounds(addr: str, start_workers: Any, tmp_path: Path) -> None:
    pending = ok(await psctl("launch", "--server", addr, *TINY, "--json")).stdout
    empty = await psctl("simulate", json.loads(pending)["run_id"], "--server", addr)
    assert empty.exit_code == 1 and "has no clock records yet" in empty.stderr
    ok(await psctl("stop", json.loads(pending)["run_id"], "--server", addr))
    ended = await psctl("simulate", json.loads(pending)["run_id"], "--server", addr)  # (it said to start its workers)
    assert ended.exit_code == 1 and "is stopped, and this server has no clock records of it" in ended.stderr, \
        ended.stderr
    bad = await psctl("simulate", "run-x", "--server", addr, "--staleness", "0,banana")
    assert bad.exit_code == 2 and "'banana': use 0 or bsp" in bad.stderr

    start_workers(3)
    launched = ok(await psctl("launch", "--server", addr, "--model", "softmax", "--dataset", "digits", "--workers", "3",
                              "--iterations", "40", "--staleness", "1", "--slowdown", "2=3", "--wait", "--json"))
    run_id = json.loads(launched.stdout)["run_id"]
    png = tmp_path / "what-if.png"
    doc = json.loads(ok(await psctl("simulate", run_id, "--server", addr, "--staleness", "0,1,inf", "--json",
                                    "--plot", str(png))).stdout)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and doc["plot"] == str(png)
    assert (doc["run_id"], doc["ranks"], doc["clocks"], doc["first_clock"]) == (run_id, 3, 40, 0)
    by_s = {f["staleness"]: f for f in doc["predictions"]}
    assert sorted(by_s) == [-1, 0, 1] and all(len(f["idle_share"]) == 3 for f in by_s.values())
    assert by_s[0]["time_per_clock_s"] >= by_s[-1]["time_per_clock_s"] - 1e-6 > 0
    assert by_s[-1]["idle_share_mean"] == 0.0 and by_s[0]["most_idle_rank"] != 2  # the straggler waits least
    recorded, replayed = doc["recorded"], doc["replay"]
    assert recorded["staleness"] == replayed["staleness"] == 1 and recorded["time_per_clock_s"] > 0
    assert replayed == {**by_s[1], "error": replayed["error"]}
    assert abs(replayed["error"]) < 0.5, doc  # the model's check against the measurement (loose: a busy machine)
    human = ok(await psctl("simulate", run_id, "--server", addr, "--staleness", "bsp,4")).stdout
    assert "recorded, 1" in human and "replay of 1" in human and "off the measured time per clock" in human
    assert re.search(r"^ *4 +[\d.]+ ms", human, re.M), human


async def test_status_says_a_pull_parked_before_the_run_starts_waits_for_the_start(addr: str, ps: PsClient,
                                                                                 start_workers: Any) -> None:
    run_id = ok(await psctl("launch", "--server", addr, *TINY, "--staleness", "1")).stdout.strip()
    start_workers(1)  # of 2 ranks: its pull of clock 0 waits for the run to start, not for a min clock

    async def parked() -> bool:
        return any(w.waiting for w in (await ps.get_run(run_id)).workers)

    await wait_for(parked)
    text = ok(await psctl("status", run_id, "--server", addr)).stdout
    assert "pull 0: the run to start" in text and "min clock ≥" not in text, text
    doc = json.loads(ok(await psctl("status", run_id, "--server", addr, "--json")).stdout)
    (waiting,) = [w for w in doc["workers"] if w["waiting"]]
    assert waiting["needs_start"] is True and waiting["needs_min_clock"] is None
    ok(await psctl("stop", run_id, "--server", addr))


async def test_export_into_a_missing_directory_names_the_output_not_a_temporary_file(addr: str,
                                                                                   tmp_path: Path) -> None:
    run_id = ok(await psctl("launch", "--server", addr, *TINY)).stdout.strip()
    target = tmp_path / "missing" / "params.npz"
    result = await psctl("export", run_id, "--server", addr, "-o", str(target))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: -o {str(target)!r}: ") and ".psctl-" not in result.stderr, result.stderr
    assert str(tmp_path / "missing") in result.stderr and "Traceback" not in result.stderr


async def test_launch_help_lists_every_model_and_dataset_the_readme_does() -> None:
    text = ok(await psctl("launch", "--help", env={"COLUMNS": "400"})).stdout
    for form in ("mlp:H1,H2", "linear", "softmax", "logistic[:rows=N]", "fm:K[:rows=N]", "mf:K[:reg=L]",
                 "digits", "synthetic-regression", "synthetic-classification", "synthetic-ctr", "synthetic-ratings",
                 "npz:PATH", "libsvm:PATH"):
        assert form in text, form


@pytest.mark.parametrize(("env", "expected"), [
    ({"PS_TOKEN": "t"}, "refusing to send the token over plaintext: use TLS (PSCTL_TLS_CA) or PSCTL_INSECURE=1"),
    ({"PSCTL_TOKEN_FILE": "/nonexistent/token"}, "cannot read PSCTL_TOKEN_FILE /nonexistent/token"),
    ({"PS_TOKEN": "t", "PSCTL_TOKEN_FILE": "/x"}, "either in PS_TOKEN or with PSCTL_TOKEN_FILE, not both"),
    ({"PSCTL_TLS_CA": "/nonexistent/ca.pem"}, "cannot read PSCTL_TLS_CA /nonexistent/ca.pem"),
    ({"PSCTL_TLS_CERT": "/x"}, "a client certificate needs both PSCTL_TLS_CERT and PSCTL_TLS_KEY"),
    # (a file that is no PEM: gRPC logged "Could not load any root certificate" and psctl said it could not reach a
    # paramserver, 'start one with ps-server')
    ({"PSCTL_TLS_CA": str(ROOT / "README.md")}, f"PSCTL_TLS_CA {ROOT / 'README.md'} holds no PEM certificate"),
    ({"PSCTL_TLS_CERT": str(ROOT / "README.md"), "PSCTL_TLS_KEY": str(ROOT / "README.md")},
     f"PSCTL_TLS_CERT {ROOT / 'README.md'} and PSCTL_TLS_KEY {ROOT / 'README.md'} are not a PEM certificate and its "
     "unencrypted private key"),
])
async def test_security_settings_are_named_as_psctl_takes_them_from_the_environment(
        addr: str, env: dict[str, str | None], expected: str) -> None:
    # psctl has no --tls-ca, --token-file or --insecure: its messages name its environment variables
    result = await psctl("runs", "--server", addr, env=env)
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and expected in result.stderr, result.stderr
    assert "--tls-" not in result.stderr and "--token-file" not in result.stderr and "--insecure" not in result.stderr


# ------------------------------------------------------------------------------ interrupted
def test_ctrl_c_while_psctl_loads_exits_130_without_a_traceback() -> None:
    """psctl's imports take about a second; Ctrl-C in it printed a Python traceback (KeyboardInterrupt,
    or a RuntimeError around it from a class being built) and the shell saw the signal, not 130.
    The signal is sent once numpy is loaded: psctl's own imports have begun."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # (as in a terminal: see test_local_launch)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "client.main", "runs", "--server", "127.0.0.1:9"],
                                cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finally:
        signal.signal(signal.SIGINT, before)
    try:
        maps = Path(f"/proc/{proc.pid}/maps")
        deadline = time.monotonic() + 30
        while "_multiarray_umath" not in maps.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "psctl ended before loading numpy"
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, out, err) == (130, "", "")


async def test_refusals_of_delete_and_set_name_psctl_s_options(addr: str, ps: PsClient) -> None:
    """(They said 'delete it with force' and 'choose between positive bounds and -1 (unbounded)': the
    DeleteRunRequest's field and the API's number, where psctl takes --force and inf.)"""
    run_id = ok(await psctl("launch", "--server", addr, *TINY)).stdout.strip()
    kept = await psctl("delete", run_id, "--server", addr)
    assert kept.exit_code == 1 and "stop it first (psctl stop), or delete it anyway (psctl delete --force" in kept.stderr
    to_bsp = await psctl("set", run_id, "--staleness", "0", "--server", addr)
    assert to_bsp.exit_code == 1 and "choose a positive bound, or none (psctl set --staleness inf" in to_bsp.stderr, \
        to_bsp.stderr
    bsp = ok(await psctl("launch", "--server", addr, *TINY, "--staleness", "0")).stdout.strip()
    from_bsp = await psctl("set", bsp, "--staleness", "3", "--server", addr)
    assert from_bsp.exit_code == 1 and "start a new run with the bound you want (psctl launch --staleness N)" in \
        from_bsp.stderr and "choose a positive bound" not in from_bsp.stderr, from_bsp.stderr


async def test_a_model_over_the_server_s_limit_is_refused_naming_psctl_s_option(server_config: Any) -> None:
    """(It said only 'ask for less', and checkpoint without a data directory 'start it with --data-dir'.)"""
    from support import with_config

    from ps_server.server import start_server

    small = await start_server(with_config(server_config, max_param_bytes=1000))
    try:
        addr = f"127.0.0.1:{small.port}"
        big = await psctl("launch", "--server", addr, *TINY)
        assert big.exit_code == 1 and "ask for a smaller model (psctl launch --model), or give the server more " \
            "(ps-server --max-param-bytes)" in big.stderr, big.stderr
        run_id = ok(await psctl("launch", "--server", addr, "--model", "linear", "--dataset",
                                "synthetic-regression:features=2", "--workers", "1", "--iterations", "10")).stdout.strip()
        kept = await psctl("checkpoint", run_id, "--server", addr)
        assert kept.exit_code == 1 and "start it with one (ps-server --data-dir DIR)" in kept.stderr, kept.stderr
    finally:
        await small.stop(0)


async def test_a_reader_that_goes_away_ends_psctl_quietly(addr: str) -> None:
    """``psctl metrics RUN | head -1``: psctl printed 'Error: [Errno 32] Broken pipe' once head had
    gone. Now every command ends as those printing through rich did already: status 1, nothing on stderr."""
    run_id = ok(await psctl("launch", "--server", addr, *TINY)).stdout.strip()
    for command in (["metrics", run_id], ["runs"]):
        read, write = os.pipe()
        os.close(read)  # (the reader is gone before psctl writes)
        try:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "client.main", *command, "--server", addr,
                                                        cwd=ROOT, stdout=write, stderr=asyncio.subprocess.PIPE)
        finally:
            os.close(write)
        async with asyncio.timeout(60):
            _, err = await proc.communicate()
        assert (proc.returncode, err.decode()) == (1, ""), command


async def test_launch_without_wait_says_how_to_follow_the_run_on_its_server(addr: str) -> None:
    """(It said 'follow with psctl watch RUN', which asks 127.0.0.1:50051 when --server named another.)"""
    launched = ok(await psctl("launch", "--server", addr, *TINY))
    run_id = launched.stdout.strip()
    assert f"follow with 'psctl watch {run_id} --server {addr}'" in launched.stderr, launched.stderr
    from_env = ok(await psctl("launch", *TINY, env={"PSCTL_SERVER": addr}))
    assert f"follow with 'psctl watch {from_env.stdout.strip()}'" in from_env.stderr, from_env.stderr
