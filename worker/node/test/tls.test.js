'use strict';
// A TLS mismatch says which of the worker's settings to change, in ps-worker's words
// (paramserver/security.py tls_problem): grpc-js says only UNAVAILABLE, and the worker logged
// "not reachable (UNAVAILABLE)" for ever. Real TLS servers (grpc-js), certificates from openssl.
const test = require('node:test');
const assert = require('node:assert/strict');
const { execFileSync } = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');

const { parseConfig } = require('../src/config');
const { loadContract } = require('../src/proto');
const { work } = require('../src/main');
const { tlsProblem } = require('../src/tls');

const { grpc } = loadContract();

/** CA `ca` signing `server` (for localhost and 127.0.0.1) and `client`, and a CA `other`: NAME.pem, NAME.key. */
function makeCerts(dir) {
  const openssl = (...args) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
  const newKey = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  for (const ca of ['ca', 'other']) openssl('req', '-x509', ...newKey, '-keyout', `${ca}.key`, '-out', `${ca}.pem`, '-days', '1', '-subj', `/CN=${ca}`);
  fs.writeFileSync(path.join(dir, 'ext.cnf'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n');
  for (const name of ['server', 'client']) {
    openssl('req', ...newKey, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`);
    openssl('x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.pem', '-CAkey', 'ca.key', '-set_serial', '1', '-out', `${name}.pem`,
      '-days', '1', '-extfile', 'ext.cnf');
  }
  const read = (name) => fs.readFileSync(path.join(dir, name));
  return { dir, read, file: (name) => path.join(dir, name) };
}

function serve(credentials) {
  const server = new grpc.Server();
  return new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', credentials, (err, port) => (err ? reject(err) : resolve({ server, address: `127.0.0.1:${port}` })));
  });
}

/** A security object as config.js securityOf makes one. */
function security({ ca = null, cert = null, key = null, serverName = '' } = {}) {
  return { tls: Boolean(ca || cert), ca, cert, key, token: '', serverName };
}

test('a TLS mismatch, or TLS against a plaintext worker, says which flag to change', async (t) => {
  const pki = makeCerts(fs.mkdtempSync(path.join(os.tmpdir(), 'ps-tls-')));
  const pair = [{ cert_chain: pki.read('server.pem'), private_key: pki.read('server.key') }];
  const servers = {
    tls: await serve(grpc.ServerCredentials.createSsl(null, pair, false)),
    mutual: await serve(grpc.ServerCredentials.createSsl(pki.read('ca.pem'), pair, true)),
    plain: await serve(grpc.ServerCredentials.createInsecure()),
  };
  t.after(() => {
    for (const s of Object.values(servers)) s.server.forceShutdown();
    fs.rmSync(pki.dir, { recursive: true, force: true });
  });
  const ca = pki.read('ca.pem');
  const client = { cert: pki.read('client.pem'), key: pki.read('client.key') };
  const stranger = { cert: pki.read('other.pem'), key: pki.read('other.key') };
  const cases = [
    [servers.tls, security({ ca: pki.read('other.pem') }),
      'its certificate is not trusted (unable to verify the first certificate): is --tls-ca the CA that signed it?'],
    [servers.tls, security({ ca, serverName: 'elsewhere' }), "its certificate is not trusted (Hostname mismatch, "
      + "certificate is not valid for 'elsewhere'.): set --tls-server-name to a name the certificate holds"],
    [servers.plain, security({ ca }),
      'it answers in plaintext, not TLS: unset --tls-ca to talk to it so, or start it with --tls-cert and --tls-key'],
    [servers.mutual, security({ ca }), 'it closed the connection after the TLS handshake: it wants a client '
      + 'certificate (mutual TLS): give one with --tls-cert and --tls-key'],
    [servers.mutual, security({ ca, ...stranger }), 'it closed the connection after the TLS handshake: it wants a '
      + 'client certificate its --tls-client-ca signed, is --tls-cert one?'],
    [servers.tls, security(), 'it answers in TLS, not plaintext: give --tls-ca, the CA that signed its certificate'],
    // what works, and what TLS is not the reason of: nothing to say
    [servers.tls, security({ ca }), ''],
    [servers.tls, security({ ca, serverName: 'localhost' }), ''],
    [servers.mutual, security({ ca, ...client }), ''],
    [servers.plain, security(), ''],
    [{ address: '127.0.0.1:1' }, security({ ca }), ''],
  ];
  for (const [server, sec, want] of cases) {
    assert.equal(await tlsProblem(server.address, sec), want, `${server.address} ${JSON.stringify(Object.keys(sec).filter((k) => sec[k]))}`);
  }

  // The Join loop logs it once, naming the server, and goes on retrying.
  const lines = [];
  const log = {};
  for (const level of ['debug', 'info', 'warning', 'error']) log[level] = (m) => lines.push(`${level} ${m}`);
  const config = parseConfig(['--server', servers.tls.address, '--tls-ca', pki.file('other.pem'), '--idle-exit-seconds', '1'], {});
  await work(config, log, { value: false, holder: null, client: null, sleeper: { sleepers: new Set() } });
  const errors = lines.filter((l) => l.startsWith('error'));
  assert.deepEqual(errors, [`error cannot talk to the server at ${servers.tls.address}: ${cases[0][2]}`], lines.join('\n'));
  assert.ok(lines.filter((l) => l.includes('not reachable (UNAVAILABLE)')).length >= 2, lines.join('\n'));
});
