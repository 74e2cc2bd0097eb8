"""What every model shares: parameter specs, deterministic init, the Model interface, losses.

The parameter server is model-agnostic: it stores named float32 tensors. This module owns the
other half: which tensors a model has (:class:`ParamSpec`), how they are initialised
(:func:`materialize`), and how a worker turns a batch into a loss and a gradient.

Conventions (invariants every model here keeps):

* **Layout.** A weight ``W`` has shape ``(n_in, n_out)`` and the forward pass is
  ``z = a @ W + b`` with one *row* per sample. This is the seed's ``z = W·a + b`` (formula 5)
  written for a batch of row vectors, so a whole batch is one float32 GEMM.
* **Loss is the batch mean.** The seed's ``L(W) = ½ Σᵢ (yᵢ − f(xᵢ, W))²`` (formulas 1 and 4) is
  divided by the batch size ``B``, so a learning rate does not depend on the batch size and
  gradients from workers with different batch sizes have the same scale.
* **Gradient sign.** ``∇L = −(1/B) Σᵢ (yᵢ − f(xᵢ, W)) · ∂f/∂W`` (the seed's formula 2 drops the
  minus sign); the update ``W ← W − η ∇L`` (formulas 3 and 8) is the server's job.
* **dtype.** Computation runs in the parameters' dtype: float32 in production (parameters,
  inputs and gradients all float32, C-contiguous); float64 is accepted so a finite-difference
  check can be exact. Inputs are cast to that dtype (no copy when they already match).
* **Fresh gradients.** ``loss_and_grad`` returns newly allocated arrays the caller may keep or
  modify; it never writes to ``params``, ``X`` or ``y``.
* **Parameter order.** ``param_specs()`` is sorted by name (``layer0.bias``, ``layer0.weight``,
  ``layer1.bias``, ...), which is layer order for fewer than 10 layers. That order fixes the
  per-tensor random streams of :func:`materialize`, so any process holding the specs and a seed
  reproduces the same initial parameters.

* **Tables.** A parameter marked ``ParamSpec.table`` (an embedding table, ``(rows, dim)``) is
  too big to move whole: ``loss_and_grad`` takes it as a :class:`worker.sparse.RowBlock` of the
  rows a batch needs (:meth:`Model.rows_needed`) and returns its gradient as a RowBlock of exactly
  the rows the batch touches. Dense parameters stay plain arrays.

The models themselves are in ``linear``, ``mlp`` and ``ctr``; ``worker.models`` builds them from a
spec.

Errors::

    ValueError
     ├── ModelSpecError   bad model text/spec (message lists the accepted forms)
     └── (plain)          arrays of the wrong shape, dtype or label range
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["ACTIVATIONS", "EvalResult", "FloatArray", "Model", "ModelSpecError", "ParamSpec", "materialize", "num_params"]

FloatArray = npt.NDArray[np.floating[Any]]

ACTIVATIONS = ("relu", "tanh", "sigmoid")
"""Hidden-layer activations accepted by :class:`MLP`."""

_INITS = ("zeros", "normal", "uniform")
_MODEL_FORMS = (
    "accepted model forms: 'linear', 'softmax', 'mlp:H1[,H2,...][:ACTIVATION]' "
    "(e.g. 'mlp:64', 'mlp:128,64', 'mlp:64:tanh'; activations: relu, tanh, sigmoid), "
    "'logistic[:rows=N]', 'fm:K[:rows=N]' (e.g. 'logistic:rows=65536', 'fm:16'; rows default 2**20), "
    "'mf:K[:reg=L]' (matrix factorisation of a ratings dataset, e.g. 'mf:8', 'mf:8:reg=0.01')"
)


class ModelSpecError(ValueError):
    """A model text or spec is malformed; the message says what to fix."""


@dataclass(frozen=True)
class ParamSpec:
    """One named tensor of a model.

    ``init`` is ``"zeros"``, ``"normal"`` (``scale`` = standard deviation) or ``"uniform"``
    (values in ``[-scale, scale)``); ``scale`` is 0 for zeros.

    ``table`` marks an embedding table ``(rows, dim)``: a worker pulls and pushes it by row id
    (:class:`worker.sparse.RowBlock`) instead of whole; see :meth:`Model.tables`.
    """

    name: str
    shape: tuple[int, ...]
    init: str
    scale: float
    table: bool = False

    def __post_init__(self) -> None:
        if self.init not in _INITS:
            raise ModelSpecError(f"ParamSpec {self.name!r}: init must be one of {_INITS}, got {self.init!r}")
        if any(d < 0 for d in self.shape):
            raise ModelSpecError(f"ParamSpec {self.name!r}: negative dimension in shape {self.shape}")
        if not (self.scale >= 0.0 and math.isfinite(self.scale)):
            raise ModelSpecError(f"ParamSpec {self.name!r}: scale must be finite and >= 0, got {self.scale}")
        if self.table and (len(self.shape) != 2 or min(self.shape) < 1):
            raise ModelSpecError(f"ParamSpec {self.name!r}: a table has shape (rows, dim) >= 1, got {self.shape}")


@dataclass(frozen=True)
class EvalResult:
    """Mean loss over the evaluated examples; accuracy in [0, 1], or None for regression;
    ``auc`` the ROC AUC for binary (CTR) models (nan when only one class is present), else None."""

    loss: float
    accuracy: float | None
    auc: float | None = None


def materialize(specs: Sequence[ParamSpec], seed: int) -> dict[str, npt.NDArray[np.float32]]:
    """Create the initial parameters for ``specs`` deterministically from ``seed``.

    The rule (kept exactly so other processes can reproduce it): the i-th spec draws from
    ``np.random.default_rng([seed, i])`` -- ``zeros`` -> ``np.zeros``, ``normal`` ->
    ``rng.normal(0.0, scale, shape)``, ``uniform`` -> ``rng.uniform(-scale, scale, shape)`` --
    then ``.astype(np.float32)``. Each tensor has its own stream, so changing one shape does not
    change the others. A table spec is drawn like any tensor (whole), which suits small tables.
    """
    out: dict[str, npt.NDArray[np.float32]] = {}
    for i, spec in enumerate(specs):
        if spec.init == "zeros":
            out[spec.name] = np.zeros(spec.shape, dtype=np.float32)
            continue
        rng = np.random.default_rng([seed, i])
        if spec.init == "normal":
            values = rng.normal(0.0, spec.scale, spec.shape)
        else:
            values = rng.uniform(-spec.scale, spec.scale, spec.shape)
        out[spec.name] = values.astype(np.float32)
    return out


def num_params(specs: Sequence[ParamSpec]) -> int:
    """Total number of scalars in ``specs``."""
    return sum(math.prod(s.shape) for s in specs)


class Model(ABC):
    """A differentiable model over named parameters (see the module docstring for invariants)."""

    spec: dict[str, Any]
    """The JSON-able model spec it was built from, e.g. ``{"kind": "linear"}``."""
    task: str
    """``"regression"`` or ``"classification"``; must match the dataset's task."""
    n_features: int
    n_outputs: int

    @abstractmethod
    def param_specs(self) -> list[ParamSpec]:
        """The model's tensors, sorted by name."""

    def init_params(self, seed: int) -> dict[str, npt.NDArray[np.float32]]:
        """Initial parameters: ``materialize(self.param_specs(), seed)``."""
        return materialize(self.param_specs(), seed)

    # ``X`` is a float array ``(batch, n_features)`` for dense models and whatever ``prepare``
    # returns for the others (a SparseBatch for the CTR models), hence ``Any``.
    @abstractmethod
    def loss_and_grad(
        self, params: Mapping[str, FloatArray], X: Any, y: npt.NDArray[Any],
        out: Mapping[str, FloatArray] | None = None,
    ) -> tuple[float, dict[str, FloatArray]]:
        """Mean loss over the batch and its gradient per parameter: fresh arrays, or the arrays
        of ``out`` (shaped as ``params``) the gradient was written into (a model may write some
        or none of them: the caller takes what is returned)."""

    @abstractmethod
    def evaluate(self, params: Mapping[str, FloatArray], X: Any, y: npt.NDArray[Any]) -> EvalResult:
        """Mean loss (and accuracy for classification) without computing gradients."""

    # -- embedding tables (models without tables keep these defaults) ----------------------
    def tables(self) -> dict[str, int]:
        """Table parameter name -> row width (dim). Such a parameter is passed to
        ``loss_and_grad`` as a :class:`worker.sparse.RowBlock` of (at least) the rows a batch
        needs, and its gradient comes back as a RowBlock of exactly those rows."""
        return {}

    def prepare(self, X: Any) -> Any:
        """Turn a dataset's ``X`` into what ``loss_and_grad``/``evaluate`` take; a worker calls
        this once per data set (e.g. hashing raw feature ids into table rows)."""
        return X

    def rows_needed(self, X: Any) -> dict[str, npt.NDArray[np.int64]]:
        """Per table, the sorted unique row ids a *prepared* batch touches (what to pull)."""
        return {}

    # -- shared input checks -------------------------------------------------------------
    def _weights(self, params: Mapping[str, FloatArray]) -> tuple[list[FloatArray], np.dtype[Any]]:
        """Fetch parameters in spec order, checking presence, shape and a common float dtype."""
        arrays: list[FloatArray] = []
        dtype: np.dtype[Any] | None = None
        for spec in self.param_specs():
            if spec.name not in params:
                raise ValueError(f"missing parameter {spec.name!r}; expected {[s.name for s in self.param_specs()]}")
            a = params[spec.name]
            if a.shape != spec.shape:
                raise ValueError(f"parameter {spec.name!r} has shape {a.shape}, expected {spec.shape}")
            if a.dtype not in (np.float32, np.float64) or (dtype is not None and a.dtype != dtype):
                raise ValueError(f"parameter {spec.name!r} has dtype {a.dtype}; use float32 for all parameters")
            dtype = a.dtype
            arrays.append(a)
        assert dtype is not None
        return arrays, dtype

    def _inputs(self, X: npt.NDArray[Any], dtype: np.dtype[Any]) -> FloatArray:
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"X must have shape (batch, {self.n_features}), got {X.shape}")
        if X.shape[0] == 0:
            raise ValueError("empty batch: X has no rows")
        return np.ascontiguousarray(X, dtype=dtype)


def _labels(y: npt.NDArray[Any], batch: int, n_classes: int) -> npt.NDArray[np.intp]:
    """Validate integer class labels of shape (batch,) in [0, n_classes)."""
    if y.ndim != 1 or y.shape[0] != batch:
        raise ValueError(f"labels y must have shape ({batch},), got {y.shape}")
    if y.dtype.kind not in "iu":
        raise ValueError(f"labels y must be integers (int64), got dtype {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes}), got range [{lo}, {hi}]")
    return y.astype(np.intp, copy=False)


def _softmax_xent(logits: FloatArray, y: npt.NDArray[np.intp], want_grad: bool) -> tuple[float, FloatArray]:
    """Mean cross-entropy of ``logits`` against labels, numerically stable.

    Overwrites ``logits`` (the caller's scratch) with ``(softmax - onehot) / B`` when
    ``want_grad``, which is ∂L/∂logits for the mean loss; returns ``(loss, that array)``.
    """
    batch = logits.shape[0]
    rows = np.arange(batch)
    logits -= logits.max(axis=1, keepdims=True)  # log-softmax shift: max logit becomes 0
    picked = logits[rows, y]  # fancy indexing copies, so it survives the in-place exp below
    np.exp(logits, out=logits)
    sums = logits.sum(axis=1)
    loss = float(np.mean(np.log(sums) - picked, dtype=np.float64))
    if want_grad:
        logits /= sums[:, None]
        logits[rows, y] -= 1.0
        logits *= logits.dtype.type(1.0 / batch)
    return loss, logits


def _accuracy(logits: FloatArray, y: npt.NDArray[np.intp]) -> float:
    return float(np.mean(logits.argmax(axis=1) == y))


def _is_int(v: object) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _check_dims(n_features: int, n_outputs: int, min_outputs: int) -> None:
    if not _is_int(n_features) or n_features < 1:
        raise ModelSpecError(f"n_features must be a positive integer, got {n_features!r}")
    if not _is_int(n_outputs) or n_outputs < min_outputs:
        what = "classes" if min_outputs > 1 else "outputs"
        raise ModelSpecError(f"this model needs at least {min_outputs} {what}, got {n_outputs!r}")


