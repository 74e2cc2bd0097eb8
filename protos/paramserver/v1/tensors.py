"""How Python sides put float32 arrays on the wire: ``TensorChunk`` messages of about 1 MiB.

Shared by the server's codec and the worker's client so both split tensors the same way. A
tensor's chunks are consecutive slices of its flattened (C order) little-endian elements; small
tensors share one message. The contract itself is in ``paramserver.proto``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from . import paramserver_pb2 as pb

__all__ = ["F32", "encode_tensors"]

F32 = np.dtype("<f4")


def encode_tensors(tensors: Mapping[str, np.ndarray], chunk_bytes: int) -> Iterator[list[pb.TensorChunk]]:
    """Yield lists of chunks, each list about ``chunk_bytes`` of payload (one message's worth)."""
    per_chunk = max(1, chunk_bytes // 4)
    batch: list[pb.TensorChunk] = []
    size = 0
    for name, arr in tensors.items():
        flat = arr.reshape(-1)
        if flat.dtype != F32:
            flat = flat.astype(F32)
        for lo in range(0, max(flat.size, 1), per_chunk):
            part = flat[lo : lo + per_chunk]
            batch.append(
                pb.TensorChunk(name=name, shape=arr.shape, dtype=pb.DATA_TYPE_FLOAT32, offset=lo, data=part.tobytes())
            )
            size += part.nbytes
            if size >= chunk_bytes:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch
