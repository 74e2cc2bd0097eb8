"""The wire forms of a run with compression (``RunSpec.compression``), for the server and the
Python worker: float32 to and from float16 / bfloat16, and the choice of a sparse push's elements.

float16 is numpy's IEEE binary16 cast (round to nearest even; beyond 65504 it is infinite).
bfloat16 is the upper half of a float32's bits, rounded to nearest even (NaN stays NaN); numpy
has no such type, so its values are held as ``uint16`` (``wire.WIRE_DTYPES``).

Top-k: ``top_k`` returns the positions of about ``k`` elements largest in magnitude, in
increasing order. For large tensors it finds the threshold on a strided sample of the
magnitudes, as Deep Gradient Compression does (Lin et al., ICLR 2018): an exact selection
(``argpartition``) costs ~40x more on a 4M-element layer, and nothing depends on ``k`` being
exact (the error feedback keeps whatever is not sent).
"""

from __future__ import annotations

import math

import numpy as np

from . import paramserver_pb2 as pb

__all__ = ["HALF", "decode_into", "encode", "k_of", "top_k", "wire_name"]

F32 = np.dtype("<f4")
F16 = np.dtype("<f2")
U16 = np.dtype("<u2")
U32 = np.dtype("<u4")
HALF = (pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_BFLOAT16)
EXACT_BELOW = 1 << 16
"""Tensors up to this many elements get the exact top k."""
SAMPLE = 1 << 14
"""About this many magnitudes are sampled to find a large tensor's threshold."""


_NAMES: dict[int, str] = {pb.DATA_TYPE_FLOAT16: "float16", pb.DATA_TYPE_BFLOAT16: "bfloat16"}


def wire_name(dtype: int) -> str:
    return _NAMES.get(dtype, "float32")


def encode(values: np.ndarray, dtype: int) -> np.ndarray:
    """Flat float32 ``values`` in the wire form of ``dtype`` (a new array; float32: as they are)."""
    values = values.reshape(-1)
    if dtype == pb.DATA_TYPE_FLOAT16:
        with np.errstate(over="ignore"):  # beyond 65504: inf, which the receiver refuses or sees
            return values.astype(F16)
    if dtype == pb.DATA_TYPE_BFLOAT16:
        bits = values.view(U32)
        rounded = bits >> 16
        rounded &= 1
        rounded += 0x7FFF
        rounded += bits  # wraps only for NaNs with the sign bit set: fixed below
        rounded >>= 16
        out = rounded.astype(U16)
        nan = np.isnan(values)
        if nan.any():
            out[nan] = 0x7FC0
        return out
    return values if values.dtype == F32 else values.astype(F32)


def decode_into(data: bytes | memoryview | np.ndarray, dtype: int, out: np.ndarray) -> None:
    """Write the wire values ``data`` (of ``dtype``) into the flat float32 array ``out`` (same length)."""
    if dtype == pb.DATA_TYPE_BFLOAT16:
        bits = out.view(U32)
        bits[...] = np.frombuffer(data, U16) if not isinstance(data, np.ndarray) else data
        bits <<= 16
    elif dtype == pb.DATA_TYPE_FLOAT16:
        out[...] = np.frombuffer(data, F16) if not isinstance(data, np.ndarray) else data
    else:
        out[...] = np.frombuffer(data, F32) if not isinstance(data, np.ndarray) else data


def k_of(ratio: float, size: int) -> int:
    """Elements of a ``size``-element tensor a push carries at top-k ``ratio`` (at least 1)."""
    return min(size, max(1, math.ceil(ratio * size)))


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Positions (uint32, increasing) of about ``k`` elements of flat ``values`` largest in magnitude."""
    n = values.size
    if k >= n:
        return np.arange(n, dtype=U32)
    magnitude = np.abs(values)
    if n <= EXACT_BELOW:
        picked = np.argpartition(magnitude, n - k)[n - k :].astype(U32)
        picked.sort()
        return picked
    sample = magnitude[:: max(1, n // SAMPLE)]
    m = max(1, round(sample.size * k / n))
    threshold = np.partition(sample, sample.size - m)[sample.size - m]
    below = magnitude < threshold  # (False for a NaN, and for all when the threshold is one: a NaN is
    np.logical_not(below, out=below)  # always picked, as on the exact path, and the server refuses it)
    picked = np.flatnonzero(below).astype(U32)
    if picked.size > 2 * k:  # many ties at the threshold (a gradient of mostly equal values)
        picked = picked[np.argpartition(magnitude[picked], picked.size - k)[picked.size - k :]]
        picked.sort()
    return picked
