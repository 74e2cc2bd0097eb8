"""Small-model rate against compute-only, and time to accuracy against a single process, measured in the same run.

1. Rate: digits, MLP 64-64-10 (~4.8k parameters), 4 workers, s = unbounded and s = 2: applied
   pushes per second through the server (from its counters, over the steady part of the run),
   against (a) "compute-only" W = 4, the performance issue's reference and the one its target
   (>= 15%) uses: 4 processes at once (1 BLAS thread each, both cores busy) training their own
   copies with the same gradient computations and local SGD updates, no communication, rates
   summed (``cpu_per_push.compute_only``); (b) one process doing the 4 ranks' gradients and
   updates (one core: about half of (a)). Also checks the distributed run reaches the single
   process's accuracy.
2. Time to accuracy: ``psctl launch --local`` with 4 workers, s = 2, from the command's start
   (interpreter start-up included) to the first evaluation >= 0.95, against one process training
   the same model to 0.95 from its own start.

    .venv/bin/python bench/small_model.py [--repeats 3] [--epochs 100] [--compute-seconds 3] [--json out.json]
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
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import numpy as np  # noqa: E402
from cpu_per_push import compute_only as compute_only_procs  # noqa: E402

from client.spec import LaunchOptions, build_run_spec  # noqa: E402
from paramserver.client import PsClient  # noqa: E402
from paramserver.runtime import child_env, exit_with_parent  # noqa: E402
from paramserver.v1 import paramserver_pb2 as pb  # noqa: E402
from worker.datasets import load_dataset  # noqa: E402
from worker.models import build_model  # noqa: E402
from worker.sampling import BatchSampler, shard_indices  # noqa: E402

ENV = child_env({**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})  # children stop if this process dies
WORKERS = 4


def compute_only(spec: pb.RunSpec) -> tuple[float, float]:
    """Iterations/s of one process doing the 4 ranks' gradients and local SGD updates; final accuracy."""
    data = load_dataset(json.loads(spec.data_spec_json))
    model = build_model(json.loads(spec.model_spec_json), data.n_features, data.n_outputs)
    params = model.init_params(spec.seed)
    shards = [shard_indices(len(data.X_train), r, WORKERS, spec.seed) for r in range(WORKERS)]
    samplers = [BatchSampler(len(s), spec.batch_size, spec.seed, r) for r, s in enumerate(shards)]
    lr = np.float32(spec.optimizer.sgd.learning_rate)
    n = 0
    t0 = time.perf_counter()
    for clock in range(spec.iterations):
        for r in range(WORKERS):
            idx = shards[r][samplers[r].batch(clock)]
            _, grads = model.loss_and_grad(params, data.X_train[idx], data.y_train[idx])
            for name, g in grads.items():
                params[name] -= lr * g
            n += 1
    elapsed = time.perf_counter() - t0
    acc = model.evaluate(params, data.X_test, data.y_test).accuracy
    return n / elapsed, float(acc or 0.0)


def start_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "ps_server.server", "--port", "0", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    assert proc.stdout is not None
    m = re.search(r"listening on ([\d.]+):(\d+)", proc.stdout.readline())
    assert m, "server did not start"
    return proc, f"{m.group(1)}:{m.group(2)}"


async def distributed_rate(spec: pb.RunSpec) -> tuple[float, float, dict[str, float]]:
    server, addr = start_server()
    workers = [subprocess.Popen([sys.executable, "-m", "worker.main", "--server", addr, "--once", "--log-level",
                                 "WARNING"], env=ENV, cwd=ROOT) for _ in range(WORKERS)]
    try:
        async with PsClient(addr) as c:
            await c.wait_ready(30)  # (listening is not yet answering, on a busy host)
            run = await c.create_run(spec)
            samples: list[tuple[float, int]] = []
            async for snap in c.watch_run(run.run_id, interval=0.1):
                if snap.run.state == pb.RUN_STATE_RUNNING:
                    samples.append((time.perf_counter(), snap.run.counters.pushes_applied))
                final = snap.run
        for w in workers:
            w.wait(60)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        server.terminate()
        server.wait(10)
    total = spec.iterations * WORKERS
    # the steady part: between 10% and 90% of the pushes
    steady = [(t, n) for t, n in samples if 0.1 * total <= n <= 0.9 * total]
    (t0, n0), (t1, n1) = steady[0], steady[-1]
    c = final.counters
    extra = {"pulls_served": c.pulls_served, "pulls_skipped": c.pulls_skipped,
             "staleness_mean": c.staleness_sum / max(1, c.pulls_served), "staleness_max": c.staleness_max}
    return (n1 - n0) / (t1 - t0), final.last_eval.eval_accuracy, extra


SINGLE = """
import time; t0 = time.time()
import json, numpy as np
from worker.datasets import load_dataset; from worker.models import build_model
data = load_dataset({"kind": "digits"}); model = build_model({"kind": "mlp", "hidden": [64]}, 64, 10)
params = model.init_params(0); rng = np.random.default_rng(0); lr = np.float32(0.1)
step = 0
while True:
    for idx in np.array_split(rng.permutation(len(data.X_train)), len(data.X_train) // 32):
        _, g = model.loss_and_grad(params, data.X_train[idx], data.y_train[idx])
        for n in g: params[n] -= lr * g[n]
        step += 1
        if step % 6 == 0 and model.evaluate(params, data.X_test, data.y_test).accuracy >= 0.95:
            print(json.dumps({"seconds": time.time() - t0, "steps": step})); raise SystemExit
"""


def time_to_accuracy_single() -> float:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", SINGLE], capture_output=True, text=True, env=ENV, cwd=ROOT,
                         check=True)
    json.loads(out.stdout)
    return time.time() - t0  # from this process's spawn: interpreter start-up included


def time_to_accuracy_psctl() -> tuple[float, float]:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "client.cli", "launch", "--local", "--workers", "4", "--model",
                          "mlp:64", "--dataset", "digits", "--staleness", "2", "--json"],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, check=True)
    doc = json.loads(out.stdout)
    reached = [p["time"] for p in doc["evals"] if (p["test_accuracy"] or 0) >= 0.95]
    return (min(reached) if reached else float("nan")) - t0, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=100,
                    help="of the rate runs (10 gave a ~0.2 s steady window and a 30 ms compute-only reference)")
    ap.add_argument("--compute-seconds", type=float, default=3.0, help="of each compute-only W = 4 measurement")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.repeats < 1 or args.epochs <= 0 or args.compute_seconds <= 0:
        ap.error("--repeats, --epochs and --compute-seconds must be positive")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM (a timeout) unwinds as Ctrl-C: the finally blocks stop what was started
    results: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    for _ in range(args.repeats):
        for s, staleness in (("inf", -1), ("2", 2)):
            spec = build_run_spec(LaunchOptions(model="mlp:64", dataset="digits", workers=WORKERS, staleness=staleness,
                                                epochs=args.epochs))
            rate_single, acc_single = compute_only(spec)
            rate_w = compute_only_procs(args.compute_seconds, WORKERS).its_s
            rate, acc, extra = asyncio.run(distributed_rate(spec))
            add(f"s={s} compute-only W={WORKERS} it/s", rate_w)
            add(f"s={s} one process it/s", rate_single)
            add(f"s={s} pushes/s", rate)
            add(f"s={s} ratio vs compute-only W={WORKERS} (target >= 15%)", rate / rate_w)
            add(f"s={s} ratio vs one process", rate / rate_single)
            add(f"s={s} accuracy (single {acc_single:.3f})", acc)
            for k, v in extra.items():
                add(f"s={s} {k}", v)
        add("single process to 0.95 (s)", time_to_accuracy_single())
        tta, wall = time_to_accuracy_psctl()
        add("psctl launch --local to 0.95 (s)", tta)
        add("psctl launch --local wall (s)", wall)
    add("time-to-accuracy ratio", statistics.median(results["psctl launch --local to 0.95 (s)"])
        / statistics.median(results["single process to 0.95 (s)"]))
    for k, v in results.items():
        print(f"{k:50s} median {statistics.median(v):10.3f}   all {[round(x, 3) for x in v]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    exit_with_parent()  # started by another bench: not to outlive it
    main()
