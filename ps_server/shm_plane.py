"""The server's end of the shared-memory data plane (``paramserver.v1.shm`` specifies it).

The TCP data plane's server, on an abstract Unix socket, with the message bytes in segments the
clients pass: everything but the link (accepting, streams, slots, statuses, the socket watch,
the stream cap) is ``tcp_plane``'s, and the semantics are the data plane's as on every transport.
A request in the client's segment is decoded in place (the push's gradient is applied from the
client's memory: ``Caller.borrowed`` makes the data plane copy what it keeps longer); a response
is copied into the segment, over the requests it answers, in one go on the event loop, so it
holds whole tensors of one moment (no step runs in the middle of it).

Between pushes, a push stream is served in its socket's reader callback, as on TCP
(``_Link.serve``): here for each SHARED request, whatever its size (an inline one goes to the
stream's task).
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable

import numpy as np

from paramserver.v1 import shm, tcp, wire

from .dataplane import Caller, DataPlane
from .tcp_plane import _WAIT, Got, Lean, TcpDataPlane, _Link

__all__ = ["ShmDataPlane"]

log = logging.getLogger("ps_server")

_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_MAX_FDS = 4
_SHARED_FRAME = tcp.FRAME.size + shm.REGION.size
_INLINE = 4096
"""Responses up to this size (a push's acknowledgement) go inline: cheaper than a copy and a
SHARED frame."""


class _ShmLink(_Link):
    """One connection: frames on the socket (descriptors received with them), bodies in the segment."""

    def __init__(self, conn: socket.socket, stall: float, max_segment: int) -> None:
        super().__init__(conn, stall)
        self._max_segment = max_segment
        self.segment: shm.Segment | None = None
        self._out = 0
        """Where the next response goes in the segment (0 again after each request)."""
        self._head = bytearray(_SHARED_FRAME)  # (a SHARED frame and a SEGMENT one have this size)

    async def _recv(self, view: memoryview, fds: list[int], stall: float | None) -> None:
        """Fill ``view``, keeping any descriptors that come with the bytes in ``fds``."""
        got = 0
        while got < view.nbytes:
            try:
                k, anc, flags, _ = self.conn.recvmsg_into([view[got:]], socket.CMSG_SPACE(_MAX_FDS * 4))
            except BlockingIOError:
                await self.watch.readable(stall if got else None)
                continue
            self._take_fds(anc, flags, fds)
            if k == 0:
                raise ConnectionError("the connection was closed")
            got += k

    async def read(self, max_bytes: int, reserve: Callable[[int], Awaitable[None]]) -> memoryview:
        while True:
            fds: list[int] = []
            try:
                header = bytearray(tcp.FRAME.size)
                await self._recv(memoryview(header), fds, None)
                kind, _, _, _, length = tcp.FRAME.unpack(header)
                if kind == tcp.MESSAGE:  # inline (it did not fit the region)
                    if length > max_bytes:
                        raise tcp.FrameTooLarge(f"a message of {length} bytes is larger than the server's limit of "
                                                f"{max_bytes} bytes")
                    await reserve(length)
                    body = np.empty(length, np.uint8).data
                    await self._recv(body, fds, self.stall)
                    self._check_no_fds(fds, "MESSAGE")
                    self._out = 0
                    return body
                if kind not in (shm.SHARED, shm.SEGMENT) or length != shm.REGION.size:
                    raise ValueError(f"unknown frame kind {kind} with {length} bytes: a client sends MESSAGE, "
                                     "SEGMENT or SHARED frames (the last two with 16-byte bodies)")
                region = bytearray(shm.REGION.size)
                await self._recv(memoryview(region), fds, self.stall)
                a, b = shm.REGION.unpack(region)
                if kind == shm.SEGMENT:
                    self._map(fds, a, b)
                    continue
                self._check_no_fds(fds, "SHARED")
                return self._shared(a, b)
            finally:
                for fd in fds:
                    os.close(fd)

    def _shared(self, at: int, n: int) -> memoryview:
        """The request a SHARED frame points at (the next responses go over it)."""
        seg = self.segment
        if seg is None:
            raise ValueError("a SHARED frame before any SEGMENT: pass the segment first")
        if at + n > seg.region.nbytes:
            raise ValueError(f"a SHARED message at [{at}, {at + n}) is outside the segment's region of "
                             f"{seg.region.nbytes} bytes")
        self._out = 0
        return seg.region[at : at + n]

    def _lean_one(self, lean: Lean, max_bytes: int) -> Got:
        """One request, if a whole SHARED frame is in the socket (a SEGMENT before it is mapped)."""
        head = self._head
        while True:
            try:
                k = self.conn.recv_into(head, _SHARED_FRAME, socket.MSG_PEEK)
            except BlockingIOError:
                return _WAIT
            if k == 0:
                raise ConnectionError("the connection was closed")
            kind = head[0]
            if k < _SHARED_FRAME or kind not in (shm.SHARED, shm.SEGMENT) or \
                    tcp.FRAME.unpack_from(head)[4] != shm.REGION.size:
                return None  # (an inline MESSAGE, a frame still on its way, a bad one): ``read`` takes it
            fds: list[int] = []
            try:
                k, anc, flags, _ = self.conn.recvmsg_into([head], socket.CMSG_SPACE(_MAX_FDS * 4))
                self._take_fds(anc, flags, fds)
                a, b = shm.REGION.unpack_from(head, tcp.FRAME.size)
                if kind == shm.SHARED:
                    self._check_no_fds(fds, "SHARED")
                    break
                self._map(fds, a, b)  # a new segment (the SHARED frame that uses it follows)
            finally:
                for fd in fds:
                    os.close(fd)
        return self._answer_now(lean, self._shared(a, b))

    def _send_now(self, parts: list[wire.Part]) -> list[wire.Part]:
        n = wire.parts_len(parts)
        seg = self.segment
        if n <= _INLINE or seg is None or self._out + n > seg.region.nbytes:
            return super()._send_now(parts)
        at, self._out = self._out, shm.align(self._out + n)
        rest = tcp.send_now(self.conn, [shm.put(seg.region, at, parts, n)])
        return [rest] if rest else []

    @staticmethod
    def _take_fds(anc: list[tuple[int, int, bytes]], flags: int, fds: list[int]) -> None:
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
        if flags & socket.MSG_CTRUNC:
            raise ValueError(f"more than {_MAX_FDS} descriptors came with one frame: SEGMENT passes exactly one")

    @staticmethod
    def _check_no_fds(fds: list[int], kind: str) -> None:
        if fds:
            raise ValueError(f"descriptors came with a {kind} frame: only SEGMENT passes one")

    def _map(self, fds: list[int], size: int, reserved: int) -> None:
        if len(fds) != 1:
            raise ValueError(f"SEGMENT came with {len(fds)} descriptors: pass exactly one (a sealed memfd)")
        segment = shm.map_segment(fds[0], size, reserved, self._max_segment)
        if self.segment is not None:
            self.segment.close()  # (views of it still in use keep it mapped until they go)
        self.segment = segment
        self._out = 0

    async def send(self, parts: list[wire.Part]) -> None:
        n = wire.parts_len(parts)
        seg = self.segment
        if n <= _INLINE or seg is None or self._out + n > seg.region.nbytes:
            await super().send(parts)
            return
        at, self._out = self._out, shm.align(self._out + n)
        # over the turn's requests: applied by now, or copied where kept (Caller.borrowed)
        await tcp.send_parts(self.conn, [shm.put(seg.region, at, parts, n)], self.stall)

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment = None


class ShmDataPlane(TcpDataPlane):
    """``listen`` starts it on a new abstract name (``name``, told to workers); ``close`` ends every connection."""

    _caller = Caller("shm", borrowed=True, chunk_bytes=shm.MESSAGE_BYTES)

    def __init__(self, dataplane: DataPlane, max_message_bytes: int, closing: Callable[[], bool],
                 stall_seconds: float, max_segment_bytes: int) -> None:
        """``max_segment_bytes``: the largest segment a client may pass (it is mapped, not allocated)."""
        super().__init__(dataplane, max_message_bytes, closing, stall_seconds)
        self._max_segment = max_segment_bytes
        self.name = ""

    def listen(self) -> str:
        """Listen on a new abstract Unix socket; its name. OSError when it cannot."""
        name = shm.PREFIX + secrets.token_hex(16)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            lsock.bind(shm.name_for(name))
        except OSError:
            lsock.close()
            raise
        self._listen(lsock)
        self.name = name
        return name

    def _admit(self, conn: socket.socket) -> bool:
        pid, uid, _ = _CREDENTIALS.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
        if uid not in (os.getuid(), 0):
            log.warning("shared-memory data plane: refused process %d of user %d (only this server's user, %d, "
                        "or root may write its memory)", pid, uid, os.getuid())
            return False
        conn.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, opt, 1 << 20)
        return True

    def _link(self, conn: socket.socket) -> _Link:
        return _ShmLink(conn, self._stall, self._max_segment)
