"""Models in pure numpy: parameter specs, deterministic init, loss and gradient (conventions:
``base``), and their construction from the JSON-able spec a run carries.

Models: :class:`LinearRegression` (seed formulas 1-3), :class:`SoftmaxRegression` (``linear``), and
:class:`MLP` (formulas 4-8 with a softmax cross-entropy output, ``mlp``). Build them from a spec with
:func:`parse_model` (CLI text -> spec) and :func:`build_model`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import ACTIVATIONS, EvalResult, Model, ModelSpecError, ParamSpec, _is_int, materialize, num_params
from .linear import LinearRegression, SoftmaxRegression
from .mlp import MLP

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

_MODEL_FORMS = (
    "accepted model forms: 'linear', 'softmax', 'mlp:H1[,H2,...][:ACTIVATION]' "
    "(e.g. 'mlp:64', 'mlp:128,64', 'mlp:64:tanh'); activations: relu, tanh, sigmoid"
)


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
