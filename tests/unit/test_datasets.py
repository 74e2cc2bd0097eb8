"""Unit tests for worker.datasets: specs, loaders, npz validation, shards and batches."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.spec import LaunchOptions, build_run_spec
from worker.datasets import DatasetError, load_dataset, parse_dataset
from worker.sampling import BatchSampler, shard_indices

pytestmark = pytest.mark.timeout(60)


# -- parse_dataset ----------------------------------------------------------------------------

def test_parse_dataset_fills_defaults() -> None:
    assert parse_dataset("digits") == {"kind": "digits"}
    assert parse_dataset("synthetic-regression") == {
        "kind": "synthetic-regression", "samples": 2000, "features": 20, "outputs": 1, "noise": 0.01,
        "seed": 0, "test_fraction": 0.2}
    assert parse_dataset("synthetic-classification:samples=500,features=8,classes=3,seed=4") == {
        "kind": "synthetic-classification", "samples": 500, "features": 8, "classes": 3, "separation": 5.0,
        "seed": 4, "test_fraction": 0.2}
    assert parse_dataset("synthetic-regression:samples=100, noise=0.5") == {
        "kind": "synthetic-regression", "samples": 100, "features": 20, "outputs": 1, "noise": 0.5,
        "seed": 0, "test_fraction": 0.2}


def test_parse_dataset_npz_paths_and_options() -> None:
    assert parse_dataset("npz:/data/a.npz") == {"kind": "npz", "path": "/data/a.npz", "test_fraction": 0.2, "seed": 0}
    assert parse_dataset("npz:/data/a.npz,test_fraction=0.3") == {
        "kind": "npz", "path": "/data/a.npz", "test_fraction": 0.3, "seed": 0}
    assert parse_dataset("npz:/d/x,y=1.npz,seed=2,test_fraction=0.1")["path"] == "/d/x,y=1.npz"
    assert parse_dataset("npz:C:/data/a.npz")["path"] == "C:/data/a.npz"


def test_canonical_spec_is_what_load_dataset_accepts() -> None:
    spec = parse_dataset("synthetic-regression:samples=50,features=3")
    partial = {"kind": "synthetic-regression", "samples": 50, "features": 3}
    assert load_dataset(spec) is load_dataset(partial)  # same canonical key -> memoised object


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("mnist", "unknown dataset 'mnist'"),
        ("", "unknown dataset"),
        ("digits:samples=3", r"unknown option\(s\) \['samples'\] for dataset 'digits'; allowed: none"),
        ("synthetic-regression:classes=3", r"unknown option\(s\) \['classes'\].*allowed: samples"),
        ("synthetic-regression:samples", "use key=value"),
        ("synthetic-regression:samples=lots", "option 'samples' must be int"),
        ("synthetic-regression:samples=1.5", "option 'samples' must be int"),
        ("synthetic-regression:samples=1", "samples must be >= 2"),
        ("synthetic-regression:noise=-1", "noise must be >= 0"),
        ("synthetic-regression:noise=nan", "option 'noise' must be float"),
        ("synthetic-regression:seed=1,seed=2", "given twice"),
        ("synthetic-regression:", "empty option list"),
        ("synthetic-classification:classes=1", "classes must be >= 2"),
        ("synthetic-classification:test_fraction=1.0", r"test_fraction must be in \(0, 1\)"),
        ("npz:", "needs a path"),
        ("npz:,seed=1", "needs a path"),
    ],
)
def test_parse_dataset_errors_say_what_to_fix(text: str, match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        parse_dataset(text)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"kind": "digits", "extra": 1}, "unknown option"),
        ({"samples": 3}, "with a 'kind'"),
        ({"kind": "synthetic-regression", "samples": "100"}, "must be int"),
        ({"kind": "synthetic-regression", "samples": True}, "must be int"),
        ({"kind": "npz"}, "needs a 'path'"),
        # (a run's data_spec_json is whatever its creator wrote: a TypeError here killed the worker, untold)
        ({"kind": ["digits"]}, "unknown dataset kind"),
    ],
)
def test_load_dataset_validates_specs(spec: dict[str, Any], match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        load_dataset(spec)


# -- built-in datasets ------------------------------------------------------------------------

def _assert_frozen_shapes(ds: Any, n_features: int) -> None:
    for X in (ds.X_train, ds.X_test):
        assert X.dtype == np.float32 and X.ndim == 2 and X.shape[1] == n_features and X.flags.c_contiguous
        assert not X.flags.writeable
    for y in (ds.y_train, ds.y_test):
        assert y.dtype == (np.int64 if ds.task == "classification" else np.float32)
        assert not y.flags.writeable
    assert len(ds.X_train) == len(ds.y_train) and len(ds.X_test) == len(ds.y_test)
    assert ds.n_features == n_features


def test_digits_shapes_split_and_train_standardisation() -> None:
    from sklearn.datasets import load_digits

    from worker.datasets import _digits_raw

    ds = load_dataset(parse_dataset("digits"))
    assert (ds.name, ds.task, ds.n_outputs) == ("digits", "classification", 10)
    _assert_frozen_shapes(ds, 64)
    assert ds.X_train.shape == (1438, 64) and ds.X_test.shape == (359, 64)
    # Read without importing scikit-learn (slow), the data are exactly scikit-learn's.
    X, y = load_digits(return_X_y=True)
    X_raw, y_raw = _digits_raw()
    np.testing.assert_array_equal(X_raw, X)
    np.testing.assert_array_equal(y_raw, y)
    # The split is stratified (round(20%) of each class in test) and covers every row once.
    counts = np.bincount(y, minlength=10)
    np.testing.assert_array_equal(np.bincount(ds.y_test, minlength=10), np.round(counts * 0.2).astype(int))
    np.testing.assert_array_equal(np.sort(np.concatenate([ds.y_train, ds.y_test])), np.sort(y))
    X_tr = ds.X_train
    np.testing.assert_allclose(ds.X_train.mean(0), 0, atol=1e-5)
    constant = X_tr.std(0) == 0
    assert constant.any()  # digits has always-blank pixels: those stay finite (std 0 -> 1)
    np.testing.assert_allclose(ds.X_train.std(0)[~constant], 1, rtol=1e-4)
    assert np.isfinite(ds.X_test).all()
    assert abs(float(ds.X_test.mean())) > 1e-4  # test data was NOT standardised with its own stats
    assert set(np.unique(ds.y_train)) == set(range(10))


def test_synthetic_regression_follows_its_generator() -> None:
    ds = load_dataset(parse_dataset("synthetic-regression:seed=3"))
    assert (ds.task, ds.n_outputs) == ("regression", 1)
    _assert_frozen_shapes(ds, 20)
    assert ds.X_train.shape == (1600, 20) and ds.y_train.shape == (1600,) and ds.X_test.shape == (400, 20)
    W, b = ds.extras["true_weight"], ds.extras["true_bias"]
    assert W.shape == (20, 1) and b.shape == (1,)
    residual = ds.y_train - (ds.X_train @ W[:, 0] + b[0])
    assert residual.std() == pytest.approx(0.01, rel=0.1)
    with pytest.raises(TypeError):
        ds.extras["true_weight"] = W  # type: ignore[index]
    multi = load_dataset(parse_dataset("synthetic-regression:samples=100,features=4,outputs=3,noise=0"))
    assert multi.y_train.shape == (80, 3) and multi.n_outputs == 3
    np.testing.assert_allclose(
        multi.y_test, multi.X_test @ multi.extras["true_weight"] + multi.extras["true_bias"], atol=1e-5)
    assert not np.array_equal(load_dataset(parse_dataset("synthetic-regression:seed=4")).extras["true_weight"], W)


def test_synthetic_classification_is_fast_balanced_and_deterministic() -> None:
    start = time.perf_counter()
    ds = load_dataset(parse_dataset("synthetic-classification:seed=11"))
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"10000x784 took {elapsed:.2f}s"
    assert (ds.task, ds.n_outputs) == ("classification", 10)
    _assert_frozen_shapes(ds, 784)
    assert ds.X_train.shape == (8000, 784) and ds.X_test.shape == (2000, 784)
    counts = np.bincount(np.concatenate([ds.y_train, ds.y_test]), minlength=10)
    assert counts.min() == counts.max() == 1000
    small = "synthetic-classification:samples=103,features=5,classes=4,seed=1"
    a = load_dataset(parse_dataset(small))
    b = load_dataset({"kind": "synthetic-classification", "samples": 103, "features": 5, "classes": 4, "seed": 1})
    assert a is b
    counts = np.bincount(np.concatenate([a.y_train, a.y_test]))
    assert counts.max() - counts.min() <= 1


# -- npz --------------------------------------------------------------------------------------

def test_npz_single_array_layout_is_split_and_typed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 3))
    y = rng.integers(0, 4, 50)
    path = tmp_path / "cls.npz"
    np.savez(path, X=X, y=y)
    ds = load_dataset(parse_dataset(f"npz:{path},test_fraction=0.3"))
    assert (ds.task, ds.n_outputs, ds.name) == ("classification", int(y.max()) + 1, "npz:cls.npz")
    _assert_frozen_shapes(ds, 3)
    assert len(ds.X_train) == 35 and len(ds.X_test) == 15
    rows = {tuple(r) for r in np.concatenate([ds.X_train, ds.X_test])}
    assert rows == {tuple(r) for r in X.astype(np.float32)}


def test_npz_presplit_layout_regression(tmp_path: Path) -> None:
    path = tmp_path / "reg.npz"
    X_train, X_test = np.ones((6, 2), np.float32), np.zeros((3, 2), np.float32)
    np.savez(path, X_train=X_train, y_train=np.arange(12.0).reshape(6, 2), X_test=X_test, y_test=np.zeros((3, 2)))
    ds = load_dataset({"kind": "npz", "path": str(path)})
    assert (ds.task, ds.n_outputs) == ("regression", 2)
    _assert_frozen_shapes(ds, 2)
    np.testing.assert_array_equal(ds.X_train, X_train)
    np.testing.assert_array_equal(ds.y_train, np.arange(12.0).reshape(6, 2))


def test_npz_is_reloaded_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, X=np.zeros((10, 2)), y=np.zeros(10))
    first = load_dataset({"kind": "npz", "path": str(path)})
    assert load_dataset({"kind": "npz", "path": str(path)}) is first
    np.savez(path, X=np.zeros((20, 2)), y=np.zeros(20))
    os.utime(path, ns=(1, 1))
    assert len(load_dataset({"kind": "npz", "path": str(path)}).X_train) == 16


def _write(tmp_path: Path, **arrays: Any) -> str:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"X": np.zeros((4, 2))}, r"has keys \['X'\]; it needs either X, y or X_train"),
        ({"X_train": np.zeros((4, 2)), "y_train": np.zeros(4)}, r"has keys \['X_train', 'y_train'\]"),
        ({"X": np.zeros(4), "y": np.zeros(4)}, "X must be 2-D"),
        ({"X": np.zeros((4, 2)), "y": np.zeros(3)}, "X has 4 rows but y has shape"),
        ({"X": np.full((4, 2), np.nan), "y": np.zeros(4)}, "X contains NaN or Inf"),
        ({"X": np.zeros((4, 2)), "y": np.array([0.0, np.inf, 0.0, 0.0])}, "y contains NaN or Inf"),
        # finite in float64, Inf once cast to the float32 a worker trains in
        ({"X": np.array([[1e300, 0.0]] * 4), "y": np.zeros(4)}, "X has values beyond float32's range"),
        ({"X": np.zeros((4, 2)), "y": np.array([0.0, -1e39, 0.0, 0.0])}, "y has values beyond float32's range"),
        ({"X": np.zeros((4, 2)), "y": np.array([0, -1, 1, 0])}, "labels must be >= 0"),
        ({"X": np.zeros((4, 2)), "y": np.array([0, 10**12, 1, 0])}, "at most 65536 classes; found label 1000000000000"),
        ({"X": np.zeros((4, 2)), "y": np.array(["a", "b", "c", "d"])}, "must be numeric"),
        # (the file's shape, not the train split's: it said (3, 3) of a y of 4 rows)
        ({"X": np.zeros((4, 2)), "y": np.zeros((4, 3), np.int64)}, r"integer labels must be 1-D, got y shape \(4, 3\)$"),
        ({"X_train": np.zeros((4, 2)), "y_train": np.zeros(4, np.int64), "X_test": np.zeros((2, 2)),
          "y_test": np.zeros((2, 1), np.int64)}, r"integer labels must be 1-D, got y_test shape \(2, 1\)$"),
        ({"X": np.array([[object()]] * 4), "y": np.zeros(4)}, "no object arrays"),
        ({"X_train": np.zeros((4, 2)), "y_train": np.zeros(4), "X_test": np.zeros((2, 3)), "y_test": np.zeros(2)},
         "X_test has 3 features"),
        # (taken as regression: integer train labels became float targets, and psctl launch then said
        # softmax does not suit a regression dataset)
        ({"X_train": np.zeros((4, 2)), "y_train": np.array([0, 1, 2, 1]), "X_test": np.zeros((2, 2)),
          "y_test": np.array([0.0, 2.0])}, "y_train is int64 but y_test float64"),
    ],
)
def test_npz_bad_contents(tmp_path: Path, arrays: dict[str, Any], match: str) -> None:
    path = _write(tmp_path, **arrays)
    with pytest.raises(DatasetError, match=match) as info:
        load_dataset({"kind": "npz", "path": path})
    assert path in str(info.value)


def test_npz_class_labels_saved_as_floats_are_said_to_be_the_trouble_at_launch(tmp_path: Path) -> None:
    """A classification model on an npz whose y holds class labels as floats (as pandas gives them):
    psctl launch said to use linear, not that the labels are read as regression targets."""
    path = _write(tmp_path, X=np.zeros((10, 2)), y=np.array([0.0, 1.0] * 5))
    with pytest.raises(ValueError) as info:
        build_run_spec(LaunchOptions(model="softmax", dataset=f"npz:{path}", workers=2, iterations=5))
    assert str(info.value) == (f"model 'softmax' does a classification task but dataset 'npz:{path}' is regression "
                               "(its y is float: regression targets): use linear, or save the class labels as "
                               "integers (y.astype(np.int64))")
    (tmp_path / "ints").mkdir()
    labels = _write(tmp_path / "ints", X=np.zeros((10, 2)), y=np.array([0, 1] * 5))  # integers: no word of floats
    with pytest.raises(ValueError, match=r"is classification: use softmax or mlp:\.\.\.$"):
        build_run_spec(LaunchOptions(model="linear", dataset=f"npz:{labels}", workers=2, iterations=5))


def test_npz_missing_or_not_a_zip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = str(tmp_path / "nope.npz")
    with pytest.raises(DatasetError, match="No such file") as info:
        load_dataset(parse_dataset(f"npz:{missing}"))
    assert str(info.value) == (f"cannot read npz file {missing!r}: No such file or directory; check the path: every "
                               "worker reads the file itself, at this path on its own machine")
    # a relative path: where it led (a worker of a standing cluster has another working directory
    # than the psctl that read the file: it said "check the path" of a file that was there)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as info:
        load_dataset(parse_dataset("libsvm:data/x.svm"))
    assert str(info.value).startswith(f"cannot read libsvm file 'data/x.svm' (here {str(tmp_path / 'data/x.svm')!r}): "
                                      "No such file or directory; check the path"), info.value
    junk = tmp_path / "junk.npz"
    junk.write_text("not a zip")
    with pytest.raises(DatasetError, match=r"is not an \.npz \(zip\) archive"):
        load_dataset({"kind": "npz", "path": str(junk)})
    npy = tmp_path / "arr.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(DatasetError, match="not an .npz"):
        load_dataset({"kind": "npz", "path": str(npy)})
    # one it cannot open is not said to be no zip, to write again with numpy.savez
    folder = tmp_path / "data.npz"
    folder.mkdir()
    with pytest.raises(DatasetError) as info:
        load_dataset({"kind": "npz", "path": str(folder)})
    assert str(info.value) == (f"cannot read npz file {str(folder)!r}: Is a directory; check the path and its "
                               "permissions"), info.value
    unreadable = _write(tmp_path, X=np.zeros((4, 2)), y=np.zeros(4))
    real_open = open

    def refused(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == unreadable:
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr("builtins.open", refused)
        with pytest.raises(DatasetError, match=r"cannot read npz file .*: Permission denied; check the path and its"):
            load_dataset({"kind": "npz", "path": unreadable})


def test_npz_split_too_small(tmp_path: Path) -> None:
    path = _write(tmp_path, X=np.zeros((2, 2)), y=np.zeros(2))
    with pytest.raises(DatasetError) as info:
        load_dataset({"kind": "npz", "path": path, "test_fraction": 0.1})
    # (the file named, as every other error about a file's contents: it did not say which)
    assert str(info.value) == f"{path!r}: test_fraction=0.1 leaves no train or no test rows out of 2; change it"
    svm = tmp_path / "two.svm"
    svm.write_text("1 1:1\n0 2:1\n")
    with pytest.raises(DatasetError) as info:
        load_dataset({"kind": "libsvm", "path": str(svm)})
    assert str(info.value) == f"{str(svm)!r}: test_fraction=0.2 leaves no train or no test rows out of 2; change it"


# -- shards and batches ------------------------------------------------------------------------

@given(n=st.integers(0, 500), world=st.integers(1, 16), seed=st.integers(0, 2**32))
def test_shards_are_disjoint_covering_balanced_and_deterministic(n: int, world: int, seed: int) -> None:
    shards = [shard_indices(n, r, world, seed) for r in range(world)]
    everything = np.concatenate(shards)
    assert len(everything) == n
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))  # disjoint + covering
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    for r, s in enumerate(shards):
        assert s.dtype == np.int64 and np.all(np.diff(s) > 0)
        np.testing.assert_array_equal(s, shard_indices(n, r, world, seed))


def test_shard_indices_follow_the_rule_and_validate() -> None:
    perm = np.random.default_rng(5).permutation(10)
    np.testing.assert_array_equal(shard_indices(10, 1, 3, 5), np.sort(perm[1::3]))
    for n, rank, world in ((10, 3, 3), (10, -1, 3), (10, 0, 0), (-1, 0, 1)):
        with pytest.raises(DatasetError, match="0 <= rank < world"):
            shard_indices(n, rank, world, 0)


def test_batch_sampler_covers_each_epoch_exactly_once() -> None:
    sampler = BatchSampler(n_examples=23, batch_size=5, seed=7, rank=2)
    assert sampler.batches_per_epoch == 5
    for epoch in range(3):
        batches = [sampler.batch(epoch * 5 + i) for i in range(5)]
        assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
        np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(23))
        np.testing.assert_array_equal(
            np.concatenate(batches), np.random.default_rng([7, 2, epoch]).permutation(23))
    assert not np.array_equal(sampler.batch(0), sampler.batch(5))  # epochs reshuffle


def test_batch_sampler_is_a_pure_function_of_seed_rank_clock() -> None:
    a = BatchSampler(100, 8, seed=1, rank=0)
    b = BatchSampler(100, 8, seed=1, rank=0)
    clocks = [0, 40, 3, 13, 12, 99, 0, 26, 25]  # random access, crossing epochs both ways
    for c in clocks:
        np.testing.assert_array_equal(a.batch(c), b.batch(c))
    sequential = [BatchSampler(100, 8, seed=1, rank=0).batch(c) for c in clocks]
    for c, want in zip(clocks, sequential, strict=True):
        np.testing.assert_array_equal(a.batch(c), want)
    assert not np.array_equal(BatchSampler(100, 8, 1, 1).batch(0), a.batch(0))  # rank matters
    assert not np.array_equal(BatchSampler(100, 8, 2, 0).batch(0), a.batch(0))  # seed matters
    with pytest.raises(ValueError):
        a.batch(0)[0] = 5  # read-only view of the cached permutation


def test_batch_sampler_edge_cases() -> None:
    big = BatchSampler(10, 64, seed=0, rank=0)
    assert big.batches_per_epoch == 1 and big.batch_size == 10
    np.testing.assert_array_equal(np.sort(big.batch(3)), np.arange(10))
    exact = BatchSampler(12, 4, seed=0, rank=0)
    assert exact.batches_per_epoch == 3 and [len(exact.batch(c)) for c in range(3)] == [4, 4, 4]
    with pytest.raises(DatasetError, match="clock must be >= 0"):
        exact.batch(-1)
    with pytest.raises(DatasetError, match="shard empty"):
        BatchSampler(0, 4, seed=0, rank=0)
    with pytest.raises(DatasetError, match="batch_size >= 1"):
        BatchSampler(10, 0, seed=0, rank=0)
