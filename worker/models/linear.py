"""Linear models: least squares (the seed's formulas 1-3) and softmax regression."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from .base import EvalResult, FloatArray, Model, ParamSpec, _accuracy, _check_dims, _labels, _softmax_xent

__all__ = ["LinearRegression", "SoftmaxRegression"]


class LinearRegression(Model):
    """``f = X @ W + b`` with squared loss ``½ · mean_i ‖yᵢ − f(xᵢ)‖²`` (seed formulas 1-3).

    ``y`` may be ``(B,)`` when ``n_outputs == 1`` or ``(B, n_outputs)``. Gradient:
    ``r = f − y``, ``∂L/∂W = Xᵀ r / B``, ``∂L/∂b = Σᵢ rᵢ / B``. Parameters start at zero.
    """

    task = "regression"

    def __init__(self, n_features: int, n_outputs: int = 1) -> None:
        _check_dims(n_features, n_outputs, min_outputs=1)
        self.n_features, self.n_outputs = n_features, n_outputs
        self.spec = {"kind": "linear"}

    def param_specs(self) -> list[ParamSpec]:
        return [
            ParamSpec("linear.bias", (self.n_outputs,), "zeros", 0.0),
            ParamSpec("linear.weight", (self.n_features, self.n_outputs), "zeros", 0.0),
        ]

    def _residual(
        self, params: Mapping[str, FloatArray], X: npt.NDArray[Any], y: npt.NDArray[Any]
    ) -> tuple[FloatArray, FloatArray]:
        (b, W), dtype = self._weights(params)
        Xc = self._inputs(X, dtype)
        B = Xc.shape[0]
        if y.shape == (B,) and self.n_outputs == 1:
            y2 = y.reshape(B, 1)
        elif y.shape == (B, self.n_outputs):
            y2 = y
        else:
            want = f"({B},) or ({B}, 1)" if self.n_outputs == 1 else f"({B}, {self.n_outputs})"
            raise ValueError(f"targets y must have shape {want}, got {y.shape}")
        r = Xc @ W
        r += b
        r -= y2  # r = f - y, in the parameters' dtype
        return Xc, r

    def loss_and_grad(
        self, params: Mapping[str, FloatArray], X: npt.NDArray[Any], y: npt.NDArray[Any],
        out: Mapping[str, FloatArray] | None = None,
    ) -> tuple[float, dict[str, FloatArray]]:
        Xc, r = self._residual(params, X, y)
        B = Xc.shape[0]
        loss = 0.5 * float(np.einsum("ij,ij->", r, r, dtype=np.float64)) / B
        r *= r.dtype.type(1.0 / B)
        return loss, _bias_and_weight("linear", Xc, r, out)

    def evaluate(self, params: Mapping[str, FloatArray], X: npt.NDArray[Any], y: npt.NDArray[Any]) -> EvalResult:
        Xc, r = self._residual(params, X, y)
        return EvalResult(0.5 * float(np.einsum("ij,ij->", r, r, dtype=np.float64)) / Xc.shape[0], None)


class SoftmaxRegression(Model):
    """Multinomial logistic regression: ``logits = X @ W + b``, mean cross-entropy.

    Labels are integers in ``[0, n_classes)``. ``∂L/∂logits = (softmax − onehot) / B``.
    Parameters start at zero (the loss is convex, so no symmetry to break).
    """

    task = "classification"

    def __init__(self, n_features: int, n_classes: int) -> None:
        _check_dims(n_features, n_classes, min_outputs=2)
        self.n_features, self.n_outputs = n_features, n_classes
        self.spec = {"kind": "softmax"}

    def param_specs(self) -> list[ParamSpec]:
        return [
            ParamSpec("softmax.bias", (self.n_outputs,), "zeros", 0.0),
            ParamSpec("softmax.weight", (self.n_features, self.n_outputs), "zeros", 0.0),
        ]

    def _logits(
        self, params: Mapping[str, FloatArray], X: npt.NDArray[Any], y: npt.NDArray[Any]
    ) -> tuple[FloatArray, FloatArray, npt.NDArray[np.intp]]:
        (b, W), dtype = self._weights(params)
        Xc = self._inputs(X, dtype)
        labels = _labels(y, Xc.shape[0], self.n_outputs)
        logits = Xc @ W
        logits += b
        return Xc, logits, labels

    def loss_and_grad(
        self, params: Mapping[str, FloatArray], X: npt.NDArray[Any], y: npt.NDArray[Any],
        out: Mapping[str, FloatArray] | None = None,
    ) -> tuple[float, dict[str, FloatArray]]:
        Xc, logits, labels = self._logits(params, X, y)
        loss, d = _softmax_xent(logits, labels, want_grad=True)
        return loss, _bias_and_weight("softmax", Xc, d, out)

    def evaluate(self, params: Mapping[str, FloatArray], X: npt.NDArray[Any], y: npt.NDArray[Any]) -> EvalResult:
        _, logits, labels = self._logits(params, X, y)
        acc = _accuracy(logits, labels)
        loss, _ = _softmax_xent(logits, labels, want_grad=False)
        return EvalResult(loss, acc)


def _bias_and_weight(layer: str, X: FloatArray, d: FloatArray, out: Mapping[str, FloatArray] | None) -> dict[str, FloatArray]:
    """The gradient of ``X @ W + b`` given ``d`` = ∂L/∂output: ``Σ_rows d`` and ``Xᵀ d`` (into ``out``'s arrays)."""
    bias, weight = f"{layer}.bias", f"{layer}.weight"
    return {bias: d.sum(axis=0, out=out[bias] if out else None),
            weight: np.matmul(X.T, d, out=out[weight]) if out else X.T @ d}
