"""Time-to-accuracy with one straggler, for staleness s = 0, 1, 3 and unbounded.

    .venv/bin/python bench/straggler.py               # 3 repeats of every setting, a few minutes
    .venv/bin/python bench/straggler.py --quick       # 1 repeat, under a minute
    .venv/bin/python bench/straggler.py --repeats 5

The experiment behind the claim "SSP converges faster in wall-clock time than both BSP and fully
asynchronous training when workers are uneven" (Ho et al., NIPS 2013): an MLP with one hidden
layer of 64 on digits, 4 workers, rank 3 made 3x slower (``slowdown=((3, 3.0),)``: after each
iteration it sleeps twice the time that iteration took), plain SGD with the same learning rate,
batch size and number of iterations for every setting. Settings:

* ``s=0 (BSP, mean)``: the server waits for the 4 gradients of a clock and applies their mean
  once: one step of lr per clock (large-batch SGD, batch 4 x 32).
* ``s=0 (BSP, sum)``: the extra, labelled row: aggregation "sum", i.e. one step of 4 x lr on the
  mean gradient per clock. It moves the parameters as far per clock as the s > 0 settings do
  (they apply every push as its own step of lr), so it separates "waiting for the straggler"
  from "4x fewer optimizer steps".
* ``s=1``, ``s=3``: SSP, every push applied on arrival, worker caches on.
* ``s=inf``: fully asynchronous (ASP); workers pull every iteration and never wait.

Processes: one ``ps-server`` (``python -m ps_server.server --port 0 --lease-seconds 120``) and four
generic ``ps-worker`` processes (no ``--once``) for the whole benchmark: every run is taken by the
same four processes (whichever takes rank 3 is the straggler for that run), so no run pays for
process start-up. Each worker loads the dataset before it joins (``PRELUDE``). This process creates
each run, follows it with ``PsClient.watch_run``, and reads its history with ``GetMetrics``
(``include_clock_records``). Settings are interleaved within each repeat, so a noisy neighbour
hurts all of them. A run in which a rank was evicted or pushes are missing is discarded and run
again (reported).

Measured per run:

* time to 0.95: wall time from ``Run.started`` (the server's timestamp when the 4th rank joined)
  to the first rank-0 eval point (``MetricPoint.time``) with test accuracy >= 0.95. Rank 0
  evaluates on the test split every ``--eval-every`` of its own iterations.
* the same from an observer: this process reads the parameters every ``--observe-every``
  seconds (a ``PullParams`` with incarnation 0, which never waits) and evaluates them itself. It
  samples every setting at the same wall-clock rate, including the part of an ASP run where rank
  0 has finished its iterations and only the straggler is still pushing (rank 0's last eval
  before its final one is then long before the end).
* final test accuracy (rank 0's evaluation of the final parameters), total wall time
  (``Run.finished - Run.started``).
* staleness of served pulls: ``RunCounters.staleness_sum / pulls_served`` (observer reads are
  subtracted from ``pulls_served``: they count as served but add no staleness) and
  ``staleness_max``; and from the clock records, ``clock - min_clock`` of every served worker
  pull, overall and for the fast ranks / the straggler.
* pulls skipped by the worker caches (``RunCounters.pulls_skipped``).

The table shows medians over repeats; ``bench/straggler.png`` draws test accuracy and loss
against wall time (the run with the median time to 0.95 of each setting in full, the other
repeats faint) and test accuracy against the number of gradients the server had accepted.
Raw numbers go to ``bench/straggler.json``. Runs with ``--quick``, ``--only`` or ``--repeats``
write to ``bench/out/`` instead (not committed), unless ``--png`` / ``--json`` say otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from client.spec import (  # noqa: E402
    LaunchOptions,
    build_run_spec,
    parse_staleness,  # noqa: E402
)
from paramserver.client import PsClient  # noqa: E402
from paramserver.runtime import child_env, exit_with_parent  # noqa: E402
from paramserver.v1 import paramserver_pb2 as pb  # noqa: E402
from worker.datasets import load_dataset  # noqa: E402
from worker.models import build_model  # noqa: E402

ENV = child_env({**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})  # children stop if this process dies
TARGET = 0.95
# Each worker is started through this prelude, which loads the dataset (importing scikit-learn)
# *before* it first joins: ps-worker loads its data after Join, and on this loaded machine that took
# 5-30 s, all of it after Run.started (the 4th join) and none of it about SSP. The load is memoised
# per process, so the worker's own setup finds it ready. Otherwise this is ``ps-worker``.
PRELUDE = (
    "import json, os, runpy, sys; from worker.datasets import load_dataset; "
    "load_dataset(json.loads(os.environ['STRAGGLER_DATA_SPEC'])); "
    "runpy.run_module('worker.main', run_name='__main__', alter_sys=True)"
)
SLOW_RANK, SLOW_FACTOR = 3, 3.0


@dataclass(frozen=True)
class Setting:
    label: str
    staleness: str
    aggregation: str = "mean"
    color: str = "k"


SETTINGS = (
    Setting("s=0 (BSP, mean)", "0", "mean", "tab:red"),
    Setting("s=0 (BSP, sum = 4x lr)", "0", "sum", "tab:orange"),
    Setting("s=1", "1", "mean", "tab:green"),
    Setting("s=3", "3", "mean", "tab:blue"),
    Setting("s=inf (ASP)", "inf", "mean", "tab:purple"),
)


class InvalidRun(Exception):
    """A run that completed but not as the experiment needs (a rank evicted, pushes missing)."""


def ts(t: Any) -> float:
    return float(t.seconds) + float(t.nanos) * 1e-9


# ================================================================================= one run
async def observe(client: PsClient, run_id: str, model: Any, data: Any, every: float,
                  out: list[tuple[float, int, float, float]], reads: list[int], stop: asyncio.Event) -> None:
    """Read the parameters every ``every`` seconds and evaluate them: (time, version, acc, loss).

    ``reads[0]`` counts every read (the server counts them all in ``pulls_served``).
    """
    params: dict[str, Any] = {}
    while not stop.is_set():
        res = await client.pull(run_id, into=params)  # incarnation 0: an observer's read, no wait
        reads[0] += 1
        if res.run_state == pb.RUN_STATE_RUNNING:
            ev = model.evaluate(params, data.X_test, data.y_test)
            out.append((time.time(), res.version, float(ev.accuracy), float(ev.loss)))
        elif res.run_state != pb.RUN_STATE_PENDING:
            return
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


async def one_run(addr: str, setting: Setting, o: LaunchOptions, observe_every: float, rep: int) -> dict[str, Any]:
    opts = LaunchOptions(**{**o.__dict__, "staleness": parse_staleness(setting.staleness), "aggregation": setting.aggregation,
                            "name": f"straggler {setting.label} #{rep}"})
    spec = build_run_spec(opts)
    data = load_dataset(json.loads(spec.data_spec_json))
    model = build_model(json.loads(spec.model_spec_json), data.n_features, data.n_outputs)
    async with PsClient(addr, timeout=30) as c:
        run = await c.create_run(spec)
        obs: list[tuple[float, int, float, float]] = []
        reads = [0]
        stop = asyncio.Event()
        load_before = os.getloadavg()[0]
        obs_task = asyncio.create_task(observe(c, run.run_id, model, data, observe_every, obs, reads, stop))
        try:
            async with asyncio.timeout(600):
                async for snap in c.watch_run(run.run_id, interval=0.25):
                    final = snap.run
        finally:
            stop.set()
            await obs_task
        load_after = os.getloadavg()[0]
        final = await c.get_run(run.run_id)
        metrics = await c.get_metrics(run.run_id, include_clock_records=True)
    if final.state != pb.RUN_STATE_COMPLETED:
        raise RuntimeError(f"{setting.label}: run ended {pb.RunState.Name(final.state)}: {final.message}")
    if final.counters.evictions or final.counters.pushes_applied != o.workers * spec.iterations:
        raise InvalidRun(f"{setting.label} #{rep}: {final.counters.evictions} evictions, "
                         f"{final.counters.pushes_applied} pushes of {o.workers * spec.iterations}")
    started, finished = ts(final.started), ts(final.finished)
    evals = sorted(((ts(p.time) - started, p.clock, p.eval_accuracy, p.eval_loss)
                    for p in metrics.points if p.eval and p.rank == 0), key=lambda e: e[0])
    push_recs = [r for r in metrics.clock_records if r.kind == pb.ClockRecord.KIND_PUSH]
    pushes = sorted(ts(r.time) - started for r in push_recs)
    slow_pushes = sorted(ts(r.time) - started for r in push_recs if r.rank == SLOW_RANK)
    fast_done = max((ts(r.time) - started for r in push_recs if r.rank != SLOW_RANK), default=0.0)
    pulls = [r for r in metrics.clock_records if r.kind == pb.ClockRecord.KIND_PULL]
    lag = [int(r.clock) - int(r.min_clock) for r in pulls]
    # When each rank was served its first pull (it is set up and training), relative to Run.started.
    first_pull = {r.rank: ts(r.time) - started for r in reversed(pulls) if r.clock == 0}
    lag_fast = [int(r.clock) - int(r.min_clock) for r in pulls if r.rank != SLOW_RANK]
    lag_slow = [int(r.clock) - int(r.min_clock) for r in pulls if r.rank == SLOW_RANK]
    cn = final.counters
    worker_pulls = cn.pulls_served - reads[0]
    hit = next((e for e in evals if e[2] >= TARGET), None)
    obs_rel = [(t - started, v, a, lo) for t, v, a, lo in obs]
    obs_hit = next((e for e in obs_rel if e[2] >= TARGET), None)
    # Gradients the server had accepted when each eval was taken (pushes, whatever the staleness).
    evals_g = [(e[0], sum(1 for p in pushes if p <= e[0]), e[2]) for e in evals]
    # ... and how many iterations the straggler had completed: wall time in straggler iterations.
    evals_s = [(e[0], sum(1 for p in slow_pushes if p <= e[0]), e[2]) for e in evals]
    return {
        "setting": setting.label, "repeat": rep, "run_id": run.run_id, "iterations": spec.iterations,
        "time_to_target": hit[0] if hit else None, "clock_at_target": hit[1] if hit else None,
        # Load-independent views of the same moment: how far the straggler had got, and how many
        # gradients the server had accepted, when rank 0 first saw >= TARGET.
        "slow_clock_at_target": sum(1 for p in slow_pushes if p <= hit[0]) if hit else None,
        "gradients_at_target": sum(1 for p in pushes if p <= hit[0]) if hit else None,
        "straggler_iter_seconds": (slow_pushes[-1] / len(slow_pushes)) if slow_pushes else 0.0,
        "fast_ranks_done": fast_done,
        "first_pull_first": min(first_pull.values(), default=0.0),
        "first_pull_last": max(first_pull.values(), default=0.0), "load1_before": load_before, "load1_after": load_after,
        "obs_time_to_target": obs_hit[0] if obs_hit else None,
        "final_accuracy": final.last_eval.eval_accuracy, "final_loss": final.last_eval.eval_loss,
        "total_wall": finished - started,
        "stale_mean_counter": cn.staleness_sum / worker_pulls if worker_pulls else 0.0,
        "stale_max_counter": int(cn.staleness_max),
        "stale_mean_records": statistics.fmean(lag) if lag else 0.0,
        "stale_max_records": max(lag, default=0),
        "stale_mean_fast": statistics.fmean(lag_fast) if lag_fast else 0.0,
        "stale_mean_slow": statistics.fmean(lag_slow) if lag_slow else 0.0,
        "pull_records": len(pulls), "worker_pulls_served": worker_pulls,
        "pulls_skipped": int(cn.pulls_skipped), "pushes_applied": int(cn.pushes_applied),
        "updates_applied": int(cn.updates_applied), "pulls_parked": int(cn.pulls_parked),
        "observer_reads": reads[0],
        "evals": evals, "evals_vs_gradients": evals_g, "evals_vs_straggler_clock": evals_s, "observer": obs_rel,
    }


# ================================================================================= orchestration
def start_server(*args: str) -> tuple[subprocess.Popen[str], str]:
    """A ps-server (``args``: more of its flags) and the address it says it listens on."""
    # A long lease, belt and braces: up to commit 218c362 a worker sent no RPC between Join and the
    # end of its setup (the digits load imports scikit-learn), and on this loaded 2-core machine
    # that exceeded the default 10 s lease: healthy workers were evicted before they started
    # (d62f896 starts heartbeats first). No eviction is expected in this benchmark.
    proc = subprocess.Popen([sys.executable, "-m", "ps_server.server", "--port", "0", "--log-level", "WARNING",
                             "--lease-seconds", "120", *args],
                            stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on ([\d.]+):(\d+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"ps-server did not start: {line!r}")
    return proc, f"{match.group(1)}:{match.group(2)}"


def start_workers(addr: str, n: int, data_spec_json: str, log_dir: str) -> list[subprocess.Popen[bytes]]:
    """n generic ps-workers (no --once): each run of the benchmark is taken by the same processes."""
    procs = []
    for i in range(n):
        log = open(Path(log_dir) / f"worker{i}.log", "w") if log_dir else subprocess.DEVNULL  # noqa: SIM115
        procs.append(subprocess.Popen(
            [sys.executable, "-c", PRELUDE, "--server", addr, "--log-level", "INFO" if log_dir else "WARNING",
             "--name", f"straggler-bench-{i}"],
            env={**ENV, "STRAGGLER_DATA_SPEC": data_spec_json}, cwd=ROOT, stdout=log,
            stderr=log if log_dir else None))
    return procs


def stop_procs(procs: list[subprocess.Popen[Any]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def median_or_none(xs: list[float | None]) -> float | None:
    """Median where a missing value (target not reached) counts as +inf."""
    vals = sorted(math.inf if x is None else x for x in xs)
    m = statistics.median(vals)
    return None if math.isinf(m) else m


def fmt_t(x: float | None, n_missing: int, n: int) -> str:
    s = "not reached" if x is None else f"{x:.2f} s"
    return s + (f" ({n - n_missing}/{n} reached)" if n_missing else "")


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for st in SETTINGS:
        rs = [r for r in results if r["setting"] == st.label]
        if not rs:
            continue
        med = {k: statistics.median(r[k] for r in rs) for k in (
            "final_accuracy", "final_loss", "total_wall", "stale_mean_counter", "stale_max_counter",
            "stale_mean_records", "stale_max_records", "stale_mean_fast", "stale_mean_slow", "pulls_skipped",
            "pushes_applied", "updates_applied", "worker_pulls_served", "fast_ranks_done", "straggler_iter_seconds",
            "load1_before", "load1_after", "first_pull_first", "first_pull_last")}
        rows.append({
            "setting": st.label, "n": len(rs),
            "time_to_target": median_or_none([r["time_to_target"] for r in rs]),
            "missing": sum(r["time_to_target"] is None for r in rs),
            "obs_time_to_target": median_or_none([r["obs_time_to_target"] for r in rs]),
            "obs_missing": sum(r["obs_time_to_target"] is None for r in rs),
            "clock_at_target": median_or_none([r["clock_at_target"] for r in rs]),
            "slow_clock_at_target": median_or_none([r["slow_clock_at_target"] for r in rs]),
            "gradients_at_target": median_or_none([r["gradients_at_target"] for r in rs]),
            "all_times": [r["time_to_target"] for r in rs],
            **med,
        })
    return rows


def spread(xs: list[float | None]) -> str:
    got = [x for x in xs if x is not None]
    return f" [{min(got):.1f}-{max(got):.1f}]" if len(got) > 1 else ""


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def num(x: float | None, f: str = ".0f") -> str:
        return "-" if x is None else format(x, f)

    t1 = ["| setting | time to 0.95, rank-0 evals: median [min-max] | time to 0.95, observer | "
          "straggler's clock at 0.95 | gradients accepted at 0.95 | rank-0 clock at 0.95 | final test acc | "
          "total wall | fast ranks done at | straggler s/iteration |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    t2 = ["| setting | staleness mean / max (counters) | staleness mean / max (clock records) | "
          "mean staleness: fast ranks / straggler | worker pulls served | pulls skipped by caches | "
          "optimizer steps | first pull served, first / last rank | load avg 1 min (before / after) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r["n"]
        t1.append(
            f"| {r['setting']} | {fmt_t(r['time_to_target'], r['missing'], n)}{spread(r['all_times'])} | "
            f"{fmt_t(r['obs_time_to_target'], r['obs_missing'], n)} | {num(r['slow_clock_at_target'])} | "
            f"{num(r['gradients_at_target'])} | {num(r['clock_at_target'])} | {r['final_accuracy']:.4f} | "
            f"{r['total_wall']:.2f} s | {r['fast_ranks_done']:.2f} s | {r['straggler_iter_seconds'] * 1000:.1f} ms |"
        )
        t2.append(
            f"| {r['setting']} | {r['stale_mean_counter']:.2f} / {r['stale_max_counter']:.0f} | "
            f"{r['stale_mean_records']:.2f} / {r['stale_max_records']:.0f} | "
            f"{r['stale_mean_fast']:.2f} / {r['stale_mean_slow']:.2f} | {r['worker_pulls_served']:.0f} | "
            f"{r['pulls_skipped']:.0f} | {r['updates_applied']:.0f} | "
            f"{r['first_pull_first']:.2f} s / {r['first_pull_last']:.2f} s | "
            f"{r['load1_before']:.1f} / {r['load1_after']:.1f} |"
        )
    return "\n".join(t1) + "\n\n" + "\n".join(t2)


def plot(results: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    (ax_acc, ax_loss), (ax_s, ax_g) = axes
    for st in SETTINGS:
        rs = [r for r in results if r["setting"] == st.label]
        if not rs:
            continue
        # The repeat whose time to target is the median one is drawn in full, the others faint.
        key = [math.inf if r["time_to_target"] is None else r["time_to_target"] for r in rs]
        order = sorted(range(len(rs)), key=lambda i: key[i])
        main = order[len(order) // 2]
        for i, r in enumerate(rs):
            t = [e[0] for e in r["evals"]]
            kw: dict[str, Any] = {"color": st.color, "lw": 1.8 if i == main else 0.7,
                                  "alpha": 1.0 if i == main else 0.3,
                                  "label": st.label if i == main else None}
            ax_acc.plot(t, [e[2] for e in r["evals"]], **kw)
            ax_loss.plot(t, [e[3] for e in r["evals"]], **kw)
            ax_g.plot([e[1] for e in r["evals_vs_gradients"]], [e[2] for e in r["evals_vs_gradients"]], **kw)
            ax_s.plot([e[1] for e in r["evals_vs_straggler_clock"]], [e[2] for e in r["evals_vs_straggler_clock"]],
                      **kw)
            if i == main and r["observer"]:
                ot = [e[0] for e in r["observer"]]
                okw: dict[str, Any] = {"color": st.color, "lw": 0.9, "ls": "--", "alpha": 0.7}
                ax_acc.plot(ot, [e[2] for e in r["observer"]], **okw)
                ax_loss.plot(ot, [e[3] for e in r["observer"]], **okw)
            if i == main:
                if r["time_to_target"] is not None:
                    ax_acc.axvline(r["time_to_target"], color=st.color, ls=":", lw=1)
                ax_acc.plot([r["total_wall"]], [r["final_accuracy"]], "o", color=st.color, ms=5)
                ax_loss.plot([r["total_wall"]], [r["final_loss"]], "o", color=st.color, ms=5)
    for ax in (ax_acc, ax_g, ax_s):
        ax.axhline(TARGET, color="gray", ls="--", lw=1)
        ax.set_ylim(0.8, 1.0)
        ax.set_ylabel("test accuracy (rank-0 evals)")
    ax_acc.set_xlabel("wall time since run start [s] (log scale)")
    ax_acc.set_xscale("log")
    ax_acc.set_title("test accuracy vs wall time (solid: rank-0 evals, dashed: observer reads)\n"
                     "dotted: first rank-0 eval >= 0.95; dot: final eval", fontsize=10)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("wall time since run start [s] (log scale)")
    ax_loss.set_xscale("log")
    ax_loss.set_ylabel("test loss (rank-0 evals)")
    ax_loss.set_title("test loss vs wall time\n(solid: rank-0 evals, dashed: observer reads)", fontsize=10)
    ax_g.set_xlabel("gradients (pushes) accepted by the server")
    ax_g.set_title("test accuracy vs gradients accepted: statistical efficiency\n"
                   "(how much each gradient is worth, whatever the waiting)", fontsize=10)
    ax_s.set_xlabel("iterations the straggler (rank 3) had completed")
    ax_s.set_title("test accuracy vs the straggler's progress: wall time in straggler iterations\n"
                   "(insensitive to how loaded the machine was during each run)", fontsize=10)
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3, which="both")
        ax.set_xlim(0.05, None)
    for ax in (ax_g, ax_s):
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
    ax_acc.legend(loc="lower right", fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rounded(x: Any) -> Any:
    """Floats to 5 significant digits, for a compact raw-results file."""
    if isinstance(x, float):
        return float(f"{x:.5g}")
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [rounded(v) for v in x]
    return x


def machine() -> dict[str, str]:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "python": platform.python_version(), "commit": commit,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


async def main_async(args: argparse.Namespace) -> int:
    repeats = args.repeats or (1 if args.quick else 3)
    base = LaunchOptions(model="mlp:64", dataset="digits", workers=4, optimizer="sgd", lr=args.lr,
                         epochs=args.epochs, batch_size=32, seed=args.seed, eval_every=args.eval_every,
                         slowdown=((SLOW_RANK, SLOW_FACTOR),))
    spec = build_run_spec(base)
    settings = [s for s in SETTINGS if not args.only or s.label in args.only]
    print(f"{len(settings)} settings x {repeats} repeats; {spec.iterations} iterations per rank, lr {args.lr}, "
          f"batch 32, eval every {spec.eval_every} (rank 0)", flush=True)
    if args.log_dir:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    server, addr = start_server()
    workers: list[subprocess.Popen[bytes]] = []
    results: list[dict[str, Any]] = []
    invalid: list[str] = []
    t_all = time.perf_counter()
    try:
        workers += start_workers(addr, base.workers, spec.data_spec_json, args.log_dir)
        for rep in range(repeats):
            for st in settings:
                for _attempt in range(3):
                    try:
                        r = await one_run(addr, st, base, args.observe_every, rep)
                        break
                    except InvalidRun as exc:
                        print(f"  discarded, run again: {exc}", flush=True)
                        invalid.append(str(exc))
                else:
                    raise RuntimeError(f"{st.label}: three invalid runs in a row")
                results.append(r)
                tt = "not reached" if r["time_to_target"] is None else f"{r['time_to_target']:.2f}s"
                print(f"  #{rep} {st.label:24s} to {TARGET}: {tt:>11s}  final {r['final_accuracy']:.4f}  "
                      f"wall {r['total_wall']:.2f}s  staleness mean {r['stale_mean_records']:.2f} "
                      f"max {r['stale_max_records']}  skipped {r['pulls_skipped']}", flush=True)
    finally:
        stop_procs(workers)
        stop_procs([server])
    rows = summarise(results)
    info = machine()
    print(f"\nall runs: {time.perf_counter() - t_all:.0f} s; discarded runs: {len(invalid)}\n")
    print(markdown_table(rows))
    # Only a full run replaces the committed figure; quick or partial runs go to bench/out/.
    out_dir = ROOT / "bench" if not (args.quick or args.only or args.repeats) else ROOT / "bench" / "out"
    out_dir.mkdir(exist_ok=True)
    png = Path(args.png) if args.png else out_dir / "straggler.png"
    title = (f"digits, mlp:64, 4 workers, rank {SLOW_RANK} {SLOW_FACTOR:g}x slower, SGD lr {args.lr}, batch 32, "
             f"{spec.iterations} iterations/rank; {repeats} repeat(s) ({info['nproc']} cores, {info['date']})")
    plot(results, rows, png, title)
    print(f"\nplot: {png}")
    if not args.no_json:
        js = Path(args.json) if args.json else out_dir / "straggler.json"
        js.write_text(json.dumps(rounded({"machine": info, "argv": sys.argv, "iterations": spec.iterations,
                                          "eval_every": spec.eval_every, "rows": rows, "runs": results,
                                          "discarded": invalid})))
        print(f"raw: {js}")
    print(json.dumps(info))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repeat instead of 3")
    ap.add_argument("--repeats", type=int, default=0, help="repeats of every setting (default 3, --quick 1)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--epochs", type=float, default=20.0)
    ap.add_argument("--eval-every", type=int, default=2, help="rank-0 eval interval in iterations")
    ap.add_argument("--observe-every", type=float, default=0.05, help="observer eval interval in seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="only these setting labels")
    ap.add_argument("--png", default="")
    ap.add_argument("--json", default="")
    ap.add_argument("--no-json", action="store_true")
    ap.add_argument("--log-dir", default="", help="keep each worker's INFO log here")
    args = ap.parse_args()
    if unknown := sorted(set(args.only or ()) - {s.label for s in SETTINGS}):
        ap.error(f"--only: no setting labelled {unknown}; the labels: {[s.label for s in SETTINGS]}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM (a timeout) unwinds as Ctrl-C: the finally blocks stop what was started
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    exit_with_parent()  # started by another bench: not to outlive it
    sys.exit(main())
