"""What the push/pull loop could reach over the same gRPC transport with fewer copies.

    .venv/bin/python bench/grpc_ceiling.py [--quick] [--shapes mlp|big]

A stand-alone experiment (it does not use ps_server or the paramserver SDK) that answers: how much of
the gap between the parameter server and raw TCP is gRPC itself, and how much is how we build
and read protobuf messages? Three loops, each pull(all params) then push(gradient), with a server
in a separate process, 1 MiB tensor chunks, bidirectional streams kept open, and the same
allocator thresholds as DESIGN.md (set in the environment of both processes):

* ``proto``: the way ps_server and the worker did it at first: ``arr.tobytes()`` per chunk,
  ``TensorChunk(data=...)``, a request built from a list of chunks, protobuf (de)serialisation,
  ``chunk.data``, copy into the destination array; server: assemble into a fresh array, np.sum
  check, SGD step.
* ``wire``: the same wire format (the bytes are valid PushGradientRequest / PullParamsResponse
  messages, checked at start-up), but encoded by hand into one ``bytes`` per message (one copy
  from the array) and decoded by hand with ``np.frombuffer`` on the received bytes (no copy), via
  identity (de)serialisers. Server: the SGD step reads the chunk views directly.
* ``bytes``: pre-built message bytes sent as they are and received without looking: the cost
  of gRPC Python streaming alone.

Prints GB/s of payload (push + pull) and CPU ms per iteration of each side.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import BIG_SHAPES, MALLOC_ENV, MLP_SHAPES, TcpBench, cpu_seconds  # noqa: E402

from paramserver.runtime import child_env, exit_with_parent  # noqa: E402
from paramserver.v1 import paramserver_pb2 as pb  # noqa: E402
from paramserver.v1 import wire  # noqa: E402
from paramserver.v1.wire import F32  # noqa: E402

CHUNK = 1 << 20
OPTS: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


# ----------------------------------------------------------------------------- hand codec
def encode_tensors(tensors: dict[str, np.ndarray], chunk_bytes: int) -> Iterator[list[pb.TensorChunk]]:
    """The generated classes' way: TensorChunk messages of about ``chunk_bytes``, a list per message."""
    for group in wire.chunk_groups(tensors, chunk_bytes):
        yield [pb.TensorChunk(name=name, shape=shape, dtype=pb.DATA_TYPE_FLOAT32, offset=offset, data=part.tobytes())
               for name, shape, offset, part in group]


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def chunk_plan(shapes: dict[str, tuple[int, ...]], chunk_bytes: int) -> list[list[tuple[str, tuple[int, ...], int, int]]]:
    """The message layout of encode_tensors: lists of (name, shape, offset, count) per message."""
    per = chunk_bytes // 4
    msgs: list[list[tuple[str, tuple[int, ...], int, int]]] = []
    batch: list[tuple[str, tuple[int, ...], int, int]] = []
    size = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        for lo in range(0, max(n, 1), per):
            cnt = min(per, n - lo)
            batch.append((name, shape, lo, cnt))
            size += 4 * cnt
            if size >= chunk_bytes:
                msgs.append(batch)
                batch, size = [], 0
    if batch:
        msgs.append(batch)
    return msgs


def encode_wire(
    tensors: dict[str, np.ndarray], plan: list[list[tuple[str, tuple[int, ...], int, int]]], field: int,
    prefix: bytes, final_field: int,
) -> Iterator[bytes]:
    """Messages whose tensors are repeated field ``field``; one copy of the data (b"".join)."""
    tag = varint((field << 3) | 2)
    for k, msg in enumerate(plan):
        parts: list[Any] = [prefix]
        for name, shape, lo, cnt in msg:
            nb = name.encode()
            packed = b"".join(varint(d) for d in shape)
            head = (b"\x0a" + varint(len(nb)) + nb + b"\x12" + varint(len(packed)) + packed + b"\x18\x01"
                    + (b"\x20" + varint(lo) if lo else b"") + b"\x2a" + varint(4 * cnt))
            parts += [tag, varint(len(head) + 4 * cnt), head,
                      memoryview(tensors[name].reshape(-1)[lo:lo + cnt]).cast("B")]
        if k == len(plan) - 1:
            parts.append(varint(final_field << 3) + b"\x01")
        yield b"".join(parts)


def decode_wire(msg: bytes, field: int) -> Iterator[tuple[str, int, np.ndarray]]:
    """(name, offset, zero-copy float32 view) for each chunk of repeated field ``field``."""
    i, n = 0, len(msg)
    while i < n:
        key, i = read_varint(msg, i)
        wt = key & 7
        if wt == 0:
            _, i = read_varint(msg, i)
        elif wt == 1:
            i += 8
        elif wt == 5:
            i += 4
        else:
            ln, i = read_varint(msg, i)
            if key >> 3 == field:
                j, end = i, i + ln
                name, off, data = "", 0, None
                while j < end:
                    k2, j = read_varint(msg, j)
                    if k2 & 7 == 0:
                        v, j = read_varint(msg, j)
                        if k2 >> 3 == 4:
                            off = v
                    else:
                        l2, j = read_varint(msg, j)
                        if k2 >> 3 == 1:
                            name = msg[j:j + l2].decode()
                        elif k2 >> 3 == 5:
                            data = np.frombuffer(msg, F32, l2 // 4, j)
                        j += l2
                assert data is not None
                yield name, off, data
            i += ln


# ----------------------------------------------------------------------------- server
class State:
    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.params = {n: np.random.default_rng(i).standard_normal(s, np.float32) for i, (n, s) in enumerate(shapes.items())}
        self.plan = chunk_plan(shapes, CHUNK)
        self.scratch = np.empty(CHUNK // 4, F32)
        self.lr = np.float32(0.01)
        self.pull_bytes = list(encode_wire(self.params, self.plan, 3, b"\x08\x01\x10\x01", 4))

    def sgd_chunk(self, name: str, off: int, g: np.ndarray) -> None:
        w = self.params[name].reshape(-1)[off:off + g.size]
        s = self.scratch[:g.size]
        np.multiply(g, self.lr, out=s)
        np.subtract(w, s, out=w)


def make_server(state: State) -> grpc.aio.Server:
    server = grpc.aio.server(options=OPTS)

    # proto: today's path, condensed from ps_server (TensorAssembler, check_gradient, Sgd).
    async def push_proto(it: AsyncIterator[pb.PushGradientRequest], ctx: Any) -> AsyncIterator[pb.PushGradientResponse]:
        arrays: dict[str, np.ndarray] = {}
        async for req in it:
            for ch in req.tensors:
                data = ch.data
                shape = tuple(ch.shape)
                if ch.name not in arrays:
                    if ch.offset == 0 and len(data) == 4 * int(np.prod(shape)):
                        arrays[ch.name] = np.frombuffer(data, F32).reshape(shape)
                        continue
                    arrays[ch.name] = np.empty(shape, F32)
                arrays[ch.name].reshape(-1)[ch.offset:ch.offset + len(data) // 4] = np.frombuffer(data, F32)
            if req.final:
                for name, g in arrays.items():
                    assert np.isfinite(np.sum(g, dtype=np.float32))
                    gf = g.reshape(-1)
                    for lo in range(0, gf.size, CHUNK // 4):
                        state.sgd_chunk(name, lo, gf[lo:lo + CHUNK // 4])
                arrays = {}
                yield pb.PushGradientResponse(clock=req.clock + 1)

    async def pull_proto(it: AsyncIterator[pb.PullParamsRequest], ctx: Any) -> AsyncIterator[pb.PullParamsResponse]:
        async for _ in it:
            batches = list(encode_tensors(state.params, CHUNK))
            for k, chunks in enumerate(batches):
                yield pb.PullParamsResponse(guaranteed_clock=1, version=1, tensors=chunks, final=k == len(batches) - 1)

    # wire: hand codec, identity (de)serialisers; gradient views applied without assembling.
    async def push_wire(it: AsyncIterator[bytes], ctx: Any) -> AsyncIterator[bytes]:
        held: list[tuple[str, int, np.ndarray]] = []
        k = 0
        async for msg in it:
            held += decode_wire(msg, 5)
            k += 1
            if k == len(state.plan):  # the client sends the same layout: the last one is final
                for _, _, g in held:  # validate everything before applying anything
                    assert np.isfinite(np.sum(g, dtype=np.float32))
                for name, off, g in held:
                    state.sgd_chunk(name, off, g)
                held, k = [], 0
                yield pb.PushGradientResponse(clock=1).SerializeToString()

    async def pull_wire(it: AsyncIterator[bytes], ctx: Any) -> AsyncIterator[bytes]:
        async for _ in it:
            for msg in encode_wire(state.params, state.plan, 3, b"\x08\x01\x10\x01", 4):
                yield msg

    # bytes: gRPC alone.
    async def push_bytes(it: AsyncIterator[bytes], ctx: Any) -> AsyncIterator[bytes]:
        k = 0
        async for _ in it:
            k += 1
            if k == len(state.plan):
                k = 0
                yield b"\x08\x01"

    async def pull_bytes(it: AsyncIterator[bytes], ctx: Any) -> AsyncIterator[bytes]:
        async for _ in it:
            for msg in state.pull_bytes:
                yield msg

    ident = {"request_deserializer": None, "response_serializer": None}
    handlers = {
        "PushProto": grpc.stream_stream_rpc_method_handler(
            push_proto, pb.PushGradientRequest.FromString, pb.PushGradientResponse.SerializeToString),
        "PullProto": grpc.stream_stream_rpc_method_handler(
            pull_proto, pb.PullParamsRequest.FromString, pb.PullParamsResponse.SerializeToString),
        "PushWire": grpc.stream_stream_rpc_method_handler(push_wire, **ident),
        "PullWire": grpc.stream_stream_rpc_method_handler(pull_wire, **ident),
        "PushBytes": grpc.stream_stream_rpc_method_handler(push_bytes, **ident),
        "PullBytes": grpc.stream_stream_rpc_method_handler(pull_bytes, **ident),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Ceiling", handlers),))
    return server


async def server_main(shapes: dict[str, tuple[int, ...]]) -> None:
    server = make_server(State(shapes))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


# ----------------------------------------------------------------------------- client
class Loop:
    def __init__(self, channel: grpc.aio.Channel, mode: str, shapes: dict[str, tuple[int, ...]]) -> None:
        self.mode = mode
        self.shapes = shapes
        self.nbytes = 4 * sum(int(np.prod(s)) for s in shapes.values())
        self.plan = chunk_plan(shapes, CHUNK)
        self.params = {n: np.empty(s, F32) for n, s in shapes.items()}
        self.grads = {n: np.zeros(s, F32) for n, s in shapes.items()}
        cap = mode.capitalize()
        if mode == "proto":
            self.push_call = channel.stream_stream(f"/bench.Ceiling/Push{cap}", pb.PushGradientRequest.SerializeToString,
                                                   pb.PushGradientResponse.FromString)()
            self.pull_call = channel.stream_stream(f"/bench.Ceiling/Pull{cap}", pb.PullParamsRequest.SerializeToString,
                                                   pb.PullParamsResponse.FromString)()
        else:
            self.push_call = channel.stream_stream(f"/bench.Ceiling/Push{cap}")()
            self.pull_call = channel.stream_stream(f"/bench.Ceiling/Pull{cap}")()
        self.prefix = pb.PushGradientRequest(run_id="run-0001", rank=0, incarnation=1, clock=1).SerializeToString()
        self.push_bytes = list(encode_wire(self.grads, self.plan, 5, self.prefix, 6))
        self.pull_req = pb.PullParamsRequest(run_id="run-0001", rank=0, incarnation=1, clock=1).SerializeToString()

    async def iteration(self) -> None:
        # pull
        if self.mode == "proto":
            await self.pull_call.write(pb.PullParamsRequest(run_id="run-0001", rank=0, incarnation=1, clock=1))
            while True:
                resp = await self.pull_call.read()
                for ch in resp.tensors:
                    data = ch.data
                    self.params[ch.name].reshape(-1)[ch.offset:ch.offset + len(data) // 4] = np.frombuffer(data, F32)
                if resp.final:
                    break
        else:
            await self.pull_call.write(self.pull_req)
            for _ in self.plan:  # same layout as the server's: count messages
                msg = await self.pull_call.read()
                if self.mode == "wire":
                    for name, off, view in decode_wire(msg, 3):
                        self.params[name].reshape(-1)[off:off + view.size] = view
        # push
        if self.mode == "proto":
            batches = list(encode_tensors(self.grads, CHUNK))
            reqs = [pb.PushGradientRequest(run_id="run-0001", rank=0, incarnation=1, clock=1, tensors=c,
                                           final=k == len(batches) - 1) for k, c in enumerate(batches)]
            for r in reqs:
                await self.push_call.write(r)
        elif self.mode == "wire":
            for m in encode_wire(self.grads, self.plan, 5, self.prefix, 6):
                await self.push_call.write(m)
        else:
            for m in self.push_bytes:
                await self.push_call.write(m)
        await self.push_call.read()


def check_codec() -> None:
    """The hand-encoded bytes parse as the real messages, with the right data."""
    shapes = {"a": (3, 300_000), "b": (5,)}
    rng = np.random.default_rng(0)
    t = {n: rng.standard_normal(s, np.float32) for n, s in shapes.items()}
    plan = chunk_plan(shapes, CHUNK)
    prefix = pb.PushGradientRequest(run_id="r", rank=2, incarnation=3, clock=4).SerializeToString()
    msgs = list(encode_wire(t, plan, 5, prefix, 6))
    ref = [[(c.name, tuple(c.shape), c.offset, c.data) for c in b] for b in encode_tensors(t, CHUNK)]
    for k, m in enumerate(msgs):
        req = pb.PushGradientRequest.FromString(m)
        assert (req.run_id, req.rank, req.incarnation, req.clock, req.final) == ("r", 2, 3, 4, k == len(msgs) - 1)
        assert [(c.name, tuple(c.shape), c.offset, c.data) for c in req.tensors] == ref[k]
        assert [(n, o, v.tobytes()) for n, o, v in decode_wire(m, 5)] == [(n, o, d) for n, _, o, d in ref[k]]


def tcp_rep(addr: str, nbytes: int, seconds: float, tcp_pid: int) -> dict[str, float]:
    tcp = TcpBench(addr, nbytes)
    c0, s0 = cpu_seconds(os.getpid()), cpu_seconds(tcp_pid)
    r = tcp.rep(seconds, 2)
    tcp.close()
    n = r["iters"]
    return {"gbps": r["gbps"], "client_ms": 1e3 * (cpu_seconds(os.getpid()) - c0) / n,
            "server_ms": 1e3 * (cpu_seconds(tcp_pid) - s0) / n}


async def client_main(addr: str, mode: str, shapes: dict[str, tuple[int, ...]], reps: int, seconds: float,
                      server_pid: int) -> list[dict[str, float]]:
    out = []
    async with grpc.aio.insecure_channel(addr, options=OPTS) as ch:
        loop = Loop(ch, mode, shapes)
        for _ in range(2):
            await loop.iteration()
        for _ in range(reps):
            c0, s0, t0 = cpu_seconds(os.getpid()), cpu_seconds(server_pid), time.perf_counter()
            n = 0
            while n < 2 or time.perf_counter() - t0 < seconds:
                await loop.iteration()
                n += 1
            el = time.perf_counter() - t0
            out.append({"gbps": 2 * loop.nbytes * n / el / 1e9, "client_ms": 1e3 * (cpu_seconds(os.getpid()) - c0) / n,
                        "server_ms": 1e3 * (cpu_seconds(server_pid) - s0) / n})
        loop.push_call.cancel()
        loop.pull_call.cancel()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shapes", choices=["mlp", "big"], default="mlp")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--grpc-option", action="append", default=[], metavar="KEY=INT",
                    help="extra channel/server option for both ends, e.g. grpc.http2.max_frame_size=16777215")
    ap.add_argument("--tcp-addr", help=argparse.SUPPRESS)
    ap.add_argument("--tcp-pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--role", choices=["server", "client"], help=argparse.SUPPRESS)
    ap.add_argument("--addr", help=argparse.SUPPRESS)
    ap.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    shapes = MLP_SHAPES if args.shapes == "mlp" else BIG_SHAPES
    for opt in args.grpc_option:
        key, _, value = opt.partition("=")
        OPTS.append((key, int(value)))
    if args.role == "server":
        asyncio.run(server_main(shapes))
        return
    if args.role == "client":
        import json

        reps = args.reps or (3 if args.quick else 7)
        seconds = 1.0 if args.quick else 2.0
        res: dict[str, list[dict[str, float]]] = {m: [] for m in ("proto", "wire", "bytes", "raw TCP")}
        nbytes = 4 * sum(int(np.prod(s)) for s in shapes.values())
        for _ in range(reps):  # interleave the modes: same noise for each
            for m in res:
                if m == "raw TCP":
                    res[m].append(tcp_rep(args.tcp_addr, nbytes, seconds / 2, args.tcp_pid))
                else:
                    res[m] += asyncio.run(client_main(args.addr, m, shapes, 1, seconds, args.server_pid))
        print(json.dumps(res))
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM (a timeout) unwinds as Ctrl-C: the finally blocks stop what was started
    check_codec()
    env = child_env(dict(os.environ, **MALLOC_ENV))  # children stop if this process dies
    py = sys.executable
    extra = [x for opt in args.grpc_option for x in ("--grpc-option", opt)]
    srv = subprocess.Popen([py, __file__, "--role", "server", "--shapes", args.shapes, *extra], env=env,
                           stdout=subprocess.PIPE, text=True)
    tcp = subprocess.Popen([py, str(Path(__file__).with_name("throughput.py")), "--role", "tcp-server"], env=env,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and tcp.stdout is not None
        addr = srv.stdout.readline().split()[-1]
        tcp_addr = tcp.stdout.readline().split()[-1]
        cmd = [py, __file__, "--role", "client", "--addr", addr, "--server-pid", str(srv.pid), "--shapes", args.shapes,
               "--tcp-addr", tcp_addr, "--tcp-pid", str(tcp.pid), *extra]
        if args.quick:
            cmd.append("--quick")
        if args.reps:
            cmd += ["--reps", str(args.reps)]
        import json

        res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
    finally:
        for p in (srv, tcp):
            p.terminate()
            p.wait(10)
    print(f"grpc ceiling, {args.shapes} shapes, 1 MiB chunks, malloc thresholds on, extra options {args.grpc_option}, "
          f"medians of {len(res['proto'])} interleaved repetitions, load average {open('/proc/loadavg').read().split()[0]}")
    print("| codec | push+pull GB/s | % of raw TCP (paired) | client CPU ms/it | server CPU ms/it |")
    print("|---|---|---|---|---|")
    for m, reps in res.items():
        med = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
        paired = statistics.median(r["gbps"] / t["gbps"] for r, t in zip(reps, res["raw TCP"], strict=True))
        print(f"| {m} | {med['gbps']:.3f} | {100 * paired:.0f}% | {med['client_ms']:.1f} | {med['server_ms']:.1f} |")


if __name__ == "__main__":
    exit_with_parent()  # started by another bench: not to outlive it
    main()
