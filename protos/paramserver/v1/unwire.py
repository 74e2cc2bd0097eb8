"""The decoders of the data plane's hot messages (``paramserver.v1.wire`` encodes them), equal to
what the generated protobuf classes read.

``PushGradientRequest``, ``PushGradientResponse`` and ``PullParamsResponse`` are decoded by one
field walker (``_decode``), with chunk data as zero-copy memoryview slices of the received bytes,
into the dataclasses here. Every field number, wire type and decoding rule comes from the
generated descriptors, never from a literal here, and ``HAND_CODED`` names the fields each
message's codec knows (a test fails when the .proto gains a field it would drop). Decoding takes a
fast path for what the senders write; anything unusual (unknown or repeated scalar fields,
unpacked shapes, out-of-range values, bad UTF-8) falls back to the generated classes, so the
result always equals ``FromString``'s, and malformed input raises
``google.protobuf.message.DecodeError`` as before. Messages with at most ``wire.SMALL_MESSAGE``
payload bytes are decoded by the generated classes (faster there, with little to copy); their
chunks are then the generated ``TensorChunk``s, with ``bytes`` data. ``PushLayout`` reads a push
laid out as the worker's previous one without walking its chunks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from . import paramserver_pb2 as pb
from .wire import _DOUBLE, _PUSH, _U64, SMALL_MESSAGE, _chunk_prefix, _push_head, _wire_type  # (the encoders')

__all__ = [
    "HAND_CODED",
    "Chunk",
    "ChunkLike",
    "ParamsResponse",
    "PushLayout",
    "PushRequest",
    "PushResponse",
    "decode_params_response",
    "decode_push_request",
    "decode_push_response",
]


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
    @property
    def row_ids(self) -> bytes | memoryview: ...
    @property
    def indices(self) -> bytes | memoryview: ...


@dataclass
class Chunk:
    """A decoded ``TensorChunk``; ``data`` is a view of the received bytes (or bytes)."""

    name: str = ""
    shape: tuple[int, ...] = ()
    dtype: int = 0
    offset: int = 0
    data: bytes | memoryview = b""
    row_ids: bytes | memoryview = b""
    indices: bytes | memoryview = b""


@dataclass
class ParamsResponse:
    guaranteed_clock: int = 0
    version: int = 0
    tensors: list[ChunkLike] = field(default_factory=list)
    final: bool = False
    run_state: int = 0
    delta: bool = False
    lineage: int = 0
    staleness: int | None = None


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
    param_version: int | None = None


@dataclass
class PushResponse:
    clock: int = 0
    duplicate: bool = False
    min_clock: int = 0
    run_state: int = 0
    pulled: ParamsResponse | None = None
    """None when the response has no ``pulled`` field."""
    staleness: int | None = None
    lr_scale: float | None = None


HAND_CODED: dict[type[Message], tuple[type, frozenset[str]]] = {
    pb.TensorChunk: (Chunk, frozenset({"padding"})),
    pb.PullParamsResponse: (ParamsResponse, frozenset()),
    pb.PushGradientRequest: (PushRequest, frozenset()),
    pb.PushGradientResponse: (PushResponse, frozenset()),
}
"""The messages coded by hand (``wire`` and here): the dataclass each decodes into (its fields are
the message's, by name) and the fields deliberately not read (``padding`` means nothing)."""


# ----------------------------------------------------------------------------------- decoding
class _Fallback(Exception):
    """The fast decoder met something it does not handle: use the generated class."""


def _read_varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
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


def _signed64(n: int) -> int:
    return n - (1 << 64) if n >> 63 else n


def _string(buf: memoryview, i: int, j: int) -> str:
    try:
        return str(buf[i:j], "utf-8")
    except UnicodeDecodeError:
        raise _Fallback from None


def _packed_int64(buf: memoryview, i: int, j: int) -> tuple[int, ...]:
    dims = []
    while i < j:
        v, i = _read_varint(buf, i, j)
        dims.append(_signed64(v))
    return tuple(dims)


def _bounded(limit: int) -> Callable[[int], int]:
    def check(v: int) -> int:
        if v > limit:
            raise _Fallback  # protobuf's own rule for an oversized value (truncation) applies
        return v
    return check


def _int32(v: int) -> int:
    """An int32 varint: negative ones come as ten bytes (64-bit two's complement)."""
    n = _signed64(v)
    if not -(1 << 31) <= n < 1 << 31:
        raise _Fallback  # protobuf's own rule for an oversized value (truncation) applies
    return n


_SCALARS: dict[int, Callable[[int], Any]] = {
    FieldDescriptor.TYPE_UINT64: int,
    FieldDescriptor.TYPE_INT64: _signed64,
    FieldDescriptor.TYPE_UINT32: _bounded(0xFFFFFFFF),
    FieldDescriptor.TYPE_INT32: _int32,
    FieldDescriptor.TYPE_ENUM: _bounded(0x7FFFFFFF),
    FieldDescriptor.TYPE_BOOL: lambda v: bool(_bounded(1)(v)),
}


class _Field(NamedTuple):
    name: str
    wire_type: int
    repeated: bool
    read: Callable[[memoryview, int, int], Any] | None
    """For a length-delimited field: its value from the bytes [i, j) (None: not read)."""
    scalar: Callable[[int], Any] | None
    """For a varint: its value from the number."""


class _Plan:
    """How to decode one message by hand, made from its descriptor: per field number, the name it
    goes to in ``target`` and how to read it (nested messages by their own plan, or, for those
    without one, by their generated class)."""

    def __init__(self, descriptor: Descriptor, target: type, ignored: frozenset[str],
                 nested: Mapping[str, _Plan]) -> None:
        self.target = target
        self.fields: dict[int, _Field] = {}
        for f in descriptor.fields:
            read: Callable[[memoryview, int, int], Any] | None = None
            if f.name in ignored:
                pass
            elif f.type == FieldDescriptor.TYPE_STRING:
                read = _string
            elif f.type == FieldDescriptor.TYPE_BYTES:
                read = _slice
            elif f.type == FieldDescriptor.TYPE_MESSAGE:
                sub = nested.get(f.name)
                read = functools.partial(_decode, plan=sub) if sub else functools.partial(_generated, f.message_type)
            elif f.is_packed and f.type == FieldDescriptor.TYPE_INT64:
                read = _packed_int64
            elif _wire_type(f) != 0 and f.type != FieldDescriptor.TYPE_DOUBLE:
                raise TypeError(f"{descriptor.full_name}.{f.name}: no hand decoding for its type")
            self.fields[f.number] = _Field(f.name, _wire_type(f), f.is_repeated and not f.is_packed, read,
                                           _SCALARS.get(f.type))


def _slice(buf: memoryview, i: int, j: int) -> memoryview:
    return buf[i:j]


def _generated(message: Descriptor, buf: memoryview, i: int, j: int) -> Message:
    """A nested message without a plan (``then_pull``), parsed by its generated class."""
    return GetMessageClass(message).FromString(bytes(buf[i:j]))


def _decode(buf: memoryview, i: int, end: int, plan: _Plan) -> Any:
    """The one field walker: the message in ``buf[i:end]`` as ``plan.target``; _Fallback for
    anything the plan does not expect (the caller then parses with the generated class)."""
    out = plan.target()
    seen: set[int] = set()
    while i < end:
        key, i = _read_varint(buf, i, end)
        f = plan.fields.get(key >> 3)
        if f is None or key & 7 != f.wire_type:
            raise _Fallback  # an unknown field, or one encoded in another way (unpacked, say)
        if not f.repeated:
            if key >> 3 in seen:
                raise _Fallback
            seen.add(key >> 3)
        if f.wire_type == 0:
            v, i = _read_varint(buf, i, end)
            value = f.scalar(v) if f.scalar else v
        elif f.wire_type == 1:
            if i + 8 > end:
                raise _Fallback
            value, i = _DOUBLE.unpack_from(buf, i)[0], i + 8
        else:
            n, i = _read_varint(buf, i, end)
            if i + n > end:
                raise _Fallback
            value = f.read(buf, i, i + n) if f.read else None
            i += n
            if f.read is None:
                continue  # ignored
        if f.repeated:
            getattr(out, f.name).append(value)
        else:
            setattr(out, f.name, value)
    if i != end:
        raise _Fallback
    return out


def _plan(message: type[Message], nested: Mapping[str, _Plan] | None = None) -> _Plan:
    target, ignored = HAND_CODED[message]
    return _Plan(message.DESCRIPTOR, target, ignored, nested or {})


_CHUNK_PLAN = _plan(pb.TensorChunk)
_PARAMS_PLAN = _plan(pb.PullParamsResponse, {"tensors": _CHUNK_PLAN})
_PUSH_PLAN = _plan(pb.PushGradientRequest, {"tensors": _CHUNK_PLAN})
_ACK_PLAN = _plan(pb.PushGradientResponse, {"pulled": _PARAMS_PLAN})


def _fast(plan: _Plan, buf: bytes | memoryview) -> Any:
    """``plan``'s decoding of a large message; None for a small one or for anything it does not
    handle, which the caller then parses with the generated class."""
    if len(buf) <= SMALL_MESSAGE:
        return None
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    try:
        return _decode(view, 0, len(view), plan)
    except _Fallback:
        return None


def _as_bytes(buf: bytes | memoryview) -> bytes:
    return buf if isinstance(buf, bytes) else bytes(buf)


def _params_from_pb(m: pb.PullParamsResponse) -> ParamsResponse:
    return ParamsResponse(m.guaranteed_clock, m.version, list(m.tensors), m.final, m.run_state, m.delta, m.lineage,
                          m.staleness if m.HasField("staleness") else None)


def decode_params_response(buf: bytes | memoryview) -> ParamsResponse:
    """Parse a serialized ``PullParamsResponse``; chunk data are views of ``buf`` (large messages)."""
    fast: ParamsResponse | None = _fast(_PARAMS_PLAN, buf)
    return fast if fast is not None else _params_from_pb(pb.PullParamsResponse.FromString(_as_bytes(buf)))


def decode_push_request(buf: bytes | memoryview) -> PushRequest:
    """Parse a serialized ``PushGradientRequest``; chunk data are views of ``buf`` (large messages)."""
    fast: PushRequest | None = _fast(_PUSH_PLAN, buf)
    if fast is not None:
        return fast
    m = pb.PushGradientRequest.FromString(_as_bytes(buf))
    return PushRequest(m.run_id, m.rank, m.incarnation, m.clock, list(m.tensors), m.final, m.loss,
                       m.then_pull if m.HasField("then_pull") else None,
                       m.param_version if m.HasField("param_version") else None)


class PushLayout:
    """How a worker lays out its pushes of one model, learned from one of them (``learn``): its
    run, rank and incarnation, every tensor whole in one float32 chunk, in the same order, as this
    module writes them. ``match`` reads a push laid out the same way without parsing its chunks:
    the head and the chunks' headers are compared with the learned bytes; the data are where the
    layout says. Anything else (another worker or incarnation, another client's encoding, another
    order, a chunk more or less, an unknown field) does not match, and the caller decodes the
    message as usual (``decode_push_request``)."""

    __slots__ = ("prefixes", "sizes", "names", "head", "who")

    def __init__(self, prefixes: list[bytes], sizes: list[int], names: list[str], who: tuple[str, int, int]) -> None:
        self.prefixes = prefixes
        self.sizes = sizes
        self.names = names
        self.who = who
        """The pushes' run_id, rank and incarnation; ``head``: their fields as this module writes them."""
        self.head = _push_head(*who)

    @classmethod
    def learn(cls, buf: bytes | memoryview, req: PushRequest) -> PushLayout | None:
        """The layout of the push ``buf``, which decoded as ``req``; None when it is not one a
        layout describes (sparse, compressed, rows, tensors in pieces, padding...)."""
        prefixes, sizes, names = [], [], []
        for c in req.tensors:
            if c.dtype != pb.DATA_TYPE_FLOAT32 or c.offset or c.row_ids or c.indices:
                return None
            size = len(c.data)
            if size != 4 * math.prod(c.shape):
                return None
            prefixes.append(_chunk_prefix(_PUSH["tensors"], c.name, tuple(c.shape), 0, size))
            sizes.append(size)
            names.append(c.name)
        layout = cls(prefixes, sizes, names, (req.run_id, req.rank, req.incarnation))
        return layout if prefixes and layout.match(memoryview(buf)) is not None else None

    def match(self, buf: memoryview) -> tuple[PushRequest, list[int]] | None:
        """The push in ``buf`` (its ``tensors`` left empty) and where each chunk's data start,
        in the learned order; None unless ``buf`` is laid out as learned."""
        end = len(buf)
        i = len(self.head)
        if buf[:i] != self.head:  # run_id, rank, incarnation: the learned ones, written alike
            return None
        req = PushRequest(*self.who)
        try:
            if i < end and buf[i] == _CLOCK_KEY:
                req.clock, i = _read_varint(buf, i + 1, end)
            starts = []
            for prefix, size in zip(self.prefixes, self.sizes, strict=True):
                j = i + len(prefix)
                if buf[i:j] != prefix:
                    return None
                starts.append(j)
                i = j + size
            if i > end:
                return None
            last = 5
            while i < end:  # final, loss, then_pull, param_version: each at most once, in order
                key = buf[i]
                field = key >> 3
                if field <= last or field > 9 or key & 7 != _TAIL_WIRE[field]:
                    return None
                last = field
                i += 1
                if field == 7:
                    if i + 8 > end:
                        return None
                    req.loss = _DOUBLE.unpack_from(buf, i)[0]
                    i += 8
                    continue
                v, i = _read_varint(buf, i, end)
                if field == 6:
                    if v > 1:
                        return None
                    req.final = bool(v)
                elif field == 8:
                    if i + v > end:
                        return None
                    req.then_pull = pb.PullParamsRequest.FromString(bytes(buf[i : i + v]))
                    i += v
                else:
                    req.param_version = v
        except (_Fallback, UnicodeDecodeError, DecodeError):
            return None
        return req, starts


_TAIL_WIRE = {6: 0, 7: 1, 8: 2, 9: 0}
_CLOCK_KEY = _PUSH["clock"][0]


def decode_push_response(buf: bytes | memoryview) -> PushResponse:
    """Parse a serialized ``PushGradientResponse``; chunk data of ``pulled`` are views of ``buf``
    (large messages)."""
    fast: PushResponse | None = _fast(_ACK_PLAN, buf)
    if fast is not None:
        return fast
    m = pb.PushGradientResponse.FromString(_as_bytes(buf))
    return PushResponse(m.clock, m.duplicate, m.min_clock, m.run_state,
                        _params_from_pb(m.pulled) if m.HasField("pulled") else None,
                        m.staleness if m.HasField("staleness") else None,
                        m.lr_scale if m.HasField("lr_scale") else None)
