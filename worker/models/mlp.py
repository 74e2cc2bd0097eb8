"""A multi-layer perceptron with backprop (the seed's formulas 4-8) and a softmax cross-entropy output."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .base import (
    ACTIVATIONS,
    EvalResult,
    FloatArray,
    Model,
    ModelSpecError,
    ParamSpec,
    _accuracy,
    _check_dims,
    _is_int,
    _labels,
    _softmax_xent,
)

__all__ = ["MLP"]


class MLP(Model):
    """Fully connected network: hidden layers with ``activation``, then softmax cross-entropy.

    Forward (seed formulas 5-6, rows as samples): ``z_l = a_{l-1} @ W_l + b_l``,
    ``a_l = f(z_l)`` with ``a_0 = X``; the last layer's ``z`` are the logits. Backward (formula
    7): ``δ_L = (softmax − onehot) / B`` at the output, ``δ_l = (δ_{l+1} @ W_{l+1}ᵀ) · f′(z_l)``
    = ``∂L/∂a_l · f′(z_l)``, and ``∂L/∂W_l = a_{l-1}ᵀ δ_l``, ``∂L/∂b_l = Σ_rows δ_l``. The update
    (formula 8) happens on the server. The seed's squared loss (formula 4) is replaced by
    cross-entropy, the usual loss for classification; the chain rule is unchanged.
    ``f′`` is computed from ``a_l`` (relu: ``a > 0``; tanh: ``1 − a²``; sigmoid: ``a(1 − a)``),
    so only activations are kept for the backward pass.

    Init: hidden weights He-normal (std ``sqrt(2 / fan_in)``) for relu, Glorot-uniform (limit
    ``sqrt(6 / (fan_in + fan_out))``) for tanh/sigmoid; the output layer is Glorot-uniform (it
    feeds softmax, not the activation); biases zero. Parameters: ``layer{i}.weight`` and
    ``layer{i}.bias``, ``i = 0`` the first hidden layer, ``i = len(hidden)`` the output layer.
    """

    task = "classification"

    def __init__(self, n_features: int, hidden: Sequence[int], n_classes: int, activation: str = "relu") -> None:
        _check_dims(n_features, n_classes, min_outputs=2)
        hidden = tuple(hidden)
        if not hidden or any(not _is_int(h) or h < 1 for h in hidden):
            raise ModelSpecError(f"mlp hidden sizes must be a non-empty list of positive integers, got {list(hidden)}")
        if activation not in ACTIVATIONS:
            raise ModelSpecError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")
        self.n_features, self.n_outputs = n_features, n_classes
        self.hidden, self.activation = hidden, activation
        self.spec = {"kind": "mlp", "hidden": list(hidden), "activation": activation}
        sizes = (n_features, *hidden, n_classes)
        self._layers = list(itertools.pairwise(sizes))
        specs: list[ParamSpec] = []
        for i, (fan_in, fan_out) in enumerate(self._layers):
            if activation == "relu" and i < len(hidden):
                w = ParamSpec(f"layer{i}.weight", (fan_in, fan_out), "normal", math.sqrt(2.0 / fan_in))
            else:
                w = ParamSpec(f"layer{i}.weight", (fan_in, fan_out), "uniform", math.sqrt(6.0 / (fan_in + fan_out)))
            specs += [ParamSpec(f"layer{i}.bias", (fan_out,), "zeros", 0.0), w]
        self._specs = sorted(specs, key=lambda s: s.name)

    def param_specs(self) -> list[ParamSpec]:
        return list(self._specs)

    def _forward(
        self, params: Mapping[str, FloatArray], X: npt.NDArray[Any], y: npt.NDArray[Any]
    ) -> tuple[list[FloatArray], list[FloatArray], FloatArray, npt.NDArray[np.intp]]:
        """Return (weights by layer, activations a_0..a_{L-1}, logits, labels)."""
        _, dtype = self._weights(params)  # validates every tensor
        Ws = [params[f"layer{i}.weight"] for i in range(len(self._layers))]
        bs = [params[f"layer{i}.bias"] for i in range(len(self._layers))]
        a = self._inputs(X, dtype)
        labels = _labels(y, a.shape[0], self.n_outputs)
        acts = [a]
        for W, b in zip(Ws[:-1], bs[:-1], strict=True):
            z = a @ W
            z += b
            a = self._activate(z)  # in place: z becomes a
            acts.append(a)
        logits = a @ Ws[-1]
        logits += bs[-1]
        return Ws, acts, logits, labels

    def _activate(self, z: FloatArray) -> FloatArray:
        if self.activation == "relu":
            np.maximum(z, 0, out=z)
        elif self.activation == "tanh":
            np.tanh(z, out=z)
        else:  # sigmoid(z) = (1 + tanh(z/2)) / 2: no overflow for large |z|
            z *= z.dtype.type(0.5)
            np.tanh(z, out=z)
            z += 1
            z *= z.dtype.type(0.5)
        return z

    def _times_derivative(self, grad_a: FloatArray, a: FloatArray) -> FloatArray:
        """δ = ∂L/∂a · f′(z), with f′ expressed through a = f(z); overwrites grad_a."""
        if self.activation == "relu":
            grad_a *= a > 0
        elif self.activation == "tanh":
            d: FloatArray = a * a
            np.subtract(1, d, out=d)
            grad_a *= d
        else:
            d = 1 - a
            d *= a
            grad_a *= d
        return grad_a

    def loss_and_grad(
        self, params: Mapping[str, FloatArray], X: npt.NDArray[Any], y: npt.NDArray[Any],
        out: Mapping[str, FloatArray] | None = None,
    ) -> tuple[float, dict[str, FloatArray]]:
        Ws, acts, logits, labels = self._forward(params, X, y)
        loss, delta = _softmax_xent(logits, labels, want_grad=True)
        grads: dict[str, FloatArray] = {}
        for i in range(len(Ws) - 1, -1, -1):
            w, b = f"layer{i}.weight", f"layer{i}.bias"
            grads[w] = np.matmul(acts[i].T, delta, out=out[w]) if out else acts[i].T @ delta
            grads[b] = delta.sum(axis=0, out=out[b] if out else None)
            if i > 0:  # no gradient is needed for the input X
                delta = self._times_derivative(delta @ Ws[i].T, acts[i])
        return loss, grads

    def evaluate(self, params: Mapping[str, FloatArray], X: npt.NDArray[Any], y: npt.NDArray[Any]) -> EvalResult:
        _, _, logits, labels = self._forward(params, X, y)
        acc = _accuracy(logits, labels)
        loss, _ = _softmax_xent(logits, labels, want_grad=False)
        return EvalResult(loss, acc)


