'use strict';
/**
 * Models in plain JavaScript, with the conventions of worker/models.py:
 *
 *   - Layout: a weight W has shape (n_in, n_out), row-major (C order), and z = a @ W + b with one
 *     row per sample. Parameter names: "softmax.weight"/"softmax.bias", "linear.weight"/
 *     "linear.bias", "layer{i}.weight"/"layer{i}.bias" (i = 0 the first hidden layer).
 *   - Loss is the batch mean: mean cross-entropy for classification, 1/2 mean squared error
 *     summed over outputs for linear regression.
 *   - Gradients are fresh arrays of the parameters' array type; params, X and y are never written.
 *   - Computation runs in the parameters' array type: Float32Array in production, Float64Array
 *     for the finite-difference checks in test/models.test.js.
 *
 * A parameter set is a plain object {name: TypedArray (flattened)}; shapes come from paramSpecs().
 */

class ModelSpecError extends Error {}

const ACTIVATIONS = ['relu', 'tanh', 'sigmoid'];
const MODEL_FORMS = "accepted model specs: {\"kind\": \"linear\"}, {\"kind\": \"softmax\"}, {\"kind\": \"mlp\", \"hidden\": [64], \"activation\": \"relu\"|\"tanh\"|\"sigmoid\"}";

const size = (shape) => shape.reduce((a, b) => a * b, 1);

// ------------------------------------------------------------------------- dense kernels
// Rows accumulate in a Float64Array scratch row and are stored once into the result's type: about
// twice as fast in V8 as read-modify-write on a Float32Array, and more precise.

/** C (m x n) = A (m x k) @ B (k x n) [+ bias (n)]. */
function matmul(A, B, m, k, n, bias, Ctor) {
  const C = new Ctor(m * n);
  const acc = new Float64Array(n);
  for (let i = 0; i < m; i++) {
    if (bias) for (let j = 0; j < n; j++) acc[j] = bias[j];
    else acc.fill(0);
    const arow = i * k;
    for (let p = 0; p < k; p++) {
      const a = A[arow + p];
      if (a === 0) continue; // relu activations are often exactly 0
      const brow = p * n;
      for (let j = 0; j < n; j++) acc[j] += a * B[brow + j];
    }
    C.set(acc, i * n);
  }
  return C;
}

/** C (k x n) = A(m x k)^T @ B (m x n). */
function matmulTN(A, B, m, k, n, Ctor) {
  const C = new Ctor(k * n);
  const acc = new Float64Array(n);
  for (let p = 0; p < k; p++) {
    acc.fill(0);
    for (let r = 0; r < m; r++) {
      const a = A[r * k + p];
      if (a === 0) continue;
      const brow = r * n;
      for (let j = 0; j < n; j++) acc[j] += a * B[brow + j];
    }
    C.set(acc, p * n);
  }
  return C;
}

/** C (m x k) = A (m x n) @ B(k x n)^T. */
function matmulNT(A, B, m, n, k, Ctor) {
  const C = new Ctor(m * k);
  for (let i = 0; i < m; i++) {
    const arow = i * n;
    for (let p = 0; p < k; p++) {
      const brow = p * n;
      let s = 0;
      for (let j = 0; j < n; j++) s += A[arow + j] * B[brow + j];
      C[i * k + p] = s;
    }
  }
  return C;
}

function colSums(A, m, n, Ctor) {
  const out = new Ctor(n);
  for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) out[j] += A[i * n + j];
  return out;
}

/**
 * Mean cross-entropy of logits (B x K) against integer labels. With wantGrad, overwrites logits
 * with (softmax - onehot) / B, which is dL/dlogits. Returns {loss, correct}.
 */
function softmaxXent(logits, y, B, K, wantGrad) {
  let total = 0;
  let correct = 0;
  for (let i = 0; i < B; i++) {
    const row = i * K;
    let max = -Infinity;
    let arg = 0;
    for (let j = 0; j < K; j++) {
      if (logits[row + j] > max) {
        max = logits[row + j];
        arg = j;
      }
    }
    const label = y[i];
    if (arg === label) correct++;
    let sum = 0;
    for (let j = 0; j < K; j++) sum += Math.exp(logits[row + j] - max);
    total += Math.log(sum) - (logits[row + label] - max);
    if (wantGrad) {
      for (let j = 0; j < K; j++) logits[row + j] = Math.exp(logits[row + j] - max) / sum / B;
      logits[row + label] -= 1 / B;
    }
  }
  return { loss: total / B, correct };
}

function checkLabels(y, B, K) {
  if (!y || y.length !== B) throw new RangeError(`labels must have ${B} entries, got ${y && y.length}`);
  for (let i = 0; i < B; i++) {
    if (!Number.isInteger(y[i]) || y[i] < 0 || y[i] >= K) throw new RangeError(`label ${y[i]} outside [0, ${K})`);
  }
}

// ------------------------------------------------------------------------- models
class Model {
  /** Fetch tensors in spec order, checking presence, length and a common array type. */
  weights(params) {
    let Ctor = null;
    const out = {};
    for (const s of this.paramSpecs()) {
      const a = params[s.name];
      if (!a) throw new RangeError(`missing parameter ${s.name}; expected ${this.paramSpecs().map((p) => p.name)}`);
      if (a.length !== size(s.shape)) throw new RangeError(`parameter ${s.name} has ${a.length} elements, expected shape (${s.shape})`);
      if (!(a instanceof Float32Array || a instanceof Float64Array) || (Ctor && a.constructor !== Ctor)) {
        throw new RangeError(`parameter ${s.name} must be a Float32Array like the others`);
      }
      Ctor = a.constructor;
      out[s.name] = a;
    }
    return { w: out, Ctor };
  }

  inputs(X, B) {
    if (B < 1) throw new RangeError('empty batch: X has no rows');
    if (X.length !== B * this.nFeatures) throw new RangeError(`X must have ${B} x ${this.nFeatures} elements, got ${X.length}`);
  }

  initParams(Ctor = Float32Array) {
    const out = {};
    for (const s of this.paramSpecs()) out[s.name] = new Ctor(size(s.shape));
    return out;
  }
}

/** f = X @ W + b, loss 1/2 mean_i ||y_i - f(x_i)||^2 (worker.models.LinearRegression). */
class LinearRegression extends Model {
  constructor(nFeatures, nOutputs = 1) {
    super();
    checkDims(nFeatures, nOutputs, 1);
    this.task = 'regression';
    this.nFeatures = nFeatures;
    this.nOutputs = nOutputs;
    this.spec = { kind: 'linear' };
  }

  paramSpecs() {
    return [
      { name: 'linear.bias', shape: [this.nOutputs], init: 'zeros', scale: 0 },
      { name: 'linear.weight', shape: [this.nFeatures, this.nOutputs], init: 'zeros', scale: 0 },
    ];
  }

  residual(params, X, y, B) {
    const { w, Ctor } = this.weights(params);
    this.inputs(X, B);
    const K = this.nOutputs;
    if (!y || y.length !== B * K) throw new RangeError(`targets must have ${B} x ${K} elements, got ${y && y.length}`);
    const r = matmul(X, w['linear.weight'], B, this.nFeatures, K, w['linear.bias'], Ctor);
    let sq = 0;
    for (let i = 0; i < r.length; i++) {
      r[i] -= y[i];
      sq += r[i] * r[i];
    }
    return { r, loss: (0.5 * sq) / B, Ctor };
  }

  lossAndGrad(params, X, y, B) {
    const { r, loss, Ctor } = this.residual(params, X, y, B);
    for (let i = 0; i < r.length; i++) r[i] /= B;
    return {
      loss,
      grads: {
        'linear.bias': colSums(r, B, this.nOutputs, Ctor),
        'linear.weight': matmulTN(X, r, B, this.nFeatures, this.nOutputs, Ctor),
      },
    };
  }

  evaluate(params, X, y, B) {
    return { loss: this.residual(params, X, y, B).loss, accuracy: null };
  }
}

/** Multinomial logistic regression: logits = X @ W + b, mean cross-entropy. */
class SoftmaxRegression extends Model {
  constructor(nFeatures, nClasses) {
    super();
    checkDims(nFeatures, nClasses, 2);
    this.task = 'classification';
    this.nFeatures = nFeatures;
    this.nOutputs = nClasses;
    this.spec = { kind: 'softmax' };
  }

  paramSpecs() {
    return [
      { name: 'softmax.bias', shape: [this.nOutputs], init: 'zeros', scale: 0 },
      { name: 'softmax.weight', shape: [this.nFeatures, this.nOutputs], init: 'zeros', scale: 0 },
    ];
  }

  logits(params, X, y, B) {
    const { w, Ctor } = this.weights(params);
    this.inputs(X, B);
    checkLabels(y, B, this.nOutputs);
    return { Ctor, logits: matmul(X, w['softmax.weight'], B, this.nFeatures, this.nOutputs, w['softmax.bias'], Ctor) };
  }

  lossAndGrad(params, X, y, B) {
    const { Ctor, logits } = this.logits(params, X, y, B);
    const { loss } = softmaxXent(logits, y, B, this.nOutputs, true);
    return {
      loss,
      grads: {
        'softmax.bias': colSums(logits, B, this.nOutputs, Ctor),
        'softmax.weight': matmulTN(X, logits, B, this.nFeatures, this.nOutputs, Ctor),
      },
    };
  }

  evaluate(params, X, y, B) {
    const { logits } = this.logits(params, X, y, B);
    const { loss, correct } = softmaxXent(logits, y, B, this.nOutputs, false);
    return { loss, accuracy: correct / B };
  }
}

/** Fully connected network with hidden layers, then softmax cross-entropy (worker.models.MLP). */
class MLP extends Model {
  constructor(nFeatures, hidden, nClasses, activation = 'relu') {
    super();
    checkDims(nFeatures, nClasses, 2);
    if (!Array.isArray(hidden) || !hidden.length || hidden.some((h) => !Number.isInteger(h) || h < 1)) {
      throw new ModelSpecError(`mlp hidden sizes must be a non-empty list of positive integers, got ${JSON.stringify(hidden)}`);
    }
    if (!ACTIVATIONS.includes(activation)) throw new ModelSpecError(`unknown activation ${JSON.stringify(activation)}; use one of ${ACTIVATIONS.join(', ')}`);
    this.task = 'classification';
    this.nFeatures = nFeatures;
    this.nOutputs = nClasses;
    this.hidden = hidden.slice();
    this.activation = activation;
    this.spec = { kind: 'mlp', hidden: this.hidden, activation };
    const sizes = [nFeatures, ...hidden, nClasses];
    this.layers = [];
    for (let i = 0; i + 1 < sizes.length; i++) this.layers.push([sizes[i], sizes[i + 1]]);
    const specs = [];
    this.layers.forEach(([fanIn, fanOut], i) => {
      const w = activation === 'relu' && i < hidden.length
        ? { name: `layer${i}.weight`, shape: [fanIn, fanOut], init: 'normal', scale: Math.sqrt(2 / fanIn) }
        : { name: `layer${i}.weight`, shape: [fanIn, fanOut], init: 'uniform', scale: Math.sqrt(6 / (fanIn + fanOut)) };
      specs.push({ name: `layer${i}.bias`, shape: [fanOut], init: 'zeros', scale: 0 }, w);
    });
    this.specs = specs.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  paramSpecs() {
    return this.specs.map((s) => ({ ...s, shape: s.shape.slice() }));
  }

  activate(z) {
    if (this.activation === 'relu') {
      for (let i = 0; i < z.length; i++) if (!(z[i] > 0)) z[i] = 0;
    } else if (this.activation === 'tanh') {
      for (let i = 0; i < z.length; i++) z[i] = Math.tanh(z[i]);
    } else {
      for (let i = 0; i < z.length; i++) z[i] = 0.5 * (1 + Math.tanh(0.5 * z[i])); // no overflow for large |z|
    }
    return z;
  }

  /** delta = dL/da * f'(z), with f' written through a = f(z); overwrites gradA. */
  timesDerivative(gradA, a) {
    if (this.activation === 'relu') {
      for (let i = 0; i < a.length; i++) if (!(a[i] > 0)) gradA[i] = 0;
    } else if (this.activation === 'tanh') {
      for (let i = 0; i < a.length; i++) gradA[i] *= 1 - a[i] * a[i];
    } else {
      for (let i = 0; i < a.length; i++) gradA[i] *= a[i] * (1 - a[i]);
    }
    return gradA;
  }

  forward(params, X, y, B) {
    const { w, Ctor } = this.weights(params);
    this.inputs(X, B);
    checkLabels(y, B, this.nOutputs);
    const acts = [X];
    let a = X;
    const L = this.layers.length;
    for (let i = 0; i < L - 1; i++) {
      const [fanIn, fanOut] = this.layers[i];
      a = this.activate(matmul(a, w[`layer${i}.weight`], B, fanIn, fanOut, w[`layer${i}.bias`], Ctor));
      acts.push(a);
    }
    const [fanIn, fanOut] = this.layers[L - 1];
    const logits = matmul(a, w[`layer${L - 1}.weight`], B, fanIn, fanOut, w[`layer${L - 1}.bias`], Ctor);
    return { w, Ctor, acts, logits };
  }

  lossAndGrad(params, X, y, B) {
    const { w, Ctor, acts, logits } = this.forward(params, X, y, B);
    const { loss } = softmaxXent(logits, y, B, this.nOutputs, true);
    const grads = {};
    let delta = logits;
    for (let i = this.layers.length - 1; i >= 0; i--) {
      const [fanIn, fanOut] = this.layers[i];
      grads[`layer${i}.weight`] = matmulTN(acts[i], delta, B, fanIn, fanOut, Ctor);
      grads[`layer${i}.bias`] = colSums(delta, B, fanOut, Ctor);
      if (i > 0) delta = this.timesDerivative(matmulNT(delta, w[`layer${i}.weight`], B, fanOut, fanIn, Ctor), acts[i]);
    }
    return { loss, grads };
  }

  evaluate(params, X, y, B) {
    const { logits } = this.forward(params, X, y, B);
    const { loss, correct } = softmaxXent(logits, y, B, this.nOutputs, false);
    return { loss, accuracy: correct / B };
  }
}

function checkDims(nFeatures, nOutputs, minOutputs) {
  if (!Number.isInteger(nFeatures) || nFeatures < 1) throw new ModelSpecError(`n_features must be a positive integer, got ${nFeatures}`);
  if (!Number.isInteger(nOutputs) || nOutputs < minOutputs) {
    throw new ModelSpecError(`this model needs at least ${minOutputs} ${minOutputs > 1 ? 'classes' : 'outputs'}, got ${nOutputs}`);
  }
}

/** Build the model of a parsed model spec (RunSpec.model_spec_json) for the data's dimensions. */
function buildModel(spec, nFeatures, nOutputs) {
  if (typeof spec !== 'object' || spec === null || Array.isArray(spec) || !spec.kind) {
    throw new ModelSpecError(`model spec must be an object with a "kind", got ${JSON.stringify(spec)}; ${MODEL_FORMS}`);
  }
  const keys = Object.keys(spec);
  if (spec.kind === 'linear' || spec.kind === 'softmax') {
    if (keys.length !== 1) throw new ModelSpecError(`${spec.kind} model takes no options, got ${keys.filter((k) => k !== 'kind')}`);
    return spec.kind === 'linear' ? new LinearRegression(nFeatures, nOutputs) : new SoftmaxRegression(nFeatures, nOutputs);
  }
  if (spec.kind === 'mlp') {
    const unknown = keys.filter((k) => !['kind', 'hidden', 'activation'].includes(k));
    if (unknown.length) throw new ModelSpecError(`unknown mlp spec keys ${unknown}; allowed: kind, hidden, activation`);
    return new MLP(nFeatures, spec.hidden, nOutputs, spec.activation === undefined ? 'relu' : spec.activation);
  }
  throw new ModelSpecError(`unknown model kind ${JSON.stringify(spec.kind)}; ${MODEL_FORMS}`);
}

module.exports = {
  ACTIVATIONS, LinearRegression, MLP, Model, ModelSpecError, SoftmaxRegression, buildModel, softmaxXent, size,
};
