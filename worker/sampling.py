"""Per-worker shards and deterministic mini-batches.

:func:`shard_indices` splits ``range(n)`` into disjoint, covering shards whose sizes differ by at
most one; :class:`BatchSampler` gives the indices (into a shard) used by iteration ``clock``, a
pure function of ``(seed, rank, clock)``, so a reference run can replay exactly which examples
each iteration saw. Errors are :class:`worker.datasets.DatasetError`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .datasets import DatasetError

__all__ = ["BatchSampler", "shard_indices"]


def shard_indices(n: int, rank: int, world: int, seed: int) -> npt.NDArray[np.int64]:
    """Sorted indices of ``range(n)`` owned by ``rank`` out of ``world`` workers.

    ``np.random.default_rng(seed).permutation(n)[rank::world]``, sorted. Over all ranks the
    shards are disjoint, cover ``range(n)``, and their sizes differ by at most one.
    """
    if n < 0 or world < 1 or not 0 <= rank < world or seed < 0:
        raise DatasetError(f"need n >= 0, world >= 1, 0 <= rank < world, seed >= 0; "
                           f"got n={n}, rank={rank}, world={world}, seed={seed}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[rank::world]).astype(np.int64, copy=False)


class BatchSampler:
    """Deterministic mini-batches over a shard of ``n_examples`` examples.

    ``batch(clock)`` depends only on ``(seed, rank, clock)``: epoch ``e = clock //
    batches_per_epoch`` uses the permutation ``default_rng([seed, rank, e]).permutation(n)`` cut
    into consecutive batches of ``batch_size`` (the last may be smaller), so every example is
    used exactly once per epoch. A ``batch_size`` above ``n_examples`` gives batches of all
    ``n_examples``. The current epoch's permutation is cached, so a call costs O(1) except once
    per epoch; returned arrays are read-only views into that cache.
    """

    def __init__(self, n_examples: int, batch_size: int, seed: int, rank: int) -> None:
        if n_examples < 1 or batch_size < 1 or seed < 0 or rank < 0:
            raise DatasetError(f"BatchSampler needs n_examples >= 1, batch_size >= 1, seed >= 0, rank >= 0; "
                               f"got {n_examples}, {batch_size}, {seed}, {rank} (is this worker's shard empty?)")
        self.n_examples = n_examples
        self.batch_size = min(batch_size, n_examples)
        self.seed, self.rank = seed, rank
        self._epoch = -1
        self._perm: npt.NDArray[np.int64] = np.empty(0, dtype=np.int64)

    @property
    def batches_per_epoch(self) -> int:
        """``ceil(n_examples / batch_size)``."""
        return -(-self.n_examples // self.batch_size)

    def batch(self, clock: int) -> npt.NDArray[np.int64]:
        """Indices into the shard used by iteration ``clock`` (>= 0)."""
        if clock < 0:
            raise DatasetError(f"clock must be >= 0, got {clock}")
        epoch, i = divmod(clock, self.batches_per_epoch)
        if epoch != self._epoch:
            perm = np.random.default_rng([self.seed, self.rank, epoch]).permutation(self.n_examples)
            perm.setflags(write=False)
            self._perm, self._epoch = perm, epoch
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]
