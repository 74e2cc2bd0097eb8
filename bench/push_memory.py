"""The server's peak memory while N clients push (and pull) a large model at the same time.

    .venv/bin/python bench/push_memory.py [--clients 4] [--seconds 15] [--mode push-pull|push|pull]

A ps-server subprocess holds one ASP run of the 784-2048-2048-10 MLP's shapes (5,824,522
float32, 22.2 MiB, SGD with a negligible learning rate); N client processes each join it and loop
``push_pull`` (or only push, or only pull) with zero gradients, no computation, as fast as the
server lets them. Printed: the server's VmHWM after the run was created and after the clients
finished, and the pushes applied. Extra server flags go after ``--``, and the server's
environment is this one's (e.g. ``MALLOC_ARENA_MAX=8`` to see glibc's default arenas:
any MALLOC_* variable turns off ps-server's own allocator tuning).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from paramserver.runtime import child_env, exit_with_parent  # noqa: E402

SHAPES = {"w0": (784, 2048), "b0": (2048,), "w1": (2048, 2048), "b1": (2048,), "w2": (2048, 10), "b2": (10,)}


def vm(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS of ``pid`` in MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    out = {}
    for key in ("VmHWM", "VmRSS"):
        m = re.search(key + r":\s+(\d+)", text)
        out[key] = int(m.group(1)) // 1024 if m else -1
    return out


async def client(address: str, run_id: str, seconds: float, mode: str) -> None:
    import numpy as np

    from paramserver.client import PsClient

    async with PsClient(address) as ps:
        a = (await ps.join("push-memory", run_id=run_id, max_wait=30)).assignment
        zeros = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
        into: dict[str, np.ndarray] = {}
        clock = a.start_clock
        while True:  # the run starts when every client has joined
            try:
                await ps.pull(a.run_id, a.rank, a.incarnation, clock, into=into)
                break
            except Exception:
                await asyncio.sleep(0.2)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if mode == "push-pull":
                await ps.push_pull(a.run_id, a.rank, a.incarnation, clock, zeros, into=into)
            elif mode == "push":
                await ps.push(a.run_id, a.rank, a.incarnation, clock, zeros)
            else:
                await ps.pull(a.run_id, a.rank, a.incarnation, clock, into=into)
                continue
            clock += 1


async def main(args: argparse.Namespace, server_args: list[str]) -> None:
    from paramserver.client import PsClient
    from paramserver.v1 import paramserver_pb2 as pb

    server = subprocess.Popen([sys.executable, "-m", "ps_server.server", "--port", "0", "--log-level", "WARNING",
                               *server_args], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=child_env(os.environ))
    clients: list[subprocess.Popen[bytes]] = []
    try:
        assert server.stdout is not None
        m = re.search(r"listening on (\S+:\d+)", server.stdout.readline())
        assert m, "the server did not start"
        address = m.group(1)
        async with PsClient(address) as ps:
            run = await ps.create_run(pb.RunSpec(
                name="push-memory", num_workers=args.clients, staleness=-1, iterations=1 << 40, seed=1,
                optimizer=pb.OptimizerSpec(sgd=pb.SgdConfig(learning_rate=1e-9)),
                params=[pb.ParamSpec(name=n, shape=s, initializer=pb.INITIALIZER_NORMAL, scale=0.01)
                        for n, s in SHAPES.items()]))
            created = vm(server.pid)
            clients = [subprocess.Popen([sys.executable, __file__, "--role", "client", "--address", address,
                                         "--run-id", run.run_id, "--seconds", str(args.seconds), "--mode", args.mode],
                                        env=child_env(os.environ))
                       for _ in range(args.clients)]
            for c in clients:
                c.wait(args.seconds + 120)
            counters = (await ps.get_run(run.run_id)).counters
            done = vm(server.pid)
        print(f"clients {args.clients}, mode {args.mode}, {args.seconds:g} s, server args {server_args or 'none'}")
        print(f"server after create: VmHWM {created['VmHWM']} MiB; after the clients: VmHWM {done['VmHWM']} MiB, "
              f"VmRSS {done['VmRSS']} MiB; pushes applied {counters.pushes_applied}, pulls served {counters.pulls_served}")
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    exit_with_parent()  # started by another bench: not to outlive it
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--mode", choices=["push-pull", "push", "pull"], default="push-pull")
    ap.add_argument("--role", choices=["main", "client"], default="main", help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--run-id", help=argparse.SUPPRESS)
    parsed = ap.parse_args(argv)
    if parsed.role == "client":
        asyncio.run(client(parsed.address, parsed.run_id, parsed.seconds, parsed.mode))
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM (a timeout) unwinds as Ctrl-C: the finally blocks stop what was started
        asyncio.run(main(parsed, extra))
