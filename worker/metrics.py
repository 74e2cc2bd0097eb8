"""Binary-prediction metrics for CTR tasks (issue 16): ranking quality and calibrated loss.

* :func:`roc_auc` -- area under the ROC curve: the probability that a random positive example is
  scored above a random negative one (ties count half). 0.5 is chance; ``nan`` when ``y`` holds a
  single class, because then there is no pair to rank.
* :func:`log_loss` -- mean binary cross-entropy ``-mean(y log p + (1 - y) log(1 - p))``, with ``p``
  clipped to ``[eps, 1 - eps]`` so one confident mistake costs ``-log(eps)`` (about 16 for the
  default) instead of infinity.

``y`` holds 0/1 labels, ``p`` the predicted probability of label 1, both of shape ``(n,)``.
Both return plain floats, computed in float64.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["log_loss", "roc_auc"]


def _pair(y: npt.ArrayLike, p: npt.ArrayLike) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    ya = np.asarray(y, dtype=np.float64).reshape(-1)
    pa = np.asarray(p, dtype=np.float64).reshape(-1)
    if ya.shape != pa.shape:
        raise ValueError(f"labels and predictions differ in length: {ya.shape[0]} vs {pa.shape[0]}")
    if ya.size == 0:
        raise ValueError("no examples: labels and predictions are empty")
    return ya, pa


def roc_auc(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Area under the ROC curve of scores ``p`` for 0/1 labels ``y``; ``nan`` if one class only."""
    ya, pa = _pair(y, p)
    if np.all(ya == ya[0]):
        return math.nan
    # Imported here: sklearn.metrics costs ~0.5 s to import, and most workers never call this.
    from sklearn.metrics import roc_auc_score

    result: Any = roc_auc_score(ya, pa)
    return float(result)


def sigmoid(z: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``1 / (1 + exp(-z))`` in ``z``'s dtype, without overflow for any ``z``."""
    e = np.exp(-np.abs(z))  # in (0, 1]
    p: npt.NDArray[Any] = np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)
    return p


def log_loss(y: npt.ArrayLike, p: npt.ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``p`` (clipped to ``[eps, 1 - eps]``) for 0/1 ``y``."""
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    ya, pa = _pair(y, p)
    pc = np.clip(pa, eps, 1.0 - eps)
    return float(-np.mean(ya * np.log(pc) + (1.0 - ya) * np.log1p(-pc)))
