'use strict';
/** Plain stderr logging with levels, in the Python worker's line format. */

const LEVELS = { DEBUG: 10, INFO: 20, WARNING: 30, ERROR: 40 };

function makeLogger(name, level = 'INFO') {
  const threshold = LEVELS[String(level).toUpperCase()] || LEVELS.INFO;
  const emit = (lvl, msg) => {
    if (LEVELS[lvl] < threshold) return;
    process.stderr.write(`${new Date().toISOString()} ${lvl.padEnd(7)} [${name}] ${msg}\n`);
  };
  return {
    debug: (m) => emit('DEBUG', m),
    info: (m) => emit('INFO', m),
    warning: (m) => emit('WARNING', m),
    error: (m) => emit('ERROR', m),
  };
}

module.exports = { makeLogger, LEVELS };
