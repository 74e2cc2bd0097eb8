'use strict';
// A TLS mismatch says which of the worker's settings to change, in ps-worker's words
// (paramserver/security.py tls_problem): grpc-js says only UNAVAILABLE, and the worker logged
// "not reachable (UNAVAILABLE)" for ever. Real TLS servers (grpc-js), certificates from openssl.
const test = require('node:test');
const assert = require('node:assert/strict');
const { execFile, execFileSync } = require('child_process');
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

test('TLS to an IP address verifies its IP SAN without setting the SNI to it (no DEP0123)', async (t) => {
  // grpc-js set the TLS ServerName to the target's host: for 127.0.0.1, Node's DEP0123 warning
  // ("Setting the TLS ServerName to an IP address is not permitted by RFC 6066") on every worker.
  const pki = makeCerts(fs.mkdtempSync(path.join(os.tmpdir(), 'ps-tls-')));
  const pair = [{ cert_chain: pki.read('server.pem'), private_key: pki.read('server.key') }];
  const { server, address } = await serve(grpc.ServerCredentials.createSsl(null, pair, false));
  const { pkg } = loadContract();
  server.addService(pkg.RunService.service, {
    GetRun: (call, callback) => callback(null, { run: { run_id: call.request.run_id } }),
  });
  t.after(() => {
    server.forceShutdown();
    fs.rmSync(pki.dir, { recursive: true, force: true });
  });
  // A fresh process: Node says DEP0123 once per process, and --throw-deprecation makes it fatal.
  const dial = (sec) => {
    const script = `const { PsClient } = require(${JSON.stringify(path.join(__dirname, '../src/client'))});
      const fs = require('fs');
      const sec = ${JSON.stringify(sec)};
      for (const k of ['ca', 'cert', 'key']) sec[k] = sec[k] ? fs.readFileSync(sec[k]) : null;
      const c = new PsClient(${JSON.stringify(address)}, { timeout: 10, security: sec });
      c.getRun('r1').then((run) => { console.log('ok ' + run.run_id); c.close(); },
        (e) => { console.log('error ' + e.message); c.close(); });`;
    return new Promise((resolve) => {
      execFile(process.execPath, ['--throw-deprecation', '-e', script], { timeout: 30000 },
        (err, stdout, stderr) => resolve({ code: err ? err.code : 0, stdout: stdout.trim(), stderr }));
    });
  };
  const ca = pki.file('ca.pem');
  const ok = await dial(security({ ca }));
  assert.deepEqual([ok.code, ok.stdout], [0, 'ok r1'], ok.stderr);
  assert.doesNotMatch(ok.stderr, /DEP0123/);
  // Verification is as strict as before: another CA, or a name or address the certificate does not hold, is refused.
  for (const sec of [security({ ca: pki.file('other.pem') }), security({ ca, serverName: 'elsewhere' }),
    security({ ca, serverName: '10.0.0.1' })]) {
    const refused = await dial(sec);
    assert.equal(refused.code, 0, refused.stderr);
    assert.match(refused.stdout, /^error GetRun: UNAVAILABLE/, JSON.stringify(sec));
  }
  // A name the certificate holds still goes as the SNI and is checked.
  const named = await dial(security({ ca, serverName: 'localhost' }));
  assert.deepEqual([named.code, named.stdout], [0, 'ok r1'], named.stderr);
});
