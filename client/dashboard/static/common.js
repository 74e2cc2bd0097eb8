"use strict";
// Shared by the pages: formatting, and the connection badge in the header.

const fmt = {
  num(x, digits = 4) { return x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toPrecision(digits); },
  pct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%"; },
  age(s) {
    if (s === null || s === undefined) return "–";
    if (s < 60) return Math.round(s) + " s";
    if (s < 3600) return Math.round(s / 60) + " min";
    if (s < 86400) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  },
  bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  },
  staleness(s) { return s < 0 ? "∞" : String(s); },
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function setConn(state, text) {
  const badge = document.getElementById("conn");
  badge.className = "conn " + state;
  badge.dataset.state = state;
  badge.textContent = text;
}

async function getJSON(url) {
  const resp = await fetch(url, { headers: { Accept: "application/json" } });
  const body = await resp.json().catch(() => ({ error: resp.statusText }));
  if (!resp.ok) throw Object.assign(new Error(body.error || resp.statusText), { status: resp.status });
  return body;
}
