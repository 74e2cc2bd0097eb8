"""Datasets: what a run's data spec names, loaded the same way by every worker.

A run's dataset travels through the server as a JSON-able spec (a dict with ``"kind"``) that
the server does not interpret; every worker calls :func:`load_dataset` on it and must get the
same arrays. CLI forms (:func:`parse_dataset`) and defaults:

* ``digits`` -- scikit-learn's bundled 8x8 digits (1797 x 64, 10 classes, no download). Fixed
  80/20 split, stratified by class with a fixed seed; features standardised with the TRAIN mean/std
  (a zero std becomes 1).
* ``synthetic-regression[:samples=2000,features=20,outputs=1,noise=0.01,seed=0,test_fraction=0.2]``
  -- ``X ~ N(0, 1)``, ``W* ~ N(0, 1)`` of shape (features, outputs), ``b* ~ N(0, 1)``,
  ``y = X W* + b* + noise · N(0, 1)``; ``y`` is ``(n,)`` for one output. ``extras`` holds
  ``true_weight`` and ``true_bias`` (the shapes of ``linear.weight`` / ``linear.bias``).
* ``synthetic-classification[:samples=10000,features=784,classes=10,separation=5.0,seed=0,test_fraction=0.2]``
  -- balanced labels, ``x = c_y + N(0, I)`` with random class centroids ``c_k`` whose expected
  pairwise distance is ``separation`` noise standard deviations. The default is learnable but
  not trivial (softmax regression ~0.93 test accuracy after a few epochs, not 1.0).
* ``npz:PATH[,test_fraction=0.2,seed=0]`` -- a ``.npz`` with ``X`` and ``y`` (split with
  ``test_fraction``/``seed``) or with ``X_train, y_train, X_test, y_test`` (used as given).
  Integer ``y`` means classification (``n_outputs = max label + 1``), float ``y`` regression.
* ``synthetic-ctr[:samples=100000,fields=8,ids_per_field=1000,zipf=1.1,factors=4,seed=0,test_fraction=0.2]``
  (``rows`` is accepted for ``samples``) -- click-through data with a PLANTED factorization
  machine. Each example has one feature per field: field ``f`` draws ``k`` in
  ``[0, ids_per_field)`` with ``P(k) ∝ 1/(k+1)^zipf`` (so id 0 is the most frequent), raw id
  ``(f << 32) | k``, value 1. Per (field, id) the plant has a weight ``w ~ N(0, 0.35²)`` and factors
  ``v ~ N(0, 0.6²/factors · I)``; ``logit = b + Σ_f w + Σ_{f<g} <v_f, v_g>`` with the bias ``b`` set
  by bisection so the mean click probability is 0.25, and ``y ~ Bernoulli(sigmoid(logit))``. The
  linear and pairwise parts have similar spread (std ~0.9 each for the default), so a factorization
  machine clearly beats logistic regression; the plant's test AUC is ~0.8 (0.79 for the default,
  log-loss 0.45).
  ``extras``: ``planted_probability_test`` (float64 per test example) and 0-d float64
  ``planted_auc``, ``planted_logloss``: the plant's own test scores, the best a model can reach.
* ``libsvm:PATH[,test_fraction=0.2,seed=0]`` -- an svmlight/libsvm text file (``label idx:val ...``,
  ``#`` comments, ``qid:`` ignored), as public CTR sets ship. Labels 0/1 or -1/+1 (mapped to 0/1);
  ids are the indices as written (no shift; below 2**31, as scikit-learn reads them); split with ``test_fraction``/``seed``. ``n_features``
  is the number of columns (largest index + 1).
* ``synthetic-ratings[:users=2000,items=2000,rank=8,density=0.05,noise=0.1,seed=0,test_fraction=0.1]``
  -- a rating matrix of planted rank and noise for matrix factorisation (``mf:K``), ``task ==
  "ratings"``: ``X`` int64 (user, item) pairs, ``y`` float32, ``n_features``/``n_outputs`` the
  numbers of users/items; the best reachable test RMSE is ``extras["planted_rmse"]`` (``worker.ratings``).

Invariants: for dense kinds ``X`` is float32 C-contiguous ``(n, n_features)`` and ``y`` int64 labels
or float32 targets; for ``task == "ctr"`` (synthetic-ctr, libsvm) ``X`` is a
:class:`~worker.sparse.SparseBatch` of raw uint64 ids and ``y`` int64 0/1 with ``n_outputs = 1``.
Every array of a :class:`Dataset` is read-only, because :func:`load_dataset` memoises per process
(keyed on the canonical JSON of the spec with defaults filled in, plus the file's size and mtime
for npz and libsvm) and hands the same arrays to every caller.

Which rank trains on which examples, and in which batches: ``worker.sampling``.

Errors: :class:`DatasetError` (a ``ValueError``); messages say what to fix.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from worker import ratings
from worker.metrics import log_loss, roc_auc, sigmoid
from worker.sparse import SparseBatch

__all__ = ["Dataset", "DatasetError", "load_dataset", "parse_dataset"]

_FORMS = (
    "accepted dataset forms: 'digits'; "
    "'synthetic-regression[:samples=2000,features=20,outputs=1,noise=0.01,seed=0,test_fraction=0.2]'; "
    "'synthetic-classification[:samples=10000,features=784,classes=10,separation=5.0,seed=0,test_fraction=0.2]'; "
    "'npz:PATH[,test_fraction=0.2,seed=0]'; "
    "'synthetic-ctr[:samples=100000,fields=8,ids_per_field=1000,zipf=1.1,factors=4,seed=0,test_fraction=0.2]'; "
    "'libsvm:PATH[,test_fraction=0.2,seed=0]'; "
    "'synthetic-ratings[:users=2000,items=2000,rank=8,density=0.05,noise=0.1,seed=0,test_fraction=0.1]'"
)

# kind -> {key: default}; the type of each default is the type the key must have.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {},
    "synthetic-regression": {
        "samples": 2000, "features": 20, "outputs": 1, "noise": 0.01, "seed": 0, "test_fraction": 0.2,
    },
    "synthetic-classification": {
        "samples": 10000, "features": 784, "classes": 10, "separation": 5.0, "seed": 0, "test_fraction": 0.2,
    },
    "npz": {"path": "", "test_fraction": 0.2, "seed": 0},
    "synthetic-ctr": {
        "samples": 100000, "fields": 8, "ids_per_field": 1000, "zipf": 1.1, "factors": 4, "seed": 0,
        "test_fraction": 0.2,
    },
    "libsvm": {"path": "", "test_fraction": 0.2, "seed": 0},
    "synthetic-ratings": ratings.DEFAULTS,
}
_FILE_KINDS = ("npz", "libsvm")  # 'kind:PATH[,options]'; memoised on the file's size and mtime
_ALIASES = {"synthetic-ctr": {"rows": "samples"}}  # kind -> {alias: canonical key}
_MINIMUM = {"samples": 2, "features": 1, "outputs": 1, "classes": 2, "seed": 0, "fields": 1, "ids_per_field": 1,
            "factors": 1, "users": 1, "items": 1, "rank": 1}
_MAXIMUM = {"fields": 2**32, "ids_per_field": 2**32}  # exclusive: a raw CTR id is (field << 32) | k


class DatasetError(ValueError):
    """A dataset spec, text or file is unusable; the message says what to fix."""


@dataclass(frozen=True)
class Dataset:
    """A train/test split. Arrays are read-only and may be shared between callers."""

    name: str
    task: str  # "classification" | "regression" | "ctr" | "ratings"
    # float32 (n, n_features) array, or a SparseBatch exactly when task == "ctr". Typed Any, not the
    # union, until every reader (trainer, export_shard) branches on the task.
    X_train: Any
    y_train: npt.NDArray[Any]  # int64 labels (0/1 for ctr), or float32 (n,) / (n, k) targets
    X_test: Any
    y_test: npt.NDArray[Any]
    n_features: int  # columns; for ctr, fields (synthetic) or largest id + 1 (libsvm)
    n_outputs: int  # classes, or regression outputs; 1 for ctr
    extras: Mapping[str, npt.NDArray[Any]]


# -- specs ----------------------------------------------------------------------------------

def parse_dataset(text: str) -> dict[str, Any]:
    """Turn a CLI dataset string into a canonical JSON-able spec (defaults filled in)."""
    text = text.strip()
    kind, sep, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind not in _DEFAULTS:
        raise DatasetError(f"unknown dataset {text!r}; {_FORMS}")
    raw: dict[str, Any] = {"kind": kind}
    if kind in _FILE_KINDS:
        # Options trail the path, so a path may itself contain ',' or '='.
        while m := re.search(r",\s*(test_fraction|seed)\s*=\s*([^,]*)$", rest):
            raw[m.group(1)] = m.group(2).strip()
            rest = rest[: m.start()]
        if not rest.strip():
            raise DatasetError(f"{kind} dataset needs a path, got {text!r}; {_FORMS}")
        raw["path"] = rest.strip()
    elif sep and rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise DatasetError(f"bad option {item!r} in {text!r}: use key=value; {_FORMS}")
            if key in raw:
                raise DatasetError(f"option {key!r} given twice in {text!r}")
            raw[key] = value.strip()
    elif sep:
        raise DatasetError(f"empty option list in {text!r}; {_FORMS}")
    return _canonical(raw, from_text=True)


def _canonical(spec: Mapping[str, Any], from_text: bool = False) -> dict[str, Any]:
    """Validate ``spec``, coerce its values and fill in defaults."""
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise DatasetError(f"dataset spec must be a mapping with a 'kind', got {spec!r}; {_FORMS}")
    kind = spec["kind"]
    if not isinstance(kind, str) or kind not in _DEFAULTS:
        raise DatasetError(f"unknown dataset kind {kind!r}; {_FORMS}")
    defaults = _DEFAULTS[kind]
    aliases = _ALIASES.get(kind, {})
    if aliases:
        spec = dict(spec)
        for alias, key in aliases.items():
            if alias in spec:
                if key in spec:
                    raise DatasetError(f"{kind}: {alias!r} is another name for {key!r}; give only one of them")
                spec[key] = spec.pop(alias)
    unknown = sorted(set(spec) - set(defaults) - {"kind"})
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise DatasetError(f"unknown option(s) {unknown} for dataset {kind!r}; allowed: {allowed}")
    out: dict[str, Any] = {"kind": kind}
    for key, default in defaults.items():
        value = spec.get(key, default)
        out[key] = _coerce(kind, key, value, type(default), from_text)
    if kind in _FILE_KINDS and not out["path"]:
        raise DatasetError(f"{kind} dataset needs a 'path'; {_FORMS}")
    if "test_fraction" in out and not 0.0 < out["test_fraction"] < 1.0:
        raise DatasetError(f"{kind}: test_fraction must be in (0, 1), got {out['test_fraction']}")
    if out.get("noise", 0.0) < 0.0 or out.get("separation", 1.0) <= 0.0:
        raise DatasetError(f"{kind}: noise must be >= 0 and separation > 0, got {spec!r}")
    if out.get("zipf", 1.0) <= 0.0:
        raise DatasetError(f"{kind}: zipf must be > 0 (the Zipf exponent; 1.1 is typical), got {out['zipf']}")
    return out


def _coerce(kind: str, key: str, value: Any, want: type, from_text: bool) -> Any:
    bad = DatasetError(f"{kind}: option {key!r} must be {want.__name__}, got {value!r}")
    if isinstance(value, bool):
        raise bad
    if want is str:
        if not isinstance(value, str):
            raise bad
        return value
    if from_text and isinstance(value, str):
        try:
            value = int(value) if want is int else float(value)
        except ValueError:
            raise bad from None
    if want is int:
        if not isinstance(value, int):
            raise bad
        if value < _MINIMUM.get(key, 0):
            raise DatasetError(f"{kind}: {key} must be >= {_MINIMUM.get(key, 0)}, got {value}")
        if key in _MAXIMUM and value >= _MAXIMUM[key]:
            raise DatasetError(f"{kind}: {key} must be < {_MAXIMUM[key]}, got {value}")
        return value
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise bad
    return float(value)


# -- loading --------------------------------------------------------------------------------

def load_dataset(spec: Mapping[str, Any]) -> Dataset:
    """Load (or generate) the dataset for ``spec``; memoised per process.

    The memo key is the canonical JSON of the spec with defaults filled in; for ``npz`` and
    ``libsvm`` it also includes the file's size and mtime, so a rewritten file is reloaded.
    """
    canon = _canonical(spec)
    stamp = ""
    if canon["kind"] in _FILE_KINDS:
        path = canon["path"]
        try:
            st = os.stat(path)
        except OSError as e:  # (said where a relative path led: a worker's working directory is not psctl's)
            where = "" if os.path.isabs(path) else f" (here {os.path.abspath(path)!r})"
            raise DatasetError(f"cannot read {canon['kind']} file {path!r}{where}: {e.strerror}; check the path: "
                               "every worker reads the file itself, at this path on its own machine") from None
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    return _load_cached(json.dumps(canon, sort_keys=True), stamp)


@functools.lru_cache(maxsize=8)
def _load_cached(key: str, stamp: str) -> Dataset:
    del stamp  # only part of the cache key
    spec: dict[str, Any] = json.loads(key)
    kind = spec["kind"]
    if kind == "digits":
        return _digits()
    if kind == "synthetic-regression":
        return _synthetic_regression(spec)
    if kind == "synthetic-classification":
        return _synthetic_classification(spec)
    if kind == "synthetic-ctr":
        return _synthetic_ctr(spec)
    if kind == "libsvm":
        return _libsvm(spec)
    if kind == "synthetic-ratings":
        try:
            X_tr, y_tr, X_te, y_te, extras = ratings.synthetic_ratings(spec)
        except ValueError as e:
            raise DatasetError(str(e)) from None
        return Dataset("synthetic-ratings", "ratings", X_tr, y_tr, X_te, y_te, spec["users"], spec["items"], extras)
    return _npz(spec)


def _frozen(
    name: str, task: str, X_tr: npt.NDArray[Any], y_tr: npt.NDArray[Any], X_te: npt.NDArray[Any],
    y_te: npt.NDArray[Any], n_outputs: int, extras: Mapping[str, npt.NDArray[Any]] | None = None,
) -> Dataset:
    """Assemble a Dataset with contiguous, read-only arrays of the canonical dtypes."""
    y_dtype = np.int64 if task == "classification" else np.float32
    X_train = np.ascontiguousarray(X_tr, dtype=np.float32)
    X_test = np.ascontiguousarray(X_te, dtype=np.float32)
    y_train = np.ascontiguousarray(y_tr, dtype=y_dtype)
    y_test = np.ascontiguousarray(y_te, dtype=y_dtype)
    extra = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in (extras or {}).items()}
    for a in (X_train, X_test, y_train, y_test, *extra.values()):
        a.setflags(write=False)
    return Dataset(name, task, X_train, y_train, X_test, y_test, int(X_train.shape[1]), n_outputs,
                   MappingProxyType(extra))


def _split_rows(n: int, test_fraction: float, rng: np.random.Generator,
                path: str = "") -> tuple[npt.NDArray[np.int64], ...]:
    """``path``: the file the rows are from (named in the error)."""
    n_test = round(n * test_fraction)
    if not 1 <= n_test <= n - 1:
        raise DatasetError(f"{f'{path!r}: ' if path else ''}test_fraction={test_fraction} leaves no train or no test "
                           f"rows out of {n}; change it")
    perm = rng.permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _digits_raw() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """scikit-learn's bundled digits, read straight from its file.

    ``import sklearn.datasets`` costs ~0.7 s per process, most of a worker's start-up (measured:
    time to 0.95 with 4 local workers 3.0 s, single process 1.0 s); the file is 1797 rows of 64
    pixels and a label.
    """
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(os.path.dirname(spec.origin or ""), "datasets", "data", "digits.csv.gz") if spec else ""
    if not os.path.isfile(path):  # another layout: let scikit-learn read it
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        return np.asarray(X, np.float64), np.asarray(y, np.int64)
    with gzip.open(path, "rt") as f:
        raw = np.loadtxt(f, delimiter=",")
    return raw[:, :-1], raw[:, -1].astype(np.int64)


def _stratified_split(y: npt.NDArray[np.int64], test_fraction: float, seed: int) -> tuple[npt.NDArray[np.int64], ...]:
    """Per class, a seeded permutation; round(fraction x class size) rows go to the test split."""
    rng = np.random.default_rng(seed)
    test = []
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        test.append(rng.permutation(rows)[: round(len(rows) * test_fraction)])
    te = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(len(y)), te), te


def _digits() -> Dataset:
    X, y = _digits_raw()
    tr, te = _stratified_split(y, 0.2, seed=0)
    X_tr, X_te, y_tr, y_te = X[tr], X[te], y[tr], y[te]
    mean = X_tr.mean(axis=0)
    std = X_tr.std(axis=0)
    std[std == 0] = 1.0
    return _frozen("digits", "classification", (X_tr - mean) / std, y_tr, (X_te - mean) / std, y_te, 10)


def _synthetic_regression(spec: Mapping[str, Any]) -> Dataset:
    n, d, k = spec["samples"], spec["features"], spec["outputs"]
    rng = np.random.default_rng(spec["seed"])
    W = rng.standard_normal((d, k), dtype=np.float32)
    b = rng.standard_normal(k, dtype=np.float32)
    X = rng.standard_normal((n, d), dtype=np.float32)
    y = X @ W
    y += b
    y += np.float32(spec["noise"]) * rng.standard_normal((n, k), dtype=np.float32)
    if k == 1:
        y = y[:, 0]
    tr, te = _split_rows(n, spec["test_fraction"], rng)
    return _frozen("synthetic-regression", "regression", X[tr], y[tr], X[te], y[te], k,
                   {"true_weight": W, "true_bias": b})


def _synthetic_classification(spec: Mapping[str, Any]) -> Dataset:
    n, d, k = spec["samples"], spec["features"], spec["classes"]
    rng = np.random.default_rng(spec["seed"])
    # Entries N(0, s²) with s = separation / sqrt(2d) give E‖c_i − c_j‖² = separation².
    centroids = rng.standard_normal((k, d), dtype=np.float32)
    centroids *= np.float32(spec["separation"] / math.sqrt(2 * d))
    y = rng.permutation(np.arange(n, dtype=np.int64) % k)  # balanced: counts differ by <= 1
    X = rng.standard_normal((n, d), dtype=np.float32)
    X += centroids[y]
    tr, te = _split_rows(n, spec["test_fraction"], rng)
    return _frozen("synthetic-classification", "classification", X[tr], y[tr], X[te], y[te], k,
                   {"centroids": centroids})


_NPZ_LAYOUTS = "either X, y or X_train, y_train, X_test, y_test"
_MAX_CLASSES = 1 << 16
"""Classes an npz file's integer labels may name (a label of 10^12, an id not renumbered, would
make a model with an output unit per class, too large for any worker)."""


def _npz(spec: Mapping[str, Any]) -> Dataset:
    path = spec["path"]
    try:  # (is_zipfile says False of a file it cannot open: a directory, one not readable)
        with open(path, "rb") as raw:
            is_zip = zipfile.is_zipfile(raw)
    except OSError as e:
        raise DatasetError(f"cannot read npz file {path!r}: {e.strerror}; check the path and its permissions") from None
    if not is_zip:
        raise DatasetError(f"{path!r} is not an .npz (zip) archive; write it with numpy.savez holding {_NPZ_LAYOUTS}")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if {"X_train", "y_train", "X_test", "y_test"} <= keys:
                X_tr, y_tr, X_te, y_te = (f[k] for k in ("X_train", "y_train", "X_test", "y_test"))
                split = False
            elif {"X", "y"} <= keys:
                X_tr, y_tr = f["X"], f["y"]
                split = True
            else:
                raise DatasetError(f"npz file {path!r} has keys {sorted(keys)}; it needs {_NPZ_LAYOUTS}")
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DatasetError(f"cannot load npz file {path!r} ({type(e).__name__}: {e}); "
                           f"write it with numpy.savez holding {_NPZ_LAYOUTS} (no object arrays)") from None
    _check_xy(path, "X" if split else "X_train", X_tr, y_tr)
    if split:
        tr, te = _split_rows(len(X_tr), spec["test_fraction"], np.random.default_rng(spec["seed"]), path)
        X_tr, y_tr, X_te, y_te = X_tr[tr], y_tr[tr], X_tr[te], y_tr[te]
    else:
        _check_xy(path, "X_test", X_te, y_te)
        if X_te.shape[1] != X_tr.shape[1]:
            raise DatasetError(f"{path!r}: X_test has {X_te.shape[1]} features, X_train {X_tr.shape[1]}")
    name = f"npz:{os.path.basename(path)}"
    if (y_tr.dtype.kind in "iub") != (y_te.dtype.kind in "iub"):
        raise DatasetError(f"{path!r}: y_train is {y_tr.dtype} but y_test {y_te.dtype}: give both integer labels "
                           "(classification) or both float targets (regression)")
    if y_tr.dtype.kind in "iub" and y_te.dtype.kind in "iub":
        lo = min(int(y_tr.min()), int(y_te.min()))
        if lo < 0:
            raise DatasetError(f"{path!r}: class labels must be >= 0, found {lo}")
        n_classes = max(int(y_tr.max()), int(y_te.max())) + 1
        if n_classes > _MAX_CLASSES:  # (a model's output layer has one unit per class)
            raise DatasetError(f"{path!r}: integer labels are class indices 0..K-1, at most {_MAX_CLASSES} classes; "
                               f"found label {n_classes - 1}: number the classes 0..K-1 (np.unique(y, "
                               "return_inverse=True)), or give float targets for regression")
        return _frozen(name, "classification", X_tr, y_tr, X_te, y_te, n_classes)
    if y_tr.shape[1:] != y_te.shape[1:] or y_tr.ndim > 2:
        raise DatasetError(f"{path!r}: targets must be (n,) or (n, k) with the same k in train and test")
    n_outputs = 1 if y_tr.ndim == 1 else int(y_tr.shape[1])
    return _frozen(name, "regression", X_tr, y_tr, X_te, y_te, n_outputs)


def _check_xy(path: str, xname: str, X: npt.NDArray[Any], y: npt.NDArray[Any]) -> None:
    yname = xname.replace("X", "y")
    if X.ndim != 2:
        raise DatasetError(f"{path!r}: {xname} must be 2-D (samples, features), got shape {X.shape}")
    if X.dtype.kind not in "iuf" or y.dtype.kind not in "iufb":
        raise DatasetError(f"{path!r}: {xname}/{yname} must be numeric, got {X.dtype}/{y.dtype}")
    if y.ndim == 0 or len(X) != len(y):
        raise DatasetError(f"{path!r}: {xname} has {len(X)} rows but {yname} has shape {y.shape}; they must match")
    if y.dtype.kind in "iub" and y.ndim != 1:  # (the file's shape: after the split it is the train rows')
        raise DatasetError(f"{path!r}: integer labels must be 1-D, got {yname} shape {y.shape}")
    if len(X) == 0 or X.shape[1] == 0:
        raise DatasetError(f"{path!r}: {xname} is empty (shape {X.shape})")
    for name, a in ((xname, X), (yname, y)):
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise DatasetError(f"{path!r}: {name} contains NaN or Inf; clean the data first")
        # (float64 values past float32's range would become Inf in the float32 a worker trains in)
        if a.dtype.kind == "f" and a.size and float(np.abs(a).max()) > float(np.finfo(np.float32).max):
            raise DatasetError(f"{path!r}: {name} has values beyond float32's range (|v| > 3.4e38), which "
                               "training in float32 would make Inf; rescale the data")


# -- CTR: sparse examples, 0/1 labels --------------------------------------------------------

def _frozen_ctr(
    name: str, X_tr: SparseBatch, y_tr: npt.NDArray[Any], X_te: SparseBatch, y_te: npt.NDArray[Any],
    n_features: int, extras: Mapping[str, npt.NDArray[Any]] | None = None,
) -> Dataset:
    """Assemble a ``task == "ctr"`` Dataset: read-only CSR batches, int64 0/1 labels, float64 extras."""

    def batch(b: SparseBatch) -> SparseBatch:
        return SparseBatch(np.ascontiguousarray(b.indptr, np.int64), np.ascontiguousarray(b.ids, np.uint64),
                           np.ascontiguousarray(b.values, np.float32))

    X_train, X_test = batch(X_tr), batch(X_te)
    y_train = np.ascontiguousarray(y_tr, dtype=np.int64)
    y_test = np.ascontiguousarray(y_te, dtype=np.int64)
    extra = {k: np.array(v, dtype=np.float64, order="C") for k, v in (extras or {}).items()}  # keeps 0-d
    for a in (X_train.indptr, X_train.ids, X_train.values, X_test.indptr, X_test.ids, X_test.values,
              y_train, y_test, *extra.values()):
        a.setflags(write=False)
    return Dataset(name, "ctr", X_train, y_train, X_test, y_test, n_features, 1, MappingProxyType(extra))


# Scales of the planted factorization machine (module docstring): the linear and pairwise parts of
# the logit then have similar spread (~0.9 each for the default), and the plant's test AUC is ~0.8.
_CTR_WEIGHT_STD = 0.35
_CTR_FACTOR_STD = 0.6  # divided by sqrt(factors), so <v_f, v_g> keeps its spread for any factors
_CTR_RATE = 0.25  # the mean click probability the bias is solved for


def _one_per_field(ids: npt.NDArray[np.uint64]) -> SparseBatch:
    """CSR of examples with exactly one feature per field: ``ids`` is (n, fields), values 1."""
    n, fields = ids.shape
    return SparseBatch(np.arange(0, n * fields + 1, fields, dtype=np.int64), ids.reshape(-1),
                       np.ones(n * fields, np.float32))


def _bias_for_rate(z: npt.NDArray[np.float64], rate: float) -> float:
    """The ``b`` with ``mean(sigmoid(b + z)) == rate``: the mean is increasing in ``b``, so bisect."""
    lo, hi = -40.0 - float(z.max()), 40.0 - float(z.min())
    while hi - lo > 1e-9:
        mid = 0.5 * (lo + hi)
        if float(sigmoid(mid + z).mean()) > rate:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def _synthetic_ctr(spec: Mapping[str, Any]) -> Dataset:
    n, fields, k_max, d = spec["samples"], spec["fields"], spec["ids_per_field"], spec["factors"]
    rng = np.random.default_rng(spec["seed"])
    # Truncated Zipf by inverse CDF: one searchsorted over all n x fields uniforms.
    cdf = np.cumsum(np.arange(1, k_max + 1, dtype=np.float64) ** -spec["zipf"])
    cdf /= cdf[-1]
    k = np.searchsorted(cdf, rng.random((n, fields)), side="right")
    np.minimum(k, k_max - 1, out=k)  # a uniform that rounds onto cdf[-1] == 1.0
    w = rng.normal(0.0, _CTR_WEIGHT_STD, (fields, k_max))
    v = rng.normal(0.0, _CTR_FACTOR_STD / math.sqrt(d), (fields, k_max, d))
    # sum_{f<g} <v_f, v_g> = (|sum_f v_f|^2 - sum_f |v_f|^2) / 2, one field at a time to bound memory.
    linear = np.zeros(n)
    v_sum = np.zeros((n, d))
    v_sq = np.zeros(n)
    for f in range(fields):
        linear += w[f, k[:, f]]
        vf = v[f, k[:, f]]
        v_sum += vf
        v_sq += np.einsum("ij,ij->i", vf, vf)
    z = linear + 0.5 * (np.einsum("ij,ij->i", v_sum, v_sum) - v_sq)
    prob = sigmoid(z + _bias_for_rate(z, _CTR_RATE))
    y = (rng.random(n) < prob).astype(np.int64)
    tr, te = _split_rows(n, spec["test_fraction"], rng)
    ids = k.astype(np.uint64)
    ids |= np.arange(fields, dtype=np.uint64)[None, :] << np.uint64(32)
    p_te = prob[te]
    return _frozen_ctr("synthetic-ctr", _one_per_field(ids[tr]), y[tr], _one_per_field(ids[te]), y[te], fields, {
        "planted_probability_test": p_te,
        "planted_auc": np.array(roc_auc(y[te], p_te)),
        "planted_logloss": np.array(log_loss(y[te], p_te)),
    })


_LIBSVM_FORMAT = "lines of 'label idx:value idx:value ...' with labels 0/1 or -1/+1 and increasing indices"


def _libsvm(spec: Mapping[str, Any]) -> Dataset:
    path = spec["path"]
    from sklearn.datasets import load_svmlight_file  # ~0.7 s to import; only libsvm runs pay it

    try:
        X, y = load_svmlight_file(path, dtype=np.float32, zero_based=True, query_id=False)
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read libsvm file {path!r}: {e}; check the path") from None
    except (ValueError, OverflowError) as e:  # (OverflowError: an index past its C int)
        raise DatasetError(f"cannot parse libsvm file {path!r}: {_first_bad_line(path) or e}; "
                           f"it needs {_LIBSVM_FORMAT}") from None
    if X.shape[0] == 0:
        raise DatasetError(f"libsvm file {path!r} has no examples; it needs {_LIBSVM_FORMAT}")
    labels = np.unique(y)
    if np.isin(labels, (0.0, 1.0)).all():
        y01 = y.astype(np.int64)
    elif np.isin(labels, (-1.0, 1.0)).all():
        y01 = (y > 0).astype(np.int64)
    else:
        shown = ", ".join(f"{v:g}" for v in labels[:5]) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")
        raise DatasetError(f"libsvm file {path!r}: labels must be 0/1 or -1/+1 (a CTR task), found {shown}")
    if not np.isfinite(X.data).all():
        raise DatasetError(f"libsvm file {path!r}: values contain NaN or Inf; clean the data first")
    X.sort_indices()
    whole = SparseBatch(X.indptr.astype(np.int64), X.indices.astype(np.uint64), X.data.astype(np.float32))
    tr, te = _split_rows(len(whole), spec["test_fraction"], np.random.default_rng(spec["seed"]), path)
    return _frozen_ctr(f"libsvm:{os.path.basename(path)}", whole[tr], y01[tr], whole[te], y01[te],
                       int(X.shape[1]))


def _first_bad_line(path: str) -> str:
    """Which line scikit-learn's loader rejected (it does not say): re-read the file in Python.

    Only runs after a failure, so its speed does not matter; '' if no line looks wrong to it.
    """
    number = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)", re.IGNORECASE)
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                tokens = raw.split(b"#", 1)[0].decode("utf-8", "replace").split()
                if not tokens:
                    continue
                bad = "" if number.fullmatch(tokens[0]) else f"label {tokens[0]!r} is not a number"
                last = -1
                for tok in tokens[1:]:
                    idx, colon, val = tok.partition(":")
                    if bad or idx == "qid":
                        continue
                    if not colon or not idx.isdigit() or not number.fullmatch(val):
                        bad = f"{tok!r} is not idx:value"
                    elif int(idx) <= last:
                        bad = f"index {idx} is not above the previous one (indices must increase)"
                    elif int(idx) >= 2**31:
                        bad = f"index {idx} is too large (indices must be below 2**31: hash larger ids first)"
                    else:
                        last = int(idx)
                if bad:
                    return f"line {lineno}: {bad}"
    except OSError:
        return ""
    return ""
