"""How Python sides put float32 arrays on the wire: ``TensorChunk`` messages of about 1 MiB.

Shared by the server's codec and the worker's client so both split tensors the same way. A
tensor's chunks are consecutive slices of its flattened (C order) little-endian elements; small
tensors share one message. The contract itself is in ``paramserver.proto``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np

from . import paramserver_pb2 as pb

__all__ = ["F32", "chunk_messages", "with_last"]

F32 = np.dtype("<f4")
T = TypeVar("T")


M = TypeVar("M")


def chunk_messages(
    tensors: Mapping[str, np.ndarray],
    chunk_bytes: int,
    new_message: Callable[[], M],
    tensors_of: Callable[[M], Any] = lambda m: m.tensors,  # type: ignore[attr-defined]
) -> Iterator[M]:
    """Yield messages from ``new_message()`` whose ``tensors_of(msg)`` carry about ``chunk_bytes``.

    Chunks are added in place (``tensors.add``): building a message from a list of chunks would
    copy every chunk's bytes once more. Messages are made lazily, so sending overlaps encoding.
    Always yields at least one message.
    """
    per_chunk = max(1, chunk_bytes // 4)
    msg, size, sent = new_message(), 0, False
    for name, arr in tensors.items():
        flat = arr.reshape(-1)
        if flat.dtype != F32:
            flat = flat.astype(F32)
        shape = arr.shape
        for lo in range(0, max(flat.size, 1), per_chunk):
            part = flat[lo : lo + per_chunk]
            tensors_of(msg).add(name=name, shape=shape, dtype=pb.DATA_TYPE_FLOAT32, offset=lo, data=part.tobytes())
            size += part.nbytes
            if size >= chunk_bytes:
                yield msg
                msg, size, sent = new_message(), 0, True
    if len(tensors_of(msg)) or not sent:
        yield msg


def with_last(items: Iterator[T]) -> Iterator[tuple[T, bool]]:
    """Pairs (item, is_last), looking one item ahead."""
    prev = next(items, None)
    while prev is not None:
        nxt = next(items, None)
        yield prev, nxt is None
        prev = nxt
