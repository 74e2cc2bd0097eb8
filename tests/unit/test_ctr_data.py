"""Unit tests for CTR data (issue 16): synthetic-ctr and libsvm datasets, worker.metrics."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

from worker.datasets import DatasetError, load_dataset, parse_dataset
from worker.metrics import log_loss, roc_auc
from worker.sparse import SparseBatch

pytestmark = pytest.mark.timeout(120)

SMALL = "synthetic-ctr:samples=20000,fields=6,ids_per_field=300,seed=3"


# -- parsing ----------------------------------------------------------------------------------

def test_parse_synthetic_ctr_defaults_and_rows_alias() -> None:
    defaults = {"kind": "synthetic-ctr", "samples": 100000, "fields": 8, "ids_per_field": 1000, "zipf": 1.1,
                "factors": 4, "seed": 0, "test_fraction": 0.2}
    assert parse_dataset("synthetic-ctr") == defaults
    assert parse_dataset("synthetic-ctr:rows=500,zipf=1.5") == {**defaults, "samples": 500, "zipf": 1.5}
    assert parse_dataset("synthetic-ctr:rows=500") == parse_dataset("synthetic-ctr:samples=500")
    # a spec dict (as it travels through the server) takes the alias too
    assert load_dataset({"kind": "synthetic-ctr", "rows": 300}).y_train.shape == (240,)


@pytest.mark.parametrize(("text", "match"), [
    ("synthetic-ctr:rows=10,samples=10", "another name"),
    ("synthetic-ctr:zipf=0", "zipf must be > 0"),
    ("synthetic-ctr:zipf=-1", "zipf must be > 0"),
    ("synthetic-ctr:fields=0", "fields must be >= 1"),
    ("synthetic-ctr:ids_per_field=0", "ids_per_field must be >= 1"),
    ("synthetic-ctr:ids_per_field=4294967296", "must be < 4294967296"),
    ("synthetic-ctr:factors=0", "factors must be >= 1"),
    ("synthetic-ctr:factors=2.5", "must be int"),
    ("synthetic-ctr:features=3", "unknown option"),
    ("synthetic-ctr:test_fraction=1", "test_fraction"),
    ("synthetic-ctr:seed", "key=value"),
    ("libsvm", "needs a path"),
    ("libsvm:", "needs a path"),
    ("libsvm:/d/a.svm,seed=x", "must be int"),
])
def test_parse_ctr_rejects_bad_options(text: str, match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        parse_dataset(text)


def test_parse_libsvm_paths_and_options() -> None:
    assert parse_dataset("libsvm:/data/a.svm") == {"kind": "libsvm", "path": "/data/a.svm", "test_fraction": 0.2,
                                                   "seed": 0}
    assert parse_dataset("libsvm:/d/x,y=1.txt,seed=2,test_fraction=0.1") == {
        "kind": "libsvm", "path": "/d/x,y=1.txt", "test_fraction": 0.1, "seed": 2}


def test_forms_list_the_new_kinds() -> None:
    with pytest.raises(DatasetError) as e:
        parse_dataset("criteo")
    assert "synthetic-ctr[:samples=100000," in str(e.value) and "libsvm:PATH" in str(e.value)


# -- synthetic-ctr ----------------------------------------------------------------------------

def test_synthetic_ctr_shape_and_invariants() -> None:
    d = load_dataset(parse_dataset(SMALL))
    assert (d.task, d.n_features, d.n_outputs) == ("ctr", 6, 1)
    assert isinstance(d.X_train, SparseBatch) and isinstance(d.X_test, SparseBatch)
    assert (len(d.X_train), len(d.X_test)) == (16000, 4000) == (len(d.y_train), len(d.y_test))
    for X in (d.X_train, d.X_test):
        assert X.indptr.dtype == np.int64 and X.ids.dtype == np.uint64 and X.values.dtype == np.float32
        np.testing.assert_array_equal(np.diff(X.indptr), 6)  # one feature per field
        np.testing.assert_array_equal(X.values, 1.0)
        fields = (X.ids >> np.uint64(32)).reshape(-1, 6)
        np.testing.assert_array_equal(fields, np.broadcast_to(np.arange(6, dtype=np.uint64), fields.shape))
        assert int((X.ids & np.uint64(0xFFFFFFFF)).max()) < 300
    for y in (d.y_train, d.y_test):
        assert y.dtype == np.int64 and set(np.unique(y)) <= {0, 1}
    arrays = [d.X_train.indptr, d.X_train.ids, d.X_train.values, d.X_test.ids, d.y_train, d.y_test,
              *d.extras.values()]
    assert not any(a.flags.writeable for a in arrays)
    p = d.extras["planted_probability_test"]
    assert p.dtype == np.float64 and p.shape == (4000,) and ((p > 0) & (p < 1)).all()
    assert d.extras["planted_auc"].shape == () and d.extras["planted_logloss"].dtype == np.float64


def test_synthetic_ctr_is_deterministic_and_seeded() -> None:
    a = load_dataset(parse_dataset(SMALL))
    from worker import datasets

    datasets._load_cached.cache_clear()  # regenerate, not the memo
    b = load_dataset(parse_dataset(SMALL))
    assert a is not b
    for x, y in ((a.X_train.ids, b.X_train.ids), (a.X_test.indptr, b.X_test.indptr), (a.y_train, b.y_train),
                 (a.y_test, b.y_test), (a.extras["planted_probability_test"], b.extras["planted_probability_test"])):
        np.testing.assert_array_equal(x, y)
    c = load_dataset(parse_dataset(SMALL.replace("seed=3", "seed=4")))
    assert not np.array_equal(a.X_train.ids, c.X_train.ids)


def test_synthetic_ctr_ids_are_zipf_skewed() -> None:
    d = load_dataset(parse_dataset(SMALL))
    ids = np.concatenate([d.X_train.ids, d.X_test.ids])
    for f in range(6):
        k = (ids[(ids >> np.uint64(32)) == f] & np.uint64(0xFFFFFFFF)).astype(np.int64)
        counts = np.bincount(k, minlength=300)
        assert counts.argmax() == 0  # id 0 is the head of the law
        assert counts.max() > 50 * max(np.median(counts), 1)
    # a larger exponent concentrates the mass further
    heavy = load_dataset(parse_dataset(SMALL + ",zipf=2.0")).X_train.ids
    assert np.mean((heavy & np.uint64(0xFFFFFFFF)) == 0) > np.mean((d.X_train.ids & np.uint64(0xFFFFFFFF)) == 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_ctr_rate_and_planted_auc(seed: int) -> None:
    d = load_dataset(parse_dataset(f"synthetic-ctr:samples=50000,seed={seed}"))
    ctr = float(np.concatenate([d.y_train, d.y_test]).mean())
    assert 0.2 <= ctr <= 0.35
    p = d.extras["planted_probability_test"]
    auc = float(d.extras["planted_auc"])
    assert 0.75 <= auc <= 0.87
    assert auc == pytest.approx(roc_auc(d.y_test, p), abs=1e-12)
    assert float(d.extras["planted_logloss"]) == pytest.approx(log_loss(d.y_test, p), abs=1e-12)
    # the plant beats the constant predictor by a clear margin (it is learnable)
    assert float(d.extras["planted_logloss"]) < log_loss(d.y_test, np.full(len(p), d.y_train.mean())) - 0.05


def test_synthetic_ctr_million_examples_in_seconds() -> None:
    t = time.perf_counter()
    d = load_dataset(parse_dataset("synthetic-ctr:rows=1000000,seed=5"))
    elapsed = time.perf_counter() - t
    assert len(d.X_train) + len(d.X_test) == 1_000_000
    assert elapsed < 15.0, f"1e6 examples took {elapsed:.1f} s"


def test_dataset_sparse_batch_indexes_examples() -> None:
    d = load_dataset(parse_dataset(SMALL))
    rows = np.array([5, 0, 15999, 5], dtype=np.int64)
    sub = d.X_train[rows]
    assert len(sub) == 4 and sub.nnz == 24
    for j, i in enumerate(rows):
        a, b = d.X_train.indptr[i], d.X_train.indptr[i + 1]
        np.testing.assert_array_equal(sub.ids[sub.indptr[j]:sub.indptr[j + 1]], d.X_train.ids[a:b])
    np.testing.assert_array_equal(sub.example_of_each(), np.repeat(np.arange(4), 6))


# -- libsvm -----------------------------------------------------------------------------------

def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _examples(rng: np.random.Generator, n: int) -> tuple[list[list[tuple[int, float]]], np.ndarray]:
    rows = []
    for _ in range(n):
        idx = np.sort(rng.choice(50, size=int(rng.integers(1, 6)), replace=False))
        rows.append([(int(i), float(np.float32(rng.uniform(0.1, 2.0)))) for i in idx])
    return rows, rng.integers(0, 2, n)


@pytest.mark.parametrize("convention", ["01", "pm1"])
def test_libsvm_round_trip(tmp_path: Path, convention: str) -> None:
    rows, y = _examples(np.random.default_rng(7), 40)
    lines = ["# a comment line"]
    for feats, label in zip(rows, y, strict=True):
        lab = str(label) if convention == "01" else ("+1" if label else "-1")
        lines.append(f"{lab} qid:3 " + " ".join(f"{i}:{v!r}" for i, v in feats) + "  # trailing")
    path = _write(tmp_path / "data.svm", "\n".join(lines) + "\n")
    d = load_dataset(parse_dataset(f"libsvm:{path},test_fraction=0.25,seed=1"))
    assert (d.task, d.n_outputs, d.name) == ("ctr", 1, "libsvm:data.svm")
    assert d.n_features == 1 + max(i for feats in rows for i, _ in feats)
    assert (len(d.X_train), len(d.X_test)) == (30, 10)
    # reassemble the split: every example comes back with its ids, values and 0/1 label
    got = {}
    for X, labels in ((d.X_train, d.y_train), (d.X_test, d.y_test)):
        assert X.ids.dtype == np.uint64 and X.values.dtype == np.float32 and labels.dtype == np.int64
        assert not X.ids.flags.writeable and not labels.flags.writeable
        for j in range(len(X)):
            a, b = X.indptr[j], X.indptr[j + 1]
            got[tuple(int(i) for i in X.ids[a:b])] = ([float(v) for v in X.values[a:b]], int(labels[j]))
    want = {tuple(i for i, _ in feats): ([v for _, v in feats], int(lab)) for feats, lab in zip(rows, y, strict=True)}
    assert got == want
    # same spec, same split
    again = load_dataset(parse_dataset(f"libsvm:{path},test_fraction=0.25,seed=1"))
    assert again is d


def test_libsvm_reloads_a_rewritten_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.svm", "1 1:1\n0 2:1\n1 3:1\n0 4:1\n")
    first = load_dataset(parse_dataset(f"libsvm:{path}"))
    _write(tmp_path / "d.svm", "1 1:1\n0 2:1\n1 3:1\n0 4:1\n1 5:1\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = load_dataset(parse_dataset(f"libsvm:{path}"))
    assert len(first.y_train) + len(first.y_test) == 4 and len(second.y_train) + len(second.y_test) == 5


@pytest.mark.parametrize(("text", "match"), [
    ("1 1:0.5 3:1\nfoo 2:1\n", "line 2: label 'foo'"),
    ("1 1:0.5\n0 1:0.5 3:x\n", "line 2: '3:x' is not idx:value"),
    ("1 3:1 1:2\n", "line 1: index 1 is not above"),
    ("1 1:1\n0.5 2:1\n", "labels must be 0/1 or -1/\\+1.*0.5"),
    ("2 1:1\n0 2:1\n1 2:1\n", "labels must be 0/1 or -1/\\+1.*2"),
    ("", "no examples"),
    ("# only a comment\n", "no examples"),
    # (scikit-learn's loader reads indices as C ints: it raised OverflowError, which no caller expects)
    ("1 1:1\n0 2147483648:1\n", "index .*2147483648.* below 2\\*\\*31"),
])
def test_libsvm_bad_files(tmp_path: Path, text: str, match: str) -> None:
    path = _write(tmp_path / "bad.svm", text)
    with pytest.raises(DatasetError, match=match):
        load_dataset(parse_dataset(f"libsvm:{path}"))


def test_libsvm_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read libsvm file .*check the path"):
        load_dataset(parse_dataset(f"libsvm:{tmp_path / 'nope.svm'}"))


# -- metrics ----------------------------------------------------------------------------------

def test_roc_auc_hand_computed() -> None:
    # positives score 0.8 and 0.4, negatives 0.1, 0.4 and 0.9: of the 6 pairs, (0.8 > 0.1), (0.4 > 0.1) win,
    # (0.4 = 0.4) ties for half, (0.8 > 0.4) wins, the rest lose: (3 + 0.5) / 6
    assert roc_auc([1, 1, 0, 0, 0], [0.8, 0.4, 0.1, 0.4, 0.9]) == pytest.approx(3.5 / 6)
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert math.isnan(roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))
    assert math.isnan(roc_auc(np.zeros(4, np.int64), np.linspace(0, 1, 4)))


def test_log_loss_hand_computed() -> None:
    assert log_loss([1, 0], [0.8, 0.25]) == pytest.approx(-(math.log(0.8) + math.log(0.75)) / 2)
    assert log_loss([1, 1, 0, 0], [0.5] * 4) == pytest.approx(math.log(2))
    # clipping: a certain mistake costs -log(eps), a certain hit ~0
    assert log_loss([1, 0], [0.0, 1.0]) == pytest.approx(-math.log(1e-7))
    assert log_loss([1, 0], [1.0, 0.0]) == pytest.approx(0.0, abs=1e-6)
    assert log_loss([1], [0.0], eps=1e-3) == pytest.approx(-math.log(1e-3))


def test_metrics_reject_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        log_loss([0, 1], [0.5])
    with pytest.raises(ValueError, match="empty"):
        roc_auc([], [])
    with pytest.raises(ValueError, match="eps"):
        log_loss([1], [0.5], eps=0.0)


def test_ctr_data_is_not_exported_for_other_workers(tmp_path: Path) -> None:
    from worker.export_shard import export

    with pytest.raises(DatasetError, match="only the Python worker"):
        export({"kind": "synthetic-ctr", "samples": 100}, tmp_path)
    assert not list(tmp_path.iterdir())
