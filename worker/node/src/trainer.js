'use strict';
/**
 * The SSP training loop of one rank (the Node twin of worker/trainer.py).
 *
 * At clock c the worker needs parameters containing every update of iterations < c - s. A pull
 * says which clock it guarantees (guaranteed_clock); while guaranteed >= c - s (finite s > 0) the
 * worker reuses its copy and skips the pull (pulls_skipped). s = 0 and unbounded s = -1 always
 * pull. With plain SGD (no weight decay) and s > 0 the worker applies its own gradient to the
 * cached copy, as the server does, so a reused copy still contains its own writes.
 *
 * Rank 0 evaluates on the test split every eval_every iterations and, at the end, on the final
 * parameters (a pull at clock = iterations, which waits for every rank), then reports and leaves.
 *
 * Failures: UNAVAILABLE / DEADLINE_EXCEEDED on push, pull or report are retried with jittered
 * backoff (a retried push is exactly-once on the server: same key run_id, rank, incarnation, clock).
 * After each failure a Heartbeat asks the server for this rank's clock: a server restarted from a
 * checkpoint may know it at an earlier clock, and the loop rewinds there (those iterations were
 * lost). A push or pull refused with reason ERROR_REASON_CLOCK_AHEAD says so itself (its
 * info.next_clock): the loop rewinds there at once. Errors are told apart by code and reason,
 * never by their message's text. FAILED_PRECONDITION, NOT_FOUND or retries running out end the
 * assignment (back to Join). A
 * heartbeat that finds the run stopped/failed or this incarnation stale aborts the loop.
 * Data or model errors every rank would hit leave with LEAVE_REASON_FAILED (fails the run). A
 * message over this worker's own --max-message-bytes (OverClientLimit) is this worker's setting,
 * not the run's failure: it gives the rank back (LEAVE_REASON_SHUTDOWN, saying which flag to raise).
 *
 * Sharded runs (the Assignment has a shard_map with shards): pushes and pulls go to every shard
 * at once through shards.js, which has the client's push and pull; everything above holds as is.
 * A push or pull is complete when every shard answered, its retry goes to every shard again (each
 * de-duplicates), and a CLOCK_AHEAD from any shard rewinds the loop. Heartbeat, ReportMetrics and Leave
 * go to the server joined (any server of a cluster forwards them to server 0).
 */

const { OverClientLimit, PsError, Status, durationSeconds, nowTimestamp } = require('./client');
const { BatchSampler, DatasetError, loadDataset, shardIndices } = require('./data');
const { ModelSpecError, buildModel } = require('./models');
const { Shards } = require('./shards');

const FINISHED = ['RUN_STATE_COMPLETED', 'RUN_STATE_STOPPED', 'RUN_STATE_FAILED'];

class Aborted extends Error {}

/** The server knows this rank at an earlier clock (it restarted from a checkpoint): go back. */
class Rewind extends Error {
  constructor(clock) {
    super(`rewind to clock ${clock}`);
    this.clock = clock;
  }
}
class TrainingError extends Error {}

function sleep(ms, trainer) {
  return new Promise((resolve) => {
    const t = setTimeout(() => {
      if (trainer) trainer.sleepers.delete(done);
      resolve();
    }, ms);
    const done = () => {
      clearTimeout(t);
      resolve();
    };
    if (trainer) trainer.sleepers.add(done);
  });
}

class Trainer {
  constructor(client, a, config, log) {
    this.client = client;
    /** Where pushes and pulls go: the server joined, or every server of a sharded run (set up in setup()). */
    this.plane = client;
    this.a = a;
    this.spec = a.spec;
    this.config = config;
    this.log = log;
    this.stats = { iterations: 0, pulls: 0, pullsSkipped: 0, retries: 0, rewinds: 0, lastLoss: NaN, finalAccuracy: null };
    this.clock = Number(a.start_clock);
    this.runState = 'RUN_STATE_RUNNING';
    const s = Number(this.spec.staleness);
    this.staleness = s < 0 ? null : s;
    const perRank = (this.spec.slowdown || {})[String(a.rank)];
    this.slowdown = Math.max(config.slowdown, perRank || 1);
    const opt = this.spec.optimizer || {};
    this.localSgdLr = opt.kind === 'sgd' && opt.sgd && !opt.sgd.weight_decay ? Math.fround(opt.sgd.learning_rate) : null;
    this.pending = [];
    this.lastReport = Date.now();
    this.samples = 0;
    this.aborted = null;
    this.sleepers = new Set();
  }

  /** Stop the loop from outside (heartbeat, shutdown): cancels sleeps and calls in flight. */
  abort(reason) {
    if (this.aborted) return;
    this.aborted = reason;
    for (const wake of this.sleepers) wake();
    this.sleepers.clear();
    this.client.cancelAll();
    if (this.plane !== this.client) this.plane.cancelAll();
  }

  /** Close the shards' connections, if any (the joined server's client is the caller's). */
  closePlane() {
    if (this.plane !== this.client) this.plane.close();
    this.plane = this.client;
  }

  check() {
    if (this.aborted) throw new Aborted(this.aborted);
  }

  /** Load data and model; throws DatasetError / ModelSpecError (fatal for the run). */
  setup() {
    const data = loadDataset(this.config.dataDir, this.spec.data_spec_json);
    let modelSpec;
    try {
      modelSpec = JSON.parse(this.spec.model_spec_json || '{}');
    } catch (e) {
      throw new ModelSpecError(`the run's model spec is not JSON (${e.message}): ${this.spec.model_spec_json}`);
    }
    const model = buildModel(modelSpec, data.nFeatures, data.nOutputs);
    if (model.task !== data.task) {
      throw new ModelSpecError(`model ${JSON.stringify(modelSpec)} does a ${model.task} task but the data is ${data.task}`);
    }
    const theirs = Object.fromEntries(this.spec.params.map((p) => [p.name, p.shape.map(Number).join(',')]));
    const mine = Object.fromEntries(model.paramSpecs().map((p) => [p.name, p.shape.join(',')]));
    const same = Object.keys(theirs).length === Object.keys(mine).length
      && Object.keys(mine).every((k) => theirs[k] === mine[k]);
    if (!same) {
      throw new ModelSpecError(`the run's parameters ${JSON.stringify(theirs)} do not match the model's ${JSON.stringify(mine)}`);
    }
    this.data = data;
    this.model = model;
    this.specs = model.paramSpecs();
    this.shard = shardIndices(data.nTrain, this.a.rank, this.spec.num_workers, BigInt(this.spec.seed));
    if (!this.shard.length) { // (psctl launch refuses such a run; another client may have created it)
      const n = data.nTrain;
      throw new DatasetError(`rank ${this.a.rank}'s shard is empty: the training split of ${data.name} has ${n} example${n === 1 ? '' : 's'} `
        + `for the run's ${this.spec.num_workers} ranks, and every rank needs at least one; create the run with at most ${n} workers`);
    }
    this.sampler = new BatchSampler(this.shard.length, Math.max(1, this.spec.batch_size), BigInt(this.spec.seed), this.a.rank);
    this.yWidth = data.task === 'classification' ? 1 : data.yTrain.length / data.nTrain;
    const shardMap = this.a.shard_map;
    if (shardMap && shardMap.shards && shardMap.shards.length) {
      this.plane = Shards.beside(this.client, shardMap, this.spec); // throws ShardMapError on a map that does not fit
      const where = this.plane.shards.map((s) => s.address);
      this.log.info(`the run's parameters are on ${where.length} servers (${where.join(', ')}): pushes and pulls go to each`);
    }
  }

  /**
   * Run `op`; retry UNAVAILABLE / DEADLINE_EXCEEDED with jittered backoff for up to 4x the timeout.
   * After each failure ask the server where this rank stands (resync): a server that restarted from
   * a checkpoint may know it at an earlier clock, and then the loop rewinds there (Rewind) instead
   * of retrying an operation the server cannot accept. A call refused because its clock is ahead
   * of the server's (reason ERROR_REASON_CLOCK_AHEAD, info.next_clock below this.clock) rewinds
   * to that clock directly; a push refused by the staleness bound (ERROR_REASON_STALENESS_BOUND)
   * rewinds to this.clock, to pull and compute it again. A retried push is safe: the server de-duplicates it on
   * (run_id, rank, incarnation, clock). A pull parked past the server's limit behind ranks still
   * training (ERROR_REASON_WAIT_TIMEOUT naming them in info.ranks_behind) is asked again at once, for
   * as long as they train: they are live, and the bound says to wait for them.
   */
  async call(op, what) {
    let delay = 0.05;
    let deadline = Date.now() + this.config.timeoutSeconds * 4 * 1000;
    for (;;) {
      this.check();
      try {
        return await op();
      } catch (e) {
        this.check();
        if (!(e instanceof PsError)) throw e;
        if (e.reason === 'ERROR_REASON_CLOCK_AHEAD' && e.info.next_clock <= this.clock) this.rewind(e.info.next_clock);
        if (e.reason === 'ERROR_REASON_STALENESS_BOUND') {
          // Only a push computed on parameters the server no longer guarantees is refused so (a pull
          // waits for the bound): it restarted from a checkpoint that has this rank's clock but not
          // updates of others those parameters held. Pull again and compute this clock again.
          this.log.warning(`${what} refused by the staleness bound: the server lost updates the parameters held (it restarted); pulling again`);
          throw new Rewind(this.clock);
        }
        const behind = e.reason === 'ERROR_REASON_WAIT_TIMEOUT' ? e.info.ranks_behind || [] : [];
        if (behind.length) {
          // Parked the server's whole limit behind ranks that are live (their leases) and still
          // training: waiting for them is this rank's part of the bound, not a failure (as the Python worker).
          this.log.info(`${what} waits for rank${behind.length > 1 ? 's' : ''} ${behind.slice(0, 5).join(', ')}; asking again`);
          deadline = Date.now() + this.config.timeoutSeconds * 4 * 1000;
          delay = 0.05;
          continue;
        }
        if (!e.retryable || Date.now() > deadline) throw e;
        this.stats.retries += 1;
        this.log.info(`${what} failed (${e.codeName}); retrying in ${delay.toFixed(2)}s`);
        await sleep(delay * (0.5 + Math.random()) * 1000, this);
        delay = Math.min(delay * 2, 2.0);
        this.check();
        await this.resync();
      }
    }
  }

  /** Heartbeat to learn this rank's clock on the server; throw Rewind when the server is behind. */
  async resync() {
    let hb;
    try {
      hb = await this.client.heartbeat(this.a.run_id, this.a.rank, this.a.incarnation, this.clock);
    } catch (e) {
      if (e instanceof PsError && e.retryable) return;
      throw e;
    }
    const known = Number(hb.clock);
    if (known < this.clock) this.rewind(known);
  }

  /** After a rewind in a sharded run: a shard that restarted may have another data plane port. */
  async refreshShards() {
    try {
      await this.plane.refresh(this.client, this.a.run_id);
    } catch (e) {
      if (!(e instanceof PsError)) throw e;
      this.log.info(`could not read the run's shard map again (${e.codeName}); keeping the ports known`);
    }
  }

  /** The server knows this rank at `clock`, before this.clock (it restarted): throw Rewind. */
  rewind(clock) {
    this.log.warning(`the server knows rank ${this.a.rank} at clock ${clock} (it restarted); going back from clock ${this.clock}`);
    throw new Rewind(clock);
  }

  async pull(clock, params) {
    const maxWait = this.config.timeoutSeconds * 4;
    const res = await this.call(
      () => this.plane.pull(this.a.run_id, this.a.rank, this.a.incarnation, clock, { into: params, maxWait }),
      `pull ${clock}`,
    );
    this.learn(res);
    this.stats.pulls += 1;
    this.runState = res.run_state;
    return res.guaranteed_clock;
  }

  cacheValid(guaranteed, clock) {
    return this.staleness !== null && this.staleness > 0 && guaranteed >= clock - this.staleness;
  }

  /** Gather the rows of one batch (indices into the shard) into contiguous arrays. */
  gather(batch) {
    const d = this.data.nFeatures;
    const B = batch.length;
    const X = new Float32Array(B * d);
    const w = this.yWidth;
    const y = this.data.task === 'classification' ? new Int32Array(B) : new Float32Array(B * w);
    for (let i = 0; i < B; i++) {
      const row = this.shard[batch[i]];
      X.set(this.data.XTrain.subarray(row * d, (row + 1) * d), i * d);
      for (let k = 0; k < w; k++) y[i * w + k] = this.data.yTrain[row * w + k];
    }
    return { X, y, B };
  }

  async run() {
    const params = {};
    let guaranteed = -1;
    const iterations = Number(this.spec.iterations);
    for (;;) {
      try {
        while (this.clock < iterations) {
          this.check();
          guaranteed = await this.step(params, guaranteed);
        }
        if (this.a.rank === 0) {
          await this.pull(iterations, params);
          this.evaluate(params, iterations);
        }
        await this.report();
        return;
      } catch (e) {
        if (!(e instanceof Rewind)) throw e;
        this.clock = e.clock;
        // Points not reported yet of the clocks after it are of steps the server lost: the clocks
        // trained again report theirs (the run's history keeps a clock's first point).
        this.pending = this.pending.filter((p) => p.clock <= e.clock);
        guaranteed = -1;
        this.stats.rewinds += 1;
        if (this.plane !== this.client) await this.refreshShards();
      }
    }
  }

  /**
   * An answer, a push's or a pull's, says the run's staleness bound (PushGradientResponse.staleness,
   * PullParamsResponse.staleness: UpdateRun or a schedule may change it while the run runs); it
   * applies from the next iteration, to the cache as to everything.
   */
  learn(resp) {
    if (resp.staleness === undefined || resp.staleness === null) return;
    const s = Number(resp.staleness);
    const now = s < 0 ? null : s;
    if (now !== this.staleness) {
      this.log.info(`the run's staleness is now ${now === null ? 'unbounded' : now}`);
      this.staleness = now;
    }
  }

  /** One iteration at this.clock; returns the guaranteed clock of the parameters it used. */
  async step(params, guaranteed) {
    const evalEvery = Number(this.spec.eval_every);
    const t0 = performance.now();
    const c = this.clock;
    if (Object.keys(params).length && this.cacheValid(guaranteed, c)) {
      this.stats.pullsSkipped += 1;
    } else {
      guaranteed = await this.pull(c, params);
    }
    if (this.a.rank === 0 && evalEvery && c % evalEvery === 0 && c) {
      this.evaluate(params, c);
      await this.report(); // show it now, not after the next (maybe long) wait
    }
    const tc = performance.now();
    const { X, y, B } = this.gather(this.sampler.batch(c));
    const { loss, grads } = this.model.lossAndGrad(params, X, y, B);
    const computeMs = performance.now() - tc;
    if (!Number.isFinite(loss)) throw new TrainingError(`the training loss became ${loss} at clock ${c}: lower the learning rate`);
    const entries = this.specs.map((s) => [s.name, grads[s.name], s.shape]);
    const resp = await this.call(
      () => this.plane.push(this.a.run_id, this.a.rank, this.a.incarnation, c, entries, loss),
      `push ${c}`,
    );
    this.learn(resp);
    if (this.localSgdLr !== null && this.staleness) {
      const lr = this.localSgdLr;
      for (const s of this.specs) {
        const p = params[s.name];
        const g = grads[s.name];
        for (let i = 0; i < p.length; i++) p[i] -= Math.fround(lr * g[i]);
      }
    }
    this.clock = Number(resp.clock);
    this.runState = resp.run_state;
    this.stats.iterations += 1;
    this.stats.lastLoss = loss;
    this.samples += B;
    // A straggler's work is its computation: waiting for the server or for other ranks is not (counted,
    // a straggler parked by the bound slept factor - 1 times that wait too, slower and slower).
    if (this.slowdown > 1) await sleep((this.slowdown - 1) * computeMs, this);
    this.record(c, loss, (performance.now() - t0) / 1000);
    if (Date.now() - this.lastReport >= this.config.reportSeconds * 1000) await this.report();
    return guaranteed;
  }

  record(clock, loss, stepSeconds) {
    this.pending.push({
      rank: this.a.rank, clock: clock + 1, time: nowTimestamp(), loss, eval: false,
      samples: this.samples, step_seconds: stepSeconds,
    });
  }

  evaluate(params, clock) {
    const d = this.data;
    const r = this.model.evaluate(params, d.XTest, d.yTest, d.nTest);
    const acc = r.accuracy === null ? NaN : r.accuracy;
    if (r.accuracy !== null) this.stats.finalAccuracy = r.accuracy;
    this.pending.push({
      rank: this.a.rank, clock, time: nowTimestamp(), eval: true, eval_loss: r.loss, eval_accuracy: acc,
      loss: Number.isFinite(this.stats.lastLoss) ? this.stats.lastLoss : 0,
    });
    this.log.info(`rank ${this.a.rank} clock ${clock}: test loss ${r.loss.toFixed(4)} accuracy ${acc.toFixed(4)}`);
  }

  async report() {
    const points = this.pending;
    this.pending = [];
    // Keep the history light: at most ~20 training points per report, all eval points.
    const train = points.filter((p) => !p.eval);
    const step = Math.max(1, Math.floor(train.length / 20));
    const keep = train.filter((_, i) => i % step === 0).concat(points.filter((p) => p.eval));
    if (train.length && !keep.includes(train[train.length - 1])) keep.push(train[train.length - 1]);
    const resp = await this.call(
      () => this.client.reportMetrics(this.a.run_id, this.a.rank, this.a.incarnation, keep, this.stats.pullsSkipped),
      'report',
    );
    this.runState = resp.run_state;
    this.lastReport = Date.now();
  }
}

/** Keep the lease; abort the trainer when the run was stopped/failed or this rank evicted. */
async function heartbeatLoop(client, a, trainer, done) {
  const interval = durationSeconds(a.heartbeat_interval, 2.0);
  while (!done.value && !trainer.aborted) {
    await sleep(interval * 1000, trainer);
    if (done.value || trainer.aborted) return;
    let resp;
    try {
      resp = await client.heartbeat(a.run_id, a.rank, a.incarnation, trainer.clock);
    } catch (e) {
      if (done.value || trainer.aborted) return;
      if (e instanceof PsError && (e.retryable || e.code === Status.CANCELLED)) continue;
      trainer.abort(`heartbeat: ${e.details || e.message}`);
      return;
    }
    if (done.value || trainer.aborted) return; // the assignment ended while the call was in flight
    if (resp.run_state === 'RUN_STATE_STOPPED' || resp.run_state === 'RUN_STATE_FAILED') {
      trainer.abort(`run ${resp.run_state}`);
      return;
    }
  }
}

/**
 * Train one assignment to its end. Returns {runId, rank, completed, reason, stats, shutdown, unfit}.
 * `stop` is {trainer} holder the caller uses to abort on SIGTERM (then `shutdown` is true and the
 * caller leaves with LEAVE_REASON_SHUTDOWN). `unfit`: this worker cannot take part as it is set up
 * (a message over its own --max-message-bytes): it gave the rank back (Leave SHUTDOWN) and the run
 * goes on without it.
 */
async function train(client, a, config, log, holder = {}) {
  const trainer = new Trainer(client, a, config, log);
  holder.trainer = trainer;
  try {
    return await trainWith(trainer, holder);
  } finally {
    trainer.closePlane();
  }
}

async function trainWith(trainer, holder) {
  const { client, a, log } = trainer;
  const outcome = (completed, reason, extra = {}) => ({
    runId: a.run_id, rank: a.rank, completed, reason, stats: trainer.stats, ...extra,
  });
  log.info(`rank ${a.rank} of run ${a.run_id} (incarnation ${a.incarnation}) from clock ${a.start_clock}`);
  try {
    trainer.setup();
  } catch (e) {
    // Setup is local work (read the export, build the model): whatever fails here would fail on
    // every rank (unreadable or corrupt data, bad model spec), so it fails the run.
    const message = `${e.constructor.name}: ${e.message}`;
    log.error(`cannot train: ${message}`);
    try {
      await client.leave(a.run_id, a.rank, a.incarnation, 'LEAVE_REASON_FAILED', message);
    } catch {
      // the server will evict us; nothing else to do
    }
    return outcome(false, message);
  }
  const done = { value: false };
  const hb = heartbeatLoop(client, a, trainer, done);
  let reason = 'LEAVE_REASON_DONE';
  let message = '';
  try {
    await trainer.run();
  } catch (e) {
    if (trainer.aborted || e instanceof Aborted) {
      done.value = true;
      await hb;
      if (holder.shutdown) return outcome(false, 'worker stopped', { shutdown: true });
      return outcome(false, `the run was stopped or this rank evicted (${trainer.aborted})`);
    }
    if (e instanceof PsError) {
      if ([Status.FAILED_PRECONDITION, Status.NOT_FOUND, Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED].includes(e.code)) {
        log.warning(`assignment ended: ${e.message}`);
        done.value = true;
        trainer.abort('assignment ended');
        await hb;
        return outcome(false, e.message);
      }
      if (e instanceof OverClientLimit) { // this worker's own setting, not the run's failure
        reason = 'LEAVE_REASON_SHUTDOWN';
        message = `this worker cannot take part as it is set up: ${e.message}`;
      } else {
        reason = 'LEAVE_REASON_FAILED';
        message = e.message;
      }
    } else if (e instanceof TrainingError || e instanceof RangeError) {
      reason = 'LEAVE_REASON_FAILED';
      message = e.message;
    } else {
      throw e;
    }
  } finally {
    done.value = true;
    for (const wake of trainer.sleepers) wake();
  }
  await hb;
  if (reason === 'LEAVE_REASON_SHUTDOWN') {
    // It would be again, in this run and in any like it: the rank goes back to the run, which goes
    // on without this worker (or with another), and the worker stops, saying why (main.js).
    log.error(`gave rank ${a.rank} back (the run goes on without this worker): ${message}`);
    try {
      await client.leave(a.run_id, a.rank, a.incarnation, reason, message);
    } catch {
      // best effort: the lease expires otherwise
    }
    return outcome(false, message, { unfit: true });
  }
  if (reason === 'LEAVE_REASON_FAILED') log.error(`training failed: ${message}`);
  try {
    await client.leave(a.run_id, a.rank, a.incarnation, reason, message);
  } catch {
    // best effort: the lease expires otherwise
  }
  const completed = reason === 'LEAVE_REASON_DONE';
  return outcome(completed, message || 'done', { accuracy: trainer.stats.finalAccuracy });
}

module.exports = { train, Trainer, Rewind, sleep, FINISHED };
