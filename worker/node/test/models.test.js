'use strict';
// Gradient checks against central finite differences, in float64 (models run in the params' type).
const test = require('node:test');
const assert = require('node:assert/strict');

const { LinearRegression, MLP, SoftmaxRegression, ModelSpecError, buildModel } = require('../src/models');
const { PCG64 } = require('../src/rng');

function rand(rng, n, scale = 1) {
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = ((rng.next32() / 2 ** 32) * 2 - 1) * scale;
  return out;
}

function randomParams(model, rng, scale = 0.5) {
  const p = {};
  for (const s of model.paramSpecs()) p[s.name] = rand(rng, s.shape.reduce((a, b) => a * b, 1), scale);
  return p;
}

/** Max relative error between the analytic gradient and central differences over every coordinate. */
function gradCheck(model, params, X, y, B, eps = 1e-6) {
  const { grads } = model.lossAndGrad(params, X, y, B);
  let worst = 0;
  for (const s of model.paramSpecs()) {
    const p = params[s.name];
    assert.equal(grads[s.name].length, p.length, s.name);
    assert.ok(grads[s.name] instanceof Float64Array, `${s.name} gradient keeps the params' array type`);
    for (let i = 0; i < p.length; i++) {
      const keep = p[i];
      p[i] = keep + eps;
      const up = model.lossAndGrad(params, X, y, B).loss;
      p[i] = keep - eps;
      const down = model.lossAndGrad(params, X, y, B).loss;
      p[i] = keep;
      const num = (up - down) / (2 * eps);
      const err = Math.abs(num - grads[s.name][i]) / Math.max(1e-8, Math.abs(num) + Math.abs(grads[s.name][i]));
      if (Math.abs(num - grads[s.name][i]) > 1e-7) worst = Math.max(worst, err);
    }
  }
  return worst;
}

test('softmax regression gradient matches finite differences', () => {
  const rng = new PCG64(1);
  const model = new SoftmaxRegression(5, 3);
  const B = 7;
  const X = rand(rng, B * 5, 2);
  const y = Int32Array.from({ length: B }, (_, i) => i % 3);
  assert.ok(gradCheck(model, randomParams(model, rng), X, y, B) < 1e-6);
});

for (const activation of ['relu', 'tanh', 'sigmoid']) {
  test(`MLP (${activation}) gradient matches finite differences`, () => {
    const rng = new PCG64([2, activation.length]);
    const model = new MLP(4, [6, 5], 3, activation);
    const B = 5;
    const X = rand(rng, B * 4, 1.5);
    const y = Int32Array.from([0, 2, 1, 1, 0]);
    assert.ok(gradCheck(model, randomParams(model, rng, 0.8), X, y, B) < 1e-5);
  });
}

test('linear regression gradient matches finite differences', () => {
  const rng = new PCG64(3);
  const model = new LinearRegression(4, 2);
  const B = 6;
  const X = rand(rng, B * 4);
  const y = rand(rng, B * 2);
  assert.ok(gradCheck(model, randomParams(model, rng), X, y, B) < 1e-6);
});

test('parameter names and shapes follow worker/models.py', () => {
  const mlp = buildModel({ kind: 'mlp', hidden: [64] }, 64, 10);
  assert.deepEqual(mlp.paramSpecs().map((s) => [s.name, s.shape, s.init]), [
    ['layer0.bias', [64], 'zeros'],
    ['layer0.weight', [64, 64], 'normal'],
    ['layer1.bias', [10], 'zeros'],
    ['layer1.weight', [64, 10], 'uniform'],
  ]);
  assert.equal(mlp.paramSpecs()[1].scale, Math.sqrt(2 / 64));
  const tanh = buildModel({ kind: 'mlp', hidden: [8], activation: 'tanh' }, 3, 2);
  assert.equal(tanh.paramSpecs()[1].init, 'uniform');
  assert.deepEqual(buildModel({ kind: 'softmax' }, 64, 10).paramSpecs().map((s) => [s.name, s.shape]),
    [['softmax.bias', [10]], ['softmax.weight', [64, 10]]]);
  assert.deepEqual(buildModel({ kind: 'linear' }, 3, 1).paramSpecs().map((s) => s.name), ['linear.bias', 'linear.weight']);
});

test('loss is the batch mean: log(K) for zero parameters, independent of batch size', () => {
  const model = new SoftmaxRegression(3, 4);
  const params = model.initParams();
  for (const B of [1, 5, 32]) {
    const X = new Float32Array(B * 3).fill(0.5);
    const y = new Int32Array(B).fill(2);
    const { loss, grads } = model.lossAndGrad(params, X, y, B);
    assert.ok(Math.abs(loss - Math.log(4)) < 1e-6);
    assert.ok(grads['softmax.bias'] instanceof Float32Array);
    assert.ok(Math.abs(grads['softmax.bias'][2] - (0.25 - 1)) < 1e-6); // (softmax - onehot) averaged
  }
});

test('evaluate returns mean loss and accuracy; never writes its inputs', () => {
  const model = new SoftmaxRegression(2, 2);
  const params = { 'softmax.bias': new Float32Array(2), 'softmax.weight': Float32Array.from([1, -1, -1, 1]) };
  const X = Float32Array.from([1, 0, 0, 1, 1, 0]);
  const y = Int32Array.from([0, 1, 1]);
  const before = Float32Array.from(params['softmax.weight']);
  const r = model.evaluate(params, X, y, 3);
  assert.equal(r.accuracy, 2 / 3);
  assert.ok(r.loss > 0);
  assert.deepEqual(params['softmax.weight'], before);
});

test('bad specs and inputs are refused with a message', () => {
  assert.throws(() => buildModel({ kind: 'cnn' }, 3, 2), ModelSpecError);
  assert.throws(() => buildModel({ kind: 'mlp', hidden: [] }, 3, 2), ModelSpecError);
  assert.throws(() => buildModel({ kind: 'mlp', hidden: [4], activation: 'gelu' }, 3, 2), /activation/);
  assert.throws(() => buildModel({ kind: 'softmax', extra: 1 }, 3, 2), /no options/);
  const model = new SoftmaxRegression(2, 2);
  assert.throws(() => model.lossAndGrad(model.initParams(), new Float32Array(4), Int32Array.from([0, 5]), 2), /label/);
  assert.throws(() => model.lossAndGrad({}, new Float32Array(4), Int32Array.from([0, 1]), 2), /missing parameter/);
});
