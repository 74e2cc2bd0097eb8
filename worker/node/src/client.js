'use strict';
/**
 * The worker's client of a paramserver (the Node twin of paramserver/client.py, the Python SDK).
 *
 * Every call has a deadline: unary calls through gRPC's deadline, stream operations through a
 * timer that cancels the stream. The data plane keeps one PushGradient and one PullParams stream
 * open and reuses it for every push and pull; a stream that fails or times out is dropped and
 * reopened by the next operation. Those streams go over the server's TCP data plane (tcp.js) once
 * a Join or Heartbeat told its port, else (and for a while after it could not be reached) over
 * gRPC. Errors are PsError with the gRPC status code, the server's message (for people) and its
 * ErrorInfo (for programs: `reason`, `info`), made in one place (callError) from a gRPC call's
 * end (the ErrorInfo in its `paramserver-error-bin` trailer) or a TCP STATUS frame's Status;
 * `retryable` is true for UNAVAILABLE and DEADLINE_EXCEEDED. A message over this worker's own
 * --max-message-bytes is an OverClientLimit.
 */

const TCP_RETRY_SECONDS = [30, 600]; // after the data plane could not be reached: gRPC this long, doubling
const TCP_GREET_SECONDS = 3; // longest wait for the data plane's answer to the hello (at most the timeout)
// ps-server's default --max-wait-seconds: how long a pull of maxWait 0 ("the server's limit") is
// taken to park until a Join or Heartbeat says the server's own (JoinResponse.max_wait).
const SERVER_MAX_WAIT = 60;

const { loadContract, messages } = require('./proto');
const { encodeTensors, TensorAssembler } = require('./tensors');
const { TcpCall, dialHost } = require('./tcp');
const net = require('net');
const tls = require('tls');

const { grpc, pkg } = loadContract();
const Status = grpc.status;
const codecs = messages();

/** The gRPC trailer that carries a refusal's serialized paramserver.v1.ErrorInfo. */
const ERROR_TRAILER = 'paramserver-error-bin';

/**
 * A failed call. `code`: its gRPC status code; `details`: the message, for people (never match
 * its text); `info`: the server's ErrorInfo as a plain object (defaults filled in, enums as names,
 * longs as Number; an empty one, reason ERROR_REASON_UNSPECIFIED, when the failure is not the
 * server's refusal, e.g. a timeout or a broken connection); `reason`: info.reason, e.g.
 * 'ERROR_REASON_CLOCK_AHEAD'; `method`: the RPC.
 */
class PsError extends Error {
  constructor(code, details, info = null, method = '') {
    super(`${method ? `${method}: ` : ''}${Status[code] || code}: ${details}`);
    this.code = code;
    this.codeName = Status[code] || String(code);
    this.details = details;
    this.info = info || codecs.ErrorInfo.decode(Buffer.alloc(0));
    this.method = method;
  }

  get reason() {
    return this.info.reason;
  }

  get retryable() {
    return this.code === Status.UNAVAILABLE || this.code === Status.DEADLINE_EXCEEDED;
  }
}

/**
 * A message over this worker's own limit (--max-message-bytes): one it sends or receives, refused
 * by gRPC's own check or by the TCP data plane's check of a frame it receives (the Python SDK's
 * OverClientLimit). Not the run's failure: the same message would come again, so the worker gives
 * its rank back and says which flag to raise (trainer.js).
 */
class OverClientLimit extends PsError {}

/**
 * grpc-js's own refusals of a message over this side's limits (what it sends, what it receives,
 * what it decompresses): RESOURCE_EXHAUSTED with no trailer, told apart from the server's only by
 * their text (ps-server's gRPC says 'SERVER: ...', pinned by tests/unit/test_client_errors.py, and
 * these by test/errors.test.js, which runs the real grpc-js).
 */
const GRPC_OWN_LIMIT = /^(Received message larger than max|Attempted to send message with a size larger than|Received message that decompresses to a size larger than)/;

/** The ErrorInfo in a gRPC call's trailing metadata (`paramserver-error-bin`); null if none or unreadable. */
function trailerInfo(metadata) {
  if (!metadata || typeof metadata.get !== 'function') return null;
  const [value] = metadata.get(ERROR_TRAILER);
  if (!Buffer.isBuffer(value)) return null;
  try {
    return codecs.ErrorInfo.decode(value);
  } catch {
    return null;
  }
}

/**
 * The one place a call's end becomes a PsError. `end`: a grpc-js error or status
 * ({code, details, metadata}: the ErrorInfo is in the trailer), a TcpCall status
 * ({code, details, info}: from the STATUS frame's Status; `overClientLimit` when a frame was over
 * this worker's limit), or any other Error (UNKNOWN).
 */
function callError(end, method = '') {
  if (end instanceof PsError) return end;
  const code = end.code === undefined ? Status.UNKNOWN : end.code;
  const info = end.info || trailerInfo(end.metadata);
  const details = end.details || end.message || '';
  if (code === Status.RESOURCE_EXHAUSTED && !info) { // a size check's, not a refusal of the server's (it sends its ErrorInfo)
    if (end.overClientLimit || GRPC_OWN_LIMIT.test(details)) {
      return new OverClientLimit(code, `a message larger than this worker's limit (${details}): raise it (--max-message-bytes)`,
        null, method);
    }
    if (details.startsWith('SERVER: ')) {
      return new PsError(code, `a message larger than the server's limit (${details}): raise it (ps-server `
        + '--max-message-bytes), or send less', null, method);
    }
  }
  return new PsError(code, details, info, method);
}

function duration(seconds) {
  const s = Math.max(0, seconds);
  const whole = Math.floor(s);
  return { seconds: whole, nanos: Math.round((s - whole) * 1e9) };
}

function durationSeconds(d, fallback = 0) {
  if (!d) return fallback;
  return Number(d.seconds || 0) + Number(d.nanos || 0) / 1e9 || fallback;
}

/**
 * `maxWait` of a call to `method`; a PsError INVALID_ARGUMENT (nothing is sent) unless it is a
 * finite number of seconds >= 0 (`zero`: what 0 means).
 */
function waitSeconds(maxWait, method, what, zero) {
  if (!(Number.isFinite(maxWait) && maxWait >= 0)) {
    throw new PsError(Status.INVALID_ARGUMENT, `maxWait=${maxWait}: give the seconds the server may ${what}, a finite number >= 0 `
      + `(0: ${zero})`, codecs.ErrorInfo.decode(codecs.ErrorInfo.encode({ reason: 'ERROR_REASON_INVALID_REQUEST' })), method);
  }
  return maxWait;
}

function nowTimestamp() {
  const ms = Date.now();
  return { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 };
}

function channelOptions(maxMessageBytes) {
  return {
    'grpc.max_receive_message_length': maxMessageBytes,
    'grpc.max_send_message_length': maxMessageBytes,
    'grpc.enable_retries': 0,
    'grpc.keepalive_time_ms': 20000,
    // Reconnect quickly after a server restart; the worker adds its own backoff with jitter.
    'grpc.initial_reconnect_backoff_ms': 100,
    'grpc.max_reconnect_backoff_ms': 2000,
  };
}

/**
 * One long-lived bidirectional stream that carries one operation at a time. `open()` returns
 * {call, key}; before an operation, a stream whose key is no longer `wanted()` (the data plane's
 * port changed, or TCP was given up or is back) is dropped and opened anew, between operations.
 */
class BidiStream {
  constructor(open, method, wanted = () => 0) {
    this.open = open;
    this.method = method;
    this.wanted = wanted;
    this.st = null;
    this.lock = Promise.resolve();
  }

  _start() {
    const { call, key } = this.open();
    const st = { call, key, queue: [], waiter: null, done: null, drains: new Set() };
    const settle = () => {
      if (st.done) {
        for (const reject of st.drains) reject(st.done);
        st.drains.clear();
      }
      if (!st.waiter) return;
      const w = st.waiter;
      if (st.queue.length) {
        st.waiter = null;
        w.resolve(st.queue.shift());
      } else if (st.done) {
        st.waiter = null;
        if (st.done.code === Status.OK) w.resolve(null);
        else w.reject(st.done);
      }
    };
    const finish = (end) => {
      if (!st.done) st.done = end; // how the call ended, as the transport says it (see callError)
      settle();
    };
    call.on('data', (m) => {
      st.queue.push(m);
      settle();
    });
    call.on('error', finish);
    call.on('status', finish);
    call.on('end', () => {
      // 'status' follows with the real outcome; nothing to do here.
    });
    st.read = () => new Promise((resolve, reject) => {
      st.waiter = { resolve, reject };
      settle();
    });
    st.write = (msg) => new Promise((resolve, reject) => {
      if (st.done) {
        reject(st.done);
        return;
      }
      if (call.write(msg)) {
        resolve();
        return;
      }
      // Back-pressure: wait for 'drain', or fail as soon as the call ends.
      st.drains.add(reject);
      call.once('drain', () => {
        st.drains.delete(reject);
        resolve();
      });
    });
    return st;
  }

  /** Write `requests`, read one response (or until one has `final` set), all within `timeoutS`. */
  exchange(requests, timeoutS, untilFinal) {
    const run = this.lock.then(() => this._exchange(requests, timeoutS, untilFinal));
    this.lock = run.catch(() => {});
    return run;
  }

  async _exchange(requests, timeoutS, untilFinal) {
    if (this.st && this.st.key !== this.wanted()) this._drop(this.st);
    if (!this.st || this.st.done) this.st = this._start();
    const st = this.st;
    let timer = null;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new PsError(Status.DEADLINE_EXCEEDED, `no answer within ${timeoutS.toFixed(1)}s`, null, this.method)), timeoutS * 1000);
    });
    const work = (async () => {
      for (const req of requests) await st.write(req);
      const out = [];
      for (;;) {
        const resp = await st.read();
        if (resp === null) throw new PsError(Status.UNAVAILABLE, 'stream closed by the server', null, this.method);
        out.push(resp);
        if (!untilFinal || resp.final) return out;
      }
    })();
    try {
      return await Promise.race([work, timeout]);
    } catch (e) {
      this._drop(st);
      throw callError(e, this.method);
    } finally {
      clearTimeout(timer);
      work.catch(() => {});
    }
  }

  _drop(st) {
    if (this.st === st) this.st = null;
    try {
      st.call.cancel();
    } catch {
      // already finished
    }
  }

  /** Cancel the stream (an operation in flight fails with CANCELLED). */
  close() {
    if (this.st) this._drop(this.st);
  }
}

/**
 * TLS credentials that verify the server's certificate against an IP address without sending it
 * as the TLS ServerName (SNI). grpc-js sets the ServerName to the target's host, an IP address
 * too, and Node warned once per worker (DEP0123: RFC 6066 has no IP address names). The handshake
 * is grpc-js's own (ALPN h2, the peer verified and unauthorized refused), the certificate checked
 * for `name` as tls.connect checks a host: its IP SANs.
 */
class IpAddressCredentials extends grpc.ChannelCredentials {
  constructor(name, { ca, key, cert }) {
    super();
    this.options = {
      secureContext: tls.createSecureContext({ ca: ca || undefined, key: key || undefined, cert: cert || undefined }),
      ALPNProtocols: ['h2'],
      checkServerIdentity: (_host, peer) => tls.checkServerIdentity(name, peer),
    };
  }

  _isSecure() {
    return true;
  }

  _equals(other) {
    return other === this;
  }

  _createSecureConnector(_target, _options, callCredentials) {
    const options = this.options;
    return {
      connect: (socket) => new Promise((resolve, reject) => {
        const secured = tls.connect({ socket, ...options }, () => {
          if (secured.authorized) resolve({ socket: secured, secure: true });
          else reject(secured.authorizationError);
        });
        secured.on('error', reject);
      }),
      waitForReady: () => Promise.resolve(),
      getCallCredentials: () => callCredentials || grpc.CallCredentials.createEmpty(),
      destroy: () => {},
    };
  }
}

/** The channel credentials of `security` (config.js securityOf) for the server at `address`. */
function channelCredentials(address, security) {
  if (!security.tls) return grpc.credentials.createInsecure();
  const name = security.serverName || dialHost(address);
  if (name && net.isIP(name)) return new IpAddressCredentials(name, security);
  return grpc.credentials.createSsl(security.ca || null, security.key || null, security.cert || null);
}

class PsClient {
  /**
   * `new PsClient("host:port", {timeout, chunkBytes, maxMessageBytes, security})`; every method has
   * a deadline. `security` = {tls, ca, cert, key, token, serverName} (see config.js securityOf):
   * TLS when `tls`, and `authorization: Bearer <token>` metadata on every call when `token`.
   */
  constructor(address, { timeout = 30, chunkBytes = 1 << 20, maxMessageBytes = 64 << 20, security = {}, dataPlane = true,
    log = null } = {}) {
    this.address = address;
    this.options = { timeout, chunkBytes, maxMessageBytes, security, dataPlane, log };
    this.maxMessageBytes = maxMessageBytes;
    this.log = log;
    this.tcpHost = dataPlane && !security.tls && !security.token ? dialHost(address) : null;
    this.dataPort = 0; // the server's TCP data plane port, as the last Join or Heartbeat told
    this.tcpRetryAt = 0;
    this.tcpBackoff = TCP_RETRY_SECONDS[0];
    this.streamsOpened = { tcp: 0, grpc: 0, tcp_unreachable: 0 };
    this.timeout = timeout;
    this.chunkBytes = chunkBytes;
    this.serverMaxWait = SERVER_MAX_WAIT; // the longest the server parks a pull, as the last Join or Heartbeat said
    const creds = channelCredentials(address, security);
    const opts = channelOptions(maxMessageBytes);
    if (security.serverName) opts['grpc.ssl_target_name_override'] = security.serverName;
    this.metadata = () => {
      const md = new grpc.Metadata();
      if (security.token) md.set('authorization', `Bearer ${security.token}`);
      return md;
    };
    this.workers = new pkg.WorkerService(address, creds, opts);
    // Share one channel between the stubs.
    const channel = this.workers.getChannel();
    this.data = new pkg.ParameterService(address, creds, { ...opts, channelOverride: channel });
    this.runs = new pkg.RunService(address, creds, { ...opts, channelOverride: channel });
    const wanted = () => this.wantedPort();
    this.pushStream = new BidiStream(() => this.openData('PushGradient'), 'PushGradient', wanted);
    this.pullStream = new BidiStream(() => this.openData('PullParams'), 'PullParams', wanted);
    this.inflight = new Set();
  }

  /**
   * A client of another server configured as this one (timeout, sizes, security, data plane): a
   * shard of a sharded run. `dataPort`: its TCP data plane's port (0 = none: gRPC).
   */
  sibling(address, dataPort = 0) {
    const c = new PsClient(address, this.options);
    c.dataPortIs(dataPort);
    c.serverMaxWait = this.serverMaxWait; // (server 0's: as Join says)
    return c;
  }

  /** What the next push or pull stream goes over: 'tcp' or 'grpc'. */
  transport() {
    return this.tcpHost && this.dataPort && Date.now() >= this.tcpRetryAt ? 'tcp' : 'grpc';
  }

  wantedPort() {
    return this.transport() === 'tcp' ? this.dataPort : 0;
  }

  openData(method) {
    if (this.transport() === 'tcp') {
      const port = this.dataPort;
      const call = new TcpCall(this.tcpHost, port, method, {
        maxBytes: this.maxMessageBytes,
        greetSeconds: Math.min(this.timeout, TCP_GREET_SECONDS), // (the Python SDK's connect timeout)
        onUnreachable: (why) => this.tcpUnreachable(port, why),
        onGreeted: () => {
          if (this.log && (!this.tcpGreeted || this.tcpBackoff > TCP_RETRY_SECONDS[0])) {
            this.log.info(`pushes and pulls go over the TCP data plane at ${this.tcpHost}:${port}`);
          }
          this.tcpGreeted = true;
          this.tcpBackoff = TCP_RETRY_SECONDS[0];
        },
      });
      this.streamsOpened.tcp += 1;
      return { call, key: port };
    }
    this.streamsOpened.grpc += 1;
    return { call: this.data[method](this.metadata()), key: 0 };
  }

  /** The data plane could not be reached: this operation fails (retryable), the next ones use gRPC for a while. */
  tcpUnreachable(port, why) {
    if (port !== this.dataPort) return;
    this.streamsOpened.tcp_unreachable += 1;
    this.tcpRetryAt = Date.now() + this.tcpBackoff * 1000;
    if (this.log) {
      this.log.warning(`TCP data plane at ${this.tcpHost}:${port} unreachable (${why}); using gRPC, trying again in ${this.tcpBackoff}s`);
    }
    this.tcpBackoff = Math.min(2 * this.tcpBackoff, TCP_RETRY_SECONDS[1]);
  }

  dataPortIs(port) {
    if (port && port !== this.dataPort) this.tcpRetryAt = 0;
    this.dataPort = port || 0;
  }

  unary(stub, method, request, timeoutS) {
    return new Promise((resolve, reject) => {
      const deadline = new Date(Date.now() + (timeoutS || this.timeout) * 1000);
      const call = stub[method](request, this.metadata(), { deadline }, (err, resp) => {
        this.inflight.delete(call);
        if (err) reject(callError(err, method));
        else resolve(resp);
      });
      this.inflight.add(call);
    });
  }

  /** Cancel every call in flight (streams and unary calls); the client stays usable. */
  cancelAll() {
    this.pushStream.close();
    this.pullStream.close();
    for (const call of this.inflight) call.cancel();
    this.inflight.clear();
  }

  close() {
    this.cancelAll();
    this.workers.close();
  }

  // ---------------------------------------------------------------- workers
  /** Safe to retry with the same `joinToken` (random, drawn anew once a Join is answered): a Join
   * the server took whose answer was lost is answered with the rank it took, not a second one. */
  join(workerName, runId = '', maxWait = 10, joinToken = '') {
    try {
      waitSeconds(maxWait, 'Join', 'hold the call when there is no work', 'answer at once');
    } catch (e) {
      return Promise.reject(e);
    }
    const req = { worker_name: workerName, run_id: runId, max_wait: duration(maxWait), join_token: joinToken };
    return this.unary(this.workers, 'Join', req, maxWait + this.timeout).then((resp) => {
      if (resp.assignment) {
        this.dataPortIs(Number(resp.data_port));
        this.serverMaxWait = durationSeconds(resp.max_wait, this.serverMaxWait);
      }
      return resp;
    });
  }

  heartbeat(runId, rank, incarnation, clock) {
    return this.unary(this.workers, 'Heartbeat', { run_id: runId, rank, incarnation, clock }).then((resp) => {
      this.dataPortIs(Number(resp.data_port));
      this.serverMaxWait = durationSeconds(resp.max_wait, this.serverMaxWait);
      return resp;
    });
  }

  reportMetrics(runId, rank, incarnation, points, pullsSkipped) {
    const req = { run_id: runId, rank, incarnation, points, pulls_skipped: pullsSkipped };
    return this.unary(this.workers, 'ReportMetrics', req);
  }

  /** Give the rank back; `timeoutS` bounds the call (default: the client's timeout). */
  leave(runId, rank, incarnation, reason, message = '', timeoutS = undefined) {
    return this.unary(this.workers, 'Leave', { run_id: runId, rank, incarnation, reason, message }, timeoutS);
  }

  // ---------------------------------------------------------------- runs (tools, tests)
  getRun(runId) {
    return this.unary(this.runs, 'GetRun', { run_id: runId }).then((r) => r.run);
  }

  // ---------------------------------------------------------------- data plane
  /**
   * Push the gradient of iteration `clock`: `grads` is [[name, Float32Array, shape], ...].
   * Safe to retry with the same arguments (the server deduplicates on the key).
   */
  async push(runId, rank, incarnation, clock, grads, loss = 0, timeoutS = undefined) {
    const batches = encodeTensors(grads, this.chunkBytes);
    const requests = batches.map((tensors, i) => ({
      run_id: runId, rank, incarnation, clock, tensors, final: i === batches.length - 1, loss,
    }));
    const [resp] = await this.pushStream.exchange(requests, timeoutS || this.timeout, false);
    return resp;
  }

  /**
   * Pull parameters for iteration `clock` into `into` ({name: Float32Array}, reused when shapes
   * match). The deadline is maxWait (how long the server may park it; undefined: the client's
   * timeout; 0: the server's limit, serverMaxWait) plus the client's timeout.
   * Returns {guaranteed_clock, version, run_state, staleness, tensors, shapes}; `staleness`: the
   * run's bound the answer says (UpdateRun, a schedule), undefined when it says none.
   */
  async pull(runId, rank, incarnation, clock, { into = {}, names = [], maxWait = undefined, timeoutS = undefined } = {}) {
    const wait = waitSeconds(maxWait === undefined ? this.timeout : maxWait, 'PullParams', 'park the pull', 'the server\'s limit');
    const req = { run_id: runId, rank, incarnation, clock, names, max_wait: duration(wait) };
    const responses = await this.pullStream.exchange([req], timeoutS || (wait || this.serverMaxWait) + this.timeout, true);
    const asm = new TensorAssembler(into);
    try {
      for (const resp of responses) for (const chunk of resp.tensors) asm.add(chunk);
      asm.finish();
    } catch (e) {
      throw new PsError(Status.INTERNAL, `bad tensors from the server: ${e.message}`, null, 'PullParams');
    }
    const last = responses[responses.length - 1];
    return {
      guaranteed_clock: Number(last.guaranteed_clock),
      version: Number(last.version),
      run_state: last.run_state,
      staleness: last.staleness,
      tensors: asm.out,
      shapes: asm.shapes,
    };
  }
}

module.exports = {
  SERVER_MAX_WAIT, OverClientLimit, PsClient, PsError, Status, ERROR_TRAILER, callError, trailerInfo, duration, durationSeconds, nowTimestamp, channelOptions,
};
