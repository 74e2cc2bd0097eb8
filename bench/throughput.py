"""Data-plane throughput of the parameter server against raw TCP loopback.

    .venv/bin/python bench/throughput.py            # full run, a few minutes
    .venv/bin/python bench/throughput.py --quick    # under ~60 s

What it measures, for two allocator settings: "off", nothing in the environment, so ps-server
and the client (like ps-worker) tune glibc themselves at start-up (``paramserver.runtime.tune_malloc``:
thresholds and one arena); "on", the DESIGN.md thresholds MALLOC_MMAP_THRESHOLD_=1073741824
MALLOC_TRIM_THRESHOLD_=4294967296 in *every* process's environment, which takes precedence
(glibc's default arena count):

* ``ps``: a real ``ps-server`` in its own process (``python -m ps_server.server --port 0``), a
  client process that creates an ASP run (SGD, staleness -1, one worker), joins it with
  ``PsClient.join`` and loops ``pull(clock=c)`` then ``push(clock=c, zeros)``. Payload GB/s counts
  bytes pushed + bytes pulled per second (1 GB = 1e9 bytes). Two models: the 784-2048-2048-10 MLP
  (5.8M float32, 23 MB) and a 100M-parameter model (10 tensors of 10M, 400 MB).
* ``ps-inproc``: the same loop with the server started inside the client's process and event
  loop (one GIL for both sides), as the integration tests do.
* data plane (``--transport``): the pushes and pulls go over the server's TCP data plane (the
  default for workers: ``paramserver.v1.tcp``), over gRPC streams, or both, as separate
  configurations.
* ``tcp``: a plain socket pair between two processes moving the same bytes in the same pattern
  (client sends N bytes, server reads them then sends N bytes back), with preallocated buffers:
  the loopback ceiling.

Each repetition runs for a fixed time (or a minimum number of iterations). All configurations'
processes stay up together and every round visits each model, each configuration, TCP then PS,
so that a noisy neighbour hurts all of them alike; the table shows medians, and "paired" is the
median of each PS repetition divided by the TCP repetition just before it. A second table gives
the CPU time (user + system, all threads, from /proc) per iteration of client and server: unlike
wall time it hardly depends on what else runs on this shared 2-core machine.

``--profile DIR`` records py-spy (native frames) of client and server during PS repetitions
instead, and prints the top frames. ``--chunk-bytes`` changes the tensor chunk size on both ends. Correctness is
checked once on the 100M model: after pushing a gradient of ones with lr 1 the pulled parameters
must equal the previously pulled ones minus 1, bit for bit (and tensor 0 must match the
documented initializer rule).

Internal roles (used by the orchestrator): ``--role client`` and ``--role tcp-server``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}

MLP_SHAPES: dict[str, tuple[int, ...]] = {
    "layer0.weight": (784, 2048),
    "layer0.bias": (2048,),
    "layer1.weight": (2048, 2048),
    "layer1.bias": (2048,),
    "layer2.weight": (2048, 10),
    "layer2.bias": (10,),
}
BIG_SHAPES: dict[str, tuple[int, ...]] = {f"t{i}": (10_000_000,) for i in range(10)}
MODELS = {"mlp-5.8M": MLP_SHAPES, "big-100M": BIG_SHAPES}


def nbytes_of(shapes: dict[str, tuple[int, ...]]) -> int:
    total = 0
    for s in shapes.values():
        n = 1
        for d in s:
            n *= d
        total += 4 * n
    return total


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process (all threads), from /proc; 0 when unknown."""
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ============================================================================ raw TCP
def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed")
        got += k


def _tcp_serve(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hdr = bytearray(8)
    try:
        _recv_exact(conn, memoryview(hdr))
        (n,) = struct.unpack("<Q", hdr)
        buf = bytearray(n)  # touched once, reused: no page faults in the loop
        view = memoryview(buf)
        while True:
            _recv_exact(conn, view)
            conn.sendall(view)
    except ConnectionError:
        pass
    finally:
        conn.close()


def tcp_server_main() -> None:
    """Accept connections forever, a thread each (one is active at a time): read an 8-byte size N,
    then loop {read N bytes; send them back}."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    print(f"tcp-server listening on 127.0.0.1:{lsock.getsockname()[1]}", flush=True)
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=_tcp_serve, args=(conn,), daemon=True).start()


class TcpBench:
    """Client side of the raw TCP measurement: one connection per payload size."""

    def __init__(self, addr: str, n: int) -> None:
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(300)  # a hang becomes an error, not a stuck benchmark
        self.n = n
        self.out = bytearray(os.urandom(1024)) * (n // 1024) + bytearray(n % 1024)
        self.inp = bytearray(n)
        self.sock.sendall(struct.pack("<Q", n))
        self.iteration()  # warm-up: fault in buffers, grow socket buffers

    def iteration(self) -> None:
        self.sock.sendall(self.out)
        _recv_exact(self.sock, memoryview(self.inp))

    def rep(self, seconds: float, min_iters: int) -> dict[str, float]:
        t0 = time.perf_counter()
        iters = 0
        while True:
            self.iteration()
            iters += 1
            el = time.perf_counter() - t0
            if el >= seconds and iters >= min_iters:
                break
        return {"gbps": 2 * self.n * iters / el / 1e9, "its": iters / el, "iters": iters, "seconds": el}

    def close(self) -> None:
        self.sock.close()


# ============================================================================ PS client
def make_spec(name: str, shapes: dict[str, tuple[int, ...]], init: int, scale: float) -> Any:
    from paramserver.v1 import paramserver_pb2 as pb

    return pb.RunSpec(
        name=name,
        num_workers=1,
        staleness=-1,
        iterations=1 << 40,
        seed=7,
        optimizer=pb.OptimizerSpec(sgd=pb.SgdConfig(learning_rate=1.0)),
        params=[pb.ParamSpec(name=n, shape=s, initializer=init, scale=scale) for n, s in shapes.items()],
    )


class PsBench:
    def __init__(self, ps: Any, model: str) -> None:
        self.ps = ps
        self.model = model
        self.shapes = MODELS[model]
        self.nbytes = nbytes_of(self.shapes)
        self.clock = 0
        self.params: dict[str, Any] = {}
        self.check: dict[str, Any] | None = None

    async def setup(self, verify: bool) -> None:
        import numpy as np

        from paramserver.v1 import paramserver_pb2 as pb

        big = self.model.startswith("big")
        # UNIFORM for the big model: cheaper to materialise than NORMAL, still random per element.
        init = pb.INITIALIZER_UNIFORM if big else pb.INITIALIZER_NORMAL
        t0 = time.perf_counter()
        run = await self.ps.create_run(make_spec(f"bench-{self.model}", self.shapes, init, 0.05))
        t_create = time.perf_counter() - t0
        join = await self.ps.join("bench-worker", run_id=run.run_id, max_wait=0)
        a = join.assignment
        self.run_id, self.rank, self.inc, self.clock = a.run_id, a.rank, a.incarnation, a.start_clock
        self.zeros = {n: np.zeros(s, np.float32) for n, s in self.shapes.items()}
        self.check = {"create_seconds": round(t_create, 3)}
        if verify:
            await self._verify(init)

    async def _verify(self, init: int) -> None:
        """Bit-exact: pull w0, push ones with lr 1, pull again: must be w0 - 1 exactly."""
        import numpy as np

        t0 = time.perf_counter()
        w0 = (await self.ps.pull(self.run_id, self.rank, self.inc, self.clock)).tensors
        # The documented initializer rule (tensor i: default_rng([seed, i]), UNIFORM(-scale, scale)).
        name0, shape0 = next(iter(self.shapes.items()))
        rule = np.random.default_rng([7, 0]).uniform(-0.05, 0.05, shape0).astype(np.float32)
        init_ok = bool(np.array_equal(rule.view(np.uint32), w0[name0].view(np.uint32)))
        ones = {n: np.ones(s, np.float32) for n, s in self.shapes.items()}
        await self.ps.push(self.run_id, self.rank, self.inc, self.clock, ones)
        self.clock += 1
        del ones
        w1 = (await self.ps.pull(self.run_id, self.rank, self.inc, self.clock, into=self.params)).tensors
        exact = True
        for n in self.shapes:
            np.subtract(w0[n], np.float32(1.0), out=w0[n])  # in place: no 400 MB temporaries
            exact = exact and w1[n].shape == w0[n].shape and np.array_equal(w0[n].view(np.uint32), w1[n].view(np.uint32))
        del w0
        await self.ps.push(self.run_id, self.rank, self.inc, self.clock, self.zeros)
        self.clock += 1
        assert self.check is not None
        self.check.update(
            init_rule_tensor0=init_ok,
            push_ones_lr1_bit_exact=exact,
            tensors=len(w1),
            elements=int(sum(a.size for a in w1.values())),
            verify_seconds=round(time.perf_counter() - t0, 2),
        )

    async def iteration(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        await self.ps.pull(self.run_id, self.rank, self.inc, self.clock, into=self.params)
        t1 = time.perf_counter()
        await self.ps.push(self.run_id, self.rank, self.inc, self.clock, self.zeros)
        t2 = time.perf_counter()
        self.clock += 1
        return t1 - t0, t2 - t1

    async def rep(self, seconds: float, min_iters: int) -> dict[str, float]:
        t_pull = t_push = 0.0
        iters = 0
        t0 = time.perf_counter()
        while True:
            a, b = await self.iteration()
            t_pull += a
            t_push += b
            iters += 1
            el = time.perf_counter() - t0
            if el >= seconds and iters >= min_iters:
                break
        return {
            "gbps": 2 * self.nbytes * iters / el / 1e9,
            "its": iters / el,
            "iters": iters,
            "seconds": el,
            "pull_gbps": self.nbytes * iters / t_pull / 1e9,
            "push_gbps": self.nbytes * iters / t_push / 1e9,
        }


def emit(kind: str, **fields: Any) -> None:
    print(json.dumps({"kind": kind, **fields}), flush=True)


async def client_main(args: argparse.Namespace) -> None:
    """Set up one run per model, say "ready", then serve commands from stdin (one JSON per line).

    Commands: {"op": "ps"|"tcp", "model": M, "seconds": S, "min_iters": N} or {"op": "quit"}.
    Keeping every configuration's processes alive and idle lets the orchestrator interleave them.
    """
    from paramserver.client import PsClient
    from paramserver.runtime import tune_malloc

    tune_malloc()  # as ps-worker does (a no-op when the environment sets the allocator)
    server = None
    if args.server_inproc:
        from ps_server.config import ServerConfig
        from ps_server.server import start_server

        server = await start_server(
            ServerConfig(host="127.0.0.1", port=0, log_level="WARNING", lease_seconds=3600.0, max_wait_seconds=600.0,
                         chunk_bytes=args.chunk_bytes)
        )
        addr = f"127.0.0.1:{server.port}"
    else:
        addr = args.ps_addr
    loop = asyncio.get_running_loop()
    try:
        async with PsClient(addr, timeout=300.0, chunk_bytes=args.chunk_bytes, max_message_bytes=64 << 20,
                            data_plane=args.transport == "tcp") as ps:
            await ps.wait_ready(30)
            benches: dict[str, PsBench] = {}
            tcps: dict[str, TcpBench] = {}
            for model in args.models.split(","):
                bench = benches[model] = PsBench(ps, model)
                await bench.setup(verify=args.verify and model.startswith("big"))
                for _ in range(2):
                    await bench.iteration()  # warm-up: first pulls fill `into`, first pushes fault in
                emit("setup", model=model, streams=dict(ps.route.opened), **(bench.check or {}))
            emit("ready")
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line:
                    break
                cmd = json.loads(line)
                if cmd["op"] == "quit":
                    break
                model = cmd["model"]
                if cmd["op"] == "tcp":
                    if model not in tcps:
                        tcps[model] = TcpBench(args.tcp_addr, benches[model].nbytes)
                    peer = args.tcp_pid
                    c0, s0 = cpu_seconds(os.getpid()), cpu_seconds(peer)
                    res = tcps[model].rep(cmd["seconds"], cmd["min_iters"])
                else:
                    peer = None if args.server_inproc else args.server_pid
                    c0, s0 = cpu_seconds(os.getpid()), cpu_seconds(peer)
                    res = await benches[model].rep(cmd["seconds"], cmd["min_iters"])
                # CPU per iteration of each side: robust to a noisy machine, unlike wall time.
                res["client_cpu_ms"] = 1e3 * (cpu_seconds(os.getpid()) - c0) / res["iters"]
                res["server_cpu_ms"] = 1e3 * (cpu_seconds(peer) - s0) / res["iters"]
                emit("rep", what=cmd["op"], model=model, **res)
            for t in tcps.values():
                t.close()
    finally:
        if server is not None:
            await asyncio.sleep(0.2)  # let the server see the client's streams end
            await server.stop(1.0)


# ============================================================================ orchestrator
def _drain(stream: Any) -> None:
    for line in stream:
        sys.stderr.write("  [server] " + line)


def _start(cmd: list[str], env: dict[str, str], pattern: str, timeout: float = 60.0) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    seen = []
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            m = re.search(pattern, line)
            if m:
                # Drain the rest of the output in the background so the pipe never fills.
                threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
                return proc, m.group(1)
    except BaseException:
        proc.kill()
        raise
    proc.kill()
    raise RuntimeError(f"{cmd} did not start: {''.join(seen)}")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Config:
    """One measured configuration: allocator setting x server placement, with its processes."""

    def __init__(self, py: str, malloc: bool, inproc: bool, models: list[str], verify: bool, chunk_bytes: int,
                 transport: str) -> None:
        self.malloc, self.inproc, self.transport = malloc, inproc, transport
        self.label = f"{'in-process' if inproc else 'subprocess'}/{'malloc-on' if malloc else 'malloc-off'}/{transport}"
        env = dict(os.environ)
        for k in MALLOC_ENV:
            env.pop(k, None)
        if malloc:
            env.update(MALLOC_ENV)
        env["PYTHONUNBUFFERED"] = "1"
        from paramserver.runtime import child_env

        env = child_env(env)  # its children stop if this process dies
        self.procs: list[subprocess.Popen[str]] = []
        self.server_pid: int | None = None
        try:
            self._start(py, env, models, verify, chunk_bytes, transport, inproc)
        except BaseException:  # (not in the caller's list yet: nothing else would stop them)
            for p in self.procs:
                _stop(p)
            raise
        self.setups: list[dict[str, Any]] = []

    def _start(self, py: str, env: dict[str, str], models: list[str], verify: bool, chunk_bytes: int, transport: str,
               inproc: bool) -> None:
        tcp, tcp_addr = _start([py, __file__, "--role", "tcp-server"], env, r"listening on (\S+)")
        self.procs.append(tcp)
        cmd = [py, __file__, "--role", "client", "--tcp-addr", tcp_addr, "--tcp-pid", str(tcp.pid),
               "--models", ",".join(models), "--chunk-bytes", str(chunk_bytes), "--transport", transport]
        if verify:
            cmd.append("--verify")
        if inproc:
            cmd.append("--server-inproc")
        else:
            # Long lease and park limit: this configuration's worker idles while others are measured.
            server, ps_addr = _start(
                [py, "-m", "ps_server.server", "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING",
                 "--lease-seconds", "3600", "--max-wait-seconds", "600", "--chunk-bytes", str(chunk_bytes)],
                env, r"listening on (\S+)",
            )
            self.procs.append(server)
            self.server_pid = server.pid
            cmd += ["--ps-addr", ps_addr, "--server-pid", str(server.pid)]
        self.client = subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.procs.append(self.client)

    def read(self) -> dict[str, Any]:
        assert self.client.stdout is not None
        while True:
            line = self.client.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.label}: client exited ({self.client.wait()})")
            try:
                doc: dict[str, Any] = json.loads(line)
            except json.JSONDecodeError:
                print(f"  [{self.label} client] {line.rstrip()}", file=sys.stderr)
                continue
            doc.update(malloc=self.malloc, inproc=self.inproc, transport=self.transport)
            return doc

    def wait_ready(self) -> None:
        while (doc := self.read())["kind"] != "ready":
            self.setups.append(doc)
            print(f"  {self.label}: {doc}", file=sys.stderr)

    def command(self, **cmd: Any) -> dict[str, Any]:
        assert self.client.stdin is not None
        self.client.stdin.write(json.dumps(cmd) + "\n")
        self.client.stdin.flush()
        doc = self.read()
        print(f"  {self.label:>27} {doc['model']:>9} {doc['what']:>3}: {doc['gbps']:6.3f} GB/s "
              f"{doc['its']:7.2f} it/s ({doc['iters']} it) cpu ms/it client {doc['client_cpu_ms']:.1f} "
              f"server {doc['server_cpu_ms']:.1f}", file=sys.stderr)
        return doc

    def close(self) -> None:
        if self.client.poll() is None and self.client.stdin is not None:
            try:
                self.client.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.client.stdin.flush()
                self.client.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for p in self.procs:
            if p.poll() is None:
                _stop(p)


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "ps_server", "paramserver", "protos/paramserver"],
                               capture_output=True, text=True).stdout.strip()
        commit += " (+ uncommitted changes in ps_server, paramserver or protos)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    import grpc
    import numpy as np

    return {
        "nproc": str(os.cpu_count()),
        "python": platform.python_version(),
        "cpu": cpu,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": commit,
        "grpcio": grpc.__version__,
        "numpy": np.__version__,
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?",
    }


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    keys = sorted({(r["malloc"], r["inproc"], r["transport"], r["model"]) for r in results if r["kind"] == "rep"},
                  key=lambda k: (k[1], k[0], k[2], list(MODELS).index(k[3])))
    for malloc, inproc, transport, model in keys:
        sel = [r for r in results
               if r["kind"] == "rep" and (r["malloc"], r["inproc"], r["transport"], r["model"]) == (malloc, inproc, transport, model)]
        ps = [r for r in sel if r["what"] == "ps"]
        tcp = [r for r in sel if r["what"] == "tcp"]
        med = lambda xs, k: statistics.median(x[k] for x in xs) if xs else float("nan")  # noqa: E731
        ps_g, tcp_g = med(ps, "gbps"), med(tcp, "gbps")
        rows.append({
            "malloc": malloc, "inproc": inproc, "transport": transport, "model": model, "mb": nbytes_of(MODELS[model]) / 1e6,
            "ps_gbps": ps_g, "ps_min": min(x["gbps"] for x in ps), "ps_max": max(x["gbps"] for x in ps),
            "its": med(ps, "its"), "pull_gbps": med(ps, "pull_gbps"), "push_gbps": med(ps, "push_gbps"),
            "tcp_gbps": tcp_g, "ratio": ps_g / tcp_g, "reps": len(ps), "iters": sum(x["iters"] for x in ps),
            # Each PS repetition divided by the TCP repetition run just before it (same noise).
            "paired": statistics.median(p["gbps"] / t["gbps"] for p, t in zip(ps, tcp, strict=True)),
            "ps_client_ms": med(ps, "client_cpu_ms"), "ps_server_ms": med(ps, "server_cpu_ms"),
            "tcp_client_ms": med(tcp, "client_cpu_ms"), "tcp_server_ms": med(tcp, "server_cpu_ms"),
        })
        r = rows[-1]
        gb = 2 * nbytes_of(MODELS[model]) / 1e9  # payload per iteration
        r["ps_cpu_s_per_gb"] = (r["ps_client_ms"] + r["ps_server_ms"]) / 1e3 / gb
        r["tcp_cpu_s_per_gb"] = (r["tcp_client_ms"] + r["tcp_server_ms"]) / 1e3 / gb
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| server | malloc thresholds | data plane | model | MB/dir/iter | PS push+pull GB/s (median [min-max]) | it/s | "
            "pull GB/s | push GB/s | raw TCP GB/s | PS / TCP (medians) | PS / TCP (paired) |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {'in-process' if r['inproc'] else 'subprocess'} | {'on' if r['malloc'] else 'off'} | {r['transport']} | {r['model']} "
            f"| {r['mb']:.1f} | {r['ps_gbps']:.3f} [{r['ps_min']:.3f}-{r['ps_max']:.3f}] | {r['its']:.2f} "
            f"| {r['pull_gbps']:.3f} | {r['push_gbps']:.3f} | {r['tcp_gbps']:.3f} | {100 * r['ratio']:.0f}% | {100 * r['paired']:.0f}% |"
        )
    lines += ["", "CPU per iteration (user + system, all threads; robust to a busy machine, unlike wall time):", ""]
    head = ("| server | malloc thresholds | data plane | model | PS client CPU ms/it | PS server CPU ms/it | TCP client CPU ms/it "
            "| TCP server CPU ms/it | PS CPU s/GB | TCP CPU s/GB | TCP/PS CPU efficiency |")
    lines += [head, "|" + "---|" * 11]
    for r in rows:
        inproc = r["inproc"]
        server_ms = "-" if inproc else f"{r['ps_server_ms']:.1f}"
        lines.append(
            f"| {'in-process' if inproc else 'subprocess'} | {'on' if r['malloc'] else 'off'} | {r['transport']} | {r['model']} "
            f"| {r['ps_client_ms']:.1f}{' (both)' if inproc else ''} | {server_ms} "
            f"| {r['tcp_client_ms']:.1f} | {r['tcp_server_ms']:.1f} | {r['ps_cpu_s_per_gb']:.3f} "
            f"| {r['tcp_cpu_s_per_gb']:.3f} | {100 * r['tcp_cpu_s_per_gb'] / r['ps_cpu_s_per_gb']:.0f}% |"
        )
    return "\n".join(lines)


def collapse_top(raw: Path, n: int = 25) -> str:
    """Self and inclusive sample shares of the top frames of a py-spy raw (collapsed) profile."""
    self_c: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        frames = [re.sub(r"\s*\(/[^)]*/(site-packages/|lib/python3\.\d+/)?", " (", f) for f in stack.split(";")]
        # Unsymbolised addresses of one library count as one frame (libc's are mostly memcpy).
        frames = [re.sub(r"^0x[0-9a-f]+ \((.*)\)$", r"[\1 unsymbolised]", f) for f in frames]
        self_c[frames[-1]] = self_c.get(frames[-1], 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c
    if not total:
        return "(no samples)"
    out = [f"{total} samples", "self%  frame"]
    out += [f"{100 * c / total:5.1f}  {f}" for f, c in sorted(self_c.items(), key=lambda kv: -kv[1])[:n]]
    out += ["", "incl%  frame"]
    out += [f"{100 * c / total:5.1f}  {f}" for f, c in sorted(incl.items(), key=lambda kv: -kv[1])[:n]]
    return "\n".join(out)


def profile(configs: list[Config], models: list[str], seconds: float, outdir: Path, py: str) -> None:
    """Record py-spy (with native frames) on the client and the server during PS repetitions only."""
    spy = str(Path(py).with_name("py-spy"))
    outdir.mkdir(parents=True, exist_ok=True)
    for cfg in configs:
        for model in models:
            targets = [("client", cfg.client.pid)] + ([("server", cfg.server_pid)] if cfg.server_pid else [])
            spies = []
            for who, pid in targets:
                stem = outdir / f"{cfg.label.replace('/', '-')}-{model}-{who}"
                spies.append((stem, subprocess.Popen(
                    [spy, "record", "--pid", str(pid), "--rate", "100", "--native", "--format", "raw",
                     "--duration", str(int(seconds) + 1), "-o", f"{stem}.txt"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )))
            time.sleep(0.5)
            cfg.command(op="ps", model=model, seconds=seconds, min_iters=1)
            for stem, sp in spies:
                sp.wait(120)
                raw = Path(f"{stem}.txt")
                if raw.exists():
                    top = collapse_top(raw)
                    Path(f"{stem}.top.txt").write_text(top + "\n")
                    print(f"\n=== {stem.name}\n{top}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer and shorter repetitions (< ~60 s)")
    ap.add_argument("--reps", type=int, help="repetitions per row (default 3 quick, 5 full)")
    ap.add_argument("--seconds", type=float, help="seconds per PS repetition of the 5.8M model (default 1 quick, 2 full)")
    ap.add_argument("--malloc", choices=["both", "on", "off"], default="both", help="allocator thresholds")
    ap.add_argument("--inproc", choices=["both", "yes", "no"], default=None,
                    help="server in the client's process (default: both in full, no in --quick)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    ap.add_argument("--chunk-bytes", type=int, default=1 << 20,
                    help="tensor payload per gRPC message, client and server (default 1 MiB, the server's default)")
    ap.add_argument("--transport", choices=["both", "tcp", "grpc"], default="both",
                    help="the data plane pushes and pulls go over: the server's TCP data plane, gRPC streams, or both")
    ap.add_argument("--profile", metavar="DIR", help="instead of the table: py-spy profiles of PS repetitions into DIR")
    ap.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    ap.add_argument("--role", choices=["client", "tcp-server"], help=argparse.SUPPRESS)
    ap.add_argument("--ps-addr", help=argparse.SUPPRESS)
    ap.add_argument("--tcp-addr", help=argparse.SUPPRESS)
    ap.add_argument("--tcp-pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--server-inproc", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--verify", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.role == "tcp-server":
        tcp_server_main()
        return
    if args.role == "client":
        asyncio.run(client_main(args))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM (a timeout) unwinds as Ctrl-C: the finally blocks stop what was started

    py = sys.executable
    reps = args.reps or (3 if args.quick else 5)
    small_s = args.seconds or (1.0 if args.quick else 2.0)
    timing = {  # (PS seconds, PS min iterations, TCP seconds, TCP min iterations) per repetition
        "mlp-5.8M": (small_s, 3, small_s / 2, 10),
        "big-100M": (0.0, 1 if args.quick else 2, 0.0, 2 if args.quick else 4),
    }
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        ap.error(f"unknown model(s) {sorted(unknown)}; choose from {list(MODELS)}")
    mallocs = {"both": [False, True], "on": [True], "off": [False]}[args.malloc]
    inprocs = {"both": [False, True], "yes": [True], "no": [False], None: [False] if args.quick else [False, True]}[args.inproc]
    info = machine()
    print(f"machine: {info}", file=sys.stderr)
    t0 = time.perf_counter()
    configs: list[Config] = []
    results: list[dict[str, Any]] = []
    try:
        transports = ["tcp", "grpc"] if args.transport == "both" else [args.transport]
        for inproc in inprocs:
            for malloc in mallocs:
                for transport in transports:
                    verify = "big-100M" in models and not args.profile and not any(c.transport == transport for c in configs)
                    configs.append(Config(py, malloc, inproc, models, verify, args.chunk_bytes, transport))
        for cfg in configs:  # set-ups one at a time: they allocate and fault in hundreds of MB
            cfg.wait_ready()
        if args.profile:
            profile(configs, models, args.seconds or 15.0, Path(args.profile), py)
            return
        # Interleave: every repetition round visits each model, each configuration, TCP then PS.
        for r in range(reps):
            for model in models:
                ps_s, ps_n, tcp_s, tcp_n = timing[model]
                for cfg in configs:
                    results.append(cfg.command(op="tcp", model=model, seconds=tcp_s, min_iters=tcp_n) | {"rep": r})
                    results.append(cfg.command(op="ps", model=model, seconds=ps_s, min_iters=ps_n) | {"rep": r})
    finally:
        for cfg in configs:
            cfg.close()
    checks = [d for cfg in configs for d in cfg.setups if "push_ones_lr1_bit_exact" in d]
    rows = summarize(results)
    print()
    print(f"machine: nproc {info['nproc']}, Python {info['python']}, {info['cpu']}, grpcio {info['grpcio']}, "
          f"numpy {info['numpy']}, commit {info['commit']}, {info['date']}, load average at start {info['loadavg']}")
    print(f"command: .venv/bin/python bench/throughput.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"repetitions: {reps} per row, interleaved, medians; 1 GB = 1e9 bytes; "
          "PS GB/s = (bytes pushed + bytes pulled) / s; raw TCP: same bytes, same pattern, preallocated buffers")
    print()
    print(table(rows))
    print()
    for c in checks:
        ok = c["push_ones_lr1_bit_exact"] and c["init_rule_tensor0"]
        print(f"correctness ({c['model']}, {c['elements']:,} params in {c['tensors']} tensors): "
              f"push(ones, lr 1) then pull == previous pull - 1 bit-exact: {c['push_ones_lr1_bit_exact']}; "
              f"tensor 0 == initializer rule: {c['init_rule_tensor0']} -> {'PASS' if ok else 'FAIL'}")
    for row in rows:
        if row["model"] == "mlp-5.8M" and not row["inproc"]:
            verdict = "meets" if row["ratio"] >= 0.5 else "BELOW"
            print(f"target (5.8M model, subprocess server, malloc {'on' if row['malloc'] else 'off'}, {row['transport']}): "
                  f"{100 * row['ratio']:.0f}% of raw TCP, {verdict} the 50% target")
    print(f"total time: {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows, "results": results}, indent=1))
    if checks and not all(c["push_ones_lr1_bit_exact"] and c["init_rule_tensor0"] for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    from paramserver.runtime import exit_with_parent

    exit_with_parent()  # started by another bench: not to outlive it
    main()
