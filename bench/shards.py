"""Sharding (issue 15): aggregate push + pull bandwidth over 1, 2 and 4 ps-servers, each behind a
1 Gbit/s link; and a model larger than one server's ``--max-param-bytes``.

    sudo .venv/bin/python bench/shards.py                     # shaped + loopback, both models, W = 2 and 1 (~11 min)
    .venv/bin/python bench/shards.py --net loopback --quick   # no root: unshaped loopback only
    .venv/bin/python bench/shards.py --demo-only              # only the too-big-for-one-server demonstration
    sudo .venv/bin/python bench/shards.py --cleanup           # remove what a crashed run left behind

**Shaped** (``--net shaped``, needs root): server i runs in its own network namespace
``psbsh-s<i>``, reached over a veth pair (root side ``psbsh<i>r`` 10.231.i.1, namespace side
``psbsh<i>n`` 10.231.i.2) whose both ends have ``tc qdisc ... root tbf rate 1gbit burst 512kb
latency 50ms``: the server's NIC is 1 Gbit/s each way. Workers run in the root namespace
(unlimited). Servers reach each other through the root namespace (ip_forward, and one iptables
FORWARD rule accepting traffic between these veths only, tagged with a comment and removed at the
end). Every server has a fixed ``--data-port``, so the TCP data plane is used (the workers do not use
the shared-memory plane even on loopback: this bench is about the network); the workers report
the streams they opened per shard (``route.opened``) and GetRun's per-rank ``data_plane`` is
recorded. A raw TCP measurement through one shaped link (both directions at once) gives the
ceiling. **Loopback** (``--net loopback``): the same servers on 127.0.0.1, no shaping.

Workload: per shard count N (1, 2, 4), N servers (a ``--cluster`` for N > 1; a plain server for
N = 1) hold an ASP run (SGD lr 1e-9, staleness -1, ``--workers`` ranks) of each model:

* ``mlp-5.8M``: the 784-2048-2048-10 MLP of the other benches, 5,824,522 float32 = 23.3 MB;
  its two weight matrices are split by rows over the servers (``--split-bytes`` 1 MiB).
* ``big-100M``: one 100,000 x 1,000 float32 tensor, 400 MB, split by rows.

W worker processes per configuration (``--workers``; a list such as ``2,1`` runs each count as a
phase of its own) use the SDK's data path as ps-worker does in its steady state (``--role
worker``): ``Shards.push_pull`` of zeros into reused arrays (push iteration c, pull for c + 1 in
one round trip, every shard at once), or ``PsClient.push_pull`` for one server. They join each
run, then warm up one worker at a time (so their streams open on idle links). Repetitions: all W
workers of one configuration start together and each runs ``--seconds`` (5.8M; at least 3
iterations) or ``--big-iters`` iterations (100M). Aggregate bytes/s = (bytes pushed + pulled by
all workers) / (last end - first start). Every configuration of a phase (network x shard count)
stays up and every repetition visits each of them in turn, the order alternating (interleaved,
against a shared host's noise); the table gives medians and [min-max]. Before each repetition
the host's busy CPU is sampled for ``--idle-seconds`` while this bench idles ("others before":
what other users take). CPU over the repetition: user + system of the servers and the workers
(from /proc), and the whole machine's busy and softirq shares (from /proc/stat, other users
included). "Shard skew": per iteration of a sharded run, (last shard's answer - first shard's
answer) / the iteration's time, median.

**Too big for one server** (``--demo``, on loopback, no root): ``PS_MAX_PARAM_BYTES`` below the
5.8M MLP's 23.3 MB: ``psctl launch --local --servers 1`` is refused (its message is shown), and
``--servers 2`` trains it (2 ps-workers, synthetic-classification, a few iterations).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paramserver.runtime import child_env, exit_with_parent  # noqa: E402

PREFIX = "psbsh"  # namespaces psbsh-s<i>, veths psbsh<i>r / psbsh<i>n: every name this bench creates
SUBNET = "10.231"  # 10.231.<i>.0/24 per server link
IPT_COMMENT = "paramserver-bench-shards"
IPT_RULE = ["FORWARD", "-i", f"{PREFIX}+", "-o", f"{PREFIX}+", "-m", "comment", "--comment", IPT_COMMENT,
            "-j", "ACCEPT"]
MALLOC_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
ENV = child_env({k: v for k, v in os.environ.items() if k not in MALLOC_KEYS} | {
    "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})  # children stop if this process dies
CLK = os.sysconf("SC_CLK_TCK")

MODELS: dict[str, dict[str, tuple[int, ...]]] = {
    "mlp-5.8M": {"layer0.weight": (784, 2048), "layer0.bias": (2048,), "layer1.weight": (2048, 2048),
                 "layer1.bias": (2048,), "layer2.weight": (2048, 10), "layer2.bias": (10,)},
    "big-100M": {"w": (100_000, 1_000)},
}


def nbytes_of(model: str) -> int:
    total = 0
    for shape in MODELS[model].values():
        n = 1
        for d in shape:
            n *= d
        total += 4 * n
    return total


# ------------------------------------------------------------------------------ /proc
def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLK


def machine_ticks() -> tuple[int, int, int]:
    """(busy, softirq, total) jiffies of the whole machine (all CPUs) from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]  # idle + iowait
    total = sum(f[:8])  # user nice system idle iowait irq softirq steal
    return total - idle, f[6], total


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ------------------------------------------------------------------------------ network namespaces
def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def ns_name(i: int) -> str:
    return f"{PREFIX}-s{i}"


def ns_host(i: int) -> str:
    return f"{SUBNET}.{i}.2"


def cleanup_net() -> list[str]:
    """Remove every namespace, veth and iptables rule of this bench (also a crashed run's); the
    processes still inside those namespaces (this bench's servers) are killed first. Returns what
    was removed."""
    removed = []
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(f"{PREFIX}-"):
            continue
        for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
                removed.append(f"process {pid} in {name}")
        sh("ip", "netns", "del", name, check=False)
        removed.append(f"namespace {name}")
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(r"\d+: ([^:@]+)", line)
        if m and m.group(1).startswith(PREFIX):
            sh("ip", "link", "del", m.group(1), check=False)
            removed.append(f"link {m.group(1)}")
    while sh("iptables", "-C", *IPT_RULE, check=False).returncode == 0:
        sh("iptables", "-D", *IPT_RULE, check=False)
        removed.append("iptables rule")
    return removed


def setup_net(count: int, rate: str) -> None:
    """``count`` namespaces, each behind a veth shaped to ``rate`` both ways, routed via the root ns."""
    if sh("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() != "1":
        # The host forwards already (docker); this bench does not change the host's settings.
        raise RuntimeError("net.ipv4.ip_forward is 0: the servers could not reach each other; enable it first")
    taken = sh("ip", "-o", "addr", "show").stdout
    if f" {SUBNET}." in taken:
        raise RuntimeError(f"addresses in {SUBNET}.0.0/16 are in use on this host; change SUBNET in {__file__}")
    sh("iptables", "-I", *IPT_RULE)
    for i in range(count):
        ns, root_if, ns_if = ns_name(i), f"{PREFIX}{i}r", f"{PREFIX}{i}n"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", root_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", ns)
        sh("ip", "addr", "add", f"{SUBNET}.{i}.1/24", "dev", root_if)
        sh("ip", "link", "set", root_if, "up")
        sh("ip", "-n", ns, "addr", "add", f"{ns_host(i)}/24", "dev", ns_if)
        sh("ip", "-n", ns, "link", "set", ns_if, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", f"{SUBNET}.{i}.1")
        for dev_ns in ([], ["-n", ns]):  # root side egress = server ingress; ns side egress = server egress
            dev = ns_if if dev_ns else root_if
            sh("tc", *dev_ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "512kb",
               "latency", "50ms")


# ------------------------------------------------------------------------------ raw TCP through a link
SINK = r"""
import socket, sys, threading, time
host, port = sys.argv[1], int(sys.argv[2])
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); ls.bind((host, port)); ls.listen(4)
print("ready", flush=True)
def recv(c):
    buf = bytearray(1 << 20)
    while c.recv_into(buf):
        pass
def send(c):
    buf = bytes(1 << 20)
    try:
        while True:
            c.sendall(buf)
    except OSError:
        pass
for role in (recv, send):
    c, _ = ls.accept()
    threading.Thread(target=role, args=(c,), daemon=True).start()
time.sleep(float(sys.argv[3]) + 5)
"""


def raw_link(i: int, seconds: float = 3.0) -> dict[str, float]:
    """Gbit/s of raw TCP into and out of namespace ``i`` at the same time (the shaped ceiling)."""
    port = 5999
    sink = subprocess.Popen(["ip", "netns", "exec", ns_name(i), sys.executable, "-c", SINK, ns_host(i), str(port),
                             str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        up = socket.create_connection((ns_host(i), port))
        down = socket.create_connection((ns_host(i), port))
        got = {"in": 0, "out": 0}

        def send() -> None:
            buf = bytes(1 << 20)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                up.sendall(buf)
                got["in"] += len(buf)

        def recv() -> None:
            buf = bytearray(1 << 20)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                got["out"] += down.recv_into(buf)

        t0 = time.monotonic()
        threads = [threading.Thread(target=f) for f in (send, recv)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        el = time.monotonic() - t0
        up.close()
        down.close()
        return {"in_gbit": 8 * got["in"] / el / 1e9, "out_gbit": 8 * got["out"] / el / 1e9}
    finally:
        sink.kill()
        sink.wait()


# ------------------------------------------------------------------------------ worker role
async def worker_main(args: argparse.Namespace) -> None:
    """Join each run, warm up, say "ready", then serve {"op": "rep", ...} commands from stdin."""
    import numpy as np

    from paramserver import errors
    from paramserver.client import PsClient
    from paramserver.runtime import tune_malloc
    from paramserver.shards import Shards
    from paramserver.v1 import paramserver_pb2 as pb

    tune_malloc()  # as ps-worker does
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {args.name} %(levelname)s %(message)s")
    runs = json.loads(args.runs)  # model -> run id
    loop = asyncio.get_running_loop()
    # TCP, as between hosts (on loopback the workers could use the shared-memory plane instead)
    async with PsClient(args.server, timeout=900.0, shm=False) as client:
        benches: dict[str, dict[str, Any]] = {}
        await client.wait_ready(120)  # a busy host can take a while to start every process
        for model, run_id in runs.items():
            for attempt in range(10):
                try:
                    joined = await client.join(args.name, run_id=run_id, max_wait=60)
                    break
                except errors.Unavailable:
                    if attempt == 9:
                        raise
                    await asyncio.sleep(1.0)
            a = joined.assignment
            plane: Any = Shards.beside(client, a.shard_map, a.spec) if a.shard_map.shards else client
            b = benches[model] = {"a": a, "plane": plane, "clock": a.start_clock, "params": {}, "skews": [],
                                  "done": [0.0] * len(a.shard_map.shards),
                                  "zeros": {n: np.zeros(s, np.float32) for n, s in MODELS[model].items()}}
            for i, c in enumerate(plane.clients if isinstance(plane, Shards) else []):
                c.push_pull = _timed(c.push_pull, b["done"], i)  # when each shard answered, for the skew
        for b in benches.values():
            deadline = time.monotonic() + 300
            while (await client.get_run(b["a"].run_id)).state != pb.RUN_STATE_RUNNING:  # until every rank joined
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run {b['a'].run_id} did not start within 300 s")
                await asyncio.sleep(0.1)
        print(json.dumps({"kind": "joined"}), flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            if cmd["op"] == "warmup":  # one worker at a time: its streams open on idle links
                for b in benches.values():
                    for _ in range(args.warmup):
                        await step(b)
                print(json.dumps({"kind": "warm"}), flush=True)
                continue
            b = benches[cmd["model"]]
            b["skews"] = []
            c0 = time.process_time()
            t0 = time.monotonic()
            n = 0
            while n < cmd["min_iters"] or time.monotonic() - t0 < cmd["seconds"]:
                await step(b)
                n += 1
            t1 = time.monotonic()
            plane = b["plane"]
            clients = plane.clients if isinstance(plane, Shards) else [plane]
            print(json.dumps({"kind": "rep", "start": t0, "end": t1, "iters": n, "cpu": time.process_time() - c0,
                              "opened": [dict(c.route.opened) for c in clients],
                              "skew": statistics.median(b["skews"]) if b["skews"] else 0.0}), flush=True)
        for b in benches.values():
            if isinstance(b["plane"], Shards):
                await b["plane"].close()


def _timed(call: Any, done: list[float], i: int) -> Any:
    async def timed(*args: Any, **kwargs: Any) -> Any:
        out = await call(*args, **kwargs)
        done[i] = time.monotonic()
        return out

    return timed


async def step(b: dict[str, Any]) -> None:
    """One iteration, as ps-worker's steady state: push iteration c and pull for c + 1 in one round
    trip. For a sharded run, records the skew: (last shard's answer - first shard's) / the iteration."""
    a = b["a"]
    t0 = time.monotonic()
    ack, _ = await b["plane"].push_pull(a.run_id, a.rank, a.incarnation, b["clock"], b["zeros"], into=b["params"],
                                        max_wait=600)
    if len(b["done"]) > 1:
        b["skews"].append((max(b["done"]) - min(b["done"])) / (time.monotonic() - t0))
    b["clock"] = ack.clock


# ------------------------------------------------------------------------------ orchestrator
def _drain(stream: Any, log: Any) -> None:
    with contextlib.suppress(OSError, ValueError):
        for line in stream:
            log.write(line)
            log.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Config:
    """N servers (in namespaces 0..N-1, or on loopback) with one run per model and W workers."""

    def __init__(self, net: str, shards: int, models: list[str], workers: int, warmup: int, log: Any,
                 server_args: list[str]) -> None:
        self.net, self.shards, self.models, self.log = net, shards, models, log
        self.label = f"{net}/{shards} shard{'s' * (shards > 1)}"
        self.servers: list[subprocess.Popen[str]] = []
        self.workers: list[subprocess.Popen[str]] = []
        if net == "shaped":  # fixed ports, one pair per shard count, in each server's own namespace
            hosts = [ns_host(i) for i in range(shards)]
            ports = [(6000 + 10 * shards, 6001 + 10 * shards)] * shards
        else:
            hosts = ["127.0.0.1"] * shards
            ports = [(free_port(), free_port()) for _ in range(shards)]
        self.addresses = [f"{h}:{p}" for h, (p, _) in zip(hosts, ports, strict=True)]
        cluster = ["--cluster", ",".join(self.addresses)] if shards > 1 else []
        for i, (host, (port, dport)) in enumerate(zip(hosts, ports, strict=True)):
            cmd = [sys.executable, "-m", "ps_server.server", "--host", host, "--port", str(port), "--data-port",
                   str(dport), "--lease-seconds", "3600", "--max-wait-seconds", "600", "--log-level", "WARNING",
                   *cluster, *(["--index", str(i)] if cluster else []), *server_args]
            if net == "shaped":
                cmd = ["ip", "netns", "exec", ns_name(i), *cmd]
            p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            self.servers.append(p)
        try:  # (a set-up that fails stops what it started: nobody else holds it to close)
            for i, p in enumerate(self.servers):
                assert p.stdout is not None
                said = []  # (its log lines before it listens, e.g. server 0's warning without --data-dir)
                while "listening on" not in (line := p.stdout.readline()):
                    if not line:  # (it exited: what it said is all there is)
                        raise RuntimeError(f"{self.label}: server {i} did not start: {''.join(said)}")
                    said.append(line)
                log.write("".join(said))
                threading.Thread(target=_drain, args=(p.stdout, log), daemon=True).start()
            self.run_ids = asyncio.run(self._create(workers))
            self.workers = [subprocess.Popen(
                [sys.executable, __file__, "--role", "worker", "--server", self.addresses[0], "--name", f"w{k}",
                 "--runs", json.dumps(self.run_ids), "--warmup", str(warmup)],
                cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
                for k in range(workers)]
        except BaseException:
            self.close()
            raise

    async def _create(self, workers: int) -> dict[str, str]:
        from paramserver.client import PsClient
        from paramserver.v1 import paramserver_pb2 as pb

        out = {}
        async with PsClient(self.addresses[0], timeout=120) as c:
            await c.wait_ready(60)
            for model in self.models:
                spec = pb.RunSpec(name=f"bench-shards-{model}", num_workers=workers, staleness=-1, iterations=1 << 40,
                                  seed=7, optimizer=pb.OptimizerSpec(sgd=pb.SgdConfig(learning_rate=1e-9)),
                                  params=[pb.ParamSpec(name=n, shape=s, initializer=pb.INITIALIZER_UNIFORM, scale=0.05)
                                          for n, s in MODELS[model].items()])
                out[model] = (await c.create_run(spec)).run_id
        return out

    def wait_ready(self) -> None:
        """Every worker joined; then each warms up in turn (its first streams open on an idle link)."""
        for w in self.workers:
            assert w.stdout is not None
            line = w.stdout.readline()
            if '"joined"' not in line:
                raise RuntimeError(f"{self.label}: a worker did not start ({w.poll()}): {line}")
        for w in self.workers:
            assert w.stdin is not None and w.stdout is not None
            w.stdin.write(json.dumps({"op": "warmup"}) + "\n")
            w.stdin.flush()
            line = w.stdout.readline()
            if '"warm"' not in line:
                raise RuntimeError(f"{self.label}: a worker failed its warm-up ({w.poll()}): {line}")

    def pids(self) -> tuple[list[int], list[int]]:
        return [p.pid for p in self.servers], [w.pid for w in self.workers]

    def rep(self, model: str, seconds: float, min_iters: int) -> dict[str, Any]:
        spids, wpids = self.pids()
        s0, w0, m0 = [cpu_seconds(p) for p in spids], [cpu_seconds(p) for p in wpids], machine_ticks()
        for w in self.workers:
            assert w.stdin is not None
            w.stdin.write(json.dumps({"op": "rep", "model": model, "seconds": seconds, "min_iters": min_iters}) + "\n")
            w.stdin.flush()
        reps = []
        for w in self.workers:
            assert w.stdout is not None
            line = w.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.label}: a worker exited ({w.wait()})")
            reps.append(json.loads(line))
        s1, w1, m1 = [cpu_seconds(p) for p in spids], [cpu_seconds(p) for p in wpids], machine_ticks()
        wall = max(r["end"] for r in reps) - min(r["start"] for r in reps)
        iters = sum(r["iters"] for r in reps)
        moved = 2 * nbytes_of(model) * iters
        return {
            "net": self.net, "shards": self.shards, "model": model, "wall": wall, "iters": iters,
            "its": iters / wall, "MBps": moved / wall / 1e6, "gbit": 8 * moved / wall / 1e9,
            "per_worker_its": [r["iters"] / (r["end"] - r["start"]) for r in reps],
            "server_cpu": [(b - a) / wall for a, b in zip(s0, s1, strict=True)],
            "worker_cpu": [(b - a) / wall for a, b in zip(w0, w1, strict=True)],
            "machine_busy": (m1[0] - m0[0]) / (m1[2] - m0[2]) * (os.cpu_count() or 1),
            "machine_softirq": (m1[1] - m0[1]) / (m1[2] - m0[2]) * (os.cpu_count() or 1),
            "opened": [r["opened"] for r in reps],
            "skew": statistics.median(r["skew"] for r in reps),
        }

    def planes(self) -> dict[str, Any]:
        """What GetRun (server 0) says: each shard's data port, each rank's data plane, pushes per shard."""
        from paramserver.client import PsClient

        async def get() -> dict[str, Any]:
            out = {}
            async with PsClient(self.addresses[0], timeout=60) as c:
                for model, run_id in self.run_ids.items():
                    run = await c.get_run(run_id)
                    out[model] = {
                        "shard_data_ports": [s.data_port for s in run.shard_map.shards],
                        "rank_data_planes": [w.data_plane for w in run.workers],
                        "shard_pushes": [s.pushes_applied for s in run.shards],
                        "shard_bytes": [s.bytes_held for s in run.shards],
                        "pushes_applied": run.counters.pushes_applied,
                    }
            return out

        return asyncio.run(get())

    def close(self) -> None:
        for w in self.workers:
            if w.poll() is None and w.stdin is not None:
                with contextlib.suppress(OSError):
                    w.stdin.write(json.dumps({"op": "quit"}) + "\n")
                    w.stdin.flush()
        for p in self.workers + self.servers:
            try:
                if p in self.servers:
                    p.terminate()
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def background(seconds: float) -> float:
    """Cores busy over ``seconds`` while this bench's processes idle: what the host's other users take."""
    a = machine_ticks()
    time.sleep(seconds)
    b = machine_ticks()
    return (b[0] - a[0]) / max(1, b[2] - a[2]) * (os.cpu_count() or 1)


def bandwidth(args: argparse.Namespace, nets: list[str], workers: int, log: Any) -> list[dict[str, Any]]:
    """For each model: every (network, shard count) configuration up at once, repetitions interleaved."""
    results: list[dict[str, Any]] = []
    timing = {"mlp-5.8M": (args.seconds, 3), "big-100M": (0.0, args.big_iters)}
    for model in args.models:
        configs: list[Config] = []
        try:
            for net in nets:
                for n in args.shards:  # set-ups one at a time: they allocate and fault in hundreds of MB
                    configs.append(Config(net, n, [model], workers, args.warmup, log, args.server_args.split()))
                    configs[-1].wait_ready()
            for r in range(args.reps):
                for cfg in configs if r % 2 == 0 else configs[::-1]:
                    idle = background(args.idle_seconds)
                    res = cfg.rep(model, *timing[model]) | {"rep": r, "workers": workers, "background": idle}
                    results.append(res)
                    print(f"  W={workers} {cfg.label:>19} {model:>9} rep {r}: {res['its']:6.2f} it/s "
                          f"{res['MBps']:7.1f} MB/s ({res['gbit']:.2f} Gbit/s) CPU servers {sum(res['server_cpu']):.2f} "
                          f"workers {sum(res['worker_cpu']):.2f} machine {res['machine_busy']:.2f} (softirq "
                          f"{res['machine_softirq']:.2f}; others before: {idle:.2f}) [{res['iters']} it, "
                          f"{res['wall']:.1f} s]", file=sys.stderr, flush=True)
                    if any(o["grpc"] for w in res["opened"] for o in w):
                        print(f"  {cfg.label}: some streams went over gRPC: {res['opened']}", file=sys.stderr)
            for cfg in configs:
                planes = cfg.planes()[model]
                results.append({"kind": "planes", "net": cfg.net, "shards": cfg.shards, "model": model,
                                "workers": workers, **planes})
                print(f"  W={workers} {cfg.label:>19} {model:>9} GetRun: {planes}", file=sys.stderr, flush=True)
        finally:
            for cfg in configs:
                cfg.close()
    return results


def summarize(results: list[dict[str, Any]], link_gbit: float | None) -> str:
    reps = [r for r in results if "its" in r]
    planes = {(r["net"], r["workers"], r["shards"], r["model"]): r for r in results if r.get("kind") == "planes"}
    lines = ["| network | workers | model | shards | iterations/s (all workers) | push+pull MB/s [min-max] | Gbit/s | "
             "vs 1 shard (medians) | of the links' capacity | CPU cores: servers / workers / softirq / machine "
             "(others before) | CPU s per GB moved (servers + workers) | shard skew | data plane (streams "
             "opened; GetRun ranks) |", "|" + "---|" * 13]
    keys = sorted({(r["net"], r["workers"], r["model"], r["shards"]) for r in reps},
                  key=lambda k: (k[0] != "shaped", k[1], list(MODELS).index(k[2]), k[3]))
    med = statistics.median
    for net, w, model, n in keys:
        sel = [r for r in reps if (r["net"], r["workers"], r["model"], r["shards"]) == (net, w, model, n)]
        base = [r for r in reps if (r["net"], r["workers"], r["model"], r["shards"]) == (net, w, model, 1)]
        mb = [r["MBps"] for r in sel]
        ratio = f"{med(mb) / med(x['MBps'] for x in base):.2f}x" if base else "-"
        # capacity: n links, each link_gbit into and out of its server
        cap = f"{100 * 8 * med(mb) / 1e3 / (2 * n * link_gbit):.0f}%" if net == "shaped" and link_gbit else "-"
        opened = [o for ws in sel[-1]["opened"] for o in ws]  # cumulative counts: the last repetition's
        tcp, grpc = sum(o["tcp"] for o in opened), sum(o["grpc"] for o in opened)
        unreachable = sum(o["tcp_unreachable"] for o in opened)
        p = planes.get((net, w, n, model), {})
        ranks = ",".join(sorted(set(p.get("rank_data_planes", [])))) or "?"
        skew = f"{100 * med(r.get('skew', 0.0) for r in sel):.0f}%" if n > 1 else "-"
        lines.append(
            f"| {net} | {w} | {model} | {n} | {med(r['its'] for r in sel):.2f} | {med(mb):.0f} [{min(mb):.0f}-{max(mb):.0f}] "
            f"| {8 * med(mb) / 1e3:.2f} | {ratio} | {cap} | {med(sum(r['server_cpu']) for r in sel):.2f} / "
            f"{med(sum(r['worker_cpu']) for r in sel):.2f} / {med(r['machine_softirq'] for r in sel):.2f} / "
            f"{med(r['machine_busy'] for r in sel):.2f} ({med(r['background'] for r in sel):.2f}) "
            f"| {med((sum(r['server_cpu']) + sum(r['worker_cpu'])) / (r['MBps'] / 1e3) for r in sel):.2f} "
            f"| {skew} "
            f"| tcp {tcp}, grpc {grpc}{f' ({unreachable} TCP unreachable)' if unreachable else ''}; {ranks} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ too big for one server
def demo(max_bytes: int, iterations: int, log: Any) -> dict[str, Any]:
    """``psctl launch --local`` of the 5.8M MLP with PS_MAX_PARAM_BYTES below its size, on 1 then 2 servers."""
    out: dict[str, Any] = {"max_param_bytes": max_bytes, "model_bytes": nbytes_of("mlp-5.8M")}
    for servers in (1, 2):
        cmd = [str(Path(sys.executable).with_name("psctl")), "launch", "--local", "--servers", str(servers),
               "--workers", "2", "--model", "mlp:2048,2048", "--dataset",
               "synthetic-classification:samples=2000,features=784,classes=10", "--staleness", "inf",
               "--iterations", str(iterations), "--eval-every", str(max(1, iterations // 2)), "--lr", "0.05"]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV | {"PS_MAX_PARAM_BYTES": str(max_bytes)}, capture_output=True,
                              text=True, timeout=600)
        log.write(f"$ PS_MAX_PARAM_BYTES={max_bytes} {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
        log.flush()
        out[f"{servers} server{'s' * (servers > 1)}"] = {
            "command": f"PS_MAX_PARAM_BYTES={max_bytes} psctl launch --local --servers {servers} " + " ".join(cmd[5:]),
            "exit": proc.returncode, "seconds": round(time.monotonic() - t0, 1),
            "stdout": proc.stdout.strip().splitlines(), "stderr_tail": proc.stderr.strip().splitlines()[-4:]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", default="shaped,loopback", help="shaped (namespaces + tc, root) and/or loopback")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    ap.add_argument("--shards", default="1,2,4", help="server counts to compare (comma-separated)")
    ap.add_argument("--workers", default="2,1", help="worker processes per configuration (comma-separated: each "
                    "count is a phase of its own)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions per configuration")
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per repetition of the 5.8M model")
    ap.add_argument("--big-iters", type=int, default=2, help="iterations per worker per repetition of the 100M model")
    ap.add_argument("--idle-seconds", type=float, default=2.0,
                    help="before each repetition, how long the host's load from others is sampled")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured iterations per worker and run at start")
    ap.add_argument("--server-args", default="", help="extra ps-server options, e.g. '--push-slots 2'")
    ap.add_argument("--rate", default="1gbit", help="tbf rate of each server's link, both ways")
    ap.add_argument("--quick", action="store_true", help="2 reps, 5.8M model only, 2 workers, 2 s (a smoke run)")
    ap.add_argument("--demo", action=argparse.BooleanOptionalAction, default=True,
                    help="also the too-big-for-one-server demonstration")
    ap.add_argument("--demo-only", action="store_true", help="only the demonstration")
    ap.add_argument("--demo-iterations", type=int, default=40, help="iterations per worker of the demonstration")
    ap.add_argument("--demo-bytes", type=int, default=16_000_000, help="PS_MAX_PARAM_BYTES of the demonstration")
    ap.add_argument("--cleanup", action="store_true", help="only remove a previous run's namespaces, veths, rule")
    ap.add_argument("--json", type=Path, help="write every result here")
    ap.add_argument("--role", choices=["worker"], help=argparse.SUPPRESS)
    ap.add_argument("--server", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--runs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "worker":
        asyncio.run(worker_main(args))
        return
    if args.cleanup:
        print("\n".join(cleanup_net()) or "nothing to remove")
        return
    args.models = [m for m in args.models.split(",") if m]
    args.shards = [int(n) for n in args.shards.split(",")]
    args.workers = [int(n) for n in args.workers.split(",")]
    nets = [n for n in args.net.split(",") if n]
    if args.quick:
        args.reps, args.seconds, args.models, args.workers, args.idle_seconds = 2, 2.0, ["mlp-5.8M"], [2], 0.5
    if set(args.models) - set(MODELS) or set(nets) - {"shaped", "loopback"} or 1 not in args.shards:
        ap.error(f"models from {list(MODELS)}, --net from shaped, loopback; --shards must include 1")
    if args.demo_only:
        nets = []
    if "shaped" in nets and os.geteuid() != 0:
        ap.error("--net shaped needs root (network namespaces, tc); --net loopback does not")

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit, "nproc": os.cpu_count(),
            "loadavg_start": loadavg(), "workers": args.workers, "command": " ".join(sys.argv),
            "mem_available_gib": round(int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text())
                                              .group(1)) / 2**20, 1)}  # type: ignore[union-attr]
    # SIGTERM (a timeout) unwinds like Ctrl-C: the finally blocks stop the processes and remove the network
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"machine: {info}", file=sys.stderr, flush=True)
    log_path = Path(tempfile.gettempdir()) / "bench-shards.log"
    results: list[dict[str, Any]] = []
    out: dict[str, Any] = {"info": info, "results": results}
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        if nets:
            try:
                if "shaped" in nets:
                    left = cleanup_net()
                    if left:
                        print(f"removed a previous run's leftovers: {left}", file=sys.stderr)
                    setup_net(max(args.shards), args.rate)
                    out["raw_link"] = [raw_link(i) for i in range(max(args.shards))]
                    print(f"raw TCP through each shaped link (Gbit/s, both ways at once): {out['raw_link']}",
                          file=sys.stderr, flush=True)
                for w in args.workers:
                    results += bandwidth(args, nets, w, log)
            finally:
                if "shaped" in nets:
                    cleanup_net()
        if args.demo or args.demo_only:
            out["demo"] = demo(args.demo_bytes, args.demo_iterations, log)
    info["loadavg_end"] = loadavg()
    info["seconds"] = round(time.monotonic() - t0)
    print()
    print(f"date {info['date']}, commit {commit}, nproc {info['nproc']}, load average {info['loadavg_start']} at "
          f"start, {info['loadavg_end']} at end, {info['seconds']} s; {args.workers} workers per configuration; "
          f"logs: {log_path}")
    print(f"command: {info['command']}")
    if "raw_link" in out:
        print("raw TCP through one shaped link, Gbit/s into / out of the namespace at once: " + ", ".join(
            f"{r['in_gbit']:.3f} / {r['out_gbit']:.3f}" for r in out["raw_link"]))
    if results:
        print()
        links = [x for r in out.get("raw_link", []) for x in (r["in_gbit"], r["out_gbit"])]
        print(summarize(results, statistics.median(links) if links else None))
    if "demo" in out:
        print()
        print(json.dumps(out["demo"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    exit_with_parent()  # started by another bench: not to outlive it
    main()
