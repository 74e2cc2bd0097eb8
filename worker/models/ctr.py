"""Click-through-rate models over hashed sparse features, with an embedding table (issue 16).

Both models read a :class:`worker.sparse.SparseBatch` whose raw feature ids were hashed into the
table's rows once (:meth:`~HashedModel.prepare`), and predict ``p = σ(z)`` for binary labels
``y ∈ {0, 1}`` (int64) with the mean log-loss ``mean_i softplus(zᵢ) − yᵢ zᵢ``, computed from the
logit so it never overflows.

* :class:`LogisticRegression` (``logistic[:rows=N]``): ``z = b + Σⱼ xⱼ w[rowⱼ]``.
* :class:`FactorizationMachine` (``fm:K[:rows=N]``), Rendle's O(kn) form:
  ``z = b + Σⱼ xⱼ wⱼ + ½ Σₖ [(Σⱼ xⱼ vⱼₖ)² − Σⱼ xⱼ² vⱼₖ²]`` where row ``rowⱼ`` of the one table
  holds ``[wⱼ, vⱼ₁ .. vⱼₖ]``.

The table ``<kind>.table`` arrives as a :class:`RowBlock` holding at least the rows a batch needs
(:meth:`~HashedModel.rows_needed`) and its gradient leaves as a RowBlock of exactly the rows the
batch touches, a row used several times (in one example or across examples) getting the sum of
its contributions. The bias ``<kind>.bias`` ``(1,)`` is a plain array. Everything is vectorised
over the batch's nonzeros: one sort of the batch's row ids, then sparse-matrix products
(``HashedModel._forward`` spells out the algebra).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from scipy import sparse

from worker.metrics import roc_auc, sigmoid
from worker.sparse import RowBlock, SparseBatch

from .base import EvalResult, FloatArray, Model, ModelSpecError, ParamSpec, _is_int

__all__ = ["DEFAULT_ROWS", "MAX_ROWS", "FactorizationMachine", "HashedModel", "LogisticRegression"]

DEFAULT_ROWS = 2**20
"""Table rows when the model text gives none."""
MAX_ROWS = 2**40
"""Largest table accepted (hashing is mod rows, so more rows than ids gains nothing)."""
FM_INIT_SCALE = 0.01
"""Standard deviation of the FM table's normal init (the server inits a tensor with one rule)."""

Params = Mapping[str, FloatArray | RowBlock]
"""Parameters as a CTR model takes them: dense arrays, and the table as a RowBlock."""


# np.unique on numpy 2 is several times slower than one sort on a batch's ~40k ids, hence these.
def _sorted_unique(ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """``np.unique(ids)``."""
    ranked = np.sort(ids)
    return ranked[_firsts(ranked)]


def _unique_inverse(ids: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``np.unique(ids, return_inverse=True)``: sorted distinct ids, and for each of ``ids`` the
    index of its value in them."""
    order = np.argsort(ids)
    ranked = ids[order]
    first = _firsts(ranked)
    inverse = np.empty(ids.shape, np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ranked[first], inverse


def _firsts(ranked: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Where a sorted array starts a run of equal values."""
    first = np.empty(ranked.shape, bool)
    first[:1] = True
    np.not_equal(ranked[1:], ranked[:-1], out=first[1:])
    return first


class _Forward(NamedTuple):
    """What the backward pass reuses from the forward one (see ``HashedModel._forward``)."""

    ids: npt.NDArray[np.int64]
    Xm: Any  # scipy.sparse.csr_matrix (B, U)
    W: FloatArray
    XW: FloatArray
    X2m: Any  # the entrywise square of Xm, FM only


def _log_loss(z: FloatArray, y: FloatArray) -> float:
    """Mean ``softplus(z) − y z`` = ``max(z, 0) − y z + log1p(exp(−|z|))``, in float64."""
    z64 = z.astype(np.float64)
    return float(np.mean(np.maximum(z64, 0.0) - y * z64 + np.log1p(np.exp(-np.abs(z64)))))


class HashedModel(Model):
    """Shared machinery: a bias and one table ``(rows, 1 + factors)``; ``factors == 0`` is
    logistic regression. Subclasses fix the name, the table init and the spec."""

    task = "ctr"
    kind: str
    factors: int
    rows: int

    def __init__(self, rows: int, factors: int) -> None:
        if not _is_int(rows) or not 1 <= rows <= MAX_ROWS:
            raise ModelSpecError(f"{self.kind} 'rows' must be an integer in [1, 2**40], got {rows!r}")
        self.rows, self.factors = int(rows), int(factors)
        # a CTR example has no fixed width: n_features is the hashed feature space, one output
        self.n_features, self.n_outputs = self.rows, 1

    @property
    def bias_name(self) -> str:
        return f"{self.kind}.bias"

    @property
    def table_name(self) -> str:
        return f"{self.kind}.table"

    def tables(self) -> dict[str, int]:
        return {self.table_name: 1 + self.factors}

    def prepare(self, X: SparseBatch) -> SparseBatch:
        """``X`` with raw uint64 feature ids hashed into table rows (``X.hashed(rows)``)."""
        if not isinstance(X, SparseBatch):
            raise ValueError(f"{self.kind} model takes a SparseBatch, got {type(X).__name__}")
        return X.hashed(self.rows)

    def rows_needed(self, X: SparseBatch) -> dict[str, npt.NDArray[np.int64]]:
        return {self.table_name: _sorted_unique(self._check_batch(X).ids)}

    # -- checks ------------------------------------------------------------------------------
    def _check_batch(self, X: SparseBatch) -> SparseBatch:
        if not isinstance(X, SparseBatch):
            raise ValueError(f"{self.kind} model takes a SparseBatch, got {type(X).__name__}")
        if X.ids.dtype != np.int64:
            raise ValueError(f"X has {X.ids.dtype} ids: pass the batch through model.prepare(X) first (int64 rows)")
        if X.ids.size and (int(X.ids.min()) < 0 or int(X.ids.max()) >= self.rows):
            raise ValueError(f"X has row ids outside [0, {self.rows}): was it prepared by a model with other rows?")
        if len(X) == 0:
            raise ValueError("empty batch: X has no examples")
        return X

    def _params(self, params: Params) -> tuple[FloatArray, RowBlock, np.dtype[Any]]:
        for name in (self.bias_name, self.table_name):
            if name not in params:
                raise ValueError(f"missing parameter {name!r}; expected {[self.bias_name, self.table_name]}")
        bias, table = params[self.bias_name], params[self.table_name]
        if not isinstance(bias, np.ndarray) or bias.shape != (1,) or bias.dtype not in (np.float32, np.float64):
            raise ValueError(f"parameter {self.bias_name!r} must be a float32 array of shape (1,)")
        if not isinstance(table, RowBlock):
            raise ValueError(f"parameter {self.table_name!r} must be a RowBlock of table rows, got {type(table).__name__}")
        if table.values.shape[1] != 1 + self.factors or table.values.dtype != bias.dtype:
            raise ValueError(f"parameter {self.table_name!r} rows must be {bias.dtype} of width {1 + self.factors}, "
                             f"got {table.values.dtype} of shape {table.values.shape}")
        return bias, table, bias.dtype

    def _labels(self, y: npt.NDArray[Any], batch: int, dtype: np.dtype[Any]) -> FloatArray:
        if y.shape != (batch,) or y.dtype.kind not in "iu":
            raise ValueError(f"labels y must be integers of shape ({batch},), got {y.dtype} {y.shape}")
        if y.size and (int(y.min()) < 0 or int(y.max()) > 1):
            raise ValueError(f"CTR labels must be 0 or 1, got range [{int(y.min())}, {int(y.max())}]")
        return y.astype(dtype)

    # -- forward / backward ------------------------------------------------------------------
    # With U the batch's distinct rows, the batch is a sparse (B, U) matrix X (entry x per nonzero,
    # a row repeated in an example stored twice, which sums), X2 its entrywise square, and the
    # gathered rows W = [w | V] (U, 1 + K). Then  X W = [Σⱼ xⱼ wⱼ | S]  with  S = Σⱼ xⱼ vⱼ,
    # z = b + (X W)[:, 0] + ½ (Σₖ S² − X2 Σₖ V²),  and for g = ∂L/∂z (B,):
    # ∂L/∂W = Xᵀ (g ⊙ [1 | S]) − [0 | (X2ᵀ g) ⊙ V],  summed over repeated rows by the products.
    def _forward(self, params: Params, X: SparseBatch) -> tuple[FloatArray, _Forward]:
        X = self._check_batch(X)
        bias, table, dtype = self._params(params)
        ids, inverse = _unique_inverse(X.ids)
        if np.array_equal(table.ids, ids):  # the usual case: the caller pulled exactly rows_needed
            W = table.values  # (U, 1 + factors), only read
        else:
            try:
                W = table.values[table.positions(ids)]
            except KeyError:
                raise ValueError(f"the {self.table_name!r} RowBlock lacks rows this batch needs (see rows_needed)") from None
        x = X.values.astype(dtype, copy=False)
        shape = (len(X), len(ids))
        Xm = sparse.csr_matrix((x, inverse, X.indptr), shape=shape)
        XW: FloatArray = np.asarray(Xm @ W)  # (B, 1 + factors)
        z = XW[:, 0] + bias[0]
        X2m = None
        if self.factors:
            X2m = sparse.csr_matrix((x * x, inverse, X.indptr), shape=shape)
            S, V = XW[:, 1:], W[:, 1:]
            z += 0.5 * (np.einsum("ij,ij->i", S, S) - X2m @ np.einsum("ij,ij->i", V, V))
        return z, _Forward(ids, Xm, W, XW, X2m)

    def loss_and_grad(  # type: ignore[override]  # a CTR model takes a SparseBatch and RowBlocks
        self, params: Params, X: SparseBatch, y: npt.NDArray[Any]
    ) -> tuple[float, dict[str, FloatArray | RowBlock]]:
        """Mean log-loss and its gradient: the bias ``(1,)`` array, the table a RowBlock of
        exactly the rows the batch touches (sorted unique ids, repeated uses summed)."""
        z, fwd = self._forward(params, X)
        B = z.shape[0]
        labels = self._labels(y, B, z.dtype)
        loss = _log_loss(z, labels)
        g = sigmoid(z)
        g -= labels
        g *= g.dtype.type(1.0 / B)  # ∂L/∂z for the batch-mean loss
        upstream = fwd.XW  # reused as scratch: [1 | S] ⊙ g
        upstream[:, 0] = g
        upstream[:, 1:] *= g[:, None]
        grad_rows: FloatArray = np.asarray(fwd.Xm.T @ upstream)
        if fwd.X2m is not None:
            grad_rows[:, 1:] -= np.asarray(fwd.X2m.T @ g)[:, None] * fwd.W[:, 1:]
        grads: dict[str, FloatArray | RowBlock] = {
            self.bias_name: np.array([g.sum()], z.dtype),
            self.table_name: RowBlock(fwd.ids, grad_rows.astype(z.dtype, copy=False)),
        }
        return loss, grads

    def predict(self, params: Params, X: SparseBatch) -> FloatArray:
        """Click probabilities ``σ(z)`` (B,) of a prepared batch."""
        return sigmoid(self._forward(params, X)[0])

    def evaluate(self, params: Params, X: SparseBatch, y: npt.NDArray[Any]) -> EvalResult:
        """Mean log-loss, accuracy of ``p >= 0.5``, and ROC AUC (nan when y has one class)."""
        z = self._forward(params, X)[0]
        labels = self._labels(y, z.shape[0], z.dtype)
        accuracy = float(np.mean((z >= 0) == (labels == 1)))  # p >= 0.5 exactly when z >= 0
        auc = roc_auc(labels, z)
        return EvalResult(_log_loss(z, labels), accuracy, auc)


class LogisticRegression(HashedModel):
    """``z = b + Σⱼ xⱼ w[rowⱼ]``: bias ``logistic.bias`` (1,) and table ``logistic.table``
    (rows, 1), both starting at zero (convex loss, no symmetry to break)."""

    kind = "logistic"

    def __init__(self, rows: int = DEFAULT_ROWS) -> None:
        super().__init__(rows, 0)
        self.spec = {"kind": "logistic", "rows": self.rows}

    def param_specs(self) -> list[ParamSpec]:
        return [
            ParamSpec("logistic.bias", (1,), "zeros", 0.0),
            ParamSpec("logistic.table", (self.rows, 1), "zeros", 0.0, table=True),
        ]


class FactorizationMachine(HashedModel):
    """Second-order FM: bias ``fm.bias`` (1,) zeros and one table ``fm.table`` (rows, 1 + K),
    column 0 the linear weight, columns 1..K the factors, all ``normal(0, 0.01)`` (random
    factors break the symmetry; a small linear weight does no harm)."""

    kind = "fm"

    def __init__(self, factors: int, rows: int = DEFAULT_ROWS) -> None:
        if not _is_int(factors) or factors < 1:
            raise ModelSpecError(f"fm 'factors' must be a positive integer, got {factors!r}")
        super().__init__(rows, factors)
        self.spec = {"kind": "fm", "factors": self.factors, "rows": self.rows}

    def param_specs(self) -> list[ParamSpec]:
        return [
            ParamSpec("fm.bias", (1,), "zeros", 0.0),
            ParamSpec("fm.table", (self.rows, 1 + self.factors), "normal", FM_INIT_SCALE, table=True),
        ]
