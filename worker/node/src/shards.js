'use strict';
/**
 * Pushes and pulls of a run whose parameters several servers hold (Assignment.shard_map): the Node
 * twin of paramserver/shards.py (and of refusals.py, its checks), doing what the .proto's "Shards"
 * section asks of a worker.
 *
 * Shards has PsClient's data plane methods, push and pull, with the same arguments and answers, so
 * the trainer uses either. Each call goes to every shard at once (one PsClient per shard, over its
 * TCP data plane when the map gives a `data_port`, else gRPC to its `address`), each with the rows
 * of each tensor that shard holds: a Piece is rows [row_start, row_end) of a tensor, one contiguous
 * range of its C-order elements, pushed and pulled as a tensor of shape (rows, shape[1:]...) (a
 * scalar is its one row, shape []). Those are Float32Array views of the caller's whole arrays, so
 * a pull writes straight into them and a push sends from them, with no copies. A push one server
 * would refuse whole (a NaN/Inf value) is refused before any shard sees it, as each shard checks
 * only its rows (it would refuse its part while the others applied theirs: a torn push).
 *
 * A call is complete when every shard answered. When some did not, the error is thrown, at once
 * when it is not retryable (the calls still waiting, e.g. a pull parked on another shard, are
 * cancelled), and the retry goes to every shard again: a shard that has the push acknowledges a
 * duplicate (each de-duplicates on its own: exactly-once per shard). Nothing is kept across a
 * failure, neither acknowledgements nor pulled answers, as a server may go back to a checkpoint in
 * between and lose a push it had acknowledged (a retry only to the shards that had not
 * acknowledged could hang a BSP run: the one that lost the push would wait for it for ever). Under
 * BSP (staleness 0) the shards' answers to one pull must hold the same guaranteed clock, else the
 * pull fails retryably (UNAVAILABLE). Answers combine as the least guarantee: the least clock, min
 * clock, guaranteed clock and version; duplicate only when every shard says so; a finished run's
 * state over a running one; the tightest staleness bound any shard says (a schedule's step). Of several refusals the one thrown is a CLOCK_AHEAD (the lowest
 * next_clock: the trainer rewinds there, even to its own clock), else the first that is not
 * retryable, else the first. After a rewind the trainer calls refresh: a shard that restarted has
 * another TCP data plane port, which GetRun's map tells.
 */

const { PsError, Status } = require('./client');
const { messages } = require('./proto');

/** Run states, the most final first: the combined state is the first any shard reports. */
const STATE_ORDER = ['RUN_STATE_FAILED', 'RUN_STATE_STOPPED', 'RUN_STATE_COMPLETED', 'RUN_STATE_PENDING', 'RUN_STATE_RUNNING'];

class ShardMapError extends Error {}

function combinedState(states) {
  const rank = (s) => (STATE_ORDER.includes(s) ? STATE_ORDER.indexOf(s) : STATE_ORDER.length);
  return states.reduce((a, b) => (rank(b) < rank(a) ? b : a));
}

function min(values) {
  return values.reduce((a, b) => Math.min(a, b));
}

/**
 * The staleness bound the shards' answers say (a schedule's step): the tightest, as a shard
 * refuses what its own bound does not allow; -1 (unbounded) only when every shard says so;
 * undefined when none says one.
 */
function bound(answers) {
  const said = answers.map((a) => a.staleness).filter((s) => s !== undefined && s !== null).map(Number);
  if (!said.length) return undefined;
  const finite = said.filter((s) => s >= 0);
  return finite.length ? min(finite) : -1;
}

/** `out` with the bound `answers` say, if they say one (the key is absent otherwise). */
function withBound(out, answers) {
  const s = bound(answers);
  return s === undefined ? out : { ...out, staleness: s };
}

/** Elements in one row of a tensor of `shape` (its first dimension's rows; a scalar is one row). */
function rowSize(shape) {
  return shape.slice(1).reduce((a, b) => a * b, 1);
}

/**
 * NaN/Inf values in `values` (a Float32Array), as a server counts them: it refuses such a push
 * whole, but only the shards holding them would see them. One pass (~7 ms for 5.8M values here).
 */
function nonFinite(values) {
  let bad = 0;
  for (let i = 0; i < values.length; i++) if (!Number.isFinite(values[i])) bad += 1;
  return bad;
}

/** What one server answers a push it refuses whole (INVALID_ARGUMENT, INVALID_GRADIENT), in its words. */
function refusedPush(message) {
  const info = messages().ErrorInfo;
  return new PsError(Status.INVALID_ARGUMENT, message, info.decode(info.encode({ reason: 'ERROR_REASON_INVALID_GRADIENT' })), 'PushGradient');
}

/** The refusal a partial failure throws (see the module comment). */
function worst(failures) {
  const rewinds = failures.filter((e) => e instanceof PsError && e.reason === 'ERROR_REASON_CLOCK_AHEAD');
  if (rewinds.length) return rewinds.reduce((a, b) => (b.info.next_clock < a.info.next_clock ? b : a));
  return failures.find((e) => !(e instanceof PsError && e.retryable)) || failures[0];
}

/**
 * Check a shard map against the run's tensors ({name: shape}): every piece names one of them,
 * within its rows, and every row of every tensor is on exactly one shard. Throws ShardMapError.
 */
function checkMap(shards, shapes) {
  const rows = {};
  for (const shard of shards) {
    for (const pc of shard.pieces) {
      const shape = shapes[pc.name];
      const n = shape === undefined ? 0 : (shape.length ? shape[0] : 1);
      const [lo, hi] = [Number(pc.row_start), Number(pc.row_end)];
      if (shape === undefined || !(lo <= hi && hi <= n)) {
        throw new ShardMapError(`the shard map gives server ${shard.index} rows [${lo}, ${hi}) of ${pc.name}, `
          + `which the run ${shape === undefined ? 'does not have' : `has ${n} rows of`}`);
      }
      (rows[pc.name] = rows[pc.name] || []).push([lo, hi]);
    }
  }
  for (const [name, shape] of Object.entries(shapes)) {
    const ranges = (rows[name] || []).sort((a, b) => a[0] - b[0]);
    let next = 0;
    for (const [lo, hi] of ranges) {
      if (lo !== next) break;
      next = hi;
    }
    const n = shape.length ? shape[0] : 1;
    if (next !== n || ranges.some(([lo], i) => i && lo < ranges[i - 1][1])) {
      throw new ShardMapError(`the shard map does not hold every row of ${name} exactly once: ${JSON.stringify(ranges)} of ${n} rows`);
    }
  }
}

class Shards {
  /**
   * `shardMap`: the Assignment's (shards with index, address, data_port, pieces); `shapes`: every
   * tensor's whole shape ({name: [dims]}, the run spec's); `connect(shard)`: a PsClient of a shard.
   */
  constructor(shardMap, shapes, connect, staleness = -1) {
    this.shards = shardMap.shards.map((s) => ({
      index: s.index,
      address: s.address,
      dataPort: Number(s.data_port || 0),
      pieces: s.pieces.map((pc) => ({ name: pc.name, rowStart: Number(pc.row_start), rowEnd: Number(pc.row_end) })),
    }));
    this.shapes = shapes;
    this.staleness = staleness;
    checkMap(shardMap.shards, shapes);
    this.clients = shardMap.shards.map((s) => connect(s));
  }

  /** Clients of every shard, configured as `client` is (timeout, sizes, security, data plane). */
  static beside(client, shardMap, spec) {
    const shapes = Object.fromEntries(spec.params.map((p) => [p.name, p.shape.map(Number)]));
    return new Shards(shardMap, shapes, (s) => client.sibling(s.address, Number(s.data_port || 0)), Number(spec.staleness));
  }

  /**
   * Learn every shard's TCP data plane port again from the run (GetRun through `client`, the
   * server joined): a server that restarted has another one (the others stay as they are); and
   * the limit of a parked pull `client` was told last (server 0's, by a Join or Heartbeat), as
   * the Python SDK's Shards.refresh does.
   */
  async refresh(client, runId) {
    const run = await client.getRun(runId);
    const shards = (run.shard_map && run.shard_map.shards) || [];
    shards.forEach((s, i) => {
      if (i < this.clients.length) {
        this.shards[i].dataPort = Number(s.data_port || 0);
        this.clients[i].dataPortIs(this.shards[i].dataPort);
        if (client.serverMaxWait) this.clients[i].serverMaxWait = client.serverMaxWait;
      }
    });
  }

  /** Cancel every call in flight on every shard (the clients stay usable). */
  cancelAll() {
    for (const c of this.clients) c.cancelAll();
  }

  close() {
    for (const c of this.clients) c.close();
  }

  // ---------------------------------------------------------------- slicing
  /** The `pieces` of `arrays` ({name: Float32Array of the whole tensor}): [name, view, piece shape] each. */
  rows(arrays, pieces) {
    return pieces.map(({ name, rowStart, rowEnd }) => {
      const shape = this.shapes[name];
      const a = arrays[name];
      if (!shape.length) return [name, a, shape];
      const n = rowSize(shape);
      return [name, a.subarray(rowStart * n, rowEnd * n), [rowEnd - rowStart, ...shape.slice(1)]];
    });
  }

  /** `into` with a Float32Array of the whole size for every tensor (new where missing or unfit). */
  arrays(into) {
    for (const [name, shape] of Object.entries(this.shapes)) {
      const n = shape.reduce((a, b) => a * b, 1);
      if (!(into[name] instanceof Float32Array) || into[name].length !== n) into[name] = new Float32Array(n);
    }
    return into;
  }

  /**
   * `call(client, shard, i)` on every shard; resolves to the answers in shard order once all are
   * in, else throws the worst refusal (see worst), at once when it is not retryable: the others'
   * calls are cancelled.
   */
  async each(call) {
    const todo = this.clients.map((_, i) => i);
    let fatal = false;
    const results = await Promise.allSettled(todo.map((i) => call(this.clients[i], this.shards[i], i).catch((e) => {
      if (!fatal && !(e instanceof PsError && e.retryable)) {
        fatal = true; // the call fails whatever the others answer: no waiting for their parked pulls
        todo.forEach((j) => j !== i && this.clients[j].cancelAll());
      }
      throw e;
    })));
    const failures = results.filter((r) => r.status === 'rejected').map((r) => r.reason);
    if (failures.length) throw worst(failures.filter((e) => !(fatal && e instanceof PsError && e.code === Status.CANCELLED)));
    return results.map((r) => r.value);
  }

  // ---------------------------------------------------------------- the data plane
  /**
   * As PsClient.push: `grads` is [[name, Float32Array of the whole tensor, shape], ...]. A push
   * holding a NaN/Inf is refused before any shard is sent anything, as one server refuses it
   * (PsError INVALID_ARGUMENT, ERROR_REASON_INVALID_GRADIENT, in its words): each shard sees only
   * its rows, and the one holding the value would refuse its part while the others applied theirs.
   */
  async push(runId, rank, incarnation, clock, grads, loss = 0, timeoutS = undefined) {
    const arrays = Object.fromEntries(grads.map(([name, arr]) => [name, arr]));
    for (const name of Object.keys(this.shapes)) {
      if (!(arrays[name] instanceof Float32Array)) throw new TypeError(`push ${clock}: no gradient for ${name}`);
    }
    for (const [name, values] of Object.entries(arrays)) {
      const bad = nonFinite(values);
      if (bad) throw refusedPush(`gradient '${name}' contains ${bad} NaN/Inf value(s); nothing was applied`);
    }
    const acks = await this.each((c, s) => c.push(runId, rank, incarnation, clock, this.rows(arrays, s.pieces), loss, timeoutS));
    return withBound({
      clock: min(acks.map((a) => Number(a.clock))),
      duplicate: acks.every((a) => a.duplicate),
      min_clock: min(acks.map((a) => Number(a.min_clock))),
      run_state: combinedState(acks.map((a) => a.run_state)),
    }, acks);
  }

  /**
   * As PsClient.pull: every shard's pieces written into the rows of `into`'s whole arrays (made
   * where missing). With `names`, only the shards holding some of them are asked.
   */
  async pull(runId, rank, incarnation, clock, { into = {}, names = [], maxWait = undefined, timeoutS = undefined } = {}) {
    const out = this.arrays(into);
    const wanted = new Set(names);
    const unknown = names.filter((n) => !(n in this.shapes));
    if (unknown.length) throw new PsError(Status.INVALID_ARGUMENT, `the run has no tensor ${unknown.join(', ')}`, null, 'PullParams');
    const answers = await this.each(async (c, s, i) => {
      const mine = s.pieces.filter((pc) => !wanted.size || wanted.has(pc.name));
      if (wanted.size && !mine.length) return null; // this shard holds none of the names asked for
      const views = this.rows(out, mine);
      const res = await c.pull(runId, rank, incarnation, clock, {
        into: Object.fromEntries(views.map(([name, view]) => [name, view])),
        names: wanted.size ? mine.map((pc) => pc.name) : [],
        maxWait,
        timeoutS,
      });
      for (const [name, view, shape] of views) {
        // The assembler writes into a view only when the shard sent the piece's shape.
        if (res.tensors[name] !== view || !(name in res.shapes)) {
          throw new PsError(Status.INTERNAL, `server ${s.index} (${s.address}) sent ${name} as ${JSON.stringify(res.shapes[name] || null)}, `
            + `not its piece ${JSON.stringify(shape)}`, null, 'PullParams');
        }
      }
      return res;
    });
    const pulled = answers.filter((r) => r !== null);
    const clocks = new Set(pulled.map((r) => Number(r.guaranteed_clock)));
    if (this.staleness === 0 && incarnation && clocks.size > 1) {
      throw new PsError(Status.UNAVAILABLE, `the shards answered the pull of clock ${clock} from clocks ${[...clocks].join(', ')}: `
        + 'a server went back to a checkpoint meanwhile; pull again', null, 'PullParams');
    }
    const tensors = wanted.size ? Object.fromEntries(Object.entries(out).filter(([n]) => wanted.has(n))) : out;
    return withBound({
      guaranteed_clock: min(pulled.map((r) => r.guaranteed_clock)),
      version: min(pulled.map((r) => r.version)),
      run_state: combinedState(pulled.map((r) => r.run_state)),
      tensors,
      shapes: Object.fromEntries(Object.keys(tensors).map((n) => [n, this.shapes[n]])),
    }, pulled);
  }
}

module.exports = { Shards, ShardMapError, checkMap, combinedState, rowSize };
