"""The shared-memory data plane: the TCP data plane's streams for a worker on the server's host,
with the messages' bytes in memory both processes map instead of in the socket.

The precedent is BytePS's and NCCL's intra-machine shared memory and Ray's object store: on one
host, copying a 23 MB model through a socket each way costs more CPU than the memory copies
themselves. Here a push's bytes are written once by the worker into memory the server computes
on in place (no copy at the server), and a pull's once by the server into memory the worker
reads them from.

The protocol (Linux; integers little-endian), a variant of ``paramserver.v1.tcp`` version 2:

* The server listens on an abstract Unix socket (a name in the network namespace, no file),
  ``\\0paramserver-`` and 32 random hex digits, new each time it starts, and tells it in
  ``JoinResponse.shm_socket`` and ``HeartbeatResponse.shm_socket`` (empty: none). Abstract names
  belong to a network namespace: a worker that can connect shares the server's host and namespace
  (the embedded local cluster; containers sharing the server's network); one that cannot uses the
  TCP data plane. The server takes connections only from its own user (``SO_PEERCRED``; root's
  are taken too): who can write this memory can write the model.
* A connection is one PushGradient or PullParams stream. Hello, frames, STATUS and the end of a
  stream are as on TCP (``tcp``), with two more frame kinds:
  - kind 3, SEGMENT (client to server): a 16-byte body, u64 ``size``, u64 zero, and exactly one
    file descriptor passed with it (``SCM_RIGHTS``): a memfd of at least ``size`` bytes, sealed
    against shrinking (``F_SEAL_SHRINK``; a server never maps memory that could vanish under it),
    open for writing and without write seals (the server writes its answers there).
    Its first ``size`` bytes are the stream's region. A later SEGMENT replaces it (to grow).
  - kind 4, SHARED (both ways): a 16-byte body, u64 ``offset``, u64 ``length``: the message (the
    bytes a MESSAGE frame would carry) is bytes [offset, offset + length) of the region.
* Turns: the client writes the requests of its turn at increasing, non-overlapping offsets of
  the region from 0 (or from past the last answer, below); the server, when it answers, writes
  the responses of its turn the same way from 0 again (one of 64 KiB or more up to 63 bytes
  further, so that its first tensor's data start at a multiple of 64 and, a large model's answer
  being padded, every tensor's at a multiple of 16), over the requests: it no longer needs them then (it has applied the push, and
  copied what it keeps longer: a gradient held for a BSP clock that its answer did not wait for,
  or whose wait failed); the client reads the whole answer
  before its next turn. So a message's bytes stay as they are until its reader sends its next
  message, the server computes on a push in place, and one region of the larger turn serves a
  stream. A message that does not fit the rest of the region goes inline as a MESSAGE frame; the
  client then sends a larger SEGMENT. A SHARED message may be larger than the server's message
  limit (nothing is allocated for it).
* Publications (BSP's answers, written once for every worker): a client that can read them sets
  bit 0 of its hello's flags (``FLAG_PUBLISHED``); a server that will send them echoes it. Two
  more frame kinds then come from the server:
  - kind 5, PUBLICATION: a 16-byte body, u64 ``size``, u64 ``number``, and exactly one file
    descriptor: a memfd of the server's, sealed against shrinking, to map read only; publication
    ``number`` (1, 2, ...) is now its first ``size`` bytes, replacing any earlier one of that
    number. It comes before the first PUBLISHED frame that uses it.
  - kind 6, PUBLISHED: a 16-byte body, u64 ``offset``, u64 ``length``, and the publication's
    number in the frame's u32 (a STATUS frame's status): the message is bytes [offset, offset +
    length) of that publication. They stay as they are until the client sends its next message
    on this stream, as SHARED ones: the server writes a publication again only once every
    stream it was shown to has sent its next message or ended. So the workers of a BSP clock,
    whose parameters are byte for byte the same (the server sends a push's acknowledgement in a
    response of its own, then the parameters), read one copy that the server wrote once
    (instead of one copy per worker's segment, one after another, while all of them wait), and
    computes its next gradient on it in place (the Python worker; no copy). The Python server
    places a published message so that its tensors' data start at multiples of 16 bytes of the
    publication (the chunks' ``padding``), as numpy and BLAS need for full speed.
* A client may start its next turn past the last answer in the region instead of at 0, and
  compute that turn's request from the answer in place meanwhile (the Python worker computes a
  large model's next gradient on the parameters it was sent, into the region beside them; they
  are the server's again once that request is sent, as always).
* A client may compute a request's tensor data straight into the region, where the request's
  encoding will put them (the Python worker writes a large gradient there: no copy; ``put`` leaves
  bytes already in place as they are). Nothing in the protocol changes: the bytes are the same.
  The server's answer goes over them, so a client that retries a push after a failed exchange
  must not send them from the region again (the Python worker computes the gradient again).
* Nothing has a name in the file system: a segment is freed by the kernel when the last process
  holding it exits, however it exits (``kill -9`` included), so none can be left behind.

Another language can speak it with ``memfd_create``, ``fcntl(F_ADD_SEALS)``, ``sendmsg`` with
``SCM_RIGHTS`` and ``mmap`` (C, Go, Rust, Java through a native call); Node's standard library
cannot pass descriptors, so the Node worker uses TCP.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import mmap
import os
import socket
import struct
from collections.abc import Sequence

import numpy as np

from .tcp import FRAME

__all__ = ["ANCILLARY", "FLAG_PUBLISHED", "MAX_FDS", "descriptors", "PUBLICATION", "PUBLISHED", "IN_PLACE_BYTES", "map_publication", "MESSAGE_BYTES", "REGION", "address", "align", "put", "SEGMENT", "SHARED", "Segment", "available", "create_segment", "map_segment", "name_for"]

SEGMENT = 3
SHARED = 4
PUBLICATION = 5
PUBLISHED = 6
FLAG_PUBLISHED = 1
"""The hello's flag of a client that reads publications (and of a server that sends them)."""
REGION = struct.Struct("<QQ")
"""The body of SEGMENT (size, 0), SHARED and PUBLISHED (offset, length) and PUBLICATION (size, number)."""
MESSAGE_BYTES = 32 << 20
"""Payload bytes per message that both sides write (fewer, larger messages than on TCP: nothing is
allocated for a shared one, and an inline one stays below the default 64 MiB message limit)."""
PAGE = mmap.PAGESIZE
ALIGN = 64
PREFIX = "paramserver-"


MAX_FDS = 4
ANCILLARY = socket.CMSG_SPACE(MAX_FDS * 4)
"""``recvmsg``'s ancillary buffer: room for the descriptors one frame may carry (and a few more)."""


def descriptors(anc: list[tuple[int, int, bytes]], flags: int) -> list[int]:
    """The file descriptors a ``recvmsg`` received (``SCM_RIGHTS``): the caller owns (closes) them.
    ValueError when there were more than ``MAX_FDS`` (the kernel closed the rest)."""
    fds = [fd for level, kind, data in anc if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
           for fd in array.array("i", data[: len(data) - len(data) % 4])]
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"more than {MAX_FDS} descriptors came with one frame: SEGMENT and PUBLICATION pass one")
    return fds


def available() -> bool:
    """Whether this system can offer it (Linux: memfd, seals, descriptor passing)."""
    return hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS") and hasattr(os, "MFD_ALLOW_SEALING")


def name_for(token: str) -> str:
    """The abstract socket address (leading NUL) of a server's name as told to workers."""
    return "\0" + token


def round_up(n: int) -> int:
    return -(-max(n, 1) // PAGE) * PAGE


def align(n: int) -> int:
    """Where the next message of a turn may start after ``n`` bytes (a multiple of 64)."""
    return -(-n // ALIGN) * ALIGN


IN_PLACE_BYTES = 1 << 16
"""A message with a part this large is looked for in the region (``put``); others are copied."""


def address(buf: bytes | memoryview) -> int:
    """Where the bytes of ``buf`` are in this process's memory."""
    return int(np.frombuffer(buf, np.uint8).__array_interface__["data"][0])


def put(region: memoryview, at: int, parts: Sequence[bytes | memoryview], n: int) -> bytes:
    """Copy a message's ``parts`` (``n`` bytes) into ``region`` at ``at``, in one go (no await
    between them: the bytes of one moment), and return the SHARED frame that points at it. In a
    message with a part of ``IN_PLACE_BYTES`` or more, a part already where it goes (a gradient
    computed into the region) is left as it is, and one elsewhere in the region is read before
    anything is written."""
    i = at
    if n < IN_PLACE_BYTES:  # (no part is large enough to be looked for)
        for p in parts:
            v = memoryview(p).cast("B")
            region[i : i + v.nbytes] = v
            i += v.nbytes
        return FRAME.pack(SHARED, 0, 0, 0, REGION.size) + REGION.pack(at, n)
    views = [memoryview(p).cast("B") for p in parts]
    kept = [False] * len(views)
    if any(v.nbytes >= IN_PLACE_BYTES for v in views):
        base, i = address(region), at
        for k, v in enumerate(views):
            where = address(v) - base
            if where == i:
                kept[k] = True
            elif -v.nbytes < where < region.nbytes:  # elsewhere in the region: read before written over
                views[k] = memoryview(bytes(v))
            i += v.nbytes
    i = at
    for v, keep in zip(views, kept, strict=True):
        if not keep:
            region[i : i + v.nbytes] = v
        i += v.nbytes
    return FRAME.pack(SHARED, 0, 0, 0, REGION.size) + REGION.pack(at, n)


class Segment:
    """A mapped segment: ``region`` is a byte view of it."""

    def __init__(self, mm: mmap.mmap, size: int) -> None:
        self._mm = mm
        self.region = memoryview(mm)[:size]

    def close(self) -> None:
        """Unmap now if nothing else holds a view (else when the last view goes)."""
        self.region.release()
        try:
            self._mm.close()
        except BufferError:
            pass  # numpy views of it live on: the mapping goes with the last of them


def create_segment(size: int) -> tuple[int, Segment]:
    """A new sealed memfd of ``size`` bytes, mapped: (its descriptor, to send and then close; the mapping)."""
    fd = os.memfd_create("paramserver-segment", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        mm = _huge(mmap.mmap(fd, size))
    except BaseException:
        os.close(fd)
        raise
    return fd, Segment(mm, size)


def _huge(mm: mmap.mmap) -> mmap.mmap:
    """``mm``, asking for huge pages where shared memory may have them (a host whose
    /sys/kernel/mm/transparent_hugepage/shmem_enabled is ``advise``): each process that maps a
    segment asks, as a mapping without the advice gets 4 KiB page table entries."""
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            mm.madvise(mmap.MADV_HUGEPAGE)
    return mm


def map_segment(fd: int, size: int, reserved: int, max_bytes: int) -> Segment:
    """Map a client's segment (the server's side); ValueError, saying what is wrong, when it is not
    one this protocol allows. Does not close ``fd``."""
    if not 0 < size <= max_bytes or reserved:
        raise ValueError(f"a SEGMENT of {size} bytes (then {reserved}): the size must be 1 to {max_bytes} bytes, "
                         "then 0")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise ValueError("the descriptor passed with SEGMENT is not a memfd: create it with memfd_create") from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise ValueError("the segment is not sealed against shrinking: add F_SEAL_SHRINK before sending it")
    have = os.fstat(fd).st_size
    if have < size:
        raise ValueError(f"the segment holds {have} bytes, fewer than the {size} its SEGMENT frame says")
    try:
        mm = mmap.mmap(fd, size)
    except PermissionError as exc:  # sealed against writes (F_SEAL_WRITE, F_SEAL_FUTURE_WRITE), or opened read only
        raise ValueError(f"the segment cannot be mapped for writing ({exc.strerror}): the server writes its answers "
                         "there; pass a memfd opened read-write, without write seals") from None
    return Segment(_huge(mm), size)


def map_publication(fd: int, size: int) -> Segment:
    """Map a server's publication read only (the client's side). Does not close ``fd``."""
    if not 0 < size <= os.fstat(fd).st_size:
        raise ValueError(f"a PUBLICATION of {size} bytes in a memfd of {os.fstat(fd).st_size}")
    return Segment(_huge(mmap.mmap(fd, size, prot=mmap.PROT_READ)), size)
