"""The Node worker's building blocks agree with the Python worker's, computed side by side.

worker/node reproduces numpy's ``default_rng(...).permutation`` (PCG64 + SeedSequence) to derive
the same shards (``worker.sampling.shard_indices``) and batches (``BatchSampler``), reads the
exported split (``worker.export_shard``) and computes the loss and gradients of
``worker.models``. Each test runs a small Node program and compares with numpy.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from worker.datasets import load_dataset, parse_dataset
from worker.export_shard import data_key
from worker.models import build_model
from worker.sampling import BatchSampler, shard_indices

from .conftest import NODE_DIR, ROOT

pytestmark = pytest.mark.timeout(60)


def node(program: str, payload: object) -> object:
    """Run ``program`` (which reads JSON from stdin into ``input`` and prints JSON) in worker/node."""
    script = ("const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));\n"
              f"const src = (m) => require({json.dumps(str(NODE_DIR / 'src'))} + '/' + m);\n{program}")
    done = subprocess.run(["node", "-e", script], input=json.dumps(payload), capture_output=True, text=True,
                          timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_shards_and_batches_equal_numpys(node_ready: None) -> None:
    cases = [(n, r, w, seed) for n, w, seed in [(1437, 4, 0), (1437, 3, 5), (10, 16, 2**33 + 1), (1, 1, 0)]
             for r in range(w)]
    got = node("""
const { shardIndices, BatchSampler } = src('data.js');
const out = input.map(([n, r, w, seed]) => {
  const shard = Array.from(shardIndices(n, r, w, seed));
  const s = shard.length ? new BatchSampler(shard.length, 32, seed, r) : null;
  return [shard, s ? [0, 1, s.batchesPerEpoch, 3 * s.batchesPerEpoch + 1].map((c) => Array.from(s.batch(c))) : []];
});
console.log(JSON.stringify(out));""", cases)
    for (n, r, w, seed), (shard, batches) in zip(cases, got, strict=True):  # type: ignore[arg-type]
        want = shard_indices(n, r, w, seed)
        assert shard == want.tolist(), (n, r, w, seed)
        if len(want):
            s = BatchSampler(len(want), 32, seed, r)
            assert batches == [s.batch(c).tolist() for c in (0, 1, s.batches_per_epoch, 3 * s.batches_per_epoch + 1)]


def test_node_reads_the_exported_split(node_ready: None, exported_data: object) -> None:
    spec = parse_dataset("digits")
    spec_json = json.dumps(spec, sort_keys=True)
    got = node("""
const { loadDataset } = src('data.js');
const d = loadDataset(input.dir, input.spec_json);
const sum = (a) => a.reduce((s, v) => s + v, 0);
console.log(JSON.stringify({ key: require('path').basename(d.dir), n: [d.nTrain, d.nTest, d.nFeatures, d.nOutputs],
  head: Array.from(d.XTrain.subarray(0, 70)), sx: sum(d.XTest), y: Array.from(d.yTrain.subarray(0, 50)), sy: sum(d.yTest) }));
""", {"dir": str(exported_data), "spec_json": spec_json})
    data = load_dataset(spec)
    assert got["key"] == data_key(spec_json)  # type: ignore[index]
    assert got["n"] == [len(data.X_train), len(data.X_test), data.n_features, data.n_outputs]  # type: ignore[index]
    assert got["head"] == data.X_train.reshape(-1)[:70].tolist()  # type: ignore[index]  # float32 values, bit for bit
    assert got["sx"] == pytest.approx(float(data.X_test.astype(np.float64).sum()), abs=1e-6)  # type: ignore[index]
    assert got["y"] == data.y_train[:50].tolist()  # type: ignore[index]
    assert got["sy"] == int(data.y_test.sum())  # type: ignore[index]


@pytest.mark.parametrize("model_spec", [{"kind": "softmax"}, {"kind": "mlp", "hidden": [16, 8], "activation": "relu"},
                                        {"kind": "mlp", "hidden": [12], "activation": "tanh"},
                                        {"kind": "mlp", "hidden": [12], "activation": "sigmoid"},
                                        {"kind": "linear"}])
def test_loss_and_gradients_equal_worker_models(node_ready: None, model_spec: dict[str, object]) -> None:
    rng = np.random.default_rng(7)
    B, d, k = 9, 6, 4
    X = rng.standard_normal((B, d)).astype(np.float32)
    regression = model_spec["kind"] == "linear"
    y = rng.standard_normal((B, 2)).astype(np.float32) if regression else rng.integers(0, k, B)
    model = build_model(model_spec, d, 2 if regression else k)
    params = {p.name: (rng.standard_normal(p.shape) * 0.5).astype(np.float32) for p in model.param_specs()}
    loss, grads = model.loss_and_grad(params, X, y)
    got = node("""
const { buildModel } = src('models.js');
const m = buildModel(input.spec, input.d, input.k);
const params = Object.fromEntries(Object.entries(input.params).map(([n, v]) => [n, Float32Array.from(v)]));
const y = input.regression ? Float32Array.from(input.y) : Int32Array.from(input.y);
const r = m.lossAndGrad(params, Float32Array.from(input.X), y, input.B);
console.log(JSON.stringify({ loss: r.loss, names: m.paramSpecs().map((s) => [s.name, s.shape]),
  grads: Object.fromEntries(Object.entries(r.grads).map(([n, g]) => [n, Array.from(g)])) }));
""", {"spec": model_spec, "d": d, "k": 2 if regression else k, "B": B, "regression": regression,
      "X": X.reshape(-1).tolist(), "y": y.reshape(-1).tolist(),
      "params": {n: v.reshape(-1).tolist() for n, v in params.items()}})
    assert got["names"] == [[p.name, list(p.shape)] for p in model.param_specs()]  # type: ignore[index]
    assert got["loss"] == pytest.approx(loss, rel=1e-5)  # type: ignore[index]
    for name, g in grads.items():
        np.testing.assert_allclose(np.array(got["grads"][name]), g.reshape(-1), rtol=1e-4, atol=1e-6, err_msg=name)  # type: ignore[index]
