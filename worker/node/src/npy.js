'use strict';
/**
 * A reader (and a small writer, for tests) of NumPy .npy files: a magic string, a version, a
 * header (a Python dict literal with 'descr', 'fortran_order', 'shape'), then the raw C-order data.
 *
 * Supported dtypes: <f4, <f8, <i4, <i8, <u1, |u1, |b1 (read as Float32Array, Float64Array,
 * Int32Array, Float64Array for int64 values that fit, Uint8Array). Big-endian and Fortran-order
 * arrays are refused with a message saying what to change.
 */

const fs = require('fs');

const MAGIC = Buffer.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]); // \x93NUMPY

class NpyError extends Error {}

function parseHeader(text, file) {
  const descr = /'descr'\s*:\s*'([^']+)'/.exec(text);
  const fortran = /'fortran_order'\s*:\s*(True|False)/.exec(text);
  const shape = /'shape'\s*:\s*\(([^)]*)\)/.exec(text);
  if (!descr || !fortran || !shape) throw new NpyError(`${file}: unreadable .npy header ${JSON.stringify(text)}`);
  const dims = shape[1].split(',').map((s) => s.trim()).filter((s) => s.length).map(Number);
  if (dims.some((d) => !Number.isInteger(d) || d < 0)) throw new NpyError(`${file}: bad shape in header ${text}`);
  return { descr: descr[1], fortranOrder: fortran[1] === 'True', shape: dims };
}

/** Parse a .npy held in a Buffer; returns {dtype, shape, data} with data a fresh, aligned typed array. */
function parseNpy(buf, file = '<buffer>') {
  if (buf.length < 10 || !buf.subarray(0, 6).equals(MAGIC)) {
    throw new NpyError(`${file} is not a .npy file (bad magic); write it with numpy.save`);
  }
  const major = buf[6];
  let headerLen;
  let start;
  if (major === 1) {
    headerLen = buf.readUInt16LE(8);
    start = 10;
  } else if (major === 2 || major === 3) {
    headerLen = buf.readUInt32LE(8);
    start = 12;
  } else {
    throw new NpyError(`${file}: unsupported .npy version ${major}`);
  }
  const header = parseHeader(buf.toString(major === 3 ? 'utf8' : 'latin1', start, start + headerLen), file);
  if (header.fortranOrder) throw new NpyError(`${file}: Fortran-order array; save a C-contiguous array`);
  const count = header.shape.reduce((a, b) => a * b, 1);
  const body = buf.subarray(start + headerLen);
  const kinds = {
    '<f4': [Float32Array, 4],
    '<f8': [Float64Array, 8],
    '<i4': [Int32Array, 4],
    '<i8': [BigInt64Array, 8],
    '|u1': [Uint8Array, 1],
    '<u1': [Uint8Array, 1],
    '|b1': [Uint8Array, 1],
  };
  const kind = kinds[header.descr];
  if (!kind) throw new NpyError(`${file}: dtype ${header.descr} not supported; use little-endian float32/float64/int32/int64`);
  const [Ctor, size] = kind;
  if (body.length < count * size) {
    throw new NpyError(`${file}: truncated: ${body.length} data bytes for shape (${header.shape}) of ${header.descr}`);
  }
  // Copy into a fresh ArrayBuffer: the Buffer's byteOffset need not be a multiple of the element size.
  const bytes = new Uint8Array(count * size);
  bytes.set(body.subarray(0, count * size));
  let data = new Ctor(bytes.buffer);
  if (Ctor === BigInt64Array) {
    const out = new Float64Array(count);
    for (let i = 0; i < count; i++) {
      const v = data[i];
      if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < -BigInt(Number.MAX_SAFE_INTEGER)) {
        throw new NpyError(`${file}: int64 value ${v} does not fit a double`);
      }
      out[i] = Number(v);
    }
    data = out;
  }
  return { dtype: header.descr, shape: header.shape, data };
}

function readNpy(file) {
  let buf;
  try {
    buf = fs.readFileSync(file);
  } catch (e) {
    throw new NpyError(`cannot read ${file}: ${e.code || e.message}`);
  }
  return parseNpy(buf, file);
}

/** Serialise a typed array as .npy (version 1.0), for tests and tools. */
function toNpy(data, shape) {
  const descr = data instanceof Float32Array ? '<f4'
    : data instanceof Float64Array ? '<f8'
      : data instanceof Int32Array ? '<i4'
        : data instanceof BigInt64Array ? '<i8'
          : data instanceof Uint8Array ? '|u1' : null;
  if (!descr) throw new NpyError('toNpy: unsupported array type');
  const shapeText = shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(', ')})`;
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': ${shapeText}, }`;
  const total = 10 + header.length + 1;
  header += ' '.repeat((64 - (total % 64)) % 64) + '\n';
  const pre = Buffer.alloc(10);
  MAGIC.copy(pre, 0);
  pre[6] = 1;
  pre[7] = 0;
  pre.writeUInt16LE(header.length, 8);
  return Buffer.concat([pre, Buffer.from(header, 'latin1'), Buffer.from(data.buffer, data.byteOffset, data.byteLength)]);
}

module.exports = { parseNpy, readNpy, toNpy, NpyError };
