"""A synthetic rating matrix of known rank and noise (issue 19): the matrix-factorisation workload.

``synthetic-ratings[:users=2000,items=2000,rank=8,density=0.05,noise=0.1,seed=0,test_fraction=0.1]``
plants user factors ``U* ~ N(0, rank^-1/2 I)`` ``(users, rank)`` and item factors ``V*`` alike, so
a rating's signal ``⟨U*ᵤ, V*ᵢ⟩`` has unit variance whatever the rank; it observes a uniformly
random ``density`` share of the (user, item) cells, each once, as ``y = ⟨U*ᵤ, V*ᵢ⟩ + noise·N(0, 1)``.
The best a model can reach is known: the plant's own test RMSE, ≈ ``noise`` (``extras``:
``planted_rmse``, 0-d float64). ``X`` is int64 ``(n, 2)`` of (user, item) pairs, ``y`` float32
ratings; the dataset's ``n_features`` and ``n_outputs`` are the numbers of users and items (what
``mf:K`` builds its tables with).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["DEFAULTS", "synthetic_ratings"]

DEFAULTS: dict[str, Any] = {"users": 2000, "items": 2000, "rank": 8, "density": 0.05, "noise": 0.1, "seed": 0,
                            "test_fraction": 0.1}


def synthetic_ratings(spec: Mapping[str, Any]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32],
                                                        npt.NDArray[np.int64], npt.NDArray[np.float32],
                                                        Mapping[str, npt.NDArray[Any]]]:
    """(X_train, y_train, X_test, y_test, extras), read-only, from a canonical spec."""
    users, items, rank = spec["users"], spec["items"], spec["rank"]
    density, noise = spec["density"], spec["noise"]
    if not 0.0 < density <= 1.0:
        raise ValueError(f"synthetic-ratings: density must be in (0, 1], got {density}")
    cells = users * items
    n = round(density * cells)
    if n < 2:
        raise ValueError(f"synthetic-ratings: {users} x {items} at density {density} observes {n} ratings; "
                         "raise density, users or items")
    if n > 50_000_000:
        raise ValueError(f"synthetic-ratings: {n} ratings is too many to hold (at most 50,000,000); lower density")
    rng = np.random.default_rng(spec["seed"])
    scale = rank ** -0.25  # each factor's std: <u, v> then has variance rank * scale^4 = 1
    U = rng.normal(0.0, scale, (users, rank))
    V = rng.normal(0.0, scale, (items, rank))
    flat = rng.choice(cells, size=n, replace=False)
    X = np.stack([flat // items, flat % items], axis=1).astype(np.int64)
    signal = np.einsum("ij,ij->i", U[X[:, 0]], V[X[:, 1]])
    y = (signal + noise * rng.normal(size=n)).astype(np.float32)
    n_test = round(n * spec["test_fraction"])
    if not 1 <= n_test <= n - 1:
        raise ValueError(f"synthetic-ratings: test_fraction={spec['test_fraction']} leaves no train or no test "
                         f"ratings out of {n}; change it")
    perm = rng.permutation(n)
    tr, te = np.sort(perm[n_test:]), np.sort(perm[:n_test])
    planted = math.sqrt(float(np.mean((signal[te] - y[te].astype(np.float64)) ** 2)))
    out = (np.ascontiguousarray(X[tr]), np.ascontiguousarray(y[tr]), np.ascontiguousarray(X[te]),
           np.ascontiguousarray(y[te]))
    for a in out:
        a.setflags(write=False)
    extras = {"planted_rmse": np.array(planted)}
    extras["planted_rmse"].setflags(write=False)
    return (*out, MappingProxyType(extras))
