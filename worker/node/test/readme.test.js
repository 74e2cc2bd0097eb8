'use strict';
// README.md's flag table is src/config.js's list: every flag and variable config.js defines has a
// row, with its variable and default, and the table has no row config.js does not define.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('fs');
const os = require('os');
const path = require('path');

const { OPTIONS, usage } = require('../src/config');

const README = path.join(__dirname, '..', 'README.md');
const SECTION = '## Flags and environment variables';

/** The table's rows as arrays of cells (header and separator dropped). */
function tableRows(markdown) {
  const start = markdown.indexOf(`\n${SECTION}\n`);
  assert.ok(start >= 0, `README.md has no "${SECTION}" section`);
  const rest = markdown.slice(start + SECTION.length + 2);
  const end = rest.search(/\n## /);
  const lines = (end < 0 ? rest : rest.slice(0, end)).split('\n').filter((l) => l.startsWith('|'));
  assert.ok(lines.length > 2, `no table under "${SECTION}"`);
  const cells = (line) => line.replace(/^\||\|$/g, '').split('|').map((c) => c.trim());
  assert.deepEqual(cells(lines[0]).slice(0, 3), ['flag', 'variable', 'default']);
  return lines.slice(2).map(cells);
}

/** {flag, negatable, takesValue, variable, defaultCell} of each row; flag is null for "(none)". */
function readmeTable() {
  return tableRows(fs.readFileSync(README, 'utf8')).map((cells) => {
    const [flagCell, varCell, defaultCell] = cells;
    const m = /^`--(\[no-\])?([a-z][a-z0-9-]*)( [A-Z:_]+)?`$/.exec(flagCell);
    assert.ok(m || flagCell === '(none)', `README flag cell ${JSON.stringify(flagCell)}: want \`--flag VALUE\`, \`--flag\`, \`--[no-]flag\` or (none)`);
    const v = /^`([A-Z][A-Z0-9_]*)`$/.exec(varCell);
    assert.ok(v, `README variable cell ${JSON.stringify(varCell)}: want one \`NAME\``);
    return {
      flag: m ? m[2] : null, negatable: Boolean(m && m[1]), takesValue: Boolean(m && m[3]),
      variable: v[1], defaultCell,
    };
  });
}

/** What config.js says: the variable of each flag and the variables without a flag, from usage(). */
function configVariables() {
  const byFlag = {};
  const envOnly = [];
  for (const line of usage().split('\n')) {
    const flag = /^ {2}--(?:\[no-\])?([a-z][a-z0-9-]*)\b.*\[([A-Z][A-Z0-9_]*); default /.exec(line);
    if (flag) byFlag[flag[1]] = flag[2];
    const none = /^ {2}\(no flag\).*\[([A-Z][A-Z0-9_]*)\]$/.exec(line);
    if (none) envOnly.push(none[1]);
  }
  return { byFlag, envOnly };
}

/** The default as the README writes it: `value` (first code span), or "none" for an empty string. */
function readmeDefault(cell, type) {
  if (/^none\b/.test(cell)) return type === 'string' ? '' : Symbol('none is only for empty strings');
  const m = /^`([^`]*)`/.exec(cell);
  if (!m) return Symbol(`no default in ${JSON.stringify(cell)}`);
  if (type === 'number') return Number(m[1]);
  if (type === 'bool') return m[1] === 'true' ? true : m[1] === 'false' ? false : Symbol(m[1]);
  return m[1].startsWith('~/') ? path.join(os.homedir(), m[1].slice(2)) : m[1];
}

test('every flag of src/config.js is in the README table, and every flag in the table is in src/config.js', () => {
  const rows = readmeTable();
  const documented = rows.filter((r) => r.flag).map((r) => r.flag);
  const defined = OPTIONS.map((o) => o[1]);
  const missing = defined.filter((f) => !documented.includes(f));
  const extra = documented.filter((f) => !defined.includes(f));
  assert.deepEqual(missing, [], `flags in src/config.js but not in README.md's table: ${missing.map((f) => `--${f}`).join(', ')}`);
  assert.deepEqual(extra, [], `flags in README.md's table that src/config.js does not define: ${extra.map((f) => `--${f}`).join(', ')}`);
  assert.equal(new Set(documented).size, documented.length, 'a flag has two rows');
  assert.deepEqual(documented, defined, 'the table lists the flags in src/config.js order');
});

test('each row has the flag\'s variable, default, and value or [no-] form', () => {
  const rows = Object.fromEntries(readmeTable().filter((r) => r.flag).map((r) => [r.flag, r]));
  const { byFlag } = configVariables();
  for (const [, flag, type, def] of OPTIONS) {
    const row = rows[flag];
    assert.equal(row.variable, byFlag[flag], `--${flag}: variable`);
    assert.deepEqual(readmeDefault(row.defaultCell, type), def, `--${flag}: default (README says ${row.defaultCell})`);
    assert.equal(row.takesValue, type !== 'bool', `--${flag}: ${type === 'bool' ? 'a boolean takes no VALUE' : 'write its VALUE'}`);
    assert.equal(row.negatable, type === 'bool' && def === true, `--${flag}: write --[no-]${flag} exactly when it defaults to true`);
  }
});

test('the variables without a flag (PS_TOKEN) are the table\'s (none) rows', () => {
  const { envOnly } = configVariables();
  assert.ok(envOnly.includes('PS_TOKEN'), 'usage() lists PS_TOKEN as a variable without a flag');
  const rows = readmeTable().filter((r) => !r.flag).map((r) => r.variable);
  assert.deepEqual(rows.sort(), envOnly.slice().sort());
});
