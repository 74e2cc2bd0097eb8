"""The client's end of the shared-memory data plane (``paramserver.v1.shm`` specifies it).

A ``ShmCall`` is one PushGradient or PullParams stream, with the interface of every data-plane
call (``streams.Call``). Its segment is its own: sized from the traffic (both regions start at
4 MiB; a turn that did not fit makes the next one start with a segment 1.25 times the size it
needed), passed to the server, and freed by the kernel once neither side maps it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Sequence

from paramserver.v1 import shm, tcp, wire

from . import errors
from .streams import WriteFailed
from .tcp_transport import TcpCall, greet, status_error

__all__ = ["ShmCall"]

log = logging.getLogger("paramserver")

_FIRST = 4 << 20
_MAX_REGION = 4 << 30
_ALIGN = 64


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class ShmCall(TcpCall):
    def __init__(self, sock: socket.socket, method: str, max_bytes: int) -> None:
        super().__init__(sock, method, max_bytes)
        self._segment: shm.Segment | None = None
        self._want = [_FIRST, _FIRST]  # region sizes the next segment should have
        self._turn = [0, 0]  # bytes this turn (requests), and the server's last turn (responses)
        self._reading = True  # the next write starts a turn
        self._inline = False  # segments could not be made

    @classmethod
    async def open_shm(cls, name: str, method: str, max_bytes: int) -> ShmCall:
        """Connect to the server's abstract socket ``name`` and greet; OSError when there is none
        in this network namespace (another host: use TCP), errors.PsError when it refuses."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, shm.name_for(name))
            await greet(sock, method, "the shared-memory data plane")
        except BaseException:
            sock.close()
            raise
        return cls(sock, method, max_bytes)

    def _start_turn(self) -> None:
        """Before a turn's first request: a larger segment if the last turns did not fit."""
        self._reading = False
        for i, used in enumerate(self._turn):
            if used > self._want[i]:
                self._want[i] = min(_MAX_REGION, shm.round_up(used + used // 4))
        self._turn = [0, 0]
        if self._inline:
            return
        seg = self._segment
        if seg is not None and seg.request.nbytes >= self._want[0] and seg.response.nbytes >= self._want[1]:
            return
        try:
            fd, new = shm.create_segment(*self._want)
        except OSError as exc:  # no memfd here (a seccomp profile, a memory limit): messages go inline
            if self._segment is None and not self._inline:
                log.warning("no shared-memory segment (%s): this stream's messages go through the socket", exc)
            self._inline = True
            return
        try:
            header = tcp.FRAME.pack(shm.SEGMENT, 0, 0, 0, shm.REGION.size) + shm.REGION.pack(*self._want)
            sent = socket.send_fds(self.sock, [header], [fd])  # 32 bytes into an idle socket: all of it
            if sent != len(header):
                raise BlockingIOError("the segment's frame did not go out whole")
        except BaseException:
            new.close()
            raise
        finally:
            os.close(fd)
        if seg is not None:
            seg.close()
        self._segment = new

    async def write(self, parts: Sequence[wire.Part]) -> None:
        if self._reading:
            try:
                self._start_turn()
            except OSError:
                raise WriteFailed from None  # (as TcpCall.write: the next read says what happened)
        n = wire.parts_len(parts)
        at = self._turn[0]
        self._turn[0] = _align(at + n)
        seg = self._segment
        if seg is None or at + n > seg.request.nbytes:
            await super().write(parts)  # inline; the next turn gets a segment it fits
            return
        dst, i = seg.request, at
        for p in parts:
            v = memoryview(p).cast("B")
            dst[i : i + v.nbytes] = v
            i += v.nbytes
        try:
            await tcp.send_parts(self.sock, [tcp.FRAME.pack(shm.SHARED, 0, 0, 0, shm.REGION.size),
                                             shm.REGION.pack(at, n)])
        except OSError:
            raise WriteFailed from None

    async def read(self) -> memoryview:
        self._reading = True
        self.settle()
        try:
            header = bytearray(tcp.FRAME.size)
            await tcp.recv_exact(self.sock, memoryview(header))
            kind, _, _, _, length = tcp.FRAME.unpack(header)
            if kind == shm.SHARED and length == shm.REGION.size:
                body = bytearray(length)
                await tcp.recv_exact(self.sock, memoryview(body))
                at, n = shm.REGION.unpack(body)
                seg = self._segment
                if seg is None or at + n > seg.response.nbytes:
                    raise ValueError(f"the server's message at [{at}, {at + n}) is outside the response region")
                self._turn[1] = max(self._turn[1], _align(at + n))
                return seg.response[at : at + n]
            kind, status, inline = await tcp.read_frame(self.sock, self._max_bytes, head=bytes(header))
        except (OSError, ValueError) as exc:
            raise errors.Unavailable(errors.Code.UNAVAILABLE, f"the data plane connection broke ({exc})",
                                     method=self._method) from None
        if kind == tcp.STATUS:
            raise status_error(status, inline, self._method)
        self._turn[1] += _align(len(inline))  # did not fit: the next turn asks for more
        return inline

    def cancel(self) -> None:
        super().cancel()
        if self._segment is not None:
            self._segment.close()
            self._segment = None
