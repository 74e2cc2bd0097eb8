"""Hand codec for the data plane's hot messages, equal to what the generated protobuf classes write:
the encoders, and the pieces of the contract they share with the decoders (``paramserver.v1.unwire``).

``PushGradientRequest``, ``PushGradientResponse`` and ``PullParamsResponse`` carry almost all the
payload; building and parsing them through protobuf objects copies every tensor byte several
times. Here they are encoded as parts, small headers and array memoryviews (each chunk's header
is built once per tensor layout and cached), that gRPC's serializer joins (``join``: one copy) and
the TCP data plane writes as they are (``paramserver.v1.tcp``); ``unwire`` decodes them, with
chunk data as zero-copy memoryview slices of the received bytes.

One source of truth: every field number and wire type comes from the generated descriptors,
never from a literal here, and ``unwire.HAND_CODED`` names the fields each message's codec knows
(a test fails when the .proto gains a field it would drop). The output is exactly what
``SerializeToString`` writes (fields in number order, proto3 defaults omitted, packed shapes,
negative int64 as 10-byte varints), except that the chunks of a push with more than
``SMALL_MESSAGE`` payload bytes get a ``padding`` field before their data where needed to start
it at a multiple of 16 bytes into the message (the server computes on those bytes in place;
unaligned, that costs 40-60% more), and those of a server's large answer (``EncodedGroup``)
where needed to start it a multiple of 16 bytes after the first chunk's data.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from . import paramserver_pb2 as pb

__all__ = [
    "F32",
    "SMALL_MESSAGE",
    "WIRE_DTYPES",
    "U32",
    "CodedPart",
    "EncodedGroup",
    "Group",
    "ParamsParts",
    "Part",
    "RowsPart",
    "chunk_groups",
    "chunk_prefixes",
    "duration",
    "encode_chunk",
    "join",
    "params_response_parts",
    "parts_len",
    "pull_fields",
    "pull_request_bytes",
    "push_fields",
    "push_request_parts",
    "push_response_parts",
    "varint",
    "wait_field",
    "whole_group",
    "with_last",
]

T = TypeVar("T")

F32 = np.dtype("<f4")
"""The stored element type, little-endian float32; the wire's too unless the run compresses (``CodedPart``)."""

SMALL_MESSAGE = 64 << 10
"""Messages with at most this many payload bytes are decoded by the generated classes (upb, in C):
with little payload to spare from copying, walking the fields in Python costs more (decoding a
small model's 19 KB push: 1 µs against 11-20 µs; a 256 KB one: 65 µs against 11 µs). Encoding
is by hand at every size (with cached chunk headers: 2.4 µs against 12 µs for the same 19 KB)."""

_DOUBLE = struct.Struct("<d")
_U64 = (1 << 64) - 1  # a negative int32 or int64 is written as its 64-bit two's complement
_ZERO8 = b"\0" * 8


_BYTE = tuple(bytes((i,)) for i in range(256))
_MINUS_ONE = b"\xff" * 9 + b"\x01"


def varint(n: int) -> bytes:
    """Protobuf varint of n; negative values as 64-bit two's complement (10 bytes)."""
    if 0 <= n < 0x80:
        return _BYTE[n]
    if 0 < n < 0x4000:  # (clocks, versions: the common lengths spelled out)
        return bytes((n & 0x7F | 0x80, n >> 7))
    if 0 < n < 0x200000:
        return bytes((n & 0x7F | 0x80, (n >> 7) & 0x7F | 0x80, n >> 14))
    if 0 < n < 0x10000000:
        return bytes((n & 0x7F | 0x80, (n >> 7) & 0x7F | 0x80, (n >> 14) & 0x7F | 0x80, n >> 21))
    n &= _U64
    if n == _U64:  # -1: an unbounded staleness, in every answer
        return _MINUS_ONE
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def with_last(items: Iterator[T]) -> Iterator[tuple[T, bool]]:
    """Pairs (item, is_last), looking one item ahead."""
    prev = next(items, None)
    while prev is not None:
        nxt = next(items, None)
        yield prev, nxt is None
        prev = nxt


# ----------------------------------------------------------------------------------- the contract
_FIXED64 = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64)
_FIXED32 = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32)
_DELIMITED = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE)


def _wire_type(f: FieldDescriptor) -> int:
    if f.is_packed or f.type in _DELIMITED:
        return 2
    return 1 if f.type in _FIXED64 else 5 if f.type in _FIXED32 else 0


def _tags(message: type[Message]) -> dict[str, bytes]:
    """Field name -> its key as written (number and wire type), from the message's descriptor."""
    return {f.name: varint(f.number << 3 | _wire_type(f)) for f in message.DESCRIPTOR.fields}


_CHUNK = _tags(pb.TensorChunk)
_PUSH = _tags(pb.PushGradientRequest)
_PARAMS = _tags(pb.PullParamsResponse)
_ACK = _tags(pb.PushGradientResponse)
_PULL = _tags(pb.PullParamsRequest)


# ----------------------------------------------------------------------------------- encoding
Part = bytes | memoryview
I64 = np.dtype("<i8")
"""Row ids on the wire (``TensorChunk.row_ids``, ``TableRows.row_ids``): little-endian int64."""


@dataclass(frozen=True)
class RowsPart:
    """Whole rows of a table: ``ids`` (int64) and ``values`` (float32, ``(len(ids), dim)``,
    C-contiguous), encoded as a chunk's ``row_ids`` and ``data``; ``table_shape``: the whole
    table's (rows, dim), the chunk's ``shape``."""

    ids: np.ndarray
    values: np.ndarray
    table_shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.values.nbytes)


U32 = np.dtype("<u4")
"""Element positions of a sparse chunk (``TensorChunk.indices``): little-endian uint32."""
WIRE_DTYPES: dict[int, np.dtype[Any]] = {pb.DATA_TYPE_FLOAT32: F32, pb.DATA_TYPE_FLOAT16: np.dtype("<f2"), pb.DATA_TYPE_BFLOAT16: np.dtype("<u2")}
"""How each DataType's values are held in numpy (bfloat16 as its 16 bits: numpy has no such type)."""


@dataclass(frozen=True)
class CodedPart:
    """A tensor of ``shape`` (or a slice of one) in a run's wire form (``RunSpec.compression``):
    ``values`` flat, in the numpy form of ``dtype`` (``WIRE_DTYPES``); with ``indices`` (uint32,
    strictly increasing) a sparse tensor: those elements of the whole flattened tensor, the others 0."""

    values: np.ndarray
    dtype: int
    shape: tuple[int, ...]
    indices: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + (0 if self.indices is None else self.indices.nbytes))


Group = Sequence[tuple[str, tuple[int, ...], int, "np.ndarray | memoryview | RowsPart | CodedPart"]]
"""Chunks of one message: (name, full shape, offset, flat float32 part, or a memoryview of one,
or a table's rows, or a part in another wire form)."""
ParamsParts = tuple[int, int, "Group | EncodedGroup", bool, int, bool, int, int | None]
"""The arguments of ``params_response_parts``."""


def chunk_groups(
    tensors: Mapping[str, np.ndarray | RowsPart | CodedPart], chunk_bytes: int,
) -> Iterator[list[tuple[str, tuple[int, ...], int, Any]]]:
    """How every Python sender splits tensors into messages: (name, shape, offset, flat float32
    part) groups of about ``chunk_bytes``. A tensor's chunks are consecutive slices of its flattened
    (C order) elements, at most ``chunk_bytes`` each; a group ends once it holds ``chunk_bytes``,
    so small tensors share one. A table's rows (``RowsPart``) go in chunks of whole rows. A
    ``CodedPart`` is split the same way: dense ones into slices,
    sparse ones into runs of their elements (each chunk at offset 0). Always yields at least one
    (maybe empty) group."""
    per_chunk = max(1, chunk_bytes // 4)
    group: list[tuple[str, tuple[int, ...], int, Any]] = []
    size, sent = 0, False
    for name, arr in tensors.items():
        if isinstance(arr, CodedPart):
            for lo, part in _coded_slices(arr, chunk_bytes):
                group.append((name, arr.shape, lo, part))
                size += part.nbytes
                if size >= chunk_bytes:
                    yield group
                    group, size, sent = [], 0, True
            continue
        if isinstance(arr, RowsPart):  # a table's rows
            values = arr.values
            per = max(1, chunk_bytes // (8 + 4 * (values.shape[1] if values.ndim == 2 else 1)))
            for lo in range(0, len(arr.ids), per):
                rows = RowsPart(arr.ids[lo : lo + per], values[lo : lo + per], arr.table_shape)
                group.append((name, arr.table_shape, 0, rows))
                size += rows.nbytes
                if size >= chunk_bytes:
                    yield group
                    group, size, sent = [], 0, True
            continue
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
            piece = flat[lo : lo + per_chunk]
            group.append((name, shape, lo, piece))
            size += piece.nbytes
            if size >= chunk_bytes:
                yield group
                group, size, sent = [], 0, True
    if group or not sent:
        yield group


def _coded_slices(part: CodedPart, chunk_bytes: int) -> Iterator[tuple[int, CodedPart]]:
    """(offset, slice) of ``part``, each at most ~``chunk_bytes`` (at least one, maybe empty)."""
    values, indices = part.values, part.indices
    per = max(1, chunk_bytes // (values.itemsize + (0 if indices is None else 4)))
    if values.size <= per:
        yield 0, part
        return
    for lo in range(0, values.size, per):
        if indices is None:
            yield lo, CodedPart(values[lo : lo + per], part.dtype, part.shape)
        else:
            yield 0, CodedPart(values[lo : lo + per], part.dtype, part.shape, indices[lo : lo + per])


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
        head += _CHUNK["name"] + varint(len(nb)) + nb
    if len(shape):
        packed = b"".join(varint(int(d)) for d in shape)
        head += _CHUNK["shape"] + varint(len(packed)) + packed
    if dtype:
        head += _CHUNK["dtype"] + varint(dtype)
    if offset:
        head += _CHUNK["offset"] + varint(offset)
    if pad:
        head += _CHUNK["padding"] + varint(pad - _PAD_HEAD) + bytes(pad - _PAD_HEAD)
    if nbytes:
        head += _CHUNK["data"] + varint(nbytes)
    return head


def encode_chunk(
    name: str, shape: Sequence[int], offset: int, data: np.ndarray | bytes | memoryview | RowsPart | CodedPart,
    dtype: int = pb.DATA_TYPE_FLOAT32, pad: int = 0,
) -> list[Part]:
    """A ``TensorChunk``'s serialized body as parts (the second one is the data, not copied; a
    table's rows add their ids after it, a sparse part its indices); ``pad``: 0, or the size in
    bytes of a ``padding`` field (its key, length and content) to put just before the data."""
    if isinstance(data, CodedPart):
        values = _data_view(data.values)
        assert isinstance(values, memoryview)
        head = bytes(_chunk_head(name, shape, offset, values.nbytes, data.dtype, pad))
        body: list[Part] = [head, values] if values.nbytes else [head]
        if data.indices is None or not data.indices.size:
            return body
        ids = _data_view(data.indices if data.indices.dtype == U32 else data.indices.astype(U32))
        assert isinstance(ids, memoryview)
        return [*body, _CHUNK["indices"] + varint(ids.nbytes), ids]
    if isinstance(data, RowsPart):
        values = _data_view(data.values)
        ids = _data_view(data.ids if data.ids.dtype == I64 else data.ids.astype(I64))
        assert isinstance(values, memoryview) and isinstance(ids, memoryview)
        head = bytes(_chunk_head(name, shape, 0, values.nbytes, dtype, pad))
        out: list[Part] = [head, values] if values.nbytes else [head]
        return [*out, _CHUNK["row_ids"] + varint(ids.nbytes), ids] if ids.nbytes else out
    view = _data_view(data)
    n = len(view) if not isinstance(view, memoryview) else view.nbytes
    head = bytes(_chunk_head(name, shape, offset, n, dtype, pad))
    return [head, view] if n else [head]


_PAD_HEAD = len(_CHUNK["padding"]) + 1  # the padding field's key and its one-byte length
_PADS = (0, *range(_PAD_HEAD, _PAD_HEAD + 32))
"""Sizes of the ``padding`` field tried (key, length and 0-31 bytes): every residue mod 16 twice, so
that one fits even where the chunk's length prefix grows by a byte within the range."""


def _payload(group: Group) -> int:
    return sum(part.nbytes for _, _, _, part in group)  # (a RowsPart: its values and ids)


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
            if isinstance(data, RowsPart | CodedPart):
                body = encode_chunk(name, shape, offset, data)
                parts += [tag + varint(parts_len(body)), *body]
                continue
            view = _data_view(data)
            nbytes = view.nbytes if isinstance(view, memoryview) else len(view)
            parts.append(_chunk_prefix(tag, name, tuple(shape), offset, nbytes))
            if nbytes:
                parts.append(view)
        return parts
    for name, shape, offset, data in group:
        body = encode_chunk(name, shape, offset, data)
        size = parts_len(body)
        if len(body) >= 2:  # a head, then the data (then a table's ids)
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


def push_request_parts(
    run_id: str,
    rank: int,
    incarnation: int,
    clock: int,
    group: Group,
    final: bool,
    loss: float = 0.0,
    then_pull: pb.PullParamsRequest | bytes | None = None,
    param_version: int | None = None,
) -> list[Part]:
    """A ``PushGradientRequest`` whose ``tensors`` are the chunks of ``group``, as parts to write
    in order (the data are views, not copies; ``join`` makes the serialized message).
    ``then_pull``: the message, or its serialization (``pull_request_bytes``)."""
    head = _request_head(run_id, rank, incarnation, clock)
    tail = _request_tail(final, loss, then_pull, param_version)
    at = len(head) if _payload(group) > SMALL_MESSAGE else None  # small ones: nothing worth aligning
    return [head, *_repeated_chunks(_PUSH["tensors"], group, at), tail]


def _request_head(run_id: str, rank: int, incarnation: int, clock: int) -> bytes:
    """A ``PushGradientRequest``'s fields before its tensors."""
    head = _push_head(run_id, rank, incarnation)
    return head + _PUSH["clock"] + varint(clock) if clock else head


def _request_tail(final: bool, loss: float = 0.0, then_pull: pb.PullParamsRequest | bytes | None = None,
                  param_version: int | None = None) -> bytes:
    """A ``PushGradientRequest``'s fields after its tensors."""
    tail = bytearray()
    if final:
        tail += _PUSH["final"] + b"\x01"
    packed = _DOUBLE.pack(loss)
    if packed != _ZERO8:
        tail += _PUSH["loss"] + packed
    if then_pull is not None:
        sub = then_pull if isinstance(then_pull, bytes) else then_pull.SerializeToString()
        tail += _PUSH["then_pull"] + varint(len(sub)) + sub
    if param_version is not None:  # (proto3 optional: written even when 0)
        tail += _PUSH["param_version"] + varint(param_version)
    return bytes(tail)


def chunk_prefixes(group: Group) -> tuple[bytes, ...] | None:
    """What goes before each tensor's data in a push of ``group`` (``push_request_parts``'s
    parts between its head and tail: a prefix, then the data, per tensor), the same in every push
    of tensors of these names and shapes; None for a push whose chunks are aligned (over
    ``SMALL_MESSAGE``: their padding depends on where they start) or not one prefix and one
    data part per tensor."""
    if _payload(group) > SMALL_MESSAGE:
        return None
    parts = _repeated_chunks(_PUSH["tensors"], group)
    prefixes = parts[::2]
    if len(parts) != 2 * len(group) or not all(isinstance(p, bytes) for p in prefixes):
        return None
    return tuple(prefixes)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=256)
def _push_head(run_id: str, rank: int, incarnation: int) -> bytes:
    """A ``PushGradientRequest``'s fields before its clock (the same in every push of a worker)."""
    head = bytearray()
    if run_id:
        rb = run_id.encode("utf-8")
        head += _PUSH["run_id"] + varint(len(rb)) + rb
    if rank:
        head += _PUSH["rank"] + varint(rank)
    if incarnation:
        head += _PUSH["incarnation"] + varint(incarnation)
    return bytes(head)


def whole_group(tensors: Mapping[str, Any], limit: int) -> Group | None:
    """``chunk_groups(tensors, limit)``'s one group when every tensor is a contiguous float32 array
    and all of them fit in ``limit`` bytes (a small model's gradient, every push: one pass, no
    slicing); None otherwise (the caller splits them with ``chunk_groups``)."""
    group = []
    size = 0
    for name, arr in tensors.items():
        if type(arr) is not np.ndarray or arr.dtype != F32 or not arr.flags.c_contiguous:
            return None
        size += arr.nbytes
        group.append((name, arr.shape, 0, arr.reshape(-1)))
    return group if size < limit else None


@functools.lru_cache(maxsize=256)
def _pull_head(run_id: str, rank: int, incarnation: int) -> bytes:
    head: bytes = pb.PullParamsRequest(run_id=run_id, rank=rank, incarnation=incarnation).SerializeToString()
    return head


@functools.lru_cache(maxsize=256)
def duration(seconds: float) -> Duration:
    """A Duration message, cached (a worker sends the same wait with every pull): do not mutate."""
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


@functools.lru_cache(maxsize=256)
def _wait_field(seconds: float) -> bytes:
    wait: bytes = pb.PullParamsRequest(max_wait=duration(seconds)).SerializeToString()
    return wait


push_fields = _push_head
pull_fields = _pull_head
wait_field = _wait_field
"""The cached fields a worker's every push and pull start with, and a pull's max_wait (the C
exchange, ``paramserver/_exchange.c``, writes the rest as ``push_request_parts`` and
``pull_request_bytes`` do)."""


def pull_request_bytes(run_id: str, rank: int, incarnation: int, clock: int, max_wait: float,
                       since: tuple[int, int] | None = None) -> bytes:
    """A serialized ``PullParamsRequest`` without names or rows (``since``: (lineage, version)),
    the bytes the generated class writes, from cached parts: a worker sends one with every push
    (~0.6 µs against ~4 µs to build and serialize the message)."""
    out = _pull_head(run_id, rank, incarnation)
    if clock:
        out += _PULL["clock"] + varint(clock)
    out += _wait_field(max_wait)
    if since is not None:
        lineage, version = since
        if version:
            out += _PULL["since_version"] + varint(version)
        if lineage:
            out += _PULL["since_lineage"] + varint(lineage)
    return out


class EncodedGroup:
    """A group's ``tensors`` fields of a ``PullParamsResponse``, encoded once for many answers: the
    data are views, so each answer sends the values of its own moment. In a group of more than
    ``SMALL_MESSAGE`` payload bytes each chunk's data starts at a multiple of 16 bytes after the
    first chunk (``padding``): a sender that places the message so the first chunk's data is
    aligned (the shared-memory plane's publications) lets readers compute on every tensor in place."""

    __slots__ = ("group", "parts", "nbytes")

    def __init__(self, group: Group) -> None:
        self.group = group
        self.parts = _repeated_chunks(_PARAMS["tensors"], group, 0 if _payload(group) > SMALL_MESSAGE else None)
        self.nbytes = parts_len(self.parts)


def params_response_parts(guaranteed_clock: int, version: int, group: Group | EncodedGroup, final: bool,
                          run_state: int, delta: bool = False, lineage: int = 0,
                          staleness: int | None = None) -> list[Part]:
    """A ``PullParamsResponse`` as parts to write in order (the data are views, not copies)."""
    return _params_response(guaranteed_clock, version, group, final, run_state, delta, lineage, staleness)[0]


def _params_response(guaranteed_clock: int, version: int, group: Group | EncodedGroup, final: bool,
                     run_state: int, delta: bool = False, lineage: int = 0,
                     staleness: int | None = None) -> tuple[list[Part], int]:
    """``params_response_parts`` and the message's length."""
    head = bytearray()
    if guaranteed_clock:
        head += _PARAMS["guaranteed_clock"] + varint(guaranteed_clock)
    if version:
        head += _PARAMS["version"] + varint(version)
    tail = bytearray()
    if final:
        tail += _PARAMS["final"] + b"\x01"
    if run_state:
        tail += _PARAMS["run_state"] + varint(run_state)
    if delta:
        tail += _PARAMS["delta"] + b"\x01"
    if lineage:
        tail += _PARAMS["lineage"] + varint(lineage)
    if staleness is not None:  # (proto3 optional: written even when 0; int32 -1 as ten bytes)
        tail += _PARAMS["staleness"] + varint(staleness & _U64)
    if isinstance(group, EncodedGroup):
        chunks, n = group.parts, group.nbytes
    else:
        chunks = _repeated_chunks(_PARAMS["tensors"], group)
        n = parts_len(chunks)
    return [bytes(head), *chunks, bytes(tail)], len(head) + n + len(tail)


def push_response_parts(clock: int = 0, duplicate: bool = False, min_clock: int = 0, run_state: int = 0,
                        pulled: ParamsParts | None = None, staleness: int | None = None,
                        lr_scale: float | None = None) -> list[Part]:
    """A ``PushGradientResponse`` as parts to write in order; ``pulled`` = the arguments of
    ``params_response_parts``."""
    head = bytearray()
    if clock:
        head += _ACK["clock"] + varint(clock)
    if duplicate:
        head += _ACK["duplicate"] + b"\x01"
    if min_clock:
        head += _ACK["min_clock"] + varint(min_clock)
    if run_state:
        head += _ACK["run_state"] + varint(run_state)
    tail = _ACK["staleness"] + varint(staleness & _U64) if staleness is not None else b""
    if lr_scale is not None:  # (proto3 optional: written even when 0)
        tail += _ACK["lr_scale"] + _DOUBLE.pack(lr_scale)
    if pulled is None:
        return [bytes(head + tail)]
    parts, n = _params_response(*pulled)
    head += _ACK["pulled"] + varint(n)
    return [bytes(head), *parts, tail] if tail else [bytes(head), *parts]
