"""A run's parameters: named float32 tensors, their initialisation and gradient validation.

Invariant: ``params`` always holds exactly the tensors of the run's spec, with their shapes, as
C-contiguous float32 arrays, and they only change through ``Optimizer.step``. ``check_gradient``
looks at a whole gradient before anything is applied, so a bad push changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import InvalidArgument
from .spec import Initializer, ParamSpec

__all__ = ["ParamStore", "materialize"]


def materialize(specs: tuple[ParamSpec, ...], seed: int) -> dict[str, np.ndarray]:
    """Initial values: tensor i draws from ``numpy.random.default_rng([seed, i])``.

    The same rule is in the proto's ``Initializer`` comment and in ``worker.models.materialize``,
    so any client can reproduce a run's starting point.
    """
    out: dict[str, np.ndarray] = {}
    for i, p in enumerate(specs):
        if p.initializer is Initializer.ZEROS:
            arr = np.zeros(p.shape, np.float32)
        elif p.initializer is Initializer.CONSTANT:
            arr = np.full(p.shape, p.scale, np.float32)
        else:
            rng = np.random.default_rng([seed, i])
            if p.initializer is Initializer.NORMAL:
                arr = rng.normal(0.0, p.scale, p.shape).astype(np.float32)
            else:
                arr = rng.uniform(-p.scale, p.scale, p.shape).astype(np.float32)
        out[p.name] = arr
    return out


class ParamStore:
    """The parameters of one run."""

    def __init__(self, specs: tuple[ParamSpec, ...], seed: int) -> None:
        self.specs = {p.name: p for p in specs}
        self.params = materialize(specs, seed)
        self.nbytes = sum(a.nbytes for a in self.params.values())

    def check_gradient(self, grads: Mapping[str, np.ndarray]) -> None:
        """Raise InvalidArgument unless ``grads`` has every tensor, right shapes, all finite."""
        unknown = sorted(set(grads) - set(self.specs))
        if unknown:
            raise InvalidArgument(
                f"unknown tensor name(s) {unknown}; this run's tensors are {sorted(self.specs)}"
            )
        missing = sorted(set(self.specs) - set(grads))
        if missing:
            raise InvalidArgument(f"the gradient lacks tensor(s) {missing}: send every parameter")
        for name, g in grads.items():
            want = self.specs[name].shape
            if g.shape != want:
                raise InvalidArgument(
                    f"gradient {name!r} has shape {list(g.shape)}, the parameter has {list(want)}"
                )
            if g.dtype != np.float32:
                raise InvalidArgument(f"gradient {name!r} has dtype {g.dtype}, expected float32")
            # One pass without a temporary: a sum is NaN/Inf iff some element is (or it overflows,
            # which is no usable gradient either). The slow exact check only names the culprit.
            with np.errstate(over="ignore", invalid="ignore"):
                total = np.sum(g, dtype=np.float32)
            if not np.isfinite(total):
                bad = int(np.count_nonzero(~np.isfinite(g)))
                what = f"{bad} NaN/Inf value(s)" if bad else "values whose sum overflows float32"
                raise InvalidArgument(f"gradient {name!r} contains {what}; nothing was applied")

    def read(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """The live arrays (no copy) of ``names`` (all when None); InvalidArgument for unknown names."""
        if not names:
            return self.params
        unknown = sorted(set(names) - set(self.params))
        if unknown:
            raise InvalidArgument(
                f"unknown tensor name(s) {unknown}; this run's tensors are {sorted(self.params)}"
            )
        return {n: self.params[n] for n in names}
