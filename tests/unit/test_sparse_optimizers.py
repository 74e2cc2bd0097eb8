"""Row-sparse (lazy) optimizer steps on tables, and FTRL-proximal, against a float64 reference.

A ``Rows`` gradient of a table updates only its rows in ``ids``, in the parameter and in every
state (TF's LazyAdam, sparse Adagrad). The reference below is plain numpy in float64 written from
``ps_server/core/optimizers.py``'s docstring, one row set at a time; rows it does not touch must stay
bit for bit as they were, in the parameter and in the state.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_optimizers import CONFIGS as DENSE_CONFIGS

from ps_server.core import optimizers
from ps_server.core.errors import InvalidArgument
from ps_server.core.optimizers import make_optimizer
from ps_server.core.spec import OptimizerConfig, OptimizerKind, ParamSpec, RunSpec, validate_spec
from ps_server.core.tensors import Rows

pytestmark = pytest.mark.timeout(60)

ROWS, DIM = 50, 4
TABLE = ParamSpec("emb", (ROWS, DIM))
STEPS = 5

CONFIGS: dict[str, OptimizerConfig] = {  # the dense tests' settings, and FTRL
    **DENSE_CONFIGS,
    "ftrl": OptimizerConfig(OptimizerKind.FTRL, learning_rate=0.1, l1=0.01, l2=0.1, ftrl_beta=1.0),
}
CASES = [
    pytest.param(cfg if wd == 0 else dataclasses.replace(cfg, weight_decay=wd), id=f"{name}-wd{wd}")
    for name, cfg in CONFIGS.items()
    for wd in (0.0, 0.1)
]


class Reference:
    """float64, one parameter, updates the rows ``ids`` with the docstring's formulas."""

    def __init__(self, config: OptimizerConfig, w: np.ndarray) -> None:
        self.c = config
        self.t = 0
        self.w = w.astype(np.float64)
        zeros = np.zeros_like(self.w)
        self.state: dict[str, np.ndarray] = {
            OptimizerKind.SGD: {},
            OptimizerKind.MOMENTUM: {"velocity": zeros},
            OptimizerKind.ADAM: {"m": zeros, "v": zeros.copy()},
            OptimizerKind.ADAGRAD: {"accumulator": zeros + config.initial_accumulator},
            OptimizerKind.FTRL: {"z": zeros, "n": zeros.copy()},
        }[config.kind]

    def step(self, ids: np.ndarray, values: np.ndarray) -> None:
        c, s = self.c, self.state
        self.t += 1
        w = self.w[ids]
        g = values.astype(np.float64) + c.weight_decay * w
        lr = c.learning_rate
        if c.kind is OptimizerKind.SGD:
            w = w - lr * g
        elif c.kind is OptimizerKind.MOMENTUM:
            v = c.momentum * s["velocity"][ids] + g
            s["velocity"][ids] = v
            w = w - lr * ((g + c.momentum * v) if c.nesterov else v)
        elif c.kind is OptimizerKind.ADAM:
            m = c.beta1 * s["m"][ids] + (1 - c.beta1) * g
            v = c.beta2 * s["v"][ids] + (1 - c.beta2) * g**2
            s["m"][ids], s["v"][ids] = m, v
            w = w - lr * (m / (1 - c.beta1**self.t)) / (np.sqrt(v / (1 - c.beta2**self.t)) + c.epsilon)
        elif c.kind is OptimizerKind.ADAGRAD:
            acc = s["accumulator"][ids] + g**2
            s["accumulator"][ids] = acc
            w = w - lr * g / (np.sqrt(acc) + c.epsilon)
        else:
            n = s["n"][ids]
            sigma = (np.sqrt(n + g**2) - np.sqrt(n)) / lr
            z = s["z"][ids] + g - sigma * w
            n = n + g**2
            s["z"][ids], s["n"][ids] = z, n
            w = np.where(np.abs(z) <= c.l1, 0.0,
                         -(z - np.sign(z) * c.l1) / ((c.ftrl_beta + np.sqrt(n)) / lr + c.l2))
        self.w[ids] = w


def _rows(rng: np.random.Generator, rows: int = ROWS, dim: int = DIM, count: int = 12) -> Rows:
    ids = np.sort(rng.choice(rows, size=count, replace=False)).astype(np.int64)
    return Rows(ids, rng.normal(0.0, 1.0, (count, dim)).astype(np.float32), (rows, dim))


def _table(seed: int = 0, rows: int = ROWS, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (rows, dim)).astype(np.float32)


def _state(opt: optimizers.Optimizer, name: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {s: per[name].reshape(shape) for s, per in opt.state.items()}


@pytest.mark.parametrize("config", CASES)
def test_rows_step_matches_lazy_reference(config: OptimizerConfig) -> None:
    w = _table()
    ref = Reference(config, w)
    opt = make_optimizer(config, (TABLE,))
    rng = np.random.default_rng(1)
    touched = np.zeros(ROWS, bool)
    for _ in range(STEPS):
        before_w = w.copy()
        before_state = {k: a.copy() for k, a in _state(opt, "emb", TABLE.shape).items()}
        g = _rows(rng)
        assert opt.step({"emb": w}, {"emb": g}) is None
        ref.step(g.ids, g.values)
        touched[g.ids] = True
        untouched = np.setdiff1d(np.arange(ROWS), g.ids)
        # Rows outside ids: bit for bit as before, in the parameter and in every state.
        assert w[untouched].tobytes() == before_w[untouched].tobytes()
        for k, a in _state(opt, "emb", TABLE.shape).items():
            assert a[untouched].tobytes() == before_state[k][untouched].tobytes(), k
        assert not np.array_equal(w[g.ids], before_w[g.ids])
    assert opt.steps == STEPS and touched.any() and not touched.all()
    np.testing.assert_allclose(w, ref.w, rtol=2e-5, atol=2e-6)
    for k, a in _state(opt, "emb", TABLE.shape).items():
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, ref.state[k], rtol=2e-5, atol=2e-6, err_msg=k)


@pytest.mark.parametrize("config", CASES)
def test_dense_ftrl_and_reference_agree(config: OptimizerConfig) -> None:
    """The reference run with every row touched is the dense step (checks FTRL's dense path)."""
    w = _table()
    ref = Reference(config, w)
    opt = make_optimizer(config, (TABLE,))
    rng = np.random.default_rng(4)
    for _ in range(STEPS):
        g = rng.normal(0.0, 1.0, TABLE.shape).astype(np.float32)
        assert opt.step({"emb": w}, {"emb": g}) is None
        ref.step(np.arange(ROWS), g)
    np.testing.assert_allclose(w, ref.w, rtol=2e-5, atol=2e-6)
    for k, a in _state(opt, "emb", TABLE.shape).items():
        np.testing.assert_allclose(a, ref.state[k], rtol=2e-5, atol=2e-6, err_msg=k)


@pytest.mark.parametrize("config", CASES)
def test_all_rows_touched_is_the_dense_step(config: OptimizerConfig) -> None:
    """A Rows gradient naming every row updates parameter and state bit for bit as the same
    gradient as one dense array: the same elementwise code runs on gathered rows (lazy momentum
    and Adam equal dense ones when no row is skipped)."""
    dense_w, sparse_w = _table(), _table()
    a, b = make_optimizer(config, (TABLE,)), make_optimizer(config, (TABLE,))
    rng = np.random.default_rng(2)
    for _ in range(STEPS):
        g = rng.normal(0.0, 1.0, TABLE.shape).astype(np.float32)
        a.step({"emb": dense_w}, {"emb": g})
        b.step({"emb": sparse_w}, {"emb": Rows(np.arange(ROWS, dtype=np.int64), g, TABLE.shape)})
    assert dense_w.tobytes() == sparse_w.tobytes()
    for k, arr in a.state_arrays().items():
        assert arr.tobytes() == b.state_arrays()[k].tobytes(), k


@pytest.mark.parametrize("config", CASES)
def test_mixed_dense_and_table_in_one_step(config: OptimizerConfig) -> None:
    """A dense tensor before and after the table: each gets its own state slice."""
    specs = (ParamSpec("bias", (7,)), TABLE, ParamSpec("out", (3, 5)))
    rng = np.random.default_rng(3)
    params = {p.name: rng.normal(0.0, 1.0, p.shape).astype(np.float32) for p in specs}
    refs = {n: Reference(config, a.reshape(-1, a.shape[-1])) for n, a in params.items()}
    opt = make_optimizer(config, specs)
    for _ in range(STEPS):
        g = _rows(rng)
        dense = {n: rng.normal(0.0, 1.0, params[n].shape).astype(np.float32) for n in ("bias", "out")}
        assert opt.step(params, {**dense, "emb": g}) is None
        refs["emb"].step(g.ids, g.values)
        for n, d in dense.items():
            d2 = d.reshape(-1, d.shape[-1])
            refs[n].step(np.arange(d2.shape[0]), d2)
    for n, a in params.items():
        np.testing.assert_allclose(a.reshape(-1, a.shape[-1]), refs[n].w, rtol=2e-5, atol=2e-6, err_msg=n)
        for k, s in _state(opt, n, refs[n].w.shape).items():
            np.testing.assert_allclose(s, refs[n].state[k], rtol=2e-5, atol=2e-6, err_msg=f"{k}/{n}")


@pytest.mark.parametrize("config", CASES)
@pytest.mark.parametrize(("block", "dim"), [(8, 3), (4, 4), (2, 4), (3, 5)])
def test_blocks_give_the_same_step(monkeypatch: pytest.MonkeyPatch, config: OptimizerConfig,
                                   block: int, dim: int) -> None:
    """Rows split into several blocks (a row per block, or a row over several blocks) update
    the table bit for bit as one block does."""
    spec = ParamSpec("emb", (ROWS, dim))
    one_w, many_w = _table(5, dim=dim), _table(5, dim=dim)
    one = make_optimizer(config, (spec,))
    monkeypatch.setattr(optimizers, "BLOCK", block)
    many = make_optimizer(config, (spec,))
    rng = np.random.default_rng(6)
    for _ in range(STEPS):
        g = _rows(rng, dim=dim, count=20)
        monkeypatch.setattr(optimizers, "BLOCK", 1 << 18)
        one.step({"emb": one_w}, {"emb": g})
        monkeypatch.setattr(optimizers, "BLOCK", block)
        many.step({"emb": many_w}, {"emb": g})
    assert one_w.tobytes() == many_w.tobytes()
    for k, arr in one.state_arrays().items():
        assert arr.tobytes() == many.state_arrays()[k].tobytes(), k


def test_a_large_table_step_spans_several_blocks() -> None:
    """Without patching: enough rows that one step's ids take three gather blocks."""
    config = CONFIGS["adam"]
    dim = 64
    rows = 3 * (optimizers.BLOCK // dim) + 17
    spec = ParamSpec("emb", (rows, dim))
    w = np.zeros((rows, dim), np.float32)
    ref = Reference(config, w)
    opt = make_optimizer(config, (spec,))
    rng = np.random.default_rng(7)
    g = _rows(rng, rows=rows, dim=dim, count=rows - 5)
    assert g.ids.size > 2 * (optimizers.BLOCK // dim)
    opt.step({"emb": w}, {"emb": g})
    ref.step(g.ids, g.values)
    np.testing.assert_allclose(w, ref.w, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_ftrl_l1_makes_weights_exactly_zero(wd: float) -> None:
    config = OptimizerConfig(OptimizerKind.FTRL, learning_rate=0.5, l1=1.0, weight_decay=wd)
    w = _table()
    opt = make_optimizer(config, (TABLE,))
    rng = np.random.default_rng(8)
    ids = np.arange(0, ROWS, 2, dtype=np.int64)
    small = rng.uniform(-0.1, 0.1, (ids.size, DIM)).astype(np.float32)
    opt.step({"emb": w}, {"emb": Rows(ids, small, TABLE.shape)})
    # |z| = |g - sigma * w| is below l1 for small gradients of modest weights: w is exactly +0.0.
    z = opt.state["z"]["emb"].reshape(TABLE.shape)
    assert np.all(np.abs(z[ids]) <= 1.0)
    assert np.all(w[ids] == 0.0) and not np.signbit(w[ids]).any()
    assert np.all(w[1::2] == _table()[1::2])  # untouched rows keep their value
    big = np.full((ids.size, DIM), 50.0, np.float32)
    opt.step({"emb": w}, {"emb": Rows(ids, big, TABLE.shape)})
    assert np.all(w[ids] < 0)  # a large positive gradient pushes weights negative


def test_ftrl_beta_zero_does_not_divide_zero_by_zero() -> None:
    """beta = l2 = 0 and a coordinate with no gradient yet (n = z = 0): its weight is 0, and the
    step does not report divergence."""
    config = OptimizerConfig(OptimizerKind.FTRL, learning_rate=0.1, ftrl_beta=0.0)
    w = np.zeros((4, 2), np.float32)
    opt = make_optimizer(config, (ParamSpec("emb", (4, 2)),))
    g = np.array([[1.0, 0.0], [0.0, 0.0], [-2.0, 3.0], [0.0, 0.5]], np.float32)
    assert opt.step({"emb": w}, {"emb": g}) is None
    assert np.all(np.isfinite(w)) and w[1].tolist() == [0.0, 0.0]


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(list(CONFIGS)),
    wd=st.sampled_from([0.0, 0.05]),
    rows=st.integers(1, 12),
    dim=st.integers(1, 6),
    block=st.integers(1, 20),
    data=st.data(),
)
def test_random_rows_match_reference(kind: str, wd: float, rows: int, dim: int, block: int,
                                     data: st.DataObject) -> None:
    config = dataclasses.replace(CONFIGS[kind], weight_decay=wd)
    spec = ParamSpec("emb", (rows, dim))
    w = _table(1, rows=rows, dim=dim)
    ref = Reference(config, w)
    saved = optimizers.BLOCK
    optimizers.BLOCK = block  # hypothesis and function-scoped monkeypatch do not mix
    try:
        opt = make_optimizer(config, (spec,))
        for _ in range(data.draw(st.integers(1, 4))):
            ids = np.array(sorted(data.draw(st.sets(st.integers(0, rows - 1), max_size=rows))), np.int64)
            seed = data.draw(st.integers(0, 2**32 - 1))
            values = np.random.default_rng(seed).normal(0.0, 1.0, (ids.size, dim)).astype(np.float32)
            before = w.copy()
            assert opt.step({"emb": w}, {"emb": Rows(ids, values, (rows, dim))}) is None
            ref.step(ids, values)
            rest = np.setdiff1d(np.arange(rows), ids)
            assert w[rest].tobytes() == before[rest].tobytes()
    finally:
        optimizers.BLOCK = saved
    np.testing.assert_allclose(w, ref.w, rtol=2e-5, atol=2e-6)


def test_sparse_step_allocates_nothing_table_sized() -> None:
    """A step on a few rows of a large table gathers into block-sized buffers, allocated once."""
    import tracemalloc

    rows, dim = 1 << 16, 16
    config = CONFIGS["adam"]
    w = np.zeros((rows, dim), np.float32)
    opt = make_optimizer(config, (ParamSpec("emb", (rows, dim)),))
    g = _rows(np.random.default_rng(9), rows=rows, dim=dim, count=4000)
    opt.step({"emb": w}, {"emb": g})  # warm-up: the gather buffers
    tracemalloc.start()
    try:
        opt.step({"emb": w}, {"emb": g})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"sparse step allocated {peak} bytes at peak"


def test_divergence_in_a_rows_step_is_named() -> None:
    config = CONFIGS["adagrad"]
    w = _table()
    opt = make_optimizer(config, (TABLE,))
    g = Rows(np.array([3], np.int64), np.full((1, DIM), 3e38, np.float32), TABLE.shape)
    assert opt.step({"emb": w}, {"emb": g}) == "optimizer state 'accumulator/emb'"


def _spec(**optimizer: float) -> RunSpec:
    return RunSpec("r", 1, 1, (TABLE,), optimizer=OptimizerConfig(OptimizerKind.FTRL, **optimizer))


def test_ftrl_spec_validation() -> None:
    validate_spec(_spec(l1=0.5, l2=0.1, ftrl_beta=0.0))
    for field in ("l1", "l2", "ftrl_beta"):
        for bad in (-1.0, float("nan"), float("inf")):
            with pytest.raises(InvalidArgument, match=field):
                validate_spec(_spec(**{field: bad}))
    # Other kinds ignore FTRL's fields (beyond fitting in float32).
    validate_spec(RunSpec("r", 1, 1, (TABLE,), optimizer=OptimizerConfig(OptimizerKind.SGD, l1=-1.0)))
