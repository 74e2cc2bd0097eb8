"""Embedding tables (issue 16): cost per iteration independent of the table's size, and CTR
training to the planted model's AUC over worker counts and staleness bounds.

    .venv/bin/python bench/tables.py                 # both parts (~6 min on 2 shared cores)
    .venv/bin/python bench/tables.py --part size     # only part 1
    .venv/bin/python bench/tables.py --quick         # a smoke run (< 60 s): tiny data, few iterations

Every run is real processes, as ``bench/small_model.py``: a fresh ``ps-server --port 0`` and W
``ps-worker --once``; the run is created with ``client.spec.build_run_spec`` through ``PsClient``,
followed with ``watch_run`` (the server's and workers' peak RSS sampled meanwhile from /proc),
then ``get_run``'s counters and ``get_metrics``' points are read.

1. **Size** (``--part size``): the same run, ``fm:8`` on ``synthetic-ctr`` (``--size-data``),
   ``--size-workers`` workers, staleness 2, SGD, ``--size-iters`` iterations per worker, with a
   table of each of ``--rows`` rows (10^5 and 10^7), repetitions interleaved (the order alternates).
   Iteration time: the median over the workers' training reports of ``step_seconds`` (each report's
   mean seconds per iteration since the previous one: steady state, one worker's view), and
   ``train_seconds / iterations`` (from the run's start to its end, data loading and the final
   evaluation included). Bytes per iteration: (``bytes_pushed`` + ``bytes_pulled``) /
   ``pushes_applied`` from the run's counters (rank 0's one final evaluation pull included; the
   test split is kept small for that). Against what a dense worker would move per iteration: the
   whole table pulled and pushed, 2 x 4 x rows x (1 + factors) bytes (computed, not run).
2. **CTR** (``--part ctr``): ``fm:2:rows=65536`` on ``synthetic-ctr:samples=400000,
   ids_per_field=100,factors=2``, AdaGrad lr 0.1, batch 256, one epoch (the configuration of
   ``tests/system/test_ctr.py``), for W in ``--workers`` and s in ``--staleness`` (W = 1 once: with
   one worker the bound never holds anyone back). The planted model's AUC on the test split, the
   final AUC, and the time to the planted AUC - 0.01: the first evaluation at or above it, in
   seconds since the run started (GetRun's ``started``, when the last rank joined; the workers
   generate the data set after that). Rows pulled and pushed per second at the server: the run's
   ``rows_pulled`` / ``rows_pushed`` over ``train_seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.spec import LaunchOptions, build_run_spec  # noqa: E402
from paramserver.client import PsClient  # noqa: E402
from paramserver.runtime import child_env, exit_with_parent  # noqa: E402
from paramserver.v1 import paramserver_pb2 as pb  # noqa: E402
from worker.datasets import load_dataset, parse_dataset  # noqa: E402

ENV = child_env({**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})  # children stop if this process dies
OUT = ROOT / "bench" / "out" / "tables.json"
CTR_DATA = "synthetic-ctr:samples=400000,ids_per_field=100,factors=2"
CTR_MODEL = "fm:2:rows=65536"
SIZE_DATA = "synthetic-ctr:samples=300000,ids_per_field=10000,factors=4,test_fraction=0.02"


# ------------------------------------------------------------------------------ machine
def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> dict[str, Any]:
    cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    mem = re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text())
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit + ("+dirty" if dirty else ""),
            "nproc": os.cpu_count(), "cpu": cpu.group(1) if cpu else "?", "loadavg_start": loadavg(),
            "mem_available_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None, "command": " ".join(sys.argv)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    try:
        m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return 0.0
    return int(m.group(1)) / 1024 if m else 0.0


# ------------------------------------------------------------------------------ one run
def start_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "ps_server.server", "--port", "0", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    assert proc.stdout is not None
    m = re.search(r"listening on ([\d.]+):(\d+)", proc.stdout.readline())
    if not m:
        proc.kill()
        raise RuntimeError("ps-server did not start")
    return proc, f"{m.group(1)}:{m.group(2)}"


def seconds(ts: Any) -> float:
    return float(ts.seconds + ts.nanos * 1e-9)


async def one_run(spec: pb.RunSpec, timeout: float) -> dict[str, Any]:
    """Server + ``spec.num_workers`` ps-workers; the run's counters, timings, eval points, peak RSS."""
    server, addr = start_server()
    workers: list[subprocess.Popen[str]] = []
    peak = {"server": 0.0, "worker": 0.0}
    pushes: list[tuple[float, int]] = []  # (time.time(), pushes_applied) every snapshot
    server_cpu, cpu_start = 0.0, None  # the server's CPU seconds: now, and when the run was first seen running
    try:
        async with PsClient(addr, timeout=120) as c:
            run = await c.create_run(spec)
            workers = [subprocess.Popen([sys.executable, "-m", "worker.main", "--server", addr, "--once",
                                         "--log-level", "WARNING"], env=ENV, cwd=ROOT) for _ in range(spec.num_workers)]
            async with asyncio.timeout(timeout):
                async for snap in c.watch_run(run.run_id, interval=0.2):
                    final = snap.run
                    pushes.append((time.time(), final.counters.pushes_applied))
                    server_cpu = cpu_seconds(server.pid)
                    if cpu_start is None and final.state == pb.RUN_STATE_RUNNING:
                        cpu_start = server_cpu
                    peak["server"] = max(peak["server"], rss_mib(server.pid))
                    peak["worker"] = max([peak["worker"]] + [rss_mib(w.pid) for w in workers])
            final = await c.get_run(run.run_id)
            metrics = await c.get_metrics(run.run_id)
        codes = [w.wait(60) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    if final.state != pb.RUN_STATE_COMPLETED:
        raise RuntimeError(f"run {final.run_id} ended {pb.RunState.Name(final.state)}: {final.message}")
    k = final.counters
    started, finished = seconds(final.started), seconds(final.finished)
    steps = [p.step_seconds for p in metrics.points if not p.eval and p.step_seconds > 0]
    evals = [{"clock": p.clock, "t": seconds(p.time) - started, "auc": p.eval_auc, "logloss": p.eval_loss,
              "pushes": pushes_at(pushes, seconds(p.time))} for p in metrics.points if p.eval]
    return {
        "run_id": final.run_id, "worker_exit": codes, "iterations": spec.iterations, "workers": spec.num_workers,
        "staleness": spec.staleness, "wall_seconds": finished - seconds(final.created),
        "train_seconds": finished - started, "step_seconds_median": statistics.median(steps) if steps else None,
        "pushes_applied": k.pushes_applied, "updates_applied": k.updates_applied, "parked_seconds": k.parked_seconds,
        "server_cpu_training": server_cpu - (cpu_start or 0.0), "bytes_pushed": k.bytes_pushed, "bytes_pulled": k.bytes_pulled,
        "rows_pulled": k.rows_pulled, "rows_pushed": k.rows_pushed, "pulls_served": k.pulls_served,
        "pulls_skipped": k.pulls_skipped, "final_auc": final.last_eval.eval_auc,
        "final_logloss": final.last_eval.eval_loss, "evals": evals,
        "peak_rss_mib": {k_: round(v) for k_, v in peak.items()},
    }


def pushes_at(samples: list[tuple[float, int]], t: float) -> float:
    """The server's pushes_applied at time ``t``, interpolated between the snapshots around it."""
    before = [x for x in samples if x[0] <= t] or samples[:1]
    after = [x for x in samples if x[0] >= t] or samples[-1:]
    (t0, n0), (t1, n1) = before[-1], after[0]
    return float(n0) if t1 <= t0 else n0 + (n1 - n0) * (t - t0) / (t1 - t0)


# ------------------------------------------------------------------------------ part 1: table size
def size_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    factors = 8
    for rep in range(args.reps):
        for rows in args.rows if rep % 2 == 0 else args.rows[::-1]:
            o = LaunchOptions(model=f"fm:{factors}:rows={rows}", dataset=args.size_data, workers=args.size_workers,
                              staleness=2, optimizer="sgd", lr=0.05, batch_size=256, iterations=args.size_iters)
            spec = build_run_spec(o)
            spec.eval_every = 0  # only the final evaluation: its pull is the same at both sizes
            r = await_run(spec, args.timeout) | {"rows": rows, "rep": rep, "factors": factors,
                                                  "loadavg": loadavg()}
            r["bytes_per_iter"] = (r["bytes_pushed"] + r["bytes_pulled"]) / max(1, r["pushes_applied"])
            r["rows_per_iter"] = (r["rows_pushed"] + r["rows_pulled"]) / max(1, r["pushes_applied"])
            r["dense_bytes_per_iter"] = 2 * 4 * rows * (1 + factors)
            r["train_per_iter"] = r["train_seconds"] / spec.iterations
            print(f"  size rep {rep} rows {rows:>10}: step {1e3 * (r['step_seconds_median'] or 0):.2f} ms, "
                  f"train/iter {1e3 * r['train_per_iter']:.2f} ms, {r['bytes_per_iter'] / 1e3:.1f} kB/iter, "
                  f"{r['rows_per_iter']:.0f} rows/iter, peak RSS {r['peak_rss_mib']} MiB, load {r['loadavg']}",
                  file=sys.stderr, flush=True)
            out.append(r)
    return out


def size_table(results: list[dict[str, Any]]) -> str:
    med = statistics.median
    lines = ["| table rows | table MB (server) | reps | iteration time, ms: median of step_seconds [min-max] | "
             "train_seconds / iterations, ms | bytes / iteration (pushed + pulled) [min-max] | rows / iteration "
             "(pushed + pulled) | server CPU ms / push | dense worker's bytes / iteration (computed) | sparse / dense | "
             "peak RSS MiB: server / worker |", "|" + "---|" * 11]
    for rows in sorted({r["rows"] for r in results}):
        sel = [r for r in results if r["rows"] == rows]
        step = [1e3 * r["step_seconds_median"] for r in sel]
        b = [r["bytes_per_iter"] for r in sel]
        dense = sel[0]["dense_bytes_per_iter"]
        lines.append(
            f"| {rows:.0e} | {4 * rows * (1 + sel[0]['factors']) / 1e6:.0f} | {len(sel)} | {med(step):.2f} "
            f"[{min(step):.2f}-{max(step):.2f}] | {med(1e3 * r['train_per_iter'] for r in sel):.2f} | "
            f"{med(b) / 1e3:.1f} kB [{min(b) / 1e3:.1f}-{max(b) / 1e3:.1f}] | {med(r['rows_per_iter'] for r in sel):.0f} | "
            f"{med(1e3 * r['server_cpu_training'] / max(1, r['pushes_applied']) for r in sel):.2f} | "
            f"{dense / 1e6:,.1f} MB | {med(b) / dense:.1e} | {max(r['peak_rss_mib']['server'] for r in sel)} / "
            f"{max(r['peak_rss_mib']['worker'] for r in sel)} |")
    sizes = sorted({r["rows"] for r in results})
    if len(sizes) >= 2:
        lo, hi = ([r for r in results if r["rows"] == n] for n in (sizes[0], sizes[-1]))
        t = med(r["step_seconds_median"] for r in hi) / med(r["step_seconds_median"] for r in lo)
        b = med(r["bytes_per_iter"] for r in hi) / med(r["bytes_per_iter"] for r in lo)
        lines.append(f"\n{sizes[-1]:.0e} rows against {sizes[0]:.0e} (medians): iteration time x{t:.2f}, bytes per "
                     f"iteration x{b:.2f} (target: within 20%)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ part 2: CTR to the planted AUC
def ctr_part(args: argparse.Namespace) -> tuple[float, list[dict[str, Any]]]:
    planted = float(load_dataset(parse_dataset(args.ctr_data)).extras["planted_auc"])
    print(f"  planted AUC {planted:.4f}", file=sys.stderr, flush=True)
    configs = [(w, s) for w in args.workers for s in (args.staleness if w > 1 else args.staleness[:1])]
    out = []
    for rep in range(args.ctr_reps):
        for w, s in configs if rep % 2 == 0 else configs[::-1]:
            o = LaunchOptions(model=args.ctr_model, dataset=args.ctr_data, workers=w, staleness=s,
                              optimizer="adagrad", lr=0.1, batch_size=256, epochs=args.epochs)
            spec = build_run_spec(o)
            spec.eval_every = max(1, spec.iterations // args.evals)
            r = await_run(spec, args.timeout) | {"loadavg": loadavg(), "planted_auc": planted, "rep": rep}
            hit = [e for e in r["evals"] if e["auc"] >= planted - 0.01]
            r["time_to_target"] = hit[0]["t"] if hit else None
            r["clock_to_target"] = hit[0]["clock"] if hit else None
            r["pushes_to_target"] = hit[0]["pushes"] if hit else None
            r["rows_pulled_per_s"] = r["rows_pulled"] / r["train_seconds"]
            r["rows_pushed_per_s"] = r["rows_pushed"] / r["train_seconds"]
            reached = f"{r['time_to_target']:.1f} s" if hit else "not reached"
            print(f"  ctr rep {rep} W={w} s={s}: final AUC {r['final_auc']:.4f}, to target {reached}, train {r['train_seconds']:.1f} s, "
                  f"load {r['loadavg']}", file=sys.stderr, flush=True)
            out.append(r)
    return planted, out


def ctr_table(planted: float, results: list[dict[str, Any]]) -> str:
    med = statistics.median
    lines = [f"planted AUC {planted:.4f}, target (planted - 0.01) {planted - 0.01:.4f}", "",
             "| W | s | iterations / worker | runs | final AUC, median [min-max] | final log-loss | reached target | "
             "time to target, s: median [each run] | pushes applied (all ranks) at target, median | train s | "
             "rows pulled / s | rows pushed / s | rows pulled / push | server CPU ms / push |", "|" + "---|" * 14]
    for w, s in dict.fromkeys((r["workers"], r["staleness"]) for r in results):
        sel = [r for r in results if (r["workers"], r["staleness"]) == (w, s)]
        auc = [r["final_auc"] for r in sel]
        hits = [r for r in sel if r["time_to_target"] is not None]
        each = ", ".join(f"{r['time_to_target']:.1f}" if r["time_to_target"] is not None else "-" for r in sel)
        tt = f"{med(r['time_to_target'] for r in hits):.1f} [{each}]" if hits else f"not reached [{each}]"
        pt = f"{med(r['pushes_to_target'] for r in hits):.0f}" if hits else "-"
        name = {0: "0 (BSP)", -1: "-1 (ASP)"}.get(s, str(s))
        lines.append(
            f"| {w} | {name} | {sel[0]['iterations']} | {len(sel)} | {med(auc):.4f} [{min(auc):.4f}-{max(auc):.4f}] | "
            f"{med(r['final_logloss'] for r in sel):.4f} | {len(hits)}/{len(sel)} | {tt} | {pt} | "
            f"{med(r['train_seconds'] for r in sel):.1f} | {med(r['rows_pulled_per_s'] for r in sel):,.0f} | "
            f"{med(r['rows_pushed_per_s'] for r in sel):,.0f} | "
            f"{med(r['rows_pulled'] / max(1, r['pushes_applied']) for r in sel):.0f} | "
            f"{med(1e3 * r['server_cpu_training'] / max(1, r['pushes_applied']) for r in sel):.2f} |")
    return "\n".join(lines)


def await_run(spec: pb.RunSpec, timeout: float) -> dict[str, Any]:
    return asyncio.run(one_run(spec, timeout))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["size", "ctr", "both"], default="both")
    ap.add_argument("--rows", default="100000,10000000", help="table sizes of part 1 (comma-separated)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions per table size (part 1)")
    ap.add_argument("--size-iters", type=int, default=400, help="iterations per worker (part 1)")
    ap.add_argument("--size-workers", type=int, default=2, help="workers (part 1)")
    ap.add_argument("--size-data", default=SIZE_DATA, help="data set of part 1")
    ap.add_argument("--ctr-data", default=CTR_DATA, help="data set of part 2")
    ap.add_argument("--ctr-model", default=CTR_MODEL, help="model of part 2")
    ap.add_argument("--workers", default="1,2,4", help="worker counts of part 2 (comma-separated)")
    ap.add_argument("--staleness", default="0,2,-1", help="staleness bounds of part 2 (comma-separated; -1 = ASP)")
    ap.add_argument("--ctr-reps", type=int, default=3, help="repetitions of each configuration (part 2), interleaved")
    ap.add_argument("--epochs", type=float, default=1.0, help="epochs of part 2")
    ap.add_argument("--evals", type=int, default=40, help="evaluations per run of part 2 (rank 0)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny data, few iterations, W = 2 only")
    ap.add_argument("--json", type=Path, default=OUT, help=f"where to write every result (default {OUT})")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM (a timeout) unwinds as Ctrl-C: the finally blocks stop what was started
    args.rows = [int(float(x)) for x in args.rows.split(",")]
    args.workers = [int(x) for x in args.workers.split(",")]
    args.staleness = [int(x) for x in args.staleness.split(",")]
    if args.quick:
        args.rows, args.reps, args.size_iters = [100000, 1000000], 1, 30
        args.size_data = "synthetic-ctr:samples=20000,ids_per_field=1000,test_fraction=0.05"
        args.ctr_data, args.workers, args.staleness, args.evals = "synthetic-ctr:samples=20000,ids_per_field=100", [2], [2], 4
        args.ctr_reps = 1
    info = machine()
    print(f"machine: {info}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    out: dict[str, Any] = {"info": info}
    if args.part in ("size", "both"):
        out["size"] = size_part(args)
    if args.part in ("ctr", "both"):
        out["planted_auc"], out["ctr"] = ctr_part(args)
    info["loadavg_end"], info["seconds"] = loadavg(), round(time.monotonic() - t0)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"date {info['date']}, commit {info['commit']}, {info['nproc']} x {info['cpu']}, load average "
          f"{info['loadavg_start']} at start, {info['loadavg_end']} at end, {info['seconds']} s")
    print(f"command: {info['command']}")
    if "size" in out:
        print(f"\n### Table size: fm:8 on {args.size_data}, {args.size_workers} workers, s = 2, SGD, "
              f"{args.size_iters} iterations per worker\n")
        print(size_table(out["size"]))
    if "ctr" in out:
        print(f"\n### CTR: {args.ctr_model} on {args.ctr_data}, AdaGrad lr 0.1, batch 256, {args.epochs:g} epoch\n")
        print(ctr_table(out["planted_auc"], out["ctr"]))


if __name__ == "__main__":
    exit_with_parent()  # started by another bench: not to outlive it
    main()
