"""Unit tests for worker.models: gradients, training sanity, init rule, spec parsing."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from worker.datasets import load_dataset, parse_dataset
from worker.models import (
    MLP,
    EvalResult,
    LinearRegression,
    Model,
    ModelSpecError,
    ParamSpec,
    SoftmaxRegression,
    build_model,
    materialize,
    num_params,
    parse_model,
)

pytestmark = pytest.mark.timeout(60)

B = 7  # batch size for gradient checks


def _random_params(model: Model, seed: int, dtype: Any) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: rng.normal(0.0, 0.5, s.shape).astype(dtype) for s in model.param_specs()}


def _batch(model: Model, seed: int, y_shape: str = "1d") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(B, model.n_features))
    if model.task == "classification":
        y = rng.integers(0, model.n_outputs, size=B).astype(np.int64)
    elif y_shape == "1d":
        y = rng.normal(size=B)
    else:
        y = rng.normal(size=(B, model.n_outputs))
    return X, y


def _numeric_grad(model: Model, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    eps = 1e-6
    out = {}
    for name, p in params.items():
        g = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + eps
            up, _ = model.loss_and_grad(params, X, y)
            p[idx] = old - eps
            down, _ = model.loss_and_grad(params, X, y)
            p[idx] = old
            g[idx] = (up - down) / (2 * eps)
        out[name] = g
    return out


GRAD_CASES = [
    pytest.param(lambda: LinearRegression(4, 1), "1d", id="linear-y1d"),
    pytest.param(lambda: LinearRegression(4, 3), "2d", id="linear-y2d"),
    pytest.param(lambda: LinearRegression(4, 1), "2d", id="linear-y2d-one-output"),
    pytest.param(lambda: SoftmaxRegression(4, 3), "1d", id="softmax"),
    *[
        pytest.param(lambda a=act, h=hidden: MLP(4, h, 3, a), "1d", id=f"mlp-{act}-{len(hidden)}layer")
        for act in ("relu", "tanh", "sigmoid")
        for hidden in ((5,), (6, 4))
    ],
]


@pytest.mark.parametrize(("make", "y_shape"), GRAD_CASES)
def test_gradient_matches_central_differences_in_float64(make: Any, y_shape: str) -> None:
    model: Model = make()
    params = _random_params(model, 1, np.float64)
    X, y = _batch(model, 2, y_shape)
    loss, grads = model.loss_and_grad(params, X, y)
    numeric = _numeric_grad(model, params, X, y)
    assert set(grads) == {s.name for s in model.param_specs()}
    for name, g in grads.items():
        assert g.dtype == np.float64 and g.shape == params[name].shape
        err = np.linalg.norm(g - numeric[name]) / max(np.linalg.norm(g) + np.linalg.norm(numeric[name]), 1e-12)
        assert err < 1e-6, f"{name}: relative error {err:.2e}"
    assert math.isfinite(loss)


@pytest.mark.parametrize(("make", "y_shape"), GRAD_CASES)
def test_float32_gradients_are_fresh_contiguous_and_close_to_float64(make: Any, y_shape: str) -> None:
    model: Model = make()
    p64 = _random_params(model, 3, np.float64)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    X, y = _batch(model, 4, y_shape)
    X32 = X.astype(np.float32)
    before = {k: v.copy() for k, v in p32.items()}
    X_before = X32.copy()
    loss32, g32 = model.loss_and_grad(p32, X32, y)
    loss64, g64 = model.loss_and_grad(p64, X, y)
    assert loss32 == pytest.approx(loss64, rel=1e-4)
    for name, g in g32.items():
        assert g.dtype == np.float32 and g.flags.c_contiguous
        assert not np.shares_memory(g, p32[name]) and not np.shares_memory(g, X32)
        np.testing.assert_allclose(g, g64[name], rtol=1e-3, atol=1e-5)
    for k, v in p32.items():  # inputs untouched
        np.testing.assert_array_equal(v, before[k])
    np.testing.assert_array_equal(X32, X_before)
    # evaluate agrees with the training loss
    assert model.evaluate(p32, X32, y).loss == pytest.approx(loss32, rel=1e-5)


def test_loss_values_match_definitions() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(10, 3)).astype(np.float32)
    y = rng.normal(size=10).astype(np.float32)
    lin = LinearRegression(3)
    params = _random_params(lin, 0, np.float32)
    f = X @ params["linear.weight"][:, 0] + params["linear.bias"][0]
    loss, _ = lin.loss_and_grad(params, X, y)
    assert loss == pytest.approx(0.5 * np.mean((y - f) ** 2), rel=1e-5)
    assert lin.evaluate(params, X, y) == EvalResult(pytest.approx(loss), None)  # type: ignore[arg-type]

    soft = SoftmaxRegression(3, 4)
    labels = rng.integers(0, 4, 10)
    result = soft.evaluate(soft.init_params(0), X, labels)
    assert result.loss == pytest.approx(math.log(4), rel=1e-6)  # zero logits: uniform prediction
    assert result.accuracy is not None and 0.0 <= result.accuracy <= 1.0


def test_softmax_and_sigmoid_are_stable_for_huge_inputs() -> None:
    X = np.array([[1e4, -1e4], [-1e4, 1e4]], dtype=np.float32)
    y = np.array([0, 1], dtype=np.int64)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        for model in (SoftmaxRegression(2, 2), MLP(2, (3,), 2, "sigmoid"), MLP(2, (3,), 2, "tanh")):
            params = _random_params(model, 0, np.float32)
            loss, grads = model.loss_and_grad(params, X, y)
            assert math.isfinite(loss)
            assert all(np.isfinite(g).all() for g in grads.values())


def test_bad_inputs_are_rejected_with_clear_messages() -> None:
    model = SoftmaxRegression(3, 2)
    params = model.init_params(0)
    X = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"shape \(batch, 3\)"):
        model.loss_and_grad(params, np.zeros((4, 2), np.float32), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        model.loss_and_grad(params, X, np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="integers"):
        model.loss_and_grad(params, X, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="missing parameter 'softmax.weight'"):
        model.loss_and_grad({"softmax.bias": params["softmax.bias"]}, X, np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="empty batch"):
        model.loss_and_grad(params, np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
    lin = LinearRegression(3, 2)
    with pytest.raises(ValueError, match=r"targets y must have shape \(4, 2\)"):
        lin.loss_and_grad(lin.init_params(0), X, np.zeros(4, np.float32))


# -- training sanity ---------------------------------------------------------------------------

def _gradient_descent(model: Model, X: np.ndarray, y: np.ndarray, lr: float, steps: int) -> dict[str, np.ndarray]:
    params = model.init_params(0)
    for _ in range(steps):
        _, grads = model.loss_and_grad(params, X, y)
        for name, g in grads.items():
            params[name] -= np.float32(lr) * g
    return params


def test_softmax_full_batch_gd_learns_digits() -> None:
    ds = load_dataset(parse_dataset("digits"))
    model = build_model(parse_model("softmax"), ds.n_features, ds.n_outputs)
    params = _gradient_descent(model, ds.X_train, ds.y_train, lr=0.5, steps=200)
    result = model.evaluate(params, ds.X_test, ds.y_test)
    assert result.accuracy is not None and result.accuracy >= 0.9, result


def test_mlp_full_batch_gd_learns_digits() -> None:
    ds = load_dataset(parse_dataset("digits"))
    model = build_model(parse_model("mlp:32:tanh"), ds.n_features, ds.n_outputs)
    before = model.evaluate(model.init_params(0), ds.X_test, ds.y_test)
    params = _gradient_descent(model, ds.X_train, ds.y_train, lr=0.5, steps=300)
    result = model.evaluate(params, ds.X_test, ds.y_test)
    assert result.accuracy is not None and result.accuracy >= 0.9, result
    assert result.loss < before.loss


def test_linear_regression_recovers_true_weights() -> None:
    ds = load_dataset(parse_dataset("synthetic-regression"))
    model = build_model(parse_model("linear"), ds.n_features, ds.n_outputs)
    assert model.task == ds.task == "regression"
    params = _gradient_descent(model, ds.X_train, ds.y_train, lr=0.5, steps=200)
    np.testing.assert_allclose(params["linear.weight"], ds.extras["true_weight"], atol=5e-3)
    np.testing.assert_allclose(params["linear.bias"], ds.extras["true_bias"], atol=5e-3)
    result = model.evaluate(params, ds.X_test, ds.y_test)
    assert result.accuracy is None and result.loss < 1e-3  # ≈ noise²/2 = 5e-5


# -- init -----------------------------------------------------------------------------------

def test_materialize_follows_the_rule_exactly() -> None:
    specs = [
        ParamSpec("a", (3, 4), "normal", 0.7),
        ParamSpec("b", (4,), "zeros", 0.0),
        ParamSpec("c", (2, 5), "uniform", 0.3),
    ]
    params = materialize(specs, seed=42)
    np.testing.assert_array_equal(
        params["a"], np.random.default_rng([42, 0]).normal(0.0, 0.7, (3, 4)).astype(np.float32))
    np.testing.assert_array_equal(params["b"], np.zeros(4, np.float32))
    np.testing.assert_array_equal(
        params["c"], np.random.default_rng([42, 2]).uniform(-0.3, 0.3, (2, 5)).astype(np.float32))
    assert all(p.dtype == np.float32 and p.flags.c_contiguous for p in params.values())
    again = materialize(specs, seed=42)
    assert all(np.array_equal(params[k], again[k]) for k in params)
    other = materialize(specs, seed=43)
    assert not np.array_equal(params["a"], other["a"])
    assert num_params(specs) == 12 + 4 + 10


def test_model_init_params_is_materialize_of_specs() -> None:
    model = MLP(6, (5, 4), 3, "sigmoid")
    got = model.init_params(9)
    want = materialize(model.param_specs(), 9)
    assert list(got) == [s.name for s in model.param_specs()]
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_param_specs_names_order_and_count() -> None:
    model = MLP(10, (8, 6), 4)
    names = [s.name for s in model.param_specs()]
    assert names == sorted(names) == [
        "layer0.bias", "layer0.weight", "layer1.bias", "layer1.weight", "layer2.bias", "layer2.weight"]
    shapes = {s.name: s.shape for s in model.param_specs()}
    assert shapes["layer0.weight"] == (10, 8) and shapes["layer2.weight"] == (6, 4) and shapes["layer1.bias"] == (6,)
    assert num_params(model.param_specs()) == 10 * 8 + 8 + 8 * 6 + 6 + 6 * 4 + 4
    assert [s.name for s in LinearRegression(3).param_specs()] == ["linear.bias", "linear.weight"]
    assert [s.name for s in SoftmaxRegression(3, 2).param_specs()] == ["softmax.bias", "softmax.weight"]
    assert all(s.init == "zeros" for s in LinearRegression(3).param_specs())


def test_he_and_glorot_scales() -> None:
    relu = {s.name: s for s in MLP(400, (300,), 10, "relu").param_specs()}
    assert relu["layer0.weight"].init == "normal"
    assert relu["layer0.weight"].scale == pytest.approx(math.sqrt(2 / 400))
    assert relu["layer0.bias"].init == "zeros" and relu["layer0.bias"].scale == 0.0
    assert relu["layer1.weight"].init == "uniform"  # output layer feeds softmax: Glorot
    assert relu["layer1.weight"].scale == pytest.approx(math.sqrt(6 / 310))
    for act in ("tanh", "sigmoid"):
        spec = {s.name: s for s in MLP(400, (300,), 10, act).param_specs()}["layer0.weight"]
        assert spec.init == "uniform" and spec.scale == pytest.approx(math.sqrt(6 / 700))
    w_relu = MLP(400, (300,), 10, "relu").init_params(0)["layer0.weight"]
    assert w_relu.std() == pytest.approx(math.sqrt(2 / 400), rel=0.02)
    w_tanh = MLP(400, (300,), 10, "tanh").init_params(0)["layer0.weight"]
    limit = math.sqrt(6 / 700)
    assert np.abs(w_tanh).max() <= limit
    assert w_tanh.std() == pytest.approx(limit / math.sqrt(3), rel=0.02)


# -- specs ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("linear", {"kind": "linear"}),
        ("softmax", {"kind": "softmax"}),
        (" Softmax ", {"kind": "softmax"}),
        ("mlp:64", {"kind": "mlp", "hidden": [64], "activation": "relu"}),
        ("mlp:128,64", {"kind": "mlp", "hidden": [128, 64], "activation": "relu"}),
        ("mlp:64:tanh", {"kind": "mlp", "hidden": [64], "activation": "tanh"}),
        ("mlp:32,16:sigmoid", {"kind": "mlp", "hidden": [32, 16], "activation": "sigmoid"}),
    ],
)
def test_parse_model_and_build_round_trip(text: str, spec: dict[str, Any]) -> None:
    assert parse_model(text) == spec
    model = build_model(parse_model(text), 8, 3)
    assert model.spec == spec
    assert model.task == ("regression" if spec["kind"] == "linear" else "classification")
    assert build_model(model.spec, 8, 3).spec == spec


@pytest.mark.parametrize(
    "text", ["", "cnn", "linear:3", "softmax:x", "mlp", "mlp:", "mlp:0", "mlp:-4", "mlp:a,b", "mlp:64,",
             "mlp:64:gelu", "mlp:64:relu:extra"])
def test_parse_model_rejects_bad_text(text: str) -> None:
    with pytest.raises(ModelSpecError, match="accepted model forms|positive integers|activation"):
        parse_model(text)


@pytest.mark.parametrize(
    ("spec", "n_outputs", "match"),
    [
        ({"kind": "cnn"}, 3, "unknown model kind 'cnn'"),
        ({}, 3, "with a 'kind'"),
        ({"kind": "mlp", "hidden": []}, 3, "non-empty list of positive integers"),
        ({"kind": "mlp", "hidden": [8, 0]}, 3, "non-empty list of positive integers"),
        ({"kind": "mlp", "hidden": [-2]}, 3, "non-empty list of positive integers"),
        ({"kind": "mlp", "hidden": [True]}, 3, "non-empty list of positive integers"),
        ({"kind": "mlp", "hidden": [8], "activation": "gelu"}, 3, "unknown activation 'gelu'"),
        ({"kind": "mlp", "hidden": [8], "dropout": 0.5}, 3, "unknown mlp spec keys"),
        ({"kind": "linear", "hidden": [8]}, 3, "takes no options"),
        ({"kind": "softmax"}, 1, "at least 2 classes"),
        ({"kind": "mlp", "hidden": [8]}, 1, "at least 2 classes"),
        ({"kind": "linear"}, 0, "at least 1 outputs"),
    ],
)
def test_build_model_rejects_bad_specs(spec: dict[str, Any], n_outputs: int, match: str) -> None:
    with pytest.raises(ModelSpecError, match=match):
        build_model(spec, 8, n_outputs)


def test_build_model_rejects_bad_feature_count() -> None:
    with pytest.raises(ModelSpecError, match="n_features"):
        build_model({"kind": "linear"}, 0, 1)
