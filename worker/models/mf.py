"""Matrix factorisation over two tables (issue 19): the workload of the SSP papers (Ho et al. 2013).

:class:`MatrixFactorization` (``mf:K[:reg=L]``; users and items are the dataset's) predicts user ``u``'s rating of item
``i`` as ``r̂ = ⟨Uᵤ, Vᵢ⟩`` with the user factors a table ``mf.users`` ``(users, K)`` and the item
factors a table ``mf.items`` ``(items, K)``, both ``normal(0, 0.5)``: centred ratings, no bias (a
shared bias takes a step from every push: asynchronous pushes overshoot it first, whatever the
factors do).
A batch ``X`` is an int64 array ``(B, 2)`` of (user, item) pairs, ``y`` the float32 ratings. The
loss is the classic SGD-MF objective per rating, averaged over the batch:

    L = mean_n ½ (r̂ₙ − yₙ)² + ½ λ (‖U_uₙ‖² + ‖V_iₙ‖²)

so ``∂L/∂U_u = (1/B) Σ_{n: uₙ = u} (eₙ V_iₙ + λ U_u)`` (a user rated twice in a batch gets both
terms), the item rows alike. The gradient of a table leaves as a RowBlock of
exactly the rows the batch touched. ``evaluate`` reports the test RMSE as its loss (the figure the
papers and a planted dataset's noise level are stated in; ``worker.ratings``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.sparse import RowBlock

from .base import EvalResult, FloatArray, Model, ModelSpecError, ParamSpec, _is_int

__all__ = ["MF_INIT_SCALE", "MatrixFactorization"]

MF_INIT_SCALE = 0.5
"""Standard deviation of the factors' normal init (not small: zero is a saddle point, and SGD stays
near it for long from a small init)."""

Params = Mapping[str, FloatArray | RowBlock]


class MatrixFactorization(Model):
    task = "ratings"
    kind = "mf"

    def __init__(self, factors: int, users: int, items: int, reg: float = 0.0) -> None:
        for what, v in (("factors", factors), ("users", users), ("items", items)):
            if not _is_int(v) or v < 1:
                raise ModelSpecError(f"mf {what!r} must be a positive integer, got {v!r}")
        if not isinstance(reg, int | float) or isinstance(reg, bool) or not 0.0 <= reg < 1e3:
            raise ModelSpecError(f"mf 'reg' must be a number in [0, 1000), got {reg!r}")
        self.factors, self.users, self.items, self.reg = int(factors), int(users), int(items), float(reg)
        self.n_features, self.n_outputs = self.users, self.items  # a ratings dataset's sizes (worker.ratings)
        self.spec = {"kind": "mf", "factors": self.factors, "reg": self.reg}

    def param_specs(self) -> list[ParamSpec]:
        return [
            ParamSpec("mf.items", (self.items, self.factors), "normal", MF_INIT_SCALE, table=True),
            ParamSpec("mf.users", (self.users, self.factors), "normal", MF_INIT_SCALE, table=True),
        ]

    def tables(self) -> dict[str, int]:
        return {"mf.users": self.factors, "mf.items": self.factors}

    def prepare(self, X: Any) -> npt.NDArray[np.int64]:
        if not isinstance(X, np.ndarray) or X.ndim != 2 or X.shape[1] != 2 or X.dtype.kind not in "iu":
            raise ValueError("mf takes (user, item) pairs: an integer array of shape (n, 2) (a ratings dataset, "
                             f"e.g. synthetic-ratings), got {getattr(X, 'dtype', type(X).__name__)} "
                             f"{getattr(X, 'shape', '')}")
        if X.size and (int(X.min()) < 0 or int(X[:, 0].max()) >= self.users or int(X[:, 1].max()) >= self.items):
            raise ValueError(f"ratings refer to users or items beyond the model's {self.users} users and "
                             f"{self.items} items: build the model with the dataset's sizes")
        return X.astype(np.int64, copy=False)

    def rows_needed(self, X: Any) -> dict[str, npt.NDArray[np.int64]]:
        return {"mf.users": np.unique(X[:, 0]), "mf.items": np.unique(X[:, 1])}

    def _gather(self, params: Params, X: npt.NDArray[np.int64]) -> tuple[FloatArray, FloatArray]:
        """(the rated users' factors (B, K), the rated items' factors (B, K))."""
        if len(X) == 0:
            raise ValueError("empty batch: X has no ratings")
        got = []
        for name, col in (("mf.users", 0), ("mf.items", 1)):
            block = params.get(name)
            if not isinstance(block, RowBlock) or block.values.shape[1] != self.factors:
                raise ValueError(f"parameter {name!r} must be a RowBlock of rows of width {self.factors}")
            try:
                got.append(block.values[block.positions(X[:, col])])
            except KeyError:
                raise ValueError(f"the {name!r} RowBlock lacks rows this batch needs (see rows_needed)") from None
        return got[0], got[1]

    def _errors(self, params: Params, X: npt.NDArray[np.int64], y: npt.NDArray[Any]) -> tuple[FloatArray, FloatArray, FloatArray]:
        U, V = self._gather(params, X)
        if y.shape != (len(X),):
            raise ValueError(f"ratings y must have shape ({len(X)},), got {y.shape}")
        e = np.einsum("ij,ij->i", U, V) - y.astype(U.dtype, copy=False)
        return U, V, e

    def loss_and_grad(  # type: ignore[override]  # takes (user, item) pairs and RowBlocks
        self, params: Params, X: npt.NDArray[np.int64], y: npt.NDArray[Any]
    ) -> tuple[float, dict[str, FloatArray | RowBlock]]:
        U, V, e = self._errors(params, X, y)
        B, lam = len(X), self.reg
        loss = 0.5 * float(np.mean(e.astype(np.float64) ** 2))
        if lam:
            loss += 0.5 * lam * float(np.einsum("ij,ij->", U, U, dtype=np.float64) +
                                      np.einsum("ij,ij->", V, V, dtype=np.float64)) / B
        scale = U.dtype.type(1.0 / B)
        gU = (e[:, None] * V + lam * U) * scale  # per rating; rows rated twice are summed below
        gV = (e[:, None] * U + lam * V) * scale
        grads: dict[str, FloatArray | RowBlock] = {}
        for name, col, g in (("mf.users", 0, gU), ("mf.items", 1, gV)):
            ids, inverse = np.unique(X[:, col], return_inverse=True)
            rows = np.zeros((ids.size, self.factors), g.dtype)
            np.add.at(rows, inverse, g)
            grads[name] = RowBlock(ids, rows)
        return loss, grads

    def evaluate(self, params: Params, X: npt.NDArray[np.int64], y: npt.NDArray[Any]) -> EvalResult:
        """The RMSE of the predictions as the loss (no accuracy)."""
        e = self._errors(params, X, y)[2]
        return EvalResult(float(np.sqrt(np.mean(e.astype(np.float64) ** 2))), None)
