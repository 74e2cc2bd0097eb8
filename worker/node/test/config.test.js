'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');

const { execFileSync } = require('child_process');

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

test('bad values are refused as the Python worker refuses them: log level, times, sizes', () => {
  assert.equal(parseConfig(['--log-level', 'debug'], {}).logLevel, 'DEBUG');
  assert.throws(() => parseConfig(['--log-level', 'LOUD'], {}), /--log-level "LOUD": choose from DEBUG, INFO, WARNING, ERROR/);
  assert.throws(() => parseConfig([], { PS_WORKER_LOG_LEVEL: 'x' }), /--log-level "x"/);
  assert.throws(() => parseConfig(['--timeout-seconds', '0'], {}), /--timeout-seconds 0: must be > 0/);
  assert.throws(() => parseConfig(['--report-seconds', '-1'], {}), /--report-seconds -1: must be > 0/);
  assert.throws(() => parseConfig(['--join-wait-seconds', '-1'], {}), /must be >= 0/);
  assert.throws(() => parseConfig(['--chunk-bytes', '0'], {}), /--chunk-bytes 0: must be >= 1024/);
  assert.throws(() => parseConfig(['--max-message-bytes', '10'], {}), /--max-message-bytes 10/);
  assert.throws(() => parseConfig(['--chunk-bytes', String(40 << 20)], {}), /at most half of --max-message-bytes/);
});

test('data key is sha256 of the data spec JSON text, 16 hex digits (worker/export_shard.py)', () => {
  assert.equal(dataKey('{"kind": "digits"}'), '20d071bda68af7ee');
});

test('security settings follow the Python worker: token from PS_TOKEN only, never in clear without --insecure', () => {
  const fs = require('fs');
  const os = require('os');
  const path = require('path');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ps-node-config-'));
  const ca = path.join(dir, 'ca.pem');
  const tok = path.join(dir, 'token');
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout',
    path.join(dir, 'ca.key'), '-out', ca, '-days', '1', '-subj', '/CN=ca'], { stdio: 'pipe' });
  fs.writeFileSync(tok, 'from-file\n');
  assert.throws(() => parseConfig([], { PS_TOKEN: 't' }), /plaintext/);
  assert.equal(parseConfig(['--insecure'], { PS_TOKEN: 't' }).security.token, 't');
  const c = parseConfig(['--tls-ca', ca], { PS_TOKEN: 't' });
  assert.equal(c.security.tls, true);
  assert.deepEqual(c.security.ca, fs.readFileSync(ca));
  assert.equal(c.token, undefined); // the secret is not a config field
  assert.equal(parseConfig(['--tls-ca', ca, '--token-file', tok], {}).security.token, 'from-file');
  assert.throws(() => parseConfig(['--tls-ca', ca, '--token-file', tok], { PS_TOKEN: 't' }), /not both/);
  assert.throws(() => parseConfig(['--token', 'x'], {}), /unknown argument/);
  // a Kubernetes secret's line end dropped (it was sent, and refused by grpc-js); non-ASCII refused, not shown
  assert.equal(parseConfig(['--insecure'], { PS_TOKEN: ' t\n' }).security.token, 't');
  assert.throws(() => parseConfig(['--insecure'], { PS_TOKEN: 's\u00e9cret' }), (e) => /PS_TOKEN/.test(e.message) && !/s\u00e9cret/.test(e.message));
  assert.throws(() => parseConfig(['--tls-cert', ca], {}), /both --tls-cert and --tls-key/);
  assert.throws(() => parseConfig(['--tls-ca', path.join(dir, 'missing.pem')], {}), /cannot read --tls-ca/);
  fs.rmSync(dir, { recursive: true });
});

test('TLS files that hold no PEM are refused at start, in ps-worker\'s words (check_ca, check_key_pair)', () => {
  // grpc-js ignored such a CA (the server then looked unreachable) and threw at the first call
  // for such a certificate or key (the worker died with a stack trace, exit 3)
  const fs = require('fs');
  const os = require('os');
  const path = require('path');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ps-node-config-'));
  const file = (name) => path.join(dir, name);
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout',
    file('a.key'), '-out', file('a.pem'), '-days', '1', '-subj', '/CN=a'], { stdio: 'pipe' });
  execFileSync('openssl', ['genpkey', '-algorithm', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', file('b.key')], { stdio: 'pipe' });
  fs.writeFileSync(file('junk.pem'), 'not really a pem');
  assert.throws(() => parseConfig(['--tls-ca', file('junk.pem')], {}),
    { message: `--tls-ca ${file('junk.pem')} holds no PEM certificate (no certificate found)` });
  assert.throws(() => parseConfig(['--tls-ca', file('a.key')], {}), /holds no PEM certificate/);
  assert.throws(() => parseConfig(['--tls-cert', file('junk.pem'), '--tls-key', file('junk.pem')], {}),
    new RegExp(`--tls-cert ${file('junk.pem')} and --tls-key ${file('junk.pem')} are not a PEM certificate and its `
      + 'unencrypted private key \\(.+\\)$'));
  assert.throws(() => parseConfig(['--tls-cert', file('a.pem'), '--tls-key', file('b.key')], {}), /are not a PEM certificate/);
  const c = parseConfig(['--tls-ca', file('a.pem'), '--tls-cert', file('a.pem'), '--tls-key', file('a.key')], {});
  assert.equal(c.security.tls, true);
  fs.rmSync(dir, { recursive: true });
});
