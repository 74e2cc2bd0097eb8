'use strict';
/**
 * Tensors on the wire (TensorChunk in paramserver.proto): a chunk holds the little-endian float32
 * elements of one named tensor from element `offset` of its flattened (C order) values; chunks of
 * a tensor come in offset order and cover it exactly once. Senders cut tensors into ~1 MiB chunks
 * and group chunks into messages of ~1 MiB payload (as paramserver.v1.wire.chunk_groups does).
 *
 * Receiving: a protobuf `bytes` field arrives as a Buffer that usually views a larger message
 * buffer at an arbitrary byteOffset, so it is never viewed as a Float32Array directly: its bytes
 * are copied into the destination array's memory at offset * 4.
 */

const os = require('os');

const FLOAT32 = 'DATA_TYPE_FLOAT32';
const LITTLE_ENDIAN = os.endianness() === 'LE';

class TensorError extends Error {}

/** Little-endian bytes of a slice of a Float32Array, without copying on little-endian hosts. */
function leBytes(arr, lo, hi) {
  if (LITTLE_ENDIAN) return Buffer.from(arr.buffer, arr.byteOffset + lo * 4, (hi - lo) * 4);
  const out = Buffer.alloc((hi - lo) * 4);
  for (let i = lo; i < hi; i++) out.writeFloatLE(arr[i], (i - lo) * 4);
  return out;
}

/**
 * Split tensors into messages: returns an array of chunk lists, each list ~chunkBytes of payload.
 * `tensors` is [[name, Float32Array, shape], ...] or an object {name: Float32Array} with `shapes`.
 */
function encodeTensors(entries, chunkBytes = 1 << 20) {
  const perChunk = Math.max(1, Math.floor(chunkBytes / 4));
  const messages = [];
  let batch = [];
  let bytes = 0;
  for (const [name, arr, shape] of entries) {
    const flat = arr instanceof Float32Array ? arr : Float32Array.from(arr);
    const n = flat.length;
    for (let lo = 0; lo < Math.max(n, 1); lo += perChunk) {
      const hi = Math.min(n, lo + perChunk);
      batch.push({ name, shape, dtype: FLOAT32, offset: lo, data: leBytes(flat, lo, hi) });
      bytes += (hi - lo) * 4;
      if (bytes >= chunkBytes) {
        messages.push(batch);
        batch = [];
        bytes = 0;
      }
    }
  }
  if (batch.length || !messages.length) messages.push(batch);
  return messages;
}

/** Assembles pulled chunks into Float32Arrays (reusing the caller's arrays when shapes match). */
class TensorAssembler {
  constructor(into = {}) {
    this.out = into;
    this.shapes = {};
    this.filled = {};
  }

  add(chunk) {
    const { name } = chunk;
    const shape = (chunk.shape || []).map(Number);
    const n = shape.reduce((a, b) => a * b, 1);
    if (chunk.dtype !== FLOAT32 && chunk.dtype !== 1) throw new TensorError(`tensor ${name}: dtype ${chunk.dtype} is not float32`);
    const data = chunk.data || Buffer.alloc(0);
    if (data.length % 4) throw new TensorError(`tensor ${name}: ${data.length} bytes is not a multiple of 4`);
    const offset = Number(chunk.offset || 0);
    const count = data.length / 4;
    if (offset < 0 || offset + count > n) throw new TensorError(`tensor ${name}: chunk [${offset}, ${offset + count}) outside its ${n} elements`);
    let arr = this.out[name];
    if (!(arr instanceof Float32Array) || arr.length !== n) {
      arr = new Float32Array(n);
      this.out[name] = arr;
    }
    if (!(name in this.filled)) this.filled[name] = 0;
    if (offset !== this.filled[name]) throw new TensorError(`tensor ${name}: chunk at offset ${offset}, expected ${this.filled[name]}`);
    this.shapes[name] = shape;
    if (LITTLE_ENDIAN) {
      new Uint8Array(arr.buffer, arr.byteOffset + offset * 4, data.length).set(data);
    } else {
      for (let i = 0; i < count; i++) arr[offset + i] = data.readFloatLE(i * 4);
    }
    this.filled[name] += count;
  }

  /** The assembled tensors; throws when one is incomplete. */
  finish() {
    for (const [name, filled] of Object.entries(this.filled)) {
      if (filled !== this.out[name].length) throw new TensorError(`tensor ${name}: got ${filled} of ${this.out[name].length} elements`);
    }
    return this.out;
  }
}

module.exports = { encodeTensors, TensorAssembler, TensorError, FLOAT32 };
