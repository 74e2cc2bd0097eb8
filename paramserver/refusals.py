"""What a sharded run's client refuses whole, before any shard is asked (``Shards`` calls it).

One server refuses a bad push or pull as a whole; split by the shard map, each shard sees only its
part and would refuse that part alone, or not at all, while the others apply theirs (a torn push).
So ``Refusals.check`` refuses here, with the server's reason and words, what one server would:
a tensor missing, unknown or of another shape, sparse positions repeated, decreasing or past the
end, a NaN/Inf value (counted as a server counts it), a row id out of its table's range, rows of a
repeated id summing beyond float32, rows of a tensor that is no table. It needs the run's shapes
only, never a shard.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1.wire import CodedPart, RowsPart

from . import errors

__all__ = ["Refusals"]


class Refusals:
    """The checks of one run's requests: ``shapes``, its dense tensors' whole shapes; ``tables``,
    its tables' (table name -> its whole shape)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], tables: Mapping[str, tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.tables = tables

    def check(self, grads: Mapping[str, Any] | None, names: Sequence[str],
              rows: Mapping[str, Any] | None) -> None:
        """InvalidArgument, before any shard is asked, for what one server would refuse as a whole
        but each shard, seeing only its part, would not (or only some would: a push applied on
        the others): a push's tensor the run lacks, or lacks of the run's dense ones, of another
        shape, a sparse (top-k) part's positions repeated, decreasing or past its end, rows of a
        tensor that is no table, a row id out of its table's range (a pull of it answered with
        memory never written), a NaN/Inf value, rows of a repeated id summing beyond float32, a
        pulled name the run lacks."""
        known = self.shapes.keys() | self.tables.keys()

        def only_known(names: Iterable[str], method: str, reason: pb.ErrorReason) -> None:
            if unknown := sorted(set(names) - known):
                raise _refuse(f"unknown tensor name(s) {', '.join(map(repr, unknown))}; this run's tensors are "
                              f"{', '.join(map(repr, sorted(known)))}", method, reason)

        for what, method, reason, given in (("gradient", "PushGradient", pb.ERROR_REASON_INVALID_GRADIENT, grads),
                                            ("pull", "PullParams", pb.ERROR_REASON_INVALID_REQUEST, rows)):
            if given is None:
                continue
            only_known(given, method, reason)
            for name, value in given.items():
                if name not in self.tables and (isinstance(value, RowsPart) or what == "pull"):
                    raise _refuse(f"tensor {name!r} is not a table: pull or push it whole", method, reason)
                if what == "gradient" and not isinstance(value, RowsPart):
                    want = self.shapes.get(name) or self.tables[name]
                    if tuple(value.shape) != want:
                        raise _refuse(f"gradient {name!r} has shape {list(value.shape)}, the parameter has "
                                      f"{list(want)}", method, reason)
                    if isinstance(value, CodedPart) and value.indices is not None:
                        _check_positions(name, value, method, reason)
                    _check_finite(name, value, method, reason)
                    continue
                ids = np.asarray(value.ids if isinstance(value, RowsPart) else value, np.int64)
                n = self.tables[name][0]
                if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n):
                    bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
                    raise _refuse(f"table {name!r} has rows 0..{n - 1}: row id {bad} is out of range", method,
                                  reason)
                if isinstance(value, RowsPart):
                    _check_finite(name, value, method, reason)
                    if bad := _repeats_beyond_float32(value):
                        raise _refuse(f"gradient {name!r}: the rows of repeated ids sum to {bad} NaN/Inf "
                                      "value(s); nothing was applied", method, reason)
        if grads is not None:
            missing = sorted(self.shapes.keys() - grads.keys())
            if missing:
                raise _refuse(f"the gradient lacks tensor(s) {', '.join(map(repr, missing))}: send every "
                              "parameter", "PushGradient", pb.ERROR_REASON_INVALID_GRADIENT)
        only_known(names, "PullParams", pb.ERROR_REASON_INVALID_REQUEST)


def _refuse(message: str, method: str, reason: pb.ErrorReason) -> errors.InvalidArgument:
    return errors.InvalidArgument(errors.Code.INVALID_ARGUMENT, message, pb.ErrorInfo(reason=reason), method)


def _check_finite(name: str, a: Any, method: str, reason: pb.ErrorReason) -> None:
    """InvalidArgument if the gradient ``a`` (an array, ``CodedPart`` or ``RowsPart``) holds a
    NaN/Inf value."""
    if isinstance(a, CodedPart):
        bad = _non_finite(a.values, a.dtype)
    else:
        bad = _non_finite(a.values if isinstance(a, RowsPart) else a)
    if bad:
        raise _refuse(f"gradient {name!r} contains {bad} NaN/Inf value(s); nothing was applied", method,
                      reason)


def _check_positions(name: str, a: CodedPart, method: str, reason: pb.ErrorReason) -> None:
    """InvalidArgument unless the sparse ``a``'s positions increase strictly, within its tensor,
    one value each, as one server checks them: split by rows, a repeated or decreasing position
    would be refused by one shard only (the others applying theirs), and one past the end sent
    to none."""
    idx = np.asarray(a.indices)
    size = int(np.prod(a.shape, dtype=np.int64))
    if idx.size != a.values.size:
        raise _refuse(f"tensor {name!r}: a sparse part needs one position per value; it has {idx.size} "
                      f"positions, {a.values.size} values", method, reason)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= size or not bool(np.all(idx[1:] > idx[:-1]))):
        raise _refuse(f"tensor {name!r}: a sparse part's positions must increase strictly and stay below "
                      f"its size {size}", method, reason)


def _repeats_beyond_float32(a: RowsPart) -> int:
    """Values of the rows of ``a``'s repeated ids whose sum is not finite, as a server sums them
    (float32, in the order sent): it refuses such a push whole, but only the shard holding the id
    would see it."""
    ids = a.ids
    if ids.size < 2 or bool(np.all(ids[1:] > ids[:-1])):
        return 0
    order = np.argsort(ids, kind="stable")
    first = np.flatnonzero(np.concatenate(([True], ids[order][1:] != ids[order][:-1])))
    if first.size == ids.size:
        return 0
    with np.errstate(over="ignore", invalid="ignore"):
        sums = np.add.reduceat(a.values.reshape(ids.size, -1)[order], first, axis=0, dtype=np.float32)
    return int(np.count_nonzero(~np.isfinite(sums)))


_BLOCK = 1 << 18
_EXPONENT: dict[int, int] = {pb.DATA_TYPE_FLOAT16: 0x7C00, pb.DATA_TYPE_BFLOAT16: 0x7F80}
"""A 16-bit wire value is NaN/Inf when all its exponent bits are set: its bits but the sign's are
at least these."""


def _non_finite(values: Any, dtype: int = pb.DATA_TYPE_FLOAT32) -> int:
    """NaN/Inf values of a push's ``values`` as sent (float32, or numpy's form of the wire ``dtype``),
    as a server counts them: it refuses such a push whole, but only the shards holding them would
    see them. Float32 first takes the server's cheap test (``finite_hint``: a BLAS dot product,
    without the bool array ``np.isfinite`` allocates), which also fails when squares overflow
    (|x| > ~1.8e19): then an exact count says. 16-bit values are tested by their bits, by blocks."""
    flat = np.asarray(values).reshape(-1)
    if not flat.size:
        return 0
    top = _EXPONENT.get(dtype)
    if top is not None:
        bits, scratch, bad = flat.view(np.uint16), np.empty(min(flat.size, _BLOCK), np.uint16), 0
        for i in range(0, bits.size, _BLOCK):
            part = scratch[: min(_BLOCK, bits.size - i)]
            np.bitwise_and(bits[i : i + _BLOCK], 0x7FFF, out=part)
            if part.max() >= top:
                bad += int(np.count_nonzero(part >= top))
        return bad
    with np.errstate(over="ignore", invalid="ignore"):
        if flat.dtype != np.float32:  # (sent as float32: a value beyond its range goes as Inf)
            flat = flat.astype(np.float32)
        hint = np.dot(flat, flat) if flat.flags.aligned else np.add.reduce(flat, dtype=np.float32)
    return 0 if math.isfinite(hint) else int(np.count_nonzero(~np.isfinite(flat)))
