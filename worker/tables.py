"""A worker's cache of table rows, following SSP (issue 16; Bösen's row cache).

A row pulled with guaranteed clock g holds every update of iterations < g. For iteration c under
staleness s it is good enough while g >= c - s, so a row a recent pull brought is reused without
asking the server again; only the rows a batch needs that are missing or too old are pulled.
As for the dense parameters (``trainer``), only SSP (s > 0) reuses rows: under BSP the guarantee
is never enough, and under ASP reuse would let a worker train alone on its own copy forever.

The cache is bounded (``capacity`` rows): it keeps the rows pulled most recently, as sorted
arrays (ids, values, the clock each was pulled at), so a lookup is one ``searchsorted`` and the
worker never holds a table whole. As for the dense parameters a worker reuses, the server's
update of the worker's own push is in a cached row only when the worker applied it itself
(plain SGD: ``apply_sgd``); other optimizers' steps are the server's, seen at the next pull.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = ["RowCache"]

I64 = npt.NDArray[np.int64]


@dataclass
class RowCache:
    dim: int
    staleness: int
    """The run's (kept up to date by its owner when the run's bound changes): rows are reused only
    under SSP (s > 0)."""
    capacity: int = 1 << 18
    ids: I64 = field(default_factory=lambda: np.empty(0, np.int64))
    values: npt.NDArray[np.float32] = field(init=False)
    clocks: I64 = field(default_factory=lambda: np.empty(0, np.int64))
    hits: int = 0
    misses: int = 0

    def __post_init__(self) -> None:
        self.values = np.empty((0, self.dim), np.float32)

    def _fresh(self, clock: int) -> npt.NDArray[np.bool_]:
        if self.staleness <= 0:
            return np.zeros(self.ids.size, bool)
        return self.clocks >= clock - self.staleness

    def lookup(self, needed: I64, clock: int) -> tuple[npt.NDArray[np.bool_], I64]:
        """For the sorted unique ``needed`` ids of iteration ``clock``: which are cached fresh
        enough (a mask), and where (positions in the cache, meaningful where the mask is set)."""
        if not self.ids.size or not needed.size:
            return np.zeros(needed.size, bool), np.zeros(needed.size, np.int64)
        pos = np.minimum(np.searchsorted(self.ids, needed), self.ids.size - 1)
        hit = (self.ids[pos] == needed) & self._fresh(clock)[pos]
        return hit, pos

    def missing(self, needed: I64, clock: int) -> I64:
        """The ids of ``needed`` a pull for iteration ``clock`` must fetch."""
        hit, _ = self.lookup(needed, clock)
        return needed[~hit]

    def block(self, needed: I64, clock: int, pulled_ids: I64, pulled: npt.NDArray[np.float32],
              guaranteed: int) -> npt.NDArray[np.float32]:
        """The values of ``needed`` (sorted unique) for iteration ``clock``: cached rows where fresh,
        else the rows just pulled (``pulled_ids``, sorted, with guaranteed clock ``guaranteed``),
        which the cache then keeps."""
        hit, pos = self.lookup(needed, clock)
        out = np.empty((needed.size, self.dim), np.float32)
        out[hit] = self.values[pos[hit]]
        at = np.searchsorted(needed, pulled_ids)
        if int(hit.sum()) + pulled_ids.size != needed.size or (at.size and np.any(hit[at])):
            raise ValueError(f"of {needed.size} rows needed {int(hit.sum())} are cached and {pulled_ids.size} pulled: "
                             "every row must come from exactly one")
        out[at] = pulled
        self.hits += int(hit.sum())
        self.misses += int(pulled_ids.size)
        self._keep(pulled_ids, pulled, guaranteed, clock)
        return out

    def _keep(self, ids: I64, values: npt.NDArray[np.float32], guaranteed: int, clock: int) -> None:
        if self.staleness <= 0:
            return
        old = self._fresh(clock) & ~np.isin(self.ids, ids, assume_unique=True)
        all_ids = np.concatenate([self.ids[old], ids])
        all_values = np.concatenate([self.values[old], values])
        all_clocks = np.concatenate([self.clocks[old], np.full(ids.size, guaranteed, np.int64)])
        if all_ids.size > self.capacity:  # keep the newest pulls
            keep = np.argsort(all_clocks, kind="stable")[-self.capacity :]
            all_ids, all_values, all_clocks = all_ids[keep], all_values[keep], all_clocks[keep]
        order = np.argsort(all_ids)
        self.ids, self.values, self.clocks = all_ids[order], all_values[order], all_clocks[order]

    def apply_sgd(self, ids: I64, grad: npt.NDArray[np.float32], lr: np.float32 | npt.NDArray[np.float32]) -> None:
        """The worker's own plain-SGD step on the cached rows among ``ids`` (sorted unique); ``lr``
        one rate, or one per id (shape (len(ids), 1): rows of shards that took different ones)."""
        if not self.ids.size or not ids.size:
            return
        pos = np.minimum(np.searchsorted(self.ids, ids), self.ids.size - 1)
        here = self.ids[pos] == ids
        self.values[pos[here]] -= (lr[here] if isinstance(lr, np.ndarray) else lr) * grad[here]
