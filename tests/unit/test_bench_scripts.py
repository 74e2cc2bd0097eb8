"""Every benchmark script still imports what it uses and parses its arguments (``--help``).

The benchmarks are not run in CI (their figures need a quiet machine), so this is what keeps a
refactoring of the code they import from breaking them unnoticed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_bench_script_starts(script: str) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


@pytest.mark.timeout(300)
def test_shards_bench_runs_on_loopback() -> None:
    """bench/shards.py end to end without root: one and two servers on loopback, one short
    repetition, and the too-big-for-one-server demonstration (the namespaces need --net shaped)."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "shards.py"), "--net", "loopback", "--shards", "1,2", "--workers", "1",
         "--models", "mlp-5.8M", "--reps", "1", "--seconds", "0.2", "--idle-seconds", "0", "--demo-iterations", "2"],
        capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| loopback | 1 | mlp-5.8M | 2 |" in proc.stdout
    assert "tcp 2, grpc 0; tcp" in proc.stdout  # the TCP data plane, one stream per shard
    demo = proc.stdout[proc.stdout.index("{"):]
    assert '"exit": 1' in demo and "over its limit" in demo  # one server refuses the run
    assert '"exit": 0' in demo  # two servers train it


@pytest.mark.timeout(120)
def test_a_shards_bench_set_up_that_fails_stops_its_servers() -> None:
    """A run the servers refuse (here: over a --max-param-bytes of 1024) ends the bench with the
    server's error, and no server is left running (one was, its lease an hour, for ever)."""
    marker = "--max-param-bytes 1024"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "shards.py"), "--net", "loopback", "--shards", "1", "--workers", "1",
         "--models", "mlp-5.8M", "--reps", "1", "--seconds", "0.2", "--idle-seconds", "0", "--no-demo",
         f"--server-args={marker}"], capture_output=True, text=True, timeout=100)
    assert proc.returncode != 0 and "over its limit of 1024" in proc.stderr, proc.stderr[-2000:]
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(p).count("ps_server.server")
            and marker.replace(" ", "\0") in _cmdline(p)]
    assert left == [], [_cmdline(p) for p in left]


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:  # (gone meanwhile)
        return ""


@pytest.mark.timeout(200)
def test_cpu_per_push_on_two_servers(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    proc = subprocess.run([sys.executable, str(BENCH / "cpu_per_push.py"), "--servers", "2", "--seconds", "0.3",
                           "--compute-only", "--compute-seconds", "0.3", "--json", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 servers together" in proc.stdout
    assert "compute-only (4 processes)" in proc.stdout  # issue 17's reference by default: W processes at once
    # the figure: server + workers per push, less the reference's own CPU per iteration
    (r,), (ref,) = json.loads(out.read_text()).values()
    assert 0 < ref["cpu_ms"] < r["server_ms"] + r["workers_ms"]
    assert f"{r['server_ms'] + r['workers_ms'] - ref['cpu_ms']:.3f} ms" in proc.stdout.split("outside the gradient")[1]


@pytest.mark.timeout(120)
def test_tables_bench_quick(tmp_path: Path) -> None:
    """bench/tables.py --quick: two table sizes and one short CTR run, both tables printed, the JSON written."""
    out = tmp_path / "tables.json"
    proc = subprocess.run([sys.executable, str(BENCH / "tables.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 1e+05 | 4 | 1 |" in proc.stdout and "| 1e+06 | 36 | 1 |" in proc.stdout
    assert "planted AUC" in proc.stdout and "| 2 | 2 |" in proc.stdout
    doc = json.loads(out.read_text())
    assert [r["rows"] for r in doc["size"]] == [100_000, 1_000_000]
    assert all(r["rows_pulled"] > 0 and r["rows_pushed"] > 0 and r["bytes_per_iter"] > 0 for r in doc["size"])
    assert doc["ctr"][0]["evals"] and 0.5 < doc["ctr"][0]["final_auc"] <= 1.0


@pytest.mark.timeout(300)
def test_staleness_bench_runs_a_small_grid_and_reports(tmp_path: Path) -> None:
    """bench/staleness.py end to end on 2 workers with tail delays, every setting once, then its
    report (tables and the heat map) and the simulator's check on the traces it recorded."""
    raw, png = tmp_path / "raw.json", tmp_path / "map.png"
    proc = subprocess.run([sys.executable, str(BENCH / "staleness.py"), "--workers", "2", "--patterns", "tail",
                           "--pushes", "300", "--json", str(raw)], capture_output=True, text=True, timeout=250)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(raw.read_text())["runs"]
    assert len(runs) == 9 and all(r["pushes"] == 300 for r in runs if r["state"] == "completed")
    report = subprocess.run([sys.executable, str(BENCH / "staleness.py"), "--report", str(raw), "--png", str(png)],
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "| 2 | tail |" in report.stdout and png.stat().st_size > 10_000
    check = subprocess.run([sys.executable, str(BENCH / "simulate_check.py"), str(raw), "--workers", "2"],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-3000:]
    assert "own bound: median |error|" in check.stdout



@pytest.mark.timeout(120)
def test_staleness_bench_gives_workers_slower_machines_under_the_same_patterns() -> None:
    """``--step-seconds S``: every worker gets the flag, the patterns stay as they are (the worker
    multiplies S by them)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import staleness as b; "
            "print(json.dumps([b.worker_flags(p, s) for p in ('none', 'tail') for s in (0.0, 0.02)]))")
    proc = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == [[], ["--step-seconds", "0.02"], ["--tail-delay", "0.05:10"],
                                       ["--tail-delay", "0.05:10", "--step-seconds", "0.02"]]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("loop", [[], ["--asyncio"], ["--server-us", "20", "--worker-us", "20", "--spread"]],
                         ids=["epoll", "asyncio", "extra-python"])
def test_python_floor_trains_and_reports_its_cpu_per_push(loop: list[str]) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "python_floor.py"), "--workers", "2", "--repeats", "1",
                           "--seconds", "0.5", *loop], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pushes/s; CPU per push: server" in proc.stdout and "times per push" in proc.stdout
    accuracy = float(proc.stdout.split("test accuracy ")[1].split()[0].rstrip(";"))
    assert accuracy > 0.5  # it trained (digits, 10 classes: 0.1 by chance)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flags", [["--staleness", "foo"], ["--servers", "0"], ["--servers", "a"], ["--seconds", "0"],
                                   ["--repeats", "0"], ["--compute-procs", "0"]])
def test_cpu_per_push_refuses_bad_flags_before_it_starts_anything(flags: list[str]) -> None:
    """A bad flag is a usage error at once (a bad --staleness started the servers and 4 workers,
    then waited 30 s for each worker before its traceback)."""
    tag = f"flags-{os.getpid()}"
    try:
        proc = subprocess.run([sys.executable, str(BENCH / "cpu_per_push.py"), *flags], capture_output=True, text=True,
                              timeout=30, env={**os.environ, "BENCH_TEST_TAG": tag})
        assert proc.returncode == 2 and "usage:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    finally:
        for pid in _tagged(tag):
            os.kill(pid, signal.SIGKILL)



def _tagged(tag: str) -> list[int]:
    """Live processes (not zombies) whose environment holds ``BENCH_TEST_TAG=tag``: what a bench
    started in a test (its children inherit the variable)."""
    out = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and f"BENCH_TEST_TAG={tag}".encode() in (p / "environ").read_bytes().split(b"\0") \
                    and (p / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(int(p.name))
        except OSError:
            pass
    return out


@pytest.mark.timeout(120)
def test_cpu_per_push_whose_workers_exit_fails_and_stops_its_server() -> None:
    """Workers that cannot start (here: a flag they do not know) end the bench with an error, and its
    server is stopped (it waited for ever for the run's first pushes; killed, it left the server)."""
    tag = f"exit-{os.getpid()}"
    try:
        proc = subprocess.run([sys.executable, str(BENCH / "cpu_per_push.py"), "--seconds", "0.3",
                               "--worker-arg=--bogus-flag"], capture_output=True, text=True, timeout=100,
                              env={**os.environ, "BENCH_TEST_TAG": tag})
        assert proc.returncode == 1 and "exited before" in proc.stderr, proc.stderr[-2000:]
        assert _tagged(tag) == []
    finally:
        for pid in _tagged(tag):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_cpu_per_push_stopped_by_sigterm_stops_its_server_and_workers() -> None:
    """SIGTERM (a timeout's) unwinds as Ctrl-C does: no server or worker of the bench is left."""
    tag = f"term-{os.getpid()}"
    bench = subprocess.Popen([sys.executable, str(BENCH / "cpu_per_push.py"), "--seconds", "30"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "BENCH_TEST_TAG": tag})
    try:
        deadline = time.monotonic() + 60
        while len(_tagged(tag)) < 6 and time.monotonic() < deadline:  # the bench, its server and 4 workers
            time.sleep(0.2)
        assert len(_tagged(tag)) == 6
        time.sleep(1.0)
        bench.terminate()
        assert bench.wait(60) == 143
        assert _tagged(tag) == []
    finally:
        bench.kill()
        bench.wait()
        for pid in _tagged(tag):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(300)
def test_small_model_bench_runs_and_reports_both_references(tmp_path: Path) -> None:
    """bench/small_model.py, one short repeat: the rate against compute-only W = 4 (issue 17's
    reference, 4 processes at once) and against one process, and the time to accuracy."""
    out = tmp_path / "small.json"
    proc = subprocess.run([sys.executable, str(BENCH / "small_model.py"), "--repeats", "1", "--epochs", "30",
                           "--compute-seconds", "0.5", "--json", str(out)], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    for s in ("inf", "2"):
        (rate,), (w,), (one,) = doc[f"s={s} pushes/s"], doc[f"s={s} compute-only W=4 it/s"], doc[f"s={s} one process it/s"]
        assert doc[f"s={s} ratio vs compute-only W=4 (target >= 15%)"] == [rate / w] and rate > 0
        assert doc[f"s={s} ratio vs one process"] == [rate / one]
    assert "time-to-accuracy ratio" in proc.stdout


# Each bench that starts servers, with arguments that keep it running a while; the pattern of one of
# its children that shows it is under way.
_LONG_RUNS = {
    "small_model.py": (["--repeats", "1", "--epochs", "1000", "--compute-seconds", "0.2"], "ps_server.server"),
    "large_model.py": (["--seconds", "0.2", "--iterations", "100000", "--skip-psctl", "--skip-momentum"],
                       "ps_server.server"),
    "straggler.py": (["--quick", "--epochs", "100000", "--no-json", "--png", "/dev/null"], "ps_server.server"),
    "tables.py": (["--part", "size", "--rows", "100000", "--reps", "1", "--size-iters", "100000"], "ps_server.server"),
    "push_memory.py": (["--seconds", "600"], "ps_server.server"),
    "staleness.py": (["--workers", "2", "--patterns", "none", "--pushes", "10000000", "--json", "/dev/null"],
                     "ps_server.server"),
    "throughput.py": (["--quick", "--models", "mlp-5.8M", "--reps", "100"], "ps_server.server"),
    "grpc_ceiling.py": (["--reps", "100"], "--role\0server"),
    "grpc_round_trips.py": ([], "grpc_round_trips"),
    "compression.py": (["--skip-network", "--digits", "1000000"], "ps_server.server"),  # (psctl launch --local)
}


@contextlib.contextmanager
def _long_run(script: str, tag: str) -> Iterator[subprocess.Popen[bytes]]:
    """``script`` with its _LONG_RUNS arguments, once the child that shows it is under way runs;
    after: it, and whatever it started that is still there, killed."""
    args, pattern = _LONG_RUNS[script]
    bench = subprocess.Popen([sys.executable, str(BENCH / script), *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "BENCH_TEST_TAG": tag})
    try:
        deadline = time.monotonic() + 100
        while not [p for p in _tagged(tag) if pattern in _cmdline(Path(f"/proc/{p}"))] and time.monotonic() < deadline:
            assert bench.poll() is None, f"{script} ended ({bench.returncode}) before it started a server"
            time.sleep(0.2)
        time.sleep(2.0)
        assert bench.poll() is None, f"{script} ended ({bench.returncode})"
        assert len(_tagged(tag)) > 1
        yield bench
    finally:
        bench.kill()
        bench.wait()
        for pid in _tagged(tag):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("script", sorted(_LONG_RUNS))
def test_a_bench_stopped_by_sigterm_leaves_no_process(script: str) -> None:
    """SIGTERM (a timeout's, a CI job cancelled) unwinds as Ctrl-C does: the servers (and the
    workers) a bench started are stopped, not left running on their ports."""
    tag = f"term-{script}-{os.getpid()}"
    with _long_run(script, tag) as bench:
        bench.terminate()
        assert bench.wait(90) == 143, "SIGTERM did not unwind the bench (its finally blocks did not run)"
        time.sleep(0.5)
        left = _tagged(tag)
        assert left == [], [_cmdline(Path(f"/proc/{p}")) for p in left]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("script", sorted(_LONG_RUNS))
def test_a_bench_killed_by_sigkill_leaves_no_process(script: str) -> None:
    """SIGKILL (an OOM kill, a runner's hard timeout) runs no finally block: the servers and workers
    a bench started stop by themselves when it dies (paramserver.runtime.exit_with_parent), within
    their own graceful stop, instead of running on for ever."""
    tag = f"kill-{script}-{os.getpid()}"
    with _long_run(script, tag) as bench:
        bench.kill()
        bench.wait(30)
        deadline = time.monotonic() + 30
        while (left := _tagged(tag)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert left == [], [_cmdline(Path(f"/proc/{p}")) for p in left]


# The quickest settings of each bench not run above, and what its output must hold: a refactoring
# that breaks one at run time (not only at import) fails here.
_QUICK_RUNS = {
    "large_model.py": (["--iterations", "40", "--seconds", "0.2", "--skip-momentum", "--skip-psctl"],
                       ["ratio vs compute-only W=4 (4 processes; target >= 75%)", "server VmHWM sgd"]),
    "throughput.py": (["--quick", "--models", "mlp-5.8M", "--reps", "1", "--seconds", "0.2", "--malloc", "off",
                       "--inproc", "no", "--transport", "tcp"], ["| subprocess | off | tcp | mlp-5.8M |", "of raw TCP"]),
    "straggler.py": (["--quick", "--epochs", "2", "--only", "s=1", "--no-json", "--png", "{tmp}/straggler.png"],
                     ["| s=1 |", "plot: "]),
    "compression.py": (["--cpu-only", "--modes", "none,fp16,topk:0.01"], ["mlp:512 (38k)        topk:0.01: push"]),
    "push_memory.py": (["--clients", "1", "--seconds", "1"], ["after the clients: VmHWM"]),
    "grpc_ceiling.py": (["--quick", "--reps", "1"], ["| proto |", "| wire |", "| bytes |", "| raw TCP | "]),
    "grpc_round_trips.py": (["--clients", "1", "--seconds", "0.5"], ["round trips/s", "CPU per round trip: server"]),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", sorted(_QUICK_RUNS))
def test_bench_runs_with_its_quickest_settings(script: str, tmp_path: Path) -> None:
    args, expected = _QUICK_RUNS[script]
    tag = f"quick-{script}-{os.getpid()}"
    try:
        proc = subprocess.run([sys.executable, str(BENCH / script), *(a.format(tmp=tmp_path) for a in args)],
                              capture_output=True, text=True, timeout=280, env={**os.environ, "BENCH_TEST_TAG": tag})
        assert proc.returncode == 0, proc.stderr[-3000:]
        for text in expected:
            assert text in proc.stdout, proc.stdout[-3000:]
        assert _tagged(tag) == []  # nothing left running
    finally:
        for pid in _tagged(tag):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("argv", [["straggler.py", "--only", "s=2"], ["large_model.py", "--staleness", "foo"],
                                  ["large_model.py", "--iterations", "0", "--seconds", "0.1"],
                                  ["small_model.py", "--repeats", "0"]],
                         ids=["straggler-only-unknown", "large-model-staleness", "large-model-no-iterations",
                              "small-model-no-repeats"])
def test_a_bench_refuses_a_bad_flag_clearly(argv: list[str]) -> None:
    """A flag that would make a bench measure nothing, or something else than asked, is a usage error."""
    tag = f"flag-{os.getpid()}"
    try:
        proc = subprocess.run([sys.executable, str(BENCH / argv[0]), *argv[1:]], capture_output=True, text=True,
                              timeout=100, env={**os.environ, "BENCH_TEST_TAG": tag})
        assert proc.returncode == 2 and "usage:" in proc.stderr and "Traceback" not in proc.stderr, \
            (proc.returncode, proc.stdout[-1000:], proc.stderr[-2000:])
    finally:
        for pid in _tagged(tag):
            os.kill(pid, signal.SIGKILL)
