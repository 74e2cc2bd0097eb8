'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');

const { parseConfig } = require('../src/config');
const { dataKey } = require('../src/data');

test('flags win over environment variables with the Python worker\'s names', () => {
  const c = parseConfig(['--server', 'h:1', '--once', '--join-wait-seconds=2'], {
    PS_SERVER: 'e:2', PS_WORKER_JOIN_WAIT_SECONDS: '7', PS_WORKER_DATA_DIR: '/d', PS_WORKER_NAME: 'w',
  });
  assert.equal(c.server, 'h:1');
  assert.equal(c.once, true);
  assert.equal(c.joinWaitSeconds, 2);
  assert.equal(c.dataDir, '/d');
  assert.equal(c.displayName, 'w');
  assert.match(parseConfig([], {}).displayName, /^node:.+:\d+$/);
  assert.throws(() => parseConfig(['--server', 'nocolon'], {}), /HOST:PORT/);
  assert.throws(() => parseConfig(['--bogus'], {}), /unknown argument/);
});

test('data key is sha256 of the data spec JSON text, 16 hex digits (worker/export_shard.py)', () => {
  assert.equal(dataKey('{"kind": "digits"}'), '20d071bda68af7ee');
});
