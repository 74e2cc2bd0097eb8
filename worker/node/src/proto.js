'use strict';
/**
 * Loads THE contract, protos/paramserver/v1/paramserver.proto, at run time (no copy of it here).
 *
 * google/protobuf/duration.proto and timestamp.proto are resolved by protobufjs's bundled
 * well-known types (proto-loader's Root checks them before the include path).
 *
 * Conversion options, used consistently by every module: keepCase (field names as in the .proto:
 * run_id, guaranteed_clock), longs as Number (clocks, counters and shapes stay far below 2^53),
 * enums as String ("RUN_STATE_RUNNING"), bytes as Buffer, defaults filled in, oneofs (the
 * OptimizerSpec's `kind` tells which optimizer is set).
 */

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

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
    const pkg = grpc.loadPackageDefinition(definition).paramserver.v1;
    cached = { grpc, pkg, definition };
  }
  return cached;
}

module.exports = { loadContract, LOADER_OPTIONS, PROTO_ROOT, PROTO_FILE };
