'use strict';
// Sharded runs (src/shards.js): each shard gets and gives the rows it holds, a retry goes to every
// shard again, answers combine as the least guarantee, and a CLOCK_AHEAD from
// any shard rewinds the trainer. Fake clients, then real PsClients against grpc-js servers.
const test = require('node:test');
const assert = require('node:assert/strict');

const { PsClient, PsError } = require('../src/client');
const { loadContract, messages } = require('../src/proto');
const { Shards, ShardMapError, checkMap, combinedState } = require('../src/shards');
const { Trainer, Rewind } = require('../src/trainer');

const { grpc, pkg } = loadContract();
const codecs = messages();

/** w: 5 rows of 3 split 2 + 3 over servers 0 and 1; b (3,) on 1, s (a scalar) on 0; server 2 holds nothing. */
const SHAPES = { w: [5, 3], b: [3], s: [] };
const MAP = {
  shards: [
    { index: 0, address: 'a:1', data_port: 0, pieces: [{ name: 'w', row_start: 0, row_end: 2 }, { name: 's', row_start: 0, row_end: 1 }] },
    { index: 1, address: 'b:1', data_port: 7, pieces: [{ name: 'w', row_start: 2, row_end: 5 }, { name: 'b', row_start: 0, row_end: 3 }] },
    { index: 2, address: 'c:1', data_port: 0, pieces: [] },
  ],
};

function info(fields) {
  return codecs.ErrorInfo.decode(codecs.ErrorInfo.encode(fields));
}

function quietLog() {
  const lines = [];
  const log = (level) => (m) => lines.push(`${level} ${m}`);
  return { lines, debug: log('debug'), info: log('info'), warning: log('warning'), error: log('error') };
}

/**
 * A fake PsClient of one shard: records each push's [name, values, shape] and each pull's request;
 * `fail` is a list of errors its next calls throw, in turn (null: answer).
 */
function fakeClient(shard, fail = []) {
  return {
    shard,
    calls: [],
    fail: [...fail],
    cancelled: 0,
    closed: 0,
    answer(what) {
      this.calls.push(what);
      const e = this.fail.shift();
      return e ? Promise.reject(e) : null;
    },
    push(runId, rank, incarnation, clock, grads) {
      return this.answer({ op: 'push', clock, grads: grads.map(([n, v, s]) => [n, Array.from(v), s]) })
        || Promise.resolve({ clock: clock + 1, duplicate: shard.index === 1, min_clock: clock - shard.index, run_state: 'RUN_STATE_RUNNING' });
    },
    pull(runId, rank, incarnation, clock, { into, names }) {
      const refused = this.answer({ op: 'pull', clock, names, into: Object.keys(into) });
      if (refused) return refused;
      const shapes = {};
      for (const [name, view] of Object.entries(into)) { // fill each piece with 100 * shard index + element
        for (let i = 0; i < view.length; i++) view[i] = 100 * (shard.index + 1) + i;
        shapes[name] = [];
      }
      return Promise.resolve({ guaranteed_clock: clock - shard.index, version: 10 + shard.index, run_state: 'RUN_STATE_RUNNING', tensors: into, shapes });
    },
    cancelAll() { this.cancelled += 1; },
    close() { this.closed += 1; },
  };
}

function shardsWith(fails = {}) {
  return new Shards(MAP, SHAPES, (s) => fakeClient(s, fails[s.index] || []));
}

const GRADS = [['b', Float32Array.from([7, 8, 9]), [3]], ['s', Float32Array.from([0.5]), []],
  ['w', Float32Array.from({ length: 15 }, (_, i) => i), [5, 3]]];

test('the map is checked: every piece a known tensor within its rows, every row on exactly one shard', () => {
  checkMap(MAP.shards, SHAPES);
  const bad = (pieces) => [{ index: 0, pieces }];
  const whole = [{ name: 'b', row_start: 0, row_end: 3 }, { name: 's', row_start: 0, row_end: 1 }];
  assert.throws(() => checkMap(bad([...whole, { name: 'w', row_start: 0, row_end: 5 }, { name: 'x', row_start: 0, row_end: 1 }]), SHAPES), ShardMapError);
  assert.throws(() => checkMap(bad([...whole, { name: 'w', row_start: 0, row_end: 6 }]), SHAPES), /rows \[0, 6\) of w/);
  assert.throws(() => checkMap(bad([...whole, { name: 'w', row_start: 0, row_end: 2 }, { name: 'w', row_start: 3, row_end: 5 }]), SHAPES), /every row of w/);
  assert.throws(() => checkMap(bad([...whole, { name: 'w', row_start: 0, row_end: 3 }, { name: 'w', row_start: 2, row_end: 5 }]), SHAPES), /exactly once/);
  assert.throws(() => checkMap(bad(whole), SHAPES), /every row of w/);
  assert.throws(() => new Shards({ shards: bad(whole) }, SHAPES, () => assert.fail('connected before checking')), ShardMapError);
});

test('a push sends each shard the rows it holds, with the piece shapes; the empty shard gets no tensors', async () => {
  const sh = shardsWith();
  const ack = await sh.push('r', 0, 1, 4, GRADS, 0.25);
  const [a, b, c] = sh.clients.map((cl) => cl.calls);
  assert.deepEqual(a, [{ op: 'push', clock: 4, grads: [['w', [0, 1, 2, 3, 4, 5], [2, 3]], ['s', [0.5], []]] }]);
  assert.deepEqual(b, [{ op: 'push', clock: 4, grads: [['w', [6, 7, 8, 9, 10, 11, 12, 13, 14], [3, 3]], ['b', [7, 8, 9], [3]]] }]);
  assert.deepEqual(c, [{ op: 'push', clock: 4, grads: [] }]);
  // the least guarantee: min clock and min_clock; duplicate only if every shard says so (only server 1 did)
  assert.deepEqual(ack, { clock: 5, duplicate: false, min_clock: 2, run_state: 'RUN_STATE_RUNNING' });
});

test('a pull writes the pieces of every shard into the rows of whole arrays, kept from call to call', async () => {
  const sh = shardsWith();
  const params = {};
  const res = await sh.pull('r', 0, 1, 6, { into: params, maxWait: 1 });
  assert.deepEqual(Array.from(params.w), [100, 101, 102, 103, 104, 105, 200, 201, 202, 203, 204, 205, 206, 207, 208]);
  assert.deepEqual(Array.from(params.b), [200, 201, 202]);
  assert.deepEqual(Array.from(params.s), [100]);
  assert.equal(res.tensors, params);
  assert.deepEqual(res.shapes, SHAPES);
  assert.equal(res.guaranteed_clock, 4); // the least of 6, 5, 4
  assert.equal(res.version, 10);
  const w = params.w;
  await sh.pull('r', 0, 1, 7, { into: params, maxWait: 1 });
  assert.equal(params.w, w, 'the arrays are reused');
  assert.deepEqual(sh.clients[2].calls.map((x) => x.into), [[], []], 'the shard holding nothing is pulled too (its SSP gate)');
  const some = await sh.pull('r', 0, 1, 8, { into: params, names: ['b'] });
  assert.deepEqual(Object.keys(some.tensors), ['b']);
  assert.deepEqual(sh.clients.map((cl) => cl.calls.length), [2, 3, 2], 'names: only the shards holding them');
  assert.deepEqual(sh.clients[1].calls[2].names, ['b']);
});

test('a retry goes to every shard again: an acknowledgement a shard may lose to a checkpoint is not kept', async () => {
  const down = new PsError(grpc.status.UNAVAILABLE, 'server 1 down');
  const sh = shardsWith({ 1: [down, down] });
  await assert.rejects(sh.push('r', 0, 1, 4, GRADS), (e) => e === down);
  await assert.rejects(sh.push('r', 0, 1, 4, GRADS), (e) => e === down);
  const ack = await sh.push('r', 0, 1, 4, GRADS);
  assert.equal(ack.clock, 5);
  assert.deepEqual(sh.clients.map((cl) => cl.calls.length), [3, 3, 3], 'each retry to every shard (each de-duplicates)');

  const again = shardsWith({ 0: [down] });
  await assert.rejects(again.pull('r', 0, 1, 3, { into: {} }));
  await again.pull('r', 0, 1, 3, { into: {} }); // a pull's retry reads every shard again: none is kept
  assert.deepEqual(again.clients.map((cl) => cl.calls.map((x) => x.clock)), [[3, 3], [3, 3], [3, 3]]);

  const ahead = new PsError(grpc.status.FAILED_PRECONDITION, 'x', info({ reason: 'ERROR_REASON_CLOCK_AHEAD', next_clock: 4 }));
  const back = shardsWith({ 1: [down, ahead] });
  await assert.rejects(back.push('r', 0, 1, 4, GRADS), (e) => e === down);
  await assert.rejects(back.push('r', 0, 1, 4, GRADS), (e) => e === ahead); // server 1 went back to a checkpoint
  await back.push('r', 0, 1, 4, GRADS);
  assert.deepEqual(back.clients.map((cl) => cl.calls.length), [3, 3, 3]);
});

test('a push holding a NaN/Inf is refused whole before any shard is sent anything, as one server refuses it', async () => {
  // Each shard sees only its rows: the one holding the bad value would refuse its part while the
  // others applied theirs (a torn push). Row 4 of w and the scalar s are on different shards.
  for (const bad of [NaN, Infinity, -Infinity]) {
    for (const [name, at, count] of [['w', [14], 1], ['s', [0], 1], ['w', [0, 14], 2]]) {
      const sh = shardsWith();
      const grads = GRADS.map(([n, v, shape]) => [n, Float32Array.from(v), shape]);
      const values = grads.find(([n]) => n === name)[1];
      for (const i of at) values[i] = bad;
      await assert.rejects(sh.push('r', 0, 1, 4, grads), (e) => e instanceof PsError && e.code === grpc.status.INVALID_ARGUMENT
        && !e.retryable && e.reason === 'ERROR_REASON_INVALID_GRADIENT' && e.method === 'PushGradient'
        && e.details === `gradient '${name}' contains ${count} NaN/Inf value(s); nothing was applied`);
      assert.deepEqual(sh.clients.map((cl) => cl.calls.length), [0, 0, 0], `${bad} in ${name}: no shard was sent anything`);
    }
  }
  // finite values whose squares or sum overflow float32 are no NaN/Inf: pushed
  const huge = shardsWith();
  const grads = GRADS.map(([n, v, shape]) => [n, n === 'w' ? new Float32Array(15).fill(3e38) : v, shape]);
  assert.equal((await huge.push('r', 0, 1, 4, grads)).clock, 5);
  assert.deepEqual(huge.clients.map((cl) => cl.calls.length), [1, 1, 1]);
});

test('the trainer ends a sharded push holding a NaN/Inf at once, as a server\'s INVALID_GRADIENT: no retry, no shard sent to', async () => {
  const client = { heartbeat: () => assert.fail('no heartbeat: not retried'), cancelAll() {} };
  const a = { run_id: 'r', rank: 0, incarnation: 1, start_clock: 5, spec: { staleness: 0, optimizer: {}, slowdown: {} } };
  const t = new Trainer(client, a, { slowdown: 1, timeoutSeconds: 1 }, quietLog());
  t.plane = shardsWith();
  const grads = GRADS.map(([n, v, shape]) => [n, n === 'b' ? Float32Array.from([1, Infinity, 2]) : v, shape]);
  await assert.rejects(t.call(() => t.plane.push('r', 0, 1, 5, grads), 'push 5'),
    (e) => e instanceof PsError && e.reason === 'ERROR_REASON_INVALID_GRADIENT' && /gradient 'b' contains 1 NaN\/Inf/.test(e.message));
  assert.equal(t.stats.retries, 0);
  assert.deepEqual(t.plane.clients.map((cl) => cl.calls.length), [0, 0, 0]);
});

test('under BSP the shards must answer a pull from one clock; a mix is a retryable failure', async () => {
  const bsp = new Shards(MAP, SHAPES, (s) => fakeClient(s), 0); // the fakes answer clock - index
  await assert.rejects(bsp.pull('r', 0, 1, 4, { into: {} }), (e) => e.retryable && /from clocks 4, 3, 2/.test(e.message));
  const ssp = new Shards(MAP, SHAPES, (s) => fakeClient(s), 2);
  assert.equal((await ssp.pull('r', 0, 1, 4, { into: {} })).guaranteed_clock, 2);
});

test('of several refusals: a CLOCK_AHEAD (the lowest next_clock), else one not retryable, else the first', async () => {
  const down = new PsError(grpc.status.UNAVAILABLE, 'down');
  const stale = new PsError(grpc.status.FAILED_PRECONDITION, 'stale', info({ reason: 'ERROR_REASON_STALE_INCARNATION' }));
  const ahead = (n) => new PsError(grpc.status.FAILED_PRECONDITION, 'ahead', info({ reason: 'ERROR_REASON_CLOCK_AHEAD', next_clock: n }));
  const cases = [
    [[down, ahead(3), ahead(2)], (e) => e.info.next_clock === 2],
    [[down, stale, null], (e) => e === stale],
    [[null, down, null], (e) => e === down],
    [[stale, ahead(4), down], (e) => e.info.next_clock === 4],
  ];
  for (const [errs, want] of cases) {
    const sh = shardsWith(Object.fromEntries(errs.map((e, i) => [i, [e]])));
    await assert.rejects(sh.push('r', 0, 1, 5, GRADS), want);
  }
});

test('the bound the shards\' answers say combines as the tightest, on pushes and pulls; none said: none', { timeout: 10000 }, async () => {
  const saying = (bounds) => new Shards(MAP, SHAPES, (s) => {
    const c = fakeClient(s);
    const [push, pull] = [c.push, c.pull];
    const said = (r) => (bounds[s.index] === null ? r : { ...r, staleness: bounds[s.index] });
    c.push = (...args) => push.apply(c, args).then(said);
    c.pull = (...args) => pull.apply(c, args).then(said);
    return c;
  });
  for (const [bounds, want] of [[[4, 1, 4], 1], [[-1, 2, null], 2], [[-1, -1, -1], -1], [[null, 0, 0], 0], [[null, null, null], undefined]]) {
    const sh = saying(bounds);
    assert.equal((await sh.push('r', 0, 1, 4, GRADS)).staleness, want, `push, ${bounds}`);
    assert.equal((await sh.pull('r', 0, 1, 4, { into: {} })).staleness, want, `pull, ${bounds}`);
  }
});

test('the combined run state is the most final one', () => {
  assert.equal(combinedState(['RUN_STATE_RUNNING', 'RUN_STATE_COMPLETED']), 'RUN_STATE_COMPLETED');
  assert.equal(combinedState(['RUN_STATE_STOPPED', 'RUN_STATE_FAILED', 'RUN_STATE_RUNNING']), 'RUN_STATE_FAILED');
  assert.equal(combinedState(['RUN_STATE_RUNNING', 'RUN_STATE_RUNNING']), 'RUN_STATE_RUNNING');
});

test('the trainer rewinds on a CLOCK_AHEAD from one shard, and cancels and closes every shard', async () => {
  const ahead = new PsError(grpc.status.FAILED_PRECONDITION, 'x', info({ reason: 'ERROR_REASON_CLOCK_AHEAD', next_clock: 3 }));
  const client = { heartbeat: () => assert.fail('no heartbeat needed'), cancelAll() {} };
  const a = { run_id: 'r', rank: 0, incarnation: 1, start_clock: 5, spec: { staleness: 0, optimizer: {}, slowdown: {} } };
  const t = new Trainer(client, a, { slowdown: 1, timeoutSeconds: 1 }, quietLog());
  t.plane = shardsWith({ 2: [ahead] });
  await assert.rejects(t.call(() => t.plane.push('r', 0, 1, 5, GRADS), 'push 5'), (e) => e instanceof Rewind && e.clock === 3);
  const shards = t.plane;
  // the refusal cancelled the calls still waiting on shards 0 and 1; the abort cancels all three
  assert.deepEqual(shards.clients.map((cl) => cl.cancelled), [1, 1, 0]);
  t.abort('test');
  assert.deepEqual(shards.clients.map((cl) => cl.cancelled), [2, 2, 1]);
  t.closePlane();
  assert.deepEqual(shards.clients.map((cl) => cl.closed), [1, 1, 1]);
  assert.equal(t.plane, client);
});

// ---------------------------------------------------------------- real clients, grpc-js servers
/** A ParameterService holding `pieces` ({name: [values, shape]}): pulls answer them in 2-element chunks; pushes are recorded. */
function shardServer(pieces, pushes) {
  const server = new grpc.Server();
  server.addService(pkg.ParameterService.service, {
    PullParams: (call) => call.on('data', (req) => {
      const chunks = [];
      for (const [name, [values, shape]] of Object.entries(pieces)) {
        for (let lo = 0; lo < Math.max(values.length, 1); lo += 2) {
          const part = Float32Array.from(values.slice(lo, lo + 2));
          chunks.push({ name, shape, dtype: 'DATA_TYPE_FLOAT32', offset: lo, data: Buffer.from(part.buffer) });
        }
      }
      call.write({ guaranteed_clock: req.clock, version: 1, tensors: chunks, final: true, run_state: 'RUN_STATE_RUNNING' });
    }),
    PushGradient: (call) => call.on('data', (req) => {
      pushes.push(...req.tensors.map((t) => [t.name, t.shape.map(Number), Number(t.offset),
        Array.from(new Float32Array(new Uint8Array(t.data).buffer))]));
      if (req.final) call.write({ clock: Number(req.clock) + 1, min_clock: Number(req.clock), run_state: 'RUN_STATE_RUNNING' });
    }),
  });
  return new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, port) => {
      if (err) reject(err);
      else resolve({ address: `127.0.0.1:${port}`, close: () => server.forceShutdown() });
    });
  });
}

test('over gRPC: chunks of each piece land in the rows of the whole arrays; pushes carry the piece shapes', async () => {
  const pushes = [[], []];
  const servers = [
    await shardServer({ w: [[1, 2, 3, 4, 5, 6], [2, 3]], s: [[9], []] }, pushes[0]),
    await shardServer({ w: [[7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 3]], b: [[-1, -2, -3], [3]] }, pushes[1]),
  ];
  const map = { shards: MAP.shards.slice(0, 2).map((s, i) => ({ ...s, address: servers[i].address, data_port: 0 })) };
  const joined = new PsClient('127.0.0.1:1', { timeout: 5, dataPlane: false, chunkBytes: 8 });
  const sh = Shards.beside(joined, map, { params: Object.entries(SHAPES).map(([name, shape]) => ({ name, shape })) });
  try {
    assert.deepEqual(sh.clients.map((c) => [c.address, c.chunkBytes, c.timeout]), servers.map((s) => [s.address, 8, 5]));
    const params = {};
    const res = await sh.pull('r', 0, 1, 3, { into: params, maxWait: 1 });
    assert.deepEqual(Array.from(params.w), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
    assert.deepEqual(Array.from(params.b), [-1, -2, -3]);
    assert.deepEqual(Array.from(params.s), [9]);
    assert.equal(res.guaranteed_clock, 3);
    const ack = await sh.push('r', 0, 1, 3, GRADS);
    assert.equal(ack.clock, 4);
    assert.deepEqual(pushes[0], [['w', [2, 3], 0, [0, 1]], ['w', [2, 3], 2, [2, 3]], ['w', [2, 3], 4, [4, 5]], ['s', [], 0, [0.5]]]);
    assert.deepEqual(pushes[1].filter(([n]) => n === 'w').flatMap(([, , , v]) => v), [6, 7, 8, 9, 10, 11, 12, 13, 14]);
    assert.deepEqual(pushes[1].map(([n, s]) => [n, s])[0], ['w', [3, 3]]);
  } finally {
    sh.close();
    joined.close();
    for (const s of servers) s.close();
  }
});

test('a shard answering a piece in another shape is an error, not a silently stale row range', async () => {
  const servers = [
    await shardServer({ w: [[1, 2, 3, 4, 5, 6], [2, 3]], s: [[9], []] }, []),
    await shardServer({ w: [[7, 8, 9], [1, 3]], b: [[-1, -2, -3], [3]] }, []),
  ];
  const map = { shards: MAP.shards.slice(0, 2).map((s, i) => ({ ...s, address: servers[i].address, data_port: 0 })) };
  const joined = new PsClient('127.0.0.1:1', { timeout: 5, dataPlane: false });
  const sh = Shards.beside(joined, map, { params: Object.entries(SHAPES).map(([name, shape]) => ({ name, shape })) });
  try {
    await assert.rejects(sh.pull('r', 0, 1, 3, { into: {}, maxWait: 1 }), (e) => e instanceof PsError
      && e.code === grpc.status.INTERNAL && /sent w as \[1,3\], not its piece \[3,3\]/.test(e.details));
  } finally {
    sh.close();
    joined.close();
    for (const s of servers) s.close();
  }
});

test('each shard client goes over its own TCP data plane port from the map', () => {
  const joined = new PsClient('127.0.0.1:1', { timeout: 5 });
  const sh = Shards.beside(joined, MAP, { params: Object.entries(SHAPES).map(([name, shape]) => ({ name, shape })) });
  try {
    assert.deepEqual(sh.clients.map((c) => [c.address, c.transport(), c.dataPort]), [['a:1', 'grpc', 0], ['b:1', 'tcp', 7], ['c:1', 'grpc', 0]]);
    const secured = new PsClient('127.0.0.1:1', { timeout: 5, security: { token: 't', tls: false } });
    const sibling = secured.sibling('b:1', 7);
    assert.equal(sibling.transport(), 'grpc', 'the framing carries no token');
    sibling.close();
    secured.close();
  } finally {
    sh.close();
    joined.close();
  }
});

test('refresh learns each shard\'s data plane port again from the run (a restarted server has another)', async () => {
  const sh = new Shards(MAP, SHAPES, (s) => {
    const c = new PsClient(s.address, { timeout: 5 });
    c.dataPortIs(Number(s.data_port));
    return c;
  });
  const joined = {
    getRun: async () => ({ shard_map: { shards: MAP.shards.map((s, i) => ({ ...s, data_port: [5, 9, 0][i] })) } }),
    serverMaxWait: 7.5, // (server 0's limit of a parked pull, as a Heartbeat said after it restarted)
  };
  try {
    await sh.refresh(joined, 'r');
    assert.deepEqual(sh.clients.map((c) => [c.transport(), c.dataPort]), [['tcp', 5], ['tcp', 9], ['grpc', 0]]);
    assert.deepEqual(sh.shards.map((s) => s.dataPort), [5, 9, 0]);
    // each shard's pull of maxWait 0 waits for that limit, not the one told at Join (as the Python SDK)
    assert.deepEqual(sh.clients.map((c) => c.serverMaxWait), [7.5, 7.5, 7.5]);
  } finally {
    sh.close();
  }
});
