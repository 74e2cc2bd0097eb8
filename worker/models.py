"""Models in pure numpy: parameter specs, deterministic init, loss and gradient.

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

Models: :class:`LinearRegression` (seed formulas 1-3), :class:`SoftmaxRegression`, and
:class:`MLP` (formulas 4-8 with a softmax cross-entropy output). Build them from a JSON-able spec
with :func:`parse_model` and :func:`build_model`.

Errors::

    ValueError
     ├── ModelSpecError   bad model text/spec (message lists the accepted forms)
     └── (plain)          arrays of the wrong shape, dtype or label range
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "EvalResult",
    "LinearRegression",
    "Model",
    "ModelSpecError",
    "ParamSpec",
    "SoftmaxRegression",
    "build_model",
    "materialize",
    "num_params",
    "parse_model",
]

FloatArray = npt.NDArray[np.floating[Any]]

ACTIVATIONS = ("relu", "tanh", "sigmoid")
"""Hidden-layer activations accepted by :class:`MLP`."""

_INITS = ("zeros", "normal", "uniform")
_MODEL_FORMS = (
    "accepted model forms: 'linear', 'softmax', 'mlp:H1[,H2,...][:ACTIVATION]' "
    "(e.g. 'mlp:64', 'mlp:128,64', 'mlp:64:tanh'); activations: relu, tanh, sigmoid"
)


class ModelSpecError(ValueError):
    """A model text or spec is malformed; the message says what to fix."""


@dataclass(frozen=True)
class ParamSpec:
    """One named tensor of a model.

    ``init`` is ``"zeros"``, ``"normal"`` (``scale`` = standard deviation) or ``"uniform"``
    (values in ``[-scale, scale)``); ``scale`` is 0 for zeros.
    """

    name: str
    shape: tuple[int, ...]
    init: str
    scale: float

    def __post_init__(self) -> None:
        if self.init not in _INITS:
            raise ModelSpecError(f"ParamSpec {self.name!r}: init must be one of {_INITS}, got {self.init!r}")
        if any(d < 0 for d in self.shape):
            raise ModelSpecError(f"ParamSpec {self.name!r}: negative dimension in shape {self.shape}")
        if not (self.scale >= 0.0 and math.isfinite(self.scale)):
            raise ModelSpecError(f"ParamSpec {self.name!r}: scale must be finite and >= 0, got {self.scale}")


@dataclass(frozen=True)
class EvalResult:
    """Mean loss over the evaluated examples; accuracy in [0, 1], or None for regression."""

    loss: float
    accuracy: float | None


def materialize(specs: Sequence[ParamSpec], seed: int) -> dict[str, npt.NDArray[np.float32]]:
    """Create the initial parameters for ``specs`` deterministically from ``seed``.

    The rule (kept exactly so other processes can reproduce it): the i-th spec draws from
    ``np.random.default_rng([seed, i])`` -- ``zeros`` -> ``np.zeros``, ``normal`` ->
    ``rng.normal(0.0, scale, shape)``, ``uniform`` -> ``rng.uniform(-scale, scale, shape)`` --
    then ``.astype(np.float32)``. Each tensor has its own stream, so changing one shape does not
    change the others.
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

    @abstractmethod
    def loss_and_grad(
        self, params: Mapping[str, FloatArray], X: npt.NDArray[Any], y: npt.NDArray[Any]
    ) -> tuple[float, dict[str, FloatArray]]:
        """Mean loss over the batch and its gradient per parameter (fresh arrays)."""

    @abstractmethod
    def evaluate(self, params: Mapping[str, FloatArray], X: npt.NDArray[Any], y: npt.NDArray[Any]) -> EvalResult:
        """Mean loss (and accuracy for classification) without computing gradients."""

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
        self, params: Mapping[str, FloatArray], X: npt.NDArray[Any], y: npt.NDArray[Any]
    ) -> tuple[float, dict[str, FloatArray]]:
        Xc, r = self._residual(params, X, y)
        B = Xc.shape[0]
        loss = 0.5 * float(np.einsum("ij,ij->", r, r, dtype=np.float64)) / B
        r *= r.dtype.type(1.0 / B)
        return loss, {"linear.bias": r.sum(axis=0), "linear.weight": Xc.T @ r}

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
        self, params: Mapping[str, FloatArray], X: npt.NDArray[Any], y: npt.NDArray[Any]
    ) -> tuple[float, dict[str, FloatArray]]:
        Xc, logits, labels = self._logits(params, X, y)
        loss, d = _softmax_xent(logits, labels, want_grad=True)
        return loss, {"softmax.bias": d.sum(axis=0), "softmax.weight": Xc.T @ d}

    def evaluate(self, params: Mapping[str, FloatArray], X: npt.NDArray[Any], y: npt.NDArray[Any]) -> EvalResult:
        _, logits, labels = self._logits(params, X, y)
        acc = _accuracy(logits, labels)
        loss, _ = _softmax_xent(logits, labels, want_grad=False)
        return EvalResult(loss, acc)


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
        self, params: Mapping[str, FloatArray], X: npt.NDArray[Any], y: npt.NDArray[Any]
    ) -> tuple[float, dict[str, FloatArray]]:
        Ws, acts, logits, labels = self._forward(params, X, y)
        loss, delta = _softmax_xent(logits, labels, want_grad=True)
        grads: dict[str, FloatArray] = {}
        for i in range(len(Ws) - 1, -1, -1):
            grads[f"layer{i}.weight"] = acts[i].T @ delta
            grads[f"layer{i}.bias"] = delta.sum(axis=0)
            if i > 0:  # no gradient is needed for the input X
                delta = self._times_derivative(delta @ Ws[i].T, acts[i])
        return loss, grads

    def evaluate(self, params: Mapping[str, FloatArray], X: npt.NDArray[Any], y: npt.NDArray[Any]) -> EvalResult:
        _, _, logits, labels = self._forward(params, X, y)
        acc = _accuracy(logits, labels)
        loss, _ = _softmax_xent(logits, labels, want_grad=False)
        return EvalResult(loss, acc)


def _is_int(v: object) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _check_dims(n_features: int, n_outputs: int, min_outputs: int) -> None:
    if not _is_int(n_features) or n_features < 1:
        raise ModelSpecError(f"n_features must be a positive integer, got {n_features!r}")
    if not _is_int(n_outputs) or n_outputs < min_outputs:
        what = "classes" if min_outputs > 1 else "outputs"
        raise ModelSpecError(f"this model needs at least {min_outputs} {what}, got {n_outputs!r}")


def parse_model(text: str) -> dict[str, Any]:
    """Turn a CLI model string into a JSON-able spec.

    ``"linear"`` -> ``{"kind": "linear"}``; ``"softmax"`` -> ``{"kind": "softmax"}``;
    ``"mlp:128,64[:tanh]"`` -> ``{"kind": "mlp", "hidden": [128, 64], "activation": "tanh"}``
    (activation defaults to relu). Raises :class:`ModelSpecError` listing the accepted forms.
    """
    parts = text.strip().split(":")
    kind = parts[0].strip().lower()
    if kind in ("linear", "softmax") and len(parts) == 1:
        return {"kind": kind}
    if kind == "mlp" and len(parts) in (2, 3):
        try:
            hidden = [int(h) for h in parts[1].split(",")]
        except ValueError:
            raise ModelSpecError(f"bad hidden sizes {parts[1]!r} in model {text!r}; {_MODEL_FORMS}") from None
        activation = parts[2].strip().lower() if len(parts) == 3 else "relu"
        spec: dict[str, Any] = {"kind": "mlp", "hidden": hidden, "activation": activation}
        _validate_mlp(spec)
        return spec
    raise ModelSpecError(f"cannot parse model {text!r}; {_MODEL_FORMS}")


def _validate_mlp(spec: Mapping[str, Any]) -> None:
    unknown = set(spec) - {"kind", "hidden", "activation"}
    if unknown:
        raise ModelSpecError(f"unknown mlp spec keys {sorted(unknown)}; allowed: kind, hidden, activation")
    hidden = spec.get("hidden")
    if not isinstance(hidden, list | tuple) or not hidden or any(not _is_int(h) or h < 1 for h in hidden):
        raise ModelSpecError(f"mlp 'hidden' must be a non-empty list of positive integers, got {hidden!r}")
    activation = spec.get("activation", "relu")
    if activation not in ACTIVATIONS:
        raise ModelSpecError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")


def build_model(spec: Mapping[str, Any], n_features: int, n_outputs: int) -> Model:
    """Build the model described by ``spec`` for data with ``n_features`` inputs.

    ``n_outputs`` is the number of classes (softmax, mlp) or regression outputs (linear).
    Checking that ``model.task`` matches the dataset's task is the caller's job.
    Raises :class:`ModelSpecError` naming what to fix.
    """
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ModelSpecError(f"model spec must be a mapping with a 'kind', got {spec!r}; {_MODEL_FORMS}")
    kind = spec["kind"]
    if kind in ("linear", "softmax"):
        if set(spec) != {"kind"}:
            raise ModelSpecError(f"{kind} model takes no options, got {sorted(set(spec) - {'kind'})}")
        if kind == "linear":
            return LinearRegression(n_features, n_outputs)
        return SoftmaxRegression(n_features, n_outputs)
    if kind == "mlp":
        _validate_mlp(spec)
        return MLP(n_features, tuple(spec["hidden"]), n_outputs, spec.get("activation", "relu"))
    raise ModelSpecError(f"unknown model kind {kind!r}; {_MODEL_FORMS}")
