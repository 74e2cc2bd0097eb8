"""The least CPU per push a parameter server in Python spends on this machine: a reference for
``cpu_per_push.py``, not a part of paramserver.

    .venv/bin/python bench/python_floor.py [--workers 4] [--seconds 5] [--nice 10] [--repeats 3] [--compute-only] [--asyncio]
        [--server-us US] [--worker-us US] [--spread]

The same job as ``cpu_per_push.py`` (digits MLP-64, the run spec's data shards, batches, initial
parameters and learning rate, W workers, unbounded staleness), with nothing but the exchange: each
worker (a forked process, at ``--nice``) computes its gradient with the project's model, writes it
as raw float32 bytes into a Unix socket and reads the whole model back; the server (this process)
waits in epoll, applies W <- W - lr * g and answers with the parameters. No protocol, no clocks, no
SSP, no de-duplication, no checks, no event loop (``--asyncio``: the server's loop is asyncio's,
as ps-server's), one copy each way: what is left is the gradient, the system calls, the wake-ups
and the smallest Python around them. The server's and the workers' CPU time (user + system, from
/proc) is read after one second and again ``--seconds`` later; "outside the gradient" subtracts
one compute-only iteration's CPU (``cpu_per_push.compute_only`` with W processes at once, its CPU
time per iteration), as the issue's figure does.

``--server-us`` / ``--worker-us``: the server (before each step) or each worker (before each send)
also runs that much interpreted Python per push, as timed in one warm process: what a push's
bookkeeping would cost where nothing else runs. By default one tight loop (a small footprint);
with ``--spread``, calls of as many distinct generated functions, each on its own objects (the
footprint of a protocol's many small functions). What that Python costs per push among the other
processes, against its warm cost, says whether a push's CPU is the work it does or the code it
touches (RESULTS, Performance round 2, section 18).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["OPENBLAS_NUM_THREADS"] = "1"  # (before numpy: each process one core, as the workers)

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from cpu_per_push import compute_only, cpu  # noqa: E402

from client.spec import LaunchOptions, build_run_spec  # noqa: E402
from worker.datasets import load_dataset  # noqa: E402
from worker.models import build_model  # noqa: E402
from worker.sampling import BatchSampler, shard_indices  # noqa: E402


def _views(flat: np.ndarray, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``like``'s tensors as consecutive views of the 1-D ``flat``."""
    out, at = {}, 0
    for name, a in like.items():
        out[name] = flat[at : at + a.size].reshape(a.shape)
        at += a.size
    return out


class _Pair:
    __slots__ = ("a", "b")

    def __init__(self, i: int) -> None:
        self.a, self.b = i, 2 * i


def _tight(n: int) -> Callable[[], int]:
    """A pass of a loop over ``n`` small objects (one function: a small footprint)."""
    objs = [_Pair(i) for i in range(n)]

    def run() -> int:
        t = 0
        for o in objs:
            t += o.a + o.b
        return t
    return run


def _spread(n: int) -> Callable[[], int]:
    """Calls of ``n`` distinct functions, each a little different Python on objects of its own."""
    src = "".join(f"""
class C{i}:
    __slots__ = ("x", "y", "d")
    def __init__(self):
        self.x, self.y, self.d = {i}, {3 * i}, {{"k": {i}, "j": [{i}, {i + 1}]}}
    def m(self, v):
        t = self.x + v
        if t % {i + 2} == 1:
            t += self.d["k"]
        for z in self.d["j"]:
            t ^= z + {i}
        return t + self.y + len(self.d)
o{i} = C{i}()
def f{i}(v):
    return o{i}.m(v) + {i}
""" for i in range(n))
    ns: dict[str, Any] = {}
    exec(src, ns)  # noqa: S102 (generated here: distinct code objects are the point)
    fs = [ns[f"f{i}"] for i in range(n)]

    def run() -> int:
        t = 0
        for f in fs:
            t += f(t & 1023)
        return t
    return run


def extra_python(us: float, spread: bool) -> Callable[[], Any]:
    """A function running about ``us`` microseconds of interpreted Python (timed here, warm)."""
    if us <= 0:
        return lambda: None
    make = _spread if spread else _tight

    def warm_us(run: Callable[[], Any]) -> float:
        for _ in range(50):
            run()
        t0 = time.thread_time_ns()
        for _ in range(200):
            run()
        return (time.thread_time_ns() - t0) / 200 / 1e3

    n = max(1, round(100 * us / warm_us(make(100))))
    return make(max(1, round(n * us / warm_us(make(n)))))  # (once more at that size: a pass costs more than its units)


def _sleeps(pid: int) -> int:
    """The times process ``pid`` went to sleep (its voluntary context switches)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))


def _worker(sock: socket.socket, rank: int, workers: int, nice: int, extra_us: float = 0.0, spread: bool = False) -> None:
    """Gradient, send it, read the parameters back; until the server closes the socket."""
    os.nice(nice)
    extra = extra_python(extra_us, spread)
    spec = build_run_spec(LaunchOptions(model="mlp:64", dataset="digits", workers=workers, epochs=1000))
    data = load_dataset(json.loads(spec.data_spec_json))
    model = build_model(json.loads(spec.model_spec_json), data.n_features, data.n_outputs)
    init = model.init_params(spec.seed)
    flat = np.concatenate([a.reshape(-1) for a in init.values()]).astype(np.float32)
    grad = np.empty_like(flat)
    params, grads = _views(flat, init), _views(grad, init)  # the answer lands in place
    shard = shard_indices(len(data.X_train), rank, workers, spec.seed)
    X, y = data.X_train[shard], data.y_train[shard]
    sampler = BatchSampler(len(shard), spec.batch_size, spec.seed, rank)
    answer = flat.data.cast("B")
    clock = 0
    while True:
        batch = sampler.batch(clock)
        _, g = model.loss_and_grad(params, X[batch], y[batch])
        for name, v in g.items():
            grads[name][...] = v
        extra()
        try:
            sock.sendall(grad.data)
            got = 0
            while got < answer.nbytes:
                n = sock.recv_into(answer[got:])
                if not n:
                    return
                got += n
        except OSError:
            return
        clock += 1


def measure(workers: int, seconds: float, nice: int, use_asyncio: bool = False, server_us: float = 0.0,
            worker_us: float = 0.0, spread: bool = False) -> dict[str, float]:
    spec = build_run_spec(LaunchOptions(model="mlp:64", dataset="digits", workers=workers, epochs=1000))
    data = load_dataset(json.loads(spec.data_spec_json))
    model = build_model(json.loads(spec.model_spec_json), data.n_features, data.n_outputs)
    init = model.init_params(spec.seed)
    w = np.concatenate([a.reshape(-1) for a in init.values()]).astype(np.float32)
    lr = np.float32(spec.optimizer.sgd.learning_rate)
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(workers)]
    pids = []
    for rank in range(workers):
        pid = os.fork()
        if pid == 0:
            try:
                for i, (mine, theirs) in enumerate(pairs):
                    mine.close()
                    if i != rank:
                        theirs.close()
                _worker(pairs[rank][1], rank, workers, nice, worker_us, spread)
            finally:
                os._exit(0)
        pids.append(pid)
    bufs: dict[int, tuple[socket.socket, memoryview, np.ndarray]] = {}
    got: dict[int, int] = {}
    for mine, theirs in pairs:
        theirs.close()
        g = np.empty_like(w)
        bufs[mine.fileno()] = (mine, g.data.cast("B"), g)
        got[mine.fileno()] = 0
    step = np.empty_like(w)
    pushes = [0]
    extra = extra_python(server_us, spread)

    def serve(fd: int) -> None:
        """A readable worker's socket: the rest of its gradient, then the step and the answer."""
        sock, view, g = bufs[fd]
        got[fd] += sock.recv_into(view[got[fd]:])
        if got[fd] < view.nbytes:
            return
        got[fd] = 0
        extra()
        np.multiply(g, lr, out=step)
        np.subtract(w, step, out=w)
        sock.sendall(w.data)
        pushes[0] += 1

    def figures() -> tuple[float, int, float, float, int]:
        return time.monotonic(), pushes[0], cpu(os.getpid()), sum(cpu(p) for p in pids), sum(map(_sleeps, pids))

    try:
        if use_asyncio:
            async def loop() -> tuple[tuple[float, int, float, float, int], tuple[float, int, float, float, int]]:
                ev = asyncio.get_running_loop()
                for fd in bufs:
                    ev.add_reader(fd, serve, fd)
                await asyncio.sleep(1.0)  # (the workers have loaded their data)
                first = figures()
                await asyncio.sleep(seconds)
                return first, figures()

            mark, end = asyncio.run(loop())
        else:
            ep = select.epoll()
            for fd in bufs:
                ep.register(fd, select.EPOLLIN)
            start, mark = time.monotonic(), None
            while True:
                for fd, _ in ep.poll(0.1):
                    serve(fd)
                if mark is None and time.monotonic() - start > 1.0:
                    mark = figures()
                elif mark is not None and time.monotonic() - mark[0] >= seconds:
                    end = figures()
                    break
    finally:
        for sock, _, _ in bufs.values():
            sock.close()
        for p in pids:
            os.waitpid(p, 0)
    assert mark is not None
    n = end[1] - mark[1]
    server, workers_cpu = end[2] - mark[2], end[3] - mark[3]
    accuracy = model.evaluate(_views(w, init), data.X_test, data.y_test).accuracy
    return {"pushes_s": n / (end[0] - mark[0]), "server_ms": 1e3 * server / n, "workers_ms": 1e3 * workers_cpu / n,
            "accuracy": float(accuracy or 0.0), "sleeps": (end[4] - mark[4]) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--nice", type=int, default=10, help="the workers' nice value (as psctl launch --local's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--asyncio", action="store_true",
                    help="the server as asyncio runs it (a reader callback per socket, as ps-server's data planes)")
    ap.add_argument("--compute-only", action="store_true",
                    help="also time compute-only (W processes at once) after each round")
    ap.add_argument("--server-us", type=float, default=0.0,
                    help="microseconds of interpreted Python (warm) the server also runs per push")
    ap.add_argument("--worker-us", type=float, default=0.0,
                    help="microseconds of interpreted Python (warm) each worker also runs per push")
    ap.add_argument("--spread", action="store_true",
                    help="that Python as calls of many distinct functions (a broad footprint), not one loop")
    args = ap.parse_args()
    rows = []
    for i in range(args.repeats):
        r = measure(args.workers, args.seconds, args.nice, args.asyncio, args.server_us, args.worker_us, args.spread)
        line = (f"round {i + 1}: {r['pushes_s']:,.0f} pushes/s; CPU per push: server {r['server_ms']:.3f} ms, "
                f"{args.workers} workers {r['workers_ms']:.3f} ms (they slept {r['sleeps']:.2f} times per push); "
                f"test accuracy {r['accuracy']:.3f}")
        if args.compute_only:
            r["compute_its"], r["compute_cpu_ms"] = compute_only(3.0, args.workers)
            outside = r["server_ms"] + r["workers_ms"] - r["compute_cpu_ms"]
            line += (f"; compute-only {r['compute_its']:,.0f} it/s, {100 * r['pushes_s'] / r['compute_its']:.1f}% of it, "
                     f"{outside:.3f} ms outside the gradient")
        print(line, flush=True)
        rows.append(r)
    med = statistics.median
    print(f"median: {med(r['pushes_s'] for r in rows):,.0f} pushes/s, server {med(r['server_ms'] for r in rows):.3f} + "
          f"workers {med(r['workers_ms'] for r in rows):.3f} ms of CPU per push")


if __name__ == "__main__":
    main()
