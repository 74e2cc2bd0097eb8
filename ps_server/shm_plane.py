"""The server's end of the shared-memory data plane (``paramserver.v1.shm`` specifies it).

The TCP data plane's server, on an abstract Unix socket, with the message bytes in segments the
clients pass: everything but the link (accepting, streams, slots, statuses, the stream cap) is
``tcp_plane``'s, the socket's watch and the frames are ``link``'s, and the semantics are the data
plane's as on every transport. A request in the client's segment is decoded in place (the push's
gradient is applied from the client's memory: ``Caller.borrowed`` makes the data plane copy what
it keeps longer); a response is copied into the segment, over the requests it answers, in one go
on the event loop, so it holds whole tensors of one moment (no step runs in the middle of it). A
response the data plane marks ``Shared`` (BSP's answers of a clock) goes to a client that reads
publications as a PUBLISHED frame: copied once into a publication of the plane's (``_Publisher``),
which every client given that response reads.

Between pushes, a push stream is served in its socket's reader callback, as on TCP
(``link.Link.serve``): here for each SHARED request, whatever its size (an inline one goes to the
stream's task).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from paramserver.v1 import shm, tcp, wire

from .dataplane import Caller, DataPlane, Shared
from .link import WAIT, Got, Lean, Link
from .tcp_plane import StreamBudget, TcpDataPlane

__all__ = ["ShmDataPlane"]

log = logging.getLogger("ps_server")

_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SHARED_FRAME = tcp.FRAME.size + shm.REGION.size
_INLINE = 4096
"""Responses up to this size (a push's acknowledgement) go inline: cheaper than a copy and a
SHARED frame."""
_ALIGN_MIN = shm.IN_PLACE_BYTES
"""Responses from this size are placed so that their tensors are aligned (``_aligning``)."""
_PUBLISH_MIN = 1 << 20
"""``Shared`` responses from this size are published (smaller ones cost less to copy)."""
_PUBLICATIONS = 2
"""Publications a plane keeps at most: one for a BSP clock's answers while its workers read it,
one more for another run's (when every one is still being read, an answer is copied as before)."""


class _Publication:
    """A memfd of the server's holding one ``Shared`` response (``key``) at ``at``, read by
    ``readers``: the links it was sent to that have not sent their next message yet."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.fd = -1
        self.segment: shm.Segment | None = None
        self.key: tuple[object, ...] | None = None
        self.at = 0
        self.readers: set[_ShmLink] = set()

    def fit(self, n: int) -> shm.Segment:
        """Its segment, replaced by a larger one if it holds fewer than ``n`` bytes (no reader)."""
        if self.segment is None or self.segment.region.nbytes < n:
            self.close()
            self.fd, self.segment = shm.create_segment(shm.round_up(n + n // 4))
        return self.segment

    def close(self) -> None:
        self.key = None
        if self.segment is not None:
            self.segment.close()
            os.close(self.fd)
            self.segment, self.fd = None, -1


class _Publisher:
    """A plane's publications: a ``Shared`` response is written into one once, and read by every
    client it is sent to (the same key: the same bytes)."""

    def __init__(self) -> None:
        self._publications: list[_Publication] = []

    def publish(self, parts: Shared, n: int) -> _Publication | None:
        """The publication holding ``parts`` (``n`` bytes), written now unless it already is;
        None when every publication is being read and there may be no more."""
        pub = next((p for p in self._publications if p.key == parts.key), None)
        if pub is not None:
            return pub
        pub = next((p for p in self._publications if not p.readers), None)
        if pub is None:
            if len(self._publications) >= _PUBLICATIONS:
                return None
            pub = _Publication(len(self._publications) + 1)
            self._publications.append(pub)
        try:
            segment = pub.fit(n + shm.ALIGN)
        except OSError as exc:  # (no memfd here: the answer is copied into the client's segment)
            log.warning("no publication segment (%s): answers are copied into each worker's segment", exc)
            return None
        pub.key = None
        pub.at = _aligning(parts)
        shm.put(segment.region, pub.at, parts, n)
        pub.key = parts.key
        return pub

    def close(self) -> None:
        for pub in self._publications:
            pub.close()


_NO_FDS = "descriptors came with a {} frame: only SEGMENT passes one"


def _aligning(parts: Sequence[wire.Part]) -> int:
    """How far past a multiple of ``shm.ALIGN`` to put the message ``parts`` make up so that its
    first tensor's data (its first memoryview) starts at one: with a large model's answer padded
    (``wire.EncodedGroup``) every tensor then starts at a multiple of 16, and workers compute on it
    in place (numpy and BLAS are 4x slower on unaligned float32 arrays)."""
    before = 0
    for p in parts:
        if isinstance(p, memoryview):
            return -before % shm.ALIGN
        before += len(p)
    return 0


class _ShmLink(Link):
    """One connection: frames on the socket (descriptors received with them), bodies in the segment."""

    def __init__(self, conn: socket.socket, stall: float, max_segment: int, publisher: _Publisher) -> None:
        super().__init__(conn, stall)
        self._max_segment = max_segment
        self.segment: shm.Segment | None = None
        self._out = 0
        """Where the next response goes in the segment (0 again after each request)."""
        self._head = bytearray(_SHARED_FRAME)  # (a SHARED frame and a SEGMENT one have this size)
        self._publisher: _Publisher | None = None
        """The plane's, once the client said it reads publications."""
        self._shown: dict[int, shm.Segment] = {}
        """The publications the client was given (number -> segment)."""
        self._reading: set[_Publication] = set()
        """Those it reads (until its next message)."""
        self._offered = publisher

    def accept(self, flags: int) -> int:
        if flags & shm.FLAG_PUBLISHED:
            self._publisher = self._offered
            return shm.FLAG_PUBLISHED
        return 0

    def _published(self, parts: list[wire.Part], n: int) -> list[bytes] | None:
        """What to send next to give the client ``parts`` (its publication passed first if it
        lacks it): the PUBLISHED frame, after the rest of a PUBLICATION frame the socket took only
        the start of; or None: copy them into its segment."""
        if self._publisher is None or n < _PUBLISH_MIN or not isinstance(parts, Shared):
            return None
        pub = self._publisher.publish(parts, n)
        if pub is None:
            return None
        assert pub.segment is not None
        out = []
        if self._shown.get(pub.number) is not pub.segment:
            frame = tcp.FRAME.pack(shm.PUBLICATION, 0, 0, 0, shm.REGION.size) + \
                shm.REGION.pack(pub.segment.region.nbytes, pub.number)
            try:
                sent = socket.send_fds(self.conn, [frame], [pub.fd])
            except BlockingIOError:
                return None  # (the client has not read for a while: nothing went out, copy)
            self._shown[pub.number] = pub.segment
            if sent < len(frame):
                out.append(frame[sent:])  # (the descriptor went with its first bytes)
        pub.readers.add(self)
        self._reading.add(pub)
        out.append(tcp.FRAME.pack(shm.PUBLISHED, 0, 0, pub.number, shm.REGION.size) + shm.REGION.pack(pub.at, n))
        return out

    def _read_on(self) -> None:
        """The client sent its next message (or is gone): it reads no publication any more."""
        for pub in self._reading:
            pub.readers.discard(self)
        self._reading.clear()

    async def _recv(self, view: memoryview, fds: list[int], stall: float | None, idle: bool = False) -> None:
        """Fill ``view``, keeping any descriptors that come with the bytes in ``fds``; ``idle``: a
        frame's header, whose first byte may take as long as the stream stays idle (``stall``
        bounds every other wait: the peer is in the middle of a frame)."""
        got = 0
        while got < view.nbytes:
            try:
                k, anc, flags, _ = self.conn.recvmsg_into([view[got:]], shm.ANCILLARY)
            except BlockingIOError:
                await self.watch.readable(None if idle and not got else stall)
                continue
            fds += shm.descriptors(anc, flags)
            if k == 0:
                raise ConnectionError("the connection was closed")
            got += k

    async def read(self, max_bytes: int, reserve: Callable[[int], Awaitable[None]]) -> memoryview:
        while True:
            fds: list[int] = []
            try:
                header = bytearray(tcp.FRAME.size)
                await self._recv(memoryview(header), fds, self.stall, idle=True)
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
                    self._read_on()
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
        self._read_on()
        return seg.region[at : at + n]

    def _lean_one(self, lean: Lean, max_bytes: int) -> Got:
        """One request, if a whole SHARED frame is in the socket (a SEGMENT before it is mapped)."""
        head = self._head
        while True:
            try:
                k = self.conn.recv_into(head, _SHARED_FRAME, socket.MSG_PEEK)
            except BlockingIOError:
                return WAIT
            if k == 0:
                raise ConnectionError("the connection was closed")
            kind = head[0]
            if k < _SHARED_FRAME or kind not in (shm.SHARED, shm.SEGMENT) or \
                    tcp.FRAME.unpack_from(head)[4] != shm.REGION.size:
                return None  # (an inline MESSAGE, a frame still on its way, a bad one): ``read`` takes it
            if kind == shm.SHARED:  # (no room for descriptors: any that came are dropped, and flagged)
                _, _, flags, _ = self.conn.recvmsg_into([head])
                if flags & socket.MSG_CTRUNC:
                    raise ValueError(_NO_FDS.format("SHARED"))
                a, b = shm.REGION.unpack_from(head, tcp.FRAME.size)
                break
            fds: list[int] = []
            try:
                k, anc, flags, _ = self.conn.recvmsg_into([head], shm.ANCILLARY)
                fds += shm.descriptors(anc, flags)
                a, b = shm.REGION.unpack_from(head, tcp.FRAME.size)
                self._map(fds, a, b)  # a new segment (the SHARED frame that uses it follows)
            finally:
                for fd in fds:
                    os.close(fd)
        return self._answer_now(lean, self._shared(a, b))

    def _frames(self, parts: list[wire.Part]) -> list[bytes] | None:
        """The frames that give the client the response ``parts``: PUBLISHED (``_published``), or
        SHARED with the response written into the segment (over the turn's requests: applied by
        now, or copied where kept, ``Caller.borrowed``); None: send it inline."""
        n = wire.parts_len(parts)
        published = self._published(parts, n)
        if published is not None:
            return published
        seg = self.segment
        at = self._out + _aligning(parts) if n >= _ALIGN_MIN else self._out
        if n <= _INLINE or seg is None or at + n > seg.region.nbytes:
            return None
        self._out = shm.align(at + n)
        return [shm.put(seg.region, at, parts, n)]

    def _send_now(self, parts: list[wire.Part]) -> list[wire.Part]:
        frames = self._frames(parts)
        if frames is None:
            return super()._send_now(parts)
        rest = tcp.send_now(self.conn, frames)
        return [rest] if rest else []

    @staticmethod
    def _check_no_fds(fds: list[int], kind: str) -> None:
        if fds:
            raise ValueError(_NO_FDS.format(kind))

    def _map(self, fds: list[int], size: int, reserved: int) -> None:
        if len(fds) != 1:
            raise ValueError(f"SEGMENT came with {len(fds)} descriptors: pass exactly one (a sealed memfd)")
        segment = shm.map_segment(fds[0], size, reserved, self._max_segment)
        if self.segment is not None:
            self.segment.close()  # (views of it still in use keep it mapped until they go)
        self.segment = segment
        self._out = 0

    async def send(self, parts: list[wire.Part]) -> None:
        frames = self._frames(parts)
        if frames is None:
            await super().send(parts)
        else:
            await tcp.send_parts(self.conn, frames, self.stall)

    def close(self) -> None:
        super().close()
        self._read_on()
        if self.segment is not None:
            self.segment.close()
            self.segment = None


class ShmDataPlane(TcpDataPlane):
    """``listen`` starts it on a new abstract name (``name``, told to workers); ``close`` ends every connection."""

    _caller = Caller("shm", borrowed=True, chunk_bytes=shm.MESSAGE_BYTES, share_bytes=_PUBLISH_MIN)
    _DESCRIPTORS = 2
    """Its socket and its segment's mapping (an mmap keeps a duplicate of the memfd)."""

    def __init__(self, dataplane: DataPlane, max_message_bytes: int, closing: Callable[[], bool],
                 stall_seconds: float, max_segment_bytes: int, budget: StreamBudget | None = None) -> None:
        """``max_segment_bytes``: the largest segment a client may pass (it is mapped, not allocated)."""
        super().__init__(dataplane, max_message_bytes, closing, stall_seconds, budget)
        self._max_segment = max_segment_bytes
        self._publisher = _Publisher()
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

    async def close(self) -> None:
        await super().close()
        self._publisher.close()

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

    def _link(self, conn: socket.socket) -> Link:
        return _ShmLink(conn, self._stall, self._max_segment, self._publisher)
