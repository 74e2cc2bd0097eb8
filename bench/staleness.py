"""When does bounded staleness pay? The SSP paper's experiment (Ho et al., NIPS 2013) at 4-32 workers.

    .venv/bin/python bench/staleness.py                       # the grid below, 1 repeat
    .venv/bin/python bench/staleness.py --repeats 2 --workers 4,8 --patterns none,straggler
    .venv/bin/python bench/staleness.py --workload mlp        # the digits MLP instead of MF

Workloads (``--workload``):

* ``mf``: matrix factorisation (``mf:3``, worker/models/mf.py) of ``synthetic-ratings`` with 300
  users, 300 items, planted rank 3, 30% of the cells observed, noise 0.1 (worker/ratings.py: the
  best reachable test RMSE is ~0.10); user and item factors are tables pulled and pushed by row.
  Plain SGD, lr 1.0, batch 32 ratings. Target: test RMSE <= 0.3.
* ``mlp``: the digits MLP (``mlp:64``), SGD lr 0.1, batch 32. Target: test accuracy >= 0.95.

Every run makes the same number of pushes in total (``--pushes``, split evenly over the ranks), so
settings and cluster sizes compare at equal work. Step-time patterns (``--patterns``), on top of the
real computation, seeded by the run's seed (the repeat) and the rank:

* ``none``;
* ``straggler``: the last rank persistently 3x slower (``RunSpec.slowdown``: after each iteration
  it sleeps twice that iteration's work);
* ``tail``: every rank's iteration is 10x as long with probability 0.05 (``ps-worker --tail-delay
  0.05:10``), as on a shared cluster.

``--step-seconds S`` gives every worker a slower machine of its own (``ps-worker --step-seconds``:
an iteration's work is at least S seconds, the patterns multiply that): the processes then mostly
sleep and no longer contend for this machine's cores, as workers on hosts of their own would not
(``bench/simulate_check.py`` validates ``psctl simulate`` in that regime too).

Settings (``--settings``, default all): staleness 0 (BSP) with aggregation "sum" (``s=0``:
Petuum's additive updates, a clock moves the parameters as far as W pushes of SSP do) and "mean"
(``s=0 mean``: large-batch SGD, one step of lr per clock), 1, 2, 4, 8 and unbounded, and with the
staleness-aware learning rate (``RunSpec.staleness_aware_lr``: each push's step divided by its
staleness) at 8 and unbounded. Processes: one ps-server, and per (workers, pattern) group W generic ps-workers that take
every run of the group (no start-up inside a run); settings are interleaved within each repeat.

Measured per run, from the server's records: time and rank-0 clock from ``Run.started`` to the first
rank-0 evaluation at the target; the final objective (rank 0's evaluation of the final
parameters); wall time; the mean staleness of served pulls; the CPU time the workers used over
the run's wall time and cores (each worker's share of the machine). Raw results and the clock
records of every run (for ``psctl simulate``'s validation, ``--traces``) go to ``bench/out/``;
``bench/staleness.png`` is the heat map of the winner per (workers, pattern).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "protos"), str(ROOT / "bench")]

from straggler import ENV, PRELUDE, machine, rounded, start_server, stop_procs, ts  # noqa: E402

from client.spec import LaunchOptions, build_run_spec  # noqa: E402
from paramserver.client import PsClient  # noqa: E402
from paramserver.runtime import exit_with_parent  # noqa: E402
from paramserver.v1 import paramserver_pb2 as pb  # noqa: E402

WORKLOADS: dict[str, dict[str, Any]] = {
    "mf": {"model": "mf:3", "dataset": "synthetic-ratings:users=300,items=300,rank=3,density=0.3,noise=0.1",
           "lr": 1.0, "target": 0.3, "objective": "test RMSE", "lower_is_better": True},
    "mlp": {"model": "mlp:64", "dataset": "digits", "lr": 0.1, "target": 0.95, "objective": "test accuracy",
            "lower_is_better": False},
}
SETTINGS = [("0", False), ("0 mean", False), ("1", False), ("2", False), ("4", False), ("8", False),
            ("inf", False), ("8", True), ("inf", True)]
"""(staleness, staleness-aware lr); "0" is BSP with aggregation sum, "0 mean" with mean."""
TAIL = "0.05:10"
SLOW_FACTOR = 3.0


def label(s: str, salr: bool) -> str:
    return f"s={s}" + (" +salr" if salr else "")


def objective(p: pb.MetricPoint, workload: str) -> float:
    return p.eval_loss if workload == "mf" else p.eval_accuracy


def reached(value: float, w: dict[str, Any]) -> bool:
    return value <= w["target"] if w["lower_is_better"] else value >= w["target"]


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError):
            pass
    return total


async def one_run(addr: str, o: LaunchOptions, workload: str, pids: list[int], traces: Path) -> dict[str, Any]:
    w = WORKLOADS[workload]
    spec = build_run_spec(o)
    cpu0, t0 = cpu_seconds(pids), time.time()
    async with PsClient(addr, timeout=30) as c:
        run = await c.create_run(spec)
        async with asyncio.timeout(900):
            async for _ in c.watch_run(run.run_id, interval=0.5):
                pass
        final = await c.get_run(run.run_id)
        metrics = await c.get_metrics(run.run_id, include_clock_records=True)
    cpu = cpu_seconds(pids) - cpu0
    wall = time.time() - t0
    started = ts(final.started)
    evals = sorted(((ts(p.time) - started, int(p.clock), objective(p, workload))
                    for p in metrics.points if p.eval and p.rank == 0), key=lambda e: (e[1], e[0]))
    hit = next((e for e in evals if reached(e[2], w)), None)
    records = [(1 if r.kind == pb.ClockRecord.KIND_PULL else 2, int(r.rank), int(r.clock), round(ts(r.time) - started, 6))
               for r in metrics.clock_records]
    pulls = [r for r in metrics.clock_records if r.kind == pb.ClockRecord.KIND_PULL]
    trace = traces / f"{run.run_id}.json"
    trace.write_text(json.dumps({"run_id": run.run_id, "workers": o.workers, "iterations": spec.iterations,
                                 "staleness": o.staleness, "records": records}))
    state = pb.RunState.Name(final.state).removeprefix("RUN_STATE_").lower()
    return {
        "run_id": run.run_id, "state": state, "message": final.message if state != "completed" else "",
        "time_to_target": hit[0] if hit else None, "clock_to_target": hit[1] if hit else None,
        "final": objective(final.last_eval, workload) if final.last_eval.eval else None,
        "wall": (ts(final.finished) - started) if final.finished.seconds else None,
        "stale_mean": statistics.fmean(int(r.clock) - int(r.min_clock) for r in pulls) if pulls else 0.0,
        "stale_max": max((int(r.clock) - int(r.min_clock) for r in pulls), default=0),
        "pushes": int(final.counters.pushes_applied), "evictions": int(final.counters.evictions),
        "worker_cpu_share": cpu / wall / (os.cpu_count() or 1) / max(1, o.workers),
        "evals": evals, "trace": str(trace.relative_to(ROOT)),
    }


def worker_flags(pattern: str, step_seconds: float = 0.0) -> list[str]:
    return (["--tail-delay", TAIL] if pattern == "tail" else []) + \
        (["--step-seconds", f"{step_seconds:g}"] if step_seconds else [])


def start_fleet(addr: str, n: int, data_spec_json: str, pattern: str, step_seconds: float = 0.0) -> list[Any]:
    import subprocess

    extra = worker_flags(pattern, step_seconds)
    return [subprocess.Popen([sys.executable, "-c", PRELUDE, "--server", addr, "--log-level", "WARNING",
                              "--name", f"staleness-bench-{i}", "--timeout-seconds", "120", *extra],
                             env={**ENV, "STRAGGLER_DATA_SPEC": data_spec_json}, cwd=ROOT)
            for i in range(n)]


def options(workload: str, workers: int, pattern: str, s: str, salr: bool, pushes: int, rep: int) -> LaunchOptions:
    w = WORKLOADS[workload]
    iterations = max(1, pushes // workers)
    return LaunchOptions(model=w["model"], dataset=w["dataset"], workers=workers, optimizer="sgd", lr=w["lr"],
                         iterations=iterations, batch_size=32, seed=rep, eval_every=max(1, iterations // 40),
                         staleness=-1 if s == "inf" else int(s.split()[0]), aggregation="sum" if s == "0" else "mean",
                         slowdown=((workers - 1, SLOW_FACTOR),) if pattern == "straggler" else (),
                         staleness_aware_lr=salr, name=f"staleness {workload} W={workers} {pattern} {label(s, salr)} #{rep}")


async def main_async(args: argparse.Namespace) -> int:
    workload = args.workload
    sizes = [int(x) for x in args.workers.split(",")]
    patterns = args.patterns.split(",")
    out = ROOT / "bench" / "out"
    traces = out / "staleness-traces"
    traces.mkdir(parents=True, exist_ok=True)
    raw = Path(args.json) if args.json else out / f"staleness-{workload}.json"
    results: list[dict[str, Any]] = json.loads(raw.read_text())["runs"] if args.resume and raw.exists() else []
    done = {(r["workers"], r["pattern"], r["setting"], r["repeat"]) for r in results}
    server, addr = start_server("--lease-seconds", "300")
    info = machine()
    try:
        for workers in sizes:
            for pattern in patterns:
                todo = [(rep, s, salr) for rep in range(args.repeats) for s, salr in SETTINGS
                        if (workers, pattern, label(s, salr), rep) not in done
                        and (not args.settings or label(s, salr) in args.settings.split(","))]
                if not todo:
                    continue
                data = build_run_spec(options(workload, workers, pattern, "1", False, args.pushes, 0)).data_spec_json
                fleet = start_fleet(addr, workers, data, pattern, args.step_seconds)
                try:
                    for rep, s, salr in todo:
                        o = options(workload, workers, pattern, s, salr, args.pushes, rep)
                        r = await one_run(addr, o, workload, [p.pid for p in fleet], traces)
                        r.update(workers=workers, pattern=pattern, setting=label(s, salr), staleness=s, salr=salr,
                                 repeat=rep, iterations=o.iterations)
                        results.append(r)
                        tt = "-" if r["time_to_target"] is None else f"{r['time_to_target']:.2f}s"
                        print(f"W={workers:2d} {pattern:9s} {r['setting']:11s} #{rep} {r['state']:9s} to target {tt:>8s} "
                              f"clock {r['clock_to_target']}  final {r['final']}  wall {r['wall']}  "
                              f"staleness {r['stale_mean']:.1f}  cpu/worker {r['worker_cpu_share']:.3f}", flush=True)
                        raw.write_text(json.dumps(rounded({"machine": info, "argv": sys.argv, "workload": WORKLOADS[workload],
                                                           "pushes": args.pushes, "step_seconds": args.step_seconds,
                                                           "runs": results})))
                finally:
                    stop_procs(fleet)
    finally:
        stop_procs([server])
    print(f"raw: {raw}")
    return 0


# ================================================================================= report
def summarise(runs: list[dict[str, Any]]) -> dict[tuple[int, str], dict[str, dict[str, Any]]]:
    """(workers, pattern) -> setting -> median time/clock to target over repeats, ranges, final."""
    cells: dict[tuple[int, str], dict[str, dict[str, Any]]] = {}
    for r in runs:
        cells.setdefault((r["workers"], r["pattern"]), {}).setdefault(r["setting"], {"runs": []})["runs"].append(r)
    for by_setting in cells.values():
        for cell in by_setting.values():
            rs = cell["runs"]
            times = [r["time_to_target"] if r["time_to_target"] is not None else float("inf") for r in rs]
            cell["time"] = statistics.median(times)
            cell["times"] = times
            clocks = [r["clock_to_target"] for r in rs if r["clock_to_target"] is not None]
            cell["clock"] = statistics.median(clocks) if clocks else None
            finals = [r["final"] for r in rs if r["final"] is not None and r["state"] == "completed"]
            cell["final"] = statistics.median(finals) if finals else None
            cell["failed"] = sum(r["state"] != "completed" for r in rs)
            cell["stale"] = statistics.median(r["stale_mean"] for r in rs)
    return cells


def winner(by_setting: dict[str, dict[str, Any]]) -> tuple[str, float]:
    """The setting with the least median time to target, and the runner-up's time over it."""
    ranked = sorted(by_setting, key=lambda k: by_setting[k]["time"])
    best = by_setting[ranked[0]]["time"]
    second = by_setting[ranked[1]]["time"] if len(ranked) > 1 else float("inf")
    return ranked[0], second / best if best > 0 else float("inf")


def markdown(workload: str, cells: dict[tuple[int, str], dict[str, dict[str, Any]]]) -> str:
    w = WORKLOADS[workload]
    names = [label(s, a) for s, a in SETTINGS]
    lines = [f"Time to {w['objective']} {'<=' if w['lower_is_better'] else '>='} {w['target']} (s, median over "
             "repeats [range of those that reached it]; '-' never reached or not in most repeats, 'x' "
             "diverged/failed), the winner in bold; last column: the winner's rank-0 clock at the target and the "
             "final objective.", "",
             "| W | pattern | " + " | ".join(names) + " | winner: clock, final |",
             "|---|---|" + "---|" * (len(names) + 1)]
    for (workers, pattern), by_setting in sorted(cells.items(), key=lambda kv: (kv[0][0], PATTERN_ORDER.index(kv[0][1]))):
        best, _ = winner(by_setting)
        row = []
        for n in names:
            cell = by_setting.get(n)
            if cell is None:
                row.append("")
                continue
            finite = [t for t in cell["times"] if t != float("inf")]
            if not finite:
                text = "x" if cell["failed"] == len(cell["times"]) else "-"
            else:
                text = "-" if cell["time"] == float("inf") else f"{cell['time']:.1f}"
                if len(finite) > 1 or len(finite) < len(cell["times"]):
                    lo, hi = f"{min(finite):.1f}", f"{max(finite):.1f}"
                    text += f" [{lo}]" if lo == hi else f" [{lo}-{hi}]"
                if len(finite) < len(cell["times"]):
                    text += f" ({len(finite)} of {len(cell['times'])} reached)"
            row.append(f"**{text}**" if n == best and finite else text)
        b = by_setting[best]
        final = "-" if b["final"] is None else f"{b['final']:.3f}"
        lines.append(f"| {workers} | {pattern} | " + " | ".join(row) + f" | {b['clock']}, {final} |")
    return "\n".join(lines)


PATTERN_ORDER = ["none", "straggler", "tail"]


def heat_map(panels: list[tuple[str, dict[tuple[int, str], dict[str, dict[str, Any]]]]], path: Path, note: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    names = [label(s, a) for s, a in SETTINGS]
    colours = ["#d62728", "#e377c2", "#ff7f0e", "#bcbd22", "#2ca02c", "#17becf", "#1f77b4", "#9edae5", "#aec7e8"]
    fig = Figure(figsize=(max(6.8, 5.2 * len(panels)), 4.6))  # (the note needs 6.8 in)
    FigureCanvasAgg(fig)
    for i, (workload, cells) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        sizes = sorted({w for w, _ in cells})
        patterns = [p for p in PATTERN_ORDER if any(q == p for _, q in cells)]
        grid = np.full((len(sizes), len(patterns)), np.nan)
        for (w, p), by_setting in cells.items():
            best, margin = winner(by_setting)
            y, x = sizes.index(w), patterns.index(p)
            t = by_setting[best]["time"]
            if t == float("inf"):
                ax.text(x, y, "none\nreached", ha="center", va="center", fontsize=8)
                continue
            grid[y, x] = names.index(best)
            ax.text(x, y, f"{best}\n{t:.1f} s\nnext +{(margin - 1) * 100:.0f}%" if margin != float("inf") else
                    f"{best}\n{t:.1f} s", ha="center", va="center", fontsize=8)
        ax.imshow(grid, cmap=ListedColormap(colours), vmin=-0.5, vmax=len(names) - 0.5, aspect="auto")
        ax.set_xticks(range(len(patterns)), [{"none": "none", "straggler": "one 3x straggler",
                                              "tail": "10x w.p. 0.05"}[p] for p in patterns])
        ax.set_yticks(range(len(sizes)), [f"{w} workers" for w in sizes])
        w = WORKLOADS[workload]
        ax.set_title(f"{workload}: fastest to {w['objective']} {'<=' if w['lower_is_better'] else '>='} {w['target']}",
                     fontsize=10)
    fig.suptitle(note, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(paths: list[Path], png: Path) -> None:
    panels = []
    for path in paths:
        raw = json.loads(path.read_text())
        workload = next(k for k, v in WORKLOADS.items() if v["model"] == raw["workload"]["model"])
        cells = summarise(raw["runs"])
        panels.append((workload, cells))
        print(f"### {workload} ({raw['machine']['date']}, commit {raw['machine']['commit']}, {raw['pushes']} pushes "
              f"per run)\n\n{markdown(workload, cells)}\n")
    info = json.loads(paths[0].read_text())["machine"]
    heat_map(panels, png, f"winner per cluster size and step-time pattern (median time to target); "
             f"{info['nproc']} cores, {info['date']}")
    print(f"heat map: {png}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="mf")
    ap.add_argument("--workers", default="4,8,16,32", help="cluster sizes, comma-separated")
    ap.add_argument("--patterns", default="none,straggler,tail", help="step-time patterns, comma-separated")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--pushes", type=int, default=6000, help="pushes per run, split over the ranks")
    ap.add_argument("--settings", default="", help="only these settings, comma-separated labels (s=0,s=inf,...)")
    ap.add_argument("--step-seconds", type=float, default=0.0,
                    help="each worker's iterations take at least this long (a slower machine each; 0: off)")
    ap.add_argument("--json", default="", help="raw results (default bench/out/staleness-WORKLOAD.json)")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in the raw file, do the others")
    ap.add_argument("--report", nargs="+", metavar="RAW.json", help="no runs: tables and the heat map from raw files")
    ap.add_argument("--png", default=str(ROOT / "bench" / "staleness.png"))
    args = ap.parse_args()
    if args.report:
        report([Path(p) for p in args.report], Path(args.png))
        return 0
    known = [label(s, salr) for s, salr in SETTINGS]
    unknown = [x for x in args.settings.split(",") if x and x not in known]
    if unknown:
        ap.error(f"--settings {','.join(unknown)}: not a setting; choose from {','.join(known)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM (a timeout) unwinds as Ctrl-C: the finally blocks stop what was started
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    exit_with_parent()  # started by another bench: not to outlive it
    sys.exit(main())
