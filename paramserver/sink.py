"""Where pulled parameters land: arrays the caller owns, filled as each message arrives.

Steady-state pulls allocate nothing: ``PullSink`` writes each chunk into ``into`` (arrays reused
across pulls) and lets the message go, so a pull never holds the whole model twice, and each copy
reads bytes that have just been received (warm in cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from paramserver.v1 import compress, unwire, wire
from paramserver.v1 import paramserver_pb2 as pb

__all__ = ["PullResult", "PullSink"]


@dataclass
class PullResult:
    guaranteed_clock: int
    """The parameters contain every update of iterations < this clock (PullParamsResponse)."""
    version: int
    run_state: int
    tensors: dict[str, np.ndarray]
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """Table name -> (row ids, those rows' values (len(ids), dim)), in the order asked."""
    lineage: int = 0
    """The server's history of these parameters: (lineage, version) is what a delta pull names."""
    delta: bool = False
    """The answer was a delta: only what changed since the version asked for was written."""
    staleness: int | None = None
    """The run's staleness bound when it answered (it may change while the run runs)."""


class PullSink:
    """Writes a pull's chunks into ``into`` (new arrays when None). An array of the wrong shape, not
    contiguous or read only is replaced by a new one in ``into``; one of another dtype is filled
    with conversion. If the stream fails partway, ``into`` holds a mix of old and new values; the
    caller retries the pull, which overwrites all of it.

    ``borrow``: a whole float32 tensor in read-only memory at an aligned address (an answer in
    shared memory: the server's publication or the stream's segment; or an inline message) is put
    into ``into`` as a read-only view of it, not copied: valid until the stream's next request
    (then the server may write there again)."""

    def __init__(self, into: dict[str, np.ndarray] | None, borrow: bool = False) -> None:
        self.out: dict[str, np.ndarray] = {} if into is None else into
        self._rows: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._borrow = borrow

    def params(self, resp: unwire.ParamsResponse) -> unwire.ParamsResponse:
        out = self.out
        for chunk in resp.tensors:
            data = chunk.data  # a view of the response's bytes
            if self._borrow and isinstance(data, memoryview) and data.readonly and not chunk.offset and \
                    chunk.dtype == pb.DATA_TYPE_FLOAT32 and not chunk.row_ids and not chunk.indices and \
                    len(data) == 4 * int(np.prod(chunk.shape)):
                view = np.frombuffer(data, wire.F32)
                if view.flags.aligned:  # (else computing on it would cost more than the copy)
                    out[chunk.name] = view.reshape(tuple(chunk.shape))
                    continue
            arr = out.get(chunk.name)
            if type(arr) is np.ndarray and arr.nbytes == len(data) and not chunk.offset and arr.dtype == wire.F32 and \
                    chunk.dtype == pb.DATA_TYPE_FLOAT32 and arr.flags.c_contiguous and arr.flags.writeable and \
                    arr.shape == tuple(chunk.shape[:]) and not chunk.row_ids and not chunk.indices:
                # The common case, first: float32 values of a whole array held (the fields a small
                # model's answer has: each read from the generated message costs a fraction of a µs).
                arr.data.cast("B")[:] = data
                continue
            if chunk.row_ids:  # rows of a table (copies: the message goes)
                ids = np.frombuffer(chunk.row_ids, wire.I64).copy()
                dim = int(chunk.shape[1]) if len(chunk.shape) == 2 else 1
                self._rows.setdefault(chunk.name, []).append((ids, np.frombuffer(data, wire.F32).reshape(ids.size, dim).copy()))
                continue
            arr = out.get(chunk.name)
            shape = tuple(chunk.shape)
            dtype = chunk.dtype
            if chunk.indices:  # a delta: these elements changed
                self._scatter(chunk, arr, shape)
                continue
            if arr is None or arr.shape != shape or not arr.flags.c_contiguous or not arr.flags.writeable:  # replaced
                if chunk.offset == 0 and len(data) == 4 * int(np.prod(shape)) and dtype == pb.DATA_TYPE_FLOAT32:
                    out[chunk.name] = np.frombuffer(data, wire.F32).reshape(shape).copy()
                    continue
                arr = out[chunk.name] = np.empty(shape, wire.F32)
            n = len(data)
            if dtype in compress.HALF:  # a run with compression: converted as it lands
                flat = arr.reshape(-1)
                if not 0 <= chunk.offset <= chunk.offset + n // 2 <= flat.size or n & 1:
                    raise ValueError(f"tensor {chunk.name!r}: a {compress.wire_name(dtype)} chunk at offset "
                                     f"{chunk.offset} of {n} bytes does not fit its shape {list(shape)}")
                if arr.dtype == wire.F32:
                    compress.decode_into(data, dtype, flat[chunk.offset : chunk.offset + n // 2])
                else:  # an array of another dtype: filled with conversion, as from float32
                    values = np.empty(n // 2, wire.F32)
                    compress.decode_into(data, dtype, values)
                    flat[chunk.offset : chunk.offset + n // 2] = values
            elif arr.dtype == wire.F32 and not n & 3 and 0 <= chunk.offset and 4 * chunk.offset + n <= arr.nbytes:
                # a plain byte copy: half the cost of numpy's for a small tensor
                arr.data.cast("B")[4 * chunk.offset : 4 * chunk.offset + n] = data
            else:
                flat = arr.reshape(-1)
                flat[chunk.offset : chunk.offset + n // 4] = np.frombuffer(data, wire.F32)
        resp.tensors = []  # the views pinned the message
        return resp

    @staticmethod
    def _scatter(chunk: unwire.ChunkLike, arr: np.ndarray | None, shape: tuple[int, ...]) -> None:
        picked = np.frombuffer(chunk.indices, wire.U32)
        if arr is None or arr.shape != shape or arr.dtype != wire.F32 or not arr.flags.c_contiguous or \
                not arr.flags.writeable or \
                len(chunk.data) != picked.size * wire.WIRE_DTYPES[chunk.dtype].itemsize or \
                (picked.size and int(picked.max()) >= arr.size):
            raise ValueError(f"tensor {chunk.name!r}: a delta that does not fit the array held (shape {list(shape)}): "
                             "pull whole")
        values = np.empty(picked.size, np.float32)
        compress.decode_into(chunk.data, chunk.dtype, values)
        arr.reshape(-1)[picked] = values

    def params_response(self, raw: bytes | memoryview) -> unwire.ParamsResponse:
        return self.params(unwire.decode_params_response(raw))

    def push_response(self, raw: bytes | memoryview) -> unwire.PushResponse:
        resp = unwire.decode_push_response(raw)
        if resp.pulled is not None:
            self.params(resp.pulled)
        return resp

    def result(self, last: unwire.ParamsResponse) -> PullResult:
        rows = {name: parts[0] if len(parts) == 1 else (np.concatenate([i for i, _ in parts]),
                                                        np.concatenate([v for _, v in parts]))
                for name, parts in self._rows.items()}
        return PullResult(last.guaranteed_clock, last.version, last.run_state, self.out, rows, last.lineage, last.delta,
                          last.staleness)
