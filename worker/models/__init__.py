"""Models in pure numpy: parameter specs, deterministic init, loss and gradient (conventions:
``base``), and their construction from the JSON-able spec a run carries.

Models: :class:`LinearRegression` (seed formulas 1-3), :class:`SoftmaxRegression` (``linear``),
:class:`MLP` (formulas 4-8 with a softmax cross-entropy output, ``mlp``), and the CTR models over an
embedding table, :class:`LogisticRegression` and :class:`FactorizationMachine` (``ctr``), and
:class:`MatrixFactorization` over user and item tables (``mf``). Build them
from a spec with :func:`parse_model` (CLI text -> spec) and :func:`build_model`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import (
    _MODEL_FORMS,
    ACTIVATIONS,
    EvalResult,
    Model,
    ModelSpecError,
    ParamSpec,
    _is_int,
    materialize,
    num_params,
)
from .ctr import DEFAULT_ROWS, MAX_ROWS, FactorizationMachine, LogisticRegression
from .linear import LinearRegression, SoftmaxRegression
from .mf import MatrixFactorization
from .mlp import MLP

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "EvalResult",
    "FactorizationMachine",
    "LinearRegression",
    "LogisticRegression",
    "MatrixFactorization",
    "Model",
    "ModelSpecError",
    "ParamSpec",
    "SoftmaxRegression",
    "build_model",
    "materialize",
    "model_task",
    "num_params",
    "parse_model",
]

def parse_model(text: str) -> dict[str, Any]:
    """Turn a CLI model string into a JSON-able spec.

    ``"linear"`` -> ``{"kind": "linear"}``; ``"softmax"`` -> ``{"kind": "softmax"}``;
    ``"mlp:128,64[:tanh]"`` -> ``{"kind": "mlp", "hidden": [128, 64], "activation": "tanh"}``
    (activation defaults to relu); ``"logistic[:rows=N]"`` -> ``{"kind": "logistic", "rows": N}``;
    ``"fm:K[:rows=N]"`` -> ``{"kind": "fm", "factors": K, "rows": N}`` (rows default 2**20);
    ``"mf:K[:reg=L]"`` -> ``{"kind": "mf", "factors": K, "reg": L}`` (reg default 0).
    Raises :class:`ModelSpecError` listing the accepted forms.
    """
    parts = text.strip().split(":")
    kind = parts[0].strip().lower()
    if kind in ("linear", "softmax") and len(parts) == 1:
        return {"kind": kind}
    if kind == "mlp" and len(parts) in (2, 3):
        # (in the text's terms: the spec's checks below speak of its JSON keys, 'hidden')
        bad_sizes = ModelSpecError(f"bad hidden sizes {parts[1]!r} in model {text!r}: the hidden layers' widths "
                                   "must be positive integers, comma-separated (e.g. 'mlp:64', 'mlp:128,64', "
                                   "'mlp:64:tanh')")
        try:
            hidden = [int(h) for h in parts[1].split(",")]
        except ValueError:
            raise bad_sizes from None
        if any(h < 1 for h in hidden):
            raise bad_sizes
        activation = parts[2].strip().lower() if len(parts) == 3 else "relu"
        if activation not in ACTIVATIONS:
            raise ModelSpecError(f"unknown activation {parts[2]!r} in model {text!r}: use one of "
                                 f"{', '.join(ACTIVATIONS)} (more hidden layers go after a comma: 'mlp:128,64')")
        spec: dict[str, Any] = {"kind": "mlp", "hidden": hidden, "activation": activation}
        _validate_mlp(spec)
        return spec
    if kind == "logistic" and len(parts) in (1, 2):
        spec = {"kind": "logistic", "rows": _parse_rows(parts[1:], text)}
        _validate_ctr(spec)
        return spec
    if kind == "fm" and len(parts) in (2, 3):
        spec = {"kind": "fm", "factors": _int_option(parts[1], "factor count", text),
                "rows": _parse_rows(parts[2:], text)}
        _validate_ctr(spec)
        return spec
    if kind == "mf" and len(parts) in (2, 3):
        spec = {"kind": "mf", "factors": _int_option(parts[1], "factor count", text), "reg": 0.0}
        if len(parts) == 3:
            key, _, value = parts[2].partition("=")
            if key.strip().lower() != "reg":
                raise ModelSpecError(f"expected 'reg=L' in model {text!r}, got {parts[2]!r}; {_MODEL_FORMS}")
            try:
                spec["reg"] = float(value)
            except ValueError:
                raise ModelSpecError(f"bad regularisation {value!r} in model {text!r}; {_MODEL_FORMS}") from None
        _validate_mf(spec)
        return spec
    raise ModelSpecError(f"cannot parse model {text!r}; {_MODEL_FORMS}")


def _int_option(value: str, what: str, text: str) -> int:
    """A positive integer of a model text."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ModelSpecError(f"bad {what} {value!r} in model {text!r}: use a positive integer; {_MODEL_FORMS}")
    return number


def _validate_mf(spec: Mapping[str, Any]) -> None:
    unknown = set(spec) - {"kind", "factors", "reg"}
    if unknown:
        raise ModelSpecError(f"unknown mf spec keys {sorted(unknown)}; allowed: factors, kind, reg")
    MatrixFactorization(spec.get("factors"), 1, 1, spec.get("reg", 0.0))  # type: ignore[arg-type]  # checks them


def _parse_rows(rest: list[str], text: str) -> int:
    """The optional trailing ``rows=N`` of a CTR model text (N an integer, or ``2**k``)."""
    if not rest:
        return DEFAULT_ROWS
    key, _, value = rest[0].partition("=")
    if key.strip().lower() != "rows" or not value.strip():
        raise ModelSpecError(f"expected 'rows=N' in model {text!r}, got {rest[0]!r}; {_MODEL_FORMS}")
    value = value.strip()
    try:
        if value.startswith("2**"):
            return int(2 ** int(value[3:]))
        return int(value)
    except ValueError:
        raise ModelSpecError(f"bad row count {value!r} in model {text!r}; {_MODEL_FORMS}") from None


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


def _validate_ctr(spec: Mapping[str, Any]) -> None:
    kind = spec["kind"]
    allowed = {"kind", "rows"} | ({"factors"} if kind == "fm" else set())
    unknown = set(spec) - allowed
    if unknown:
        raise ModelSpecError(f"unknown {kind} spec keys {sorted(unknown)}; allowed: {', '.join(sorted(allowed))}")
    rows = spec.get("rows", DEFAULT_ROWS)
    if not _is_int(rows) or not 1 <= rows <= MAX_ROWS:
        raise ModelSpecError(f"{kind} 'rows' must be an integer in [1, 2**40], got {rows!r}; {_MODEL_FORMS}")
    if kind == "fm":
        factors: Any = spec.get("factors")
        if not _is_int(factors) or factors < 1:
            raise ModelSpecError(f"fm 'factors' must be a positive integer, got {factors!r}; {_MODEL_FORMS}")


_TASKS: dict[str, str] = {"linear": LinearRegression.task, "softmax": SoftmaxRegression.task, "mlp": MLP.task,
                          "logistic": LogisticRegression.task, "fm": FactorizationMachine.task,
                          "mf": MatrixFactorization.task}


def model_task(spec: Mapping[str, Any]) -> str | None:
    """The task a spec's model does (``Model.task``), known before it is built for a dataset's
    shape (which fails for another task's data: an MLP on one regression output); None: unknown kind."""
    kind = spec.get("kind") if isinstance(spec, Mapping) else None
    return _TASKS.get(kind) if isinstance(kind, str) else None


def build_model(spec: Mapping[str, Any], n_features: int, n_outputs: int) -> Model:
    """Build the model described by ``spec`` for data with ``n_features`` inputs.

    ``n_outputs`` is the number of classes (softmax, mlp) or regression outputs (linear); ``mf``
    takes a ratings dataset's users and items as ``n_features`` and ``n_outputs``; the CTR
    models (logistic, fm) ignore both, their inputs being hashed into a table of ``rows`` rows.
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
    if kind == "logistic":
        _validate_ctr(spec)
        return LogisticRegression(spec.get("rows", DEFAULT_ROWS))
    if kind == "fm":
        _validate_ctr(spec)
        return FactorizationMachine(spec["factors"], spec.get("rows", DEFAULT_ROWS))
    if kind == "mf":
        _validate_mf(spec)
        return MatrixFactorization(spec["factors"], n_features, n_outputs, spec.get("reg", 0.0))
    raise ModelSpecError(f"unknown model kind {kind!r}; {_MODEL_FORMS}")
