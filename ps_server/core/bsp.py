"""Staleness 0 (BSP): each clock's gradients are held until every live rank has pushed that clock,
then combined in rank order and applied once, so a BSP run is exact synchronous SGD (it equals one
process training on the concatenated batches with the same optimizer).

The buffer holds and combines; the run asks it which clocks are complete and applies what it
returns. Combination is deterministic: the gradient of the lowest rank first, then each next one
added, then (for the mean) one multiplication, element by element; a dense tensor's is computed
block by block as the step reads it (``tensors.Sum``), never whole.
A mean's elements whose float32 sum overflows (each gradient finite, the mean too) are summed
again in float64 and scaled there; every other element keeps the float32 sum's bits, so a BSP
run still equals the float32 reference to the bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import numpy as np

from .spec import Aggregation
from .tensors import BLOCK, Gradient, Pieces, Rows, Sum, Update, blocks, owned

__all__ = ["BspBuffer"]


class BspBuffer:
    def __init__(self, aggregation: Aggregation) -> None:
        self.aggregation = aggregation
        self.pending: dict[int, dict[int, Mapping[str, Gradient]]] = {}
        """clock -> rank -> the gradient that rank pushed for it."""
        self.applied_clock = 0
        """Clocks combined and applied so far: the parameters hold every update below it."""
        self.borrowed: set[tuple[int, int]] = set()
        """(clock, rank) of held gradients that are views of a message its sender may write over
        after the server's next message to it (``keep``)."""

    def hold(self, clock: int, rank: int, grads: Mapping[str, Gradient], borrowed: bool = False) -> None:
        self.pending.setdefault(clock, {})[rank] = grads
        if borrowed:
            self.borrowed.add((clock, rank))

    def keep(self, rank: int) -> None:
        """Copy the held gradients of ``rank`` that are still borrowed (before the server's next
        message to it: an answer that had to wait for their clock finds them combined already)."""
        for clock, r in [k for k in self.borrowed if k[1] == rank]:
            self.borrowed.discard((clock, r))
            grads = self.pending.get(clock, {}).get(r)
            if grads is not None:
                self.pending[clock][r] = owned(dict(grads))

    def drop(self, rank: int) -> None:
        """An evicted rank's held gradients are dropped (its clocks are complete without it)."""
        for by_rank in self.pending.values():
            by_rank.pop(rank, None)
        self.borrowed = {k for k in self.borrowed if k[1] != rank}

    def clear(self) -> None:
        self.pending.clear()
        self.borrowed.clear()

    def complete(self, min_clock: int) -> Iterator[dict[int, Mapping[str, Gradient]]]:
        """The gradients of each clock below ``min_clock`` not applied yet, in clock order (a clock
        nobody's gradient is held for is skipped). Each is counted applied as it is taken."""
        while self.applied_clock < min_clock:
            by_rank = self.pending.pop(self.applied_clock, {})
            self.borrowed = {k for k in self.borrowed if k[0] != self.applied_clock}
            self.applied_clock += 1
            if by_rank:
                yield by_rank

    def combine(self, by_rank: Mapping[int, Mapping[str, Gradient]],
                params: Mapping[str, np.ndarray]) -> dict[str, Update]:
        """One gradient per tensor of ``params``: the ranks' gradients summed in rank order, or
        their mean. A table's rows are combined as rows (rows some ranks left out count 0); a
        table no rank sent is left out."""
        ranks = sorted(by_rank)
        out: dict[str, Update] = {}
        scale = np.float32(1.0 / len(ranks)) if self.aggregation is Aggregation.MEAN and len(ranks) > 1 else None
        for name, w in params.items():
            got = [by_rank[r][name] for r in ranks if name in by_rank[r]]
            if len(got) < len(ranks) or any(isinstance(g, Rows) for g in got):  # a table's
                if got:
                    out[name] = _table(got, w, scale)
                continue
            out[name] = Sum(cast("list[np.ndarray | Pieces]", got), scale, w.shape)  # summed as the step reads it
        return out


def _table(got: list[Gradient], w: np.ndarray, scale: np.float32 | None) -> Gradient:
    """The ranks' gradients of a table (in rank order), summed (times ``scale``): rows when every
    one is rows, else a whole array (a rank may send a table whole). A mean whose float32 sum
    overflows is no divergence: those elements are summed again in float64 (``_beyond_float32``)."""
    if all(isinstance(g, Rows) for g in got):
        rows = Rows.concat([g for g in got if isinstance(g, Rows)], w.shape)
        if scale is None:
            merged = rows.merge()
            return Rows(merged.ids, merged.values, w.shape)
        with np.errstate(over="ignore"):
            merged = rows.merge()
            values = merged.values * scale
        return Rows(merged.ids, _beyond_float32(values, lambda: rows.merge(np.float64).values, scale), w.shape)
    if scale is None:
        return _whole_sum(got, w, w.dtype)
    with np.errstate(over="ignore"):
        acc = _whole_sum(got, w, w.dtype)
        np.multiply(acc, scale, out=acc)
    return _beyond_float32(acc, lambda: _whole_sum(got, w, np.float64), scale)


def _whole_sum(got: list[Gradient], w: np.ndarray, dtype: np.dtype[Any] | type[np.float64]) -> np.ndarray:
    """The sum of a table's gradients (rows or whole) as a whole array of ``dtype``."""
    acc = np.zeros(w.shape, dtype)
    for g in got:
        if isinstance(g, Rows):
            np.add.at(acc, g.ids, g.values)
        else:
            flat = acc.reshape(-1)
            for lo, part in blocks(g, BLOCK):
                np.add(flat[lo : lo + part.size], part, out=flat[lo : lo + part.size])
    return acc


def _beyond_float32(values: np.ndarray, exact: Callable[[], np.ndarray], scale: np.float32) -> np.ndarray:
    """``values`` (a float32 sum times ``scale``) with its non-finite elements, whose sum
    overflowed, taken from ``exact()`` (the same sum in float64) times ``scale``."""
    bad = ~np.isfinite(values)
    if bad.any():
        values[bad] = exact()[bad] * np.float64(scale)
    return values
