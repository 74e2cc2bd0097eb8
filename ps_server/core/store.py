"""A run's parameters: named float32 tensors, their initialisation and gradient validation.

Invariant: ``params`` always holds exactly the tensors of the run's spec, with their shapes, as
C-contiguous float32 arrays, and they only change through ``Optimizer.step``. ``check_gradient``
looks at a whole gradient before anything is applied, so a bad push changes nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np

from .errors import InvalidArgument, Reason, listed, quoted
from .spec import FLOAT32_MAX, Initializer, ParamSpec, offsets
from .tensors import BLOCK, Gradient, Pieces, Rows, Update, blocks, count_non_finite, finite_hint

__all__ = ["FLAT_MAX", "ParamStore", "materialize"]

_INIT_BLOCK = 1 << 20
FLAT_MAX = 1 << 18
"""Models of at most this many elements are checked and stepped as one flat array."""


def materialize(specs: tuple[ParamSpec, ...], seed: int, flat: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Initial values: tensor i draws from ``numpy.random.default_rng([seed, i])``.

    The same rule is in the proto's ``Initializer`` comment and in ``worker.models.materialize``,
    so any client can reproduce a run's starting point. ``flat``: a float32 buffer of the model's
    size that the tensors become consecutive views of (in spec order), instead of own arrays. A
    piece of a tensor (``ParamSpec.stream``) draws from its whole tensor's stream, past ``skip``
    values: the values that tensor's rows have on one server.
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
            rng = np.random.default_rng([seed, i if p.stream < 0 else p.stream])
            draw = partial(rng.normal, 0.0, p.scale) if p.initializer is Initializer.NORMAL else \
                partial(rng.uniform, -p.scale, p.scale)
            for lo in range(0, p.skip, _INIT_BLOCK):  # normal draws take a varying share of the stream:
                draw(min(_INIT_BLOCK, p.skip - lo))   # no jumping ahead, the skipped ones are drawn
            values = arr.reshape(-1)
            # In blocks: the generator's float64 draws for a 400 MB tensor would take 800 MB at
            # once. Consecutive draws continue the same stream, so the values are those of one call.
            with np.errstate(over="ignore"):
                for lo in range(0, values.size, _INIT_BLOCK):
                    n = min(_INIT_BLOCK, values.size - lo)
                    values[lo : lo + n] = draw(n)
            # Uniform and constant values stay within |scale| (checked to fit float32); normal
            # draws of a huge scale may not, and the run's divergence check assumes finite values.
            if p.initializer is Initializer.NORMAL and abs(p.scale) > FLOAT32_MAX / 64 and count_non_finite(arr):
                raise InvalidArgument(f"param {quoted(p.name)}: initial values drawn with scale {p.scale:g} overflow "
                                      "float32; use a smaller scale", Reason.INVALID_SPEC)
        out[p.name] = arr
    return out


def _in_range(spec: ParamSpec, ids: np.ndarray, then: str = "", reason: Reason = Reason.INVALID_REQUEST) -> None:
    """InvalidArgument unless every one of ``ids`` is a row of the table ``spec``."""
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= spec.shape[0]):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise InvalidArgument(f"table {quoted(spec.name)} has rows 0..{spec.shape[0] - 1}: row id {bad} is out of "
                              f"range{then}", reason)


def _check_finite(name: str, g: Gradient) -> None:
    bad = count_non_finite(g)
    if bad:
        raise InvalidArgument(f"gradient {quoted(name)} contains {bad} NaN/Inf value(s); nothing was applied",
                              Reason.INVALID_GRADIENT)


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
        self.tables = {p.name for p in specs if p.table}
        self._gflat = np.empty(self.flat.size, np.float32) if self.flat.size <= FLAT_MAX and not self.tables else None
        self._gviews: dict[str, np.ndarray] | None = None
        self.derived: dict[Any, Any] = {}
        """For the transport: what it derives once from these arrays (their message layout)."""
        self.lineage = secrets.randbits(63) or 1
        """This history of the parameters (versions repeat after a restore, with another lineage)."""
        self.changed: np.ndarray | None = None
        """With ``track_changes``: per element, the last version that changed it (delta pulls)."""

    def track_changes(self) -> None:
        """Record which elements each update changes (``mark``), for ``delta``: in runs whose steps
        change only the elements with a nonzero gradient (plain SGD without weight decay)."""
        self.changed = np.zeros(self.flat.size, np.uint32)

    def mark(self, grads: Mapping[str, Update], flat: np.ndarray | None, version: int) -> None:
        """The elements with a nonzero gradient in the update that made ``version``."""
        changed = self.changed
        if changed is None:
            return
        if version > np.iinfo(np.uint32).max:  # (4 billion updates) delta pulls end here: whole answers
            self.changed = None
            return
        v = np.uint32(version)
        if flat is not None:
            np.copyto(changed, v, where=flat != 0)  # (a mask: ~6x cheaper than flatnonzero's positions)
            return
        for name, g in grads.items():
            off = self._offsets[name]
            if isinstance(g, Rows):  # every element of each row pushed
                dim = g.values.shape[1]
                changed[(off + g.ids[:, None] * dim + np.arange(dim)).reshape(-1)] = v
                continue
            for lo, part in blocks(g, BLOCK):
                np.copyto(changed[off + lo : off + lo + part.size], v, where=part != 0)

    def delta(self, since: int, itemsize: int) -> dict[str, np.ndarray] | None:
        """Per tensor, the positions (uint32) of its elements changed after version ``since``
        (tensors without any left out); None when sending them (4 bytes of position and
        ``itemsize`` of value each) would not be smaller than the whole model, or untracked."""
        changed = self.changed
        if changed is None:
            return None
        newer = changed > since
        if np.count_nonzero(newer) * (4 + itemsize) >= changed.size * itemsize:
            return None
        out: dict[str, np.ndarray] = {}
        for name, arr in self.params.items():
            off = self._offsets[name]
            picked = np.flatnonzero(newer[off : off + arr.size])
            if picked.size:
                out[name] = picked.astype(np.uint32)
        return out

    def check_gradient(self, grads: dict[str, Gradient]) -> np.ndarray | None:
        """Raise InvalidArgument unless ``grads`` has every tensor (a table may be left out, or
        come as ``Rows``), right shapes, all finite; rows are merged in place (sorted, unique).

        Returns the gradient laid out like ``flat`` (a scratch buffer, valid until the next call)
        when the model is at most ``FLAT_MAX`` elements and every tensor is one array; else None."""
        if self.tables:
            self._check_rows(grads)
        if grads.keys() != self.specs.keys() and \
                not (self.tables and self.specs.keys() >= grads.keys() >= self.specs.keys() - self.tables):
            unknown = sorted(set(grads) - set(self.specs))
            if unknown:
                raise InvalidArgument(f"unknown tensor name(s) {listed(map(quoted, unknown))}; this run's tensors are "
                                      f"{listed(map(quoted, sorted(self.specs)))}", Reason.INVALID_GRADIENT)
            missing = sorted(set(self.specs) - set(grads) - self.tables)
            raise InvalidArgument(f"the gradient lacks tensor(s) {listed(map(quoted, missing))}: send every parameter",
                                  Reason.INVALID_GRADIENT)
        gflat = self._gflat
        for name, g in grads.items():
            if isinstance(g, Rows):
                continue
            want = self.specs[name].shape
            if g.shape != want:
                raise InvalidArgument(
                    f"gradient {quoted(name)} has shape {list(g.shape)}, the parameter has {list(want)}", Reason.INVALID_GRADIENT)
            if g.dtype != np.float32:
                raise InvalidArgument(f"gradient {quoted(name)} has dtype {g.dtype}, expected float32", Reason.INVALID_GRADIENT)
            if gflat is not None:
                if type(g) is np.ndarray:
                    off = self._offsets[name]
                    gflat[off : off + g.size] = g.reshape(-1)
                else:
                    gflat = None
        if gflat is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                if finite_hint(gflat):
                    return gflat
        # One cheap pass per received part, without temporaries; the exact count runs only on an
        # alarm, so huge but finite values are accepted (the run fails if they make it diverge).
        with np.errstate(over="ignore", invalid="ignore"):
            for name, g in grads.items():
                if isinstance(g, Rows):
                    continue  # checked by _check_rows
                if isinstance(g, Pieces):
                    finite = all(finite_hint(v) for _, v in g.parts)
                else:
                    finite = finite_hint(g.reshape(-1))
                if not finite:
                    _check_finite(name, g)
        return gflat  # a flat gradient whose dot product overflowed, but finite: still usable

    def flat_gradient(self) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
        """The scratch buffer ``check_gradient`` lays small gradients out in, and each tensor's
        view of it (for a transport that writes a push's tensors there itself, then
        ``check_flat``); None for models without one (large ones, tables)."""
        if self._gflat is None:
            return None
        if self._gviews is None:
            self._gviews = {name: self._gflat[off : off + self.specs[name].size].reshape(self.specs[name].shape)
                            for name, off in self._offsets.items()}
        return self._gflat, self._gviews

    def check_flat(self, gflat: np.ndarray, grads: Mapping[str, Gradient]) -> np.ndarray:
        """``check_gradient`` of a gradient already laid out in ``flat_gradient``'s buffer (every
        tensor there, in its shape; ``grads`` its views): only its values are checked."""
        with np.errstate(over="ignore", invalid="ignore"):
            if not finite_hint(gflat):
                for name, g in grads.items():
                    _check_finite(name, g)
        return gflat

    def _check_rows(self, grads: dict[str, Gradient]) -> None:
        """Rows of tables: a table's, its shape, ids in range, finite values; merged in place."""
        for name, g in grads.items():
            if not isinstance(g, Rows):
                continue
            spec = self.specs.get(name)
            if spec is None or not spec.table:
                what = "a tensor of this run" if spec is None else "a table"
                raise InvalidArgument(f"{quoted(name)} came as rows (row_ids) but is not {what}; this run's tables "
                                      f"are {listed(map(quoted, sorted(self.tables)))}", Reason.INVALID_GRADIENT)
            if g.shape != spec.shape:
                raise InvalidArgument(f"rows of table {quoted(name)} declare shape {list(g.shape)}, the table has "
                                      f"{list(spec.shape)}", Reason.INVALID_GRADIENT)
            _in_range(spec, g.ids, "; nothing was applied", Reason.INVALID_GRADIENT)
            with np.errstate(over="ignore", invalid="ignore"):
                if not finite_hint(g.values.reshape(-1)) and (bad := count_non_finite(g)):
                    raise InvalidArgument(f"gradient {quoted(name)} contains {bad} NaN/Inf value(s); nothing was applied",
                                          Reason.INVALID_GRADIENT)
                merged = g.merge()
                # Finite rows of a repeated id may sum beyond float32: an Inf no step's overflow watch
                # sees (Inf times the rate, subtracted, raises no flag: SGD made the rows -Inf).
                if merged is not g and not finite_hint(merged.values.reshape(-1)) and \
                        (bad := count_non_finite(merged)):
                    raise InvalidArgument(f"gradient {quoted(name)}: the rows of repeated ids sum to {bad} NaN/Inf "
                                          "value(s); nothing was applied", Reason.INVALID_GRADIENT)
            grads[name] = merged

    def check_rows(self, name: str, ids: np.ndarray, limit: int) -> None:
        """InvalidArgument unless ``name`` is a table and ``ids`` (at most ``limit``) are its rows."""
        spec = self.specs.get(name)
        if spec is None or not spec.table:
            tables = listed(map(quoted, sorted(self.tables))) if self.tables else "none"
            raise InvalidArgument(f"{quoted(name)} is not a table of this run (tables: {tables}): pull it by name")
        if ids.size > limit:
            raise InvalidArgument(f"a pull asks for {ids.size} rows of {quoted(name)}: at most {limit} per pull; "
                                  "split it")
        _in_range(spec, ids)

    def check_names(self, names: list[str] | None) -> None:
        """InvalidArgument unless every one of ``names`` is a tensor of this run."""
        unknown = sorted(set(names or ()) - set(self.params))
        if unknown:
            raise InvalidArgument(f"unknown tensor name(s) {listed(map(quoted, unknown))}; this run's tensors are "
                                  f"{listed(map(quoted, sorted(self.params)))}")

    def read(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """The live arrays (no copy) of ``names`` (all when None); InvalidArgument for unknown names."""
        if not names:
            return self.params
        self.check_names(names)
        return {n: self.params[n] for n in names}
