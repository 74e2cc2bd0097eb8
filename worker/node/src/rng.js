'use strict';
/**
 * numpy-compatible random permutations: `np.random.default_rng(seed).permutation(n)`.
 *
 * The Python worker shards with `default_rng(seed).permutation(n)[rank::world]` and draws batches
 * with `default_rng([seed, rank, epoch]).permutation(n)` (worker/datasets.py). To train on exactly
 * the same shard (and the same batches) this module reproduces, bit for bit:
 *
 *   - numpy.random.SeedSequence(entropy).generate_state(4, uint64)   (the seeding hash)
 *   - PCG64 (pcg_setseq_128 XSL-RR 64), including numpy's next_uint32 buffering
 *   - Generator.shuffle's Fisher-Yates with random_interval (masked rejection sampling)
 *
 * Golden vectors from numpy are in test/rng.test.js; tests/conformance cross-checks against numpy.
 * 128-bit arithmetic uses BigInt: slow per draw (~1 us) but permutations here are small.
 */

const M32 = 0xffffffff;
const INIT_A = 0x43b0d7e5;
const MULT_A = 0x931e8875;
const INIT_B = 0x8b51f9dd;
const MULT_B = 0x58f38ded;
const MIX_MULT_L = 0xca01f9dd;
const MIX_MULT_R = 0x4973f715;
const XSHIFT = 16;
const POOL_SIZE = 4;

const MASK64 = (1n << 64n) - 1n;
const MASK128 = (1n << 128n) - 1n;
const PCG_MULT = (0x2360ed051fc65da4n << 64n) | 0x4385df649fccf645n;

const mul32 = (a, b) => Math.imul(a, b) >>> 0;

/** An entropy value (non-negative integer or array of them) as numpy's uint32 words. */
function toUint32Words(entropy) {
  if (Array.isArray(entropy)) return entropy.flatMap((v) => toUint32Words(v));
  let n = BigInt(entropy);
  if (n < 0n) throw new RangeError(`seed entropy must be non-negative, got ${entropy}`);
  if (n === 0n) return [0];
  const out = [];
  while (n > 0n) {
    out.push(Number(n & 0xffffffffn));
    n >>= 32n;
  }
  return out;
}

/** numpy.random.SeedSequence(entropy) without spawn keys: the mixed 4-word pool. */
function seedSequencePool(entropy) {
  const words = toUint32Words(entropy);
  const pool = new Array(POOL_SIZE).fill(0);
  let hashConst = INIT_A;
  const hashmix = (value) => {
    value = (value ^ hashConst) >>> 0;
    hashConst = mul32(hashConst, MULT_A);
    value = mul32(value, hashConst);
    return (value ^ (value >>> XSHIFT)) >>> 0;
  };
  const mix = (x, y) => {
    const r = (mul32(MIX_MULT_L, x) - mul32(MIX_MULT_R, y)) >>> 0;
    return (r ^ (r >>> XSHIFT)) >>> 0;
  };
  for (let i = 0; i < POOL_SIZE; i++) pool[i] = hashmix(i < words.length ? words[i] : 0);
  for (let src = 0; src < POOL_SIZE; src++) {
    for (let dst = 0; dst < POOL_SIZE; dst++) {
      if (src !== dst) pool[dst] = mix(pool[dst], hashmix(pool[src]));
    }
  }
  for (let src = POOL_SIZE; src < words.length; src++) {
    for (let dst = 0; dst < POOL_SIZE; dst++) pool[dst] = mix(pool[dst], hashmix(words[src]));
  }
  return pool;
}

/** SeedSequence.generate_state(nWords64, uint64) as BigInts. */
function generateState64(pool, nWords64) {
  let hashConst = INIT_B;
  const u32 = [];
  for (let i = 0; i < 2 * nWords64; i++) {
    let v = (pool[i % POOL_SIZE] ^ hashConst) >>> 0;
    hashConst = mul32(hashConst, MULT_B);
    v = mul32(v, hashConst);
    u32.push((v ^ (v >>> XSHIFT)) >>> 0);
  }
  const out = [];
  for (let i = 0; i < nWords64; i++) out.push((BigInt(u32[2 * i + 1]) << 32n) | BigInt(u32[2 * i]));
  return out;
}

class PCG64 {
  /** Seeded like `np.random.default_rng(entropy)`: entropy is an integer or an array of integers. */
  constructor(entropy) {
    const [s0, s1, i0, i1] = generateState64(seedSequencePool(entropy), 4);
    const initstate = (s0 << 64n) | s1;
    const initseq = (i0 << 64n) | i1;
    this.inc = ((initseq << 1n) | 1n) & MASK128;
    this.state = 0n;
    this._step();
    this.state = (this.state + initstate) & MASK128;
    this._step();
    this.hasUint32 = false;
    this.uinteger = 0;
  }

  _step() {
    this.state = (this.state * PCG_MULT + this.inc) & MASK128;
  }

  /** Next raw 64-bit output (BigInt), as `bit_generator.random_raw()`. */
  next64() {
    this._step();
    const s = this.state;
    const x = ((s >> 64n) ^ s) & MASK64;
    const rot = s >> 122n;
    return ((x >> rot) | (x << ((64n - rot) & 63n))) & MASK64;
  }

  /** numpy's next_uint32: the low half of a 64-bit draw, then its high half. */
  next32() {
    if (this.hasUint32) {
      this.hasUint32 = false;
      return this.uinteger;
    }
    const v = this.next64();
    this.hasUint32 = true;
    this.uinteger = Number(v >> 32n);
    return Number(v & 0xffffffffn);
  }

  /** numpy's random_interval(max): uniform in [0, max] by masked rejection. */
  interval(max) {
    if (max === 0) return 0;
    if (max > M32) {
      let mask = BigInt(max);
      for (const sh of [1n, 2n, 4n, 8n, 16n, 32n]) mask |= mask >> sh;
      const m = BigInt(max);
      for (;;) {
        const v = this.next64() & mask;
        if (v <= m) return Number(v);
      }
    }
    let mask = max;
    for (const sh of [1, 2, 4, 8, 16]) mask = (mask | (mask >>> sh)) >>> 0;
    for (;;) {
      const v = (this.next32() & mask) >>> 0;
      if (v <= max) return v;
    }
  }

  /** `Generator.permutation(n)`: a shuffled 0..n-1 (Float64Array-free: plain Int32Array for n < 2^31). */
  permutation(n) {
    const a = new Int32Array(n);
    for (let i = 0; i < n; i++) a[i] = i;
    for (let i = n - 1; i >= 1; i--) {
      const j = this.interval(i);
      const t = a[i];
      a[i] = a[j];
      a[j] = t;
    }
    return a;
  }
}

/** `np.random.default_rng(entropy).permutation(n)`. */
function permutation(entropy, n) {
  return new PCG64(entropy).permutation(n);
}

module.exports = { PCG64, permutation, seedSequencePool, generateState64, toUint32Words };
