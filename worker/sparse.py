"""Sparse inputs and table rows on the worker side: what CTR data and embedding-table models pass
around (issue 16).

* :class:`SparseBatch`: examples as CSR rows of (feature id, value) pairs. A dataset's ids are raw
  feature ids (any uint64); a model hashes them into its table's rows once (:func:`hash_ids`).
* :class:`RowBlock`: some rows of a table, by id: what a pull of those rows returns and what a
  row-sparse gradient is (ids sorted, unique, int64; ``values`` float32 ``(len(ids), dim)``).

Hashing is fixed and documented, so a worker in another language maps raw ids to the same rows:
``row = splitmix64(raw) mod rows`` with splitmix64's finaliser
``z = (x + 0x9E3779B97F4A7C15) mod 2^64; z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
z = (z ^ (z >> 27)) * 0x94D049BB133111EB; z ^ (z >> 31)`` (all mod 2^64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["RowBlock", "SparseBatch", "hash_ids"]

_U64 = np.uint64


def hash_ids(raw: npt.NDArray[Any], rows: int) -> npt.NDArray[np.int64]:
    """Table rows of raw feature ids: ``splitmix64(raw) mod rows`` (module docstring)."""
    if rows < 1:
        raise ValueError(f"a table needs at least one row, got {rows}")
    with np.errstate(over="ignore"):
        z = np.asarray(raw).astype(_U64, copy=True)
        z += _U64(0x9E3779B97F4A7C15)
        z ^= z >> _U64(30)
        z *= _U64(0xBF58476D1CE4E5B9)
        z ^= z >> _U64(27)
        z *= _U64(0x94D049BB133111EB)
        z ^= z >> _U64(31)
    return (z % _U64(rows)).astype(np.int64)


@dataclass(frozen=True)
class SparseBatch:
    """CSR examples: example i has features ``ids[indptr[i]:indptr[i+1]]`` with ``values`` at the
    same positions. ``ids``: uint64 raw feature ids, or int64 table rows once hashed
    (``hashed``); ``values`` float32. Indexing with an int array selects examples (a copy)."""

    indptr: npt.NDArray[np.int64]
    ids: npt.NDArray[Any]
    values: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def __getitem__(self, rows: npt.NDArray[np.integer[Any]] | slice) -> SparseBatch:
        idx = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, np.int64)
        starts, ends = self.indptr[idx], self.indptr[idx + 1]
        lengths = ends - starts
        indptr = np.zeros(len(idx) + 1, np.int64)
        np.cumsum(lengths, out=indptr[1:])
        # positions of every kept feature: starts[i] + 0..lengths[i]-1, without a Python loop
        pos = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1], dtype=np.int64)
        return SparseBatch(indptr, self.ids[pos], self.values[pos])

    def example_of_each(self) -> npt.NDArray[np.int64]:
        """For each stored feature, the index of its example (the CSR row)."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.indptr))

    def hashed(self, rows: int) -> SparseBatch:
        """The same examples with ids hashed into ``rows`` table rows (:func:`hash_ids`)."""
        return SparseBatch(self.indptr, hash_ids(self.ids, rows), self.values)


@dataclass(frozen=True)
class RowBlock:
    """Rows ``ids`` (sorted, unique, int64) of a table, and their ``values`` ``(len(ids), dim)``."""

    ids: npt.NDArray[np.int64]
    values: npt.NDArray[Any]

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.shape[0] != self.ids.shape[0]:
            raise ValueError(f"a RowBlock of {self.ids.shape[0]} ids needs values of shape ({self.ids.shape[0]}, dim), "
                             f"got {self.values.shape}")

    def positions(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Where each of ``ids`` is in this block; KeyError if one is missing."""
        pos = np.searchsorted(self.ids, ids)
        if pos.size and (pos.max(initial=0) >= self.ids.size or not np.array_equal(self.ids[np.minimum(pos, self.ids.size - 1)], ids)):
            raise KeyError("rows not in this block")
        return pos.astype(np.int64)
