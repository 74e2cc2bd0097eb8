"""Server-side optimizers, applied in place.

Each optimizer owns its state (momentum, moments, accumulators): per state one flat float32 array
laid out like ``ParamStore.flat`` (the parameters in spec order), with a view per parameter; it
updates parameters and state in place. The work is done in blocks of
``BLOCK`` elements through preallocated scratch buffers, so a step allocates nothing and touches
memory once: temporaries the size of a 400 MB model would double the server's memory and cost
page faults on every step (DESIGN.md, performance facts).

A table (a 2-D parameter) may get a row-sparse gradient (``Rows``, merged: sorted unique ids).
Then the step is lazy, as TF's LazyAdam and sparse Adagrad: only the rows in ``ids`` of the
parameter and of every state change, with the same elementwise formulas below (weight decay on
those rows only; Adam's bias correction still uses the global step count). The rows of a block
are gathered into scratch buffers, updated by the same code as a dense block, and scattered back.

Formulas, with g the gradient plus ``weight_decay * w``:
    SGD       w <- w - lr * g                                     (the seed's formula 3)
    momentum  v <- mu * v + g;  w <- w - lr * v    (nesterov: w <- w - lr * (g + mu * v))
    Adam      m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
              w <- w - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    Adagrad   G <- G + g^2;  w <- w - lr * g / (sqrt(G) + eps)
    FTRL      sigma <- (sqrt(n + g^2) - sqrt(n)) / lr;  z <- z + g - sigma * w;  n <- n + g^2;
              w <- 0 if |z| <= l1 else -(z - sign(z) l1) / ((ftrl_beta + sqrt(n)) / lr + l2)
              (FTRL-proximal, McMahan et al. 2013, per coordinate; lr is its alpha)

Under staleness > 0 every push is one step (momentum and Adam see each worker's gradient in
arrival order, as in asynchronous SGD); under staleness 0 one step per clock, with the combined
gradient, so a BSP run equals single-process large-batch training with the same optimizer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from functools import partial

import numpy as np

from . import halves
from .spec import OptimizerConfig, OptimizerKind, ParamSpec, offsets
from .tensors import BLOCK, Rows, Update, blocks, count_non_finite

__all__ = ["OPTIMIZERS", "Optimizer", "make_optimizer"]

_F32 = np.float32
_TINY = np.finfo(_F32).tiny


class Optimizer:
    """Base class: subclasses implement ``_update(w, g, *state)`` on one block: ``w``, ``g`` and
    one array per name of ``state_names`` (in that order), all 1-D of the same size. For a dense
    block the states are views of the flat state (every state is one array laid out like
    ``ParamStore.flat``: the parameters in spec order; ``state`` holds per-parameter views); for a
    block of a table's rows they are the gathered rows, scattered back afterwards."""

    state_names: tuple[str, ...] = ()
    _scratch: tuple[str, ...] = ("_s1", "_s2")
    """The scratch buffers ``_update`` and ``_effective_grad`` use (``_half`` gives its own)."""

    def __init__(self, config: OptimizerConfig, params: tuple[ParamSpec, ...]) -> None:
        self.config = config
        self.steps = 0
        self._offsets, self.size = offsets(params)
        self._sizes = {p.name: p.size for p in params}
        total = self.size
        self._flat = {s: np.zeros(total, _F32) for s in self.state_names}
        self._flats = tuple(self._flat[s] for s in self.state_names)
        self.state: dict[str, dict[str, np.ndarray]] = {
            s: {p.name: flat[self._offsets[p.name] : self._offsets[p.name] + p.size] for p in params}
            for s, flat in self._flat.items()
        }
        largest = min(BLOCK, max(total, 1))
        self._s1 = np.empty(largest, _F32)
        self._s2 = np.empty(largest, _F32)
        self._half_scratch: tuple[np.ndarray, ...] = ()
        """The helper thread's scratch buffers (``_half``), allocated by the first split step."""
        self._gathered: tuple[np.ndarray, ...] = ()
        """Gathered rows of a table, for w then each state; allocated by the first ``Rows`` step
        (a model without tables never needs them)."""
        self._lr = _F32(config.learning_rate)
        self._scale = 1.0  # this step's learning rate over the configured one (a staleness-aware step)
        self._wd = _F32(config.weight_decay)

    def step(self, params: Mapping[str, np.ndarray],
             grads: Mapping[str, Update] | Callable[[], Mapping[str, Update]], lr_scale: float = 1.0,
             both_cores: bool = False) -> str | None:
        """Apply one update with ``grads`` (same names and sizes as ``params``, a table's possibly
        as merged ``Rows``; or what calling it returns, computed under the same watch: a BSP
        combination) in place. Returns None, or what became NaN/Inf ("parameter 'w'"): the
        training diverged.

        Parameters, state, hyper-parameters (validated to fit float32) and gradients are finite
        before a step, so a non-finite value can only come from an overflow, a 0/0 or a division by
        zero: the floating-point flags numpy checks after every ufunc call catch it without another
        pass over the model. Only then are the parameters and the state scanned (whole tables too,
        after a sparse step), to name the culprit. ``lr_scale``: this step's learning rate is the
        configured one times it (a staleness-aware step). ``both_cores``: the caller knows the
        other core idle (every worker waits for this step: BSP's), so a large tensor's second half
        is updated on a helper thread (``halves``); otherwise it would take a core from a worker
        (measured: more server CPU per push, no faster run)."""
        flags: list[str] = []
        with np.errstate(over="call", invalid="call", divide="call", under="ignore",
                         call=lambda kind, _flag: flags.append(kind)):
            self.steps += 1
            self._scale = lr_scale
            self._lr = _F32(self.config.learning_rate * lr_scale)
            self._begin_step()
            self._apply(params, grads() if callable(grads) else grads, both_cores)
        return self._culprit(params) if flags else None

    def step_flat(self, w: np.ndarray, g: np.ndarray, lr_scale: float = 1.0) -> str | None:
        """``step`` on the whole model at once: ``w`` and ``g`` are 1-D, laid out like the state
        (``ParamStore.flat`` and the gradient ``ParamStore.check_gradient`` gathers). The same
        arithmetic element by element, so the same result as ``step``; one call per block
        instead of per tensor."""
        flags: list[str] = []
        with np.errstate(over="call", invalid="call", divide="call", under="ignore",
                         call=lambda kind, _flag: flags.append(kind)):
            self.steps += 1
            self._scale = lr_scale
            self._lr = _F32(self.config.learning_rate * lr_scale)
            self._begin_step()
            for lo in range(0, self.size, BLOCK):
                hi = min(lo + BLOCK, self.size)
                self._dense(w[lo:hi], g[lo:hi], lo)
        if not flags:
            return None
        return self._culprit({n: w[off : off + self._sizes[n]] for n, off in self._offsets.items()})

    def _culprit(self, params: Mapping[str, np.ndarray]) -> str | None:
        """The first parameter or state array holding NaN/Inf (None: an intermediate overflowed,
        but every value kept is finite). The state too: an Inf second moment (a huge gradient
        squared) would freeze its parameters for good without making them non-finite."""
        for name, w in params.items():
            if count_non_finite(w):
                return f"parameter {name!r}"
        return next((f"optimizer state {k!r}" for k, a in self.state_arrays().items() if count_non_finite(a)), None)

    def _apply(self, params: Mapping[str, np.ndarray], grads: Mapping[str, Update], both_cores: bool) -> None:
        for name, w in params.items():
            wf = w.reshape(-1)
            off = self._offsets[name]
            g = grads.get(name)
            if g is None:  # a table no row of which was pushed
                continue
            if isinstance(g, Rows):
                self._apply_rows(wf, g, off)
            elif type(g) is np.ndarray and g.size <= BLOCK:  # one block, without the generator
                self._dense(wf, g.reshape(-1), off)
            elif both_cores and (mid := halves.cut(wf.size, BLOCK)):  # the second half on the other core
                half = self._half()
                halves.both(partial(self._blocks, wf, g, off, 0, mid), partial(half._blocks, wf, g, off, mid, wf.size))
            else:
                self._blocks(wf, g, off, 0, wf.size)

    def _blocks(self, wf: np.ndarray, g: Update, off: int, start: int, stop: int) -> None:
        """Update the elements [start, stop) of the tensor ``wf`` whose state starts at ``off``."""
        for lo, gb in blocks(g, BLOCK, start, stop):
            self._dense(wf[lo : lo + gb.size], gb, off + lo)

    def _half(self) -> Optimizer:
        """This optimizer as it is for this step, with scratch buffers of its own: the helper
        thread's, for the second half of a large tensor (every other attribute is shared or
        read only during a step)."""
        if not self._half_scratch:
            self._half_scratch = tuple(np.empty_like(getattr(self, name)) for name in self._scratch)
        half = copy.copy(self)
        for name, buf in zip(self._scratch, self._half_scratch, strict=True):
            setattr(half, name, buf)
        return half

    def _dense(self, w: np.ndarray, g: np.ndarray, lo: int) -> None:
        """Update the block ``w`` whose state starts at ``lo`` in the flat state."""
        hi = lo + g.size
        self._update(w, self._effective_grad(w, g), *(f[lo:hi] for f in self._flats))

    def _apply_rows(self, wf: np.ndarray, g: Rows, off: int) -> None:
        """Lazy step of the table ``wf`` (flat, state at ``off``): only the rows ``g.ids`` (sorted,
        unique, in range) of the parameter and of every state change."""
        dim = g.values.shape[1]
        if not g.ids.size or not dim:
            return
        per_block = BLOCK // dim
        if per_block <= 1:  # a row is a block or more: rows are contiguous, update them in place
            for i, row in enumerate(g.ids.tolist()):
                values = g.values[i]
                for c in range(0, dim, BLOCK):
                    lo = row * dim + c
                    self._dense(wf[lo : lo + min(BLOCK, dim - c)], values[c : c + BLOCK], off + lo)
            return
        if not self._gathered:
            self._gathered = tuple(np.empty(self._s1.size, _F32) for _ in range(1 + len(self._flats)))
        tables = (wf.reshape(-1, dim), *(f[off : off + wf.size].reshape(-1, dim) for f in self._flats))
        for i in range(0, g.ids.size, per_block):
            ids = g.ids[i : i + per_block]
            n = ids.size * dim
            rows = tuple(buf[:n].reshape(-1, dim) for buf in self._gathered)
            for table, out in zip(tables, rows, strict=True):
                # mode="clip": "raise" would buffer the output (ids are in range: the server's check).
                np.take(table, ids, axis=0, out=out, mode="clip")
            w, *state = (buf[:n] for buf in self._gathered)
            gb = g.values[i : i + per_block].reshape(-1)
            self._update(w, self._effective_grad(w, gb), *state)
            for table, out in zip(tables, rows, strict=True):
                table[ids] = out

    def _begin_step(self) -> None:
        pass

    def _effective_grad(self, w: np.ndarray, g: np.ndarray) -> np.ndarray:
        """g + weight_decay * w, in scratch buffer 2 when weight decay is on."""
        if not self._wd:
            return g
        out = self._s2[: g.size]
        np.multiply(w, self._wd, out=out)
        np.add(out, g, out=out)
        return out

    def _update(self, w: np.ndarray, g: np.ndarray, *state: np.ndarray) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Flat view of the state for checkpoints: ``"<state>/<param>" -> array``."""
        return {f"{s}/{n}": a for s, per in self.state.items() for n, a in per.items()}


class Sgd(Optimizer):
    def _update(self, w: np.ndarray, g: np.ndarray, *state: np.ndarray) -> None:
        s = self._s1[: w.size]
        np.multiply(g, self._lr, out=s)
        np.subtract(w, s, out=w)


class Momentum(Optimizer):
    state_names = ("velocity",)

    def _update(self, w: np.ndarray, g: np.ndarray, *state: np.ndarray) -> None:
        (v,) = state
        mu = _F32(self.config.momentum)
        np.multiply(v, mu, out=v)
        np.add(v, g, out=v)
        s = self._s1[: w.size]
        if self.config.nesterov:
            np.multiply(v, mu, out=s)
            np.add(s, g, out=s)
            np.multiply(s, self._lr, out=s)
        else:
            np.multiply(v, self._lr, out=s)
        np.subtract(w, s, out=w)


class Adam(Optimizer):
    state_names = ("m", "v")

    def _begin_step(self) -> None:
        c = self.config
        self._c1 = _F32(c.learning_rate * self._scale / (1.0 - c.beta1**self.steps))
        self._c2 = _F32(1.0 / (1.0 - c.beta2**self.steps))

    def _update(self, w: np.ndarray, g: np.ndarray, *state: np.ndarray) -> None:
        c = self.config
        m, v = state
        s = self._s1[: w.size]
        np.multiply(m, _F32(c.beta1), out=m)
        np.multiply(g, _F32(1.0 - c.beta1), out=s)
        np.add(m, s, out=m)
        np.multiply(v, _F32(c.beta2), out=v)
        np.multiply(g, g, out=s)
        np.multiply(s, _F32(1.0 - c.beta2), out=s)
        np.add(v, s, out=v)
        # s <- lr * m_hat / (sqrt(v_hat) + eps); g may live in scratch 2, which is no longer read.
        np.multiply(v, self._c2, out=s)
        np.sqrt(s, out=s)
        np.add(s, _F32(c.epsilon), out=s)
        np.divide(m, s, out=s)
        np.multiply(s, self._c1, out=s)
        np.subtract(w, s, out=w)


class Adagrad(Optimizer):
    state_names = ("accumulator",)

    def __init__(self, config: OptimizerConfig, params: tuple[ParamSpec, ...]) -> None:
        super().__init__(config, params)
        self._flat["accumulator"].fill(config.initial_accumulator)

    def _update(self, w: np.ndarray, g: np.ndarray, *state: np.ndarray) -> None:
        (acc,) = state
        s = self._s1[: w.size]
        np.multiply(g, g, out=s)
        np.add(acc, s, out=acc)
        np.sqrt(acc, out=s)
        np.add(s, _F32(self.config.epsilon), out=s)
        np.divide(g, s, out=s)
        np.multiply(s, self._lr, out=s)
        np.subtract(w, s, out=w)


class Ftrl(Optimizer):
    """FTRL-proximal: ``z`` accumulates the gradients (corrected for the moving w), ``n`` their
    squares; w is a closed form of both, exactly 0 where |z| <= l1 (sparse models)."""

    state_names = ("z", "n")
    _scratch = ("_s1", "_s2", "_s3")

    def __init__(self, config: OptimizerConfig, params: tuple[ParamSpec, ...]) -> None:
        super().__init__(config, params)
        self._s3 = np.empty(self._s1.size, _F32)  # sqrt(n) before the step, then sigma

    def _update(self, w: np.ndarray, g: np.ndarray, *state: np.ndarray) -> None:
        c = self.config
        z, n = state
        s1, s2, s3 = self._s1[: w.size], self._s2[: w.size], self._s3[: w.size]
        np.sqrt(n, out=s3)
        np.multiply(g, g, out=s1)
        np.add(n, s1, out=n)
        np.sqrt(n, out=s1)
        # sigma * w = (sqrt(n_new) - sqrt(n_old)) / lr * w; z <- z + (g - sigma * w)
        np.subtract(s1, s3, out=s3)
        np.divide(s3, self._lr, out=s3)
        np.multiply(s3, w, out=s3)
        np.subtract(g, s3, out=s3)
        np.add(z, s3, out=z)
        # s1 <- (beta + sqrt(n)) / lr + l2, kept >= the smallest normal float32: with beta = l2 = 0
        # a coordinate that never had a gradient has n = z = 0 and would give 0 / 0, not 0.
        np.add(s1, _F32(c.ftrl_beta), out=s1)
        np.divide(s1, self._lr, out=s1)
        np.add(s1, _F32(c.l2), out=s1)
        np.maximum(s1, _TINY, out=s1)
        # w <- -sign(z) * max(|z| - l1, 0) / s1; g (maybe in scratch 2) is no longer read.
        np.abs(z, out=s2)
        np.subtract(s2, _F32(c.l1), out=s2)
        np.maximum(s2, _F32(0), out=s2)
        np.divide(s2, s1, out=s2)
        np.copysign(s2, z, out=s2)
        np.subtract(_F32(0), s2, out=w)  # 0 - x, not -x: exactly +0.0 where |z| <= l1


OPTIMIZERS: dict[OptimizerKind, type[Optimizer]] = {
    OptimizerKind.SGD: Sgd,
    OptimizerKind.MOMENTUM: Momentum,
    OptimizerKind.ADAM: Adam,
    OptimizerKind.ADAGRAD: Adagrad,
    OptimizerKind.FTRL: Ftrl,
}


def make_optimizer(config: OptimizerConfig, params: tuple[ParamSpec, ...]) -> Optimizer:
    return OPTIMIZERS[config.kind](config, params)
