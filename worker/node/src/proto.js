'use strict';
/**
 * Loads THE contract, protos/paramserver/v1/paramserver.proto, at run time (no copy of it here):
 * loadContract() for the services (proto-loader + grpc-js), messages() for the codecs of the
 * messages that travel outside a gRPC call (ErrorInfo in the `paramserver-error-bin` trailer,
 * Status in the TCP data plane's STATUS frame), which proto-loader does not give.
 *
 * google/protobuf/duration.proto and timestamp.proto are resolved by protobufjs's bundled
 * well-known types (a Root checks them before the include path; nothing of Google's is read
 * from PROTO_ROOT).
 *
 * Conversion options, used consistently by every module: keepCase (field names as in the .proto:
 * run_id, guaranteed_clock), longs as Number (clocks, counters and shapes stay far below 2^53; a run's
 * seed, which may not, is a BigInt: exactSeed),
 * enums as String ("RUN_STATE_RUNNING"), bytes as Buffer, defaults filled in, oneofs (the
 * OptimizerSpec's `kind` tells which optimizer is set).
 */

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_ROOT = process.env.PS_PROTO_ROOT || path.resolve(__dirname, '..', '..', '..', 'protos');
const PROTO_FILE = 'paramserver/v1/paramserver.proto';

const LOADER_OPTIONS = {
  keepCase: true,
  longs: Number,
  enums: String,
  bytes: Buffer,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_ROOT],
};

let cached = null;

/** {grpc, pkg: paramserver.v1 namespace, definition}; loaded once per process. */
function loadContract() {
  if (!cached) {
    const definition = protoLoader.loadSync(PROTO_FILE, LOADER_OPTIONS);
    exactSeed(definition['paramserver.v1.WorkerService'].Join);
    const pkg = grpc.loadPackageDefinition(definition).paramserver.v1;
    cached = { grpc, pkg, definition };
  }
  return cached;
}

/**
 * The codec of one message of the contract, converting as every module does (LOADER_OPTIONS):
 * decode(bytes) -> a plain object (defaults filled in, enums as names, longs as Number; throws on
 * bytes that do not parse), encode(object) -> Buffer.
 */
function codec(type) {
  return {
    type,
    decode: (bytes) => type.toObject(type.decode(bytes), LOADER_OPTIONS),
    encode: (object) => Buffer.from(type.encode(type.fromObject(object)).finish()),
  };
}

/**
 * A JoinResponse's RunSpec.seed as a BigInt, exactly: a uint64 that may be past 2^53 (psctl launch
 * --seed takes any), which longs as Number would round, and the seed picks every rank's shard and
 * batches (data.js): rounded, this worker trained on other examples than the Python ranks take it to.
 */
function exactSeed(join) {
  const decode = join.responseDeserialize;
  join.responseDeserialize = (bytes) => {
    const resp = decode(bytes);
    if (resp.assignment && resp.assignment.spec) {
      const raw = messages().JoinResponse.type.decode(bytes);
      resp.assignment.spec.seed = BigInt(String(raw.assignment.spec.seed));
    }
    return resp;
  };
}

let messagesCached = null;

/** {ErrorInfo, Status, JoinResponse}: the codecs of the error messages (see codec()) and of Join's answer
 * (exactSeed); loaded once per process. */
function messages() {
  if (!messagesCached) {
    const root = new protobuf.Root();
    // Imports resolve against PROTO_ROOT only (google/protobuf/*: protobufjs's bundled copies).
    root.resolvePath = (origin, target) => (path.isAbsolute(target) ? target : path.join(PROTO_ROOT, target));
    root.loadSync(PROTO_FILE, { keepCase: true });
    root.resolveAll();
    const v1 = 'paramserver.v1.';
    messagesCached = {
      ErrorInfo: codec(root.lookupType(`${v1}ErrorInfo`)),
      Status: codec(root.lookupType(`${v1}Status`)),
      JoinResponse: codec(root.lookupType(`${v1}JoinResponse`)),
    };
  }
  return messagesCached;
}

module.exports = { loadContract, messages, LOADER_OPTIONS, PROTO_ROOT, PROTO_FILE };
