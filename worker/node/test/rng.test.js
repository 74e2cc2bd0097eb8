'use strict';
// Golden vectors from numpy 2.x: np.random.default_rng(...).permutation(n) and worker.datasets.
const test = require('node:test');
const assert = require('node:assert/strict');

const { PCG64, permutation } = require('../src/rng');
const { BatchSampler, shardIndices } = require('../src/data');

test('PCG64 raw output equals numpy default_rng(0).bit_generator.random_raw', () => {
  const g = new PCG64(0);
  assert.deepEqual([g.next64(), g.next64(), g.next64()],
    [11749869230777074271n, 4976686463289251617n, 755828109848996024n]);
});

test('permutation equals numpy Generator.permutation', () => {
  assert.deepEqual(Array.from(permutation(0, 10)), [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]);
  assert.deepEqual(Array.from(permutation([5, 1, 2], 20)),
    [5, 12, 4, 7, 17, 3, 15, 6, 1, 19, 16, 13, 9, 18, 11, 2, 8, 10, 0, 14]);
  assert.deepEqual(Array.from(permutation(2 ** 40 + 7, 7)), [6, 3, 4, 5, 1, 0, 2]);
  assert.deepEqual(Array.from(permutation(0, 8)), [2, 4, 3, 6, 5, 0, 1, 7]);
});

test('shard_indices and BatchSampler equal worker/datasets.py', () => {
  assert.deepEqual(Array.from(shardIndices(23, 1, 3, 0)), [4, 6, 7, 11, 12, 14, 15, 22]);
  const s = new BatchSampler(10, 4, 3, 1);
  assert.deepEqual(Array.from(s.batch(0)), [4, 1, 2, 8]);
  assert.deepEqual(Array.from(s.batch(2)), [6, 3]);
  assert.deepEqual(Array.from(s.batch(3)), [6, 5, 3, 1]);
});

test('shards are disjoint, cover range(n) and differ in size by at most one', () => {
  const n = 101;
  const world = 4;
  const seen = new Set();
  const sizes = [];
  for (let r = 0; r < world; r++) {
    const idx = shardIndices(n, r, world, 9);
    sizes.push(idx.length);
    for (const i of idx) {
      assert.ok(!seen.has(i));
      seen.add(i);
    }
  }
  assert.equal(seen.size, n);
  assert.ok(Math.max(...sizes) - Math.min(...sizes) <= 1);
});
