'use strict';
// Structured errors: a refusal's ErrorInfo reaches PsError (reason, info) from the gRPC trailer
// `paramserver-error-bin` and from the TCP data plane's STATUS frame, and the trainer branches on
// the reason, never on the message's text. No Python server: scripted sockets and grpc-js servers.
const test = require('node:test');
const assert = require('node:assert/strict');
const net = require('net');

const {
  OverClientLimit, PsClient, PsError, ERROR_TRAILER, callError, durationSeconds, trailerInfo,
} = require('../src/client');
const { frameHeader, MESSAGE, STATUS } = require('../src/tcp');
const { loadContract, messages } = require('../src/proto');
const { Trainer, Rewind, train } = require('../src/trainer');

const { grpc, pkg } = loadContract();
const codecs = messages();
const CLOCK_AHEAD = { reason: 'ERROR_REASON_CLOCK_AHEAD', next_clock: 3 };

/** Metadata as a server's trailer carries it: the serialized ErrorInfo under the binary key. */
function trailer(info) {
  const md = new grpc.Metadata();
  md.set(ERROR_TRAILER, codecs.ErrorInfo.encode(info));
  return md;
}

function quietLog() {
  const lines = [];
  const log = (level) => (m) => lines.push(`${level} ${m}`);
  return { lines, debug: log('debug'), info: log('info'), warning: log('warning'), error: log('error') };
}

test('the codecs load from protos/ with the well-known types, and give defaults, enum names and Numbers', () => {
  const root = codecs.Status.type.root;
  assert.equal(root.lookupType('paramserver.v1.JoinRequest').fields.max_wait.resolvedType.fullName, '.google.protobuf.Duration');
  assert.deepEqual(root.lookupType('google.protobuf.Timestamp').fieldsArray.map((f) => f.name), ['seconds', 'nanos']);
  assert.deepEqual(codecs.ErrorInfo.decode(Buffer.alloc(0)), {
    reason: 'ERROR_REASON_UNSPECIFIED', next_clock: 0, run_state: 'RUN_STATE_UNSPECIFIED', needed_min_clock: 0, ranks_behind: [],
  });
  // Bytes as protobuf (python: pb.Status(code=9, message="next", error=pb.ErrorInfo(reason=CLOCK_AHEAD, next_clock=3))).
  const python = Buffer.from('080912046e6578741a0408081003', 'hex');
  const s = codecs.Status.decode(python);
  assert.equal(s.code, 9);
  assert.equal(s.message, 'next');
  assert.equal(s.error.reason, 'ERROR_REASON_CLOCK_AHEAD');
  assert.equal(s.error.next_clock, 3);
  assert.equal(typeof s.error.next_clock, 'number');
  assert.deepEqual(codecs.Status.encode({ code: 9, message: 'next', error: CLOCK_AHEAD }), python);
});

test('a gRPC error with the ErrorInfo trailer becomes a PsError with reason and info', () => {
  const err = Object.assign(new Error('9 FAILED_PRECONDITION: whatever the text'), {
    code: grpc.status.FAILED_PRECONDITION,
    details: 'whatever the text',
    metadata: trailer({ reason: 'ERROR_REASON_STALENESS_BOUND', needed_min_clock: 4, ranks_behind: [1, 3] }),
  });
  const e = callError(err, 'PushGradient');
  assert.ok(e instanceof PsError);
  assert.equal(e.code, grpc.status.FAILED_PRECONDITION);
  assert.equal(e.details, 'whatever the text');
  assert.equal(e.method, 'PushGradient');
  assert.equal(e.reason, 'ERROR_REASON_STALENESS_BOUND');
  assert.equal(e.info.needed_min_clock, 4);
  assert.deepEqual(e.info.ranks_behind, [1, 3]);
  assert.equal(e.retryable, false);
});

test('no trailer, or one that does not parse: an empty ErrorInfo (reason UNSPECIFIED)', () => {
  const bad = new grpc.Metadata();
  bad.set(ERROR_TRAILER, Buffer.from([0xff, 0xff, 0xff]));
  assert.equal(trailerInfo(bad), null);
  for (const end of [{ code: 14, details: 'down', metadata: new grpc.Metadata() }, { code: 14, details: 'down', metadata: bad },
    { code: 14, details: 'down' }, new Error('boom')]) {
    const e = callError(end);
    assert.equal(e.reason, 'ERROR_REASON_UNSPECIFIED');
    assert.equal(e.info.next_clock, 0);
  }
  assert.equal(callError(new Error('boom')).code, grpc.status.UNKNOWN);
  const local = new PsError(grpc.status.DEADLINE_EXCEEDED, 'no answer within 1.0s');
  assert.equal(local.reason, 'ERROR_REASON_UNSPECIFIED');
  assert.equal(local.retryable, true);
});

/** A one-connection TCP data plane that accepts the hello and refuses the first request with `status`. */
function refusingDataPlane(code, message, error) {
  const body = codecs.Status.encode({ code, message, error });
  return new Promise((resolve) => {
    const srv = net.createServer((sock) => {
      let got = Buffer.alloc(0);
      let answered = false;
      sock.on('data', (d) => {
        got = Buffer.concat([got, d]);
        if (answered || got.length < 8 + 16) return;
        answered = true;
        sock.end(Buffer.concat([got.subarray(0, 8), frameHeader(STATUS, code, body.length), body]));
      });
      sock.on('error', () => {});
    });
    srv.listen(0, '127.0.0.1', () => resolve({ port: srv.address().port, close: () => srv.close() }));
  });
}

test('a STATUS frame with a Status body makes the push fail with a PsError carrying reason and info.next_clock', async () => {
  const srv = await refusingDataPlane(grpc.status.FAILED_PRECONDITION, 'push for clock 5: expected 3', CLOCK_AHEAD);
  const client = new PsClient('127.0.0.1:1', { timeout: 5 });
  client.dataPortIs(srv.port);
  try {
    assert.equal(client.transport(), 'tcp');
    const grads = [['w', Float32Array.from([1, 2]), [2]]];
    await assert.rejects(client.push('r', 0, 1, 5, grads, 0.5), (e) => {
      assert.ok(e instanceof PsError);
      assert.equal(e.code, grpc.status.FAILED_PRECONDITION);
      assert.equal(e.details, 'push for clock 5: expected 3');
      assert.equal(e.method, 'PushGradient');
      assert.equal(e.reason, 'ERROR_REASON_CLOCK_AHEAD');
      assert.equal(e.info.next_clock, 3);
      return true;
    });
    assert.equal(client.streamsOpened.tcp, 1);
  } finally {
    client.close();
    srv.close();
  }
});

/** A grpc-js server on 127.0.0.1 with the given service handlers; resolves to {address, close}. */
function grpcServer(service, handlers) {
  const server = new grpc.Server();
  server.addService(service, handlers);
  return new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, port) => {
      if (err) reject(err);
      else resolve({ address: `127.0.0.1:${port}`, close: () => server.forceShutdown() });
    });
  });
}

test('over gRPC the trailer reaches PsError: a unary call and a stream', async () => {
  const refusal = () => ({
    code: grpc.status.FAILED_PRECONDITION, details: 'some words', metadata: trailer(CLOCK_AHEAD),
  });
  const workers = await grpcServer(pkg.WorkerService.service, {
    Heartbeat: (call, callback) => callback(refusal()),
  });
  const data = await grpcServer(pkg.ParameterService.service, {
    PushGradient: (call) => call.once('data', () => call.emit('error', refusal())),
    PullParams: (call) => call.once('data', () => call.emit('error', refusal())),
  });
  const check = (method) => (e) => {
    assert.ok(e instanceof PsError, String(e));
    assert.equal(e.method, method);
    assert.equal(e.code, grpc.status.FAILED_PRECONDITION);
    assert.equal(e.details, 'some words');
    assert.equal(e.reason, 'ERROR_REASON_CLOCK_AHEAD');
    assert.equal(e.info.next_clock, 3);
    return true;
  };
  const unary = new PsClient(workers.address, { timeout: 5, dataPlane: false });
  const streams = new PsClient(data.address, { timeout: 5, dataPlane: false });
  try {
    await assert.rejects(unary.heartbeat('r', 0, 1, 5), check('Heartbeat'));
    await assert.rejects(streams.push('r', 0, 1, 5, [['w', Float32Array.from([1]), [1]]]), check('PushGradient'));
    await assert.rejects(streams.pull('r', 0, 1, 5, { maxWait: 1 }), check('PullParams'));
  } finally {
    unary.close();
    streams.close();
    workers.close();
    data.close();
  }
});

test('a data plane of another version (its hello refused with UNIMPLEMENTED): the operation is retried, over gRPC', { timeout: 10000 }, async () => {
  // The refusal comes in place of the echo, as a server of another framing version sends it.
  const body = codecs.Status.encode({ code: grpc.status.UNIMPLEMENTED, message: 'unsupported framing version 2',
    error: { reason: 'ERROR_REASON_UNSUPPORTED' } });
  const tcp = await new Promise((resolve) => {
    const srv = net.createServer((sock) => {
      sock.once('data', () => sock.end(Buffer.concat([frameHeader(STATUS, grpc.status.UNIMPLEMENTED, body.length), body])));
      sock.on('error', () => {});
    });
    srv.listen(0, '127.0.0.1', () => resolve({ port: srv.address().port, close: () => srv.close() }));
  });
  const pushes = [];
  const data = await grpcServer(pkg.ParameterService.service, {
    PushGradient: (call) => call.on('data', (req) => {
      pushes.push(Number(req.clock));
      call.write({ clock: Number(req.clock) + 1, min_clock: 0, run_state: 'RUN_STATE_RUNNING' });
    }),
  });
  const client = new PsClient(data.address, { timeout: 5 });
  client.dataPortIs(tcp.port);
  client.heartbeat = async () => ({ clock: 5, run_state: 'RUN_STATE_RUNNING' });
  const a = { run_id: 'r', rank: 0, incarnation: 1, start_clock: 5, spec: { staleness: 1, optimizer: {}, slowdown: {} } };
  const t = new Trainer(client, a, { slowdown: 1, timeoutSeconds: 5 }, quietLog());
  try {
    assert.equal(client.transport(), 'tcp');
    const ack = await t.call(() => client.push('r', 0, 1, 5, [['w', Float32Array.from([1]), [1]]]), 'push 5');
    assert.equal(ack.clock, 6);
    assert.deepEqual(pushes, [5]);
    assert.equal(client.transport(), 'grpc');
    assert.deepEqual(client.streamsOpened, { tcp: 1, grpc: 1, tcp_unreachable: 1 });
  } finally {
    client.close();
    data.close();
    tcp.close();
  }
});

test('a data plane port that never answers the hello (a firewall dropping it, a proxy holding it): gRPC after '
  + 'min(timeout, 3 s), as the Python SDK', { timeout: 20000 }, async () => {
  const held = [];
  const silent = await new Promise((resolve) => {
    const srv = net.createServer((sock) => { held.push(sock); sock.on('error', () => {}); }); // accepts, says nothing
    srv.listen(0, '127.0.0.1', () => resolve({ port: srv.address().port, close: () => { held.forEach((s) => s.destroy()); srv.close(); } }));
  });
  const data = await grpcServer(pkg.ParameterService.service, {
    PushGradient: (call) => call.on('data', (req) => call.write({ clock: Number(req.clock) + 1, run_state: 'RUN_STATE_RUNNING' })),
  });
  const client = new PsClient(data.address, { timeout: 5 });
  client.dataPortIs(silent.port);
  client.heartbeat = async () => ({ clock: 5, run_state: 'RUN_STATE_RUNNING' });
  const a = { run_id: 'r', rank: 0, incarnation: 1, start_clock: 5, spec: { staleness: 1, optimizer: {}, slowdown: {} } };
  const t = new Trainer(client, a, { slowdown: 1, timeoutSeconds: 5 }, quietLog());
  const start = Date.now();
  try {
    const ack = await t.call(() => client.push('r', 0, 1, 5, [['w', Float32Array.from([1]), [1]]]), 'push 5');
    assert.equal(ack.clock, 6);
    assert.equal(client.transport(), 'grpc');
    assert.deepEqual(client.streamsOpened, { tcp: 1, grpc: 1, tcp_unreachable: 1 });
    assert.ok(Date.now() - start < 3000 + 1500, `took ${Date.now() - start} ms: 3 s for the hello, then a retry`);
  } finally {
    client.close();
    data.close();
    silent.close();
  }
});

/** A Trainer at `clock` whose operations fail with `error`; heartbeats answer `hbClock`. */
function trainerAt(clock, hbClock = clock) {
  const client = {
    heartbeats: 0,
    heartbeat() {
      this.heartbeats += 1;
      return Promise.resolve({ clock: hbClock, run_state: 'RUN_STATE_RUNNING', data_port: 0 });
    },
    cancelAll() {},
  };
  const a = {
    run_id: 'r', rank: 0, incarnation: 1, start_clock: clock,
    spec: { staleness: 0, optimizer: {}, slowdown: {} },
  };
  const t = new Trainer(client, a, { slowdown: 1, timeoutSeconds: 1 }, quietLog());
  return { t, client };
}

test('the trainer rewinds to info.next_clock on ERROR_REASON_CLOCK_AHEAD, without a heartbeat', async () => {
  const { t, client } = trainerAt(5);
  const refused = new PsError(grpc.status.FAILED_PRECONDITION, 'any text at all', codecs.ErrorInfo.decode(codecs.ErrorInfo.encode(CLOCK_AHEAD)));
  await assert.rejects(t.call(() => Promise.reject(refused), 'push 5'), (e) => {
    assert.ok(e instanceof Rewind);
    assert.equal(e.clock, 3);
    return true;
  });
  assert.equal(client.heartbeats, 0);
  assert.match(t.log.lines.join('\n'), /going back from clock 5/);
});

test('a push refused by the staleness bound pulls again: it rewinds to its own clock (a restarted server lost updates its parameters held)', async () => {
  const { t, client } = trainerAt(5);
  const refused = new PsError(grpc.status.FAILED_PRECONDITION, 'any text', codecs.ErrorInfo.decode(
    codecs.ErrorInfo.encode({ reason: 'ERROR_REASON_STALENESS_BOUND', needed_min_clock: 4 }),
  ));
  await assert.rejects(t.call(() => Promise.reject(refused), 'push 5'), (e) => e instanceof Rewind && e.clock === 5);
  assert.equal(client.heartbeats, 0);
  assert.match(t.log.lines.join('\n'), /push 5 refused by the staleness bound/);
});

test('the trainer never reads the message: "next clock is" without the reason, or a next_clock ahead, ends the call', async () => {
  const { t, client } = trainerAt(5, 2);
  const text = new PsError(grpc.status.FAILED_PRECONDITION, 'push for clock 5: next clock is 3');
  await assert.rejects(t.call(() => Promise.reject(text), 'push 5'), (e) => e === text);
  const clockAhead = (next) => new PsError(grpc.status.FAILED_PRECONDITION, 'x', codecs.ErrorInfo.decode(
    codecs.ErrorInfo.encode({ reason: 'ERROR_REASON_CLOCK_AHEAD', next_clock: next }),
  ));
  const ahead = clockAhead(6);
  await assert.rejects(t.call(() => Promise.reject(ahead), 'push 5'), (e) => e === ahead);
  // Its own clock: a shard went back to a checkpoint without the push it acknowledged: do it again.
  await assert.rejects(t.call(() => Promise.reject(clockAhead(5)), 'push 5'), (e) => e instanceof Rewind && e.clock === 5);
  assert.equal(client.heartbeats, 0);
});

test('a retryable failure still resyncs via Heartbeat and rewinds when the server is behind', async () => {
  const { t, client } = trainerAt(5, 2);
  const down = new PsError(grpc.status.UNAVAILABLE, 'down');
  await assert.rejects(t.call(() => Promise.reject(down), 'push 5'), (e) => e instanceof Rewind && e.clock === 2);
  assert.equal(client.heartbeats, 1);
});

test('sent back, the trainer drops the points it had not reported yet of the clocks after (steps the server lost)', async () => {
  // (reported after the rewind, the run's history kept them over the clocks trained again: it keeps a clock's first point)
  const { t } = trainerAt(0);
  t.a.rank = 1; // (no evaluation at the end)
  t.spec.iterations = 12;
  t.config.reportSeconds = 60;
  let sentBack = false;
  t.step = async () => { // (a step's point, as step() records it after the push; back to 5 at clock 8)
    if (t.clock === 8 && !sentBack) {
      sentBack = true;
      throw new Rewind(5);
    }
    t.record(t.clock, sentBack ? 2 : 1, 0.01); // (loss 2: trained again)
    t.clock += 1;
    return -1;
  };
  const reported = [];
  t.report = async () => {
    reported.push(...t.pending.map((p) => [p.clock, p.loss]));
    t.pending = [];
  };
  await t.run();
  assert.equal(t.stats.rewinds, 1);
  assert.deepEqual(reported.map(([c]) => c), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
  assert.deepEqual(reported.map(([, loss]) => loss), [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]);
});

test('an answer that says a new staleness bound changes the cache rule from the next iteration', () => {
  const { t } = trainerAt(5);
  t.staleness = 1;
  t.learn({ clock: 6 }); // (an older server says nothing: unchanged)
  assert.equal(t.staleness, 1);
  assert.equal(t.cacheValid(3, 5), false); // 3 < 5 - 1
  t.learn({ clock: 6, staleness: 4, _staleness: 'staleness' });
  assert.equal(t.staleness, 4);
  assert.equal(t.cacheValid(3, 5), true);
  t.learn({ staleness: -1 });
  assert.equal(t.staleness, null);
  assert.match(t.log.lines.join('\n'), /staleness is now unbounded/);
});

test('a pull\'s answer says the bound too: the trainer learns it there, as from a push\'s', { timeout: 10000 }, async () => {
  const { t } = trainerAt(5);
  t.staleness = 4;
  t.plane = { pull: async () => ({ guaranteed_clock: 4, version: 9, run_state: 'RUN_STATE_RUNNING', staleness: 1 }) };
  assert.equal(await t.pull(5, {}), 4);
  assert.equal(t.staleness, 1);
  assert.equal(t.cacheValid(4, 6), false, 'parameters of clock 4 are too old for clock 6 under s = 1');
});

test('PsClient.pull returns the bound its answer says (PullParamsResponse.staleness), none when it says none', { timeout: 10000 }, async () => {
  let said = 3;
  const data = await grpcServer(pkg.ParameterService.service, {
    PullParams: (call) => call.on('data', (req) => call.write({
      guaranteed_clock: req.clock, final: true, run_state: 'RUN_STATE_RUNNING', ...(said === null ? {} : { staleness: said }),
    })),
  });
  const client = new PsClient(data.address, { timeout: 5, dataPlane: false });
  try {
    assert.equal((await client.pull('r', 0, 1, 2, { maxWait: 1 })).staleness, 3);
    said = -1;
    assert.equal((await client.pull('r', 0, 1, 2, { maxWait: 1 })).staleness, -1);
    said = 0;
    assert.equal((await client.pull('r', 0, 1, 2, { maxWait: 1 })).staleness, 0);
    said = null;
    assert.equal((await client.pull('r', 0, 1, 2, { maxWait: 1 })).staleness, undefined);
  } finally {
    client.close();
    data.close();
  }
});

test('a straggler sleeps (factor - 1) times its computation, not the time it waited for others', async () => {
  const { t } = trainerAt(0);
  t.slowdown = 3;
  t.specs = [];
  t.sampler = { batch: () => [] };
  t.gather = () => ({ X: null, y: null, B: 1 });
  t.model = { lossAndGrad: () => { const end = performance.now() + 20; while (performance.now() < end); return { loss: 1, grads: {} }; } };
  t.pull = async () => { await new Promise((r) => setTimeout(r, 300)); return 0; }; // parked by the bound
  t.plane = { push: async (run, rank, inc, c) => ({ clock: c + 1, run_state: 'RUN_STATE_RUNNING' }) };
  t.report = async () => {};
  t.config.reportSeconds = 1000;
  const start = performance.now();
  await t.step({}, -1);
  const took = performance.now() - start;
  assert.ok(took >= 300 + 20 + 35, `took ${took} ms: the sleep is about 2 x 20 ms`);
  assert.ok(took < 300 + 20 + 2 * 320 - 200, `took ${took} ms: the 300 ms wait was counted as work`);
});

test('a pull of maxWait 0 (the server\'s limit, as Join says it) waits for that limit, not only the client\'s timeout', { timeout: 10000 }, async () => {
  const server = new grpc.Server();
  const asked = [];
  server.addService(pkg.WorkerService.service, {
    Join: (call, callback) => callback(null, {
      assignment: { run_id: 'r', rank: 0, incarnation: 1 }, max_wait: { seconds: 2, nanos: 500000000 },
    }),
  });
  server.addService(pkg.ParameterService.service, {
    PullParams: (call) => call.on('data', (req) => {
      asked.push(durationSeconds(req.max_wait));
      setTimeout(() => call.write({ guaranteed_clock: req.clock, final: true, run_state: 'RUN_STATE_RUNNING' }), 900);
    }),
  });
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p)));
  });
  const client = new PsClient(`127.0.0.1:${port}`, { timeout: 0.4, dataPlane: false });
  try {
    await client.join('w', 'r', 0);
    assert.equal(client.serverMaxWait, 2.5);
    const got = await client.pull('r', 0, 1, 3, { maxWait: 0 }); // answered after 0.9 s: within 2.5 + 0.4
    assert.equal(got.guaranteed_clock, 3);
    assert.deepEqual(asked, [0]);
    for (const bad of [-1, Infinity, NaN]) {
      await assert.rejects(client.pull('r', 0, 1, 3, { maxWait: bad }), (e) => {
        assert.equal(e.code, grpc.status.INVALID_ARGUMENT);
        assert.equal(e.reason, 'ERROR_REASON_INVALID_REQUEST');
        assert.match(e.details, /maxWait=.*: .* a finite number >= 0 \(0: the server's limit\)/);
        return true;
      });
    }
    for (const bad of [-1, Infinity, NaN]) {
      await assert.rejects(client.join('w', 'r', bad), (e) => {
        assert.equal(e.code, grpc.status.INVALID_ARGUMENT);
        assert.equal(e.method, 'Join');
        assert.match(e.details, /a finite number >= 0 \(0: answer at once\)/);
        return true;
      });
    }
    assert.equal(asked.length, 1, 'nothing was sent');
  } finally {
    client.close();
    server.forceShutdown();
  }
});

test('a message over this worker\'s own --max-message-bytes is OverClientLimit, naming the flag to raise; the '
  + 'server\'s limit is not', { timeout: 10000 }, async () => {
  const big = new Float32Array(2000); // 8 kB: over a 4 kB limit
  const data = await grpcServer(pkg.ParameterService.service, {
    PullParams: (call) => call.on('data', (req) => call.write({
      guaranteed_clock: req.clock, final: true, run_state: 'RUN_STATE_RUNNING',
      tensors: [{ name: 'w', shape: [2000], dtype: 'DATA_TYPE_FLOAT32', data: Buffer.from(big.buffer), offset: 0 }],
    })),
    PushGradient: (call) => call.on('data', () => call.write({ clock: 1, run_state: 'RUN_STATE_RUNNING' })),
  });
  // gRPC's own checks, by the real grpc-js: an answer this worker receives, a request it sends
  const client = new PsClient(data.address, { timeout: 5, dataPlane: false, maxMessageBytes: 4096, chunkBytes: 1 << 20 });
  const over = (method) => (e) => {
    assert.ok(e instanceof OverClientLimit, `${e}`);
    assert.equal(e.code, grpc.status.RESOURCE_EXHAUSTED);
    assert.equal(e.method, method);
    assert.equal(e.retryable, false);
    assert.match(e.details, /this worker's limit .*: raise it \(--max-message-bytes\)/);
    return true;
  };
  try {
    await assert.rejects(client.pull('r', 0, 1, 0, { maxWait: 1 }), over('PullParams'));
    await assert.rejects(client.push('r', 0, 1, 0, [['w', big, [2000]]]), over('PushGradient'));
  } finally {
    client.close();
    data.close();
  }
  // The server's own gRPC limit (its texts, which tests/unit/test_client_errors.py pins): not this worker's
  for (const details of ['SERVER: Received message larger than max (5000 vs. 1000)',
    'SERVER: Sent message larger than max (5000 vs. 1000)']) {
    const e = callError({ code: grpc.status.RESOURCE_EXHAUSTED, details, metadata: new grpc.Metadata() }, 'PushGradient');
    assert.ok(e instanceof PsError && !(e instanceof OverClientLimit), `${e}`);
    assert.match(e.details, /the server's limit .*: raise it \(ps-server --max-message-bytes\), or send less/);
  }
  // a refusal of the server's (its ErrorInfo): as it is
  const refusal = callError({ code: grpc.status.RESOURCE_EXHAUSTED, details: 'run too large', metadata: trailer({ reason: 'ERROR_REASON_TOO_LARGE' }) });
  assert.ok(!(refusal instanceof OverClientLimit));
  assert.equal(refusal.details, 'run too large');
});

test('a TCP data plane answer over this worker\'s --max-message-bytes is OverClientLimit', { timeout: 10000 }, async () => {
  const tcp = await new Promise((resolve) => {
    const srv = net.createServer((sock) => {
      sock.once('data', (d) => sock.write(Buffer.concat([d.subarray(0, 8), frameHeader(MESSAGE, 0, 5000)])));
      sock.on('error', () => {});
    });
    srv.listen(0, '127.0.0.1', () => resolve({ port: srv.address().port, close: () => srv.close() }));
  });
  const client = new PsClient('127.0.0.1:1', { timeout: 5, maxMessageBytes: 4096 });
  client.dataPortIs(tcp.port);
  try {
    assert.equal(client.transport(), 'tcp');
    await assert.rejects(client.pull('r', 0, 1, 0, { maxWait: 1 }), (e) => {
      assert.ok(e instanceof OverClientLimit, `${e}`);
      assert.match(e.details, /5000 bytes.*4096.*raise it \(--max-message-bytes\)/);
      return true;
    });
  } finally {
    client.close();
    tcp.close();
  }
});

test('an answer over this worker\'s own limit gives the rank back (Leave SHUTDOWN, saying which flag to raise): '
  + 'not the run\'s failure', { timeout: 10000 }, async () => {
  const left = [];
  const client = {
    heartbeat: async () => ({ clock: 0, run_state: 'RUN_STATE_RUNNING' }),
    leave: async (...args) => { left.push(args); },
    cancelAll() {},
  };
  const a = { run_id: 'r', rank: 2, incarnation: 1, start_clock: 0, spec: { staleness: 0, optimizer: {}, slowdown: {} } };
  const over = callError({ code: grpc.status.RESOURCE_EXHAUSTED, details: 'Received message larger than max (5000 vs 4096)' }, 'PullParams');
  const { setup, run } = Trainer.prototype;
  Trainer.prototype.setup = () => {};
  Trainer.prototype.run = async () => { throw over; };
  const log = quietLog();
  try {
    const outcome = await train(client, a, { slowdown: 1, timeoutSeconds: 5 }, log);
    assert.equal(outcome.unfit, true);
    assert.equal(outcome.completed, false);
    assert.equal(left.length, 1);
    const [runId, rank, incarnation, reason, message] = left[0];
    assert.deepEqual([runId, rank, incarnation, reason], ['r', 2, 1, 'LEAVE_REASON_SHUTDOWN']);
    assert.match(message, /cannot take part as it is set up: .*--max-message-bytes/);
    assert.match(log.lines.join('\n'), /error gave rank 2 back \(the run goes on without this worker\): .*--max-message-bytes/);
    assert.doesNotMatch(log.lines.join('\n'), /training failed/);
  } finally {
    Trainer.prototype.setup = setup;
    Trainer.prototype.run = run;
  }
});

test('a rank with an empty shard fails the run before training, saying how many workers fit', async () => {
  // (more ranks than training examples: psctl launch refuses such a run, another client may create it;
  // it said "BatchSampler needs n_examples >= 1, ... got 0, ...")
  const fs = require('fs');
  const os = require('os');
  const path = require('path');
  const { toNpy } = require('../src/npy');
  const { DatasetError } = require('../src/data');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ps-node-empty-shard-'));
  const spec = { kind: 'npz', path: '/data/three.npz', seed: 0, test_fraction: 0.5 };
  fs.mkdirSync(path.join(dir, 'three'));
  const write = (name, data, shape) => fs.writeFileSync(path.join(dir, 'three', `${name}.npy`), toNpy(data, shape));
  write('X_train', new Float32Array(6), [3, 2]);
  write('y_train', new Int32Array([0, 1, 0]), [3]);
  write('X_test', new Float32Array(6), [3, 2]);
  write('y_test', new Int32Array([1, 0, 1]), [3]);
  fs.writeFileSync(path.join(dir, 'three', 'manifest.json'), JSON.stringify({
    format: 'paramserver-dataset/1', spec, name: 'npz:three.npz', task: 'classification', n_features: 2, n_outputs: 2,
  }));
  const a = {
    run_id: 'r', rank: 3, incarnation: 1, start_clock: 0,
    spec: {
      staleness: 0, optimizer: {}, slowdown: {}, num_workers: 4, seed: 0, batch_size: 16,
      data_spec_json: JSON.stringify(spec), model_spec_json: JSON.stringify({ kind: 'softmax' }),
      params: [{ name: 'softmax.weight', shape: [2, 2] }, { name: 'softmax.bias', shape: [2] }],
    },
  };
  try {
    const trainer = new Trainer({}, a, { slowdown: 1, dataDir: dir }, quietLog());
    assert.throws(() => trainer.setup(), (e) => {
      assert.ok(e instanceof DatasetError, e);
      assert.equal(e.message, "rank 3's shard is empty: the training split of npz:three.npz has 3 examples for the run's "
        + '4 ranks, and every rank needs at least one; create the run with at most 3 workers');
      return true;
    });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a pull is asked again while the server names ranks still training (WAIT_TIMEOUT), the final one too', async () => {
  // (it gave up after call()'s deadline, 4 x --timeout-seconds: behind a straggler, a rank ended its
  // assignment without leaving, rank 0 without evaluating the final parameters)
  const { t, client } = trainerAt(3);
  t.spec.iterations = 3;
  t.config.timeoutSeconds = 0.01; // call() gives a refusal up after 40 ms
  const waited = new PsError(grpc.status.DEADLINE_EXCEEDED, 'waited 0.2s: rank 0 (clock 3) waits for rank 1',
    codecs.ErrorInfo.decode(codecs.ErrorInfo.encode({ reason: 'ERROR_REASON_WAIT_TIMEOUT', needed_min_clock: 3, ranks_behind: [1] })),
    'PullParams');
  let pulls = 0;
  client.pull = async () => {
    pulls += 1;
    if (pulls <= 6) throw waited;
    return { guaranteed_clock: 3, run_state: 'RUN_STATE_RUNNING', tensors: {}, shapes: {} };
  };
  const evaluated = [];
  t.evaluate = (params, clock) => evaluated.push(clock);
  t.report = async () => {};
  await t.run();
  assert.equal(pulls, 7);
  assert.deepEqual(evaluated, [3]);
  assert.match(t.log.lines.join('\n'), /pull 3 waits for rank 1; asking again/);
  pulls = 0; // mid-run: any call
  assert.equal((await t.call(() => client.pull(), 'pull 2')).guaranteed_clock, 3);
  assert.equal(pulls, 7);
  // any other refusal, or one naming nobody behind, still ends the assignment
  const gone = new PsError(grpc.status.DEADLINE_EXCEEDED, 'waited', codecs.ErrorInfo.decode(codecs.ErrorInfo.encode({ reason: 'ERROR_REASON_WAIT_TIMEOUT' })));
  client.pull = async () => { throw gone; };
  await assert.rejects(t.run(), (e) => e === gone);
});
