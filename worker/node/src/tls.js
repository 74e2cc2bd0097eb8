'use strict';
/**
 * Why a server refuses this worker's connection, in the worker's own flags' terms: the Node twin
 * of paramserver/security.py's tls_problem, with its wording. grpc-js says only UNAVAILABLE; a
 * handshake made here with the same files and name tells apart the server's certificate not
 * trusted (another CA, another name), a plaintext server, a client certificate it wants, and (no
 * --tls-ca) a server that speaks TLS.
 */

const net = require('net');
const tls = require('tls');
const { dialHost } = require('./tcp');

/** The server's alerts that say it wants a client certificate, or not the one sent (under TLS 1.3
 * it may just close the connection after the handshake). */
const CERTIFICATE_WANTED = new Set(['ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED', 'ERR_SSL_SSLV3_ALERT_HANDSHAKE_FAILURE',
  'ERR_SSL_TLSV1_ALERT_UNKNOWN_CA', 'ERR_SSL_SSLV3_ALERT_BAD_CERTIFICATE']);

/**
 * How the handshake with `host:port` ends: {secure: true, data} once it completed (`data`: the
 * server spoke first, as an HTTP/2 server does; false: it closed the connection), {error} when it
 * failed, null when nothing answered in `timeout` seconds.
 */
function handshake(host, port, options, timeout) {
  return new Promise((resolve) => {
    let socket;
    try {
      socket = tls.connect({ host, port, ALPNProtocols: ['h2'], ...options });
    } catch (e) { // (files TLS cannot use, which config.js refuses at start): nothing to tell
      resolve(null);
      return;
    }
    let secure = false;
    const end = (outcome) => {
      socket.removeAllListeners();
      socket.on('error', () => {});
      socket.destroy();
      resolve(outcome);
    };
    socket.setTimeout(timeout * 1000, () => end(secure ? { secure, data: false } : null));
    socket.once('secureConnect', () => {
      secure = true;
      socket.once('data', () => end({ secure, data: true }));
    });
    socket.on('error', (error) => end(secure ? { secure, data: false, error } : { error }));
    socket.once('close', () => end(secure ? { secure, data: false } : { error: null }));
  });
}

/**
 * Why the server at `address` (HOST:PORT) refuses this worker's connection made with `security`
 * (config.js securityOf), in its flags' terms; '' when it does not, or when it cannot tell
 * (nothing listens there, say). For the error logged once a Join failed UNAVAILABLE.
 */
async function tlsProblem(address, security, timeout = 3) {
  const host = dialHost(address);
  const port = Number(address.slice(address.lastIndexOf(':') + 1));
  if (host === null || !Number.isInteger(port) || port <= 0) return '';
  if (!security.tls) { // plaintext: a TLS server's handshake, its certificate unchecked, completes
    const outcome = await handshake(host, port, { rejectUnauthorized: false }, timeout);
    return outcome && outcome.secure
      ? 'it answers in TLS, not plaintext: give --tls-ca, the CA that signed its certificate'
      : '';
  }
  const name = security.serverName || host;
  const options = { ca: security.ca || undefined, cert: security.cert || undefined, key: security.key || undefined };
  if (security.serverName || !net.isIP(host)) options.servername = name; // (SNI takes no IP address)
  const outcome = await handshake(host, port, options, timeout);
  if (outcome === null || (outcome.secure && outcome.data)) return '';
  const error = outcome.error;
  if (!outcome.secure && error && error.code === 'ERR_TLS_CERT_ALTNAME_INVALID') {
    const mismatch = net.isIP(name) ? 'IP address mismatch' : 'Hostname mismatch';
    return `its certificate is not trusted (${mismatch}, certificate is not valid for '${name}'.): set `
      + '--tls-server-name to a name the certificate holds';
  }
  if (!outcome.secure && error && !error.syscall && !error.library && error.code && !String(error.code).startsWith('ERR_')) {
    // (OpenSSL's verification, e.g. UNABLE_TO_VERIFY_LEAF_SIGNATURE: a CA that did not sign it)
    return `its certificate is not trusted (${error.message}): is --tls-ca the CA that signed it?`;
  }
  if (error && error.code === 'ERR_SSL_WRONG_VERSION_NUMBER') {
    return 'it answers in plaintext, not TLS: unset --tls-ca to talk to it so, or start it with --tls-cert and --tls-key';
  }
  if (error && !CERTIFICATE_WANTED.has(error.code)) {
    return error.library && error.reason ? `the TLS handshake failed (${error.reason})` : '';
  }
  if (!outcome.secure && !error) return ''; // (closed before the handshake: not TLS's doing that we can tell)
  if (security.cert) {
    return 'it closed the connection after the TLS handshake: it wants a client certificate its --tls-client-ca '
      + 'signed, is --tls-cert one?';
  }
  return 'it closed the connection after the TLS handshake: it wants a client certificate (mutual TLS): give one with '
    + '--tls-cert and --tls-key';
}

module.exports = { tlsProblem };
