"""paramserver.v1.wire and unwire: equal to the generated classes (byte for byte, but for a push's
alignment padding), and decode(encode(x)) == x."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import unwire, wire


@pytest.fixture(autouse=True, scope="module", params=["hand", "generated"])
def codec_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs twice: small messages treated as large (threshold -1: decoded by hand, pushes
    padded) and as small (the default threshold, which all of these messages are under: decoded by
    the generated classes, no padding). The encoders and the decoders each read their own import of
    the threshold."""
    saved = wire.SMALL_MESSAGE
    wire.SMALL_MESSAGE = unwire.SMALL_MESSAGE = -1 if request.param == "hand" else saved
    try:
        yield request.param
    finally:
        wire.SMALL_MESSAGE = unwire.SMALL_MESSAGE = saved


U64 = st.integers(0, (1 << 64) - 1)
U32 = st.integers(0, (1 << 32) - 1)
I64 = st.integers(-(1 << 63), (1 << 63) - 1)
NAMES = st.text(max_size=12)
SHAPES = st.lists(st.integers(0, 5), max_size=3).map(tuple)
LOSS = st.one_of(st.floats(allow_nan=False), st.just(-0.0), st.just(0.0))
RUN_STATES = st.sampled_from(list(pb.RunState.values()))


def encode_push_request(*args: Any) -> bytes:
    return wire.join(wire.push_request_parts(*args))


def encode_params_response(*args: Any) -> bytes:
    return wire.join(wire.params_response_parts(*args))


def encode_push_response(*args: Any) -> bytes:
    return wire.join(wire.push_response_parts(*args))


@st.composite
def groups(draw: st.DrawFn) -> list[tuple[str, tuple[int, ...], int, np.ndarray]]:
    out = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(NAMES)
        shape = draw(SHAPES)
        offset = draw(I64)
        n = draw(st.integers(0, 20))
        out.append((name, shape, offset, np.arange(n, dtype="<f4") * draw(st.floats(-10, 10))))
    return out


def _pb_chunks(group: wire.Group) -> list[pb.TensorChunk]:
    return [pb.TensorChunk(name=n, shape=s, dtype=pb.DATA_TYPE_FLOAT32, offset=o, data=d.tobytes())
            for n, s, o, d in group]


def _unpadded(raw: bytes) -> bytes:
    """A push as the generated class writes it: parsed, ``padding`` cleared, serialized again;
    and every chunk's data must start at a multiple of 16 bytes into ``raw``."""
    msg = pb.PushGradientRequest.FromString(raw)
    base = np.frombuffer(raw, np.uint8).ctypes.data if raw else 0
    for c in unwire.decode_push_request(raw).tensors:
        if wire.SMALL_MESSAGE < 0 and len(c.data):  # the hand path: a view of raw (no fallback)
            assert isinstance(c.data, memoryview)
            assert (np.frombuffer(c.data, np.uint8).ctypes.data - base) % 16 == 0
    for t in msg.tensors:
        t.ClearField("padding")
    return msg.SerializeToString()


def _same_chunks(decoded: list[unwire.ChunkLike], expected: list[pb.TensorChunk]) -> None:
    assert len(decoded) == len(expected)
    for c, e in zip(decoded, expected, strict=True):
        assert (c.name, tuple(c.shape), c.dtype, c.offset, bytes(c.data)) == (
            e.name, tuple(e.shape), e.dtype, e.offset, e.data)


then_pulls = st.one_of(st.none(), st.builds(
    pb.PullParamsRequest, run_id=NAMES, rank=U32, incarnation=U64, clock=U64, names=st.lists(NAMES, max_size=3)))


@settings(max_examples=300, deadline=None)
@given(run_id=NAMES, rank=U32, inc=U64, clock=U64, group=groups(), final=st.booleans(), loss=LOSS, then=then_pulls)
def test_push_request_matches_protobuf(run_id: str, rank: int, inc: int, clock: int, group: wire.Group,
                                       final: bool, loss: float, then: pb.PullParamsRequest | None) -> None:
    raw = encode_push_request(run_id, rank, inc, clock, group, final, loss, then)
    msg = pb.PushGradientRequest(run_id=run_id, rank=rank, incarnation=inc, clock=clock, tensors=_pb_chunks(group),
                                 final=final, loss=loss, then_pull=then)
    assert _unpadded(raw) == msg.SerializeToString()
    r = unwire.decode_push_request(raw)
    assert (r.run_id, r.rank, r.incarnation, r.clock, r.final) == (run_id, rank, inc, clock, final)
    assert struct.pack("<d", r.loss) == struct.pack("<d", msg.loss)
    assert r.then_pull == (then if then is not None else None)
    _same_chunks(r.tensors, list(msg.tensors))


@settings(max_examples=300, deadline=None)
@given(gc=U64, version=U64, group=groups(), final=st.booleans(), state=RUN_STATES)
def test_params_response_matches_protobuf(gc: int, version: int, group: wire.Group, final: bool, state: int) -> None:
    raw = encode_params_response(gc, version, group, final, state)
    msg = pb.PullParamsResponse(guaranteed_clock=gc, version=version, tensors=_pb_chunks(group), final=final,
                                run_state=state)  # type: ignore[arg-type]
    assert raw == msg.SerializeToString()
    r = unwire.decode_params_response(raw)
    assert (r.guaranteed_clock, r.version, r.final, r.run_state) == (gc, version, final, state)
    _same_chunks(r.tensors, list(msg.tensors))


@settings(max_examples=300, deadline=None)
@given(gc=U64, version=U64, group=groups(), final=st.booleans(), state=RUN_STATES)
def test_an_encoded_group_pads_a_large_answer_s_data_to_16_bytes_after_its_first(
        gc: int, version: int, group: wire.Group, final: bool, state: int) -> None:
    """A large model's answer, encoded once per run (``EncodedGroup``): the generated class reads
    it as the same message, and each chunk's data starts a multiple of 16 bytes after the first
    chunk's (the shared-memory plane places it so that one is aligned). Small ones are not padded."""
    raw = encode_params_response(gc, version, wire.EncodedGroup(group), final, state)
    msg = pb.PullParamsResponse.FromString(raw)
    expected = pb.PullParamsResponse(guaranteed_clock=gc, version=version, tensors=_pb_chunks(group), final=final,
                                     run_state=state)  # type: ignore[arg-type]
    padded = [len(t.padding) for t in msg.tensors]
    for t in msg.tensors:
        t.ClearField("padding")
    assert msg.SerializeToString() == expected.SerializeToString()
    if wire.SMALL_MESSAGE >= 0:  # (these groups are small: encoded as the generated class does)
        assert raw == expected.SerializeToString() and not any(padded)
        return
    base = np.frombuffer(raw, np.uint8).ctypes.data
    starts = [np.frombuffer(c.data, np.uint8).ctypes.data - base for c in unwire.decode_params_response(raw).tensors
              if len(c.data)]
    assert all((at - starts[0]) % 16 == 0 for at in starts)


@settings(max_examples=300, deadline=None)
@given(clock=U64, dup=st.booleans(), mc=U64, state=RUN_STATES,
       pulled=st.one_of(st.none(), st.tuples(U64, U64, groups(), st.booleans(), RUN_STATES)))
def test_push_response_matches_protobuf(clock: int, dup: bool, mc: int, state: int,
                                        pulled: wire.ParamsParts | None) -> None:
    raw = encode_push_response(clock, dup, mc, state, pulled)
    msg = pb.PushGradientResponse(clock=clock, duplicate=dup, min_clock=mc, run_state=state)  # type: ignore[arg-type]
    if pulled is not None:
        gc, version, group, final, pstate = pulled
        msg.pulled.CopyFrom(pb.PullParamsResponse(guaranteed_clock=gc, version=version, tensors=_pb_chunks(group),
                                                  final=final, run_state=pstate))  # type: ignore[arg-type]
    assert raw == msg.SerializeToString()
    r = unwire.decode_push_response(raw)
    assert (r.clock, r.duplicate, r.min_clock, r.run_state) == (clock, dup, mc, state)
    if pulled is None:
        assert r.pulled is None
    else:
        assert r.pulled is not None
        assert (r.pulled.guaranteed_clock, r.pulled.version, r.pulled.final, r.pulled.run_state) == pulled[:2] + pulled[3:]
        _same_chunks(r.pulled.tensors, list(msg.pulled.tensors))


@settings(max_examples=100, deadline=None)
@given(shapes=st.lists(st.tuples(NAMES, st.lists(st.integers(0, 40), max_size=3).map(tuple)), max_size=4,
                       unique_by=lambda t: t[0]),
       chunk_bytes=st.integers(1, 400))
def test_chunk_groups_follow_the_chunking_rule(shapes: list[tuple[str, tuple[int, ...]]], chunk_bytes: int) -> None:
    """Chunks of at most chunk_bytes cover each tensor once, in order; a message ends once it holds
    chunk_bytes of payload (so only the last may hold less); there is always one message."""
    tensors = {n: np.arange(int(np.prod(s)), dtype="<f4").reshape(s) for n, s in shapes}
    groups = list(wire.chunk_groups(tensors, chunk_bytes))
    assert groups
    per_chunk = max(1, chunk_bytes // 4)
    seen: dict[str, list[float]] = {}
    for i, group in enumerate(groups):
        payload = sum(part.nbytes for _, _, _, part in group)
        if i < len(groups) - 1:
            assert payload >= chunk_bytes
        assert payload - group[-1][3].nbytes < chunk_bytes if group else True  # it ended as soon as it was full
        for name, shape, offset, part in group:
            assert shape == tensors[name].shape and part.size <= per_chunk
            assert offset == len(seen.setdefault(name, []))
            seen[name] += part.tolist()
    assert seen == {n: t.reshape(-1).tolist() for n, t in tensors.items() if t.size} | {
        n: [] for n, t in tensors.items() if not t.size and n in seen}
    # and what the generated classes parse back from them is the same chunks
    for group in groups:
        _same_chunks(unwire.decode_push_request(encode_push_request("r", 1, 2, 3, group, False)).tensors,
                     pb.PushGradientRequest.FromString(_unpadded(encode_push_request("r", 1, 2, 3, group, False))).tensors)


@settings(max_examples=100, deadline=None)
@given(shapes=st.lists(st.tuples(NAMES, st.lists(st.integers(0, 40), max_size=3).map(tuple)), max_size=4,
                       unique_by=lambda t: t[0]),
       chunk_bytes=st.integers(1, 20000), dtype=st.sampled_from(["<f4", "<f8"]))
def test_a_whole_group_is_chunk_groups_one_group_or_none(shapes: list[tuple[str, tuple[int, ...]]], chunk_bytes: int,
                                                         dtype: str) -> None:
    """``whole_group`` (every push of a small model) is what ``chunk_groups`` makes when that is
    one group, encoded to the same bytes; None when the tensors do not fit or are not float32."""
    tensors = {n: np.arange(int(np.prod(s)), dtype=dtype).reshape(s) for n, s in shapes}
    whole = wire.whole_group(tensors, chunk_bytes)
    groups = list(wire.chunk_groups(tensors, chunk_bytes))
    if (dtype != "<f4" and tensors) or sum(t.nbytes for t in tensors.values()) >= chunk_bytes:
        assert whole is None
        return
    assert whole is not None and len(groups) == 1
    assert [(n, s, o, p.tolist()) for n, s, o, p in whole] == [(n, s, o, p.tolist()) for n, s, o, p in groups[0]]
    assert encode_push_request("r", 1, 2, 3, whole, True) == encode_push_request("r", 1, 2, 3, groups[0], True)


@settings(max_examples=300, deadline=None)
@given(run_id=NAMES, rank=U32, inc=U64, clock=U64, wait=st.floats(0, 1e6), since=st.one_of(st.none(), st.tuples(U64, U64)))
def test_a_pull_request_by_hand_is_the_generated_class_bytes(run_id: str, rank: int, inc: int, clock: int, wait: float,
                                                          since: tuple[int, int] | None) -> None:
    """``pull_request_bytes`` (every push's then_pull) writes what the generated class writes."""
    expected = pb.PullParamsRequest(run_id=run_id, rank=rank, incarnation=inc, clock=clock)
    expected.max_wait.FromNanoseconds(int(wait * 1e9))
    if since is not None:
        expected.since_lineage, expected.since_version = since
    assert wire.pull_request_bytes(run_id, rank, inc, clock, wait, since) == expected.SerializeToString()


def _descriptor_fields(message: type[Any]) -> set[str]:
    return {f.name for f in message.DESCRIPTOR.fields}


def _codec_gaps(message: type[Any], descriptor_fields: set[str]) -> set[str]:
    """Fields of ``message`` the hand codec would drop: neither decoded into its dataclass nor
    deliberately ignored."""
    target, ignored = unwire.HAND_CODED[message]
    return descriptor_fields - {f.name for f in dataclasses.fields(target)} - ignored


@pytest.mark.parametrize("message", list(unwire.HAND_CODED), ids=lambda m: m.DESCRIPTOR.name)
def test_the_codec_knows_every_field_of_its_messages(message: type[Any]) -> None:
    """The .proto is the one source of truth: a field it gains that the hand codec does not know
    fails here (it would silently not be sent, nor read)."""
    assert _codec_gaps(message, _descriptor_fields(message)) == set()
    target, ignored = unwire.HAND_CODED[message]
    assert {f.name for f in dataclasses.fields(target)} <= _descriptor_fields(message)  # no stale names either


def test_the_field_check_catches_a_new_field() -> None:
    """The check above can fail: a field added to the contract (simulated) is reported."""
    assert _codec_gaps(pb.PushGradientRequest, _descriptor_fields(pb.PushGradientRequest) | {"priority"}) == {"priority"}


def test_field_numbers_come_from_the_descriptors() -> None:
    """Every key the encoders write is the descriptor's number and wire type."""
    raw = encode_push_request("r", 1, 2, 3, [("w", (2,), 0, np.ones(2, "<f4"))], True, 0.5,
                              pb.PullParamsRequest(clock=1))
    fields = pb.PushGradientRequest.DESCRIPTOR.fields_by_name
    keys = []
    i = 0
    while i < len(raw):  # walk the top-level keys
        key = raw[i]
        keys.append(key >> 3)
        i += 1
        wt = key & 7
        if wt == 0:
            while raw[i] & 0x80:
                i += 1
            i += 1
        elif wt == 1:
            i += 8
        else:
            n = raw[i]
            i += 1 + n
    assert keys == [fields[n].number for n in ("run_id", "rank", "incarnation", "clock", "tensors", "final", "loss",
                                               "then_pull")]


def test_edge_cases() -> None:
    # multi-chunk, zero-size, empty group, unicode names, huge varints, negative int64 offsets
    arr = np.arange(10, dtype="<f4")
    group: wire.Group = [("ünï€😀", (10,), 0, arr[:4]), ("ünï€😀", (10,), 4, arr[4:]), ("z", (0, 3), 0, arr[:0]),
                         ("neg", (-1, 2), -5, arr[:1])]
    raw = encode_push_request("rün", (1 << 32) - 1, (1 << 64) - 1, (1 << 64) - 1, group, True, -0.0,
                                   pb.PullParamsRequest(clock=(1 << 64) - 1))
    then = pb.PullParamsRequest(clock=(1 << 64) - 1)
    assert _unpadded(raw) == pb.PushGradientRequest(
        run_id="rün", rank=(1 << 32) - 1, incarnation=(1 << 64) - 1, clock=(1 << 64) - 1, tensors=_pb_chunks(group),
        final=True, loss=-0.0, then_pull=then).SerializeToString()
    msg = pb.PushGradientRequest.FromString(raw)
    assert msg.tensors[3].offset == -5 and msg.tensors[3].shape[0] == -1
    r = unwire.decode_push_request(raw)
    assert [c.offset for c in r.tensors] == [0, 4, 0, -5]
    assert tuple(r.tensors[2].shape) == (0, 3) and bytes(r.tensors[2].data) == b""
    # the only paddings that align this chunk's data would make its length prefix a byte longer
    group = [("00\x80\x80𐀀", (0,), -1, np.zeros(20, "<f4"))]
    raw = encode_push_request("00\x80\x80\x80𐀀𐀀𐀀", 0, 128, 2097152, group, False)
    assert _unpadded(raw) == pb.PushGradientRequest(run_id="00\x80\x80\x80𐀀𐀀𐀀", incarnation=128, clock=2097152,
                                                    tensors=_pb_chunks(group)).SerializeToString()
    assert encode_push_request("", 0, 0, 0, [], False) == b""
    assert unwire.decode_push_request(b"") == unwire.PushRequest()
    assert wire.varint(-1) == b"\xff" * 9 + b"\x01"


def test_unusual_input_falls_back_to_protobuf() -> None:
    # unpacked shape, repeated scalar fields, unknown fields: the result equals FromString's
    c = pb.TensorChunk(name="a", shape=[2, 3], dtype=pb.DATA_TYPE_FLOAT32, data=b"\0" * 24)
    body = c.SerializeToString()
    unpacked = body.replace(b"\x12\x02\x02\x03", b"\x10\x02\x10\x03")
    raw = b"\x0a\x01r" + b"\x10\x01" + b"\x10\x02" + b"\x2a" + bytes([len(unpacked)]) + unpacked + b"\xf8\x01\x07"
    expected = pb.PushGradientRequest.FromString(raw)
    r = unwire.decode_push_request(raw)
    assert (r.run_id, r.rank) == (expected.run_id, expected.rank) == ("r", 2)
    _same_chunks(r.tensors, list(expected.tensors))
    # a uint32 field sent as a wider varint is truncated as protobuf does
    wide = b"\x10" + wire.varint((1 << 33) + 5)
    assert unwire.decode_push_request(wide).rank == pb.PushGradientRequest.FromString(wide).rank


@pytest.mark.parametrize("raw", [b"\x0a\x05ab", b"\x2a\x03\x0a\x05a", b"\x0a\x02\xff\xfe", b"\xff" * 11])
def test_malformed_input_raises_decode_error(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        pb.PushGradientRequest.FromString(raw)
    with pytest.raises(DecodeError):
        unwire.decode_push_request(raw)
    try:  # the same bytes as a PullParamsResponse: whatever protobuf says
        expected = pb.PullParamsResponse.FromString(raw)
    except DecodeError:
        with pytest.raises(DecodeError):
            unwire.decode_params_response(raw)
    else:
        r = unwire.decode_params_response(raw)
        assert (r.guaranteed_clock, r.final, len(r.tensors)) == (expected.guaranteed_clock, expected.final,
                                                                 len(expected.tensors))


# ----------------------------------------------------------------------------------- PushLayout
def _model(seed: int) -> list[tuple[str, tuple[int, ...], int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(name, shape, 0, rng.standard_normal(int(np.prod(shape))).astype("<f4"))
            for name, shape in (("w0", (8, 4)), ("b0", (4,)), ("w1", (4, 3)), ("b1", (3,)))]


def _fields(r: unwire.PushRequest) -> tuple[Any, ...]:
    return r.run_id, r.rank, r.incarnation, r.clock, r.final, struct.pack("<d", r.loss), r.then_pull, r.param_version


PARAM_VERSIONS = st.one_of(st.none(), U64)


@settings(max_examples=200, deadline=None)
@given(run_id=NAMES, rank=U32, inc=U64, clock=U64, final=st.booleans(), loss=LOSS, then=then_pulls,
       version=PARAM_VERSIONS, seed=st.integers(0, 1000))
def test_a_learned_layout_reads_pushes_laid_out_alike_as_the_generated_class_does(
        run_id: str, rank: int, inc: int, clock: int, final: bool, loss: float, then: pb.PullParamsRequest | None,
        version: int | None, seed: int) -> None:
    first = encode_push_request(run_id, rank, inc, 100, _model(0), True, 0.5, pb.PullParamsRequest(clock=101), 99)
    layout = unwire.PushLayout.learn(first, unwire.decode_push_request(first))
    if wire.SMALL_MESSAGE < 0:  # pushes padded for alignment: not laid out as a layout says
        assert layout is None
        return
    assert layout is not None and layout.names == ["w0", "b0", "w1", "b1"]
    model = _model(seed)
    other = encode_push_request(run_id + "x", rank, inc, clock, model, final, loss, then, version)
    assert layout.match(memoryview(other)) is None  # another worker's (or incarnation's) pushes
    raw = encode_push_request(run_id, rank, inc, clock, model, final, loss, then, version)
    got = layout.match(memoryview(raw))
    assert got is not None
    req, starts = got
    assert _fields(req) == _fields(unwire.decode_push_request(raw))
    for (_, _, _, data), start, size in zip(model, starts, layout.sizes, strict=True):
        np.testing.assert_array_equal(np.frombuffer(raw, "<f4", size // 4, start), data)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 1000), cut=st.integers(0, 400), flip=st.integers(0, 400), value=st.integers(0, 255))
def test_a_layout_never_reads_a_push_otherwise_than_the_generated_class(seed: int, cut: int, flip: int,
                                                                        value: int) -> None:
    """Bytes changed anywhere, or cut short: ``match`` says None, or exactly what parsing says."""
    if wire.SMALL_MESSAGE < 0:
        return
    first = encode_push_request("run-1", 3, 7, 100, _model(0), True, 0.5, None, None)
    layout = unwire.PushLayout.learn(first, unwire.decode_push_request(first))
    assert layout is not None
    raw = bytearray(encode_push_request("run-1", 3, 7, 101, _model(seed), True, 0.25,
                                        pb.PullParamsRequest(run_id="run-1", clock=102), 100))
    raw[flip % len(raw)] = value
    raw = raw[: len(raw) - cut % 40]
    got = layout.match(memoryview(bytes(raw)))
    if got is None:
        return
    req, starts = got
    parsed = pb.PushGradientRequest.FromString(bytes(raw))  # (no DecodeError: match read it whole)
    assert _fields(req) == (parsed.run_id, parsed.rank, parsed.incarnation, parsed.clock, parsed.final,
                            struct.pack("<d", parsed.loss), parsed.then_pull if parsed.HasField("then_pull") else None,
                            parsed.param_version if parsed.HasField("param_version") else None)
    assert [(c.name, tuple(c.shape), c.offset, c.dtype) for c in parsed.tensors] == [
        (n, s, 0, pb.DATA_TYPE_FLOAT32) for n, s, _, _ in _model(0)]
    for c, start, size in zip(parsed.tensors, starts, layout.sizes, strict=True):
        assert c.data == bytes(raw[start : start + size]) and not c.row_ids and not c.indices


def test_pushes_not_laid_out_as_learned_do_not_match_and_some_cannot_be_learned() -> None:
    if wire.SMALL_MESSAGE < 0:
        return
    model = _model(0)
    first = encode_push_request("r", 1, 1, 0, model, True)
    layout = unwire.PushLayout.learn(first, unwire.decode_push_request(first))
    assert layout is not None
    assert layout.match(memoryview(encode_push_request("r", 1, 1, 1, model[::-1], True))) is None  # another order
    assert layout.match(memoryview(encode_push_request("r", 1, 1, 1, model[:3], True))) is None  # a tensor less
    assert layout.match(memoryview(encode_push_request("r", 1, 1, 1, [*model, model[0]], True))) is None  # one more
    wider = [(n, (s[0] + 1, *s[1:]), o, np.zeros(d.size + int(np.prod(s[1:])), "<f4")) for n, s, o, d in model]
    assert layout.match(memoryview(encode_push_request("r", 1, 1, 1, wider, True))) is None  # other shapes
    pieces = [("w", (4,), 0, np.zeros(2, "<f4")), ("w", (4,), 2, np.zeros(2, "<f4"))]
    raw = encode_push_request("r", 1, 1, 0, pieces, True)
    assert unwire.PushLayout.learn(raw, unwire.decode_push_request(raw)) is None  # a tensor in two chunks
    sparse = {"w": wire.CodedPart(np.zeros(2, "<f4"), pb.DATA_TYPE_FLOAT32, (4,), np.array([0, 3], np.uint32))}
    raw = wire.join(wire.push_request_parts("r", 1, 1, 0, next(wire.chunk_groups(sparse, 1 << 20)), True))
    assert unwire.PushLayout.learn(raw, unwire.decode_push_request(raw)) is None  # sparse (top-k)
    half = {"w": wire.CodedPart(np.zeros(4, "<f2"), pb.DATA_TYPE_FLOAT16, (4,))}
    raw = wire.join(wire.push_request_parts("r", 1, 1, 0, next(wire.chunk_groups(half, 1 << 20)), True))
    assert unwire.PushLayout.learn(raw, unwire.decode_push_request(raw)) is None  # fp16
