'use strict';
// The TCP data plane's client framing (src/tcp.js) against a scripted server on 127.0.0.1.
const test = require('node:test');
const assert = require('node:assert/strict');
const net = require('net');

const { TcpCall, dialHost, hello, frameHeader, statusBody, MESSAGE, STATUS, VERSION } = require('../src/tcp');
const { loadContract, messages } = require('../src/proto');

const { grpc, definition } = loadContract();
const pull = definition['paramserver.v1.ParameterService'].PullParams;
const codecs = messages();

/** A STATUS frame as the server sends it (version 2): the header, then a serialized Status. */
function statusFrame(code, message, error = null) {
  const body = codecs.Status.encode({ code, message, error });
  return Buffer.concat([frameHeader(STATUS, code, body.length), body]);
}

/** The ErrorInfo a decoder gives for `fields`, defaults filled in. */
function info(fields) {
  return codecs.ErrorInfo.decode(codecs.ErrorInfo.encode(fields));
}

/** A one-connection server running `script(socket, received)`; resolves to its port. */
function server(script) {
  return new Promise((resolve) => {
    const srv = net.createServer((sock) => {
      let got = Buffer.alloc(0);
      sock.on('data', (d) => {
        got = Buffer.concat([got, d]);
        script(sock, got);
      });
      sock.on('error', () => {});
    });
    srv.listen(0, '127.0.0.1', () => resolve({ port: srv.address().port, close: () => srv.close() }));
  });
}

function outcome(call) {
  return new Promise((resolve) => {
    const data = [];
    call.on('data', (m) => data.push(m));
    call.on('status', (s) => resolve({ data, status: s }));
  });
}

test('a pull goes out framed and its answer, sent in odd pieces, comes back decoded', async () => {
  const values = Buffer.from(Float32Array.from([1.5, -2, 3]).buffer);
  const answer = pull.responseSerialize({
    guaranteed_clock: 3, final: true, tensors: [{ name: 'w', shape: [3], dtype: 'DATA_TYPE_FLOAT32', offset: 0, data: values }],
  });
  let seen = null;
  const srv = await server((sock, got) => {
    if (seen || got.length < 8 + 16) return;
    const length = Number(got.readBigUInt64LE(8 + 8));
    if (got.length < 8 + 16 + length) return;
    seen = { hello: got.subarray(0, 8), kind: got.readUInt8(8), req: pull.requestDeserialize(got.subarray(24, 24 + length)) };
    const out = Buffer.concat([got.subarray(0, 8), frameHeader(MESSAGE, 0, answer.length), answer,
      statusFrame(grpc.status.NOT_FOUND, 'gone', { reason: 'ERROR_REASON_RUN_NOT_FOUND' })]);
    for (let i = 0; i < out.length; i += 7) sock.write(out.subarray(i, i + 7)); // the reader must reassemble
  });
  const call = new TcpCall('127.0.0.1', srv.port, 'PullParams');
  const done = outcome(call);
  call.write({ run_id: 'r', rank: 1, incarnation: 2, clock: 3 });
  const { data, status } = await done;
  srv.close();
  assert.deepEqual(seen.hello, hello('PullParams'));
  assert.equal(seen.kind, MESSAGE);
  assert.equal(seen.req.run_id, 'r');
  assert.equal(seen.req.clock, 3);
  assert.equal(data.length, 1);
  assert.equal(data[0].guaranteed_clock, 3);
  assert.deepEqual(Buffer.from(data[0].tensors[0].data), values);
  assert.deepEqual(status, { code: grpc.status.NOT_FOUND, details: 'gone', info: info({ reason: 'ERROR_REASON_RUN_NOT_FOUND' }) });
});

test('the hello is version 2: "PSDP", 2, the method, two zero bytes', () => {
  assert.equal(VERSION, 2);
  assert.deepEqual(hello('PushGradient'), Buffer.from([0x50, 0x53, 0x44, 0x50, 2, 1, 0, 0]));
  assert.deepEqual(hello('PullParams'), Buffer.from([0x50, 0x53, 0x44, 0x50, 2, 2, 0, 0]));
});

test('a STATUS body is a Status: its message and ErrorInfo; a body that is no Status of that code is text', () => {
  const clockAhead = { reason: 'ERROR_REASON_CLOCK_AHEAD', next_clock: 7 };
  const body = codecs.Status.encode({ code: 9, message: 'push for clock 9: next clock is 7', error: clockAhead });
  assert.deepEqual(statusBody(9, body), { details: 'push for clock 9: next clock is 7', info: info(clockAhead) });
  assert.deepEqual(statusBody(9, codecs.Status.encode({ code: 9, message: 'm' })), { details: 'm', info: null });
  // A version 1 server's refusal of this hello: the bare message.
  assert.deepEqual(statusBody(12, Buffer.from('unsupported version 2')), { details: 'unsupported version 2', info: null });
  assert.deepEqual(statusBody(12, Buffer.from('no')), { details: 'no', info: null });
});

test('a refusal instead of the echo ends the stream with its status; only UNIMPLEMENTED means "use gRPC"', { timeout: 10000 }, async () => {
  const srv = await server((sock, got) => {
    if (got.length >= 8) sock.end(statusFrame(grpc.status.UNAVAILABLE, 'no', { reason: 'ERROR_REASON_SHUTTING_DOWN' }));
  });
  let unreachable = false;
  const call = new TcpCall('127.0.0.1', srv.port, 'PushGradient', { onUnreachable: () => { unreachable = true; } });
  const { status } = await outcome(call);
  srv.close();
  assert.deepEqual(status, { code: grpc.status.UNAVAILABLE, details: 'no', info: info({ reason: 'ERROR_REASON_SHUTTING_DOWN' }) });
  assert.equal(unreachable, false);
});

test('a hello refused with UNIMPLEMENTED (another version; a version 1 server\'s bare text too) means "use gRPC": '
  + 'UNAVAILABLE, retried', { timeout: 10000 }, async () => {
  const v1 = Buffer.concat([frameHeader(STATUS, grpc.status.UNIMPLEMENTED, 11), Buffer.from('version 2?!')]);
  const v3 = statusFrame(grpc.status.UNIMPLEMENTED, 'version 2?!', { reason: 'ERROR_REASON_UNSUPPORTED' });
  for (const refusal of [v1, v3]) {
    const srv = await server((sock, got) => {
      if (got.length >= 8) sock.end(refusal);
    });
    let why = null;
    const call = new TcpCall('127.0.0.1', srv.port, 'PushGradient', { onUnreachable: (w) => { why = w; } });
    const { status } = await outcome(call);
    srv.close();
    assert.equal(status.code, grpc.status.UNAVAILABLE);
    assert.match(status.details, /another version of the framing \(version 2\?!\): using gRPC/);
    assert.equal(status.info, null);
    assert.equal(why, 'version 2?!');
  }
});

test('a port nobody listens on is unreachable: UNAVAILABLE, and the client is told to use gRPC', async () => {
  const srv = await server(() => {});
  const { port } = srv;
  srv.close();
  let why = null;
  const call = new TcpCall('127.0.0.1', port, 'PullParams', { onUnreachable: (w) => { why = w; } });
  const { status } = await outcome(call);
  assert.equal(status.code, grpc.status.UNAVAILABLE);
  assert.match(why, /ECONNREFUSED/);
});

test('dialHost names the host of a gRPC target', () => {
  assert.equal(dialHost('ps:50051'), 'ps');
  assert.equal(dialHost('dns:///ps.example:50051'), 'ps.example');
  assert.equal(dialHost('[::1]:50051'), '::1');
  for (const t of ['unix:/tmp/ps.sock', 'ps', '::1', 'ipv4:10.0.0.1:1,10.0.0.2:2']) assert.equal(dialHost(t), null, t);
});

test('cancel() ends a stream waiting for an answer with CANCELLED, as a grpc-js call does', async () => {
  const srv = await server((sock, got) => {
    if (got.length === 8) sock.write(got); // the echo, then silence
  });
  const call = new TcpCall('127.0.0.1', srv.port, 'PullParams');
  const done = outcome(call);
  call.write({ run_id: 'r' });
  setTimeout(() => call.cancel(), 50);
  const { status } = await done;
  srv.close();
  assert.equal(status.code, grpc.status.CANCELLED);
});

test('a hello refused with STREAM_LIMIT (the server\'s streams are full) means "use gRPC": the operation fails '
  + 'retryably and the client\'s next streams go over gRPC', { timeout: 10000 }, async () => {
  const { PsClient } = require('../src/client');
  let hellos = 0;
  const srv = await server((sock, got) => {
    if (got.length < 8) return;
    hellos += 1;
    sock.end(statusFrame(grpc.status.UNAVAILABLE, 'more than 10 descriptors are held', { reason: 'ERROR_REASON_STREAM_LIMIT' }));
  });
  const client = new PsClient('127.0.0.1:1', { timeout: 5 }); // (gRPC is never dialled here)
  client.dataPortIs(srv.port);
  assert.equal(client.transport(), 'tcp');
  const err = await client.pull('r', 0, 1, 0, { maxWait: 1 }).then(() => null, (e) => e);
  client.close();
  srv.close();
  assert.ok(err, 'the pull was refused');
  assert.equal(err.code, grpc.status.UNAVAILABLE);
  assert.equal(err.retryable, true);
  assert.equal(err.reason, 'ERROR_REASON_STREAM_LIMIT');
  assert.match(err.details, /takes no more streams \(more than 10 descriptors are held\): using gRPC/);
  assert.equal(hellos, 1);
  assert.equal(client.transport(), 'grpc');
  assert.equal(client.streamsOpened.tcp_unreachable, 1);
});
