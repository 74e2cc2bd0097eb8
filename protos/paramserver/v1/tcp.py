"""The TCP data plane: ``PushGradient`` and ``PullParams`` streams framed on a plain TCP connection.

gRPC Python costs more than the bytes it carries: on the 2-core machine of bench/RESULTS.md, a
push + pull of prebuilt 1 MiB messages over gRPC streams reaches ~50% of raw TCP, before the
server does any work. These two streams carry almost all of a run's bytes, so the server also
offers them on a TCP port of its own, with the same messages and the same semantics; every
other RPC, and any client that does not speak this framing, uses gRPC.

Version 1 of the framing (integers little-endian):

* A connection carries one stream of one method, as a gRPC call does. The client opens it with
  8 bytes: ``b"PSDP"``, u8 version (1), u8 method (1 = PushGradient, 2 = PullParams), u16 zero.
  The server answers the same 8 bytes when it accepts, or a STATUS frame and closes.
* Then frames, each a 16-byte header (u8 kind, u8 zero, u16 zero, u32 status, u64 length) and
  ``length`` bytes:
  - kind 1, MESSAGE: one serialized request (client to server) or response (server to client),
    byte for byte the message the gRPC stream would carry;
  - kind 2, STATUS (server only): the stream ended with gRPC status code ``status``; the body is
    the UTF-8 message that says why. The server closes the connection after it.
* The client ends the stream by closing the connection; an unfinished push is dropped, never
  applied, as when a gRPC call is cancelled. There are no deadlines on the wire: the client
  bounds each operation itself, and closes the connection when one runs out.

The server advertises the port in ``JoinResponse.data_port`` and ``HeartbeatResponse.data_port``
(0 = no TCP data plane, e.g. when it requires TLS or a token, which this framing does not carry).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Sequence

import numpy as np

__all__ = [
    "FRAME",
    "FrameTooLarge",
    "HELLO",
    "MAGIC",
    "METHOD_PULL",
    "METHOD_PUSH",
    "MESSAGE",
    "STATUS",
    "VERSION",
    "hello",
    "read_frame",
    "recv_exact",
    "send_parts",
    "tune",
]

MAGIC = b"PSDP"
VERSION = 1
METHOD_PUSH = 1
METHOD_PULL = 2
MESSAGE = 1
STATUS = 2
HELLO = struct.Struct("<4sBBH")
FRAME = struct.Struct("<BBHIQ")
_IOV_MAX = 1024
_SOCKET_BUFFER = 4 << 20


def hello(method: int) -> bytes:
    return HELLO.pack(MAGIC, VERSION, method, 0)


def tune(sock: socket.socket) -> None:
    """Non-blocking, no Nagle delay, and socket buffers of a few MiB (fewer wake-ups per MiB)."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    fd = sock.fileno()
    loop.add_writer(fd, ready)
    try:
        await fut
    finally:
        loop.remove_writer(fd)


async def send_parts(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> None:
    """Write ``parts`` in order with ``sendmsg`` (no copy in user space), waiting for room as
    needed. Raises ConnectionError (OSError) when the peer is gone."""
    views = [v for v in (memoryview(p).cast("B") for p in parts) if v.nbytes]
    loop = asyncio.get_running_loop()
    while views:
        try:
            sent = sock.sendmsg(views[:_IOV_MAX])
        except BlockingIOError:
            await _writable(loop, sock)
            continue
        while sent:
            n = views[0].nbytes
            if sent >= n:
                sent -= n
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0
        if views:
            await _writable(loop, sock)


async def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket; ConnectionError if the peer closes first."""
    loop = asyncio.get_running_loop()
    got, n = 0, view.nbytes
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise ConnectionError("the connection was closed")
        got += k


class FrameTooLarge(ValueError):
    pass


async def read_frame(sock: socket.socket, max_bytes: int) -> tuple[int, int, memoryview]:
    """The next frame: (kind, status, body). The body is a fresh buffer the caller may keep
    (decoded chunks are views of it). ValueError when the frame is malformed, FrameTooLarge (a
    ValueError) when it is larger than ``max_bytes``: the connection is then out of step."""
    header = bytearray(FRAME.size)
    await recv_exact(sock, memoryview(header))
    kind, _, _, status, length = FRAME.unpack(header)
    if kind not in (MESSAGE, STATUS):
        raise ValueError(f"unknown frame kind {kind}")
    if length > max_bytes:
        raise FrameTooLarge(f"a message of {length} bytes is larger than the server's limit of {max_bytes} bytes")
    body = np.empty(length, np.uint8).data  # uninitialised: every byte is received into it
    if length:
        await recv_exact(sock, body)
    return kind, status, body
