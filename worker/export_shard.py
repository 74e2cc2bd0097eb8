"""Export a dataset's train/test split for workers written in other languages (worker/node).

``python -m worker.export_shard --data-spec '{"kind": "digits"}' --out DATA_DIR`` (or
``--dataset digits``, the psctl form) loads the dataset exactly as the Python worker does
(:func:`worker.datasets.load_dataset`) and writes it to ``DATA_DIR/<key>/``::

    manifest.json   {"format": "paramserver-dataset/1", "key", "spec", "spec_json", "aliases",
                     "name", "task", "n_features", "n_outputs", "n_train", "n_test", "files"}
    X_train.npy     float32 (n_train, n_features), C order, little-endian (numpy.save, .npy 1.0)
    y_train.npy     int64 (n_train,) class labels, or float32 (n_train,) / (n_train, k) targets
    X_test.npy      float32 (n_test, n_features)
    y_test.npy      like y_train

``key`` is the first 16 hex digits of the SHA-256 of ``spec_json``, the canonical spec text
``json.dumps(spec, sort_keys=True)`` with every default filled in -- exactly the
``RunSpec.data_spec_json`` that psctl writes -- so a worker finds a run's data at
``DATA_DIR/sha256(data_spec_json)[:16]``. When the spec given here is not canonical (defaults left
out), its own key is added to ``aliases`` and a symlink ``DATA_DIR/<alias> -> <key>`` is made;
workers also fall back to comparing the run's parsed spec with each manifest's ``spec`` and
``aliases`` specs.

The export is the *whole* split, not one rank's shard: a worker derives its shard itself with the
rule of :func:`worker.sampling.shard_indices` (``default_rng(seed).permutation(n)[rank::world]``,
sorted), which worker/node reproduces bit for bit, so one export serves every world size and seed.
The files are rewritten atomically (a temporary directory renamed into place).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import DatasetError, _canonical, load_dataset, parse_dataset

__all__ = ["FORMAT", "data_key", "export", "main"]

FORMAT = "paramserver-dataset/1"


def data_key(spec_json: str) -> str:
    """The directory name of a data spec: sha256 of its JSON text, 16 hex digits."""
    return hashlib.sha256(spec_json.encode("utf-8")).hexdigest()[:16]


def export(spec: Mapping[str, Any], out: str | os.PathLike[str]) -> Path:
    """Write the dataset of ``spec`` under ``out``; returns the dataset's directory."""
    canon = _canonical(spec)
    spec_json = json.dumps(canon, sort_keys=True)
    key = data_key(spec_json)
    given_json = json.dumps(dict(spec), sort_keys=True)
    aliases: list[dict[str, Any]] = [] if given_json == spec_json else [{"key": data_key(given_json), "spec": dict(spec)}]
    data = load_dataset(canon)
    if data.task == "ctr":
        raise DatasetError(f"{canon['kind']} is sparse CTR data, for models with tables, which only the Python "
                           "worker trains: there is nothing to export for other workers")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    target = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the export is meant to be shared
        arrays = {"X_train": data.X_train, "y_train": data.y_train, "X_test": data.X_test, "y_test": data.y_test}
        files = {}
        for name, arr in arrays.items():
            dtype = "<i8" if arr.dtype.kind in "iu" else "<f4"
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr, dtype=dtype))
            files[name] = f"{name}.npy"
        manifest = {
            "format": FORMAT,
            "key": key,
            "spec": canon,
            "spec_json": spec_json,
            "aliases": aliases,
            "name": data.name,
            "task": data.task,
            "n_features": data.n_features,
            "n_outputs": data.n_outputs,
            "n_train": int(len(data.X_train)),
            "n_test": int(len(data.X_test)),
            "files": files,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for alias in aliases:
        link = root / str(alias["key"])
        if link.is_symlink() or link.exists():
            if link.is_symlink() or link.is_file():
                link.unlink()
            else:
                shutil.rmtree(link)
        link.symlink_to(key, target_is_directory=True)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.export_shard",
        description="Export a dataset's train/test split (.npy + manifest.json) for non-Python workers. "
        "The directory is DATA_DIR/<sha256(canonical data_spec_json)[:16]>.",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-spec", help="the run's data_spec_json, e.g. '{\"kind\": \"digits\"}'")
    src.add_argument("--dataset", help="the psctl form, e.g. 'digits' or 'synthetic-classification:samples=500'")
    parser.add_argument("--out", required=True, help="data directory the worker is given with --data-dir")
    args = parser.parse_args(argv)
    try:
        if args.data_spec is not None:
            spec = json.loads(args.data_spec)
            if not isinstance(spec, dict):
                raise DatasetError(f"--data-spec must be a JSON object, got {args.data_spec!r}")
        else:
            spec = parse_dataset(args.dataset)
        path = export(spec, args.out)
    except (DatasetError, json.JSONDecodeError, OSError) as exc:
        print(f"export_shard: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
