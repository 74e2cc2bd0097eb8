'use strict';
// Chunking, alignment of received bytes, .npy parsing and the contract loading.
const test = require('node:test');
const assert = require('node:assert/strict');

const { encodeTensors, TensorAssembler } = require('../src/tensors');
const { parseNpy, toNpy } = require('../src/npy');
const { loadContract } = require('../src/proto');

test('tensors are cut into ~chunkBytes chunks and reassemble by offset', () => {
  const big = Float32Array.from({ length: 1000 }, (_, i) => i * 0.5);
  const small = Float32Array.from([1, 2, 3]);
  const messages = encodeTensors([['big', big, [10, 100]], ['small', small, [3]]], 400);
  const chunks = messages.flat();
  assert.deepEqual(chunks.filter((c) => c.name === 'big').map((c) => c.offset), [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]);
  for (const m of messages) assert.ok(m.reduce((s, c) => s + c.data.length, 0) <= 400);
  const asm = new TensorAssembler();
  for (const c of chunks) asm.add(c);
  const out = asm.finish();
  assert.deepEqual(out.big, big);
  assert.deepEqual(out.small, small);
  assert.deepEqual(asm.shapes.big, [10, 100]);
});

test('received bytes at an odd byteOffset are copied, not viewed', () => {
  const values = Float32Array.from([1.5, -2.25, 3e-8]);
  const raw = Buffer.from(values.buffer);
  const backing = Buffer.alloc(raw.length + 3);
  raw.copy(backing, 3);
  const data = backing.subarray(3); // byteOffset 3: new Float32Array(data.buffer, 3) would throw
  const asm = new TensorAssembler();
  asm.add({ name: 'w', shape: [3], dtype: 'DATA_TYPE_FLOAT32', offset: 0, data });
  assert.deepEqual(asm.finish().w, values);
});

test('chunks out of order, too long or of another dtype are refused', () => {
  const data = Buffer.from(new Float32Array(2).buffer);
  assert.throws(() => new TensorAssembler().add({ name: 'w', shape: [4], dtype: 'DATA_TYPE_FLOAT32', offset: 2, data }), /offset/);
  assert.throws(() => new TensorAssembler().add({ name: 'w', shape: [1], dtype: 'DATA_TYPE_FLOAT32', offset: 0, data }), /outside/);
  assert.throws(() => new TensorAssembler().add({ name: 'w', shape: [2], dtype: 'DATA_TYPE_FLOAT16', offset: 0, data }), /float32/);
  const asm = new TensorAssembler();
  asm.add({ name: 'w', shape: [4], dtype: 'DATA_TYPE_FLOAT32', offset: 0, data });
  assert.throws(() => asm.finish(), /2 of 4/);
});

test('an empty gradient is one empty message; zero-size tensors travel as one empty chunk', () => {
  assert.deepEqual(encodeTensors([], 1 << 20), [[]]);
  const [[chunk]] = encodeTensors([['e', new Float32Array(0), [0]]], 1 << 20);
  assert.equal(chunk.data.length, 0);
});

test('.npy round trip, including int64 labels and an unaligned buffer', () => {
  const X = Float32Array.from([1, 2, 3, 4, 5, 6]);
  const parsed = parseNpy(toNpy(X, [2, 3]));
  assert.deepEqual(parsed.shape, [2, 3]);
  assert.deepEqual(parsed.data, X);
  const y = BigInt64Array.from([0n, 9n, 3n]);
  const buf = toNpy(y, [3]);
  const shifted = Buffer.concat([Buffer.alloc(1), buf]).subarray(1);
  const py = parseNpy(shifted);
  assert.equal(py.dtype, '<i8');
  assert.deepEqual(Array.from(py.data), [0, 9, 3]);
  assert.throws(() => parseNpy(Buffer.from('not numpy at all')), /not a .npy/);
});

test('the contract loads from protos/ with the well-known types', () => {
  const { pkg } = loadContract();
  for (const s of ['ParameterService', 'RunService', 'WorkerService']) assert.equal(typeof pkg[s], 'function');
  const req = pkg.PullParamsRequest.type.field.find((f) => f.name === 'max_wait');
  assert.equal(req.typeName, 'google.protobuf.Duration');
});

test('a run\'s seed past 2^53 reaches the shards exactly (Join\'s answer decodes it as a BigInt)', () => {
  // (longs as Number rounded it: 2^60 + 1 became 2^60, and the rank trained on other examples than
  // a Python rank of the same run takes it to: np.random.default_rng(2**60 + 1).permutation(10))
  const { definition } = loadContract();
  const join = definition['paramserver.v1.WorkerService'].Join;
  const { shardIndices, BatchSampler } = require('../src/data');
  const { permutation } = require('../src/rng');
  const seed = 2n ** 60n + 1n;
  const bytes = join.responseSerialize({ assignment: { run_id: 'r', rank: 0, spec: { seed: seed.toString(), num_workers: 1 } } });
  const resp = join.responseDeserialize(bytes);
  assert.equal(resp.assignment.spec.seed, seed);
  assert.equal(resp.assignment.rank, 0); // (the rest as every answer decodes)
  assert.deepEqual(Array.from(permutation(resp.assignment.spec.seed, 10)), [5, 7, 9, 0, 8, 6, 4, 1, 2, 3]);
  assert.deepEqual(Array.from(shardIndices(10, 0, 2, resp.assignment.spec.seed)), [2, 4, 5, 8, 9]); // (numpy's)
  new BatchSampler(5, 2, resp.assignment.spec.seed, 0).batch(3); // (takes a BigInt seed)
  const none = join.responseDeserialize(join.responseSerialize({ assignment: { run_id: 'r', spec: {} } }));
  assert.equal(none.assignment.spec.seed, 0n);
  assert.equal(join.responseDeserialize(join.responseSerialize({})).assignment, null);
});
