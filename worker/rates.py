"""The rate of a worker's own plain-SGD step on the copy it keeps (read-my-writes), as the server
took it: the run's rate times the push's factor (``PushGradientResponse.lr_scale``), one for the
whole push or, over several servers whose staleness for the rank differ, each one's own for the
rows it holds (``Shards.factors``). In float32 rounded as the server rounds it
(``float32(lr * factor)``; a per-row rate multiplies each element as the scalar would), so the
step here is the server's to the bit.
"""

from __future__ import annotations

import math

import numpy as np

from paramserver.shards import ShardFactors

__all__ = ["Factor", "OwnRate"]

Factor = float | ShardFactors
"""The factor a push's rate was taken with (``_Trainer.own_factor``)."""


class OwnRate:
    """``lr`` times ``factor - less`` (``less``: a part of the rate already stepped), by tensor."""

    def __init__(self, lr: float, factor: Factor, less: float = 0.0) -> None:
        self.lr, self.factor, self.less = lr, factor, less
        self._scalar = None if isinstance(factor, ShardFactors) else np.float32(lr * (factor - less))

    def _of_rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        assert isinstance(self.factor, ShardFactors)
        return (self.lr * (self.factor.of_rows(name, ids) - self.less)).astype(np.float32)

    def whole(self, name: str, shape: tuple[int, ...]) -> np.float32 | np.ndarray:
        """To multiply a gradient of all of tensor ``name`` (of ``shape``) by: a scalar, or one per row."""
        if self._scalar is not None:
            return self._scalar
        rates = self._of_rows(name, np.arange(shape[0] if shape else 1))
        return rates.reshape((-1,) + (1,) * (len(shape) - 1)) if shape else rates.reshape(())

    def rows(self, name: str, ids: np.ndarray) -> np.float32 | np.ndarray:
        """To multiply the gradient of the rows ``ids`` of table ``name`` by (shape (len(ids), dim))."""
        return self._scalar if self._scalar is not None else self._of_rows(name, ids)[:, None]

    def elements(self, name: str, shape: tuple[int, ...], positions: np.ndarray | None) -> np.float32 | np.ndarray:
        """To multiply the flat values of tensor ``name`` (of ``shape``) at ``positions`` (None: all) by."""
        if self._scalar is not None:
            return self._scalar
        if positions is None:
            return np.broadcast_to(self.whole(name, shape), shape).reshape(-1)
        return self._of_rows(name, positions // max(1, math.prod(shape[1:])))
