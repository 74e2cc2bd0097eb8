"use strict";
// One run, live: the clock bars against the SSP window, curves, servers, events, stop/checkpoint.
// History comes from /api/runs/ID once; then server-sent events from /api/runs/ID/live (fed by the
// parameter server's WatchRun). When the stream breaks it is opened again (points it sends again are dropped).

const runId = (() => {
  const part = location.pathname.split("/").pop();
  try {
    return decodeURIComponent(part);
  } catch (e) { // a malformed address (/runs/%E0): asked for as it is, the server says there is no such run
    return part;
  }
})();
const FINISHED = new Set(["completed", "stopped", "failed"]);
const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
  "#bcbd22", "#17becf"];
const S = { points: new Map(), events: [], rates: [], prev: null, histogram: {}, last: null,
  charts: {}, ranks: 0, finished: false, source: null, dirty: false };

document.getElementById("title").textContent = runId;
document.title = "paramserver: " + runId;

// ------------------------------------------------------------------------------ status
function renderStatus(doc) {
  const s = doc.summary;
  S.last = doc;
  S.ranks = doc.workers.length;
  document.getElementById("title").textContent = `${s.run_id}${s.name ? " · " + s.name : ""}`;
  const state = document.getElementById("state");
  state.textContent = s.state;
  state.className = "badge " + s.state;
  const auc = s.test_auc !== null ? ` · test AUC ${fmt.num(s.test_auc, 3)}` : "";
  const acc = s.test_accuracy !== null ? ` · test accuracy ${fmt.num(s.test_accuracy, 3)}` : "";
  document.getElementById("facts").textContent =
    `${s.model ?? "?"} on ${s.dataset ?? "?"} · ${s.optimizer} lr ${s.lr} · s = ${fmt.staleness(s.staleness)} · ` +
    `${s.workers_active}/${s.workers} workers · min clock ${s.min_clock}/${s.iterations} (${fmt.pct(s.progress)})` +
    `${acc}${auc} · staleness mean ${fmt.num(s.staleness_mean, 2)}, max ${s.staleness_max}` +
    ` · ${s.pushes_applied} pushes · ${fmt.bytes(s.bytes_pushed + s.bytes_pulled)} moved`;
  if (s.message) notice(s.message);
  renderClocks(doc);
  renderShards(doc.shards || []);
  const over = FINISHED.has(s.state);
  document.getElementById("stop").disabled = over;
  document.getElementById("checkpoint").disabled = over;
  rate(doc);
}

function rate(doc) {
  const t = doc.server_time, s = doc.summary;
  if (S.prev && t > S.prev.t + 0.2) {
    const dt = t - S.prev.t;
    S.rates.push({ t, pushes: (s.pushes_applied - S.prev.pushes) / dt,
      mb: (s.bytes_pushed + s.bytes_pulled - S.prev.bytes) / dt / 1e6, clock: s.min_clock });
    if (S.rates.length > 2000) S.rates.shift();
    S.dirty = true;
  }
  if (!S.prev || t > S.prev.t + 0.2) S.prev = { t, pushes: s.pushes_applied, bytes: s.bytes_pushed + s.bytes_pulled };
}

// The SSP window: a pull of clock c is served once every rank has completed c - s iterations, so
// the ranks at the min clock hold the others back, and a parked rank waits for them.
function renderClocks(doc) {
  const s = doc.summary, bound = s.staleness, workers = doc.workers;
  const live = workers.filter(w => w.state !== "vacant" && w.state !== "evicted");
  const holding = new Set(s.max_clock > s.min_clock ? live.filter(w => w.clock === s.min_clock).map(w => w.rank) : []);
  const hi = Math.max(s.max_clock, bound >= 0 ? s.min_clock + bound + 1 : s.max_clock) + 1;
  const lo = Math.max(0, Math.min(s.min_clock - 1, hi - 2));
  const span = Math.max(1, hi - lo);
  const x = c => (100 * (Math.min(Math.max(c, lo), hi) - lo) / span).toFixed(2) + "%";
  const text = s.waiting_for || (FINISHED.has(s.state) ? `the run ${s.state}` : "no pull is waiting");
  const window = bound >= 0 ? `SSP window [${s.min_clock}, ${s.min_clock + bound}]` : "no bound (asynchronous)";
  document.getElementById("window").textContent = `${window}: ${text}` +
    (holding.size ? ` · held back by rank${holding.size > 1 ? "s" : ""} ${[...holding].join(", ")}` : "");
  const rows = workers.map(w => {
    const cls = ["clock-row", w.state];
    let note = `clock ${w.clock}`;
    if (holding.has(w.rank)) { cls.push("holding"); note += " · holds the window back"; }
    if (w.waiting) {
      cls.push("parked");
      const need = w.needs_min_clock;
      const behind = need === null ? [] : live.filter(o => o.clock < need && o.rank !== w.rank).map(o => o.rank);
      note += w.needs_start ? " · waits for the run to start (every rank joined)" :
        need === null ? " · parked" : behind.length === 0 ? ` · released (clock ${need} reached), being served` :
        ` · waits for rank${behind.length > 1 ? "s" : ""} ${behind.join(", ")} to reach ${need}`;
    }
    const track = el("div", { class: "track" });
    if (bound >= 0) track.append(el("div", { class: "band", style: `left:${x(s.min_clock)};width:calc(${x(s.min_clock + bound + 1)} - ${x(s.min_clock)})` }));
    track.append(el("div", { class: "bar", style: `width:${x(w.clock)}` }));
    return el("div", { class: cls.join(" "), "data-rank": w.rank, "data-clock": w.clock },
      el("span", { class: "rank", text: `rank ${w.rank}` }), track,
      el("span", { class: "note", text: `${note}${w.data_plane ? " · " + w.data_plane : ""}` }));
  });
  const axis = el("div", { class: "clock-row axis" }, el("span", { class: "rank" }),
    el("div", { class: "track" }, el("span", { class: "tick", style: "left:0", text: String(lo) }),
      el("span", { class: "tick", style: "right:0", text: String(hi) })), el("span", { class: "note", text: "clock" }));
  document.getElementById("clocks").replaceChildren(...rows, axis);
}

function renderShards(shards) {
  document.getElementById("shards-section").hidden = shards.length === 0;
  document.getElementById("shards").replaceChildren(...shards.map(d => el("tr", { class: d.reachable ? "" : "down" },
    el("td", { text: String(d.index) }), el("td", { text: d.address }), el("td", { text: d.state }),
    el("td", { text: fmt.bytes(d.bytes_held) }), el("td", { text: String(d.min_clock) }),
    el("td", { text: fmt.num(d.pushes_per_second, 3) }), el("td", { text: fmt.bytes(d.rss_bytes) }))));
}

// The newest events shown, the older ones counted (a page left open on a long run kept every event
// it was sent, in the list and in seenEvents); psctl metrics RUN lists the server's last 20,000
const MAX_EVENTS = 1000;
const seenEvents = new Set();  // the keys of the events shown
const dropped = { count: 0, until: -Infinity };  // events no longer shown, and the time of the newest

function addEvents(events) {
  const list = document.getElementById("events");
  events.forEach((e, i) => {
    const key = `${e.time}/${e.kind}/${e.rank}/${e.message}`;
    // (the history and each new stream's first update send those the server keeps again)
    if (seenEvents.has(key) || (e.time !== null && e.time <= dropped.until)) return;
    if (i < events.length - MAX_EVENTS) {  // (older than the newest MAX_EVENTS of these: not drawn at all)
      drop(e.time);
      return;
    }
    seenEvents.add(key);
    const when = e.time ? new Date(e.time * 1000).toLocaleTimeString() : "";
    list.prepend(el("li", { class: "event " + e.kind, "data-key": key },
      el("time", { text: when }), el("b", { text: e.kind }), ` ${e.rank >= 0 ? "rank " + e.rank + ": " : ""}${e.message}`));
  });
  while (seenEvents.size > MAX_EVENTS) {
    const oldest = list.lastElementChild;
    seenEvents.delete(oldest.dataset.key);
    oldest.remove();
    drop(Number(oldest.dataset.key.split("/")[0]));
  }
  const note = document.getElementById("events-dropped");
  note.hidden = dropped.count === 0;
  note.textContent = `${dropped.count} earlier event${dropped.count === 1 ? "" : "s"} not shown ` +
    `(psctl metrics ${runId} lists those the server keeps)`;
}

function drop(time) {
  dropped.count += 1;
  if (!Number.isNaN(time) && time !== null) dropped.until = Math.max(dropped.until, time);
}

function notice(text) {
  const n = document.getElementById("notice");
  n.hidden = !text;
  n.textContent = text || "";
}

// ------------------------------------------------------------------------------ curves
const MAX_POINTS = 20000;  // the newest kept, as the server keeps a run's (a page open for days kept them all)

function addPoints(points) {
  for (const p of points) {
    S.points.set(`${p.rank}/${p.clock}/${p.eval}/${p.time}`, p);  // (a reconnected stream sends some again)
  }
  for (const key of S.points.keys()) {  // (a Map iterates in insertion order: the oldest first)
    if (S.points.size <= MAX_POINTS) break;
    S.points.delete(key);
  }
  S.dirty = true;
}

// A value axis's tick labels, to 4 significant digits (uPlot's default keeps 3 decimals: ticks at
// 0.0005 and 0.001 of a small loss both read "0.001")
const ticks = (u, values) => values.map(v => v === null ? "" : v.toLocaleString(undefined, { maximumSignificantDigits: 4 }));

// An accuracy's or an AUC's axis: up to 1, zoomed in on the range that moved (as psctl plot's); auto
// ranging gave a flat accuracy of 0.97 an axis from 0 to 1.95
const shares = (u, lo, hi) => lo === null ? [0, 1] : [Math.max(0, lo - 0.1 * (1 - lo) - 0.01), 1.005];

// A log axis's grid lines and ticks at powers of 10 only (uPlot draws one at every 1-9 x 10^k: grey bands)
const decades = (u, splits) => splits.map(v => Math.abs(Math.log10(v) - Math.round(Math.log10(v))) < 1e-9 ? v : null);

function chart(id, series, opts = {}) {
  const target = document.getElementById(id);
  const width = Math.max(300, target.clientWidth || 480);
  const options = { width, height: 220, series, legend: { live: false },
    scales: { x: { time: opts.time !== false } }, axes: [{}, { size: 60 }], ...opts.extra };
  options.axes = options.axes.map((a, i) => i === 0 || a.values ? a : { ...a, values: ticks });
  const plot = new uPlot(options, series.map(() => []), target);
  target.dataset.points = "0";
  return plot;
}

function byX(rows, key) {
  const xs = [...new Set(rows.map(r => r[key]))].sort((a, b) => a - b);
  return { xs, index: new Map(xs.map((x, i) => [x, i])) };
}

function drawCharts() {
  if (!S.dirty || !S.last) return;
  S.dirty = false;
  const key = document.getElementById("xaxis").value, time = key === "time";
  const all = [...S.points.values()];
  const train = all.filter(p => !p.eval && p.loss !== null), evals = all.filter(p => p.eval);
  const ranks = Math.max(S.ranks, ...train.map(p => p.rank + 1), 1);
  // What the evaluations have beside their loss: accuracy; a binary model's AUC (its loss: log-loss);
  // linear regression's RMSE (its loss is half the MSE); nothing for matrix factorisation, whose loss
  // is its RMSE already (drawn alone, on the one axis)
  const e = evals.sort((a, b) => a[key] - b[key]);
  const model = S.last.summary.model || "";
  const regression = model.startsWith("linear"), ratings = model.startsWith("mf");
  const quality = e.some(p => p.test_auc !== null) ? "test AUC" : regression ? "test RMSE" : ratings ? "" : "test accuracy";
  const logLoss = train.length > 0 && train.every(p => p.loss > 0);  // (as psctl plot: losses fall by orders of magnitude)
  const rebuild = S.charts.key !== key || S.charts.ranks !== ranks || S.charts.quality !== quality ||
    S.charts.logLoss !== logLoss;
  if (rebuild) {
    for (const id of ["loss", "eval", "rate", "stale"]) document.getElementById(id).replaceChildren();
    const rankSeries = [...Array(ranks).keys()].map(r => ({ label: `rank ${r}`, stroke: COLOURS[r % COLOURS.length], spanGaps: true }));
    S.charts = { key, ranks, quality, logLoss,
      loss: chart("loss", [{ label: key }, ...rankSeries], { time, extra: {
        scales: { x: { time }, y: { distr: logLoss ? 3 : 1 } },
        axes: [{}, logLoss ? { size: 60, grid: { filter: decades }, ticks: { filter: decades } } : { size: 60 }] } }),
      eval: quality ? chart("eval", [{ label: key }, { label: quality, stroke: "#2ca02c", spanGaps: true, scale: "y" },
        { label: "test loss", stroke: "#d62728", spanGaps: true, scale: "loss" }],
        { time, extra: { axes: [{}, { scale: "y", size: 60 }, { scale: "loss", side: 1, size: 60, grid: { show: false } }],
          scales: { x: { time }, y: { range: quality === "test RMSE" ? undefined : shares } } } }) :
        chart("eval", [{ label: key }, { label: "test RMSE", stroke: "#d62728", spanGaps: true, scale: "y" }],
          { time, extra: { axes: [{}, { scale: "y", size: 60 }] } }),
      rate: chart("rate", [{ label: key }, { label: "pushes/s", stroke: "#1f77b4", spanGaps: true, scale: "y" },
        { label: "MB/s", stroke: "#9467bd", spanGaps: true, scale: "mb" }],
        { time, extra: { axes: [{}, { scale: "y", size: 60 }, { scale: "mb", side: 1, size: 60, grid: { show: false } }] } }),
      // a bar per whole lead, the axis half a lead wider than the bars on each side (else uPlot spans
      // a single bar, every BSP run's, over 0..100, and cuts the edge bars in half)
      stale: chart("stale", [{ label: "clock − min clock" }, { label: "pulls", stroke: "#7f7f7f", fill: "#7f7f7f55",
        paths: uPlot.paths.bars({ size: [0.8] }), points: { show: false } }], { time: false, extra: {
        scales: { x: { time: false, range: u => { // (from the data: uPlot gives a single x value a span of 100)
          const xs = u.data[0];
          return xs.length ? [xs[0] - 0.5, xs[xs.length - 1] + 0.5] : [0, 1];
        } } },
        axes: [{ incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000] }, { size: 60 }] } }),
    };
  }
  const { xs, index } = byX(train, key);
  const cols = [...Array(ranks)].map(() => new Array(xs.length).fill(null));
  for (const p of train) cols[p.rank][index.get(p[key])] = p.loss;
  S.charts.loss.setData([xs, ...cols]);
  document.getElementById("loss").dataset.points = String(train.length);

  const scores = e.map(p => p.test_auc !== null ? p.test_auc : regression && p.test_loss !== null ?
    Math.sqrt(2 * p.test_loss) : p.test_accuracy);
  document.getElementById("eval-caption").textContent = quality === "test AUC" ? "test AUC and log-loss" :
    regression ? "test RMSE (green) and loss, half the MSE (red)" : ratings ? "test RMSE (the loss)" :
    "test accuracy and loss";
  const losses = e.map(p => p.test_loss);
  S.charts.eval.setData(quality ? [e.map(p => p[key]), scores, losses] : [e.map(p => p[key]), losses]);
  document.getElementById("eval").dataset.points = String(e.length);

  const rx = S.rates.map(r => time ? r.t : r.clock);
  S.charts.rate.setData([rx, S.rates.map(r => r.pushes), S.rates.map(r => r.mb)]);
  document.getElementById("rate").dataset.points = String(S.rates.length);

  const h = Object.entries(S.histogram).map(([k, v]) => [Number(k), v]).sort((a, b) => a[0] - b[0]);
  S.charts.stale.setData([h.map(x => x[0]), h.map(x => x[1])]);
  document.getElementById("stale").dataset.points = String(h.length);
}

document.getElementById("xaxis").addEventListener("change", () => { S.charts.key = null; S.dirty = true; drawCharts(); });
setInterval(drawCharts, 500);

// ------------------------------------------------------------------------------ live updates
function connect() {
  const source = new EventSource(`/api/runs/${encodeURIComponent(runId)}/live`);
  S.source = source;
  source.addEventListener("status", ev => { setConn("live", "live"); renderStatus(JSON.parse(ev.data)); });
  source.addEventListener("points", ev => addPoints(JSON.parse(ev.data)));
  source.addEventListener("events", ev => addEvents(JSON.parse(ev.data)));
  source.addEventListener("down", ev => setConn("down",
    "parameter server unreachable, reconnecting… (" + JSON.parse(ev.data).error + ")"));
  source.addEventListener("gone", ev => { source.close(); setConn("down", JSON.parse(ev.data).error); });
  source.addEventListener("end", ev => {
    S.finished = true;
    source.close();
    setConn("finished", "finished: " + JSON.parse(ev.data).state);
    refreshHistogram();
  });
  source.onerror = () => {  // the dashboard itself went away or restarted: open a new stream, from the newest point
    source.close();
    if (S.finished) return;
    setConn("down", "dashboard unreachable, reconnecting…");
    setTimeout(connect, 1000);
  };
}

async function loadHistory() {  // the run's history, or the error that kept it (e.status: 404 for no such run)
  try {
    const doc = await getJSON(`/api/runs/${encodeURIComponent(runId)}`);
    S.histogram = doc.staleness_histogram;
    S.rates = doc.rates || [];  // pushes/s from the server's records; live updates add to them (and MB/s)
    S.dirty = true;
    return doc;
  } catch (e) {
    return e;
  }
}

async function refreshHistogram() {
  try {
    S.histogram = await getJSON(`/api/runs/${encodeURIComponent(runId)}/staleness`);
    S.dirty = true;
  } catch (e) {
    // the live stream says when the server is unreachable
  }
}

async function act(what, question) {
  if (!confirm(question)) return;
  const button = document.getElementById(what);
  button.disabled = true;
  try {
    const resp = await fetch(`/api/runs/${encodeURIComponent(runId)}/${what}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
    const body = await resp.json();
    notice(resp.ok ? (what === "stop" ? `stopped: the run is ${body.state}` :
      `checkpoint saved at min clock ${body.min_clock}: ${body.path}`) :
      `${what} failed: ${body.error}`);
  } finally {
    button.disabled = S.finished;
  }
}

document.getElementById("stop").addEventListener("click", () => act("stop", `Stop run ${runId}? Its workers are released.`));
document.getElementById("checkpoint").addEventListener("click", () => act("checkpoint", `Checkpoint run ${runId} now?`));

(async () => {
  let doc = await loadHistory();
  while (doc instanceof Error && doc.status !== 404) {  // (the live stream needs the server too: the history first)
    setConn("down", "cannot read the run (is the parameter server up?), retrying…");
    await new Promise(resolve => setTimeout(resolve, 1000));
    doc = await loadHistory();
  }
  if (doc instanceof Error) {
    setConn("down", doc.message);
    return;
  }
  renderStatus(doc);
  addPoints(doc.points);
  addEvents(doc.events);
  S.finished = FINISHED.has(doc.summary.state);
  if (S.finished) setConn("finished", "finished: " + doc.summary.state);
  else connect();
  setInterval(() => { if (!S.finished) refreshHistogram(); }, 5000);
})();
