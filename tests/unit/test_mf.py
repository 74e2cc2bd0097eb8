"""Matrix factorisation over user and item tables (issue 19): the planted ratings, the model's exact
row-sparse gradient, and a planted problem trained to its noise level, by numpy and by the workers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from support import train_all, train_with_a_zero_pusher

from client.spec import LaunchOptions, build_run_spec
from ps_server.core.run import Run
from ps_server.testing import InMemoryServer
from worker.config import WorkerConfig, parse_config, parse_tail_delay
from worker.datasets import DatasetError, load_dataset, parse_dataset
from worker.models import MatrixFactorization, ModelSpecError, build_model, parse_model
from worker.sparse import RowBlock
from worker.straggler import Straggler
from worker.trainer import Outcome

pytestmark = pytest.mark.timeout(120)

SMALL = "synthetic-ratings:users=60,items=50,rank=2,density=0.5,noise=0.1"
TINY = "synthetic-ratings:users=4,items=4,rank=2,density=1,noise=0.1"
"""Every row soon cached: pushes without pulls."""


async def train_run(spec: object, config: WorkerConfig) -> tuple[list[Outcome], Run]:
    async with InMemoryServer() as server:
        run_id, outcomes = await train_all(server, spec, config)
        return outcomes, server.registry.get(run_id)


def blocks(U: np.ndarray, V: np.ndarray) -> dict[str, RowBlock]:
    return {"mf.users": RowBlock(np.arange(len(U)), U), "mf.items": RowBlock(np.arange(len(V)), V)}


def test_planted_ratings_are_deterministic_and_their_best_rmse_is_the_noise() -> None:
    spec = parse_dataset("synthetic-ratings:users=400,items=300,rank=4,density=0.1,noise=0.2,seed=3")
    d = load_dataset(spec)
    assert d.task == "ratings" and (d.n_features, d.n_outputs) == (400, 300)
    n = round(0.1 * 400 * 300)
    assert len(d.y_train) + len(d.y_test) == n and len(d.y_test) == round(0.1 * n)
    pairs = np.concatenate([d.X_train, d.X_test])
    assert len(np.unique(pairs[:, 0] * 300 + pairs[:, 1])) == n  # each cell observed once
    assert d.X_train.dtype == np.int64 and d.y_train.dtype == np.float32 and not d.X_train.flags.writeable
    assert float(np.std(np.concatenate([d.y_train, d.y_test]))) == pytest.approx(np.sqrt(1 + 0.2**2), rel=0.1)
    assert float(d.extras["planted_rmse"]) == pytest.approx(0.2, rel=0.1)
    again = load_dataset({**spec})  # memoised, and the same arrays from a fresh generation
    assert again is d
    other = load_dataset(parse_dataset("synthetic-ratings:users=400,items=300,rank=4,density=0.1,noise=0.2,seed=4"))
    assert not np.array_equal(other.y_train[:50], d.y_train[:50])


@pytest.mark.parametrize(("text", "match"), [
    ("synthetic-ratings:density=0", "density must be in"),
    ("synthetic-ratings:users=0", "users must be >= 1"),
    ("synthetic-ratings:users=2,items=2,density=0.2", "observes 1 ratings"),
    ("synthetic-ratings:colour=3", "unknown option"),
])
def test_bad_ratings_options_say_what_to_fix(text: str, match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        load_dataset(parse_dataset(text))


def test_parse_and_build_mf() -> None:
    assert parse_model("mf:8") == {"kind": "mf", "factors": 8, "reg": 0.0}
    assert parse_model("mf:4:reg=0.01") == {"kind": "mf", "factors": 4, "reg": 0.01}
    m = build_model(parse_model("mf:4"), 30, 20)
    assert isinstance(m, MatrixFactorization) and m.tables() == {"mf.users": 4, "mf.items": 4}
    assert {p.name: p.shape for p in m.param_specs()} == {"mf.users": (30, 4), "mf.items": (20, 4)}
    for bad, match in (("mf", "cannot parse"), ("mf:x", "bad factor count"), ("mf:0", "positive integer"),
                       ("mf:4:rows=3", "expected 'reg=L'"), ("mf:4:reg=-1", "'reg' must be")):
        with pytest.raises(ModelSpecError, match=match):
            parse_model(bad)
    with pytest.raises(ValueError, match="beyond the model's 30 users"):
        m.prepare(np.array([[30, 0]]))
    with pytest.raises(ValueError, match="integer array of shape"):
        m.prepare(np.zeros((3, 2), np.float32))


@pytest.mark.parametrize("reg", [0.0, 0.3])
def test_the_gradient_is_exact_and_sums_a_row_rated_twice(reg: float) -> None:
    m = MatrixFactorization(3, 6, 5, reg)
    rng = np.random.default_rng(0)
    U, V = rng.normal(0, 0.7, (6, 3)), rng.normal(0, 0.7, (5, 3))
    X = np.array([[1, 2], [4, 2], [1, 0], [5, 4], [1, 2]], np.int64)  # user 1 three times, item 2 three times
    y = rng.normal(size=5).astype(np.float64)
    loss, grads = m.loss_and_grad(blocks(U, V), X, y)
    assert list(grads["mf.users"].ids) == [1, 4, 5] and list(grads["mf.items"].ids) == [0, 2, 4]
    for name, P in (("mf.users", U), ("mf.items", V)):
        g = grads[name]
        assert isinstance(g, RowBlock)
        for row, col in ((g.ids[0], 0), (g.ids[1], 2), (g.ids[-1], 1)):
            Q = P.copy()
            Q[row, col] += 1e-6
            args = blocks(Q, V) if name == "mf.users" else blocks(U, Q)
            numeric = (m.loss_and_grad(args, X, y)[0] - loss) / 1e-6
            assert g.values[list(g.ids).index(row), col] == pytest.approx(numeric, rel=1e-4, abs=1e-7)
    e = np.einsum("ij,ij->i", U[X[:, 0]], V[X[:, 1]]) - y
    assert loss == pytest.approx(0.5 * np.mean(e**2) + 0.5 * reg * (np.sum(U[X[:, 0]] ** 2) + np.sum(V[X[:, 1]] ** 2)) / 5)
    assert m.evaluate(blocks(U, V), X, y).loss == pytest.approx(np.sqrt(np.mean(e**2)))
    with pytest.raises(ValueError, match="lacks rows"):
        m.loss_and_grad({"mf.users": RowBlock(np.array([0]), U[:1]), "mf.items": blocks(U, V)["mf.items"]}, X, y)


def test_plain_sgd_on_rows_reaches_the_planted_noise() -> None:
    """The planted problem is learnable as stated: row-sparse SGD steps bring the test RMSE from ~1
    to within 1.5x of the noise level."""
    d = load_dataset(parse_dataset("synthetic-ratings:users=100,items=100,rank=2,density=0.5,noise=0.1"))
    m = build_model(parse_model("mf:2"), d.n_features, d.n_outputs)
    p = m.init_params(0)
    rng = np.random.default_rng(0)
    start = m.evaluate(blocks(p["mf.users"], p["mf.items"]), d.X_test, d.y_test).loss
    for _ in range(3000):
        idx = rng.integers(0, len(d.y_train), 32)
        _, grads = m.loss_and_grad(blocks(p["mf.users"], p["mf.items"]), d.X_train[idx], d.y_train[idx])
        for name, g in grads.items():
            assert isinstance(g, RowBlock)
            p[name][g.ids] -= np.float32(1.0) * g.values
    end = m.evaluate(blocks(p["mf.users"], p["mf.items"]), d.X_test, d.y_test).loss
    assert start > 0.9 and end < 1.5 * float(d.extras["planted_rmse"])


@pytest.mark.parametrize("staleness", [0, 2, -1])
async def test_workers_train_mf_over_tables_to_low_rmse(staleness: int) -> None:
    """Two workers pull and push rows of both tables through the server; the final RMSE (rank 0's
    evaluation) is near the noise, and every push was applied once."""
    spec = build_run_spec(LaunchOptions(model="mf:2", dataset=SMALL, workers=2, staleness=staleness,
                                        aggregation="sum" if staleness == 0 else "mean",
                                        iterations=600, batch_size=32, lr=1.0))
    assert list(spec.requires) == ["tables", "model:mf"]
    config = WorkerConfig(timeout_seconds=5.0, report_seconds=0.05)
    outcomes, core = await train_run(spec, config)
    assert all(o.completed for o in outcomes), outcomes
    assert core.status().counters.pushes_applied == 1200 and core.status().counters.rows_pushed > 0
    assert core.history.last_eval is not None and core.history.last_eval.eval_loss < 0.3


def test_tail_delays_are_seeded_and_as_frequent_as_asked() -> None:
    assert parse_tail_delay("") == (0.0, 1.0) and parse_tail_delay("0.05:10") == (0.05, 10.0)
    for bad in ("0.05", "2:10", "0.1:0.5", "x:y"):
        with pytest.raises(ValueError, match="use P:FACTOR"):
            parse_tail_delay(bad)
    with pytest.raises(SystemExit):
        parse_config(["--tail-delay", "0.5"], {})
    assert dataclasses.replace(parse_config(["--tail-delay", "0.1:4"], {})).tail_delay == "0.1:4"

    def delays(seed: int) -> list[float]:
        s = Straggler(1.0, (0.1, 10.0), np.random.default_rng(seed))
        out = []
        for _ in range(2000):
            owed = s.owe(0.002, 0.0)  # 2 ms of work: a delayed iteration owes 9 x 2 ms
            s.paid(owed)
            out.append(owed)
        return out

    a = delays(1)
    assert a == delays(1) and a != delays(2)
    delayed = [x for x in a if x > 0]
    assert all(x == pytest.approx(0.018) for x in delayed)
    assert 0.07 < len(delayed) / len(a) < 0.13


async def test_a_table_run_tells_a_straggler_which_iterations_waited(monkeypatch: pytest.MonkeyPatch) -> None:
    """A delay is a multiple of a rank's own work, never of its waits for other ranks (else a
    transient delay under BSP inflates every rank's next delays). Rank 1 is slower; rank 0's
    iterations that waited for it say so, and those that did not were short. (Rank 1 is 20x
    slower here: an mf iteration computes for ~0.1 ms, and at 3x its sleep was shorter than a round
    trip, so rank 0 waited in only about half of its iterations.)"""
    seen: list[tuple[float, float, float, bool]] = []
    owe = Straggler.owe

    def recorded(self: Straggler, compute: float, comm: float, parked: bool = False) -> float:
        seen.append((self.factor, compute, comm, parked))
        return owe(self, compute, comm, parked)

    monkeypatch.setattr(Straggler, "owe", recorded)
    spec = build_run_spec(LaunchOptions(model="mf:2", dataset=SMALL, workers=2, staleness=0, iterations=60,
                                        batch_size=32, lr=1.0, slowdown=((1, 20.0),)))
    config = WorkerConfig(timeout_seconds=5.0, report_seconds=0.05, tail_delay="1:1")  # a Straggler, no delay
    await train_run(spec, config)
    fast = [(comm, parked) for factor, _, comm, parked in seen if factor == 1.0]
    waited = [comm for comm, parked in fast if parked]
    free = [comm for comm, parked in fast if not parked]
    assert len(waited) > len(fast) // 2, "under BSP the fast rank waits for the slow one most iterations"
    # (few iterations go free: one of them slowed by a busy machine must not decide it)
    assert not free or min(free) < 0.5 * float(np.median(waited))


def test_a_model_for_another_task_is_refused_with_the_one_to_use() -> None:
    with pytest.raises(ValueError, match="dataset 'synthetic-ratings' is ratings: use mf:K"):
        build_run_spec(LaunchOptions(model="mlp:64", dataset="synthetic-ratings"))
    with pytest.raises(ValueError, match="does a ratings task but dataset 'digits' is classification"):
        build_run_spec(LaunchOptions(model="mf:4", dataset="digits"))


async def test_cached_rows_follow_a_bound_the_schedule_tightens(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's bound goes from 8 to 1 at 20% of it: from then on no row older than c - 1 is
    reused (the caches kept the bound they were made with, and reused rows 7 clocks too old)."""
    from worker import table_step
    from worker.tables import RowCache

    current: list[table_step.TableStep] = []
    too_old: list[tuple[int, int, int]] = []
    step, block = table_step.TableStep.step, RowCache.block

    async def stepping(self: table_step.TableStep, params: dict[str, object], guaranteed: int) -> int:
        current[:] = [self]
        return await step(self, params, guaranteed)

    def checked(self: RowCache, needed: np.ndarray, clock: int, *args: object) -> np.ndarray:
        s = current[0].t.staleness
        hit, pos = self.lookup(needed, clock)
        if s > 0 and hit.any() and int(self.clocks[pos[hit]].min()) < clock - s:
            too_old.append((clock, s, int(self.clocks[pos[hit]].min())))
        return block(self, needed, clock, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(table_step.TableStep, "step", stepping)
    monkeypatch.setattr(RowCache, "block", checked)
    spec = build_run_spec(LaunchOptions(model="mf:2", dataset=SMALL, workers=2, staleness=8, iterations=120,
                                        batch_size=32, lr=0.5, staleness_schedule="20%=1"))
    outcomes, run = await train_run(spec, WorkerConfig(timeout_seconds=5.0, report_seconds=0.05))
    assert all(o.completed for o in outcomes) and run.spec.staleness == 1
    assert not too_old, f"{len(too_old)} rows reused older than the bound, e.g. {too_old[:3]}"
    assert sum(o.stats.pulls_skipped for o in outcomes) > 0  # (rows and parameters were reused at all)


async def test_evaluation_pulls_each_table_s_rows_however_many_pulls_each_needs() -> None:
    """Rank 0's evaluation asks for the test split's rows in pulls of at most 2^20 ids per table.
    With more users than that and a few items, the last pull asks for users only: the answer
    has no rows of the items (a table asked for with no ids is not in ``PullResult.rows``, as the
    server answers), and the evaluation still gets every row of both tables (it raised KeyError)."""
    from types import SimpleNamespace

    from paramserver.sink import PullResult
    from worker.models import EvalResult
    from worker.table_step import TableStep

    needed = {"mf.users": np.arange((1 << 20) + 3, dtype=np.int64), "mf.items": np.arange(5, dtype=np.int64)}
    asked: list[dict[str, int]] = []
    seen: dict[str, RowBlock] = {}

    async def pull(*_: object, rows: dict[str, np.ndarray], **__: object) -> PullResult:
        asked.append({n: ids.size for n, ids in rows.items()})
        got = {n: (ids, ids.astype(np.float32)[:, None]) for n, ids in rows.items() if ids.size}  # as the server
        return PullResult(0, 0, 1, {}, got)

    def evaluate(params: dict[str, RowBlock], *_: object) -> EvalResult:
        seen.update(params)
        return EvalResult(0.0, None)

    async def call(op: object, _what: str) -> object:
        return await op()  # type: ignore[operator]

    loop = SimpleNamespace(a=SimpleNamespace(run_id="r", rank=0, incarnation=1), config=WorkerConfig(),
                           data=SimpleNamespace(y_test=None), plane=SimpleNamespace(pull=pull), call=call,
                           model=SimpleNamespace(rows_needed=lambda _X: needed, evaluate=evaluate),
                           eval_point=lambda *_: None)
    step = TableStep.__new__(TableStep)
    step.t, step.dense, step.X_test = loop, [], None  # type: ignore[assignment]
    step.tables = {name: (ids.size, 1) for name, ids in needed.items()}
    await step.evaluate(10, final=True)
    assert asked == [{"mf.users": 1 << 20, "mf.items": 5}, {"mf.users": 3, "mf.items": 0}]
    for name, ids in needed.items():
        assert np.array_equal(seen[name].ids, ids) and np.array_equal(seen[name].values[:, 0], ids.astype(np.float32))


@pytest.mark.parametrize("staleness", [-1, 3])
async def test_table_pushes_say_which_version_their_gradient_was_computed_on(staleness: int) -> None:
    """--staleness-aware-lr with tables: every push says the version of the parameters it was
    computed on (those of its last pull, as the dense loop says), so the server scales its step.
    Table pushes said none: every one kept the whole rate, and the option did nothing."""
    spec = build_run_spec(LaunchOptions(model="mf:2", dataset=SMALL, workers=3, staleness=staleness, iterations=30,
                                        batch_size=32, lr=0.5, staleness_aware_lr=True))
    outcomes, run = await train_run(spec, WorkerConfig(timeout_seconds=5.0, report_seconds=0.05))
    assert all(o.completed for o in outcomes), outcomes
    c = run.counters
    assert c.pushes_applied == c.lr_scaled == 90
    assert c.lr_scale_sum < c.lr_scaled  # three ranks: some pushes missed others' updates


async def test_rows_kept_take_their_own_step_at_the_rate_the_server_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read-my-writes on cached rows with --staleness-aware-lr: rank 0, s = 4, reusing rows while
    rank 1 pushes (nothing), its pushes scaled below 1. The rows it computes on are the server's,
    to the bit (its own step on them took the whole rate)."""
    servers: list[InMemoryServer] = []
    compared: list[int] = []
    loss_and_grad = MatrixFactorization.loss_and_grad

    def checked(self: MatrixFactorization, params: dict[str, RowBlock], X: np.ndarray, y: np.ndarray) -> object:
        (run,) = servers[0].registry._runs.values()
        for name, block in params.items():
            np.testing.assert_array_equal(block.values, run.store.params[name][block.ids], err_msg=name)
        compared.append(len(compared))
        return loss_and_grad(self, params, X, y)

    monkeypatch.setattr(MatrixFactorization, "loss_and_grad", checked)
    spec = build_run_spec(LaunchOptions(model="mf:2", dataset=TINY, workers=2, staleness=4, iterations=20,
                                        batch_size=8, lr=0.5, staleness_aware_lr=True))
    async with InMemoryServer() as server:
        servers.append(server)
        run_id, outcome = await train_with_a_zero_pusher(server, spec, WorkerConfig(timeout_seconds=5.0,
                                                                                    report_seconds=0.05))
        c = server.registry.get(run_id).counters
    assert outcome.completed, outcome
    assert c.lr_scale_sum < c.lr_scaled and len(compared) == 20  # rows were reused: some factors were < 1


async def test_a_table_worker_alone_is_never_stale_whatever_its_rows_age() -> None:
    """Its own pushes are in the rows it keeps: a staleness-aware rate leaves them whole."""
    spec = build_run_spec(LaunchOptions(model="mf:2", dataset=TINY, workers=1, staleness=8, iterations=30,
                                        batch_size=8, lr=0.5, staleness_aware_lr=True))
    outcomes, run = await train_run(spec, WorkerConfig(timeout_seconds=5.0, report_seconds=0.05))
    assert all(o.completed for o in outcomes), outcomes
    c = run.counters
    assert c.pulls_served < 15 and c.lr_scaled == 30 and c.lr_scale_sum == 30.0  # (most pushes without a pull)
