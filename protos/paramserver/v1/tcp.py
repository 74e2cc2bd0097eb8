"""The TCP data plane: ``PushGradient`` and ``PullParams`` streams framed on a plain TCP connection.

gRPC Python costs more than the bytes it carries: on the 2-core machine of bench/RESULTS.md, a
push + pull of prebuilt 1 MiB messages over gRPC streams reaches ~50% of raw TCP, before the
server does any work. These two streams carry almost all of a run's bytes, so the server also
offers them on a TCP port of its own, with the same messages and the same semantics; every
other RPC, and any client that does not speak this framing, uses gRPC.

Version 2 of the framing (integers little-endian):

* A connection carries one stream of one method, as a gRPC call does. The client opens it with
  8 bytes: ``b"PSDP"``, u8 version (2), u8 method (1 = PushGradient, 2 = PullParams), u16 flags.
  The server answers the same 8 bytes when it accepts, with the flags it will use (zero on TCP:
  the flags are the shared-memory plane's, ``shm``), or a STATUS frame and closes (a hello of
  another version gets UNIMPLEMENTED: the client then uses gRPC).
* Then frames, each a 16-byte header (u8 kind, u8 zero, u16 zero, u32 status, u64 length) and
  ``length`` bytes:
  - kind 1, MESSAGE: one serialized request (client to server) or response (server to client),
    byte for byte the message the gRPC stream would carry;
  - kind 2, STATUS (server only): the stream ended with gRPC status code ``status``; the body is a
    serialized ``paramserver.v1.Status``: the message that says why, and the ``ErrorInfo`` that
    says it to programs (version 1 sent the bare UTF-8 message; a version 1 hello is still
    refused in that form). The server closes the connection after it.
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
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

__all__ = [
    "FRAME",
    "FrameTooLarge",
    "HELLO",
    "IOV_MAX",
    "MAGIC",
    "METHOD_PULL",
    "METHOD_PUSH",
    "MESSAGE",
    "STATUS",
    "VERSION",
    "hello",
    "read_frame",
    "recv_exact",
    "send_now",
    "send_parts",
    "take_message",
    "tune",
]

MAGIC = b"PSDP"
VERSION = 2
METHOD_PUSH = 1
METHOD_PULL = 2
MESSAGE = 1
STATUS = 2
HELLO = struct.Struct("<4sBBH")
FRAME = struct.Struct("<BBHIQ")
IOV_MAX = 1024
"""Parts one ``sendmsg`` takes at most (Linux's UIO_MAXIOV)."""
_SOCKET_BUFFER = 4 << 20


def hello(method: int, flags: int = 0) -> bytes:
    """The hello (and the server's echo) of ``method``; ``flags``: what the client can read besides
    (a bit per feature, echoed by a server that will use it: ``shm.FLAG_PUBLISHED``)."""
    return HELLO.pack(MAGIC, VERSION, method, flags)


def tune(sock: socket.socket) -> None:
    """Non-blocking, no Nagle delay, socket buffers of a few MiB (fewer wake-ups per MiB), and a
    dead peer found within seconds, as gRPC's keepalive pings would: keepalive probes after 2 s
    idle (2 s apart, 2 unanswered: gone), and data unacknowledged for 10 s ends the connection."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 2), ("TCP_USER_TIMEOUT", 10_000)):
        if hasattr(socket, name):  # Linux; elsewhere the system's keepalive defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket, stall: float | None) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    fd = sock.fileno()
    loop.add_writer(fd, ready)
    try:
        await asyncio.wait_for(fut, stall)
    except TimeoutError:
        raise TimeoutError(f"the peer read nothing for {stall:.0f}s") from None
    finally:
        loop.remove_writer(fd)


async def send_parts(sock: socket.socket, parts: Sequence[bytes | memoryview], stall: float | None = None) -> None:
    """Write ``parts`` in order with ``sendmsg`` (no copy in user space), waiting for room as
    needed. Raises ConnectionError (OSError) when the peer is gone, TimeoutError (an OSError)
    when it takes nothing for ``stall`` seconds.

    The parts are read as they are sent, so the caller may see values that change meanwhile go
    out. Never half an element: when a send stops inside one (say 2 bytes into a float32), the
    rest of that element is copied before waiting, so it goes out as it was when its first
    bytes did."""
    views = []
    for p in parts:
        v = memoryview(p)
        if v.nbytes:
            views.append((v.cast("B"), v.itemsize))
    loop = asyncio.get_running_loop()
    while views:
        try:
            sent = sock.sendmsg([v for v, _ in views[:IOV_MAX]])
        except BlockingIOError:
            await _writable(loop, sock, stall)
            continue
        while sent:
            view, size = views[0]
            if sent >= view.nbytes:
                sent -= view.nbytes
                views.pop(0)
                continue
            rest = view[sent:]
            sent = 0
            cut = rest.nbytes % size  # bytes left of the element the send stopped in (parts hold whole ones)
            if cut:
                views[0:1] = [(memoryview(bytes(rest[:cut])), 1), (rest[cut:], size)]
            else:
                views[0] = (rest, size)
        if views:
            await _writable(loop, sock, stall)


async def recv_exact(sock: socket.socket, view: memoryview, stall: float | None = None) -> None:
    """Fill ``view`` from the socket; ConnectionError if the peer closes first, TimeoutError (an
    OSError) if it sends nothing for ``stall`` seconds (None: wait as long as it takes)."""
    loop = asyncio.get_running_loop()
    got, n = 0, view.nbytes
    while got < n:
        if stall is None:
            k = await loop.sock_recv_into(sock, view[got:])
        else:
            try:
                async with asyncio.timeout(stall):
                    k = await loop.sock_recv_into(sock, view[got:])
            except TimeoutError:
                raise TimeoutError(f"the peer sent nothing for {stall:.0f}s in the middle of a frame") from None
        if k == 0:
            raise ConnectionError("the connection was closed")
        got += k


def send_now(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> bytes:
    """Send ``parts`` without waiting: what the socket did not take at once, as a copy (b"" when
    it took them all; everything when it took nothing). OSError when the peer is gone."""
    try:
        sent = sock.sendmsg(parts)
    except BlockingIOError:
        sent = 0
    if sent == sum(memoryview(p).nbytes for p in parts):
        return b""
    return b"".join(parts)[sent:]


def take_message(sock: socket.socket, head: bytearray, limit: int) -> tuple[memoryview, int] | None:
    """Without waiting: the MESSAGE frame of at most ``limit`` bytes whose header is in the socket,
    as its body (a fresh buffer) and how many of its bytes came (the rest is still on its way);
    None, having read nothing, when no whole header is there or it is not such a frame;
    BlockingIOError when nothing is there at all, ConnectionError when the peer closed the
    connection. ``head``: a buffer of ``FRAME.size``."""
    k = sock.recv_into(head, FRAME.size, socket.MSG_PEEK)
    if k == 0:
        raise ConnectionError("the connection was closed")
    if k < FRAME.size:
        return None
    kind, _, _, _, length = FRAME.unpack(head)
    if kind != MESSAGE or length > limit:
        return None
    sock.recv_into(head)
    body = np.empty(length, np.uint8).data
    got = 0
    while got < length:
        try:
            k = sock.recv_into(body[got:])
        except BlockingIOError:
            break
        if k == 0:
            raise ConnectionError("the connection was closed")
        got += k
    return body, got


class FrameTooLarge(ValueError):
    """A frame of ``length`` bytes over its reader's limit (``limit``)."""

    def __init__(self, message: str, length: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.length, self.limit = length, limit


async def read_frame(sock: socket.socket, max_bytes: int, head: bytes = b"", *, stall: float | None = None,
                     reserve: Callable[[int], Awaitable[None]] | None = None,
                     recv: Callable[[memoryview, float | None], Awaitable[None]] | None = None,
                     ) -> tuple[int, int, memoryview]:
    """The next frame: (kind, status, body). The body is a fresh buffer the caller may keep
    (decoded chunks are views of it). ValueError when the frame is malformed, FrameTooLarge (a
    ValueError) when it is larger than ``max_bytes``: the connection is then out of step.
    ``head``: the header's first bytes, already read (a refusal where a hello's echo was due).
    ``reserve``: awaited with the body's length before it is allocated (a memory budget);
    ``stall``: a peer that sends nothing for this long in the middle of the frame (its header
    included, once its first byte came) raises TimeoutError (between frames there is no limit: a
    stream may stay idle). ``recv``: how to
    fill a view, given a stall limit (default ``recv_exact`` on ``sock``)."""
    fill = recv or (lambda view, limit: recv_exact(sock, view, limit))
    header = bytearray(head) + bytearray(FRAME.size - len(head))
    rest = memoryview(header)[len(head):]
    if not head and stall is not None:  # idle until the header's first byte; its rest is mid-frame
        await fill(rest[:1], None)
        rest = rest[1:]
    await fill(rest, stall)
    kind, _, _, status, length = FRAME.unpack(header)
    if kind not in (MESSAGE, STATUS):
        raise ValueError(f"unknown frame kind {kind}")
    if length > max_bytes:
        raise FrameTooLarge(f"a message of {length} bytes is larger than the server's limit of {max_bytes} bytes",
                            length, max_bytes)
    if reserve is not None:
        await reserve(length)
    body = np.empty(length, np.uint8).data  # uninitialised: every byte is received into it
    if length:
        await fill(body, stall)
    return kind, status, body
