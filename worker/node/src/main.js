#!/usr/bin/env node
'use strict';
/**
 * ps-worker in Node.js: join the cluster, train what the server assigns, wait for the next run.
 *
 *   node src/main.js --server HOST:PORT [--once] [--data-dir DIR]     (or PS_SERVER=HOST:PORT)
 *
 * A worker may start before its server and rides out server restarts: Join failures are retried
 * with exponential backoff and jitter, and every call has a deadline. On SIGTERM/SIGINT/SIGHUP it
 * gives its rank back (Leave SHUTDOWN, so another worker can take it over) and exits 0. With --once it
 * exits after one assignment: 0 if it completed, 1 if not. A worker that cannot take part as it is
 * set up (a message over its own --max-message-bytes) gives its rank back, says which flag to raise
 * and exits 1.
 */

const crypto = require('crypto');

const { ConfigError, parseConfig, usage } = require('./config');
const { makeLogger } = require('./log');
const { PsClient, PsError, Status } = require('./client');
const { train, sleep } = require('./trainer');
const { tlsProblem } = require('./tls');

/** How long a stopped worker tries to give its rank back (Leave): well within the stop grace periods
 * of Compose and Kubernetes (30 s), whatever --timeout-seconds is. If the server does not answer,
 * the rank's lease expires and the server hands it on then. */
const STOP_LEAVE_SECONDS = 5;

/** The join-train loop until `stop.value` (or after one run with `once`); returns the outcomes. */
async function work(config, log, stop) {
  const outcomes = [];
  let delay = 0.1;
  let idleSince = Date.now();
  let told = ''; // the last TLS problem logged
  let token = ''; // the Join's token, kept over its retries until one is answered (JoinRequest.join_token)
  const client = new PsClient(config.server, {
    timeout: config.timeoutSeconds, chunkBytes: config.chunkBytes, maxMessageBytes: config.maxMessageBytes,
    security: config.security, dataPlane: config.dataPlane, log,
  });
  stop.client = client;
  try {
    while (!stop.value) {
      if (config.idleExitSeconds && Date.now() - idleSince > config.idleExitSeconds * 1000) {
        log.info(`no work for ${config.idleExitSeconds}s: exiting`);
        break;
      }
      let resp;
      try {
        token = token || crypto.randomBytes(16).toString('hex');
        resp = await client.join(config.displayName, config.runId, config.joinWaitSeconds, token);
        token = ''; // (answered: the next Join is another one)
      } catch (e) {
        if (stop.value) break;
        if (!(e instanceof PsError)) throw e;
        if (!e.retryable) {
          log.error(`join refused: ${e.message}`);
          if (config.runId) break;
        }
        if (e.code === Status.UNAVAILABLE) {
          const problem = await tlsProblem(config.server, config.security);
          if (problem && problem !== told) log.error(`cannot talk to the server at ${config.server}: ${problem}`);
          told = problem || told; // (once: it stays until the settings change)
        }
        log.info(`server ${config.server} not reachable (${e.codeName}); retrying in ${delay.toFixed(1)}s`);
        await sleep(delay * (0.5 + Math.random()) * 1000, stop.sleeper);
        delay = Math.min(delay * 2, 5.0);
        continue;
      }
      delay = 0.1;
      if (!resp.assignment) continue;
      const a = resp.assignment;
      const holder = {};
      stop.holder = holder;
      const outcome = await train(client, a, config, log, holder);
      stop.holder = null;
      if (outcome.shutdown || stop.value) {
        try {
          await client.leave(a.run_id, a.rank, a.incarnation, 'LEAVE_REASON_SHUTDOWN', 'worker stopped',
            Math.min(config.timeoutSeconds, STOP_LEAVE_SECONDS));
          log.info(`stopped: gave rank ${a.rank} of ${a.run_id} back`);
        } catch (e) {
          if (!(e instanceof PsError)) throw e;
          log.warning(`stopped: could not give rank ${a.rank} of ${a.run_id} back (${e.codeName}); `
            + 'the server hands it on once this worker\'s lease expires');
        }
        outcomes.push({ ...outcome, shutdown: true });
        break;
      }
      outcomes.push(outcome);
      log.info(`run ${outcome.runId} rank ${outcome.rank}: ${outcome.reason}`);
      idleSince = Date.now();
      if (outcome.unfit) { // it would be again, in this run and in any like it: stop, saying why
        log.info('exiting: this worker cannot take part in runs like this one as it is set up (the error above)');
        break;
      }
      if (config.once) break;
    }
  } finally {
    client.close();
  }
  return outcomes;
}

async function main(argv) {
  let config;
  try {
    config = parseConfig(argv);
  } catch (e) {
    if (e instanceof ConfigError) {
      process.stderr.write(`ps-worker-node: ${e.message}\n`);
      return 2;
    }
    throw e;
  }
  if (config.help) {
    process.stdout.write(`${usage()}\n`);
    return 0;
  }
  const log = makeLogger(config.displayName, config.logLevel);
  const stop = { value: false, holder: null, client: null, sleeper: { sleepers: new Set() } };
  const onSignal = (sig) => {
    if (stop.value) return;
    log.info(`${sig}: stopping`);
    stop.value = true;
    for (const wake of stop.sleeper.sleepers) wake();
    if (stop.holder && stop.holder.trainer) {
      stop.holder.shutdown = true;
      stop.holder.trainer.abort('shutdown');
    } else if (stop.client) {
      stop.client.cancelAll(); // a parked Join
    }
  };
  process.on('SIGTERM', () => onSignal('SIGTERM'));
  process.on('SIGINT', () => onSignal('SIGINT'));
  // SIGHUP (its terminal closed) too. Unlike ps-worker, a SIGHUP ignored when this process started
  // (nohup) cannot stay ignored: Node sets every ignored signal but SIGPIPE and SIGXFSZ back to its
  // default before this code runs (/proc/self/status SigIgn no longer shows it), and that default
  // killed the worker (129) without giving its rank back. Keep it past its terminal with setsid.
  process.on('SIGHUP', () => onSignal('SIGHUP'));
  const outcomes = await work(config, log, stop);
  const last = outcomes[outcomes.length - 1];
  if (last && last.unfit) return 1;
  if (!config.once || stop.value || (last && last.completed)) return 0;
  return 1;
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err) => {
      process.stderr.write(`ps-worker-node: fatal: ${err && err.stack ? err.stack : err}\n`);
      process.exit(3);
    },
  );
}

module.exports = { main, work, Status };
