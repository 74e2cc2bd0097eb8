'use strict';
/**
 * The worker's configuration, from flags over environment variables, with the Python worker's
 * names (worker/config.py): --server / PS_SERVER, and --flag-name / PS_WORKER_FLAG_NAME for the
 * rest, plus --data-dir / PS_WORKER_DATA_DIR (where exported datasets live, see README.md).
 *
 * Security, as the Python worker: --tls-ca (turns TLS on), --tls-cert/--tls-key (mutual TLS),
 * --tls-server-name, a bearer token from PS_TOKEN (environment only, never a flag) or
 * --token-file, and --insecure to allow the token over plaintext (refused otherwise).
 */

const crypto = require('crypto');
const fs = require('fs');
const os = require('os');
const path = require('path');
const tls = require('tls');
const { LEVELS } = require('./log');

const OPTIONS = [
  // [key, flag, type, default, help]
  ['server', 'server', 'string', '127.0.0.1:50051', 'Parameter server address HOST:PORT.'],
  ['name', 'name', 'string', '', 'Name shown in psctl status (default: node:host:pid).'],
  ['runId', 'run-id', 'string', '', 'Only join this run (default: any run with a vacant rank).'],
  ['once', 'once', 'bool', false, 'Exit after one run instead of waiting for the next.'],
  ['dataDir', 'data-dir', 'string', path.join(os.homedir(), '.cache', 'paramserver', 'data'),
    'Directory of exported datasets (python -m worker.export_shard --out DIR).'],
  ['timeoutSeconds', 'timeout-seconds', 'number', 30, 'Deadline of each RPC, beyond the time a pull may be parked.'],
  ['joinWaitSeconds', 'join-wait-seconds', 'number', 10, 'How long one Join call may wait on the server for work.'],
  ['idleExitSeconds', 'idle-exit-seconds', 'number', 0, 'Exit when no work came for this long; 0 = wait forever.'],
  ['slowdown', 'slowdown', 'number', 1, 'Straggler injection: make every iteration this many times slower.'],
  ['reportSeconds', 'report-seconds', 'number', 0.5, 'How often training metrics are reported to the server.'],
  ['maxMessageBytes', 'max-message-bytes', 'number', 64 << 20,
    'Largest gRPC message sent or received; a worker whose messages are larger gives its rank back and exits 1.'],
  ['dataPlane', 'data-plane', 'bool', true,
    "Push and pull over the server's TCP data plane when it offers one (else gRPC); --no-data-plane: gRPC only."],
  ['chunkBytes', 'chunk-bytes', 'number', 1 << 20, 'Payload per message when streaming gradients.'],
  ['logLevel', 'log-level', 'string', 'INFO', 'Log level: DEBUG, INFO, WARNING, ERROR.'],
  ['tlsCa', 'tls-ca', 'string', '', "CA (PEM) to verify the server's certificate; turns TLS on."],
  ['tlsCert', 'tls-cert', 'string', '', 'Client certificate (PEM) for mutual TLS.'],
  ['tlsKey', 'tls-key', 'string', '', 'Client private key (PEM) for mutual TLS.'],
  ['tlsServerName', 'tls-server-name', 'string', '', "Name expected in the server's certificate, if not the dialled host."],
  ['tokenFile', 'token-file', 'string', '', "File holding the server's bearer token."],
  ['insecure', 'insecure', 'bool', false, 'Allow the token over plaintext (no TLS).'],
];

const ENV_ONLY = [['token', 'PS_TOKEN', 'The bearer token itself; from the environment only.']];

class ConfigError extends Error {}

function envName(key, flag) {
  return key === 'server' ? 'PS_SERVER' : `PS_WORKER_${flag.replace(/-/g, '_').toUpperCase()}`;
}

function readFile(file, what) {
  try {
    return fs.readFileSync(file);
  } catch (e) {
    throw new ConfigError(`cannot read ${what} ${file}: ${e.code || e.message}`);
  }
}

/**
 * ConfigError unless `pem` (read from `file`) holds PEM certificates, as ps-worker checks
 * (paramserver/security.py check_ca): grpc-js ignores what it cannot use, and the server then
 * looked unreachable, its certificate not trusted.
 */
function checkCa(file, pem) {
  const blocks = pem.toString('latin1').match(/-----BEGIN CERTIFICATE-----[^-]*-----END CERTIFICATE-----/g) || [];
  try {
    if (!blocks.length) throw new Error('no certificate found');
    for (const block of blocks) new crypto.X509Certificate(block); // (throws when it does not parse)
  } catch (e) {
    throw new ConfigError(`--tls-ca ${file} holds no PEM certificate (${e.reason || e.message})`);
  }
}

/** ConfigError unless `cert` and `key` are a PEM certificate and its unencrypted key (check_key_pair):
 * grpc-js threw at the first call, and the worker died with a stack trace. */
function checkKeyPair(config, cert, key) {
  try {
    tls.createSecureContext({ cert, key });
  } catch (e) {
    throw new ConfigError(`--tls-cert ${config.tlsCert} and --tls-key ${config.tlsKey} are not a PEM certificate and its `
      + `unencrypted private key (${e.reason || e.message})`);
  }
}

/**
 * {ca, cert, key (Buffers or null), token, insecure, serverName} from the config; throws
 * ConfigError when the settings cannot work (unreadable files or no PEM in them, half a key pair,
 * token in clear).
 */
function securityOf(config) {
  if (config.token && config.tokenFile) throw new ConfigError('give the token either in PS_TOKEN or with --token-file, not both');
  const token = config.tokenFile ? readFile(config.tokenFile, '--token-file').toString('utf8').trim() : (config.token || '').trim();
  // (as the Python worker: the white space around it dropped, and what no header carries refused, not shown)
  const bad = [...token].filter((c) => c < ' ' || c > '~').length;
  if (bad) {
    throw new ConfigError(`the token in ${config.tokenFile ? `--token-file ${config.tokenFile}` : 'PS_TOKEN'} holds ${bad} ` +
      "character(s) a header cannot carry (a line end, a control or non-ASCII character): use printable ASCII");
  }
  if (Boolean(config.tlsCert) !== Boolean(config.tlsKey)) throw new ConfigError('a client certificate needs both --tls-cert and --tls-key');
  const tls = Boolean(config.tlsCa || config.tlsCert);
  if (token && !tls && !config.insecure) {
    throw new ConfigError('refusing to send the token over plaintext: use TLS (--tls-ca) or --insecure');
  }
  const ca = config.tlsCa ? readFile(config.tlsCa, '--tls-ca') : null;
  const cert = config.tlsCert ? readFile(config.tlsCert, '--tls-cert') : null;
  const key = config.tlsKey ? readFile(config.tlsKey, '--tls-key') : null;
  if (ca) checkCa(config.tlsCa, ca);
  if (cert) checkKeyPair(config, cert, key);
  return { tls, ca, cert, key, token, serverName: config.tlsServerName };
}

function convert(type, value, flag) {
  if (type === 'string') return String(value);
  if (type === 'bool') {
    const t = String(value).trim().toLowerCase();
    if (['1', 'true', 'yes', 'on'].includes(t)) return true;
    if (['0', 'false', 'no', 'off', ''].includes(t)) return false;
    throw new ConfigError(`--${flag} ${value}: use true or false`);
  }
  const n = Number(value);
  if (!Number.isFinite(n)) throw new ConfigError(`--${flag} ${JSON.stringify(value)}: not a number`);
  return n;
}

function usage() {
  const lines = ['usage: node src/main.js [options]', '',
    'A paramserver training worker in Node.js: joins the cluster, trains its rank of the run it is',
    'assigned, and waits for the next run. Every flag can also be set with the variable shown.', ''];
  for (const [key, flag, type, def, help] of OPTIONS) {
    const arg = type === 'bool' ? '' : ' VALUE';
    lines.push(`  --${type === 'bool' && def ? `[no-]${flag}` : flag}${arg}`.padEnd(30) + `${help} [${envName(key, flag)}; default ${JSON.stringify(def)}]`);
  }
  for (const [, env, help] of ENV_ONLY) lines.push(`  (no flag)`.padEnd(30) + `${help} [${env}]`);
  lines.push('', 'SIGTERM, SIGINT or SIGHUP stop the worker: it gives its rank back (trying for up to 5 s) and exits 0.',
    'A SIGHUP ignored at start (nohup) does too: Node cannot keep it ignored; use setsid to outlive a terminal.',
    'Exit status 1: with --once, its run did not complete (or none came before --idle-exit-seconds); or it',
    'cannot take part as it is set up (a message over --max-message-bytes: it gives its rank back).',
    '2: a usage error. 3: an unexpected error (a stack trace).');
  return lines.join('\n');
}

/** Parse argv (without node and script) and env into a frozen config object. */
function parseConfig(argv = [], env = process.env) {
  const config = {};
  for (const [key, flag, type, def] of OPTIONS) {
    const v = env[envName(key, flag)];
    config[key] = v === undefined || v === '' ? def : convert(type, v, flag);
  }
  for (const [key, name] of ENV_ONLY) config[key] = name in env ? String(env[name]) : '';
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '-h' || arg === '--help') {
      config.help = true;
      continue;
    }
    const m = /^--([a-z-]+)(?:=(.*))?$/.exec(arg);
    const negated = m && m[2] === undefined && m[1].startsWith('no-')
      && OPTIONS.find((o) => o[2] === 'bool' && o[1] === m[1].slice(3));
    if (negated) { // --no-FLAG, as Python's BooleanOptionalAction
      config[negated[0]] = false;
      continue;
    }
    const opt = m && OPTIONS.find((o) => o[1] === m[1]);
    if (!opt) throw new ConfigError(`unknown argument ${JSON.stringify(arg)}\n${usage()}`);
    const [key, flag, type] = opt;
    if (type === 'bool' && m[2] === undefined) {
      config[key] = true;
      continue;
    }
    let value = m[2];
    if (value === undefined) {
      if (i + 1 >= argv.length) throw new ConfigError(`--${flag} needs a value`);
      value = argv[++i];
    }
    config[key] = convert(type, value, flag);
  }
  if (!config.server.includes(':')) throw new ConfigError(`--server ${JSON.stringify(config.server)}: use HOST:PORT`);
  if (config.slowdown < 1) throw new ConfigError(`--slowdown ${config.slowdown}: use a factor >= 1 (1 = normal speed)`);
  // The bounds the Python worker checks (worker/config.py), in its words.
  for (const [key, flag, low, strict] of [['timeoutSeconds', 'timeout-seconds', 0, true],
    ['reportSeconds', 'report-seconds', 0, true], ['joinWaitSeconds', 'join-wait-seconds', 0, false],
    ['idleExitSeconds', 'idle-exit-seconds', 0, false], ['maxMessageBytes', 'max-message-bytes', 1 << 20, false],
    ['chunkBytes', 'chunk-bytes', 1024, false]]) {
    const v = config[key];
    if (v < low || (strict && v === low)) throw new ConfigError(`--${flag} ${v}: must be ${strict ? '>' : '>='} ${low}`);
  }
  if (config.chunkBytes > config.maxMessageBytes / 2) {
    throw new ConfigError(`--chunk-bytes ${config.chunkBytes}: at most half of --max-message-bytes (${config.maxMessageBytes})`);
  }
  const level = String(config.logLevel).toUpperCase();
  if (!Object.hasOwn(LEVELS, level)) {
    throw new ConfigError(`--log-level ${JSON.stringify(config.logLevel)}: choose from ${Object.keys(LEVELS).join(', ')}`);
  }
  config.logLevel = level;
  config.displayName = config.name || `node:${os.hostname()}:${process.pid}`;
  const security = securityOf(config);
  delete config.token; // keep the secret out of the config object (it is logged nowhere, but still)
  config.security = security;
  return Object.freeze(config);
}

module.exports = { parseConfig, ConfigError, usage, OPTIONS, securityOf };
