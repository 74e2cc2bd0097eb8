"""Server-side optimizers against a float64 numpy reference written from the module's formulas.

The reference below is deliberately naive (whole arrays, float64, one line per formula of
``ps_server/optimizers.py``'s docstring) so that a mistake in the blocked, in-place float32
implementation shows up as a mismatch. One tensor is larger than ``optimizers.BLOCK`` so the
block loop (and the state slices it takes) is exercised, including a partial last block.
"""

from __future__ import annotations

import dataclasses
import itertools
import tracemalloc

import numpy as np
import pytest

from ps_server.core import halves
from ps_server.core.optimizers import BLOCK, make_optimizer
from ps_server.core.spec import OptimizerConfig, OptimizerKind, ParamSpec
from ps_server.core.store import Pieces
from ps_server.core.tensors import Sum, Update

pytestmark = pytest.mark.timeout(60)

STEPS = 4
# A tensor spanning three blocks, the last one partial, plus small ones (one of a single element).
SHAPES: dict[str, tuple[int, ...]] = {
    "layer.weight": (3, 4),
    "big": (2 * BLOCK + 1037,),
    "bias": (7,),
    "scalar": (1,),
}
SPECS = tuple(ParamSpec(name, shape) for name, shape in SHAPES.items())

CONFIGS: dict[str, OptimizerConfig] = {
    "sgd": OptimizerConfig(OptimizerKind.SGD, learning_rate=0.05),
    "momentum": OptimizerConfig(OptimizerKind.MOMENTUM, learning_rate=0.05, momentum=0.9),
    "nesterov": OptimizerConfig(OptimizerKind.MOMENTUM, learning_rate=0.05, momentum=0.8, nesterov=True),
    "adam": OptimizerConfig(OptimizerKind.ADAM, learning_rate=0.01, beta1=0.9, beta2=0.99, epsilon=1e-7),
    "adagrad": OptimizerConfig(OptimizerKind.ADAGRAD, learning_rate=0.1, epsilon=1e-7, initial_accumulator=0.1),
}
CASES = [
    pytest.param(cfg if wd == 0 else dataclasses.replace(cfg, weight_decay=wd), id=f"{name}-wd{wd}")
    for name, cfg in CONFIGS.items()
    for wd in (0.0, 0.1)
]


class Reference:
    """float64, whole-array, allocation-happy implementation of the docstring's formulas."""

    def __init__(self, config: OptimizerConfig, params: dict[str, np.ndarray]) -> None:
        self.c = config
        self.t = 0
        self.w = {n: a.astype(np.float64) for n, a in params.items()}
        zeros = {n: np.zeros(a.shape, np.float64) for n, a in params.items()}
        self.state: dict[str, dict[str, np.ndarray]] = {}
        if config.kind is OptimizerKind.MOMENTUM:
            self.state = {"velocity": dict(zeros)}
        elif config.kind is OptimizerKind.ADAM:
            self.state = {"m": dict(zeros), "v": {n: z.copy() for n, z in zeros.items()}}
        elif config.kind is OptimizerKind.ADAGRAD:
            self.state = {"accumulator": {n: z + config.initial_accumulator for n, z in zeros.items()}}

    def step(self, grads: dict[str, np.ndarray], lr_scale: float = 1.0) -> None:
        c = dataclasses.replace(self.c, learning_rate=self.c.learning_rate * lr_scale)
        self.t += 1
        for n, w in self.w.items():
            g = grads[n].astype(np.float64) + c.weight_decay * w
            if c.kind is OptimizerKind.SGD:
                w = w - c.learning_rate * g
            elif c.kind is OptimizerKind.MOMENTUM:
                v = c.momentum * self.state["velocity"][n] + g
                self.state["velocity"][n] = v
                w = w - c.learning_rate * ((g + c.momentum * v) if c.nesterov else v)
            elif c.kind is OptimizerKind.ADAM:
                m = c.beta1 * self.state["m"][n] + (1 - c.beta1) * g
                v = c.beta2 * self.state["v"][n] + (1 - c.beta2) * g**2
                self.state["m"][n], self.state["v"][n] = m, v
                m_hat = m / (1 - c.beta1**self.t)
                v_hat = v / (1 - c.beta2**self.t)
                w = w - c.learning_rate * m_hat / (np.sqrt(v_hat) + c.epsilon)
            else:
                acc = self.state["accumulator"][n] + g**2
                self.state["accumulator"][n] = acc
                w = w - c.learning_rate * g / (np.sqrt(acc) + c.epsilon)
            self.w[n] = w


def _init_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(0.0, 1.0, s).astype(np.float32) for n, s in SHAPES.items()}


def _grads(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {n: rng.normal(0.0, 1.0, s).astype(np.float32) for n, s in SHAPES.items()}


def test_a_tensor_spans_several_blocks() -> None:
    assert max(int(np.prod(s)) for s in SHAPES.values()) > 2 * BLOCK
    assert int(np.prod(SHAPES["big"])) % BLOCK != 0  # a partial last block


@pytest.mark.parametrize("scaled", [False, True], ids=["", "lr-scaled"])
@pytest.mark.parametrize("config", CASES)
def test_matches_float64_reference(config: OptimizerConfig, scaled: bool) -> None:
    """Scaled: each step's learning rate times its own factor (a staleness-aware step, 1/τ)."""
    params = _init_params()
    start = {n: a.copy() for n, a in params.items()}
    ref = Reference(config, params)
    opt = make_optimizer(config, SPECS)
    rng = np.random.default_rng(1)
    for scale in (1.0, 0.5, 0.2, 1 / 3)[:STEPS] if scaled else (1.0,) * STEPS:
        grads = _grads(rng)
        if scaled:
            opt.step(params, grads, scale)
        else:
            opt.step(params, grads)
        ref.step(grads, scale)
    assert opt.steps == STEPS
    for n in SHAPES:
        assert params[n].dtype == np.float32 and params[n].shape == SHAPES[n]
        np.testing.assert_allclose(params[n], ref.w[n], rtol=2e-5, atol=2e-6, err_msg=f"param {n}")
        # The comparison is meaningful: every tensor moved well beyond the tolerance.
        assert np.max(np.abs(params[n] - start[n])) > 1e-3, n
    for state_name, per_param in ref.state.items():
        for n, want in per_param.items():
            got = opt.state[state_name][n]
            assert got.dtype == np.float32
            np.testing.assert_allclose(
                got.reshape(SHAPES[n]), want, rtol=2e-5, atol=2e-6, err_msg=f"state {state_name}/{n}"
            )


def _as_pieces(g: np.ndarray, cuts: list[int]) -> Pieces:
    flat = g.reshape(-1)
    edges = [0, *cuts, flat.size]
    return Pieces(g.shape, [(lo, flat[lo:hi].copy()) for lo, hi in itertools.pairwise(edges) if hi > lo])


@pytest.mark.parametrize("config", CASES)
def test_pieces_give_the_same_step_as_whole_arrays(config: OptimizerConfig) -> None:
    """A gradient received in chunks (views at offsets, cut anywhere, also across block edges)
    updates parameters and state bit for bit as the same gradient in one array."""
    whole, pieced = _init_params(), _init_params()
    a, b = make_optimizer(config, SPECS), make_optimizer(config, SPECS)
    rng = np.random.default_rng(2)
    for _ in range(STEPS):
        grads = _grads(rng)
        a.step(whole, grads)
        size = grads["big"].size
        cuts = sorted({int(c) for c in rng.integers(1, size, 5)} | {BLOCK - 3, BLOCK + 5})
        b.step(pieced, {**grads, "big": _as_pieces(grads["big"], cuts), "bias": _as_pieces(grads["bias"], [2])})
    for n in SHAPES:
        assert whole[n].tobytes() == pieced[n].tobytes(), n
    for state_name, per_param in a.state.items():
        for n, arr in per_param.items():
            assert arr.tobytes() == b.state[state_name][n].tobytes(), (state_name, n)


@pytest.mark.parametrize("config", CASES)
def test_weight_decay_changes_the_update(config: OptimizerConfig) -> None:
    """Weight decay is actually applied (a step with g = 0 still moves w when decay is on)."""
    params = _init_params()
    start = {n: a.copy() for n, a in params.items()}
    opt = make_optimizer(config, SPECS)
    opt.step(params, {n: np.zeros(s, np.float32) for n, s in SHAPES.items()})
    moved = any(not np.array_equal(params[n], start[n]) for n in SHAPES)
    assert moved == (config.weight_decay > 0)


@pytest.mark.parametrize("config", CASES)
def test_step_is_in_place_and_keeps_state_arrays(config: OptimizerConfig) -> None:
    params = _init_params()
    param_objs = dict(params)
    param_ptrs = {n: a.ctypes.data for n, a in params.items()}
    opt = make_optimizer(config, SPECS)
    state_objs = {k: v for k, v in opt.state_arrays().items()}
    state_ptrs = {k: v.ctypes.data for k, v in state_objs.items()}
    expected_state = {
        OptimizerKind.SGD: set(),
        OptimizerKind.MOMENTUM: {"velocity"},
        OptimizerKind.ADAM: {"m", "v"},
        OptimizerKind.ADAGRAD: {"accumulator"},
    }[config.kind]
    assert set(opt.state) == expected_state
    assert len(state_objs) == len(expected_state) * len(SHAPES)
    before = {n: a.copy() for n, a in params.items()}
    rng = np.random.default_rng(2)
    for _ in range(2):
        opt.step(params, _grads(rng))
    for n in SHAPES:
        assert params[n] is param_objs[n], f"{n}: step replaced the parameter array"
        assert params[n].ctypes.data == param_ptrs[n]
        assert not np.array_equal(param_objs[n], before[n]), f"{n} was not updated in place"
    after = opt.state_arrays()
    assert set(after) == set(state_objs)
    for k, arr in after.items():
        assert arr is state_objs[k], f"state {k} was replaced by a new array"
        assert arr.ctypes.data == state_ptrs[k]


@pytest.mark.parametrize("config", CASES)
def test_step_allocates_no_model_sized_memory(config: OptimizerConfig) -> None:
    """A step works through preallocated scratch: no temporary anywhere near a tensor's size."""
    params = _init_params()
    opt = make_optimizer(config, SPECS)
    grads = _grads(np.random.default_rng(3))
    opt.step(params, grads)  # warm-up (lazy attributes, numpy caches)
    tracemalloc.start()
    try:
        opt.step(params, grads)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Python's own bookkeeping during a step is ~2 KB; one block-sized temporary would be 1 MiB.
    assert peak < 64 * 1024, f"step allocated {peak} bytes at peak: a temporary of block size?"


@pytest.mark.parametrize("config", CASES)
def test_flat_step_is_the_same_step(config: OptimizerConfig) -> None:
    """``step_flat`` on the whole model laid out in spec order (as ParamStore.flat and the gathered
    gradient of a small model are) updates parameters and state bit for bit as ``step`` does,
    although its blocks fall elsewhere (the model spans several blocks here)."""
    per_tensor = _init_params()
    flat = np.concatenate([a.reshape(-1) for a in _init_params().values()])
    a, b = make_optimizer(config, SPECS), make_optimizer(config, SPECS)
    rng = np.random.default_rng(3)
    for _ in range(STEPS):
        grads = _grads(rng)
        a.step(per_tensor, grads)
        b.step_flat(flat, np.concatenate([grads[n].reshape(-1) for n in SHAPES]))
    assert flat.tobytes() == np.concatenate([per_tensor[n].reshape(-1) for n in SHAPES]).tobytes()
    assert a.steps == b.steps == STEPS
    for key, arr in a.state_arrays().items():
        assert arr.tobytes() == b.state_arrays()[key].tobytes(), key


HALVES_CASES = [*CASES, pytest.param(OptimizerConfig(OptimizerKind.FTRL, learning_rate=0.1, l1=0.01, l2=0.1,
                                                     ftrl_beta=1.0, weight_decay=0.1), id="ftrl-wd0.1")]


@pytest.mark.parametrize("form", ["array", "pieces", "sum"])
@pytest.mark.parametrize("config", HALVES_CASES)
def test_a_large_tensor_stepped_in_two_halves_on_two_threads_is_the_same_step(
        config: OptimizerConfig, form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """From ``halves.MIN_ELEMENTS`` elements a tensor's second half is updated on a helper
    thread (its own scratch buffers, the same state arrays): parameters and state bit for bit as
    on one thread, whatever form the gradient has (one array, pieces cut across the halves'
    edge, BSP's lazy sum)."""
    monkeypatch.setattr(halves, "_CORES", 2)
    monkeypatch.setattr(halves, "MIN_ELEMENTS", BLOCK)
    split, both = [], halves.both
    monkeypatch.setattr(halves, "both", lambda first, second: (split.append(1), both(first, second))[1])
    results = []
    for both_cores in (False, True):  # one thread; "big" in two halves
        params, opt, rng = _init_params(), make_optimizer(config, SPECS), np.random.default_rng(5)
        for _ in range(STEPS):
            grads: dict[str, Update] = dict(_grads(rng))
            big = grads["big"]
            assert isinstance(big, np.ndarray)
            if form == "pieces":
                grads["big"] = _as_pieces(big, [BLOCK - 3, BLOCK + 5, 2 * BLOCK + 1])
            elif form == "sum":
                grads = {n: Sum([g, _as_pieces(g * 0.5, [1])], np.float32(0.5), g.shape) for n, g in grads.items()
                         if isinstance(g, np.ndarray)}
            assert opt.step(params, grads, both_cores=both_cores) is None
        assert len(split) == (STEPS if both_cores else 0)  # only "big" is as large as MIN_ELEMENTS
        results.append((params, opt.state_arrays()))
    (one, one_state), (two, two_state) = results
    for n in SHAPES:
        assert one[n].tobytes() == two[n].tobytes(), n
    for key, arr in one_state.items():
        assert arr.tobytes() == two_state[key].tobytes(), key


def test_an_overflow_in_the_helper_threads_half_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper thread runs in the step's ``np.errstate``: an Inf made there fails the step."""
    monkeypatch.setattr(halves, "_CORES", 2)
    monkeypatch.setattr(halves, "MIN_ELEMENTS", BLOCK)
    params = _init_params()
    grads = _grads(np.random.default_rng(6))
    grads["big"][-1] = 3e38  # in the second half: w - lr * g stays finite, lr * g does not overflow...
    params["big"][-1] = -3e38  # ...but w - lr * g does (float32 max ~3.4e38)
    opt = make_optimizer(OptimizerConfig(OptimizerKind.SGD, learning_rate=1.0), SPECS)
    assert opt.step(params, grads, both_cores=True) == "parameter 'big'"


# Two steps of one weight (w0 = 1, gradients 2 then -1; FTRL: w0 = 0, gradients 2 then 0.1), worked
# out by hand from the textbook forms, not from the module's docstring: SGD; heavy-ball momentum
# as PyTorch's (v = mu v + g, w -= lr v; Nesterov: w -= lr (g + mu v)); Adam, Kingma & Ba's
# Algorithm 1; Adagrad, Duchi et al. with TF's epsilon; FTRL-proximal, McMahan et al. 2013, Alg. 1.
HAND: dict[str, tuple[OptimizerConfig, float, tuple[float, float], tuple[float, float]]] = {
    # 1 - 0.1*2 = 0.8; 0.8 - 0.1*(-1) = 0.9
    "sgd": (OptimizerConfig(OptimizerKind.SGD, learning_rate=0.1), 1.0, (2.0, -1.0), (0.8, 0.9)),
    # v = 2, w = 1 - 0.2 = 0.8; v = 0.9*2 - 1 = 0.8, w = 0.8 - 0.08 = 0.72
    "momentum": (OptimizerConfig(OptimizerKind.MOMENTUM, learning_rate=0.1, momentum=0.9), 1.0, (2.0, -1.0),
                 (0.8, 0.72)),
    # v = 2, w = 1 - 0.1*(2 + 1.8) = 0.62; v = 0.8, w = 0.62 - 0.1*(-1 + 0.72) = 0.648
    "nesterov": (OptimizerConfig(OptimizerKind.MOMENTUM, learning_rate=0.1, momentum=0.9, nesterov=True), 1.0,
                 (2.0, -1.0), (0.62, 0.648)),
    # m = 0.2, v = 0.004: m^ = 2, v^ = 4, w = 1 - 0.1*2/2 = 0.9; m = 0.08, v = 0.004996:
    # m^ = 0.08/0.19, v^ = 0.004996/0.001999, w = 0.9 - 0.1*0.421053/1.580909 = 0.873367
    "adam": (OptimizerConfig(OptimizerKind.ADAM, learning_rate=0.1, beta1=0.9, beta2=0.999, epsilon=1e-8), 1.0,
             (2.0, -1.0), (0.9, 0.9 - 0.1 * (0.08 / 0.19) / (0.004996 / 0.001999) ** 0.5)),
    # G = 0.1 + 4, w = 1 - 0.2/sqrt(4.1) = 0.901227; G = 5.1, w = 0.901227 + 0.1/sqrt(5.1) = 0.945508
    "adagrad": (OptimizerConfig(OptimizerKind.ADAGRAD, learning_rate=0.1, epsilon=1e-7, initial_accumulator=0.1),
                1.0, (2.0, -1.0), (1 - 0.2 / 4.1**0.5, 1 - 0.2 / 4.1**0.5 + 0.1 / 5.1**0.5)),
    # sigma = 2/0.1 = 20, z = 2, n = 4, w = -(2 - 0.5)/((1 + 2)/0.1) = -0.05; sigma = (sqrt(4.01) - 2)/0.1,
    # z = 2.1 + 0.05 sigma, n = 4.01, w = -(z - 0.5)/((1 + sqrt(4.01))/0.1)
    "ftrl": (OptimizerConfig(OptimizerKind.FTRL, learning_rate=0.1, l1=0.5, l2=0.0, ftrl_beta=1.0), 0.0, (2.0, 0.1),
             (-0.05, -(2.1 + 0.05 * (4.01**0.5 - 2) / 0.1 - 0.5) / ((1 + 4.01**0.5) / 0.1))),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_two_steps_of_one_weight_are_the_textbook_values(name: str) -> None:
    config, w0, grads, want = HAND[name]
    w = {"w": np.array([w0], np.float32)}
    opt = make_optimizer(config, (ParamSpec("w", (1,)),))
    for g, expected in zip(grads, want, strict=True):
        assert opt.step(w, {"w": np.array([g], np.float32)}) is None
        assert w["w"][0] == pytest.approx(expected, rel=2e-6, abs=1e-7), (name, g)
