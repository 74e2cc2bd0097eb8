"""A run's parameters: named float32 tensors, their initialisation and gradient validation.

Invariant: ``params`` always holds exactly the tensors of the run's spec, with their shapes, as
C-contiguous float32 arrays, and they only change through ``Optimizer.step``. ``check_gradient``
looks at a whole gradient before anything is applied, so a bad push changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, TypeAlias

import numpy as np

from .errors import InvalidArgument
from .spec import FLOAT32_MAX, Initializer, ParamSpec

__all__ = ["FLAT_MAX", "Gradient", "ParamStore", "Pieces", "blocks", "count_non_finite", "materialize", "offsets"]

_INIT_BLOCK = 1 << 20
_CHECK_BLOCK = 1 << 24
FLAT_MAX = 1 << 18
"""Models of at most this many elements are checked and stepped as one flat array."""


def offsets(specs: tuple[ParamSpec, ...]) -> tuple[dict[str, int], int]:
    """Where each tensor starts in the flat layout (spec order), and the model's size."""
    out: dict[str, int] = {}
    total = 0
    for p in specs:
        out[p.name] = total
        total += p.size
    return out, total


def materialize(specs: tuple[ParamSpec, ...], seed: int, flat: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Initial values: tensor i draws from ``numpy.random.default_rng([seed, i])``.

    The same rule is in the proto's ``Initializer`` comment and in ``worker.models.materialize``,
    so any client can reproduce a run's starting point. ``flat``: a float32 buffer of the model's
    size that the tensors become consecutive views of (in spec order), instead of own arrays.
    """
    out: dict[str, np.ndarray] = {}
    off = 0
    for i, p in enumerate(specs):
        if flat is not None:
            arr = flat[off : off + p.size].reshape(p.shape)
            off += p.size
        else:
            arr = np.empty(p.shape, np.float32)
        if p.initializer is Initializer.ZEROS:
            arr.fill(0.0)
        elif p.initializer is Initializer.CONSTANT:
            arr.fill(np.float32(p.scale))
        else:
            rng = np.random.default_rng([seed, i])
            values = arr.reshape(-1)
            # In blocks: the generator's float64 draws for a 400 MB tensor would take 800 MB at
            # once. Consecutive draws continue the same stream, so the values are those of one call.
            with np.errstate(over="ignore"):
                for lo in range(0, values.size, _INIT_BLOCK):
                    n = min(_INIT_BLOCK, values.size - lo)
                    if p.initializer is Initializer.NORMAL:
                        values[lo : lo + n] = rng.normal(0.0, p.scale, n)
                    else:
                        values[lo : lo + n] = rng.uniform(-p.scale, p.scale, n)
            # Uniform and constant values stay within |scale| (checked to fit float32); normal
            # draws of a huge scale may not, and the run's divergence check assumes finite values.
            if p.initializer is Initializer.NORMAL and abs(p.scale) > FLOAT32_MAX / 64 and count_non_finite(arr):
                raise InvalidArgument(f"param {p.name!r}: initial values drawn with scale {p.scale:g} overflow "
                                      "float32; use a smaller scale")
        out[p.name] = arr
    return out


class Pieces:
    """A tensor that arrived in several chunks, kept as float32 views of the received messages at
    their flat offsets instead of being copied into one array (a copy and a large allocation per
    push saved; equal-sized messages also keep the allocator from fragmenting). The core reads it
    through ``blocks``; ``np.asarray`` joins it when a whole array is needed."""

    __slots__ = ("parts", "shape", "size")
    dtype = np.dtype(np.float32)

    def __init__(self, shape: tuple[int, ...], parts: list[tuple[int, np.ndarray]]) -> None:
        self.shape = shape
        self.size = sum(v.size for _, v in parts)
        self.parts = parts

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.shape, np.float32)
        flat = out.reshape(-1)
        for lo, v in self.parts:
            flat[lo : lo + v.size] = v
        return out if dtype is None else out.astype(dtype, copy=False)


Gradient: TypeAlias = "np.ndarray | Pieces"
"""What a push carries per tensor: one array, or the pieces it arrived in."""


def blocks(g: Gradient, block: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(flat offset, 1-D view)`` covering ``g`` in order, each at most ``block`` elements."""
    parts = g.parts if isinstance(g, Pieces) else [(0, g.reshape(-1))]
    for lo, v in parts:
        for i in range(0, v.size, block):
            yield lo + i, v[i : i + block]


def _finite_hint(v: np.ndarray) -> bool:
    """Cheap test that is True only if all of the 1-D ``v`` is finite (False may be a false alarm).

    ``v . v`` is NaN/Inf iff some element is, or when squares overflow (|x| > ~1.8e19): callers
    confirm a False with an exact count. BLAS's dot reads 1 MiB in ~17 µs here against ~41 µs for
    np.add.reduce's pairwise sum (and is cheaper at every size), but only on float32-aligned data:
    on unaligned views numpy's own dot loop is 60x slower, so those are summed instead.
    """
    if v.flags.aligned:
        return math.isfinite(np.dot(v, v))
    return math.isfinite(np.add.reduce(v, dtype=np.float32))


def count_non_finite(g: Gradient) -> int:
    """Exact number of NaN/Inf elements of ``g``."""
    return sum(int(np.count_nonzero(~np.isfinite(v))) for _, v in blocks(g, _CHECK_BLOCK))


class ParamStore:
    """The parameters of one run."""

    def __init__(self, specs: tuple[ParamSpec, ...], seed: int) -> None:
        self.specs = {p.name: p for p in specs}
        self._offsets, size = offsets(specs)
        self.flat = np.empty(size, np.float32)
        self.params = materialize(specs, seed, self.flat)
        self.nbytes = self.flat.nbytes
        # Small models: each whole-tensor gradient is copied here at its parameter's offset, so the
        # check and the step make one numpy call for the model instead of one per tensor (a small
        # model's push costs a few µs of work and ~20 numpy calls' overhead otherwise).
        self._gflat = np.empty(self.flat.size, np.float32) if self.flat.size <= FLAT_MAX else None
        self.derived: dict[Any, Any] = {}
        """For the transport: what it derives once from these arrays (their message layout)."""

    def check_gradient(self, grads: Mapping[str, Gradient]) -> np.ndarray | None:
        """Raise InvalidArgument unless ``grads`` has every tensor, right shapes, all finite.

        Returns the gradient laid out like ``flat`` (a scratch buffer, valid until the next call)
        when the model is at most ``FLAT_MAX`` elements and every tensor is one array; else None."""
        if grads.keys() != self.specs.keys():
            unknown = sorted(set(grads) - set(self.specs))
            if unknown:
                raise InvalidArgument(
                    f"unknown tensor name(s) {unknown}; this run's tensors are {sorted(self.specs)}"
                )
            missing = sorted(set(self.specs) - set(grads))
            raise InvalidArgument(f"the gradient lacks tensor(s) {missing}: send every parameter")
        gflat = self._gflat
        for name, g in grads.items():
            want = self.specs[name].shape
            if g.shape != want:
                raise InvalidArgument(
                    f"gradient {name!r} has shape {list(g.shape)}, the parameter has {list(want)}"
                )
            if g.dtype != np.float32:
                raise InvalidArgument(f"gradient {name!r} has dtype {g.dtype}, expected float32")
            if gflat is not None:
                if type(g) is np.ndarray:
                    off = self._offsets[name]
                    gflat[off : off + g.size] = g.reshape(-1)
                else:
                    gflat = None
        if gflat is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                if _finite_hint(gflat):
                    return gflat
        # One cheap pass per received part, without temporaries; the exact count runs only on an
        # alarm, so huge but finite values are accepted (the run fails if they make it diverge).
        with np.errstate(over="ignore", invalid="ignore"):
            for name, g in grads.items():
                if isinstance(g, Pieces):
                    finite = all(_finite_hint(v) for _, v in g.parts)
                else:
                    finite = _finite_hint(g.reshape(-1))
                if not finite:
                    bad = count_non_finite(g)
                    if bad:
                        raise InvalidArgument(f"gradient {name!r} contains {bad} NaN/Inf value(s); nothing was applied")
        return gflat  # a flat gradient whose dot product overflowed, but finite: still usable

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
