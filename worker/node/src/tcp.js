'use strict';
/**
 * The TCP data plane (the framing is specified in the .proto's ParameterService comment and in
 * protos/paramserver/v1/tcp.py): a PushGradient or PullParams stream on a plain socket, with the
 * part of a grpc-js stream call's interface that client.js's BidiStream uses: write(msg) ->
 * bool and 'drain', events 'data' (a response message) and 'status' ({code, details, info}: the
 * stream ended; `info` is the server's ErrorInfo, where gRPC has the `paramserver-error-bin`
 * trailer), cancel().
 *
 * Version 2 of the framing: the body of a STATUS frame is a serialized paramserver.v1.Status
 * (message and ErrorInfo). The messages are the contract's, (de)serialized by proto-loader
 * exactly as gRPC would (Status by proto.js's codec). The hello and the first frames are written
 * at once (the server reads in order); a server that answers anything but its echo of the hello
 * (another framing version, another service) makes `onUnreachable` fire, so the client can use
 * gRPC instead, and ends the stream with UNAVAILABLE (the operation is retried, over gRPC; a
 * refusal of UNIMPLEMENTED, another version, included: it never ends the operation as a refusal).
 * So does a hello refused with ERROR_REASON_STREAM_LIMIT (the server's data plane streams are as
 * many as it allows: "use gRPC, or retry", as the proto says; retrying it would be refused again).
 */

const net = require('net');
const { EventEmitter } = require('events');
const { loadContract, messages } = require('./proto');

const { grpc, definition } = loadContract();
const codecs = messages();
const Status = grpc.status;

const MAGIC = Buffer.from('PSDP');
const VERSION = 2;
const METHODS = { PushGradient: 1, PullParams: 2 };
const MESSAGE = 1;
const STATUS = 2;
const HEADER = 16;

function hello(method) {
  const b = Buffer.alloc(8);
  MAGIC.copy(b, 0);
  b.writeUInt8(VERSION, 4);
  b.writeUInt8(METHODS[method], 5);
  return b;
}

function frameHeader(kind, status, length) {
  const h = Buffer.alloc(HEADER);
  h.writeUInt8(kind, 0);
  h.writeUInt32LE(status, 4);
  h.writeBigUInt64LE(BigInt(length), 8);
  return h;
}

class TcpCall extends EventEmitter {
  /**
   * `greetSeconds`: how long the server may take to answer the hello (connecting included); a port
   * that does not answer in time (a firewall dropping its packets, a proxy holding the connection)
   * is unreachable.
   */
  constructor(host, port, method, { maxBytes = 64 << 20, greetSeconds = 3, onUnreachable = () => {}, onGreeted = () => {} } = {}) {
    super();
    const m = definition['paramserver.v1.ParameterService'][method];
    this.serialize = m.requestSerialize;
    this.deserialize = m.responseDeserialize;
    this.hello = hello(method);
    this.maxBytes = maxBytes;
    this.onUnreachable = onUnreachable;
    this.onGreeted = onGreeted;
    this.chunks = [];
    this.have = 0;
    this.greeted = false;
    this.refused = false; // the server answered the hello with a STATUS frame
    this.ended = false;
    this.sock = net.connect({ host, port, noDelay: true });
    this.sock.setKeepAlive(true, 2000);
    this.sock.on('data', (d) => this._received(d));
    this.sock.on('drain', () => this.emit('drain'));
    this.sock.on('error', (e) => {
      if (!this.greeted) this.onUnreachable(`${host}:${port}: ${e.code || e.message}`);
      this._end(Status.UNAVAILABLE, `the data plane connection broke (${e.code || e.message})`);
    });
    this.sock.on('close', () => this._end(Status.UNAVAILABLE, 'the data plane connection was closed'));
    this.greetTimer = setTimeout(() => {
      this.onUnreachable(`${host}:${port}: no answer to the hello within ${greetSeconds}s`);
      this._end(Status.UNAVAILABLE, `the data plane did not answer the hello within ${greetSeconds}s`);
    }, greetSeconds * 1000);
    this.sock.write(this.hello);
  }

  write(msg) {
    const body = this.serialize(msg);
    this.sock.write(frameHeader(MESSAGE, 0, body.length));
    return this.sock.write(body);
  }

  /** As a grpc-js call's cancel(): an operation in flight ends with CANCELLED. */
  cancel() {
    this._end(Status.CANCELLED, 'Cancelled on client');
  }

  /** The first `n` received bytes as one Buffer; `take` also drops them. */
  _bytes(n, take) {
    const parts = [];
    let need = n;
    let i = 0;
    while (need > 0) {
      const c = this.chunks[i];
      if (c.length <= need) {
        parts.push(c);
        need -= c.length;
        i += 1;
      } else {
        parts.push(c.subarray(0, need));
        if (take) this.chunks[i] = c.subarray(need);
        need = 0;
      }
    }
    if (take) {
      this.chunks.splice(0, i);
      this.have -= n;
    }
    return parts.length === 1 ? parts[0] : Buffer.concat(parts, n);
  }

  _received(data) {
    this.chunks.push(data);
    this.have += data.length;
    while (!this.ended) {
      if (!this.greeted) {
        if (this.have < this.hello.length) return;
        const echo = this._bytes(this.hello.length, false);
        if (echo.equals(this.hello)) {
          this._bytes(this.hello.length, true);
          this.greeted = true;
          clearTimeout(this.greetTimer);
          this.onGreeted();
          continue;
        }
        if (echo.readUInt8(0) !== STATUS || echo.subarray(0, 4).equals(MAGIC)) {
          this.onUnreachable('the port does not speak this data plane');
          this._end(Status.UNAVAILABLE, 'the data plane answered something else than its hello');
          return;
        }
        this.greeted = true; // refused: a STATUS frame follows in place of the echo
        this.refused = true;
        clearTimeout(this.greetTimer);
      }
      if (this.have < HEADER) return;
      const head = this._bytes(HEADER, false);
      const kind = head.readUInt8(0);
      const status = head.readUInt32LE(4);
      const length = Number(head.readBigUInt64LE(8));
      if (length > this.maxBytes) {
        this._end(Status.RESOURCE_EXHAUSTED, `an answer of ${length} bytes, over ${this.maxBytes}`, null, true);
        return;
      }
      if (this.have < HEADER + length) return;
      this._bytes(HEADER, true);
      const body = this._bytes(length, true);
      if (kind === MESSAGE) {
        this.emit('data', this.deserialize(body));
      } else if (kind === STATUS) {
        const { details, info } = statusBody(status, body);
        if (status === Status.UNIMPLEMENTED) {
          // Another version of the framing (the refusal of the hello): gRPC from now on, and this
          // operation fails as when the port cannot be reached, retryably (the server read none of it).
          this.onUnreachable(details);
          this._end(Status.UNAVAILABLE, `the data plane speaks another version of the framing (${details}): using gRPC`);
        } else if (this.refused && info && info.reason === 'ERROR_REASON_STREAM_LIMIT') {
          this.onUnreachable(details); // full: gRPC for a while (retried, the operation is not refused)
          this._end(Status.UNAVAILABLE, `the data plane takes no more streams (${details}): using gRPC`, info);
        } else {
          this._end(status, details, info);
        }
      } else {
        this._end(Status.UNAVAILABLE, `unknown frame kind ${kind} from the data plane`);
      }
    }
  }

  /**
   * The stream ended: 'status' with {code, details, info}; `info` only from a STATUS frame; and
   * `overClientLimit: true` when a frame was over this worker's limit (client.js callError).
   */
  _end(code, details, info = null, overClientLimit = false) {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.greetTimer);
    this.emit('status', { code, details, info, ...(overClientLimit ? { overClientLimit } : {}) });
    this.sock.destroy();
  }
}

/**
 * {details, info} of a STATUS frame whose header says `code`: its body is a serialized Status.
 * A body that does not parse as one, or parses to another code (a version 1 server refusing
 * this hello sends its bare UTF-8 message), is taken as that text; `info` is null when the
 * frame has no ErrorInfo.
 */
function statusBody(code, body) {
  try {
    const s = codecs.Status.decode(body);
    if (s.code === code) return { details: s.message, info: s.error };
  } catch {
    // not a Status: the text below
  }
  return { details: body.toString('utf8'), info: null };
}

/** The host part of a gRPC target (host:port, [v6]:port, dns:///host:port); null if none. */
function dialHost(address) {
  let a = address.startsWith('dns:///') ? address.slice('dns:///'.length) : address;
  if (a.startsWith('[')) {
    const end = a.indexOf(']');
    return end > 0 ? a.slice(1, end) : null;
  }
  const i = a.lastIndexOf(':');
  if (i <= 0) return null;
  const host = a.slice(0, i);
  a = a.slice(i + 1);
  if (host.includes(':') || !/^\d+$/.test(a) || ['unix', 'ipv4', 'ipv6'].includes(host)) return null;
  return host;
}

module.exports = { TcpCall, dialHost, hello, frameHeader, statusBody, MESSAGE, STATUS, VERSION };
