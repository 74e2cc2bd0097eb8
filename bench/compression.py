"""Compression (RunSpec.compression): bytes on the wire, accuracy, time to accuracy behind a slow
link, and the CPU the codecs cost.

    sudo .venv/bin/python bench/compression.py [--modes none,fp16,bf16,topk:0.01,topk:0.001,topk:0.01,fp16]
        [--rates 100mbit,1gbit] [--repeats 1] [--model mlp:512] [--iterations 300] [--lr 0.05]
        [--wide ITERATIONS] [--digits ITERATIONS] [--seeds N] [--skip-network] [--cpu] [--json out.json]
    .venv/bin/python bench/compression.py --cpu-only     # the codecs' CPU alone (no root needed)

Network: one ps-server on the host and 4 ps-worker processes in a network namespace joined to the
host by a veth pair whose two ends are shaped with ``tc qdisc add dev IF root tbf rate RATE burst
512kb latency 50ms`` (``bench/shards.py``'s link), so pushes (worker -> server) and pulls (server ->
worker) each get RATE (the recipe measured 0.97 Gbit/s at 1gbit on this machine). The workers reach the server over TCP (the
shared-memory plane is per network namespace). **Bytes on the wire** are the host-side veth's
``rx_bytes`` (pushes and requests) and ``tx_bytes`` (pulls, answers) from /sys, read before and
after each run and divided by the iterations of all ranks: TCP/IP headers and the control RPCs
(heartbeats, metric reports) included, nothing computed.

Each run: digits, ``--model`` (an MLP large enough that the network dominates: mlp:512 is 38k
parameters, 154 KB in float32, against ~0.3 ms of gradient per iteration), 4 workers, SSP s = 2,
SGD ``--lr`` (0.05: 0.95 comes after ~50 clocks, not in the first few), batch 32, the same seed for
every mode; rank 0 evaluates every 5 iterations. Time to 0.95 = from ``Run.started`` to the first
rank-0 evaluation with test accuracy >= 0.95. Modes and rates are interleaved within each repeat.

Accuracy (``--wide ITERATIONS``, ``--digits ITERATIONS``, ``--seeds N``): the wide MLP
(784-2048-2048-10 on ``synthetic-classification``, SGD lr 0.01) or the digits MLP (mlp:64, lr 0.1),
4 workers on this host (shared memory), SSP s = 2, batch 32, ITERATIONS per worker, for each mode
and seed: the final test accuracy and the wall time. (The digits test split is 359 examples: one
example is 0.28 points, hence the seeds.)

CPU (``--cpu``, also alone with ``--cpu-only``): per push of the wide MLP's gradient (784-2048-2048-10,
5.8M float32) and of mlp:512's, the median of 7 of: the worker's encoding (top-k selection, error
feedback, half-precision conversion), the server's decoding into float32 (TensorAssembler:
conversion, scatter of a sparse push), the server's conversion of the parameters for a pull (once
per version, shared by the readers of that version), the worker's conversion of a pull.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.shards import PREFIX, SUBNET, cleanup_net, ns_name, setup_net  # noqa: E402
from bench.straggler import machine, start_server, stop_procs  # noqa: E402
from client.spec import LaunchOptions, build_run_spec, parse_compression  # noqa: E402
from paramserver.client import PsClient  # noqa: E402
from paramserver.runtime import child_env, exit_with_parent  # noqa: E402
from paramserver.v1 import compress, unwire, wire  # noqa: E402
from paramserver.v1 import paramserver_pb2 as pb  # noqa: E402
from ps_server.codec import TensorAssembler  # noqa: E402
from worker.compression import PushCodec  # noqa: E402

ENV = child_env({**os.environ, "OPENBLAS_NUM_THREADS": "1"})  # children stop if this process dies
WORKERS = 4
TARGET = 0.95
WIDE = {"layer0.weight": (784, 2048), "layer0.bias": (2048,), "layer1.weight": (2048, 2048),
        "layer1.bias": (2048,), "layer2.weight": (2048, 10), "layer2.bias": (10,)}
MLP512 = {"layer0.weight": (64, 512), "layer0.bias": (512,), "layer1.weight": (512, 10), "layer1.bias": (10,)}


def counters(dev: str) -> tuple[int, int]:
    stats = Path(f"/sys/class/net/{dev}/statistics")
    return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())


def start_workers(port: int) -> list[subprocess.Popen[bytes]]:
    """The workers, in the shaped namespace, dialling the server on the host's side of the link."""
    return [subprocess.Popen(["ip", "netns", "exec", ns_name(0), sys.executable, "-m", "worker.main", "--server",
                              f"{SUBNET}.0.1:{port}", "--log-level", "WARNING", "--name", f"compression-bench-{i}"],
                             env=ENV, cwd=ROOT) for i in range(WORKERS)]


def ts(t: Any) -> float:
    return float(t.seconds + t.nanos * 1e-9)


async def one_run(port: int, host_if: str, mode: str, rate: str, args: argparse.Namespace, rep: int) -> dict[str, Any]:
    spec = build_run_spec(LaunchOptions(model=args.model, dataset="digits", workers=WORKERS, staleness=2, lr=args.lr,
                                        iterations=args.iterations, batch_size=32, seed=args.seed, eval_every=5,
                                        compress=mode, name=f"compression {mode} at {rate} #{rep}"))
    async with PsClient(f"127.0.0.1:{port}", timeout=60) as c:
        rx0, tx0 = counters(host_if)
        run = await c.create_run(spec)
        async with asyncio.timeout(args.run_timeout):
            async for snap in c.watch_run(run.run_id, interval=0.25):
                if snap.run.state not in (pb.RUN_STATE_PENDING, pb.RUN_STATE_RUNNING):
                    break
        rx1, tx1 = counters(host_if)
        final = await c.get_run(run.run_id)
        metrics = await c.get_metrics(run.run_id)
    if final.state != pb.RUN_STATE_COMPLETED:
        raise RuntimeError(f"{mode} at {rate}: the run ended {pb.RunState.Name(final.state)}: {final.message}")
    started = ts(final.started)
    evals = sorted((ts(p.time) - started, p.clock, p.eval_accuracy) for p in metrics.points if p.eval and p.rank == 0)
    hit = next((e for e in evals if e[2] >= TARGET), None)
    iterations = WORKERS * spec.iterations
    return {"mode": mode, "rate": rate, "repeat": rep, "run_id": run.run_id,
            "time_to_target": hit[0] if hit else None, "clock_at_target": hit[1] if hit else None,
            "final_accuracy": final.last_eval.eval_accuracy, "wall": ts(final.finished) - started,
            "wire_up_per_iter": (rx1 - rx0) / iterations, "wire_down_per_iter": (tx1 - tx0) / iterations,
            "counted_pushed_per_iter": final.counters.bytes_pushed / iterations,
            "counted_pulled_per_iter": final.counters.bytes_pulled / iterations,
            "pulls_served": int(final.counters.pulls_served), "evictions": int(final.counters.evictions)}


def network(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every mode at every rate, ``--repeats`` times: the link (``bench/shards.py``'s, one
    namespace), the server and the workers are set up anew for each rate."""
    if os.geteuid() != 0:
        raise SystemExit("the network part needs root (a network namespace and tc); --cpu-only does not")
    results: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for rate in args.rates:
            cleanup_net()
            setup_net(1, rate)
            server, addr = start_server("--host", "0.0.0.0")
            port = int(addr.rsplit(":", 1)[1])
            workers = start_workers(port)
            try:
                for mode in args.modes if rep % 2 == 0 else list(reversed(args.modes)):
                    r = asyncio.run(one_run(port, f"{PREFIX}0r", mode, rate, args, rep))
                    results.append(r)
                    t = "-" if r["time_to_target"] is None else f"{r['time_to_target']:.1f}s"
                    print(f"{rate:>8} {mode:>16}: to {TARGET}: {t}, final {r['final_accuracy']:.4f}, wall "
                          f"{r['wall']:.1f}s, wire up {r['wire_up_per_iter'] / 1e3:.1f} KB / down "
                          f"{r['wire_down_per_iter'] / 1e3:.1f} KB per iteration", flush=True)
            finally:
                stop_procs([*workers, server])
                cleanup_net()
    return results


ACCURACY = {  # --wide / --digits: (model, dataset, learning rate)
    "wide": ("mlp:2048,2048", "synthetic-classification:samples=10000,features=784,classes=10", 0.01),
    "digits": ("mlp:64", "digits", 0.1),
}


def accuracy(args: argparse.Namespace, which: str, iterations: int) -> list[dict[str, Any]]:
    """Final test accuracy per mode on this host (``psctl launch --local``), for seeds 0..--seeds-1."""
    model, dataset, lr = ACCURACY[which]
    rows = []
    for seed in range(args.seeds):
        for mode in args.modes:
            cmd = [sys.executable, "-m", "client.cli", "launch", "--local", "--model", model, "--dataset", dataset,
                   "--workers", str(WORKERS), "--staleness", "2", "--lr", str(lr), "--iterations", str(iterations),
                   "--batch-size", "32", "--seed", str(seed), "--compress", mode, "--json"]
            t = time.perf_counter()
            out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, check=True, timeout=3600)
            doc = json.loads(out.stdout)
            rows.append({"model": which, "mode": mode, "seed": seed, "final_accuracy": doc["test_accuracy"],
                         "wall": time.perf_counter() - t,
                         "bytes_pushed_per_iter": doc["bytes_pushed"] / doc["pushes_applied"],
                         "bytes_pulled_per_pull": doc["bytes_pulled"] / max(1, doc["pulls_served"])})
            r = rows[-1]
            print(f"{which} seed {seed} {mode:>16}: final accuracy {r['final_accuracy']:.4f}, wall {r['wall']:.0f}s, "
                  f"counted {r['bytes_pushed_per_iter'] / 1e6:.3f} MB per push, "
                  f"{r['bytes_pulled_per_pull'] / 1e6:.3f} MB per pull", flush=True)
    for mode in args.modes:
        accs = [r["final_accuracy"] for r in rows if r["mode"] == mode]
        print(f"{which} {mode:>16}: mean {statistics.fmean(accs):.4f} [{min(accs):.4f}-{max(accs):.4f}] over "
              f"{len(accs)} seeds", flush=True)
    return rows


def timed(f: Callable[[], Any], n: int = 7) -> float:
    f()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e3


def cpu_of(model: str, mode: str, grads: dict[str, np.ndarray], params: dict[str, np.ndarray]) -> dict[str, Any]:
    c = parse_compression(mode) or pb.Compression()
    dtype = c.dtype or pb.DATA_TYPE_FLOAT32
    codec = PushCodec(c)
    encode_ms = timed(lambda: codec.encode(grads))
    groups = list(wire.chunk_groups(codec.encode(grads) if mode != "none" else grads, 8 << 20))
    messages = [wire.join(wire.push_request_parts("r", 0, 1, 0, g, i == len(groups) - 1)) for i, g in enumerate(groups)]

    def assemble() -> None:
        asm = TensorAssembler(1 << 30, dtype=dtype, sparse=bool(c.topk_ratio))
        for m in messages:
            asm.add(unwire.decode_push_request(m).tensors)
        asm.finish()

    half = dtype != pb.DATA_TYPE_FLOAT32
    coded = {n: compress.encode(p, dtype) for n, p in params.items()}
    out = {n: np.empty(p.size, np.float32) for n, p in params.items()}
    return {"model": model, "mode": mode, "push_bytes": sum(len(m) for m in messages),
            "worker_encode_ms": encode_ms, "server_decode_ms": timed(assemble),
            "server_pull_convert_ms": timed(lambda: [compress.encode(p, dtype) for p in params.values()]) if half else 0.0,
            "worker_pull_convert_ms": timed(lambda: [compress.decode_into(coded[n], dtype, out[n]) for n in out])
            if half else 0.0}


def cpu(modes: list[str]) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows = []
    for model, shapes in (("wide MLP (5.8M)", WIDE), ("mlp:512 (38k)", MLP512)):
        grads = {n: (rng.standard_normal(s) * 1e-3).astype(np.float32) for n, s in shapes.items()}
        params = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
        for mode in modes:
            r = cpu_of(model, mode, grads, params)
            rows.append(r)
            print(f"{model:>16} {mode:>16}: push {r['push_bytes'] / 1e3:9.1f} KB, worker encode "
                  f"{r['worker_encode_ms']:7.2f} ms, server decode {r['server_decode_ms']:7.2f} ms, pull convert "
                  f"server {r['server_pull_convert_ms']:6.2f} / worker {r['worker_pull_convert_ms']:6.2f} ms", flush=True)
    return rows


def table(results: list[dict[str, Any]], modes: list[str], rates: list[str]) -> str:
    lines = ["| rate | mode | time to 0.95 (s), median [range] | vs none | final accuracy | wire up / down per "
             "iteration (KB) |", "|---|---|---|---|---|---|"]
    for rate in rates:
        base = None
        for mode in modes:
            rs = [r for r in results if r["rate"] == rate and r["mode"] == mode]
            times = [r["time_to_target"] for r in rs if r["time_to_target"] is not None]
            med = statistics.median(times) if times else None
            if mode == "none":
                base = med
            speed = f"{base / med:.2f}x" if base and med else "-"
            span = f"{med:.1f} [{min(times):.1f}-{max(times):.1f}]" if med else f"not reached ({len(rs)} runs)"
            acc = statistics.median(r["final_accuracy"] for r in rs)
            up = statistics.median(r["wire_up_per_iter"] for r in rs) / 1e3
            down = statistics.median(r["wire_down_per_iter"] for r in rs) / 1e3
            lines.append(f"| {rate} | {mode} | {span} | {speed} | {acc:.4f} | {up:.1f} / {down:.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="none,fp16,bf16,topk:0.01,topk:0.001,topk:0.01+fp16",
                    help="comma-separated; write a mode's own comma as + (topk:0.01+fp16)")
    ap.add_argument("--rates", default="100mbit,1gbit", help="tc rates, comma-separated; none = unshaped")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--model", default="mlp:512")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--wide", type=int, default=0, metavar="ITERATIONS", help="also the wide MLP's accuracy per mode")
    ap.add_argument("--digits", type=int, default=0, metavar="ITERATIONS", help="also the digits MLP's accuracy per mode")
    ap.add_argument("--seeds", type=int, default=1, help="of --wide and --digits: seeds 0..N-1")
    ap.add_argument("--skip-network", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-timeout", type=float, default=600.0)
    ap.add_argument("--cpu", action="store_true", help="also the codecs' CPU")
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM (a timeout) unwinds as Ctrl-C: the finally blocks stop what was started and remove the network
    args.modes = [m.replace("+", ",") for m in args.modes.split(",")]
    args.rates = args.rates.split(",")
    for mode in args.modes:
        parse_compression(mode)  # a bad mode fails now, not after the first runs
    out: dict[str, Any] = {"machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "json"}}
    if not args.cpu_only and not args.skip_network:
        out["runs"] = network(args)
        print(table(out["runs"], args.modes, args.rates))
    for which in ("digits", "wide"):
        if getattr(args, which) and not args.cpu_only:
            out[which] = accuracy(args, which, getattr(args, which))
    if args.cpu or args.cpu_only:
        out["cpu"] = cpu(args.modes)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    exit_with_parent()  # started by another bench: not to outlive it
    raise SystemExit(main())
