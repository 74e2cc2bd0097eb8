import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from paramserver.v1 import paramserver_pb2 as _paramserver_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateShardRequest(_message.Message):
    __slots__ = ("run_id", "spec", "shard_map", "index", "created", "checkpoints", "checkpoint_every")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SHARD_MAP_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    spec: _paramserver_pb2.RunSpec
    shard_map: _paramserver_pb2.ShardMap
    index: int
    created: _timestamp_pb2.Timestamp
    checkpoints: bool
    checkpoint_every: int
    def __init__(self, run_id: _Optional[str] = ..., spec: _Optional[_Union[_paramserver_pb2.RunSpec, _Mapping]] = ..., shard_map: _Optional[_Union[_paramserver_pb2.ShardMap, _Mapping]] = ..., index: _Optional[int] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., checkpoints: _Optional[bool] = ..., checkpoint_every: _Optional[int] = ...) -> None: ...

class CreateShardResponse(_message.Message):
    __slots__ = ("data_port", "shm_socket")
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    SHM_SOCKET_FIELD_NUMBER: _ClassVar[int]
    data_port: int
    shm_socket: str
    def __init__(self, data_port: _Optional[int] = ..., shm_socket: _Optional[str] = ...) -> None: ...

class RankUpdate(_message.Message):
    __slots__ = ("rank", "incarnation", "state", "clock", "worker_name", "lost_pushes", "start_clock")
    RANK_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    WORKER_NAME_FIELD_NUMBER: _ClassVar[int]
    LOST_PUSHES_FIELD_NUMBER: _ClassVar[int]
    START_CLOCK_FIELD_NUMBER: _ClassVar[int]
    rank: int
    incarnation: int
    state: _paramserver_pb2.WorkerState
    clock: int
    worker_name: str
    lost_pushes: bool
    start_clock: int
    def __init__(self, rank: _Optional[int] = ..., incarnation: _Optional[int] = ..., state: _Optional[_Union[_paramserver_pb2.WorkerState, str]] = ..., clock: _Optional[int] = ..., worker_name: _Optional[str] = ..., lost_pushes: _Optional[bool] = ..., start_clock: _Optional[int] = ...) -> None: ...

class UpdateShardRequest(_message.Message):
    __slots__ = ("run_id", "ranks", "run_state", "message")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    RUN_STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    ranks: _containers.RepeatedCompositeFieldContainer[RankUpdate]
    run_state: _paramserver_pb2.RunState
    message: str
    def __init__(self, run_id: _Optional[str] = ..., ranks: _Optional[_Iterable[_Union[RankUpdate, _Mapping]]] = ..., run_state: _Optional[_Union[_paramserver_pb2.RunState, str]] = ..., message: _Optional[str] = ...) -> None: ...

class UpdateShardResponse(_message.Message):
    __slots__ = ("run_state", "start_clocks", "replaced")
    RUN_STATE_FIELD_NUMBER: _ClassVar[int]
    START_CLOCKS_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    run_state: _paramserver_pb2.RunState
    start_clocks: _containers.RepeatedScalarFieldContainer[int]
    replaced: _containers.RepeatedCompositeFieldContainer[ReplacedRank]
    def __init__(self, run_state: _Optional[_Union[_paramserver_pb2.RunState, str]] = ..., start_clocks: _Optional[_Iterable[int]] = ..., replaced: _Optional[_Iterable[_Union[ReplacedRank, _Mapping]]] = ...) -> None: ...

class ReplacedRank(_message.Message):
    __slots__ = ("rank", "incarnation", "clock")
    RANK_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    rank: int
    incarnation: int
    clock: int
    def __init__(self, rank: _Optional[int] = ..., incarnation: _Optional[int] = ..., clock: _Optional[int] = ...) -> None: ...

class GetShardRequest(_message.Message):
    __slots__ = ("run_id", "keep_cuts")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_CUTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    keep_cuts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, run_id: _Optional[str] = ..., keep_cuts: _Optional[_Iterable[int]] = ...) -> None: ...

class GetShardResponse(_message.Message):
    __slots__ = ("status", "resumed", "data_port", "cuts", "shm_socket", "clocks")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    CUTS_FIELD_NUMBER: _ClassVar[int]
    SHM_SOCKET_FIELD_NUMBER: _ClassVar[int]
    CLOCKS_FIELD_NUMBER: _ClassVar[int]
    status: _paramserver_pb2.ShardStatus
    resumed: bool
    data_port: int
    cuts: _containers.RepeatedScalarFieldContainer[int]
    shm_socket: str
    clocks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, status: _Optional[_Union[_paramserver_pb2.ShardStatus, _Mapping]] = ..., resumed: _Optional[bool] = ..., data_port: _Optional[int] = ..., cuts: _Optional[_Iterable[int]] = ..., shm_socket: _Optional[str] = ..., clocks: _Optional[_Iterable[int]] = ...) -> None: ...

class DeleteShardRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class DeleteShardResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointShardRequest(_message.Message):
    __slots__ = ("run_id", "cut", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    cut: int
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., cut: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class CheckpointShardResponse(_message.Message):
    __slots__ = ("path", "min_clock")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MIN_CLOCK_FIELD_NUMBER: _ClassVar[int]
    path: str
    min_clock: int
    def __init__(self, path: _Optional[str] = ..., min_clock: _Optional[int] = ...) -> None: ...

class ListShardCheckpointsRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ListShardCheckpointsResponse(_message.Message):
    __slots__ = ("cuts", "clocks")
    CUTS_FIELD_NUMBER: _ClassVar[int]
    CLOCKS_FIELD_NUMBER: _ClassVar[int]
    cuts: _containers.RepeatedScalarFieldContainer[int]
    clocks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, cuts: _Optional[_Iterable[int]] = ..., clocks: _Optional[_Iterable[int]] = ...) -> None: ...

class RestoreShardRequest(_message.Message):
    __slots__ = ("run_id", "cut")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    cut: int
    def __init__(self, run_id: _Optional[str] = ..., cut: _Optional[int] = ...) -> None: ...

class RestoreShardResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: _paramserver_pb2.ShardStatus
    def __init__(self, status: _Optional[_Union[_paramserver_pb2.ShardStatus, _Mapping]] = ...) -> None: ...
