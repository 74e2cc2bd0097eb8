"use strict";
// The runs list: newest first, refreshed every 2 s, filtered as you type.

let runs = [];

function metric(r) {
  if (r.test_auc !== null) return "AUC " + fmt.num(r.test_auc, 3);
  return r.test_accuracy === null ? "–" : fmt.num(r.test_accuracy, 3);
}

function render() {
  const words = document.getElementById("filter").value.toLowerCase().split(/\s+/).filter(Boolean);
  const shown = runs.filter(r => {
    const text = [r.run_id, r.name, r.state].join(" ").toLowerCase();  // (a summary has no model: GetRun has it)
    return words.every(w => text.includes(w));
  });
  const rows = document.getElementById("rows");
  rows.replaceChildren(...shown.map(r => {
    const bar = el("div", { class: "progress" }, el("div", { style: `width:${(100 * r.progress).toFixed(1)}%` }));
    return el("tr", { "data-run": r.run_id, class: "state-" + r.state },
      el("td", {}, el("a", { href: "/runs/" + encodeURIComponent(r.run_id), text: r.run_id })),
      el("td", { text: r.name || "" }),
      el("td", {}, el("span", { class: "badge " + r.state, text: r.state })),
      el("td", {}, bar, el("span", { class: "muted", text: ` ${r.min_clock}/${r.iterations}` })),
      el("td", { text: fmt.staleness(r.staleness) }),
      el("td", { text: String(r.workers) }),
      el("td", { text: metric(r) }),
      el("td", { text: fmt.num(r.test_loss, 3) }),
      el("td", { text: fmt.age(r.age_seconds) }));
  }));
  document.getElementById("count").textContent = `${shown.length} of ${runs.length} runs`;
  document.getElementById("empty").hidden = runs.length > 0;
}

async function refresh() {
  try {
    runs = await getJSON("/api/runs");
    setConn("live", "live");
  } catch (e) {
    setConn("down", "parameter server unreachable: " + e.message + " (retrying)");
  }
  render();
}

document.getElementById("filter").addEventListener("input", render);
refresh();
setInterval(refresh, 2000);
