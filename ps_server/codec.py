"""Conversions between the wire (paramserver.v1 protobuf) and the core, as pure functions.

Also ``error_status``, the one mapping from a domain error to the status every transport sends
(code, message, ErrorInfo). Tensors: ``paramserver.v1.wire`` encodes the data plane's messages
and ``paramserver.v1.unwire`` decodes them; ``TensorAssembler`` puts decoded chunks (views of the
received bytes) back together, zero-copy when a tensor arrives in one chunk. No gRPC here:
transports are leaves above this.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from paramserver.v1 import compress, unwire, wire
from paramserver.v1 import paramserver_pb2 as pb

from .core import errors
from .core.history import ClockRecord
from .core.spec import (
    DEFAULT_LIMITS,
    OPTIMIZER_DEFAULTS,
    Aggregation,
    Initializer,
    Limits,
    OptimizerConfig,
    OptimizerKind,
    ParamSpec,
    RunSpec,
    check_sizes,
)
from .core.status import MetricPoint, RunEvent, RunState, RunStatus, WorkerState
from .core.tensors import Gradient, Pieces, Rows

__all__ = [
    "TensorAssembler",
    "error_status",
    "point_from_proto",
    "point_to_proto",
    "record_to_proto",
    "run_state_to_proto",
    "run_to_proto",
    "spec_from_proto",
    "spec_to_proto",
]


# ------------------------------------------------------------------------------------- errors
_MAX_MESSAGE = 1024
MAX_RANKS_BEHIND = 32
"""ErrorInfo.ranks_behind names at most this many ranks (a status must fit gRPC's trailer limit)."""


def error_status(exc: errors.PsError) -> pb.Status:
    """What a refusal says on every transport: status code, message, and the facts for programs."""
    info = pb.ErrorInfo(reason=pb.ErrorReason.Value(f"ERROR_REASON_{exc.reason.name}"))
    if exc.next_clock is not None:
        info.next_clock = exc.next_clock
    if exc.run_state:
        info.run_state = _RUN_STATE[RunState(exc.run_state)]
    if exc.needed_min_clock is not None:
        info.needed_min_clock = max(0, exc.needed_min_clock)
    info.ranks_behind.extend(exc.ranks_behind[:MAX_RANKS_BEHIND])
    message = str(exc)  # short by construction (errors.listed, errors.quoted); this is the last guard
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + f"... ({len(message) - _MAX_MESSAGE} more characters)"
    return pb.Status(code=exc.code, message=message, error=info)


# ------------------------------------------------------------------------------------- tensors
_F32 = wire.F32
_I64 = wire.I64
_FLOAT32 = pb.DATA_TYPE_FLOAT32


def _bad_gradient(message: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(message, errors.Reason.INVALID_GRADIENT)



class TensorAssembler:
    """Collects the chunks of one push; ``finish`` returns the tensors and the payload size.

    Nothing is copied: a tensor that arrives in one chunk is a view of that message's bytes, one
    that arrives in several is ``Pieces``, views at their offsets (the core applies them block by
    block). In a run with compression (``dtype``, ``sparse``) half-precision values are converted
    to float32 and sparse chunks scattered into a zeroed tensor. Raises InvalidArgument for
    malformed chunks and ResourceExhausted past ``max_bytes``, before any of it reaches the run.
    """

    def __init__(self, max_bytes: int, dtype: int = _FLOAT32, sparse: bool = False) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.dtype = dtype
        self.sparse = sparse
        self._itemsize = wire.WIRE_DTYPES[dtype].itemsize
        self._tensors: dict[str, Gradient] = {}
        self._filled: dict[str, int] = {}
        self._declared = 0
        self._rows: dict[str, list[Rows]] = {}
        self._last_index: dict[str, int] = {}  # sparse tensors: the last position filled

    def add(self, chunks: Iterable[unwire.ChunkLike]) -> None:
        tensors = self._tensors
        for chunk in chunks:
            data = chunk.data  # a view of the request's bytes (wire), not a copy
            name = chunk.name
            if chunk.dtype != self.dtype:
                got = pb.DataType.Name(chunk.dtype) if chunk.dtype in pb.DataType.values() else chunk.dtype
                raise _bad_gradient(f"tensor {errors.quoted(name)} has dtype {got}; this run's pushes carry "
                                    f"{pb.DataType.Name(self.dtype)}" + (" (its compression)" if self.dtype != _FLOAT32 else ""))
            n_bytes = len(data)
            if n_bytes % self._itemsize:
                raise _bad_gradient(f"tensor {errors.quoted(name)}: chunk of {n_bytes} bytes is not a whole number of "
                                    f"{compress.wire_name(self.dtype)}")
            self.nbytes += n_bytes
            if self.nbytes > self.max_bytes:
                tensors.clear()  # drop what was buffered: the rest of the push is only counted
                raise errors.ResourceExhausted(
                    f"push carries more than {self.max_bytes} bytes, more than this run's gradient can be"
                )
            shape = tuple(chunk.shape)
            if self.dtype == _FLOAT32:
                values = np.frombuffer(data, _F32)
            else:
                values = np.empty(n_bytes // self._itemsize, _F32)
                compress.decode_into(data, self.dtype, values)
            if chunk.row_ids:
                self._add_rows(name, shape, chunk.offset, chunk.row_ids, values)
                continue
            if name in self._rows:
                raise _bad_gradient(f"tensor {errors.quoted(name)} came as rows and as a flat slice: send a table's "
                                    "gradient one way")
            indices = chunk.indices
            if name not in tensors:
                self._declare(name, shape)
                total = math.prod(shape)
                if indices:
                    tensors[name] = np.zeros(shape, _F32)
                    self._last_index[name] = -1
                elif values.nbytes == 4 * total and chunk.offset == 0:  # the whole tensor in one chunk
                    tensors[name] = values.reshape(shape)
                    self._filled[name] = total
                    continue
                else:
                    tensors[name] = Pieces(shape, [])
                    self._filled[name] = 0
            if (name in self._last_index) != bool(indices):
                raise _bad_gradient(f"tensor {errors.quoted(name)} came as sparse and as dense chunks: send it one way")
            if indices:
                self._add_sparse(name, shape, chunk.offset, indices, values)
                continue
            pieces = tensors[name]
            size = math.prod(pieces.shape)
            if shape != pieces.shape:
                raise _bad_gradient(f"chunks of tensor {errors.quoted(name)} disagree on its shape")
            filled = self._filled[name]
            n = values.size
            if chunk.offset != filled or filled + n > size or not isinstance(pieces, Pieces):
                raise _bad_gradient(
                    f"tensor {errors.quoted(name)}: chunk at offset {chunk.offset} with {n} elements, expected offset "
                    f"{filled} of {size}: send chunks in order, covering the tensor once"
                )
            if n:
                pieces.parts.append((filled, values))
                pieces.size += n
            self._filled[name] = filled + n

    def _declare(self, name: str, shape: tuple[int, ...]) -> None:
        """The first chunk of tensor ``name`` says its shape: checked before anything is allocated."""
        if len(shape) > 32:
            raise _bad_gradient(f"tensor {errors.quoted(name)} has {len(shape)} dimensions: send the parameter's shape")
        if shape and min(shape) < 0:
            raise _bad_gradient(f"tensor {errors.quoted(name)} has a negative dimension in shape {list(shape)}")
        total = math.prod(shape)
        if total == 0 and any(4 * d > self.max_bytes for d in shape):
            raise _bad_gradient(f"tensor {errors.quoted(name)} has shape {list(shape)}: send the parameter's shape")
        self._declared += 4 * total
        if self._declared > self.max_bytes:
            raise errors.ResourceExhausted(
                f"tensor {errors.quoted(name)} declares shape {list(shape)}, more than this run's gradient can be"
            )

    def _add_sparse(self, name: str, shape: tuple[int, ...], offset: int, indices: bytes | memoryview,
                    values: np.ndarray) -> None:
        """A sparse chunk (``TensorChunk.indices``): its values scattered into the zeroed tensor."""
        quoted = errors.quoted(name)
        if not self.sparse:
            raise _bad_gradient(f"tensor {quoted} came as a sparse chunk (indices), but this run's pushes are dense "
                                "(no top-k compression)")
        dense = self._tensors[name]
        assert isinstance(dense, np.ndarray)
        if shape != dense.shape:
            raise _bad_gradient(f"chunks of tensor {quoted} disagree on its shape")
        if len(indices) & 3 or len(indices) // 4 != values.size or offset:
            raise _bad_gradient(f"tensor {quoted}: a sparse chunk needs offset 0 and one uint32 index (4 bytes) per "
                                f"value; it has offset {offset}, {len(indices)} bytes of indices, {values.size} values")
        self.nbytes += len(indices)
        ids = np.frombuffer(indices, wire.U32)
        if not ids.size:
            return
        last = self._last_index[name]
        if int(ids[0]) <= last or int(ids[-1]) >= dense.size or (ids.size > 1 and not (ids[1:] > ids[:-1]).all()):
            raise _bad_gradient(f"tensor {quoted}: a sparse chunk's indices must increase strictly (across the "
                                f"tensor's chunks too) and stay below its size {dense.size}")
        self._last_index[name] = int(ids[-1])
        dense.reshape(-1)[ids] = values

    def _add_rows(self, name: str, shape: tuple[int, ...], offset: int, row_ids: bytes | memoryview,
                  values: np.ndarray) -> None:
        """A chunk of whole rows of a table (``TensorChunk.row_ids``); checked against the
        table when the run looks at the gradient (``ParamStore.check_gradient``)."""
        quoted = errors.quoted(name)
        if name in self._tensors:
            raise _bad_gradient(f"tensor {quoted} came as rows and as a flat slice: send a table's gradient one way")
        if len(row_ids) & 7:
            raise _bad_gradient(f"tensor {quoted}: row_ids of {len(row_ids)} bytes are not whole int64s (8 bytes each)")
        if len(shape) != 2 or min(shape) < 1 or offset:
            raise _bad_gradient(f"tensor {quoted}: rows of a table need the table's shape (rows, dim) and offset 0, got "
                                f"shape {list(shape)} and offset {offset}")
        self.nbytes += len(row_ids)
        if self.nbytes > self.max_bytes:
            self._tensors.clear()
            self._rows.clear()
            raise errors.ResourceExhausted(f"push carries more than {self.max_bytes} bytes, more than this run's "
                                           "gradient can be")
        ids = np.frombuffer(row_ids, _I64)
        if values.size != ids.size * shape[1]:
            raise _bad_gradient(f"tensor {quoted}: {ids.size} row ids need {ids.size * shape[1]} values "
                                f"(dim {shape[1]}), the chunk has {values.size}")
        parts = self._rows.setdefault(name, [])
        if parts and parts[0].shape != shape:
            raise _bad_gradient(f"chunks of tensor {quoted} disagree on its shape")
        parts.append(Rows(ids, values.reshape(ids.size, shape[1]), shape))

    def finish(self) -> dict[str, Gradient]:
        for name, parts in self._rows.items():
            self._tensors[name] = Rows.concat(parts, parts[0].shape)
        for name, g in self._tensors.items():
            if isinstance(g, Rows) or name in self._last_index:
                continue
            size = math.prod(g.shape)
            if self._filled[name] != size:
                raise _bad_gradient(
                    f"tensor {errors.quoted(name)} is incomplete: {self._filled[name]} of {size} elements arrived"
                )
        return self._tensors


# ------------------------------------------------------------------------------------- specs
_INIT = {
    pb.INITIALIZER_ZEROS: Initializer.ZEROS,
    pb.INITIALIZER_CONSTANT: Initializer.CONSTANT,
    pb.INITIALIZER_NORMAL: Initializer.NORMAL,
    pb.INITIALIZER_UNIFORM: Initializer.UNIFORM,
    pb.INITIALIZER_UNSPECIFIED: Initializer.ZEROS,
}
_INIT_PB = {v: k for k, v in _INIT.items() if k != pb.INITIALIZER_UNSPECIFIED}
_AGG = {pb.AGGREGATION_UNSPECIFIED: Aggregation.MEAN, pb.AGGREGATION_MEAN: Aggregation.MEAN, pb.AGGREGATION_SUM: Aggregation.SUM}
_AGG_PB = {Aggregation.MEAN: pb.AGGREGATION_MEAN, Aggregation.SUM: pb.AGGREGATION_SUM}
_WIRE_DTYPE = {pb.DATA_TYPE_UNSPECIFIED: "float32", pb.DATA_TYPE_FLOAT32: "float32",
               pb.DATA_TYPE_FLOAT16: "float16", pb.DATA_TYPE_BFLOAT16: "bfloat16"}
WIRE_DTYPE_PB = {"float32": pb.DATA_TYPE_FLOAT32, "float16": pb.DATA_TYPE_FLOAT16, "bfloat16": pb.DATA_TYPE_BFLOAT16}
"""A run's ``wire_dtype`` as the DataType its pushes and pulls carry."""


def _bad_spec(message: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(message, errors.Reason.INVALID_SPEC)


_FIELD = {("ftrl", "beta"): "ftrl_beta"}
"""An optimizer message's field whose ``OptimizerConfig`` name differs (Adam has a beta1 already)."""


def _optimizer_from_proto(o: pb.OptimizerSpec) -> OptimizerConfig:
    """By name: the oneof field is the kind, its message's fields are ``OptimizerConfig``'s."""
    name = o.WhichOneof("kind")
    if name is None:
        raise _bad_spec(f"optimizer is unset: choose {', '.join(k.value for k in OptimizerKind)}")
    kind, config = OptimizerKind(name), getattr(o, name)
    defaults = OPTIMIZER_DEFAULTS.get(kind, {})
    values = {_FIELD.get((name, f.name), f.name): getattr(config, f.name) for f in config.DESCRIPTOR.fields}
    return OptimizerConfig(kind, **{k: v or defaults.get(k, v) for k, v in values.items()})


def _optimizer_to_proto(c: OptimizerConfig) -> pb.OptimizerSpec:
    out = pb.OptimizerSpec()
    config = getattr(out, c.kind.value)
    config.SetInParent()
    for f in config.DESCRIPTOR.fields:
        setattr(config, f.name, getattr(c, _FIELD.get((c.kind.value, f.name), f.name)))
    return out


def spec_from_proto(s: pb.RunSpec, limits: Limits = DEFAULT_LIMITS) -> RunSpec:
    """The core's spec; its counts are checked against ``limits`` before anything is built of them."""
    check_sizes(limits, workers=s.num_workers, tensors=len(s.params), slowdowns=len(s.slowdown),
                json_bytes=max(len(s.model_spec_json), len(s.data_spec_json)), iterations=s.iterations)
    params = []
    for p in s.params:
        if p.dtype not in (pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_UNSPECIFIED):
            raise _bad_spec(f"param {errors.quoted(p.name)}: only DATA_TYPE_FLOAT32 parameters are stored")
        if p.initializer not in _INIT:
            raise _bad_spec(f"param {errors.quoted(p.name)}: unknown initializer {p.initializer}")
        params.append(ParamSpec(p.name, tuple(p.shape), _INIT[p.initializer], p.scale, table=p.table))
    if s.aggregation not in _AGG:
        raise _bad_spec(f"unknown aggregation {s.aggregation}")
    if s.compression.dtype not in _WIRE_DTYPE:
        raise _bad_spec(f"compression dtype {s.compression.dtype}: use DATA_TYPE_FLOAT32, DATA_TYPE_FLOAT16 or "
                        "DATA_TYPE_BFLOAT16")
    return RunSpec(
        name=s.name,
        num_workers=s.num_workers,
        iterations=s.iterations,
        params=tuple(params),
        staleness=s.staleness,
        optimizer=_optimizer_from_proto(s.optimizer),
        aggregation=_AGG[s.aggregation],
        model_spec_json=s.model_spec_json or "{}",
        data_spec_json=s.data_spec_json or "{}",
        seed=s.seed,
        batch_size=s.batch_size,
        eval_every=s.eval_every,
        slowdown=dict(s.slowdown),
        requires=tuple(s.requires),
        wire_dtype=_WIRE_DTYPE[s.compression.dtype],
        topk_ratio=s.compression.topk_ratio,
        staleness_aware_lr=s.staleness_aware_lr,
        staleness_schedule=tuple((step.from_clock, step.staleness) for step in s.staleness_schedule),
    )


def spec_to_proto(s: RunSpec) -> pb.RunSpec:
    return pb.RunSpec(
        name=s.name,
        model_spec_json=s.model_spec_json,
        data_spec_json=s.data_spec_json,
        num_workers=s.num_workers,
        staleness=s.staleness,
        optimizer=_optimizer_to_proto(s.optimizer),
        aggregation=_AGG_PB[s.aggregation],
        iterations=s.iterations,
        params=[
            pb.ParamSpec(name=p.name, shape=p.shape, dtype=pb.DATA_TYPE_FLOAT32,
                         initializer=_INIT_PB[p.initializer], scale=p.scale, table=p.table)
            for p in s.params
        ],
        seed=s.seed,
        batch_size=s.batch_size,
        eval_every=s.eval_every,
        slowdown=dict(s.slowdown),
        requires=s.requires,
        compression=pb.Compression(dtype=WIRE_DTYPE_PB[s.wire_dtype], topk_ratio=s.topk_ratio)
        if s.wire_dtype != "float32" or s.topk_ratio else None,
        staleness_aware_lr=s.staleness_aware_lr,
        staleness_schedule=[pb.StalenessStep(from_clock=a, staleness=b) for a, b in s.staleness_schedule],
    )


# ------------------------------------------------------------------------------------- status
_RUN_STATE: dict[RunState, pb.RunState] = {
    RunState.PENDING: pb.RUN_STATE_PENDING,
    RunState.RUNNING: pb.RUN_STATE_RUNNING,
    RunState.COMPLETED: pb.RUN_STATE_COMPLETED,
    RunState.STOPPED: pb.RUN_STATE_STOPPED,
    RunState.FAILED: pb.RUN_STATE_FAILED,
}
_WORKER_STATE = {
    WorkerState.VACANT: pb.WORKER_STATE_VACANT,
    WorkerState.ACTIVE: pb.WORKER_STATE_ACTIVE,
    WorkerState.DONE: pb.WORKER_STATE_DONE,
    WorkerState.EVICTED: pb.WORKER_STATE_EVICTED,
    WorkerState.STOPPED: pb.WORKER_STATE_STOPPED,
}


def run_state_to_proto(state: RunState) -> pb.RunState:
    return _RUN_STATE[state]


def worker_state_to_proto(state: WorkerState) -> pb.WorkerState:
    return _WORKER_STATE[state]


def ts(t: float | None) -> Timestamp | None:
    if not t:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def _from_ts(ts: Timestamp) -> float:
    return float(ts.ToNanoseconds()) / 1e9


def point_to_proto(p: MetricPoint) -> pb.MetricPoint:
    return pb.MetricPoint(
        rank=p.rank, clock=p.clock, time=ts(p.time), loss=p.loss, eval=p.eval,
        eval_loss=p.eval_loss, eval_accuracy=p.eval_accuracy, samples=p.samples, step_seconds=p.step_seconds,
        eval_auc=p.eval_auc,
    )


def point_from_proto(p: pb.MetricPoint, now: float) -> MetricPoint:
    return MetricPoint(
        rank=p.rank, clock=p.clock, time=_from_ts(p.time) if p.HasField("time") else now, loss=p.loss,
        eval=p.eval, eval_loss=p.eval_loss, eval_accuracy=p.eval_accuracy, samples=p.samples,
        step_seconds=p.step_seconds, eval_auc=p.eval_auc if p.eval else float("nan"),
    )


def record_to_proto(r: ClockRecord) -> pb.ClockRecord:
    kind = pb.ClockRecord.KIND_PULL if r.kind == "pull" else pb.ClockRecord.KIND_PUSH
    return pb.ClockRecord(kind=kind, rank=r.rank, clock=r.clock, min_clock=r.min_clock, time=ts(r.time))


def event_to_proto(e: RunEvent) -> pb.RunEvent:
    return pb.RunEvent(time=ts(e.time), kind=e.kind, rank=e.rank, message=e.message)


def run_to_proto(spec: RunSpec, s: RunStatus) -> pb.Run:
    c = s.counters
    return pb.Run(
        run_id=s.run_id,
        spec=spec_to_proto(spec),
        state=_RUN_STATE[s.state],
        message=s.message,
        created=ts(s.created),
        started=ts(s.started),
        finished=ts(s.finished),
        workers=[
            pb.WorkerStatus(
                rank=w.rank, state=_WORKER_STATE[w.state], incarnation=w.incarnation, clock=w.clock,
                worker_name=w.worker_name, last_seen=ts(w.last_seen), pushes=w.pushes,
                waiting=w.waiting_for_clock is not None, waiting_for_clock=w.waiting_for_clock or 0,
                pulls_skipped=w.pulls_skipped,
                data_plane=w.data_plane,
            )
            for w in s.workers
        ],
        min_clock=s.min_clock,
        max_clock=s.max_clock,
        counters=pb.RunCounters(
            pushes_applied=c.pushes_applied, pushes_duplicate=c.pushes_duplicate,
            pushes_rejected=c.pushes_rejected, pulls_served=c.pulls_served, pulls_parked=c.pulls_parked,
            pulls_skipped=c.pulls_skipped, bytes_pushed=c.bytes_pushed, bytes_pulled=c.bytes_pulled,
            updates_applied=c.updates_applied, evictions=c.evictions, staleness_sum=c.staleness_sum,
            staleness_max=c.staleness_max, parked_seconds=c.parked_seconds, rows_pulled=c.rows_pulled,
            rows_pushed=c.rows_pushed, lr_scaled=c.lr_scaled, lr_scale_sum=c.lr_scale_sum,
        ),
        last_eval=point_to_proto(s.last_eval) if s.last_eval else None,
        waiting_for=s.waiting_for,
        active_workers=s.active_workers,
        tightest_staleness=s.bounds[0] if s.bounds else None,
        loosest_staleness=s.bounds[1] if s.bounds else None,
    )

