"""The dashboard's one HTML page: inline CSS and JavaScript, no CDN, no build (proxy/observability/dashboard.py)."""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>LLM gateway</title>
<link rel="icon" href="data:,">
<style>
  :root { --bg:#0f1419; --card:#182029; --line:#26313d; --text:#d8dee6; --dim:#8593a3; --ok:#3fb950;
          --warn:#d29922; --bad:#f85149; --accent:#58a6ff; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; background:var(--bg); color:var(--text); }
  header { display:flex; align-items:center; gap:16px; padding:14px 22px; border-bottom:1px solid var(--line); }
  header h1 { font-size:17px; margin:0; font-weight:600; }
  #status { color:var(--dim); font-size:12px; }
  #status.live::before { content:"● "; color:var(--ok); }
  main { padding:18px 22px; display:grid; gap:16px; }
  .cards { display:grid; grid-template-columns:repeat(auto-fit, minmax(170px, 1fr)); gap:12px; }
  .card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 14px; }
  .card .label { color:var(--dim); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
  .card .value { font-size:26px; font-weight:600; margin-top:4px; font-variant-numeric:tabular-nums; }
  .grid2 { display:grid; grid-template-columns:1fr 1fr; gap:16px; }
  @media (max-width: 1000px) { .grid2 { grid-template-columns:1fr; } }
  section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 14px; overflow:auto; }
  section h2 { font-size:13px; margin:0 0 8px; color:var(--dim); text-transform:uppercase; letter-spacing:.04em; }
  table { width:100%; border-collapse:collapse; font-variant-numeric:tabular-nums; }
  th, td { text-align:right; padding:4px 8px; border-bottom:1px solid var(--line); white-space:nowrap; }
  th:first-child, td:first-child { text-align:left; }
  th { color:var(--dim); font-weight:500; font-size:12px; }
  .ok { color:var(--ok); } .warn { color:var(--warn); } .bad { color:var(--bad); } .dim { color:var(--dim); }
  .bar { height:6px; background:var(--line); border-radius:3px; min-width:80px; }
  .bar > div { height:6px; border-radius:3px; }
  button { background:var(--line); color:var(--text); border:1px solid #3a4756; border-radius:6px; padding:5px 12px; cursor:pointer; }
  button.on { background:var(--warn); color:#000; }
  canvas { width:100%; height:70px; display:block; }
  #message { color:var(--warn); font-size:12px; }
</style>
</head>
<body>
<header>
  <h1>LLM gateway</h1>
  <span id="status">connecting…</span>
  <span style="flex:1"></span>
  <span class="dim">router bypass</span>
  <button id="bypass" type="button" title="POST /admin/bypass">…</button>
  <span id="message"></span>
</header>
<main>
  <div class="cards">
    <div class="card"><div class="label">requests / s</div><div class="value" id="rps">–</div></div>
    <div class="card"><div class="label">errors / s</div><div class="value" id="eps">–</div></div>
    <div class="card"><div class="label">open streams</div><div class="value" id="streams">–</div></div>
    <div class="card"><div class="label">availability</div><div class="value" id="avail">–</div></div>
    <div class="card"><div class="label">error budget left</div><div class="value" id="budget">–</div></div>
    <div class="card"><div class="label">spend (USD)</div><div class="value" id="spend">–</div></div>
  </div>
  <section><h2>requests / s (last minutes)</h2><canvas id="spark" width="1200" height="70"></canvas></section>
  <section><h2 id="slo-title">SLOs</h2><table id="slo"></table></section>
  <div class="grid2">
    <section><h2>models</h2><table id="models"></table></section>
    <section><h2>deployments and breakers</h2><table id="deployments"></table></section>
  </div>
  <section id="keys-section" hidden><h2>spend per key</h2><table id="keys"></table></section>
</main>
<script>
"use strict";
const params = new URLSearchParams(location.search);
const key = params.get("key");
if (key) { history.replaceState(null, "", location.pathname); }  // the key leaves the address bar
const $ = (id) => document.getElementById(id);
const fmt = (v, d = 0) => v === null || v === undefined ? "–" : Number(v).toLocaleString(undefined, {maximumFractionDigits: d, minimumFractionDigits: d});
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const history_rps = [];
let bypass = false;

function table(el, head, rows) {
  el.innerHTML = "<tr>" + head.map((h) => "<th>" + h + "</th>").join("") + "</tr>" +
    rows.map((r) => "<tr>" + r.map((c) => "<td>" + c + "</td>").join("") + "</tr>").join("");
}

function budgetBar(left) {
  const pct = Math.max(0, Math.min(1, left)) * 100;
  const cls = left > 0.5 ? "var(--ok)" : left > 0.1 ? "var(--warn)" : "var(--bad)";
  return '<div class="bar"><div style="width:' + pct.toFixed(1) + '%;background:' + cls + '"></div></div>';
}

function burn(v) {
  const cls = v >= 14.4 ? "bad" : v >= 6 ? "warn" : v > 1 ? "warn" : "ok";
  return '<span class="' + cls + '">' + fmt(v, 2) + "×</span>";
}

function spark() {
  const c = $("spark"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const max = Math.max(1, ...history_rps);
  g.strokeStyle = "#58a6ff"; g.lineWidth = 2; g.beginPath();
  history_rps.forEach((v, i) => {
    const x = (i / Math.max(1, 299)) * c.width, y = c.height - 4 - (v / max) * (c.height - 8);
    i ? g.lineTo(x, y) : g.moveTo(x, y);
  });
  g.stroke();
  g.fillStyle = "#8593a3"; g.font = "12px system-ui"; g.fillText("max " + fmt(max, 1) + "/s", 6, 14);
}

function render(s) {
  $("status").textContent = "live · " + new Date(s.time * 1000).toLocaleTimeString();
  $("status").className = "live";
  bypass = s.bypass;
  $("bypass").textContent = bypass ? "ON" : "off";
  $("bypass").className = bypass ? "on" : "";
  $("streams").textContent = fmt(s.open_streams);
  $("rps").textContent = s.metrics ? fmt(s.requests_per_s, 1) : "–";
  $("eps").textContent = s.metrics ? fmt(s.errors_per_s, 2) : "–";
  $("eps").className = "value" + (s.errors_per_s > 0 ? " bad" : "");
  $("spend").textContent = s.metrics ? fmt(s.spend_usd, 4) : "–";
  if (s.metrics) { history_rps.push(s.requests_per_s); if (history_rps.length > 300) history_rps.shift(); spark(); }
  if (s.slo) {
    const by = Object.fromEntries(s.slo.objectives.map((o) => [o.name, o]));
    $("slo-title").textContent = "SLOs (window " + s.slo.window + ")";
    $("avail").textContent = fmt(by.availability.sli * 100, 3) + "%";
    $("budget").textContent = fmt(by.availability.error_budget_remaining * 100, 1) + "%";
    table($("slo"), ["objective", "target", "SLI", "events", "budget left", "", "burn 1h", "burn 6h", "burn 3d"],
      s.slo.objectives.map((o) => [
        esc(o.name) + (o.threshold_seconds ? ' <span class="dim">≤ ' + o.threshold_seconds + " s</span>" : ""),
        o.name === "cost_per_request" ? "$" + o.objective : fmt(o.objective * 100, 2) + "%",
        o.name === "cost_per_request" ? "$" + fmt(o.sli, 5) : fmt(o.sli * 100, 3) + "%",
        fmt(o.events), fmt(o.error_budget_remaining * 100, 1) + "%", budgetBar(o.error_budget_remaining),
        burn(o.burn_rate["1h"]), burn(o.burn_rate["6h"]), burn(o.burn_rate["3d"])]));
  }
  if (s.models) {
    table($("models"), ["model", "req/s", "requests", "errors", "4xx", "TTFT p50", "TTFT p95", "tokens out", "USD"],
      s.models.map((m) => [esc(m.model), fmt(m.per_s, 1), fmt(m.requests), m.errors ? '<span class="bad">' + fmt(m.errors) + "</span>" : "0",
        fmt(m.refused), m.ttft_p50_ms === null ? "–" : fmt(m.ttft_p50_ms) + " ms", m.ttft_p95_ms === null ? "–" : fmt(m.ttft_p95_ms) + " ms",
        fmt(m.tokens_out), fmt(m.cost_usd, 4)]));
  }
  table($("deployments"), ["deployment", "breaker", "attempts", "failures"],
    (s.deployments || []).map((d) => [esc(d.name),
      '<span class="' + (d.breaker === "closed" ? "ok" : d.breaker === "open" ? "bad" : "warn") + '">' + d.breaker + "</span>",
      fmt(d.attempts), fmt(d.failures)]));
  if (s.keys && s.keys.length) {
    $("keys-section").hidden = false;
    table($("keys"), ["key", "team", "requests", "USD"], s.keys.map((k) => [esc(k.key), esc(k.team), fmt(k.requests), fmt(k.cost_usd, 4)]));
  }
}

function connect() {
  const events = new EventSource("/dashboard/events" + (key ? "?key=" + encodeURIComponent(key) : ""));
  events.onmessage = (e) => render(JSON.parse(e.data));
  events.onerror = () => { $("status").textContent = "reconnecting…"; $("status").className = ""; };
}

$("bypass").addEventListener("click", async () => {
  const headers = {"content-type": "application/json"};
  if (key) headers.authorization = "Bearer " + key;
  const r = await fetch("/admin/bypass", {method: "POST", headers, body: JSON.stringify({enabled: !bypass})});
  const body = await r.json().catch(() => ({}));
  $("message").textContent = r.ok ? "" : (body.error && body.error.message) || ("HTTP " + r.status);
});
connect();
</script>
</body>
</html>
"""
