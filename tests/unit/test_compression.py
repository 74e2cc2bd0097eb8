"""Compression (RunSpec.compression): the half-precision codecs, top-k selection, the worker's
error feedback against a numpy reference, and the server's reassembly of compressed pushes."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.facts import compression_text
from client.spec import LaunchOptions, build_run_spec, parse_compression
from paramserver.v1 import compress, unwire, wire
from paramserver.v1 import paramserver_pb2 as pb
from ps_server.codec import TensorAssembler, spec_from_proto, spec_to_proto
from ps_server.core.errors import InvalidArgument
from ps_server.core.spec import Initializer, ParamSpec, spec_from_dict, spec_to_dict, validate_spec
from ps_server.core.store import ParamStore
from ps_server.core.tensors import Pieces
from worker.compression import PushCodec

pytestmark = pytest.mark.timeout(60)

F16, BF16 = pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_BFLOAT16


def _bf16_reference(x: float) -> float:
    """Round-to-nearest-even of a float32 to its upper 16 bits, one value at a time in Python."""
    (bits,) = struct.unpack("<I", struct.pack("<f", x))
    if (bits & 0x7F800000) == 0x7F800000 and bits & 0x7FFFFF:  # NaN
        return float("nan")
    upper, lower = bits >> 16, bits & 0xFFFF
    if lower > 0x8000 or (lower == 0x8000 and upper & 1):
        upper += 1
    return float(struct.unpack("<f", struct.pack("<I", (upper << 16) & 0xFFFFFFFF))[0])


def _round_trip(values: np.ndarray, dtype: int) -> np.ndarray:
    out = np.empty(values.size, np.float32)
    compress.decode_into(compress.encode(values, dtype).tobytes(), dtype, out)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=64))
def test_bfloat16_rounds_to_nearest_even_like_the_reference(xs: list[float]) -> None:
    values = np.array(xs, np.float32)
    got = _round_trip(values, BF16)
    want = np.array([_bf16_reference(float(x)) for x in values], np.float32)
    np.testing.assert_array_equal(got, want)  # NaN where NaN, infinities kept, the sign of zero kept


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, min_value=-6e4, max_value=6e4), min_size=1, max_size=64))
def test_float16_is_numpys_binary16_and_close_within_its_precision(xs: list[float]) -> None:
    values = np.array(xs, np.float32)
    got = _round_trip(values, F16)
    np.testing.assert_array_equal(got, values.astype(np.float16).astype(np.float32))
    normal = np.abs(values) >= 6.2e-5  # binary16's normal range: 11 significant bits
    assert np.all(np.abs(got - values)[normal] <= np.abs(values)[normal] * 2.0**-11)


def test_float16_beyond_its_range_is_infinite_and_bfloat16_keeps_the_range() -> None:
    values = np.array([7e4, -1e30, 3e38], np.float32)
    assert np.isinf(_round_trip(values, F16)).all()
    np.testing.assert_allclose(_round_trip(values, BF16), values, rtol=2.0**-8)


def test_top_k_is_exact_on_small_tensors_and_a_threshold_on_large_ones() -> None:
    rng = np.random.default_rng(0)
    small = rng.standard_normal(1000).astype(np.float32)
    picked = compress.top_k(small, 10)
    assert picked.dtype == np.uint32 and list(picked) == sorted(np.argsort(-np.abs(small))[:10])
    large = rng.standard_normal(1 << 20).astype(np.float32)
    k = compress.k_of(0.01, large.size)
    picked = compress.top_k(large, k)
    assert np.all(np.diff(picked.astype(np.int64)) > 0)
    assert 0.8 * k <= picked.size <= 1.25 * k, (picked.size, k)
    rest = np.ones(large.size, bool)
    rest[picked] = False
    assert np.abs(large[picked]).min() >= np.abs(large[rest]).max()  # the largest ones, whatever their number
    assert list(compress.top_k(small, 5000)) == list(range(1000))
    assert compress.k_of(0.001, 10) == 1 and compress.k_of(0.5, 7) == 4


@pytest.mark.parametrize("nans", [1, 2000])
def test_top_k_picks_a_nan_on_the_sampled_path_as_on_the_exact_one(nans: int) -> None:
    """A NaN in a large tensor (or so many that the sampled threshold is one) is always picked: it
    goes to the server, which refuses the push with a clear error, instead of staying unseen in the
    residual while the tensor stops training."""
    rng = np.random.default_rng(1)
    for size in (1000, 1 << 20):
        g = rng.standard_normal(size).astype(np.float32)
        g[rng.choice(size, min(nans, size // 10), replace=False)] = np.nan
        picked = compress.top_k(g, compress.k_of(1e-3, size))
        assert np.isnan(g[picked]).any(), size


def _reference_error_feedback(grads: list[np.ndarray], k: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Top-k with error feedback, written the plain way: what each push sends, and the residual left."""
    residual = np.zeros_like(grads[0])
    sent = []
    for g in grads:
        acc = residual + g
        idx = np.sort(np.argsort(-np.abs(acc))[:k])
        out = np.zeros_like(acc)
        out[idx] = acc[idx]
        residual = acc - out
        sent.append(out)
    return sent, residual


def test_error_feedback_matches_the_numpy_reference_and_loses_nothing() -> None:
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal((20, 30)).astype(np.float32) for _ in range(12)]
    codec = PushCodec(pb.Compression(topk_ratio=0.05))
    want, residual = _reference_error_feedback([g.reshape(-1) for g in grads], 30)
    for g, expected in zip(grads, want, strict=True):
        part = codec.encode({"w": g})["w"]
        assert part.shape == (20, 30) and part.indices is not None and part.indices.size == 30
        got = np.zeros(600, np.float32)
        got[part.indices] = part.values
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(codec.residual["w"], residual, rtol=1e-5, atol=1e-5)


def test_error_feedback_in_half_precision_keeps_the_rounding_for_later() -> None:
    """What was sent (as the server decodes it) plus the residual is the sum of the gradients."""
    rng = np.random.default_rng(2)
    codec = PushCodec(pb.Compression(topk_ratio=0.01, dtype=F16))
    total, applied = np.zeros(200_000, np.float32), np.zeros(200_000, np.float32)
    for _ in range(20):
        g = rng.standard_normal(200_000).astype(np.float32) * 1e-3
        total += g
        part = codec.encode({"w": g})["w"]
        decoded = np.empty(part.values.size, np.float32)
        compress.decode_into(part.values.tobytes(), F16, decoded)
        applied[part.indices] += decoded
    np.testing.assert_allclose(applied + codec.residual["w"], total, atol=1e-6)
    assert np.count_nonzero(applied) < 0.25 * applied.size


def _assemble(parts: dict[str, wire.CodedPart], dtype: int, sparse: bool, chunk_bytes: int = 1 << 20) -> dict[str, np.ndarray]:
    """Through the real encoding (chunks of ``chunk_bytes``) and decoding, into the server's assembler."""
    groups = list(wire.chunk_groups(parts, chunk_bytes))
    asm = TensorAssembler(1 << 26, dtype=dtype, sparse=sparse)
    for i, group in enumerate(groups):
        req = unwire.decode_push_request(wire.join(wire.push_request_parts("r", 0, 1, 0, group, i == len(groups) - 1)))
        asm.add(req.tensors)
    return {k: np.asarray(v) for k, v in asm.finish().items()}


@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])
@pytest.mark.parametrize("dtype", [pb.DATA_TYPE_FLOAT32, F16, BF16])
def test_compressed_pushes_reach_the_server_as_the_worker_meant_them(dtype: int, chunk_bytes: int) -> None:
    rng = np.random.default_rng(3)
    grads = {"a": rng.standard_normal((50, 40)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    for ratio in (0.0, 0.1):
        codec = PushCodec(pb.Compression(dtype=dtype, topk_ratio=ratio))
        parts = codec.encode(grads)
        got = _assemble(parts, dtype, sparse=bool(ratio), chunk_bytes=chunk_bytes)
        for name, g in grads.items():
            picked, values = codec.sent_values(name)
            want = np.zeros(g.size, np.float32)
            want[slice(None) if picked is None else picked] = values
            assert got[name].shape == g.shape
            np.testing.assert_array_equal(got[name].reshape(-1), want)
            if dtype == pb.DATA_TYPE_FLOAT32 and not ratio:
                np.testing.assert_array_equal(got[name], g)


def _chunk(dtype: int, data: bytes, indices: bytes = b"", shape: tuple[int, ...] = (8,)) -> pb.TensorChunk:
    return pb.TensorChunk(name="w", shape=shape, dtype=dtype, data=data, indices=indices)


@pytest.mark.parametrize(("run_dtype", "sparse", "chunks", "says"), [
    (F16, False, [_chunk(pb.DATA_TYPE_FLOAT32, bytes(32))], "this run's pushes carry DATA_TYPE_FLOAT16"),
    (pb.DATA_TYPE_FLOAT32, False, [_chunk(BF16, bytes(16))], "this run's pushes carry DATA_TYPE_FLOAT32"),
    (F16, False, [_chunk(F16, bytes(15))], "not a whole number of float16"),
    (F16, False, [_chunk(F16, bytes(4), np.array([1, 2], "<u4").tobytes())], "no top-k compression"),
    (F16, True, [_chunk(F16, bytes(4), np.array([2, 1], "<u4").tobytes())], "must increase strictly"),
    (F16, True, [_chunk(F16, bytes(4), np.array([1, 8], "<u4").tobytes())], "below its size 8"),
    (F16, True, [_chunk(F16, bytes(6), np.array([1, 2], "<u4").tobytes())], "one uint32 index"),
    (F16, True, [_chunk(F16, bytes(2), np.array([3], "<u4").tobytes()),
                 _chunk(F16, bytes(2), np.array([3], "<u4").tobytes())], "across the tensor's chunks"),
    (F16, True, [_chunk(F16, bytes(2), np.array([3], "<u4").tobytes()), _chunk(F16, bytes(16))], "sparse and as dense"),
])
def test_malformed_compressed_chunks_are_refused_saying_what_to_fix(
        run_dtype: int, sparse: bool, chunks: list[pb.TensorChunk], says: str) -> None:
    asm = TensorAssembler(1 << 20, dtype=run_dtype, sparse=sparse)
    with pytest.raises(InvalidArgument) as e:
        asm.add(chunks)
    assert says in str(e.value)


def test_a_nan_in_a_half_precision_push_arrives_as_nan_for_the_finite_check() -> None:
    asm = TensorAssembler(1 << 20, dtype=F16)
    asm.add([_chunk(F16, np.array([1, np.nan, 2, 3, 4, 5, 6, 7], np.float16).tobytes())])
    assert np.isnan(asm.finish()["w"]).sum() == 1


def test_the_spec_carries_compression_through_proto_checkpoint_and_psctl() -> None:
    spec = build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=2, iterations=10,
                                        compress="topk:1%,bf16"))
    assert spec.compression == pb.Compression(dtype=BF16, topk_ratio=0.01)
    assert list(spec.requires) == ["compression"]  # workers that cannot (the Node one) are not given it
    core = spec_from_proto(spec)
    assert (core.wire_dtype, core.topk_ratio) == ("bfloat16", 0.01)
    assert spec_from_dict(spec_to_dict(core)) == core
    assert spec_to_proto(core).compression == spec.compression
    plain = spec_from_proto(build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=2, iterations=10)))
    assert (plain.wire_dtype, plain.topk_ratio) == ("float32", 0.0) and not spec_to_proto(plain).HasField("compression")
    for text in ("fp16", "bf16", "topk:0.01", "topk:0.001,fp16"):
        assert compression_text(parse_compression(text) or pb.Compression()) == text  # psctl status shows it so
    assert compression_text(pb.Compression()) == "none" and compression_text(parse_compression("topk:1%,bf16")) == \
        "topk:0.01,bf16"
    for bad, says in (("topk:2", "share in (0, 1)"), ("zip", "use none, fp16"), ("fp16,fp16", "use none"),
                      ("none,fp16", "use none")):
        with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
            parse_compression(bad)
    aware = build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=2, iterations=10,
                                         staleness_aware_lr=True))
    assert aware.staleness_aware_lr and spec_from_proto(aware).staleness_aware_lr
    assert spec_to_proto(spec_from_proto(aware)).staleness_aware_lr
    with pytest.raises(ValueError, match="not with --optimizer ftrl"):
        build_run_spec(LaunchOptions(model="softmax", dataset="digits", optimizer="ftrl", staleness_aware_lr=True))
    with pytest.raises(ValueError, match="dense models"):
        build_run_spec(LaunchOptions(model="logistic", dataset="synthetic-ctr:samples=2000", workers=2, iterations=10,
                                     compress="fp16"))
    for bad_core, says in ((dataclasses.replace(core, topk_ratio=1.5), "topk_ratio 1.5"),
                           (dataclasses.replace(core, wire_dtype="int8"), "compression dtype 'int8'")):
        with pytest.raises(InvalidArgument, match=says):
            validate_spec(bad_core)
    wrong = pb.RunSpec()
    wrong.CopyFrom(spec)
    wrong.compression.dtype = 7
    with pytest.raises(InvalidArgument, match="compression dtype 7"):
        spec_from_proto(wrong)


def test_the_store_records_what_each_update_changed_and_answers_deltas() -> None:
    specs = (ParamSpec("a", (10, 10), Initializer.ZEROS, 0.0), ParamSpec("b", (1000,), Initializer.ZEROS, 0.0))
    store = ParamStore(specs, 0)
    assert store.delta(0, 2) is None  # untracked: whole answers
    store.track_changes()
    g1 = {"a": np.zeros((10, 10), np.float32), "b": np.zeros(1000, np.float32)}
    g1["a"][3, 4] = 1.0
    store.mark(g1, None, 1)
    g2 = {"a": np.zeros((10, 10), np.float32), "b": Pieces((1000,), [(0, np.zeros(500, np.float32)),
                                                                     (500, np.eye(1, 500, 7, dtype=np.float32)[0])])}
    store.mark(g2, None, 2)
    flat = np.zeros(1100, np.float32)
    flat[[0, 150]] = 2.0
    store.mark({}, flat, 3)
    got = store.delta(1, 2)
    assert got is not None and sorted(got) == ["a", "b"]
    assert list(got["a"]) == [0] and list(got["b"]) == [50, 507]  # "a" at 0 (version 3); "b" at 507 (2), 50 (3)
    everything = store.delta(0, 2)
    assert everything is not None and list(everything["a"]) == [0, 34]
    assert store.delta(3, 2) == {}  # nothing since: an empty answer
    flat[:] = 1.0
    store.mark({}, flat, 4)
    assert store.delta(3, 2) is None  # every element changed: the whole model is smaller
    assert ParamStore(specs, 0).lineage != store.lineage  # another history (a restore builds a new store)


def test_a_top_k_run_refuses_a_tensor_whose_positions_would_not_fit_uint32() -> None:
    """Top-k positions travel as uint32 (TensorChunk.indices): a tensor of more than 2^32 elements
    would wrap them. It is refused when the run is created, on its shape (nothing is allocated)."""
    core = spec_from_proto(build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=2, iterations=10,
                                                        compress="topk:0.01")))
    too_big = ParamSpec("embedding", (1 << 16, (1 << 16) + 1))
    with pytest.raises(InvalidArgument, match=r"'embedding' has 4295032832 elements.*at most 2\^32"):
        validate_spec(dataclasses.replace(core, params=(*core.params, too_big)))
    validate_spec(dataclasses.replace(core, params=(ParamSpec("edge", (1 << 16, 1 << 16)),)))  # 2^32: positions fit
    validate_spec(dataclasses.replace(core, topk_ratio=0.0, params=(too_big,)))  # dense pushes have no positions
