"""The client's end of the shared-memory data plane (``paramserver.v1.shm`` specifies it).

A ``ShmCall`` is one PushGradient or PullParams stream, with the interface of every data-plane
call (``streams.Call``). Its segment is its own: sized from the traffic (4 MiB at first; a request,
or a turn of requests, that would not fit gets a segment 1.25 times its size, for its answer too; two answers in a row
that did not fit make the next turn start with a segment 1.25 times the size they needed: a
worker's push stream fits its model from its first push, while its pull stream, which carries a
whole model only at the start and the end, stays small), passed to the server, and freed by the
kernel once neither side maps it. An answer the server published (BSP's, the same for every
worker of a clock) is read from the server's publication, mapped read only, instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from paramserver.v1 import shm, tcp, wire

from . import errors, tcp_transport
from .streams import WriteFailed
from .tcp_transport import SETTLE, TcpCall, greet, status_error, too_large

try:
    from . import _exchange as native
except ImportError:  # (installed where it could not be compiled: the Python path does all)
    native = None  # type: ignore[assignment]

__all__ = ["ShmCall", "native"]

log = logging.getLogger("paramserver")

_FIRST = 4 << 20
_SHARED_FRAME = tcp.FRAME.size + shm.REGION.size
_MAX_REGION = 4 << 30
_TAIL_SLACK = 4096
"""Bytes a push may have beyond the parts ``push_buffers`` was given (final, loss, then_pull...)."""


class ShmCall(TcpCall):
    def __init__(self, sock: socket.socket, method: str, max_bytes: int) -> None:
        super().__init__(sock, method, max_bytes)
        self._segment: shm.Segment | None = None
        self._want = _FIRST  # the size the segment should have
        self._written = 0  # bytes of requests this turn
        self._base = 0  # where the next turn's first request goes (``push_buffers``: after what is kept)
        self._answered = 0  # bytes of the server's last answer
        self._over = 0  # answers in a row that did not fit
        self._reading = True  # the next write starts a turn
        self._inline = False  # segments could not be made
        self._head = bytearray(_SHARED_FRAME)
        self._publications: dict[int, shm.Segment] = {}  # the server's, by number (mapped read only)

    def _send_now(self, parts: Sequence[wire.Part]) -> bool | None:
        """A request that fits the segment, with one small frame (``TcpCall._send_now``)."""
        n = wire.parts_len(parts)
        try:
            turn = self._turn_at(n)
        except OSError:
            return False  # the server ended the stream: the read says why
        if turn is None:
            return None  # inline: through the event loop
        region, at = turn
        self._written = shm.align(at + n)
        return self._sendmsg_now([shm.put(region, at, parts, n)])

    def _turn_at(self, n: int) -> tuple[memoryview, int] | None:
        """The segment's region and where in it a turn's first request of ``n`` bytes goes
        (``_start_turn``); None when it does not fit there. OSError when the server ended the stream."""
        self._start_turn(n)
        seg = self._segment
        at = self._written
        return None if seg is None or at + n > seg.region.nbytes else (seg.region, at)

    def push_pull_now(self, n: int, head: bytes, clock: int, grads: tuple[np.ndarray, ...], prefixes: tuple[bytes, ...],
                      loss: float, pull_head: bytes, wait_field: bytes, since: tuple[int, int] | None,
                      param_version: int | None, names: tuple[bytes, ...],
                      outs: tuple[np.ndarray, ...]) -> tuple[Any, ...] | memoryview | bool:
        """A push of one message (at most ``n`` bytes; what ``wire.push_request_parts`` writes of
        ``head``, ``clock``, the tensors' ``prefixes`` and ``grads``, ``loss``, a then_pull of
        ``pull_head``, the next clock, ``wait_field`` and ``since``, and ``param_version``) with
        its pull, in one call of the C exchange (``native``; the caller checked there is one): the
        request written into the segment, its frame sent, the answer's frame awaited up to
        ``SETTLE_MS`` and, when it is a whole float32 model in the segment, decoded there with its
        tensors copied into ``outs`` (the arrays of ``names``). Returns the answer's fields
        (``_exchange.c`` lists them); or its bytes when it is one the C side leaves to the caller's
        decoder; or True when the request went and its answer is for ``read``; False when nothing
        went (not at a turn's start, or it would not fit the segment): the caller sends it as any."""
        seg = self._segment
        if not self._reading or self._inline or seg is None or self._rest or self._partial is not None or \
                self._base + n > seg.region.nbytes or not SETTLE.get():
            return False
        try:
            turn = self._turn_at(n)
        except OSError:
            return True  # the server ended the stream: the read says why
        if turn is None or self._inline:
            return False
        region, at = turn
        wait = tcp_transport.SETTLE_MS
        if self._skip:  # (as ``settle``: answers that did not come in time go through the loop a while)
            self._skip -= 1
            wait = 0
        lineage, version = since or (0, 0)
        try:
            got = native.push_pull(self.sock.fileno(), region, at, head, clock, grads, prefixes, loss, pull_head,
                                   wait_field, version, lineage, -1 if param_version is None else param_version,
                                   names, outs, wait)
        except (BufferError, TypeError, ValueError, OverflowError):  # (nothing went: arguments it cannot take)
            self._reading = True
            return False
        except ConnectionError as exc:
            raise errors.Unavailable(errors.Code.UNAVAILABLE, str(exc), method=self._method) from None
        self._written = shm.align(at + n)
        if isinstance(got, tuple):
            self._reading = True
            self._backoff = 0
            self._answered = max(self._answered, shm.align(got[-2] + got[-1]))
            if len(got) == 2:
                return region[got[0] : got[0] + got[1]].toreadonly()
            return got
        if got is None and wait:  # no answer in time
            self._backoff = min(1024, 2 * self._backoff or 16)
            self._skip = self._backoff
        elif isinstance(got, bytes):  # part of the frame went: the next write or read sends the rest
            self._rest = got
        return True

    def _recv_now(self) -> memoryview | None:
        """An answer in the segment, if its frame is in the socket (``TcpCall._recv_now``)."""
        self._reading = True
        head = self._head
        try:
            k = self.sock.recv_into(head, len(head), socket.MSG_PEEK)
        except OSError:
            return None  # (nothing yet, or the read says what broke)
        while k == len(head) and head[0] == shm.PUBLICATION:
            k, anc, flags, _ = self.sock.recvmsg_into([head], shm.ANCILLARY)
            self._map_publication(head, self._descriptors(anc, flags))
            try:
                k = self.sock.recv_into(head, len(head), socket.MSG_PEEK)
            except OSError:
                return None
        if k < len(head) or head[0] not in (shm.SHARED, shm.PUBLISHED):
            return None  # not here yet, inline, or the server's status: the read takes it
        self.sock.recv_into(head)
        kind, _, _, number, length = tcp.FRAME.unpack_from(head)
        at, n = shm.REGION.unpack_from(head, tcp.FRAME.size)
        if kind == shm.PUBLISHED and length == shm.REGION.size:
            return self._published(number, at, n)
        seg = self._segment
        if length != shm.REGION.size or seg is None or at + n > seg.region.nbytes:
            raise errors.Unavailable(errors.Code.UNAVAILABLE, "the data plane connection broke (the server's "
                                     f"message at [{at}, {at + n}) is outside the segment)", method=self._method)
        self._answered = max(self._answered, shm.align(at + n))
        return seg.region[at : at + n].toreadonly()

    def _map_publication(self, frame: bytearray, fds: list[int]) -> None:
        """Map the publication a PUBLICATION frame (header and body in ``frame``) passes."""
        try:
            size, number = shm.REGION.unpack_from(frame, tcp.FRAME.size)
            if len(fds) != 1 or tcp.FRAME.unpack_from(frame)[4] != shm.REGION.size:
                raise ValueError(f"a PUBLICATION frame came with {len(fds)} descriptors (one) or a bad body")
            old, self._publications[number] = self._publications.get(number), shm.map_publication(fds[0], size)
        except (OSError, ValueError) as exc:
            raise errors.Unavailable(errors.Code.UNAVAILABLE, f"the data plane connection broke ({exc})",
                                     method=self._method) from None
        finally:
            for fd in fds:
                os.close(fd)
        if old is not None:
            old.close()

    def _descriptors(self, anc: list[tuple[int, int, bytes]], flags: int) -> list[int]:
        try:
            return shm.descriptors(anc, flags)
        except ValueError as exc:
            raise errors.Unavailable(errors.Code.UNAVAILABLE, f"the data plane connection broke ({exc})",
                                     method=self._method) from None

    def _published(self, number: int, at: int, n: int) -> memoryview:
        """The message a PUBLISHED frame points at (read only; valid until this stream's next request)."""
        pub = self._publications.get(number)
        if pub is None or at + n > pub.region.nbytes:
            raise errors.Unavailable(errors.Code.UNAVAILABLE, "the data plane connection broke (the server's "
                                     f"message at [{at}, {at + n}) of publication {number} is outside it)",
                                     method=self._method)
        return pub.region[at : at + n]

    async def _recv_frame_head(self, head: memoryview) -> list[int]:
        """Fill ``head`` (a frame's header) from the socket, keeping the descriptors that come with it."""
        loop = asyncio.get_running_loop()
        got, fds = 0, []
        while got < head.nbytes:
            try:
                k, anc, flags, _ = self.sock.recvmsg_into([head[got:]], shm.ANCILLARY)
            except BlockingIOError:
                readable: asyncio.Future[None] = loop.create_future()

                def ready(readable: asyncio.Future[None] = readable) -> None:
                    if not readable.done():
                        readable.set_result(None)
                loop.add_reader(self.sock.fileno(), ready)
                try:
                    await readable
                finally:
                    loop.remove_reader(self.sock.fileno())
                continue
            fds += self._descriptors(anc, flags)
            if k == 0:
                for fd in fds:
                    os.close(fd)
                raise ConnectionError("the connection was closed")
            got += k
        return fds

    @classmethod
    async def open_shm(cls, name: str, method: str, max_bytes: int) -> ShmCall:
        """Connect to the server's abstract socket ``name`` and greet; OSError when there is none
        in this network namespace (another host: use TCP), errors.PsError when it refuses."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, shm.name_for(name))
            await greet(sock, method, "the shared-memory data plane", shm.FLAG_PUBLISHED)
        except BaseException:
            sock.close()
            raise
        return cls(sock, method, max_bytes)

    def _start_turn(self, first: int) -> None:
        """Before a turn's first request (``first`` bytes): a larger segment if it, or the last
        turn's requests together, would not fit (then with room for an answer as large beside
        them: a push's answer carries the model it pushed a gradient of, and a client that
        computes on it writes its next request beside it; room never written costs no memory), or
        if the last two answers did not."""
        self._reading = False
        want, seg = self._want, self._segment
        if not self._base and first <= want and self._written <= want and self._answered <= want and \
                seg is not None and seg.region.nbytes >= want:  # (a turn that fits as it is: every push of a run)
            self._over = self._written = self._answered = 0
            return
        base, self._base = self._base, 0
        self._want, self._over = self._next_turn(base + first)
        self._written, self._answered = base, 0
        seg = self._segment
        if self._inline or (seg is not None and seg.region.nbytes >= self._want):
            return
        try:
            fd, new = shm.create_segment(self._want)
        except OSError as exc:  # no memfd here (a seccomp profile, a memory limit): messages go inline
            if not self._inline:
                log.warning("no shared-memory segment (%s): this stream's messages go through the socket", exc)
            self._inline = True
            return
        try:
            header = tcp.FRAME.pack(shm.SEGMENT, 0, 0, 0, shm.REGION.size) + shm.REGION.pack(self._want, 0)
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

    def _next_turn(self, first: int) -> tuple[int, int]:
        """The size of segment a turn starting with a request of ``first`` bytes wants, and the
        count of answers in a row that did not fit (``_start_turn``)."""
        want = self._want
        for need in (first, self._written):  # this request; the last turn's requests together
            if need > want:
                want = shm.round_up(2 * need + need // 4)
        over = self._over + 1 if self._answered > want else 0
        if over >= 2:  # twice in a row: this stream carries answers that large
            want = max(want, shm.round_up(self._answered + self._answered // 4))
        return min(_MAX_REGION, want), over

    def push_buffers(self, parts: Sequence[wire.Part], keep: Iterable[np.ndarray] = ()) -> list[memoryview] | None:
        """Where the data parts (the memoryviews) of the request ``parts`` will be in the segment
        if it is the next turn's first request, as views to write them into (``shm.put`` then
        leaves them as they are); None when the stream is inside a turn, has no segment yet or
        would replace it for that request, or the data would not start at multiples of 16 (a
        small message's encoding does not align them). The request sent may be up to
        ``_TAIL_SLACK`` bytes longer than ``parts`` (its tail: final, loss, then_pull).

        ``keep``: arrays to read while the views are written (parameters borrowed from the last
        answer, ``PullSink``): those in the segment stay clear of the views, the request going
        after them (the next turn asks for a segment large enough, when this one is not)."""
        seg = self._segment
        n = wire.parts_len(parts) + _TAIL_SLACK
        if seg is None or self._inline or not self._reading:
            return None
        lo = shm.address(seg.region)
        hi = lo + seg.region.nbytes
        ends = [a.ctypes.data + a.nbytes - lo for a in keep if lo <= a.ctypes.data < hi]
        self._base = base = shm.align(max(ends, default=0))
        if base + n > seg.region.nbytes or self._next_turn(base + n)[0] > seg.region.nbytes:
            return None
        out, i = [], base
        for p in parts:
            if isinstance(p, memoryview):
                if i % 16:
                    return None
                out.append(seg.region[i : i + p.nbytes])
                i += p.nbytes
            else:
                i += len(p)
        return out

    async def write(self, parts: Sequence[wire.Part]) -> None:
        await self._flush()
        n = wire.parts_len(parts)
        if self._reading:
            try:
                self._start_turn(n)
            except OSError:
                raise WriteFailed from None  # (as TcpCall.write: the next read says what happened)
        at = self._written
        self._written = shm.align(at + n)
        seg = self._segment
        if seg is None or at + n > seg.region.nbytes:
            await super().write(parts)  # inline
            return
        try:
            await tcp.send_parts(self.sock, [shm.put(seg.region, at, parts, n)])
        except OSError:
            raise WriteFailed from None

    async def read(self) -> memoryview:
        try:
            await self._flush()
        except WriteFailed:
            pass  # the server ended the stream: what it said is read below
        self._reading = True
        if SETTLE.get():
            self.settle()
        try:
            header = bytearray(tcp.FRAME.size)
            while True:
                fds = await self._recv_frame_head(memoryview(header))
                kind, _, _, number, length = tcp.FRAME.unpack(header)
                if kind != shm.PUBLICATION:
                    for fd in fds:
                        os.close(fd)
                    break
                frame = bytearray(_SHARED_FRAME)
                frame[: tcp.FRAME.size] = header
                try:
                    await tcp.recv_exact(self.sock, memoryview(frame)[tcp.FRAME.size :])
                except BaseException:  # (the body never came: nobody else closes them)
                    for fd in fds:
                        os.close(fd)
                    raise
                self._map_publication(frame, fds)
            if kind == shm.PUBLISHED and length == shm.REGION.size:
                body = bytearray(length)
                await tcp.recv_exact(self.sock, memoryview(body))
                return self._published(number, *shm.REGION.unpack(body))
            if kind == shm.SHARED and length == shm.REGION.size:
                body = bytearray(length)
                await tcp.recv_exact(self.sock, memoryview(body))
                at, n = shm.REGION.unpack(body)
                seg = self._segment
                if seg is None or at + n > seg.region.nbytes:
                    raise ValueError(f"the server's message at [{at}, {at + n}) is outside the segment")
                self._answered = max(self._answered, shm.align(at + n))
                return seg.region[at : at + n].toreadonly()
            kind, status, inline = await tcp.read_frame(self.sock, self._max_bytes, head=bytes(header))
        except tcp.FrameTooLarge as exc:
            raise too_large(exc, self._method) from None
        except (OSError, ValueError) as exc:
            raise errors.Unavailable(errors.Code.UNAVAILABLE, f"the data plane connection broke ({exc})",
                                     method=self._method) from None
        if kind == tcp.STATUS:
            raise status_error(status, inline, self._method)
        self._answered += shm.align(len(inline))  # did not fit: two such turns in a row, and the next asks for more
        return inline

    def cancel(self) -> None:
        super().cancel()
        if self._segment is not None:
            self._segment.close()
            self._segment = None
        for pub in self._publications.values():
            pub.close()
        self._publications.clear()
