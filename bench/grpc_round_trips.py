"""How many small-model round trips gRPC Python itself carries on this machine.

    .venv/bin/python bench/grpc_round_trips.py [--clients 4] [--seconds 5] [--bytes 19240] [--spin-us 0]

The ceiling behind the small-model rate (the performance issue, figure 1): a grpc.aio server
process with one bidirectional-stream method that answers every message with a prebuilt message
of the same size, and ``--clients`` client processes that each keep one stream open and loop
write-then-read, as a worker's push-with-pull does, with no parameter server logic at all:
identity (de)serialisers, no protobuf, no optimizer. ``--spin-us`` burns that much CPU per
iteration in each client, standing in for the gradient computation (the digits MLP-64 takes
~67 µs per batch of 32 here). The default message size is the MLP-64's parameters (4,810
float32). Prints round trips per second over all clients and the CPU each side used per round
trip (from /proc).
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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paramserver.runtime import child_env, exit_with_parent  # noqa: E402

METHOD = "/bench.Echo/RoundTrip"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def server_main(size: int) -> None:
    import grpc

    reply = bytes(size)

    async def round_trip(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield reply

    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(round_trip)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Echo", {"RoundTrip": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


async def client_main(address: str, size: int, seconds: float, spin_us: float, start_at: float) -> None:
    import grpc

    request = bytes(size)
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(METHOD)()
        await call.write(request)  # connect and warm up before the timed part
        await call.read()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        n, end = 0, time.time() + seconds
        while time.time() < end:
            if spin_us:
                until = time.perf_counter() + spin_us / 1e6
                while time.perf_counter() < until:
                    pass
            await call.write(request)
            await call.read()
            n += 1
        await call.done_writing()
        print(n, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--bytes", type=int, default=4810 * 4, help="message size, both directions")
    ap.add_argument("--spin-us", type=float, default=0.0, help="CPU burnt per iteration in each client")
    ap.add_argument("--role", choices=["main", "server", "client"], default="main", help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "server":
        asyncio.run(server_main(args.bytes))
        return
    if args.role == "client":
        asyncio.run(client_main(args.address, args.bytes, args.seconds, args.spin_us, args.start_at))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM (a timeout) unwinds as Ctrl-C: the finally blocks stop what was started
    env = child_env(dict(os.environ, OPENBLAS_NUM_THREADS="1"))  # children stop if this process dies
    server = subprocess.Popen([sys.executable, __file__, "--role", "server", "--bytes", str(args.bytes)],
                              stdout=subprocess.PIPE, text=True, env=env)
    clients: list[subprocess.Popen[str]] = []
    try:
        assert server.stdout is not None
        m = re.search(r"listening on (\S+)", server.stdout.readline())
        assert m, "the server did not start"
        start_at = time.time() + 3.0  # every client connected and warm by then
        clients = [subprocess.Popen([sys.executable, __file__, "--role", "client", "--address", m.group(1),
                                     "--bytes", str(args.bytes), "--seconds", str(args.seconds),
                                     "--spin-us", str(args.spin_us), "--start-at", str(start_at)],
                                    stdout=subprocess.PIPE, text=True, env=env)
                   for _ in range(args.clients)]
        time.sleep(max(0.0, start_at - time.time()))
        s0, c0 = cpu_seconds(server.pid), sum(cpu_seconds(c.pid) for c in clients)
        time.sleep(args.seconds)
        s1, c1 = cpu_seconds(server.pid), sum(cpu_seconds(c.pid) for c in clients)
        counts = [int(c.communicate(timeout=60)[0].split()[-1]) for c in clients]
    finally:
        for p in [*clients, server]:
            p.kill()
            p.wait()
    total = sum(counts)
    print(f"{args.clients} clients, {args.bytes} bytes each way, spin {args.spin_us:g} us/iteration, "
          f"{args.seconds:g} s: {total / args.seconds:,.0f} round trips/s "
          f"(per client {[round(n / args.seconds) for n in counts]}); CPU per round trip: "
          f"server {1e3 * (s1 - s0) / total:.3f} ms, clients {1e3 * (c1 - c0) / total:.3f} ms")


if __name__ == "__main__":
    exit_with_parent()  # started by another bench: not to outlive it
    main()
