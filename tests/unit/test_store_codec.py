"""The parameter store (initialisation rule, gradient validation) and the wire codec (tensor
reassembly, spec conversion, the error table)."""

from __future__ import annotations

import math
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import unwire, wire
from ps_server.codec import TensorAssembler, error_status, spec_from_proto, spec_to_proto
from ps_server.core import errors
from ps_server.core.errors import InvalidArgument, ResourceExhausted
from ps_server.core.spec import (
    Aggregation,
    Initializer,
    OptimizerConfig,
    OptimizerKind,
    ParamSpec,
    RunSpec,
)
from ps_server.core.store import FLAT_MAX, ParamStore, materialize
from ps_server.core.tensors import Pieces, Rows, blocks

pytestmark = pytest.mark.timeout(60)

F32 = np.dtype("<f4")

SPECS = (
    ParamSpec("w0", (3, 4), Initializer.NORMAL, 0.5),
    ParamSpec("zeros", (5,), Initializer.ZEROS, 3.0),
    ParamSpec("w2", (2, 3, 2), Initializer.UNIFORM, 2.0),
    ParamSpec("const", (4,), Initializer.CONSTANT, 0.25),
    ParamSpec("w4", (6,), Initializer.NORMAL, 1.0),
)


# ------------------------------------------------------------------------------ materialize
def test_materialize_is_deterministic() -> None:
    a = materialize(SPECS, 7)
    b = materialize(SPECS, 7)
    assert list(a) == [p.name for p in SPECS]
    for p in SPECS:
        assert a[p.name].dtype == np.float32 and a[p.name].shape == p.shape
        assert a[p.name].tobytes() == b[p.name].tobytes()
    c = materialize(SPECS, 8)
    assert a["w0"].tobytes() != c["w0"].tobytes()
    assert a["w2"].tobytes() != c["w2"].tobytes()


def test_materialize_rule_tensor_i_uses_default_rng_seed_i() -> None:
    """The proto's rule: tensor i (counting every tensor, zeros too) draws from default_rng([seed, i])."""
    seed = 1234
    got = materialize(SPECS, seed)
    want = {
        "w0": np.random.default_rng([seed, 0]).normal(0.0, 0.5, (3, 4)).astype(np.float32),
        "zeros": np.zeros(5, np.float32),
        "w2": np.random.default_rng([seed, 2]).uniform(-2.0, 2.0, (2, 3, 2)).astype(np.float32),
        "const": np.full(4, 0.25, np.float32),
        "w4": np.random.default_rng([seed, 4]).normal(0.0, 1.0, (6,)).astype(np.float32),
    }
    for name, arr in want.items():
        assert got[name].tobytes() == arr.tobytes(), name
    assert np.all(np.abs(got["w2"]) <= 2.0)


@pytest.mark.parametrize("init", [Initializer.NORMAL, Initializer.UNIFORM])
def test_materialize_in_blocks_equals_one_draw(init: Initializer) -> None:
    """Tensors larger than the generation block (drawn in pieces to bound memory) still follow the
    one-call rule bit for bit, including the partial last block."""
    shape = (3, (1 << 20) // 3 + 5)
    got = materialize((ParamSpec("big", shape, init, 0.5),), 11)["big"]
    rng = np.random.default_rng([11, 0])
    full = rng.normal(0.0, 0.5, shape) if init is Initializer.NORMAL else rng.uniform(-0.5, 0.5, shape)
    assert got.tobytes() == full.astype(np.float32).tobytes()


def test_materialize_is_per_tensor_not_a_shared_stream() -> None:
    """Removing an earlier tensor's draws does not shift a later tensor: each has its own stream."""
    alone = materialize((ParamSpec("x", (4,), Initializer.NORMAL, 1.0),), 3)
    second = materialize((ParamSpec("z", (9,), Initializer.ZEROS), ParamSpec("x", (4,), Initializer.NORMAL, 1.0)), 3)
    assert alone["x"].tobytes() == np.random.default_rng([3, 0]).normal(0, 1, 4).astype(np.float32).tobytes()
    assert second["x"].tobytes() == np.random.default_rng([3, 1]).normal(0, 1, 4).astype(np.float32).tobytes()


# ------------------------------------------------------------------------------ check_gradient
@pytest.fixture
def store() -> ParamStore:
    return ParamStore((ParamSpec("w", (3, 4)), ParamSpec("b", (4,))), seed=0)


def _good() -> dict[str, np.ndarray]:
    return {"w": np.ones((3, 4), np.float32), "b": np.ones(4, np.float32)}


def test_check_gradient_accepts_a_good_gradient(store: ParamStore) -> None:
    store.check_gradient(_good())
    assert store.nbytes == 4 * (12 + 4)


def test_check_gradient_unknown_name(store: ParamStore) -> None:
    with pytest.raises(InvalidArgument) as e:
        store.check_gradient({**_good(), "nope": np.ones(2, np.float32)})
    assert "'nope'" in str(e.value) and "unknown" in str(e.value)
    assert "'b', 'w'" in str(e.value)  # says which tensors exist


@pytest.mark.parametrize("table_too", [False, True])
def test_check_gradient_unknown_name_in_a_run_with_tables(table_too: bool) -> None:
    """A push may leave a table out, but a name the run does not have is refused all the same
    (it was looked up as a parameter: KeyError, which no boundary maps to INVALID_ARGUMENT)."""
    store = ParamStore((ParamSpec("emb", (10, 2), table=True), ParamSpec("b", (2,))), 0)
    g: dict[str, Any] = {"b": np.ones(2, np.float32), "nope": np.ones(3, np.float32)}
    if table_too:
        g["emb"] = Rows(np.array([1], np.int64), np.ones((1, 2), np.float32), (10, 2))
    with pytest.raises(InvalidArgument) as e:
        store.check_gradient(g)
    assert "'nope'" in str(e.value) and "unknown" in str(e.value)
    assert e.value.reason is errors.Reason.INVALID_GRADIENT


def test_check_gradient_missing_name(store: ParamStore) -> None:
    g = _good()
    del g["b"]
    with pytest.raises(InvalidArgument) as e:
        store.check_gradient(g)
    assert "lacks" in str(e.value) and "'b'" in str(e.value)


def test_check_gradient_wrong_shape(store: ParamStore) -> None:
    with pytest.raises(InvalidArgument) as e:
        store.check_gradient({**_good(), "w": np.ones((4, 3), np.float32)})
    msg = str(e.value)
    assert "'w'" in msg and "[4, 3]" in msg and "[3, 4]" in msg


def test_check_gradient_float64(store: ParamStore) -> None:
    with pytest.raises(InvalidArgument) as e:
        store.check_gradient({**_good(), "b": np.ones(4, np.float64)})
    assert "'b'" in str(e.value) and "float64" in str(e.value) and "float32" in str(e.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_gradient_non_finite(store: ParamStore, bad: float) -> None:
    g = _good()
    g["w"][1, 2] = bad
    with pytest.raises(InvalidArgument) as e:
        store.check_gradient(g)
    assert "'w'" in str(e.value) and "1 NaN/Inf" in str(e.value)


@pytest.mark.parametrize("offset", [0, 1])  # aligned (dot) and unaligned (sum) views
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, None])
def test_check_gradient_pieces(store: ParamStore, offset: int, bad: float | None) -> None:
    """Huge but finite values (their squares and sums overflow) pass; one NaN/Inf in any piece fails."""
    w = np.full(store.specs["w"].shape, np.float32(3e38))
    if bad is not None:
        w.reshape(-1)[-1] = bad
    raw = bytearray(offset) + bytearray(w.tobytes())
    view = np.frombuffer(memoryview(raw)[offset:], np.float32)
    assert view.flags.aligned is (offset == 0)
    half = view.size // 2
    g = {"w": Pieces(w.shape, [(0, view[:half]), (half, view[half:])]), "b": _good()["b"]}
    if bad is None:
        store.check_gradient(g)
        return
    with pytest.raises(InvalidArgument, match="'w' contains 1 NaN/Inf value"):
        store.check_gradient(g)


def test_check_gradient_leaves_params_alone(store: ParamStore) -> None:
    before = {n: a.tobytes() for n, a in store.params.items()}
    g = _good()
    g["b"][0] = np.nan
    with pytest.raises(InvalidArgument):
        store.check_gradient(g)
    assert {n: a.tobytes() for n, a in store.params.items()} == before


# ------------------------------------------------------------------------------ TensorAssembler
def _chunk(name: str, shape: tuple[int, ...], offset: int, values: np.ndarray | bytes,
           dtype: int = pb.DATA_TYPE_FLOAT32) -> pb.TensorChunk:
    data = values if isinstance(values, bytes) else np.asarray(values, F32).tobytes()
    return pb.TensorChunk(name=name, shape=shape, dtype=dtype, offset=offset, data=data)


def _root_base(arr: np.ndarray) -> object:
    base: object = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base


def test_assembler_single_chunk_is_zero_copy() -> None:
    values = np.arange(12, dtype=np.float32)
    a = TensorAssembler(max_bytes=1 << 20)
    a.add([_chunk("w", (3, 4), 0, values)])
    out = a.finish()
    assert out["w"].shape == (3, 4) and out["w"].dtype == np.float32
    assert np.array_equal(out["w"].reshape(-1), values)
    assert not out["w"].flags.owndata
    assert isinstance(_root_base(out["w"]), bytes)  # a view of the message's bytes, no copy
    assert a.nbytes == 48


def test_assembler_multi_chunk() -> None:
    values = np.arange(10, dtype=np.float32) * 1.5
    a = TensorAssembler(max_bytes=1 << 20)
    a.add([_chunk("w", (2, 5), 0, values[:3])])
    a.add([_chunk("w", (2, 5), 3, values[3:7]), _chunk("b", (2,), 0, [7.0, 8.0])])
    a.add([_chunk("w", (2, 5), 7, values[7:])])
    out = a.finish()
    assert np.array_equal(out["w"], values.reshape(2, 5))
    assert np.array_equal(out["b"], np.array([7.0, 8.0], np.float32))
    assert a.nbytes == 4 * 12
    w = out["w"]  # kept as the views it arrived in, never copied into one array
    assert isinstance(w, Pieces) and w.shape == (2, 5) and w.size == 10
    assert [lo for lo, _ in w.parts] == [0, 3, 7]
    assert all(isinstance(_root_base(v), bytes) for _, v in w.parts)
    assert [(lo, v.tolist()) for lo, v in blocks(w, 2)] == [
        (0, [0.0, 1.5]), (2, [3.0]), (3, [4.5, 6.0]), (5, [7.5, 9.0]), (7, [10.5, 12.0]), (9, [13.5])]


def _raises(chunks: list[pb.TensorChunk], *match: str, exc: type[Exception] = InvalidArgument,
            max_bytes: int = 1 << 20, finish: bool = False) -> str:
    a = TensorAssembler(max_bytes=max_bytes)
    with pytest.raises(exc) as e:
        a.add(chunks)
        if finish:
            a.finish()
    for m in match:
        assert m in str(e.value), (m, str(e.value))
    return str(e.value)


def test_assembler_out_of_order_offset() -> None:
    _raises([_chunk("w", (10,), 4, np.ones(6)), _chunk("w", (10,), 0, np.ones(4))], "'w'", "offset 4")


def test_assembler_overlapping_chunk() -> None:
    _raises([_chunk("w", (10,), 0, np.ones(4)), _chunk("w", (10,), 2, np.ones(4))], "offset 2", "expected offset 4")


def test_assembler_chunk_past_the_end() -> None:
    _raises([_chunk("w", (10,), 0, np.ones(4)), _chunk("w", (10,), 4, np.ones(7))], "'w'", "of 10")


def test_assembler_repeated_complete_chunk() -> None:
    c = _chunk("w", (4,), 0, np.ones(4))
    _raises([c, c], "'w'")


def test_assembler_negative_offset() -> None:
    _raises([_chunk("w", (10,), -1, np.ones(4))], "offset -1")


def test_assembler_incomplete_at_finish() -> None:
    _raises([_chunk("w", (10,), 0, np.ones(4))], "'w'", "incomplete", "4 of 10", finish=True)


def test_assembler_bytes_not_multiple_of_4() -> None:
    _raises([_chunk("w", (2,), 0, b"\x00" * 6)], "'w'", "6 bytes")


@pytest.mark.parametrize("dtype", [pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_BFLOAT16, pb.DATA_TYPE_UNSPECIFIED, 99])
def test_assembler_wrong_dtype(dtype: int) -> None:
    msg = _raises([_chunk("w", (2,), 0, b"\x00" * 8, dtype=dtype)], "'w'", "DATA_TYPE_FLOAT32")
    if dtype != 99:
        assert pb.DataType.Name(dtype) in msg


def test_assembler_shape_disagreement() -> None:
    _raises([_chunk("w", (10,), 0, np.ones(4)), _chunk("w", (2, 5), 4, np.ones(6))], "'w'", "shape")


def test_assembler_negative_dimension() -> None:
    _raises([_chunk("w", (-1, 4), 0, b"")], "'w'", "negative")


def test_assembler_over_max_bytes_by_payload() -> None:
    _raises([_chunk("w", (10,), 0, np.ones(10))], "36", exc=ResourceExhausted, max_bytes=36)


def test_assembler_over_max_bytes_by_declared_shape() -> None:
    """A huge declared shape is refused before anything of that size is allocated."""
    _raises([_chunk("w", (1 << 40, 1 << 20), 0, np.ones(1))], "'w'", exc=ResourceExhausted, max_bytes=1 << 20)


def test_assembler_exactly_max_bytes_is_fine() -> None:
    a = TensorAssembler(max_bytes=40)
    a.add([_chunk("w", (10,), 0, np.ones(10))])
    assert a.finish()["w"].shape == (10,)


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((1,) * 65, id="65-dims"),
        pytest.param((1 << 62, 1 << 62, 0), id="zero-size-with-huge-dims"),
    ],
)
def test_assembler_unrepresentable_shape_is_invalid_argument(shape: tuple[int, ...]) -> None:
    """Shapes numpy cannot build must be a domain error (INVALID_ARGUMENT), not a ValueError that
    the transport would report as UNKNOWN."""
    data = b"\x00" * (4 * math.prod(shape))
    a = TensorAssembler(max_bytes=1 << 20)
    with pytest.raises(errors.PsError) as e:
        a.add([_chunk("w", shape, 0, data)])
        a.finish()
    assert error_status(e.value).code in (grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])


# ------------------------------------------------------------------------------ sender to assembler round trip
def _roundtrip(tensors: dict[str, np.ndarray], chunk_bytes: int) -> tuple[dict[str, np.ndarray], int]:
    a = TensorAssembler(max_bytes=1 << 30)
    messages = 0
    for group in wire.chunk_groups(tensors, chunk_bytes):
        batch = unwire.decode_push_request(wire.join(wire.push_request_parts("r", 0, 1, 0, group, False))).tensors
        messages += 1
        # A message's payload stays near chunk_bytes (at most one chunk past it).
        assert sum(len(c.data) for c in batch) < chunk_bytes + max(4, chunk_bytes) + 4
        a.add(batch)
    return {n: np.asarray(g) for n, g in a.finish().items()}, messages


def test_encode_small_tensors_share_one_message() -> None:
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float32)}
    out, messages = _roundtrip(tensors, 1 << 20)
    assert messages == 1
    assert list(out) == ["w", "b"]
    for n, t in tensors.items():
        assert out[n].tobytes() == t.tobytes() and out[n].shape == t.shape


def test_encode_multi_chunk_tensor() -> None:
    t = np.random.default_rng(0).normal(size=(300, 70)).astype(np.float32)  # 84000 bytes
    out, messages = _roundtrip({"big": t}, 4096)
    assert messages == math.ceil(t.nbytes / 4096)
    assert out["big"].tobytes() == t.tobytes() and out["big"].shape == t.shape


def test_encode_converts_other_dtypes_to_float32() -> None:
    t = np.linspace(0, 1, 7)  # float64
    out, _ = _roundtrip({"x": t}, 1 << 20)
    assert out["x"].dtype == np.float32
    assert out["x"].tobytes() == t.astype(np.float32).tobytes()


shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)


@settings(max_examples=60, deadline=None)
@given(
    shape_list=st.lists(shapes, min_size=1, max_size=4),
    chunk_bytes=st.integers(1, 600),
    seed=st.integers(0, 2**32 - 1),
)
def test_encode_assemble_round_trip(shape_list: list[tuple[int, ...]], chunk_bytes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tensors = {f"t{i}": rng.normal(size=s).astype(np.float32).reshape(s) for i, s in enumerate(shape_list)}
    out, _ = _roundtrip(tensors, chunk_bytes)
    assert list(out) == list(tensors)
    for n, t in tensors.items():
        assert out[n].shape == t.shape, n
        assert out[n].dtype == np.float32
        assert out[n].tobytes() == t.tobytes(), n


# ------------------------------------------------------------------------------ specs
def _full_proto(optimizer: pb.OptimizerSpec) -> pb.RunSpec:
    return pb.RunSpec(
        name="round-trip",
        model_spec_json='{"kind": "mlp", "hidden": [64]}',
        data_spec_json='{"kind": "digits"}',
        num_workers=3,
        staleness=2,
        optimizer=optimizer,
        aggregation=pb.AGGREGATION_SUM,
        iterations=17,
        params=[
            pb.ParamSpec(name="w", shape=[3, 4], dtype=pb.DATA_TYPE_FLOAT32, initializer=pb.INITIALIZER_NORMAL, scale=0.5),
            pb.ParamSpec(name="b", shape=[4], dtype=pb.DATA_TYPE_FLOAT32, initializer=pb.INITIALIZER_ZEROS, scale=0.0),
            pb.ParamSpec(name="c", shape=[2], dtype=pb.DATA_TYPE_FLOAT32, initializer=pb.INITIALIZER_CONSTANT, scale=2.0),
            pb.ParamSpec(name="u", shape=[1, 1, 5], dtype=pb.DATA_TYPE_FLOAT32, initializer=pb.INITIALIZER_UNIFORM, scale=0.1),
        ],
        seed=42,
        batch_size=16,
        eval_every=5,
        slowdown={1: 2.5, 2: 1.0},
    )


OPTIMIZER_PROTOS = [
    pytest.param(pb.OptimizerSpec(sgd=pb.SgdConfig(learning_rate=0.1, weight_decay=0.01)), id="sgd"),
    pytest.param(pb.OptimizerSpec(momentum=pb.MomentumConfig(learning_rate=0.1, momentum=0.9, nesterov=True,
                                                             weight_decay=0.001)), id="momentum"),
    pytest.param(pb.OptimizerSpec(adam=pb.AdamConfig(learning_rate=0.001, beta1=0.8, beta2=0.99, epsilon=1e-6,
                                                     weight_decay=0.02)), id="adam"),
    pytest.param(pb.OptimizerSpec(adagrad=pb.AdagradConfig(learning_rate=0.1, epsilon=1e-9,
                                                           initial_accumulator=0.1)), id="adagrad"),
]


@pytest.mark.parametrize("optimizer", OPTIMIZER_PROTOS)
def test_spec_proto_round_trip(optimizer: pb.OptimizerSpec) -> None:
    proto = _full_proto(optimizer)
    spec = spec_from_proto(proto)
    assert spec.num_workers == 3 and spec.staleness == 2 and spec.iterations == 17
    assert spec.aggregation is Aggregation.SUM and spec.seed == 42 and spec.slowdown == {1: 2.5, 2: 1.0}
    assert [p.name for p in spec.params] == ["w", "b", "c", "u"]
    assert spec.params[3] == ParamSpec("u", (1, 1, 5), Initializer.UNIFORM, 0.1)
    back = spec_to_proto(spec)
    assert back == proto
    assert spec_from_proto(back) == spec


def test_spec_from_proto_optimizer_fields() -> None:
    spec = spec_from_proto(_full_proto(pb.OptimizerSpec(
        momentum=pb.MomentumConfig(learning_rate=0.3, momentum=0.7, nesterov=True, weight_decay=0.01))))
    assert spec.optimizer == OptimizerConfig(OptimizerKind.MOMENTUM, 0.3, momentum=0.7, nesterov=True, weight_decay=0.01)


def test_spec_from_proto_defaults() -> None:
    """Unspecified enums and empty JSON fall back to the documented defaults."""
    proto = pb.RunSpec(num_workers=1, iterations=1, optimizer=pb.OptimizerSpec(sgd=pb.SgdConfig(learning_rate=1.0)),
                       params=[pb.ParamSpec(name="w", shape=[2])])
    spec = spec_from_proto(proto)
    assert spec.aggregation is Aggregation.MEAN
    assert spec.params[0].initializer is Initializer.ZEROS
    assert spec.model_spec_json == "{}" and spec.data_spec_json == "{}"


def test_spec_to_from_proto_round_trip_core_side() -> None:
    spec = RunSpec(
        name="core", num_workers=2, iterations=5, staleness=-1,
        params=(ParamSpec("a", (2, 2), Initializer.UNIFORM, 0.3),),
        optimizer=OptimizerConfig(OptimizerKind.ADAM, 0.01, beta1=0.5, beta2=0.9, epsilon=1e-5, weight_decay=0.1),
        aggregation=Aggregation.MEAN, model_spec_json='{"kind": "linear"}', data_spec_json="{}",
        seed=9, batch_size=8, eval_every=2, slowdown={0: 3.0},
    )
    assert spec_from_proto(spec_to_proto(spec)) == spec


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda s: s.params[0].__setattr__("dtype", pb.DATA_TYPE_FLOAT16), "FLOAT32"),
        (lambda s: s.ClearField("optimizer"), "optimizer"),
        (lambda s: s.__setattr__("aggregation", 7), "aggregation"),
        (lambda s: s.params[0].__setattr__("initializer", 9), "initializer"),
    ],
    ids=["param-dtype", "no-optimizer", "bad-aggregation", "bad-initializer"],
)
def test_spec_from_proto_rejects(mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    proto = _full_proto(OPTIMIZER_PROTOS[0].values[0])
    mutate(proto)
    with pytest.raises(InvalidArgument) as e:
        spec_from_proto(proto)
    assert match in str(e.value)


# ------------------------------------------------------------------------------ statuses
@pytest.mark.parametrize(
    "cls, code, reason",
    [
        (errors.NotFound, grpc.StatusCode.NOT_FOUND, pb.ERROR_REASON_RUN_NOT_FOUND),
        (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, pb.ERROR_REASON_INVALID_REQUEST),
        (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, pb.ERROR_REASON_TOO_LARGE),
        (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, pb.ERROR_REASON_UNSPECIFIED),
        (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE, pb.ERROR_REASON_CLOCK_OUT_OF_RANGE),
        (errors.WaitTimeout, grpc.StatusCode.DEADLINE_EXCEEDED, pb.ERROR_REASON_WAIT_TIMEOUT),
        (errors.ShuttingDown, grpc.StatusCode.UNAVAILABLE, pb.ERROR_REASON_SHUTTING_DOWN),
        (errors.Malformed, grpc.StatusCode.INTERNAL, pb.ERROR_REASON_MALFORMED_MESSAGE),
    ],
)
def test_error_status(cls: type[errors.PsError], code: grpc.StatusCode, reason: int) -> None:
    status = error_status(cls("what to fix"))
    assert (status.code, status.message, status.error.reason) == (code.value[0], "what to fix", reason)

    class Sub(cls):  # type: ignore[misc, valid-type]
        pass

    assert error_status(Sub("x")).code == code.value[0]  # subclasses keep their base's code


def test_error_status_carries_the_facts() -> None:
    status = error_status(errors.FailedPrecondition("ahead", errors.Reason.CLOCK_AHEAD, next_clock=7))
    assert status.error.reason == pb.ERROR_REASON_CLOCK_AHEAD and status.error.next_clock == 7
    status = error_status(errors.FailedPrecondition("stopped", errors.Reason.RUN_NOT_RUNNING, run_state="stopped"))
    assert status.error.run_state == pb.RUN_STATE_STOPPED
    status = error_status(errors.WaitTimeout("slow", needed_min_clock=3, ranks_behind=[1, 2]))
    assert (status.error.needed_min_clock, list(status.error.ranks_behind)) == (3, [1, 2])
    assert error_status(errors.PsError("bare")).code == grpc.StatusCode.INTERNAL.value[0]


def test_every_reason_is_in_the_contract_and_back() -> None:
    """The core's reasons and the proto's ErrorReason are the same set of names."""
    ours = {r.name for r in errors.Reason}
    theirs = {name.removeprefix("ERROR_REASON_") for name in pb.ErrorReason.keys()}
    assert ours == theirs


def test_small_model_gradients_are_gathered_flat(store: ParamStore) -> None:
    """Whole-array gradients of a small model come back laid out like ``store.flat`` (spec order,
    whatever the dict's order); pieces or a large model give None (checked tensor by tensor)."""
    assert all(np.shares_memory(a, store.flat) for a in store.params.values())
    w, b = np.arange(12, dtype=np.float32).reshape(3, 4), np.full(4, -1.0, np.float32)
    flat = store.check_gradient({"b": b, "w": w})
    assert flat is not None and flat.tolist() == [*w.reshape(-1).tolist(), *b.tolist()]
    assert store.check_gradient({"w": Pieces((3, 4), [(0, w.reshape(-1)[:5]), (5, w.reshape(-1)[5:])]), "b": b}) is None
    big = ParamStore((ParamSpec("v", (FLAT_MAX + 1,)),), seed=0)
    assert big.check_gradient({"v": np.zeros(FLAT_MAX + 1, np.float32)}) is None
