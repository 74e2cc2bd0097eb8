"""Large-model rate against compute-only, and memory (the performance issue, figures 3 and 5).

3. Rate: ``synthetic-classification:samples=10000,features=784,classes=10`` with ``mlp:2048,2048``
   (784-2048-2048-10, 5,824,522 float32 = 23.3 MB), 4 workers, staleness unbounded: applied
   pushes per second through the server (from its counters, over the steady part of the run,
   10%-90% of the pushes; the run evaluates only at its end, as the references never do), against
   compute-only processes doing the same gradient computations (same batch size) and local SGD
   updates with no communication, measured before and after the run:
   * one process, OPENBLAS_NUM_THREADS=1 (what each worker runs with);
   * one process, default BLAS threads;
   * two 1-thread processes in parallel (the machine's compute ceiling on 2 cores; their sum);
   * four 1-thread processes in parallel, summed: "compute-only" W = 4, the performance issue's
     reference (W processes training their own copies, both cores busy).
   Workers use the shared-memory data plane (same host); ``--worker-arg=--no-shm`` makes them use
   TCP, ``--staleness 0`` makes the run BSP. Memory: besides VmHWM, the peak PSS of the server and
   of the whole job (shared memory counted once, split among the processes mapping it).
5. Memory: (a) the server's VmHWM during the large-model run, SGD and momentum, against
   1.5 x (parameters + optimizer state) + 150 MB; (b) ``psctl launch --local --workers 4 --model
   mlp:64 --dataset digits --staleness 2``: every process of psctl's tree sampled from /proc every
   50 ms, sum of the per-process peaks (VmHWM), target <= 600 MB; (c) ``--soak MINUTES``: an ASP
   digits run sampling the server's RSS every few seconds, growth after warm-up.

    .venv/bin/python bench/large_model.py [--iterations 80] [--batch 32] [--seconds 10]
        [--staleness inf|N] [--worker-arg=--no-shm] [--profile DIR] [--skip-psctl] [--skip-momentum]
        [--soak MINUTES] [--json out.json]

Everything runs in subprocesses: the BLAS thread count is fixed when numpy is imported.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpu_per_push import positive  # noqa: E402  (bench/ is the script's own folder)

from paramserver.runtime import child_env, exit_with_parent  # noqa: E402

WORKERS = 4
DATASET = "synthetic-classification:samples=10000,features=784,classes=10"
MODEL = "mlp:2048,2048"
BASE_ENV = child_env({k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")})
BASE_ENV["PYTHONUNBUFFERED"] = "1"
ONE_THREAD = {**BASE_ENV, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
CLK = os.sysconf("SC_CLK_TCK")
WORKER_ARGS: list[str] = []
BIN = Path(sys.executable).parent  # the venv's bin: psctl, py-spy


# ------------------------------------------------------------------------------ /proc helpers
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in kB (empty when the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def proc_pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), seconds; nan when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK
    except (FileNotFoundError, ProcessLookupError):
        return float("nan")


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(children(p))
    return seen


def cmd_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return "?"
    if "-m" in args:
        return args[args.index("-m") + 1]
    return os.path.basename(args[1] if len(args) > 1 and args[0].endswith(("python", "python3")) else args[0])


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# ------------------------------------------------------------------------------ compute-only child
CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from worker.datasets import load_dataset, parse_dataset
from worker.sampling import BatchSampler, shard_indices
from worker.models import build_model, parse_model
dataset, model_text, batch, seconds, workers = sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
data = load_dataset(parse_dataset(dataset))
model = build_model(parse_model(model_text), data.n_features, data.n_outputs)
params = model.init_params(0)
shards = [shard_indices(len(data.X_train), r, workers, 0) for r in range(workers)]
samplers = [BatchSampler(len(s), batch, 0, r) for r, s in enumerate(shards)]
lr = np.float32(0.1)
def step(clock, r):
    idx = shards[r][samplers[r].batch(clock)]
    _, grads = model.loss_and_grad(params, data.X_train[idx], data.y_train[idx])
    for name, g in grads.items():
        params[name] -= lr * g
for r in range(2):
    step(0, r)  # warm-up: first-touch allocations
print("ready", flush=True)
sys.stdin.readline()
n, clock = 0, 1
t0 = time.perf_counter(); c0 = time.process_time()
while time.perf_counter() - t0 < seconds:
    for r in range(workers):
        step(clock, r)
        n += 1
    clock += 1
el = time.perf_counter() - t0
print(json.dumps({"it_s": n / el, "n": n, "seconds": el, "cpu_s": time.process_time() - c0}), flush=True)
"""


def compute_only(n_procs: int, env: dict[str, str], batch: int, seconds: float) -> list[dict[str, float]]:
    """Start ``n_procs`` compute-only processes, release them together, return each one's result."""
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(ROOT), DATASET, MODEL, str(batch), str(seconds),
                               str(WORKERS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                              cwd=ROOT) for _ in range(n_procs)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=seconds + 120)
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


# ------------------------------------------------------------------------------ distributed run
def start_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "ps_server.server", "--port", "0", "--log-level", "WARNING",
                             "--lease-seconds", "120"], stdout=subprocess.PIPE, text=True, env=ONE_THREAD, cwd=ROOT)
    assert proc.stdout is not None
    m = re.search(r"listening on ([\d.]+):(\d+)", proc.stdout.readline())
    assert m, "server did not start"
    return proc, f"{m.group(1)}:{m.group(2)}"


async def distributed(spec: object, profile: Path | None, tag: str) -> dict[str, object]:
    from paramserver.client import PsClient
    from paramserver.v1 import paramserver_pb2 as pb

    server, addr = start_server()
    # The workers set OPENBLAS_NUM_THREADS=1 themselves (worker/main.py); give them the default env.
    workers = [subprocess.Popen([sys.executable, "-m", "worker.main", "--server", addr, "--once", "--log-level",
                                 "WARNING", *WORKER_ARGS], env=BASE_ENV, cwd=ROOT) for _ in range(WORKERS)]
    pids = [server.pid] + [w.pid for w in workers]
    samples: list[tuple[float, int, list[float], int]] = []  # time, pushes, cpu per pid, server RSS kB
    spies: list[subprocess.Popen[bytes]] = []
    peak_rss = peak_pss_server = peak_pss_all = 0
    hwm_workers = [0] * WORKERS  # sampled while the run lives (a worker exits when its part is done)
    total = spec.iterations * WORKERS  # type: ignore[attr-defined]
    try:
        async with PsClient(addr, timeout=60) as c:
            run = await c.create_run(spec)  # type: ignore[arg-type]
            async for snap in c.watch_run(run.run_id, interval=0.1, idle_timeout=300):
                st = proc_status(server.pid)
                for i, w in enumerate(workers):
                    hwm_workers[i] = max(hwm_workers[i], proc_status(w.pid).get("VmHWM", 0))
                peak_rss = max(peak_rss, st.get("VmRSS", 0))
                pss = [proc_pss(p) for p in pids]  # shared memory counted once, split among its users
                peak_pss_server, peak_pss_all = max(peak_pss_server, pss[0]), max(peak_pss_all, sum(pss))
                if snap.run.state == pb.RUN_STATE_RUNNING:
                    n = snap.run.counters.pushes_applied
                    samples.append((time.perf_counter(), n, [cpu_seconds(p) for p in pids], st.get("VmRSS", 0)))
                    if profile and not spies and n >= 0.2 * total:
                        profile.mkdir(parents=True, exist_ok=True)
                        for who, pid in (("server", server.pid), ("worker0", workers[0].pid)):
                            spies.append(subprocess.Popen(
                                [str(BIN / "py-spy"), "record", "-f", "raw", "-d", "5", "-p", str(pid),
                                 "-o", str(profile / f"{tag}-{who}.txt")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                final = snap.run
        hwm_server = proc_status(server.pid).get("VmHWM", 0)  # the server lives on: read its peak now
        for w in workers:
            w.wait(60)
    finally:
        for s in spies:
            s.wait(30)
        for w in workers:
            if w.poll() is None:
                w.kill()
        server.terminate()
        server.wait(10)
    steady = [s for s in samples if 0.1 * total <= s[1] <= 0.9 * total]
    (t0, n0, cpu0, _), (t1, n1, cpu1, _) = steady[0], steady[-1]
    dt = t1 - t0
    cpu_share = [(b - a) / dt for a, b in zip(cpu0, cpu1, strict=True)]
    co = final.counters
    return {
        "pushes_s": (n1 - n0) / dt,
        "steady_seconds": dt,
        "steady_pushes": n1 - n0,
        "server_cpu_share": cpu_share[0],
        "workers_cpu_share": cpu_share[1:],
        "server_cpu_ms_per_push": 1000 * cpu_share[0] * dt / max(1, n1 - n0),
        "worker_cpu_ms_per_push": 1000 * sum(cpu_share[1:]) * dt / max(1, n1 - n0),
        "server_vmhwm_mb": hwm_server / 1024,
        "server_peak_rss_sampled_mb": peak_rss / 1024,
        "server_peak_pss_mb": peak_pss_server / 1024,
        "job_peak_pss_mb": peak_pss_all / 1024,
        "worker_vmhwm_mb": [h / 1024 for h in hwm_workers],
        "accuracy": final.last_eval.eval_accuracy,
        "pushes_applied": co.pushes_applied,
        "pushes_rejected": co.pushes_rejected,
        "evictions": co.evictions,
        "staleness_mean": co.staleness_sum / max(1, co.pulls_served),
        "staleness_max": co.staleness_max,
        "state": pb.RunState.Name(final.state),
    }


# ------------------------------------------------------------------------------ psctl launch --local
def psctl_memory(interval: float = 0.05) -> dict[str, object]:
    cmd = [str(BIN / "psctl"), "launch", "--local", "--workers", "4", "--model", "mlp:64", "--dataset",
           "digits", "--staleness", "2"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=BASE_ENV, cwd=ROOT)
    peak: dict[int, dict[str, object]] = {}
    max_sum_rss = max_sum_pss = 0
    while proc.poll() is None:
        rss_sum = pss_sum = 0
        for pid in tree(proc.pid):
            st = proc_status(pid)
            if not st:
                continue
            d = peak.setdefault(pid, {"name": "psctl" if pid == proc.pid else cmd_name(pid), "hwm": 0, "rss": 0, "pss": 0})
            d["hwm"] = max(int(d["hwm"]), st.get("VmHWM", 0))  # type: ignore[call-overload]
            d["rss"] = max(int(d["rss"]), st.get("VmRSS", 0))  # type: ignore[call-overload]
            pss = proc_pss(pid)
            d["pss"] = max(int(d["pss"]), pss)  # type: ignore[call-overload]
            rss_sum += st.get("VmRSS", 0)
            pss_sum += pss
        max_sum_rss, max_sum_pss = max(max_sum_rss, rss_sum), max(max_sum_pss, pss_sum)
        time.sleep(interval)
    wall = time.perf_counter() - t0
    by_name: dict[str, list[float]] = {}
    for d in peak.values():
        by_name.setdefault(str(d["name"]), []).append(int(d["hwm"]) / 1024)  # type: ignore[call-overload]
    return {
        "command": " ".join(cmd), "exit": proc.returncode, "wall_s": wall, "processes": len(peak),
        "sum_vmhwm_mb": sum(int(d["hwm"]) for d in peak.values()) / 1024,  # type: ignore[call-overload]
        "max_concurrent_rss_mb": max_sum_rss / 1024, "max_concurrent_pss_mb": max_sum_pss / 1024,
        "vmhwm_mb_by_process": {k: [round(x, 1) for x in v] for k, v in by_name.items()},
    }


# ------------------------------------------------------------------------------ soak
async def soak(minutes: float, every: float = 5.0) -> dict[str, object]:
    from client.spec import LaunchOptions, build_run_spec
    from paramserver.client import PsClient

    spec = build_run_spec(LaunchOptions(model="mlp:64", dataset="digits", workers=WORKERS, staleness=-1,
                                        iterations=10**8, eval_every=2000))
    server, addr = start_server()
    workers = [subprocess.Popen([sys.executable, "-m", "worker.main", "--server", addr, "--once", "--log-level",
                                 "WARNING", *WORKER_ARGS], env=BASE_ENV, cwd=ROOT) for _ in range(WORKERS)]
    series: list[tuple[float, float, int]] = []
    try:
        async with PsClient(addr, timeout=60) as c:
            run = await c.create_run(spec)
            t0 = time.perf_counter()
            while (t := time.perf_counter() - t0) < minutes * 60:
                r = await c.get_run(run.run_id)
                series.append((t, proc_status(server.pid).get("VmRSS", 0) / 1024, r.counters.pushes_applied))
                await asyncio.sleep(every)
            await c.stop_run(run.run_id, "soak over")
    finally:
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
        server.terminate()
        server.wait(10)
    warm = min(60.0, minutes * 60 / 3)
    after = [s for s in series if s[0] >= warm]
    base = after[0]
    return {
        "minutes": minutes, "warmup_s": warm, "rss_after_warmup_mb": base[1],
        "rss_max_after_warmup_mb": max(s[1] for s in after), "rss_final_mb": after[-1][1],
        "growth_mb": after[-1][1] - base[1],
        "growth_mb_per_hour": (after[-1][1] - base[1]) / max(1e-9, after[-1][0] - base[0]) * 3600,
        "pushes_s": (after[-1][2] - base[2]) / max(1e-9, after[-1][0] - base[0]),
        "series": [(round(t, 1), round(m, 1), n) for t, m, n in series],
    }


# ------------------------------------------------------------------------------ main
def _staleness(text: str) -> int:
    from client.spec import parse_staleness

    try:
        return parse_staleness(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=positive(int), default=80, help="iterations per worker of the SGD run")
    ap.add_argument("--batch", type=positive(int), default=32)
    ap.add_argument("--seconds", type=positive(float), default=10.0, help="timed part of each compute-only measurement")
    ap.add_argument("--profile", type=Path, help="py-spy (raw) the server and one worker for 5 s into DIR")
    ap.add_argument("--skip-momentum", action="store_true")
    ap.add_argument("--skip-psctl", action="store_true")
    ap.add_argument("--soak", type=float, default=0.0, metavar="MINUTES", help="run only the soak, this long")
    ap.add_argument("--staleness", default="inf", type=_staleness, help="of the SGD run: inf (async) or 0 (BSP), ...")
    ap.add_argument("--worker-arg", action="append", default=[], help="passed to each ps-worker (e.g. --plane=tcp)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM (a timeout) unwinds as Ctrl-C: the finally blocks stop what was started
    WORKER_ARGS.extend(args.worker_arg)

    if args.soak:
        res = asyncio.run(soak(args.soak))
        print(json.dumps({k: v for k, v in res.items() if k != "series"}, indent=1))
        print("series (s, server RSS MB, pushes):", res["series"])
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
        return

    from client.spec import LaunchOptions, build_run_spec
    from worker.models import build_model, num_params, parse_model

    results: dict[str, object] = {"load_start": loadavg()}
    staleness = args.staleness
    sgd = build_run_spec(LaunchOptions(model=MODEL, dataset=DATASET, workers=WORKERS, staleness=staleness,
                                       batch_size=args.batch, iterations=args.iterations, lr=0.1,
                                       eval_every=args.iterations))  # no evaluation in the timed part
    n_params = num_params(build_model(parse_model(MODEL), 784, 10).param_specs())
    mb = n_params * 4 / 2**20
    results["params"] = n_params

    def compute_block(tag: str) -> None:
        one = compute_only(1, ONE_THREAD, args.batch, args.seconds)[0]
        dflt = compute_only(1, BASE_ENV, args.batch, args.seconds)[0]
        two = compute_only(2, ONE_THREAD, args.batch, args.seconds)
        four = compute_only(WORKERS, ONE_THREAD, args.batch, args.seconds)
        results[f"compute {tag}"] = {"1 proc 1 thread": one, "1 proc default threads": dflt,
                                     "2 procs 1 thread": two, "2 procs sum it/s": sum(t["it_s"] for t in two),
                                     "4 procs 1 thread": four, "4 procs sum it/s": sum(t["it_s"] for t in four)}
        print(tag, json.dumps(results[f"compute {tag}"]), flush=True)

    compute_block("before")
    results["sgd"] = asyncio.run(distributed(sgd, args.profile, "sgd"))
    print("sgd", json.dumps(results["sgd"]), flush=True)
    compute_block("after")
    if not args.skip_momentum:
        mom = build_run_spec(LaunchOptions(model=MODEL, dataset=DATASET, workers=WORKERS, staleness=-1,
                                           batch_size=args.batch, iterations=max(10, args.iterations // 2),
                                           optimizer="momentum", lr=0.01, momentum=0.9))
        results["momentum"] = asyncio.run(distributed(mom, None, "momentum"))
        print("momentum", json.dumps(results["momentum"]), flush=True)
    if not args.skip_psctl:
        results["psctl"] = psctl_memory()
        print("psctl", json.dumps(results["psctl"]), flush=True)
    results["load_end"] = loadavg()

    # ---- summary
    c1 = statistics.mean([results[f"compute {t}"]["1 proc 1 thread"]["it_s"] for t in ("before", "after")])  # type: ignore[index]
    cd = statistics.mean([results[f"compute {t}"]["1 proc default threads"]["it_s"] for t in ("before", "after")])  # type: ignore[index]
    c2 = statistics.mean([results[f"compute {t}"]["2 procs sum it/s"] for t in ("before", "after")])  # type: ignore[index]
    c4 = statistics.mean([results[f"compute {t}"]["4 procs sum it/s"] for t in ("before", "after")])  # type: ignore[index]
    rate = results["sgd"]["pushes_s"]  # type: ignore[index]
    print(f"\nparameters {n_params:,} ({mb:.1f} MiB float32), batch {args.batch}")
    print(f"{'compute-only, 1 process, 1 BLAS thread (it/s)':60s} {c1:8.2f}")
    print(f"{'compute-only, 1 process, default BLAS threads (it/s)':60s} {cd:8.2f}")
    print(f"{'compute-only, 2 processes x 1 thread in parallel, sum (it/s)':60s} {c2:8.2f}")
    print(f"{'compute-only, 4 processes x 1 thread in parallel, sum (it/s)':60s} {c4:8.2f}")
    print(f"{'applied pushes/s, 4 workers, SGD':60s} {rate:8.2f}")
    print(f"{'ratio vs 1 process 1 thread (target >= 80%)':60s} {100 * rate / c1:7.1f}%")
    print(f"{'ratio vs 1 process default threads':60s} {100 * rate / cd:7.1f}%")
    print(f"{'ratio vs 2 processes (machine ceiling)':60s} {100 * rate / c2:7.1f}%")
    print(f"{'ratio vs compute-only W=4 (4 processes; target >= 75%)':60s} {100 * rate / c4:7.1f}%")
    for opt, state in (("sgd", 0), ("momentum", 1)):
        if opt in results:
            budget = 1.5 * (1 + state) * mb + 150
            hwm = results[opt]["server_vmhwm_mb"]  # type: ignore[index]
            print(f"{'server VmHWM ' + opt + ' (MiB), budget ' + f'{budget:.0f}':60s} {hwm:8.1f}")
    if "psctl" in results:
        print(f"{'psctl launch --local: sum of per-process VmHWM (MiB), target 600':60s} "
              f"{results['psctl']['sum_vmhwm_mb']:8.1f}")  # type: ignore[index]
    results["summary"] = {"compute_1t": c1, "compute_default": cd, "compute_2procs": c2, "compute_4procs": c4, "pushes_s": rate}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    exit_with_parent()  # started by another bench: not to outlive it
    main()
