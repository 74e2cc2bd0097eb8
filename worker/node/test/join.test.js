'use strict';
// The Join loop: a Join retried after its answer was lost sends the same join_token (the server
// answers it with the rank the first one took), and one after an answer a new one.
const test = require('node:test');
const assert = require('node:assert/strict');

const { loadContract } = require('../src/proto');
const { parseConfig } = require('../src/config');
const { work } = require('../src/main');

const { grpc, pkg } = loadContract();

test('a Join retried after a failure sends the same join_token, the next Join after an answer a new one', { timeout: 20000 }, async () => {
  const tokens = [];
  const stop = { value: false, holder: null, client: null, sleeper: { sleepers: new Set() } };
  const server = new grpc.Server();
  server.addService(pkg.WorkerService.service, {
    Join: (call, callback) => {
      tokens.push(call.request.join_token);
      if (tokens.length === 1) callback({ code: grpc.status.UNAVAILABLE, details: 'its answer lost (injected)' });
      else {
        if (tokens.length === 3) stop.value = true;
        callback(null, { server_generation: 'g' }); // (no work)
      }
    },
  });
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p)));
  });
  const lines = [];
  const log = {};
  for (const level of ['debug', 'info', 'warning', 'error']) log[level] = (m) => lines.push(`${level} ${m}`);
  try {
    await work(parseConfig(['--server', `127.0.0.1:${port}`, '--join-wait-seconds', '0'], {}), log, stop);
  } finally {
    server.forceShutdown();
  }
  assert.equal(tokens.length, 3, lines.join('\n'));
  assert.match(tokens[0], /^[0-9a-f]{32}$/);
  assert.equal(tokens[1], tokens[0]);
  assert.notEqual(tokens[2], tokens[1]);
  assert.match(tokens[2], /^[0-9a-f]{32}$/);
});
