import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_FLOAT16: _ClassVar[DataType]
    DATA_TYPE_BFLOAT16: _ClassVar[DataType]

class Initializer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INITIALIZER_UNSPECIFIED: _ClassVar[Initializer]
    INITIALIZER_ZEROS: _ClassVar[Initializer]
    INITIALIZER_CONSTANT: _ClassVar[Initializer]
    INITIALIZER_NORMAL: _ClassVar[Initializer]
    INITIALIZER_UNIFORM: _ClassVar[Initializer]

class Aggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_UNSPECIFIED: _ClassVar[Aggregation]
    AGGREGATION_MEAN: _ClassVar[Aggregation]
    AGGREGATION_SUM: _ClassVar[Aggregation]

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_PENDING: _ClassVar[RunState]
    RUN_STATE_RUNNING: _ClassVar[RunState]
    RUN_STATE_COMPLETED: _ClassVar[RunState]
    RUN_STATE_STOPPED: _ClassVar[RunState]
    RUN_STATE_FAILED: _ClassVar[RunState]

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    WORKER_STATE_VACANT: _ClassVar[WorkerState]
    WORKER_STATE_ACTIVE: _ClassVar[WorkerState]
    WORKER_STATE_DONE: _ClassVar[WorkerState]
    WORKER_STATE_EVICTED: _ClassVar[WorkerState]
    WORKER_STATE_STOPPED: _ClassVar[WorkerState]

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_RUN_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_SPEC: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_GRADIENT: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_REQUEST: _ClassVar[ErrorReason]
    ERROR_REASON_MALFORMED_MESSAGE: _ClassVar[ErrorReason]
    ERROR_REASON_TOO_LARGE: _ClassVar[ErrorReason]
    ERROR_REASON_STALE_INCARNATION: _ClassVar[ErrorReason]
    ERROR_REASON_CLOCK_AHEAD: _ClassVar[ErrorReason]
    ERROR_REASON_STALENESS_BOUND: _ClassVar[ErrorReason]
    ERROR_REASON_RUN_NOT_RUNNING: _ClassVar[ErrorReason]
    ERROR_REASON_NO_VACANT_RANK: _ClassVar[ErrorReason]
    ERROR_REASON_NO_DATA_DIR: _ClassVar[ErrorReason]
    ERROR_REASON_CLOCK_OUT_OF_RANGE: _ClassVar[ErrorReason]
    ERROR_REASON_WAIT_TIMEOUT: _ClassVar[ErrorReason]
    ERROR_REASON_SHUTTING_DOWN: _ClassVar[ErrorReason]
    ERROR_REASON_STREAM_LIMIT: _ClassVar[ErrorReason]
    ERROR_REASON_UNSUPPORTED: _ClassVar[ErrorReason]
    ERROR_REASON_UNAUTHENTICATED: _ClassVar[ErrorReason]
    ERROR_REASON_RUN_NOT_FINISHED: _ClassVar[ErrorReason]
    ERROR_REASON_SHARD_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_CANNOT_TRAIN: _ClassVar[ErrorReason]

class LeaveReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEAVE_REASON_UNSPECIFIED: _ClassVar[LeaveReason]
    LEAVE_REASON_DONE: _ClassVar[LeaveReason]
    LEAVE_REASON_SHUTDOWN: _ClassVar[LeaveReason]
    LEAVE_REASON_FAILED: _ClassVar[LeaveReason]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_FLOAT16: DataType
DATA_TYPE_BFLOAT16: DataType
INITIALIZER_UNSPECIFIED: Initializer
INITIALIZER_ZEROS: Initializer
INITIALIZER_CONSTANT: Initializer
INITIALIZER_NORMAL: Initializer
INITIALIZER_UNIFORM: Initializer
AGGREGATION_UNSPECIFIED: Aggregation
AGGREGATION_MEAN: Aggregation
AGGREGATION_SUM: Aggregation
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_PENDING: RunState
RUN_STATE_RUNNING: RunState
RUN_STATE_COMPLETED: RunState
RUN_STATE_STOPPED: RunState
RUN_STATE_FAILED: RunState
WORKER_STATE_UNSPECIFIED: WorkerState
WORKER_STATE_VACANT: WorkerState
WORKER_STATE_ACTIVE: WorkerState
WORKER_STATE_DONE: WorkerState
WORKER_STATE_EVICTED: WorkerState
WORKER_STATE_STOPPED: WorkerState
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_RUN_NOT_FOUND: ErrorReason
ERROR_REASON_INVALID_SPEC: ErrorReason
ERROR_REASON_INVALID_GRADIENT: ErrorReason
ERROR_REASON_INVALID_REQUEST: ErrorReason
ERROR_REASON_MALFORMED_MESSAGE: ErrorReason
ERROR_REASON_TOO_LARGE: ErrorReason
ERROR_REASON_STALE_INCARNATION: ErrorReason
ERROR_REASON_CLOCK_AHEAD: ErrorReason
ERROR_REASON_STALENESS_BOUND: ErrorReason
ERROR_REASON_RUN_NOT_RUNNING: ErrorReason
ERROR_REASON_NO_VACANT_RANK: ErrorReason
ERROR_REASON_NO_DATA_DIR: ErrorReason
ERROR_REASON_CLOCK_OUT_OF_RANGE: ErrorReason
ERROR_REASON_WAIT_TIMEOUT: ErrorReason
ERROR_REASON_SHUTTING_DOWN: ErrorReason
ERROR_REASON_STREAM_LIMIT: ErrorReason
ERROR_REASON_UNSUPPORTED: ErrorReason
ERROR_REASON_UNAUTHENTICATED: ErrorReason
ERROR_REASON_RUN_NOT_FINISHED: ErrorReason
ERROR_REASON_SHARD_UNAVAILABLE: ErrorReason
ERROR_REASON_CANNOT_TRAIN: ErrorReason
LEAVE_REASON_UNSPECIFIED: LeaveReason
LEAVE_REASON_DONE: LeaveReason
LEAVE_REASON_SHUTDOWN: LeaveReason
LEAVE_REASON_FAILED: LeaveReason

class TensorChunk(_message.Message):
    __slots__ = ("name", "shape", "dtype", "offset", "data", "row_ids", "indices", "padding")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ROW_IDS_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DataType
    offset: int
    data: bytes
    row_ids: bytes
    indices: bytes
    padding: bytes
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DataType, str]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., row_ids: _Optional[bytes] = ..., indices: _Optional[bytes] = ..., padding: _Optional[bytes] = ...) -> None: ...

class ParamSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype", "initializer", "scale", "table")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INITIALIZER_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DataType
    initializer: Initializer
    scale: float
    table: bool
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DataType, str]] = ..., initializer: _Optional[_Union[Initializer, str]] = ..., scale: _Optional[float] = ..., table: _Optional[bool] = ...) -> None: ...

class SgdConfig(_message.Message):
    __slots__ = ("learning_rate", "weight_decay")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    weight_decay: float
    def __init__(self, learning_rate: _Optional[float] = ..., weight_decay: _Optional[float] = ...) -> None: ...

class MomentumConfig(_message.Message):
    __slots__ = ("learning_rate", "momentum", "nesterov", "weight_decay")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    NESTEROV_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    momentum: float
    nesterov: bool
    weight_decay: float
    def __init__(self, learning_rate: _Optional[float] = ..., momentum: _Optional[float] = ..., nesterov: _Optional[bool] = ..., weight_decay: _Optional[float] = ...) -> None: ...

class AdamConfig(_message.Message):
    __slots__ = ("learning_rate", "beta1", "beta2", "epsilon", "weight_decay")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    beta1: float
    beta2: float
    epsilon: float
    weight_decay: float
    def __init__(self, learning_rate: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., epsilon: _Optional[float] = ..., weight_decay: _Optional[float] = ...) -> None: ...

class AdagradConfig(_message.Message):
    __slots__ = ("learning_rate", "epsilon", "initial_accumulator")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ACCUMULATOR_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    epsilon: float
    initial_accumulator: float
    def __init__(self, learning_rate: _Optional[float] = ..., epsilon: _Optional[float] = ..., initial_accumulator: _Optional[float] = ...) -> None: ...

class FtrlConfig(_message.Message):
    __slots__ = ("learning_rate", "beta", "l1", "l2")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    L1_FIELD_NUMBER: _ClassVar[int]
    L2_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    beta: float
    l1: float
    l2: float
    def __init__(self, learning_rate: _Optional[float] = ..., beta: _Optional[float] = ..., l1: _Optional[float] = ..., l2: _Optional[float] = ...) -> None: ...

class OptimizerSpec(_message.Message):
    __slots__ = ("sgd", "momentum", "adam", "adagrad", "ftrl")
    SGD_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    ADAM_FIELD_NUMBER: _ClassVar[int]
    ADAGRAD_FIELD_NUMBER: _ClassVar[int]
    FTRL_FIELD_NUMBER: _ClassVar[int]
    sgd: SgdConfig
    momentum: MomentumConfig
    adam: AdamConfig
    adagrad: AdagradConfig
    ftrl: FtrlConfig
    def __init__(self, sgd: _Optional[_Union[SgdConfig, _Mapping]] = ..., momentum: _Optional[_Union[MomentumConfig, _Mapping]] = ..., adam: _Optional[_Union[AdamConfig, _Mapping]] = ..., adagrad: _Optional[_Union[AdagradConfig, _Mapping]] = ..., ftrl: _Optional[_Union[FtrlConfig, _Mapping]] = ...) -> None: ...

class RunSpec(_message.Message):
    __slots__ = ("name", "model_spec_json", "data_spec_json", "num_workers", "staleness", "optimizer", "aggregation", "iterations", "params", "seed", "batch_size", "eval_every", "slowdown", "requires", "compression", "staleness_aware_lr", "staleness_schedule")
    class SlowdownEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    DATA_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    SLOWDOWN_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_AWARE_LR_FIELD_NUMBER: _ClassVar[int]
    STALENESS_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_spec_json: str
    data_spec_json: str
    num_workers: int
    staleness: int
    optimizer: OptimizerSpec
    aggregation: Aggregation
    iterations: int
    params: _containers.RepeatedCompositeFieldContainer[ParamSpec]
    seed: int
    batch_size: int
    eval_every: int
    slowdown: _containers.ScalarMap[int, float]
    requires: _containers.RepeatedScalarFieldContainer[str]
    compression: Compression
    staleness_aware_lr: bool
    staleness_schedule: _containers.RepeatedCompositeFieldContainer[StalenessStep]
    def __init__(self, name: _Optional[str] = ..., model_spec_json: _Optional[str] = ..., data_spec_json: _Optional[str] = ..., num_workers: _Optional[int] = ..., staleness: _Optional[int] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., aggregation: _Optional[_Union[Aggregation, str]] = ..., iterations: _Optional[int] = ..., params: _Optional[_Iterable[_Union[ParamSpec, _Mapping]]] = ..., seed: _Optional[int] = ..., batch_size: _Optional[int] = ..., eval_every: _Optional[int] = ..., slowdown: _Optional[_Mapping[int, float]] = ..., requires: _Optional[_Iterable[str]] = ..., compression: _Optional[_Union[Compression, _Mapping]] = ..., staleness_aware_lr: _Optional[bool] = ..., staleness_schedule: _Optional[_Iterable[_Union[StalenessStep, _Mapping]]] = ...) -> None: ...

class StalenessStep(_message.Message):
    __slots__ = ("from_clock", "staleness")
    FROM_CLOCK_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    from_clock: int
    staleness: int
    def __init__(self, from_clock: _Optional[int] = ..., staleness: _Optional[int] = ...) -> None: ...

class Compression(_message.Message):
    __slots__ = ("dtype", "topk_ratio")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOPK_RATIO_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    topk_ratio: float
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., topk_ratio: _Optional[float] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("rank", "state", "incarnation", "clock", "worker_name", "last_seen", "pushes", "waiting_for_clock", "waiting", "pulls_skipped", "data_plane")
    RANK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    WORKER_NAME_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_CLOCK_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    PULLS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    state: WorkerState
    incarnation: int
    clock: int
    worker_name: str
    last_seen: _timestamp_pb2.Timestamp
    pushes: int
    waiting_for_clock: int
    waiting: bool
    pulls_skipped: int
    data_plane: str
    def __init__(self, rank: _Optional[int] = ..., state: _Optional[_Union[WorkerState, str]] = ..., incarnation: _Optional[int] = ..., clock: _Optional[int] = ..., worker_name: _Optional[str] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., pushes: _Optional[int] = ..., waiting_for_clock: _Optional[int] = ..., waiting: _Optional[bool] = ..., pulls_skipped: _Optional[int] = ..., data_plane: _Optional[str] = ...) -> None: ...

class RunCounters(_message.Message):
    __slots__ = ("pushes_applied", "pushes_duplicate", "pushes_rejected", "pulls_served", "pulls_parked", "pulls_skipped", "bytes_pushed", "bytes_pulled", "updates_applied", "evictions", "staleness_sum", "staleness_max", "parked_seconds", "rows_pulled", "rows_pushed", "lr_scaled", "lr_scale_sum")
    PUSHES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    PUSHES_DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    PUSHES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    PULLS_SERVED_FIELD_NUMBER: _ClassVar[int]
    PULLS_PARKED_FIELD_NUMBER: _ClassVar[int]
    PULLS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    BYTES_PUSHED_FIELD_NUMBER: _ClassVar[int]
    BYTES_PULLED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_SUM_FIELD_NUMBER: _ClassVar[int]
    STALENESS_MAX_FIELD_NUMBER: _ClassVar[int]
    PARKED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_PULLED_FIELD_NUMBER: _ClassVar[int]
    ROWS_PUSHED_FIELD_NUMBER: _ClassVar[int]
    LR_SCALED_FIELD_NUMBER: _ClassVar[int]
    LR_SCALE_SUM_FIELD_NUMBER: _ClassVar[int]
    pushes_applied: int
    pushes_duplicate: int
    pushes_rejected: int
    pulls_served: int
    pulls_parked: int
    pulls_skipped: int
    bytes_pushed: int
    bytes_pulled: int
    updates_applied: int
    evictions: int
    staleness_sum: int
    staleness_max: int
    parked_seconds: float
    rows_pulled: int
    rows_pushed: int
    lr_scaled: int
    lr_scale_sum: float
    def __init__(self, pushes_applied: _Optional[int] = ..., pushes_duplicate: _Optional[int] = ..., pushes_rejected: _Optional[int] = ..., pulls_served: _Optional[int] = ..., pulls_parked: _Optional[int] = ..., pulls_skipped: _Optional[int] = ..., bytes_pushed: _Optional[int] = ..., bytes_pulled: _Optional[int] = ..., updates_applied: _Optional[int] = ..., evictions: _Optional[int] = ..., staleness_sum: _Optional[int] = ..., staleness_max: _Optional[int] = ..., parked_seconds: _Optional[float] = ..., rows_pulled: _Optional[int] = ..., rows_pushed: _Optional[int] = ..., lr_scaled: _Optional[int] = ..., lr_scale_sum: _Optional[float] = ...) -> None: ...

class MetricPoint(_message.Message):
    __slots__ = ("rank", "clock", "time", "loss", "eval", "eval_loss", "eval_accuracy", "samples", "step_seconds", "eval_auc")
    RANK_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EVAL_AUC_FIELD_NUMBER: _ClassVar[int]
    rank: int
    clock: int
    time: _timestamp_pb2.Timestamp
    loss: float
    eval: bool
    eval_loss: float
    eval_accuracy: float
    samples: int
    step_seconds: float
    eval_auc: float
    def __init__(self, rank: _Optional[int] = ..., clock: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., loss: _Optional[float] = ..., eval: _Optional[bool] = ..., eval_loss: _Optional[float] = ..., eval_accuracy: _Optional[float] = ..., samples: _Optional[int] = ..., step_seconds: _Optional[float] = ..., eval_auc: _Optional[float] = ...) -> None: ...

class RunEvent(_message.Message):
    __slots__ = ("time", "kind", "rank", "message")
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    kind: str
    rank: int
    message: str
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[str] = ..., rank: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("run_id", "spec", "state", "message", "created", "started", "finished", "workers", "min_clock", "max_clock", "counters", "last_eval", "waiting_for", "active_workers", "shard_map", "shards", "tightest_staleness", "loosest_staleness")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    MIN_CLOCK_FIELD_NUMBER: _ClassVar[int]
    MAX_CLOCK_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    LAST_EVAL_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    SHARD_MAP_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    TIGHTEST_STALENESS_FIELD_NUMBER: _ClassVar[int]
    LOOSEST_STALENESS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    spec: RunSpec
    state: RunState
    message: str
    created: _timestamp_pb2.Timestamp
    started: _timestamp_pb2.Timestamp
    finished: _timestamp_pb2.Timestamp
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    min_clock: int
    max_clock: int
    counters: RunCounters
    last_eval: MetricPoint
    waiting_for: str
    active_workers: int
    shard_map: ShardMap
    shards: _containers.RepeatedCompositeFieldContainer[ShardStatus]
    tightest_staleness: int
    loosest_staleness: int
    def __init__(self, run_id: _Optional[str] = ..., spec: _Optional[_Union[RunSpec, _Mapping]] = ..., state: _Optional[_Union[RunState, str]] = ..., message: _Optional[str] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., min_clock: _Optional[int] = ..., max_clock: _Optional[int] = ..., counters: _Optional[_Union[RunCounters, _Mapping]] = ..., last_eval: _Optional[_Union[MetricPoint, _Mapping]] = ..., waiting_for: _Optional[str] = ..., active_workers: _Optional[int] = ..., shard_map: _Optional[_Union[ShardMap, _Mapping]] = ..., shards: _Optional[_Iterable[_Union[ShardStatus, _Mapping]]] = ..., tightest_staleness: _Optional[int] = ..., loosest_staleness: _Optional[int] = ...) -> None: ...

class Piece(_message.Message):
    __slots__ = ("name", "row_start", "row_end")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROW_END_FIELD_NUMBER: _ClassVar[int]
    name: str
    row_start: int
    row_end: int
    def __init__(self, name: _Optional[str] = ..., row_start: _Optional[int] = ..., row_end: _Optional[int] = ...) -> None: ...

class Shard(_message.Message):
    __slots__ = ("index", "address", "data_port", "pieces", "shm_socket")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    SHM_SOCKET_FIELD_NUMBER: _ClassVar[int]
    index: int
    address: str
    data_port: int
    pieces: _containers.RepeatedCompositeFieldContainer[Piece]
    shm_socket: str
    def __init__(self, index: _Optional[int] = ..., address: _Optional[str] = ..., data_port: _Optional[int] = ..., pieces: _Optional[_Iterable[_Union[Piece, _Mapping]]] = ..., shm_socket: _Optional[str] = ...) -> None: ...

class ShardMap(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[Shard]
    def __init__(self, shards: _Optional[_Iterable[_Union[Shard, _Mapping]]] = ...) -> None: ...

class ShardStatus(_message.Message):
    __slots__ = ("index", "address", "reachable", "error", "bytes_held", "min_clock", "max_clock", "pushes_applied", "pushes_per_second", "rss_bytes", "state", "lineage", "held")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    MIN_CLOCK_FIELD_NUMBER: _ClassVar[int]
    MAX_CLOCK_FIELD_NUMBER: _ClassVar[int]
    PUSHES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    PUSHES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    index: int
    address: str
    reachable: bool
    error: str
    bytes_held: int
    min_clock: int
    max_clock: int
    pushes_applied: int
    pushes_per_second: float
    rss_bytes: int
    state: RunState
    lineage: int
    held: str
    def __init__(self, index: _Optional[int] = ..., address: _Optional[str] = ..., reachable: _Optional[bool] = ..., error: _Optional[str] = ..., bytes_held: _Optional[int] = ..., min_clock: _Optional[int] = ..., max_clock: _Optional[int] = ..., pushes_applied: _Optional[int] = ..., pushes_per_second: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., state: _Optional[_Union[RunState, str]] = ..., lineage: _Optional[int] = ..., held: _Optional[str] = ...) -> None: ...

class ErrorInfo(_message.Message):
    __slots__ = ("reason", "next_clock", "run_state", "needed_min_clock", "ranks_behind")
    REASON_FIELD_NUMBER: _ClassVar[int]
    NEXT_CLOCK_FIELD_NUMBER: _ClassVar[int]
    RUN_STATE_FIELD_NUMBER: _ClassVar[int]
    NEEDED_MIN_CLOCK_FIELD_NUMBER: _ClassVar[int]
    RANKS_BEHIND_FIELD_NUMBER: _ClassVar[int]
    reason: ErrorReason
    next_clock: int
    run_state: RunState
    needed_min_clock: int
    ranks_behind: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, reason: _Optional[_Union[ErrorReason, str]] = ..., next_clock: _Optional[int] = ..., run_state: _Optional[_Union[RunState, str]] = ..., needed_min_clock: _Optional[int] = ..., ranks_behind: _Optional[_Iterable[int]] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message", "error")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    error: ErrorInfo
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., error: _Optional[_Union[ErrorInfo, _Mapping]] = ...) -> None: ...

class PushGradientRequest(_message.Message):
    __slots__ = ("run_id", "rank", "incarnation", "clock", "tensors", "final", "loss", "then_pull", "param_version")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    THEN_PULL_FIELD_NUMBER: _ClassVar[int]
    PARAM_VERSION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    incarnation: int
    clock: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    final: bool
    loss: float
    then_pull: PullParamsRequest
    param_version: int
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., incarnation: _Optional[int] = ..., clock: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ..., final: _Optional[bool] = ..., loss: _Optional[float] = ..., then_pull: _Optional[_Union[PullParamsRequest, _Mapping]] = ..., param_version: _Optional[int] = ...) -> None: ...

class PushGradientResponse(_message.Message):
    __slots__ = ("clock", "duplicate", "min_clock", "run_state", "pulled", "staleness", "lr_scale")
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    MIN_CLOCK_FIELD_NUMBER: _ClassVar[int]
    RUN_STATE_FIELD_NUMBER: _ClassVar[int]
    PULLED_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    LR_SCALE_FIELD_NUMBER: _ClassVar[int]
    clock: int
    duplicate: bool
    min_clock: int
    run_state: RunState
    pulled: PullParamsResponse
    staleness: int
    lr_scale: float
    def __init__(self, clock: _Optional[int] = ..., duplicate: _Optional[bool] = ..., min_clock: _Optional[int] = ..., run_state: _Optional[_Union[RunState, str]] = ..., pulled: _Optional[_Union[PullParamsResponse, _Mapping]] = ..., staleness: _Optional[int] = ..., lr_scale: _Optional[float] = ...) -> None: ...

class PullParamsRequest(_message.Message):
    __slots__ = ("run_id", "rank", "incarnation", "clock", "names", "max_wait", "rows", "since_version", "since_lineage")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SINCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SINCE_LINEAGE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    incarnation: int
    clock: int
    names: _containers.RepeatedScalarFieldContainer[str]
    max_wait: _duration_pb2.Duration
    rows: _containers.RepeatedCompositeFieldContainer[TableRows]
    since_version: int
    since_lineage: int
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., incarnation: _Optional[int] = ..., clock: _Optional[int] = ..., names: _Optional[_Iterable[str]] = ..., max_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., rows: _Optional[_Iterable[_Union[TableRows, _Mapping]]] = ..., since_version: _Optional[int] = ..., since_lineage: _Optional[int] = ...) -> None: ...

class TableRows(_message.Message):
    __slots__ = ("name", "row_ids")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROW_IDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    row_ids: bytes
    def __init__(self, name: _Optional[str] = ..., row_ids: _Optional[bytes] = ...) -> None: ...

class PullParamsResponse(_message.Message):
    __slots__ = ("guaranteed_clock", "version", "tensors", "final", "run_state", "delta", "lineage", "staleness")
    GUARANTEED_CLOCK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    RUN_STATE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    guaranteed_clock: int
    version: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    final: bool
    run_state: RunState
    delta: bool
    lineage: int
    staleness: int
    def __init__(self, guaranteed_clock: _Optional[int] = ..., version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ..., final: _Optional[bool] = ..., run_state: _Optional[_Union[RunState, str]] = ..., delta: _Optional[bool] = ..., lineage: _Optional[int] = ..., staleness: _Optional[int] = ...) -> None: ...

class CheckpointRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class CheckpointRunResponse(_message.Message):
    __slots__ = ("path", "min_clock")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MIN_CLOCK_FIELD_NUMBER: _ClassVar[int]
    path: str
    min_clock: int
    def __init__(self, path: _Optional[str] = ..., min_clock: _Optional[int] = ...) -> None: ...

class CreateRunRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: RunSpec
    def __init__(self, spec: _Optional[_Union[RunSpec, _Mapping]] = ...) -> None: ...

class CreateRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[Run]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[Run, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteRunRequest(_message.Message):
    __slots__ = ("run_id", "force")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    force: bool
    def __init__(self, run_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class DeleteRunResponse(_message.Message):
    __slots__ = ("run", "left_behind")
    RUN_FIELD_NUMBER: _ClassVar[int]
    LEFT_BEHIND_FIELD_NUMBER: _ClassVar[int]
    run: Run
    left_behind: str
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ..., left_behind: _Optional[str] = ...) -> None: ...

class StopRunRequest(_message.Message):
    __slots__ = ("run_id", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class StopRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class UpdateRunRequest(_message.Message):
    __slots__ = ("run_id", "staleness")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    staleness: int
    def __init__(self, run_id: _Optional[str] = ..., staleness: _Optional[int] = ...) -> None: ...

class UpdateRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class WatchRunRequest(_message.Message):
    __slots__ = ("run_id", "interval")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    interval: _duration_pb2.Duration
    def __init__(self, run_id: _Optional[str] = ..., interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class WatchRunResponse(_message.Message):
    __slots__ = ("run", "events")
    RUN_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    run: Run
    events: _containers.RepeatedCompositeFieldContainer[RunEvent]
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ..., events: _Optional[_Iterable[_Union[RunEvent, _Mapping]]] = ...) -> None: ...

class GetMetricsRequest(_message.Message):
    __slots__ = ("run_id", "include_clock_records", "max_points")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CLOCK_RECORDS_FIELD_NUMBER: _ClassVar[int]
    MAX_POINTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    include_clock_records: bool
    max_points: int
    def __init__(self, run_id: _Optional[str] = ..., include_clock_records: _Optional[bool] = ..., max_points: _Optional[int] = ...) -> None: ...

class ClockRecord(_message.Message):
    __slots__ = ("kind", "rank", "clock", "min_clock", "time")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[ClockRecord.Kind]
        KIND_PULL: _ClassVar[ClockRecord.Kind]
        KIND_PUSH: _ClassVar[ClockRecord.Kind]
    KIND_UNSPECIFIED: ClockRecord.Kind
    KIND_PULL: ClockRecord.Kind
    KIND_PUSH: ClockRecord.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    MIN_CLOCK_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    kind: ClockRecord.Kind
    rank: int
    clock: int
    min_clock: int
    time: _timestamp_pb2.Timestamp
    def __init__(self, kind: _Optional[_Union[ClockRecord.Kind, str]] = ..., rank: _Optional[int] = ..., clock: _Optional[int] = ..., min_clock: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetMetricsResponse(_message.Message):
    __slots__ = ("points", "events", "clock_records")
    POINTS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    CLOCK_RECORDS_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedCompositeFieldContainer[MetricPoint]
    events: _containers.RepeatedCompositeFieldContainer[RunEvent]
    clock_records: _containers.RepeatedCompositeFieldContainer[ClockRecord]
    def __init__(self, points: _Optional[_Iterable[_Union[MetricPoint, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[RunEvent, _Mapping]]] = ..., clock_records: _Optional[_Iterable[_Union[ClockRecord, _Mapping]]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("worker_name", "run_id", "max_wait", "capabilities", "join_token")
    WORKER_NAME_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    worker_name: str
    run_id: str
    max_wait: _duration_pb2.Duration
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    join_token: str
    def __init__(self, worker_name: _Optional[str] = ..., run_id: _Optional[str] = ..., max_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., capabilities: _Optional[_Iterable[str]] = ..., join_token: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("run_id", "rank", "incarnation", "spec", "start_clock", "heartbeat_interval", "lease", "shard_map")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    START_CLOCK_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    SHARD_MAP_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    incarnation: int
    spec: RunSpec
    start_clock: int
    heartbeat_interval: _duration_pb2.Duration
    lease: _duration_pb2.Duration
    shard_map: ShardMap
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., incarnation: _Optional[int] = ..., spec: _Optional[_Union[RunSpec, _Mapping]] = ..., start_clock: _Optional[int] = ..., heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., lease: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., shard_map: _Optional[_Union[ShardMap, _Mapping]] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("assignment", "server_generation", "data_port", "shm_socket", "max_wait")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    SERVER_GENERATION_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    SHM_SOCKET_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    server_generation: str
    data_port: int
    shm_socket: str
    max_wait: _duration_pb2.Duration
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., server_generation: _Optional[str] = ..., data_port: _Optional[int] = ..., shm_socket: _Optional[str] = ..., max_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("run_id", "rank", "incarnation", "clock")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    incarnation: int
    clock: int
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., incarnation: _Optional[int] = ..., clock: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("run_state", "min_clock", "server_generation", "clock", "data_port", "shm_socket", "max_wait")
    RUN_STATE_FIELD_NUMBER: _ClassVar[int]
    MIN_CLOCK_FIELD_NUMBER: _ClassVar[int]
    SERVER_GENERATION_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    SHM_SOCKET_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_FIELD_NUMBER: _ClassVar[int]
    run_state: RunState
    min_clock: int
    server_generation: str
    clock: int
    data_port: int
    shm_socket: str
    max_wait: _duration_pb2.Duration
    def __init__(self, run_state: _Optional[_Union[RunState, str]] = ..., min_clock: _Optional[int] = ..., server_generation: _Optional[str] = ..., clock: _Optional[int] = ..., data_port: _Optional[int] = ..., shm_socket: _Optional[str] = ..., max_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("run_id", "rank", "incarnation", "points", "pulls_skipped")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    PULLS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    incarnation: int
    points: _containers.RepeatedCompositeFieldContainer[MetricPoint]
    pulls_skipped: int
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., incarnation: _Optional[int] = ..., points: _Optional[_Iterable[_Union[MetricPoint, _Mapping]]] = ..., pulls_skipped: _Optional[int] = ...) -> None: ...

class ReportMetricsResponse(_message.Message):
    __slots__ = ("run_state",)
    RUN_STATE_FIELD_NUMBER: _ClassVar[int]
    run_state: RunState
    def __init__(self, run_state: _Optional[_Union[RunState, str]] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("run_id", "rank", "incarnation", "reason", "message")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    incarnation: int
    reason: LeaveReason
    message: str
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., incarnation: _Optional[int] = ..., reason: _Optional[_Union[LeaveReason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ("run_state",)
    RUN_STATE_FIELD_NUMBER: _ClassVar[int]
    run_state: RunState
    def __init__(self, run_state: _Optional[_Union[RunState, str]] = ...) -> None: ...
