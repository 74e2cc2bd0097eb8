'use strict';
/**
 * Datasets, shards and mini-batches, as worker/datasets.py defines them.
 *
 * Data: the Node worker does not generate or download datasets. `python -m worker.export_shard`
 * writes a run's train/test split to DATA_DIR/<key>/ (manifest.json + X_train.npy, y_train.npy,
 * X_test.npy, y_test.npy) where key = sha256(data_spec_json)[:16] of the canonical spec text
 * psctl puts in RunSpec.data_spec_json. `loadDataset(dataDir, dataSpecJson)` looks there first,
 * then scans DATA_DIR/*\/manifest.json for a manifest whose spec (or an alias) equals the parsed
 * spec. Nothing found is a DatasetError: fatal for the run (the worker leaves with FAILED).
 *
 * Shards: `shardIndices(n, rank, world, seed)` = sorted(default_rng(seed).permutation(n)[rank::world]),
 * bit-identical to the Python worker's (see rng.js). Batches: `BatchSampler.batch(clock)` uses
 * default_rng([seed, rank, epoch]).permutation(n) cut into consecutive batches: also identical.
 */

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');

const { readNpy } = require('./npy');
const { permutation } = require('./rng');

const FORMAT = 'paramserver-dataset/1';

class DatasetError extends Error {}

function dataKey(specJson) {
  return crypto.createHash('sha256').update(specJson, 'utf8').digest('hex').slice(0, 16);
}

function deepEqual(a, b) {
  if (a === b) return true;
  if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const ka = Object.keys(a);
  const kb = Object.keys(b);
  if (ka.length !== kb.length) return false;
  return ka.every((k) => Object.prototype.hasOwnProperty.call(b, k) && deepEqual(a[k], b[k]));
}

function readManifest(dir) {
  try {
    return JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8'));
  } catch {
    return null;
  }
}

function manifestMatches(manifest, spec) {
  if (!manifest || manifest.format !== FORMAT) return false;
  if (deepEqual(manifest.spec, spec)) return true;
  return (manifest.aliases || []).some((a) => deepEqual(a.spec, spec));
}

function exportHint(specJson, dataDir) {
  const quoted = `'${specJson.replace(/'/g, "'\\''")}'`;
  return `export it with: python -m worker.export_shard --data-spec ${quoted} --out ${dataDir}`;
}

/** The directory holding the export of `dataSpecJson` under `dataDir`, or throw DatasetError. */
function findDatasetDir(dataDir, dataSpecJson) {
  let spec;
  try {
    spec = JSON.parse(dataSpecJson || '{}');
  } catch (e) {
    throw new DatasetError(`the run's data spec is not JSON (${e.message}): ${JSON.stringify(dataSpecJson)}`);
  }
  if (typeof spec !== 'object' || spec === null || Array.isArray(spec) || !spec.kind) {
    throw new DatasetError(`the run's data spec must be a JSON object with a "kind", got ${dataSpecJson}`);
  }
  const direct = path.join(dataDir, dataKey(dataSpecJson));
  if (manifestMatches(readManifest(direct), spec)) return direct;
  let entries = [];
  try {
    entries = fs.readdirSync(dataDir, { withFileTypes: true });
  } catch (e) {
    throw new DatasetError(`data directory ${dataDir} is not readable (${e.code || e.message}); ${exportHint(dataSpecJson, dataDir)}`);
  }
  for (const ent of entries) {
    if (ent.name.startsWith('.')) continue;
    const dir = path.join(dataDir, ent.name);
    if (manifestMatches(readManifest(dir), spec)) return dir;
  }
  throw new DatasetError(`no exported data for data spec ${dataSpecJson} in ${dataDir}; ${exportHint(dataSpecJson, dataDir)}`);
}

const cache = new Map();

/**
 * Load the exported split: {name, task, nFeatures, nOutputs, nTrain, nTest, XTrain, yTrain, XTest,
 * yTest, dir}. X are Float32Array (row-major), y are Int32Array labels (classification) or
 * Float32Array targets (n or n*k). Memoised per directory and manifest mtime.
 */
function loadDataset(dataDir, dataSpecJson) {
  const dir = findDatasetDir(dataDir, dataSpecJson);
  const stamp = fs.statSync(path.join(dir, 'manifest.json')).mtimeMs;
  const memo = cache.get(dir);
  if (memo && memo.stamp === stamp) return memo.data;
  const m = readManifest(dir);
  const load = (name) => readNpy(path.join(dir, (m.files && m.files[name]) || `${name}.npy`));
  const X_train = load('X_train');
  const y_train = load('y_train');
  const X_test = load('X_test');
  const y_test = load('y_test');
  for (const [n, X, y] of [['train', X_train, y_train], ['test', X_test, y_test]]) {
    if (X.shape.length !== 2 || X.shape[1] !== m.n_features) {
      throw new DatasetError(`${dir}: X_${n} has shape (${X.shape}), expected (rows, ${m.n_features})`);
    }
    if (y.shape[0] !== X.shape[0]) throw new DatasetError(`${dir}: y_${n} has ${y.shape[0]} rows, X_${n} ${X.shape[0]}`);
  }
  const toX = (a) => (a.data instanceof Float32Array ? a.data : Float32Array.from(a.data));
  const classification = m.task === 'classification';
  const toY = (a) => {
    if (classification) {
      const out = Int32Array.from(a.data);
      for (let i = 0; i < out.length; i++) {
        if (out[i] < 0 || out[i] >= m.n_outputs || out[i] !== a.data[i]) {
          throw new DatasetError(`${dir}: label ${a.data[i]} outside [0, ${m.n_outputs})`);
        }
      }
      return out;
    }
    return a.data instanceof Float32Array ? a.data : Float32Array.from(a.data);
  };
  const data = {
    dir,
    name: m.name,
    task: m.task,
    nFeatures: m.n_features,
    nOutputs: m.n_outputs,
    nTrain: X_train.shape[0],
    nTest: X_test.shape[0],
    XTrain: toX(X_train),
    yTrain: toY(y_train),
    XTest: toX(X_test),
    yTest: toY(y_test),
  };
  cache.set(dir, { stamp, data });
  return data;
}

/** Sorted indices of range(n) owned by `rank` of `world`: default_rng(seed).permutation(n)[rank::world]. */
function shardIndices(n, rank, world, seed) {
  if (n < 0 || world < 1 || rank < 0 || rank >= world || seed < 0) {
    throw new DatasetError(`need n >= 0, world >= 1, 0 <= rank < world, seed >= 0; got n=${n}, rank=${rank}, world=${world}, seed=${seed}`);
  }
  const perm = permutation(seed, n);
  const out = [];
  for (let i = rank; i < n; i += world) out.push(perm[i]);
  return Int32Array.from(out).sort();
}

/** Deterministic mini-batches over a shard: a pure function of (seed, rank, clock). */
class BatchSampler {
  constructor(nExamples, batchSize, seed, rank) {
    if (nExamples < 1 || batchSize < 1 || seed < 0 || rank < 0) {
      throw new DatasetError(`BatchSampler needs n_examples >= 1, batch_size >= 1, seed >= 0, rank >= 0; got ${nExamples}, ${batchSize}, ${seed}, ${rank} (is this worker's shard empty?)`);
    }
    this.nExamples = nExamples;
    this.batchSize = Math.min(batchSize, nExamples);
    this.seed = seed;
    this.rank = rank;
    this.epoch = -1;
    this.perm = null;
  }

  get batchesPerEpoch() {
    return Math.ceil(this.nExamples / this.batchSize);
  }

  /** Indices into the shard used by iteration `clock`. */
  batch(clock) {
    const epoch = Math.floor(clock / this.batchesPerEpoch);
    const i = clock % this.batchesPerEpoch;
    if (epoch !== this.epoch) {
      this.perm = permutation([this.seed, this.rank, epoch], this.nExamples);
      this.epoch = epoch;
    }
    return this.perm.subarray(i * this.batchSize, Math.min((i + 1) * this.batchSize, this.nExamples));
  }
}

module.exports = { DatasetError, dataKey, findDatasetDir, loadDataset, shardIndices, BatchSampler, FORMAT };
