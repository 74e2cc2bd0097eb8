"""Server-side optimizers, applied in place.

Each optimizer owns its state (momentum, moments, accumulators): per state one flat float32 array
laid out like ``ParamStore.flat`` (the parameters in spec order), with a view per parameter; it
updates parameters and state in place. The work is done in blocks of
``BLOCK`` elements through preallocated scratch buffers, so a step allocates nothing and touches
memory once: temporaries the size of a 400 MB model would double the server's memory and cost
page faults on every step (DESIGN.md, performance facts).

Formulas, with g the gradient plus ``weight_decay * w``:
    SGD       w <- w - lr * g                                     (the seed's formula 3)
    momentum  v <- mu * v + g;  w <- w - lr * v    (nesterov: w <- w - lr * (g + mu * v))
    Adam      m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
              w <- w - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    Adagrad   G <- G + g^2;  w <- w - lr * g / (sqrt(G) + eps)

Under staleness > 0 every push is one step (momentum and Adam see each worker's gradient in
arrival order, as in asynchronous SGD); under staleness 0 one step per clock, with the combined
gradient, so a BSP run equals single-process large-batch training with the same optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from .spec import OptimizerConfig, OptimizerKind, ParamSpec, offsets
from .tensors import BLOCK, Gradient, blocks, count_non_finite

__all__ = ["OPTIMIZERS", "Optimizer", "make_optimizer"]

_F32 = np.float32


class Optimizer:
    """Base class: subclasses implement ``_update(w, g, lo, hi)`` on one block, where ``lo:hi``
    is the block's range in the flat state (every state is one array laid out like
    ``ParamStore.flat``: the parameters in spec order; ``state`` holds per-parameter views)."""

    state_names: tuple[str, ...] = ()

    def __init__(self, config: OptimizerConfig, params: tuple[ParamSpec, ...]) -> None:
        self.config = config
        self.steps = 0
        self._offsets, self.size = offsets(params)
        self._sizes = {p.name: p.size for p in params}
        total = self.size
        self._flat = {s: np.zeros(total, _F32) for s in self.state_names}
        self.state: dict[str, dict[str, np.ndarray]] = {
            s: {p.name: flat[self._offsets[p.name] : self._offsets[p.name] + p.size] for p in params}
            for s, flat in self._flat.items()
        }
        largest = min(BLOCK, max(total, 1))
        self._s1 = np.empty(largest, _F32)
        self._s2 = np.empty(largest, _F32)
        self._lr = _F32(config.learning_rate)
        self._wd = _F32(config.weight_decay)

    def step(self, params: Mapping[str, np.ndarray],
             grads: Mapping[str, Gradient] | Callable[[], Mapping[str, Gradient]]) -> str | None:
        """Apply one update with ``grads`` (same names and sizes as ``params``; or what calling it
        returns, computed under the same watch: a BSP combination) in place. Returns None, or what
        became NaN/Inf ("parameter 'w'"): the training diverged.

        Parameters, state, hyper-parameters (validated to fit float32) and gradients are finite
        before a step, so a non-finite value can only come from an overflow, a 0/0 or a division by
        zero: the floating-point flags numpy checks after every ufunc call catch it without another
        pass over the model. Only then are the parameters and the state scanned, to name the culprit."""
        flags: list[str] = []
        with np.errstate(over="call", invalid="call", divide="call", under="ignore",
                         call=lambda kind, _flag: flags.append(kind)):
            self.steps += 1
            self._begin_step()
            self._apply(params, grads() if callable(grads) else grads)
        return self._culprit(params) if flags else None

    def step_flat(self, w: np.ndarray, g: np.ndarray) -> str | None:
        """``step`` on the whole model at once: ``w`` and ``g`` are 1-D, laid out like the state
        (``ParamStore.flat`` and the gradient ``ParamStore.check_gradient`` gathers). The same
        arithmetic element by element, so the same result as ``step``; one call per block
        instead of per tensor."""
        flags: list[str] = []
        with np.errstate(over="call", invalid="call", divide="call", under="ignore",
                         call=lambda kind, _flag: flags.append(kind)):
            self.steps += 1
            self._begin_step()
            for lo in range(0, self.size, BLOCK):
                hi = min(lo + BLOCK, self.size)
                self._update(w[lo:hi], self._effective_grad(w[lo:hi], g[lo:hi]), lo, hi)
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

    def _apply(self, params: Mapping[str, np.ndarray], grads: Mapping[str, Gradient]) -> None:
        for name, w in params.items():
            wf = w.reshape(-1)
            off = self._offsets[name]
            g = grads[name]
            if type(g) is np.ndarray and g.size <= BLOCK:  # one block, without the generator
                gf = g.reshape(-1)
                self._update(wf, self._effective_grad(wf, gf), off, off + gf.size)
                continue
            for lo, g in blocks(grads[name], BLOCK):
                hi = lo + g.size
                self._update(wf[lo:hi], self._effective_grad(wf[lo:hi], g), off + lo, off + hi)

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

    def _update(self, w: np.ndarray, g: np.ndarray, lo: int, hi: int) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Flat view of the state for checkpoints: ``"<state>/<param>" -> array``."""
        return {f"{s}/{n}": a for s, per in self.state.items() for n, a in per.items()}


class Sgd(Optimizer):
    def _update(self, w: np.ndarray, g: np.ndarray, lo: int, hi: int) -> None:
        s = self._s1[: w.size]
        np.multiply(g, self._lr, out=s)
        np.subtract(w, s, out=w)


class Momentum(Optimizer):
    state_names = ("velocity",)

    def _update(self, w: np.ndarray, g: np.ndarray, lo: int, hi: int) -> None:
        v = self._flat["velocity"][lo:hi]
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
        self._c1 = _F32(c.learning_rate / (1.0 - c.beta1**self.steps))
        self._c2 = _F32(1.0 / (1.0 - c.beta2**self.steps))

    def _update(self, w: np.ndarray, g: np.ndarray, lo: int, hi: int) -> None:
        c = self.config
        m = self._flat["m"][lo:hi]
        v = self._flat["v"][lo:hi]
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

    def _update(self, w: np.ndarray, g: np.ndarray, lo: int, hi: int) -> None:
        acc = self._flat["accumulator"][lo:hi]
        s = self._s1[: w.size]
        np.multiply(g, g, out=s)
        np.add(acc, s, out=acc)
        np.sqrt(acc, out=s)
        np.add(s, _F32(self.config.epsilon), out=s)
        np.divide(g, s, out=s)
        np.multiply(s, self._lr, out=s)
        np.subtract(w, s, out=w)


OPTIMIZERS: dict[OptimizerKind, type[Optimizer]] = {
    OptimizerKind.SGD: Sgd,
    OptimizerKind.MOMENTUM: Momentum,
    OptimizerKind.ADAM: Adam,
    OptimizerKind.ADAGRAD: Adagrad,
}


def make_optimizer(config: OptimizerConfig, params: tuple[ParamSpec, ...]) -> Optimizer:
    return OPTIMIZERS[config.kind](config, params)
