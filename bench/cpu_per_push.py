"""CPU per applied push of the server(s) and of the workers, small model, steady state.

    .venv/bin/python bench/cpu_per_push.py [--staleness inf] [--seconds 3] [--psctl] [--profile DIR]
        [--servers 1,2] [--repeats 3] [--compute-only]

A ps-server and four ps-worker processes (or, with ``--psctl``, ``psctl launch --local``, which
also follows the run) train the digits MLP-64 for 1000 epochs. After 2,000 pushes, the server's
and the workers' CPU time (user + system, from /proc) and the applied pushes are read, and again
``--seconds`` later. Prints pushes/s and milliseconds of CPU per applied push for each side: a
figure that, unlike the rate, hardly depends on what else runs on the machine.

``--servers N`` (a comma-separated list to compare, e.g. ``1,2``): N ps-servers holding the run
together (``--cluster`` on 127.0.0.1, or ``psctl launch --local --servers N``); every server's CPU
is read, and "server" is their sum per applied push (each push goes to every shard). The
configurations are measured in turn, ``--repeats`` times (the order alternating), and a table of
medians and ranges follows. ``--compute-only`` also times the issue's "compute-only" after each
round: four processes at once (``--compute-procs``, default 4: W processes training their own
copies, both cores busy; 1: one process on one core, the old reference), each doing the four
ranks' gradient computations and local SGD updates (1 BLAS thread, no communication), and gives
the applied-push rate against it (the small-model target's ratio) and the CPU of a push outside
its gradient: server + workers, less the reference's CPU per iteration (measured, not inferred
from the rate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.spec import (  # noqa: E402
    LaunchOptions,
    build_run_spec,
    parse_staleness,  # noqa: E402
)
from paramserver.client import PsClient  # noqa: E402
from paramserver.runtime import child_env, exit_with_parent  # noqa: E402

ENV = child_env({**os.environ, "OPENBLAS_NUM_THREADS": "1"})  # children stop if this process dies
WORKERS = 4


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren, ... (so that other users' servers are never counted)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(c) for c in f.read().split()]
                out += kids
                todo += kids
        except OSError:
            pass
    return out


def running(pids: list[int], module: str) -> list[int]:
    """Those of ``pids`` running ``python -m module``, ordered by pid (start order)."""
    out = []
    for pid in pids:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "-m" in args and args[args.index("-m") + 1] == module:
            out.append(pid)
    return sorted(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy of ``pid`` for ``seconds`` (samples only while it holds the GIL), folded stacks in ``out``."""
    spy = str(Path(sys.executable).with_name("py-spy"))  # not a dependency: .venv/bin/pip install py-spy
    return subprocess.Popen([spy, "record", "--gil", "--rate", "200", "-p", str(pid), "-d", str(int(seconds + 1)),
                             "-f", "raw", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def exited(pid: int) -> bool:
    """The process is gone or a zombie (it ended, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


async def measure(address: str, servers: list[int], workers: list[int], seconds: float,
                  prof: Path | None = None) -> dict[str, Any]:
    async with PsClient(address) as c:
        while not (runs := await c.list_runs()) or (await c.get_run(runs[0].run_id)).counters.pushes_applied < 2000:
            if any(exited(p) for p in servers + workers):  # (it would wait for ever)
                raise RuntimeError("a server or a worker exited before the run's first 2,000 pushes")
            await asyncio.sleep(0.2)
        run_id = runs[0].run_id
        a0, s0, w0, t0 = ((await c.get_run(run_id)).counters.pushes_applied, [cpu(s) for s in servers],
                          sum(cpu(w) for w in workers), time.monotonic())
        spies = [profile(pid, seconds, prof / f"{who}.txt") for who, pid in (("server", servers[0]), ("worker", workers[0]))] if prof else []
        await asyncio.sleep(seconds)
        a1, s1, w1, t1 = ((await c.get_run(run_id)).counters.pushes_applied, [cpu(s) for s in servers],
                          sum(cpu(w) for w in workers), time.monotonic())
        end = await c.get_run(run_id)
        await c.stop_run(run_id, "measured")
    for spy in spies:
        spy.wait()
    n = a1 - a0
    per_server = [1e3 * (b - a) / n for a, b in zip(s0, s1, strict=True)]
    return {"servers": len(servers), "pushes_s": n / (t1 - t0), "server_ms": sum(per_server), "per_server_ms": per_server,
            "workers_ms": 1e3 * (w1 - w0) / n, "server_cores": sum(s1) / (t1 - t0) - sum(s0) / (t1 - t0),
            "workers_cores": (w1 - w0) / (t1 - t0), "rank_clocks": [w.clock for w in end.workers],
            "staleness_mean": end.counters.staleness_sum / max(1, end.counters.pulls_served),
            "staleness_max": end.counters.staleness_max}


def describe(r: dict[str, Any], workers: int) -> str:
    each = " + ".join(f"{x:.3f}" for x in r["per_server_ms"])
    server = f"server {r['server_ms']:.3f} ms" if r["servers"] == 1 else \
        f"{r['servers']} servers together {r['server_ms']:.3f} ms ({each})"
    return (f"{r['pushes_s']:,.0f} pushes/s; CPU per applied push: {server}, "
            f"{workers} workers together {r['workers_ms']:.3f} ms; rank clocks {r['rank_clocks']}, "
            f"staleness mean {r['staleness_mean']:.1f} max {r['staleness_max']}")


def one(args: argparse.Namespace, n_servers: int) -> dict[str, Any]:
    """Start the servers and workers, measure, stop them."""
    procs: list[subprocess.Popen[str]] = []
    started: list[subprocess.Popen[str]] = []  # servers this function stops itself
    failed = True
    try:
        if args.psctl:
            launcher = subprocess.Popen(
                [sys.executable, "-m", "client.cli", "launch", "--local", "--workers", str(WORKERS), "--servers",
                 str(n_servers), "--model", "mlp:64", "--dataset", "digits", "--staleness", args.staleness,
                 "--epochs", "1000"],
                cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs.append(launcher)
            assert launcher.stdout is not None
            line = ""
            while "local ps-server" not in line:
                line = launcher.stdout.readline()
                assert line, "psctl ended before it started a server"
            address = re.search(r"local ps-servers? \(([^,)]+)", line).group(1)  # type: ignore[union-attr]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (
                    len(running(descendants(launcher.pid), "worker.main")) < WORKERS
                    or len(running(descendants(launcher.pid), "ps_server.server")) < n_servers):
                time.sleep(0.1)
            tree = descendants(launcher.pid)
            servers, workers = running(tree, "ps_server.server"), running(tree, "worker.main")
        else:
            ports = [free_port() for _ in range(n_servers)]
            addresses = [f"127.0.0.1:{p}" for p in ports]
            cluster = ["--cluster", ",".join(addresses)] if n_servers > 1 else []
            for i, port in enumerate(ports):
                srv = subprocess.Popen([sys.executable, "-m", "ps_server.server", "--port", str(port), "--log-level",
                                        "WARNING", *cluster, *(["--index", str(i)] if cluster else [])],
                                       cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
                procs.append(srv)
                started.append(srv)
            for srv in started:
                assert srv.stdout is not None
                assert "listening on" in srv.stdout.readline(), "a server did not start"
            address, servers = addresses[0], [s.pid for s in started]
            ws = [subprocess.Popen([sys.executable, "-m", "worker.main", "--server", address, "--once",
                                    "--log-level", "ERROR", *args.worker_arg], cwd=ROOT, env=ENV)
                  for _ in range(WORKERS)]
            procs += ws  # type: ignore[arg-type]
            workers = [w.pid for w in ws]

            async def create() -> None:
                async with PsClient(address) as c:
                    await c.wait_ready(30)
                    await c.create_run(build_run_spec(LaunchOptions(
                        model="mlp:64", dataset="digits", workers=WORKERS, staleness=parse_staleness(args.staleness), epochs=1000)))

            asyncio.run(create())
        assert len(servers) == n_servers and len(workers) == WORKERS, (servers, workers)
        result = asyncio.run(measure(address, servers, workers, args.seconds, args.profile))
        failed = False
        return result
    finally:
        # the workers (and psctl) end with the stopped run; hand-started servers are stopped here, and
        # everything when the run was not stopped (psctl with SIGTERM: it stops the processes it started)
        for p in reversed(procs):
            if (p in started or failed) and p.poll() is None:
                p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Reference(NamedTuple):
    its_s: float
    """iterations/s, summed over the processes"""
    cpu_ms: float
    """their CPU time per iteration (milliseconds): what "the gradient" costs when nothing else runs"""


def compute_only(seconds: float, procs: int = 1) -> Reference:
    """``procs`` processes at once (1 BLAS thread each), each doing the 4 ranks' digits MLP-64
    gradients and local SGD updates (as ``bench/small_model.py``'s reference): their summed rate
    and CPU per iteration. ``procs`` = 4 is the issue's "compute-only": W processes training
    their own copies, both cores busy."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT)!r})
import numpy as np
from client.spec import LaunchOptions, build_run_spec
from worker.datasets import load_dataset
from worker.models import build_model
from worker.sampling import BatchSampler, shard_indices
spec = build_run_spec(LaunchOptions(model="mlp:64", dataset="digits", workers={WORKERS}, epochs=400))
data = load_dataset(json.loads(spec.data_spec_json))
model = build_model(json.loads(spec.model_spec_json), data.n_features, data.n_outputs)
params = model.init_params(spec.seed)
shards = [shard_indices(len(data.X_train), r, {WORKERS}, spec.seed) for r in range({WORKERS})]
samplers = [BatchSampler(len(s), spec.batch_size, spec.seed, r) for r, s in enumerate(shards)]
lr = np.float32(spec.optimizer.sgd.learning_rate)
n, clock, t0, c0 = 0, 0, time.perf_counter(), time.process_time()
while time.perf_counter() - t0 < {seconds}:
    for r in range({WORKERS}):
        idx = shards[r][samplers[r].batch(clock)]
        _, grads = model.loss_and_grad(params, data.X_train[idx], data.y_train[idx])
        for name, g in grads.items():
            params[name] -= lr * g
        n += 1
    clock += 1
print(json.dumps([n, time.perf_counter() - t0, time.process_time() - c0]))
"""
    runs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
            for _ in range(procs)]
    done = [json.loads(r.communicate()[0]) for r in runs]
    return Reference(sum(n / wall for n, wall, _ in done), 1e3 * sum(c for _, _, c in done) / sum(n for n, _, _ in done))


def outside(r: dict[str, Any]) -> float:
    """Issue 17's figure: the CPU of a push outside its gradient (server + workers, less one
    compute-only iteration's CPU), milliseconds."""
    return float(r["server_ms"] + r["workers_ms"] - r["compute_cpu_ms"])


def table(results: list[dict[str, Any]], compute: list[Reference], procs: int = 1) -> str:
    med = statistics.median

    def span(xs: list[float], fmt: str) -> str:
        return f"{format(med(xs), fmt)} [{format(min(xs), fmt)}-{format(max(xs), fmt)}]"

    head = "| servers | applied pushes/s | server CPU ms per push (all servers) | per server | workers CPU ms per push |"
    if compute:
        head += " vs compute-only (paired) | ms outside the gradient (paired) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for n in sorted({r["servers"] for r in results}):
        sel = [r for r in results if r["servers"] == n]
        each = " / ".join(f"{med([r['per_server_ms'][i] for r in sel]):.3f}" for i in range(n))
        row = (f"| {n} | {span([r['pushes_s'] for r in sel], ',.0f')} | {span([r['server_ms'] for r in sel], '.3f')} "
               f"| {each} | {span([r['workers_ms'] for r in sel], '.3f')} |")
        if compute:
            ratios = [100 * r["pushes_s"] / r["compute_its"] for r in sel]
            row += f" {span(ratios, '.1f')}% | {span([outside(r) for r in sel], '.3f')} |"
        lines.append(row)
    if compute:
        lines.append("")
        lines.append(f"compute-only ({procs} process{'es at once' if procs > 1 else ''}, 1 BLAS thread each, the 4 "
                     f"ranks' gradients + SGD{', rates summed' if procs > 1 else ''}): "
                     f"{span([c.its_s for c in compute], ',.0f')} it/s, {span([c.cpu_ms for c in compute], '.3f')} ms "
                     "of CPU per iteration")
    return "\n".join(lines)


def positive(kind: type[int] | type[float]) -> Any:
    """An argparse type: a number of ``kind`` above 0 (else a usage error naming it)."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0:
            raise ValueError(text)
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _counts(text: str) -> list[int]:
    counts = [int(n) for n in text.split(",")]
    if not all(n > 0 for n in counts):
        raise ValueError(text)
    return counts


_counts.__name__ = "server counts"


def _staleness(text: str) -> str:
    try:
        parse_staleness(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--staleness", default="inf", type=_staleness)
    ap.add_argument("--seconds", type=positive(float), default=3.0)
    ap.add_argument("--psctl", action="store_true", help="through psctl launch --local (which follows the run)")
    ap.add_argument("--servers", default=[1], type=_counts, help="ps-servers holding the run (a cluster when > 1); "
                    "comma-separated to compare, e.g. 1,2")
    ap.add_argument("--repeats", type=positive(int), default=1, help="rounds over the --servers configurations")
    ap.add_argument("--compute-only", action="store_true",
                    help="also time the compute-only reference after each round, and give the ratio")
    ap.add_argument("--compute-seconds", type=positive(float), default=3.0)
    ap.add_argument("--compute-procs", type=positive(int), default=WORKERS,
                    help="compute-only processes at once (default 4: W processes, both cores busy, the issue's "
                    "reference; 1: one process, one core)")
    ap.add_argument("--worker-arg", action="append", default=[], help="passed to each ps-worker (e.g. --no-shm)")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="record py-spy of server 0 and one worker during the window into DIR (skews the figures)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    # SIGTERM (a timeout) unwinds like Ctrl-C: the finally blocks stop the processes started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    counts = args.servers
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    compute: list[Reference] = []
    for rep in range(args.repeats):
        round_ = []
        for n in counts if rep % 2 == 0 else counts[::-1]:
            r = one(args, n)
            round_.append(r)
            who = "psctl launch --local" if args.psctl else f"ps-server{f' x {n}' if n > 1 else ''} + {WORKERS} ps-worker"
            print(f"{who}: {describe(r, WORKERS)}", flush=True)
        if args.compute_only:
            c = compute_only(args.compute_seconds, args.compute_procs)
            compute.append(c)
            for r in round_:
                r["compute_its"], r["compute_cpu_ms"] = c
            print(f"compute-only ({args.compute_procs} process{'es' if args.compute_procs > 1 else ''}): {c.its_s:,.0f} it/s, {c.cpu_ms:.3f} ms of CPU per iteration; applied pushes/s "
                  "against it, and CPU per push outside the gradient (server + workers - that): "
                  + ", ".join(f"{r['servers']} server(s) {100 * r['pushes_s'] / c.its_s:.1f}%, {outside(r):.3f} ms"
                              for r in round_), flush=True)
        results += round_
    if args.repeats > 1 or len(counts) > 1 or args.compute_only:
        print()
        print(table(results, compute, args.compute_procs))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "compute_only": [c._asdict() for c in compute]}, indent=1))


if __name__ == "__main__":
    exit_with_parent()  # started by another bench: not to outlive it
    main()
