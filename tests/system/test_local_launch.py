"""``psctl launch --local``: a real server and real workers as processes, and none left behind.

Each psctl gets a unique environment marker that its children inherit; after psctl exits (on
success, on failure, on SIGINT, on SIGTERM) no process whose environment holds the marker may
survive. Processes are found through /proc/*/environ (Linux; psutil is not a dependency).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from client.local import LocalCluster, LocalClusterError
from paramserver.client import PsClient
from paramserver.errors import PsError
from paramserver.v1 import paramserver_pb2 as pb

pytestmark = [pytest.mark.timeout(180), pytest.mark.skipif(not Path("/proc/self/environ").exists(),
                                                           reason="needs Linux /proc")]

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "softmax", "--dataset", "digits", "--workers", "2", "--iterations", "30"]


def marked(marker: str) -> list[int]:
    """Pids of live processes whose environment contains ``PSCTL_TEST_MARKER=<marker>``."""
    needle = f"PSCTL_TEST_MARKER={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


def communicate(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """``proc.communicate``; a psctl still running after ``timeout`` is aborted and the test fails
    with its threads' stacks (faulthandler) and output."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"psctl did not exit within {timeout:.0f}s; its stacks and output:\n{err}\n{out}")


def start_psctl(tmp: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    """psctl launch --local with a fresh marker; its temp dirs (the cluster log) go under ``tmp``."""
    marker = uuid.uuid4().hex
    # As in a terminal, where Ctrl-C reaches it: a suite started in the background by a
    # non-interactive shell (`cmd &`) runs with SIGINT ignored, which children inherit (and a
    # Python started so keeps ignoring it): psctl would then rightly never see the test's SIGINT.
    # A handler set here around the start becomes SIG_DFL in the child at exec (not a preexec_fn:
    # Python in a child forked from this process, whose gRPC threads make such children abort now
    # and then). The same for SIGHUP, which a suite started under nohup ignores (psctl then rightly
    # keeps running when it comes: its terminal's close was meant not to stop it).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    hup = signal.signal(signal.SIGHUP, lambda *_: None)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "client.cli", "launch", "--local", *args], cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            # PYTHONFAULTHANDLER: a psctl that hangs is made to print where (SIGABRT; ``communicate``)
            env={**os.environ, "PSCTL_TEST_MARKER": marker, "TMPDIR": str(tmp), "PYTHONFAULTHANDLER": "1"},
        )
    finally:
        signal.signal(signal.SIGINT, before)
        signal.signal(signal.SIGHUP, hup)
    return proc, marker


def assert_nothing_left(marker: str, tmp: Path, logs: int = 0) -> None:
    deadline = time.monotonic() + 2.0  # children are reaped before psctl exits; allow /proc a moment
    while (left := marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"stray processes survived psctl: {left}"
    assert len(list(tmp.glob("psctl-local-*"))) == logs, "log directories left behind"


def test_local_launch_trains_and_leaves_no_process(tmp_path: Path) -> None:
    proc, marker = start_psctl(tmp_path, *TINY, "--json")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert doc["state"] == "completed" and doc["workers"] == 2 and doc["iterations"] == 30
    assert 0.7 < doc["test_accuracy"] <= 1.0 and doc["test_loss"] > 0 and doc["pushes_applied"] == 60
    assert "log" not in doc  # a clean run removes its log directory
    assert_nothing_left(marker, tmp_path)


def test_local_launch_on_two_servers_spreads_the_run_over_both(tmp_path: Path) -> None:
    proc, marker = start_psctl(tmp_path, "--model", "mlp:64", "--dataset", "digits", "--workers", "2",
                               "--iterations", "40", "--servers", "2", "--json")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert doc["state"] == "completed" and doc["pushes_applied"] == 80
    shards = doc["shards"]
    assert [s["index"] for s in shards] == [0, 1] and len({s["address"] for s in shards}) == 2
    assert all(s["bytes_held"] > 0 and s["pieces"] for s in shards)
    assert sum(s["bytes_held"] for s in shards) == 4 * (64 * 64 + 64 + 64 * 10 + 10)  # every parameter, once
    # Each server's status at the end (it was server 1's as server 0 last asked, before the end:
    # running at an earlier clock, or "not heard from yet")
    assert [(s["state"], s["min_clock"], s["max_clock"], s["pushes_applied"]) for s in shards] == \
        [("completed", 40, 40, 80)] * 2, shards
    assert_nothing_left(marker, tmp_path)


@pytest.mark.parametrize(("compress", "servers", "overlap"), [("none", "1", ""), ("topk:0.05,fp16", "1", "1"),
                                                              ("bf16", "2", "1")])
def test_compressed_runs_learn_with_fewer_bytes(compress: str, servers: str, overlap: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """--compress: the run learns as well (the MLP on digits, 4 workers, SSP 2) with half the bytes
    (bf16, on a 2-server cluster too) or with top-k pushes of 5% in fp16; workers here compute
    their next gradient while their push is in flight (PS_WORKER_OVERLAP)."""
    monkeypatch.setenv("PS_WORKER_OVERLAP", overlap)
    proc, marker = start_psctl(tmp_path, "--model", "mlp:64", "--dataset", "digits", "--workers", "4",
                               "--iterations", "150", "--servers", servers, "--compress", compress, "--json")
    out, err = communicate(proc, 150)
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert doc["state"] == "completed" and doc["pushes_applied"] == 600 and doc["compress"] == compress
    assert doc["test_accuracy"] > 0.93, doc
    # the counters are the first server's: what it holds
    dense = doc["shards"][0]["bytes_held"] if servers != "1" else 4 * (64 * 64 + 64 + 64 * 10 + 10)
    per_push, per_pull = doc["bytes_pushed"] / 600, doc["bytes_pulled"] / doc["pulls_served"]
    if compress == "none":
        assert per_push == dense
    elif compress == "bf16":
        assert per_push == dense // 2 and per_pull <= dense // 2
    else:
        assert per_push < 0.2 * dense  # 5% of the elements: values (2 bytes) and indices (4 bytes)
    assert_nothing_left(marker, tmp_path)


def test_local_launch_human_summary(tmp_path: Path) -> None:
    proc, marker = start_psctl(tmp_path, *TINY, "--staleness", "inf")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert " completed in " in out and "test accuracy 0." in out and "test loss 0." in out
    assert "(60 pushes, 0 duplicates)" in out
    assert "staleness inf (ASP)" in err and "on a local ps-server (127.0.0.1:" in err
    assert "  completed  clock 30/30  workers " in err and "train loss " in err  # a line per change, no bar
    assert_nothing_left(marker, tmp_path)


def test_failed_run_exits_1_keeps_the_log_and_leaves_no_process(tmp_path: Path) -> None:
    proc, marker = start_psctl(tmp_path, "--model", "linear", "--dataset", "synthetic-regression", "--workers", "2",
                               "--iterations", "30", "--lr", "1e20", "--json")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    doc = json.loads(out)
    assert doc["state"] == "failed" and "lower the learning rate" in doc["message"]
    log = Path(doc["log"])
    assert log.parent.parent == tmp_path and "training failed: the training loss became nan" in log.read_text()
    assert f"log: {log}" not in err  # JSON mode: the path is in the JSON, stderr stays quiet
    assert_nothing_left(marker, tmp_path, logs=1)


def test_failed_run_with_verbose_leaves_no_empty_log_directory(tmp_path: Path) -> None:
    """--verbose: the children's output went to the terminal, so there is no log to keep."""
    proc, marker = start_psctl(tmp_path, "--model", "linear", "--dataset", "synthetic-regression", "--workers", "2",
                               "--iterations", "30", "--lr", "1e20", "--verbose", "--json")
    out, err = communicate(proc, 120)
    assert proc.returncode == 1, err
    doc = json.loads(out)
    assert doc["state"] == "failed" and "log" not in doc
    assert_nothing_left(marker, tmp_path)


def test_settings_exported_for_a_standing_server_do_not_reach_the_local_cluster(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A token, a cluster, a data directory, a run id exported for another server: the local
    cluster is psctl's own (on 127.0.0.1, plaintext, no data directory), and trains."""
    (tmp_path / "a-file").write_text("")
    for name, value in {"PS_TOKEN": "sekrit", "PS_CLUSTER": "10.0.0.1:50051,10.0.0.2:50051", "PS_INDEX": "1",
                        "PS_DATA_DIR": str(tmp_path / "a-file"), "PS_WORKER_RUN_ID": "run-elsewhere"}.items():
        monkeypatch.setenv(name, value)
    proc, marker = start_psctl(tmp_path, *TINY, "--json")
    out, err = communicate(proc, 120)
    assert proc.returncode == 0, err
    assert json.loads(out)["state"] == "completed"
    assert_nothing_left(marker, tmp_path)


def test_a_server_that_exits_at_start_is_said_to_have_exited() -> None:
    """Its stdout closes a moment before it can be reaped (a start-up error, exit status 2): not a
    server that 'did not report its port within 30s'."""
    cluster = LocalCluster(1)
    try:
        cluster._servers.append(subprocess.Popen(
            [sys.executable, "-c", "import os, time; os.close(1); time.sleep(0.5); raise SystemExit(2)"],
            stdout=subprocess.PIPE))
        started = time.monotonic()
        with pytest.raises(LocalClusterError, match="the local ps-server exited with code 2"):
            cluster.wait_server(30.0)
        assert time.monotonic() - started < 10
    finally:
        cluster.close()
        shutil.rmtree(cluster.log_dir, ignore_errors=True)


def test_unloadable_dataset_after_the_server_started_leaves_no_process(tmp_path: Path) -> None:
    """The server boots while the spec is built; a dataset that cannot be read must tear it down."""
    proc, marker = start_psctl(tmp_path, *TINY[:2], "--dataset", "npz:/nonexistent/data.npz", "--workers", "2")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and out == ""
    assert err.startswith("Error: ") and "/nonexistent/data.npz" in err and "Traceback" not in err
    assert_nothing_left(marker, tmp_path)


@pytest.mark.parametrize(("flags", "expected"), [(["--epochs", "0"], "Error: --epochs 0: use a positive number"),
                                               (["--staleness", "-1"], "Error: --staleness '-1': a staleness cannot be")])
def test_bad_numbers_are_refused_before_a_cluster_starts(flags: list[str], expected: str, tmp_path: Path) -> None:
    """--epochs 0 used to become one iteration, --staleness -1 an unbounded run: both are refused
    at once, with nothing started (no log directory is even made)."""
    proc, marker = start_psctl(tmp_path, *TINY[:4], *flags)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and out == "", err
    assert err.startswith(expected) and "Traceback" not in err, err
    assert_nothing_left(marker, tmp_path)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM),
                                         (signal.SIGHUP, 128 + signal.SIGHUP)])  # (SIGHUP: its terminal closed)
def test_interrupt_mid_run_leaves_no_process(sig: signal.Signals, code: int, tmp_path: Path) -> None:
    proc, marker = start_psctl(tmp_path, "--model", "mlp:64", "--dataset", "digits", "--workers", "2",
                               "--iterations", "100000", "--json")
    deadline = time.monotonic() + 60
    while len(marked(marker)) < 4 and time.monotonic() < deadline:  # psctl + server + 2 workers
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert len(marked(marker)) == 4
    time.sleep(1.5)  # let training start
    proc.send_signal(sig)
    out, err = communicate(proc, timeout=60)  # the teardown is bounded at ~20 s (5 s per phase)
    assert proc.returncode == code, err
    assert out == ""
    if sig == signal.SIGINT:
        assert err.strip().endswith("Error: interrupted: stopped the local cluster"), err
    assert_nothing_left(marker, tmp_path)


async def wait_for_training(address: str, timeout: float = 60.0) -> None:
    async with PsClient(address, timeout=2.0) as c:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if any(r.min_clock > 0 for r in await c.list_runs()):
                    return
            except PsError:
                pass  # not listening yet
            assert time.monotonic() < deadline, f"no run started training at {address}"
            await asyncio.sleep(0.1)


def test_server_death_mid_run_is_reported_and_cleaned_up(tmp_path: Path) -> None:
    proc, marker = start_psctl(tmp_path, "--model", "mlp:64", "--dataset", "digits", "--workers", "2",
                               "--iterations", "100000", "--json")
    deadline = time.monotonic() + 60
    while len(marked(marker)) < 4 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    (server,) = [pid for pid in marked(marker) if b"ps_server.server" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    argv = Path(f"/proc/{server}/cmdline").read_bytes().split(b"\0")
    asyncio.run(wait_for_training(f"127.0.0.1:{int(argv[argv.index(b'--port') + 1])}"))  # the server is up and serving
    os.kill(server, signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and out == ""
    # Normally the exit is seen first; on a very loaded machine the broken connection may win.
    assert err.startswith(("Error: the local ps-server was killed by SIGKILL; log: ",
                           "Error: lost the local ps-server at 127.0.0.1:")), err
    assert "/cluster.log" in err
    assert_nothing_left(marker, tmp_path, logs=1)


async def straggler_snapshots(address: str, timeout: float = 90.0) -> list[dict[int, int]]:
    """The clocks of the 4 ranks of the one run at ``address`` in every snapshot while all 4 train."""
    clocks: list[dict[int, int]] = []
    async with PsClient(address, timeout=5.0) as c:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    runs = await c.list_runs()
                except PsError:
                    runs = []  # not listening yet
                if runs:
                    break
                await asyncio.sleep(0.05)
            with contextlib.suppress(PsError):  # the cluster goes away when the run ends
                async for snap in c.watch_run(runs[0].run_id, interval=0.05):
                    active = {w.rank: w.clock for w in snap.run.workers if w.state == pb.WORKER_STATE_ACTIVE}
                    if len(active) == 4 and snap.run.min_clock > 0:
                        clocks.append(active)
    return clocks


def test_a_slowed_rank_is_the_visible_straggler(tmp_path: Path) -> None:
    """--slowdown 1=3 on the README's model (digits, mlp:64, 4 workers, s = 2): rank 1 is the one
    behind in (nearly) every snapshot of the run, as psctl status shows it, not one rank among
    others taking turns."""
    proc, marker = start_psctl(tmp_path, "--model", "mlp:64", "--dataset", "digits", "--workers", "4",
                               "--staleness", "2", "--slowdown", "1=3", "--epochs", "40", "--json")
    deadline = time.monotonic() + 60
    while not (servers := [pid for pid in marked(marker) if b"ps_server.server" in Path(f"/proc/{pid}/cmdline").read_bytes()]):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    while len(workers := [pid for pid in marked(marker) if b"worker.main" in Path(f"/proc/{pid}/cmdline").read_bytes()]) < 4:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    base = os.getpriority(os.PRIO_PROCESS, servers[0])  # the server first on shared cores (client/local.py)
    while (priorities := [os.getpriority(os.PRIO_PROCESS, pid) for pid in workers]) != [min(19, base + 10)] * 4:
        assert time.monotonic() < deadline, f"the workers' priorities stayed {priorities} (the server's: {base})"
        time.sleep(0.05)  # (a worker lowers its own at start, once its modules are loaded)
    argv = Path(f"/proc/{servers[0]}/cmdline").read_bytes().split(b"\0")
    snapshots = asyncio.run(straggler_snapshots(f"127.0.0.1:{int(argv[argv.index(b'--port') + 1])}"))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    behind = sum(all(s[1] < clock for rank, clock in s.items() if rank != 1) for s in snapshots)
    assert len(snapshots) >= 10, snapshots
    assert behind >= 0.8 * len(snapshots), f"rank 1 behind all others in {behind} of {len(snapshots)} snapshots"
    assert_nothing_left(marker, tmp_path)


def test_psctl_killed_by_sigkill_takes_its_cluster_with_it(tmp_path: Path) -> None:
    """psctl cannot tear anything down when it is killed -9 (an OOM kill, a CI timeout): its server
    and workers notice that their parent died (Linux: PR_SET_PDEATHSIG) and stop by themselves,
    instead of keeping their ports and CPU for ever (the server) or until their run times out."""
    proc, marker = start_psctl(tmp_path, "--model", "mlp:64", "--dataset", "digits", "--workers", "2",
                               "--iterations", "100000", "--json")
    deadline = time.monotonic() + 60
    while len(marked(marker)) < 4:  # psctl + server + 2 workers
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    (server,) = [pid for pid in marked(marker) if b"ps_server.server" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    argv = Path(f"/proc/{server}/cmdline").read_bytes().split(b"\0")
    asyncio.run(wait_for_training(f"127.0.0.1:{int(argv[argv.index(b'--port') + 1])}"))
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 20  # SIGTERM: the server's grace (1 s) and the workers' leave
    while (left := marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert not left, f"psctl's children outlived it: {left}"
    finally:
        for pid in left:  # (not the test's own children: only kill what the assertion named)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
