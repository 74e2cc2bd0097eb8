"""Hand codec for the data plane's hot messages, equal to what the generated protobuf classes write.

``PushGradientRequest``, ``PushGradientResponse`` and ``PullParamsResponse`` carry almost all the
payload; building and parsing them through protobuf objects copies every tensor byte several
times. Here they are encoded as parts, small headers and array memoryviews (each chunk's header
is built once per tensor layout and cached), that gRPC's serializer joins (``join``: one copy) and
the TCP data plane writes as they are (``paramserver.v1.tcp``), and decoded by walking the fields,
with chunk data as zero-copy memoryview slices of the received bytes. The output is exactly what
``SerializeToString`` writes (fields in number order, proto3 defaults omitted, packed shapes,
negative int64 as 10-byte varints), except that the chunks of a push with more than
``SMALL_MESSAGE`` payload bytes get a ``padding`` field before their data where needed to start
it at a multiple of 16 bytes into the message (the server computes on those bytes in place;
unaligned, that costs 40-60% more). Decoding takes a fast path for what the senders write;
anything unusual (unknown or repeated scalar fields, unpacked shapes, out-of-range values, bad
UTF-8) falls back to the generated classes, so the result always equals ``FromString``'s, and
malformed input raises ``google.protobuf.message.DecodeError`` as before. Messages with at most
``SMALL_MESSAGE`` payload bytes are decoded by the generated classes (faster there, with little
to copy); their chunks are then the generated ``TensorChunk``s, with ``bytes`` data.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

from . import paramserver_pb2 as pb
from .tensors import F32

__all__ = [
    "Chunk",
    "ChunkLike",
    "ParamsResponse",
    "PushRequest",
    "Group",
    "ParamsParts",
    "Part",
    "PushResponse",
    "chunk_groups",
    "decode_params_response",
    "decode_push_request",
    "decode_push_response",
    "encode_chunk",
    "join",
    "params_response_parts",
    "parts_len",
    "push_request_parts",
    "push_response_parts",
    "varint",
]

R = TypeVar("R")

SMALL_MESSAGE = 64 << 10
"""Messages with at most this many payload bytes are decoded by the generated classes (upb, in C):
with little payload to spare from copying, walking the fields in Python costs more (decoding a
small model's 19 KB push: 1 µs against 11-20 µs; a 256 KB one: 65 µs against 11 µs). Encoding
is by hand at every size (with cached chunk headers: 2.4 µs against 12 µs for the same 19 KB)."""

_U64 = (1 << 64) - 1
_DOUBLE = struct.Struct("<d")
_ZERO8 = b"\0" * 8


def varint(n: int) -> bytes:
    """Protobuf varint of n; negative values as 64-bit two's complement (10 bytes)."""
    n &= _U64
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class _Fallback(Exception):
    """The fast decoder met something it does not handle: use the generated class."""


def _read_varint(buf: bytes | memoryview, i: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if i >= end or shift > 63:
            raise _Fallback
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            if result > _U64:
                raise _Fallback
            return result, i
        shift += 7


def _delimited(buf: memoryview, wt: int, i: int, end: int) -> tuple[int, int]:
    """The bounds (start, stop) of a length-delimited field whose length varint starts at ``i``."""
    if wt != 2:
        raise _Fallback
    ln, i = _read_varint(buf, i, end)
    if i + ln > end:
        raise _Fallback
    return i, i + ln


def _signed64(n: int) -> int:
    return n - (1 << 64) if n >> 63 else n


# ----------------------------------------------------------------------------------- data types
class ChunkLike(Protocol):
    """A decoded chunk: a ``Chunk`` from the hand decoder, or the generated ``pb.TensorChunk``
    itself for small messages (converting those would cost more than their decoding)."""

    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> Sequence[int]: ...
    @property
    def dtype(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def data(self) -> bytes | memoryview: ...


@dataclass
class Chunk:
    """A decoded ``TensorChunk``; ``data`` is a view of the received bytes (or bytes)."""

    name: str = ""
    shape: tuple[int, ...] = ()
    dtype: int = 0
    offset: int = 0
    data: bytes | memoryview = b""


@dataclass
class ParamsResponse:
    guaranteed_clock: int = 0
    version: int = 0
    tensors: list[ChunkLike] = field(default_factory=list)
    final: bool = False
    run_state: int = 0


@dataclass
class PushRequest:
    run_id: str = ""
    rank: int = 0
    incarnation: int = 0
    clock: int = 0
    tensors: list[ChunkLike] = field(default_factory=list)
    final: bool = False
    loss: float = 0.0
    then_pull: pb.PullParamsRequest | None = None


@dataclass
class PushResponse:
    clock: int = 0
    duplicate: bool = False
    min_clock: int = 0
    run_state: int = 0
    pulled: ParamsResponse | None = None
    """None when the response has no ``pulled`` field."""


# ----------------------------------------------------------------------------------- encoding
Part = bytes | memoryview
Group = Sequence[tuple[str, tuple[int, ...], int, "np.ndarray | memoryview"]]
"""Chunks of one message: (name, full shape, offset, flat float32 part, or a memoryview of one)."""
ParamsParts = tuple[int, int, Group, bool, int]
"""The arguments of ``params_response_parts``."""


def chunk_groups(
    tensors: Mapping[str, np.ndarray], chunk_bytes: int
) -> Iterator[list[tuple[str, tuple[int, ...], int, np.ndarray]]]:
    """(name, shape, offset, flat float32 part) groups of about ``chunk_bytes``, split exactly as
    ``tensors.chunk_messages`` splits them. Always yields at least one (maybe empty) group."""
    per_chunk = max(1, chunk_bytes // 4)
    group: list[tuple[str, tuple[int, ...], int, np.ndarray]] = []
    size, sent = 0, False
    for name, arr in tensors.items():
        flat = arr.reshape(-1)
        if flat.dtype != F32:
            flat = flat.astype(F32)
        shape = arr.shape
        n = flat.size
        if n <= per_chunk:  # the common case, without slicing (a small model's tensors, biases)
            group.append((name, shape, 0, flat))
            size += 4 * n
            if size >= chunk_bytes:
                yield group
                group, size, sent = [], 0, True
            continue
        for lo in range(0, n, per_chunk):
            part = flat[lo : lo + per_chunk]
            group.append((name, shape, lo, part))
            size += part.nbytes
            if size >= chunk_bytes:
                yield group
                group, size, sent = [], 0, True
    if group or not sent:
        yield group


def _data_view(part: np.ndarray | bytes | memoryview) -> Part:
    if isinstance(part, np.ndarray):
        if not part.flags.c_contiguous:
            part = np.ascontiguousarray(part)
        return part.data  # b"".join reads any contiguous buffer; nbytes is its length in bytes
    return part


def _chunk_head(name: str, shape: Sequence[int], offset: int, nbytes: int, dtype: int, pad: int) -> bytearray:
    """A ``TensorChunk``'s fields up to and including its data's tag and length."""
    head = bytearray()
    if name:
        nb = name.encode("utf-8")
        head += b"\x0a" + varint(len(nb)) + nb
    if len(shape):
        packed = b"".join(varint(int(d)) for d in shape)
        head += b"\x12" + varint(len(packed)) + packed
    if dtype:
        head += b"\x18" + varint(dtype)
    if offset:
        head += b"\x20" + varint(offset)
    if pad:
        head += _PAD_TAG + varint(pad - 3) + bytes(pad - 3)
    if nbytes:
        head += b"\x2a" + varint(nbytes)
    return head


def encode_chunk(
    name: str, shape: Sequence[int], offset: int, data: np.ndarray | bytes | memoryview,
    dtype: int = pb.DATA_TYPE_FLOAT32, pad: int = 0,
) -> list[Part]:
    """A ``TensorChunk``'s serialized body as parts (the last one is the data, not copied);
    ``pad``: 0, or the size in bytes (>= 3) of a ``padding`` field to put just before the data."""
    view = _data_view(data)
    n = len(view) if not isinstance(view, memoryview) else view.nbytes
    head = bytes(_chunk_head(name, shape, offset, n, dtype, pad))
    return [head, view] if n else [head]


_PAD_TAG = b"\x82\x01"  # field 16, length-delimited
_PADS = (0, *range(3, 35))
"""Sizes of the ``padding`` field tried (tag 2 bytes, length 1, 0-31 bytes): every residue mod 16
twice, so that one fits even where the chunk's length prefix grows by a byte within the range."""


def _payload(group: Group) -> int:
    return sum(part.nbytes for _, _, _, part in group)


@functools.lru_cache(maxsize=8192)
def _chunk_prefix(tag: bytes, name: str, shape: tuple[int, ...], offset: int, nbytes: int) -> bytes:
    """Everything of a ``tensors`` field but its data: the field's tag and length, the chunk's
    fields and the data's tag and length. A run's tensors give the same few every time, and
    building them costs more than the rest of a small model's message."""
    head = _chunk_head(name, shape, offset, nbytes, pb.DATA_TYPE_FLOAT32, 0)
    return tag + varint(len(head) + nbytes) + head


def _repeated_chunks(tag: bytes, group: Group, at: int | None = None) -> list[Part]:
    """The ``tensors`` fields of ``group``. ``at``: where they start in the top-level message, to
    pad each chunk so that its data starts at a multiple of 16 (None: no padding)."""
    parts: list[Part] = []
    if at is None:
        for name, shape, offset, data in group:
            view = _data_view(data)
            nbytes = view.nbytes if isinstance(view, memoryview) else len(view)
            parts.append(_chunk_prefix(tag, name, tuple(shape), offset, nbytes))
            if nbytes:
                parts.append(view)
        return parts
    for name, shape, offset, data in group:
        body = encode_chunk(name, shape, offset, data)
        size = parts_len(body)
        if len(body) == 2:
            head = len(body[0])
            for pad in _PADS:
                if (at + len(tag) + len(varint(size + pad)) + head + pad) % 16 == 0:
                    break
            if pad:
                body = encode_chunk(name, shape, offset, data, pad=pad)
                size += pad
        prefix = tag + varint(size)
        parts.append(prefix)
        parts += body
        at += len(prefix) + size
    return parts


def parts_len(parts: Sequence[Part]) -> int:
    """The byte length of the message ``parts`` make up."""
    return sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in parts)


def join(parts: Sequence[Part]) -> bytes:
    """One message from its parts: the serializer of the gRPC data-plane streams (one copy)."""
    return b"".join(parts)


def _encode_loss(loss: float) -> bytes:
    packed = _DOUBLE.pack(loss)
    return b"" if packed == _ZERO8 else b"\x39" + packed


def push_request_parts(
    run_id: str,
    rank: int,
    incarnation: int,
    clock: int,
    group: Group,
    final: bool,
    loss: float = 0.0,
    then_pull: pb.PullParamsRequest | None = None,
) -> list[Part]:
    """A ``PushGradientRequest`` whose ``tensors`` are the chunks of ``group``, as parts to write
    in order (the data are views, not copies; ``join`` makes the serialized message)."""
    head = bytearray()
    if run_id:
        rb = run_id.encode("utf-8")
        head += b"\x0a" + varint(len(rb)) + rb
    if rank:
        head += b"\x10" + varint(rank)
    if incarnation:
        head += b"\x18" + varint(incarnation)
    if clock:
        head += b"\x20" + varint(clock)
    tail = bytearray()
    if final:
        tail += b"\x30\x01"
    tail += _encode_loss(loss)
    if then_pull is not None:
        sub = then_pull.SerializeToString()
        tail += b"\x42" + varint(len(sub)) + sub
    at = len(head) if _payload(group) > SMALL_MESSAGE else None  # small ones: nothing worth aligning
    return [bytes(head), *_repeated_chunks(b"\x2a", group, at), bytes(tail)]


def params_response_parts(
    guaranteed_clock: int, version: int, group: Group,
    final: bool, run_state: int,
) -> list[Part]:
    """A ``PullParamsResponse`` as parts to write in order (the data are views, not copies)."""
    head = bytearray()
    if guaranteed_clock:
        head += b"\x08" + varint(guaranteed_clock)
    if version:
        head += b"\x10" + varint(version)
    tail = bytearray()
    if final:
        tail += b"\x20\x01"
    if run_state:
        tail += b"\x28" + varint(run_state)
    return [bytes(head), *_repeated_chunks(b"\x1a", group), bytes(tail)]


def push_response_parts(
    clock: int = 0,
    duplicate: bool = False,
    min_clock: int = 0,
    run_state: int = 0,
    pulled: ParamsParts | None = None,
) -> list[Part]:
    """A ``PushGradientResponse`` as parts to write in order; ``pulled`` = the arguments of
    ``params_response_parts``."""
    head = bytearray()
    if clock:
        head += b"\x08" + varint(clock)
    if duplicate:
        head += b"\x10\x01"
    if min_clock:
        head += b"\x18" + varint(min_clock)
    if run_state:
        head += b"\x20" + varint(run_state)
    if pulled is None:
        return [bytes(head)]
    parts = params_response_parts(*pulled)
    head += b"\x2a" + varint(parts_len(parts))
    return [bytes(head), *parts]


# ----------------------------------------------------------------------------------- decoding
def _as_view(buf: bytes | memoryview) -> memoryview:
    return buf if isinstance(buf, memoryview) else memoryview(buf)


def _as_bytes(buf: bytes | memoryview) -> bytes:
    return buf if isinstance(buf, bytes) else bytes(buf)


def _decode_chunk(buf: memoryview, i: int, end: int) -> Chunk:
    c = Chunk()
    seen = 0
    while i < end:
        key, i = _read_varint(buf, i, end)
        fnum, wt = key >> 3, key & 7
        if fnum == 16:  # padding: skipped
            i = _delimited(buf, wt, i, end)[1]
            continue
        bit = 1 << fnum if fnum < 8 else 0
        if not bit or seen & bit:
            raise _Fallback
        seen |= bit
        if fnum in (1, 2, 5):
            i, j = _delimited(buf, wt, i, end)
            if fnum == 1:
                try:
                    c.name = str(buf[i:j], "utf-8")
                except UnicodeDecodeError:
                    raise _Fallback from None
            elif fnum == 2:
                dims = []
                k = i
                while k < j:
                    v, k = _read_varint(buf, k, j)
                    dims.append(_signed64(v))
                c.shape = tuple(dims)
            else:
                c.data = buf[i:j]
            i = j
        elif fnum in (3, 4):
            if wt != 0:
                raise _Fallback
            v, i = _read_varint(buf, i, end)
            if fnum == 3:
                if v > 0x7FFFFFFF:
                    raise _Fallback
                c.dtype = v
            else:
                c.offset = _signed64(v)
        else:
            raise _Fallback
    if i != end:
        raise _Fallback
    return c


def _decode_params(buf: memoryview, i: int, end: int) -> ParamsResponse:
    r = ParamsResponse()
    seen = 0
    while i < end:
        key, i = _read_varint(buf, i, end)
        fnum, wt = key >> 3, key & 7
        if fnum == 3:
            i, j = _delimited(buf, wt, i, end)
            r.tensors.append(_decode_chunk(buf, i, j))
            i = j
            continue
        bit = 1 << fnum if fnum < 8 else 0
        if not bit or seen & bit or wt != 0 or fnum not in (1, 2, 4, 5):
            raise _Fallback
        seen |= bit
        v, i = _read_varint(buf, i, end)
        if fnum == 1:
            r.guaranteed_clock = v
        elif fnum == 2:
            r.version = v
        elif fnum == 4:
            if v > 1:
                raise _Fallback
            r.final = bool(v)
        else:
            if v > 0x7FFFFFFF:
                raise _Fallback
            r.run_state = v
    if i != end:
        raise _Fallback
    return r


def _params_from_pb(m: pb.PullParamsResponse) -> ParamsResponse:
    return ParamsResponse(m.guaranteed_clock, m.version, list(m.tensors), m.final, m.run_state)


def _fast(decode: Callable[[memoryview], R], buf: bytes | memoryview) -> R | None:
    """``decode`` (the hand decoder) of a large message; None for a small one or for anything it
    does not handle, which the caller then parses with the generated class."""
    if len(buf) <= SMALL_MESSAGE:
        return None
    try:
        return decode(_as_view(buf))
    except _Fallback:
        return None


def decode_params_response(buf: bytes | memoryview) -> ParamsResponse:
    """Parse a serialized ``PullParamsResponse``; chunk data are views of ``buf`` (large messages)."""
    fast = _fast(lambda view: _decode_params(view, 0, len(view)), buf)
    return fast if fast is not None else _params_from_pb(pb.PullParamsResponse.FromString(_as_bytes(buf)))


def decode_push_request(buf: bytes | memoryview) -> PushRequest:
    """Parse a serialized ``PushGradientRequest``; chunk data are views of ``buf`` (large messages)."""
    fast = _fast(_decode_push_request, buf)
    if fast is not None:
        return fast
    m = pb.PushGradientRequest.FromString(_as_bytes(buf))
    return PushRequest(
        m.run_id, m.rank, m.incarnation, m.clock, list(m.tensors), m.final, m.loss,
        m.then_pull if m.HasField("then_pull") else None,
    )


def _decode_push_request(buf: memoryview) -> PushRequest:
    r = PushRequest()
    seen = 0
    i, end = 0, len(buf)
    while i < end:
        key, i = _read_varint(buf, i, end)
        fnum, wt = key >> 3, key & 7
        if fnum == 5:
            i, j = _delimited(buf, wt, i, end)
            r.tensors.append(_decode_chunk(buf, i, j))
            i = j
            continue
        bit = 1 << fnum if fnum < 16 else 0
        if not bit or seen & bit:
            raise _Fallback
        seen |= bit
        if fnum in (2, 3, 4, 6):
            if wt != 0:
                raise _Fallback
            v, i = _read_varint(buf, i, end)
            if fnum == 2:
                if v > 0xFFFFFFFF:
                    raise _Fallback
                r.rank = v
            elif fnum == 3:
                r.incarnation = v
            elif fnum == 4:
                r.clock = v
            else:
                if v > 1:
                    raise _Fallback
                r.final = bool(v)
        elif fnum == 7:
            if wt != 1 or i + 8 > end:
                raise _Fallback
            r.loss = _DOUBLE.unpack_from(buf, i)[0]
            i += 8
        elif fnum in (1, 8):
            i, j = _delimited(buf, wt, i, end)
            if fnum == 1:
                try:
                    r.run_id = str(buf[i:j], "utf-8")
                except UnicodeDecodeError:
                    raise _Fallback from None
            else:
                r.then_pull = pb.PullParamsRequest.FromString(bytes(buf[i:j]))
            i = j
        else:
            raise _Fallback
    if i != end:
        raise _Fallback
    return r


def decode_push_response(buf: bytes | memoryview) -> PushResponse:
    """Parse a serialized ``PushGradientResponse``; chunk data of ``pulled`` are views of ``buf``
    (large messages)."""
    fast = _fast(_decode_push_response, buf)
    if fast is not None:
        return fast
    m = pb.PushGradientResponse.FromString(_as_bytes(buf))
    return PushResponse(m.clock, m.duplicate, m.min_clock, m.run_state,
                        _params_from_pb(m.pulled) if m.HasField("pulled") else None)


def _decode_push_response(buf: memoryview) -> PushResponse:
    r = PushResponse()
    seen = 0
    i, end = 0, len(buf)
    while i < end:
        key, i = _read_varint(buf, i, end)
        fnum, wt = key >> 3, key & 7
        bit = 1 << fnum if fnum < 8 else 0
        if not bit or seen & bit:
            raise _Fallback
        seen |= bit
        if fnum == 5:
            i, j = _delimited(buf, wt, i, end)
            r.pulled = _decode_params(buf, i, j)
            i = j
            continue
        if wt != 0 or fnum not in (1, 2, 3, 4):
            raise _Fallback
        v, i = _read_varint(buf, i, end)
        if fnum == 1:
            r.clock = v
        elif fnum == 2:
            if v > 1:
                raise _Fallback
            r.duplicate = bool(v)
        elif fnum == 3:
            r.min_clock = v
        else:
            if v > 0x7FFFFFFF:
                raise _Fallback
            r.run_state = v
    if i != end:
        raise _Fallback
    return r
