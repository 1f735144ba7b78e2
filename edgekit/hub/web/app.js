// The hub's dashboard: the fleet overview, per-device charts, rollouts and drift flags, from the
// hub's JSON API (GET /v1/fleet, /v1/fleet/{id}, /v1/rollouts) and its live stream (GET /v1/events,
// Server-Sent Events read with fetch so that the API token goes in a header, never in a URL).
// Plain browser JavaScript, no framework; Plotly (served by the hub from the plotly package) only
// on the device page.
"use strict";

const PAGE = 100;
const state = {
  token: null,
  fleet: null,        // rows of GET /v1/fleet
  rollouts: null,     // summaries of GET /v1/rollouts (null: not loaded; "none": no broker)
  filters: { label: "", version: "", state: "all" },
  page: 0,
  device: null,       // the device page's document
  deviceTimer: null,
  plotly: null,
};

const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const num = (v, digits = 1) => (v === null || v === undefined ? "-" : Number(v).toFixed(digits));

function ago(t) {
  if (!t) return "-";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 90) return `${Math.round(s)}s ago`;
  if (s < 5400) return `${Math.round(s / 60)}m ago`;
  if (s < 172800) return `${Math.round(s / 3600)}h ago`;
  return `${Math.round(s / 86400)}d ago`;
}

// -- the API --------------------------------------------------------------------------------------

class Unauthorized extends Error {}

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: `Bearer ${state.token}` } });
  if (r.status === 401) throw new Unauthorized("the hub refused the token");
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

function takeToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("edgekit-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + "#/");
  }
  state.token = sessionStorage.getItem("edgekit-token");
}

function showLogin(message) {
  $("#main").replaceChildren($("#login").content.cloneNode(true));
  $("#token-error").textContent = message || "";
  $("#token-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    state.token = $("#token-input").value.trim();
    sessionStorage.setItem("edgekit-token", state.token);
    start();
  });
}

// -- live updates ---------------------------------------------------------------------------------

let stream = null;

async function connect() {
  if (stream) return;
  stream = new AbortController();
  let wait = 500;
  while (stream && !stream.signal.aborted) {
    try {
      const r = await fetch("/v1/events", { headers: { Authorization: `Bearer ${state.token}` }, signal: stream.signal });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      setLive(true);
      wait = 500;
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          handleEvent(buf.slice(0, cut));
          buf = buf.slice(cut + 2);
        }
      }
    } catch (e) {
      if (stream && stream.signal.aborted) return;
    }
    setLive(false);
    await new Promise((ok) => setTimeout(ok, wait + Math.random() * wait));
    wait = Math.min(wait * 2, 15000);
  }
}

function setLive(on) {
  const el = $("#live");
  el.className = `live ${on ? "on" : "off"}`;
  el.textContent = on ? "live" : "offline";
}

function handleEvent(block) {
  let kind = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (!data.length) return;
  const doc = JSON.parse(data.join("\n"));
  if (kind === "fleet") {
    state.fleet = doc.devices;
    if (route().page === "fleet") renderFleet();
    if (route().page === "device" && state.device) refreshDevice(route().id, true);
  } else if (kind === "rollouts") {
    state.rollouts = doc.rollouts === null ? "none" : doc.rollouts;
    if (route().page === "rollouts") renderRollouts();
  }
}

// -- routing --------------------------------------------------------------------------------------

function route() {
  const h = location.hash.replace(/^#/, "") || "/";
  const m = h.match(/^\/device\/(.+)$/);
  if (m) return { page: "device", id: decodeURIComponent(m[1]) };
  if (h.startsWith("/rollouts")) return { page: "rollouts" };
  return { page: "fleet" };
}

async function show() {
  const r = route();
  for (const [id, page] of [["nav-fleet", "fleet"], ["nav-rollouts", "rollouts"]]) {
    $(`#${id}`).classList.toggle("active", r.page === page);
  }
  clearInterval(state.deviceTimer);
  try {
    if (r.page === "fleet") {
      if (state.fleet === null) state.fleet = (await api("/v1/fleet")).devices;
      renderFleet();
    } else if (r.page === "rollouts") {
      if (state.rollouts === null) await loadRollouts();
      renderRollouts();
    } else {
      state.device = null;
      await refreshDevice(r.id, false);
    }
  } catch (e) {
    if (e instanceof Unauthorized) return showLogin(e.message);
    $("#main").innerHTML = `<p class="error">${esc(e.message)}</p>`;
  }
}

async function loadRollouts() {
  try {
    state.rollouts = (await api("/v1/rollouts")).rollouts;
  } catch (e) {
    if (e instanceof Unauthorized) throw e;
    state.rollouts = "none";
  }
}

// -- the fleet page -------------------------------------------------------------------------------

function rowMatches(r, f) {
  if (f.label) {
    for (const want of f.label.split(",").map((s) => s.trim()).filter(Boolean)) {
      const [k, v] = want.split("=");
      if ((r.labels || {})[k] !== v) return false;
    }
  }
  if (f.version && `${r.model} v${r.version}` !== f.version) return false;
  if (f.state === "online" && !r.online) return false;
  if (f.state === "offline" && r.online) return false;
  if (f.state === "drift" && !r.drift) return false;
  return true;
}

function renderFleet() {
  const rows = state.fleet || [];
  const f = state.filters;
  const shown = rows.filter((r) => rowMatches(r, f));
  const devices = new Set(rows.map((r) => r.device));
  const online = new Set(rows.filter((r) => r.online).map((r) => r.device));
  const drifting = new Set(rows.filter((r) => r.drift).map((r) => r.device));
  const versions = [...new Set(rows.filter((r) => r.model).map((r) => `${r.model} v${r.version}`))].sort();
  const pages = Math.max(1, Math.ceil(shown.length / PAGE));
  state.page = Math.min(state.page, pages - 1);
  const slice = shown.slice(state.page * PAGE, (state.page + 1) * PAGE);
  const body = slice.map((r) => `
    <tr class="device-row" data-device="${esc(r.device)}">
      <td>${esc(r.device)}</td>
      <td>${esc(Object.entries(r.labels || {}).map(([k, v]) => `${k}=${v}`).join(", "))}</td>
      <td>${esc(r.profile || "-")}</td>
      <td>${esc(r.model || "-")}</td>
      <td>${r.version === null || r.version === undefined ? "-" : "v" + esc(r.version)}</td>
      <td class="${r.online ? "ok" : "bad"}">${r.online ? "online" : "offline"}</td>
      <td class="num">${num(r.p95_ms, 2)}</td>
      <td class="num">${num(r.req_per_s)}</td>
      <td class="num">${num(r.error_pct)}</td>
      <td class="${r.drift ? "bad" : "muted"}" title="${esc((r.drift_reasons || []).join("; "))}">${r.drift === null || r.drift === undefined ? "-" : r.drift ? "DRIFT" : "ok"}</td>
      <td>${esc(ago(r.last_seen))}</td>
    </tr>`).join("");
  $("#main").innerHTML = `
    <div class="cards">
      <div class="card stat"><b id="stat-devices">${devices.size}</b><span>devices</span></div>
      <div class="card stat"><b id="stat-online" class="ok">${online.size}</b><span>online</span></div>
      <div class="card stat"><b id="stat-offline" class="${devices.size - online.size ? "bad" : ""}">${devices.size - online.size}</b><span>offline</span></div>
      <div class="card stat"><b id="stat-drift" class="${drifting.size ? "bad" : ""}">${drifting.size}</b><span>drift flags</span></div>
      <div class="card stat"><b>${versions.length}</b><span>model versions</span></div>
    </div>
    <div class="filters">
      <label>label <input id="f-label" placeholder="site=lab" value="${esc(f.label)}"></label>
      <label>version <select id="f-version"><option value="">all</option>${versions.map((v) => `<option ${v === f.version ? "selected" : ""}>${esc(v)}</option>`).join("")}</select></label>
      <label>state <select id="f-state">${["all", "online", "offline", "drift"].map((s) => `<option ${s === f.state ? "selected" : ""}>${s}</option>`).join("")}</select></label>
      <span class="muted" id="fleet-count">${shown.length} of ${rows.length} row(s)</span>
    </div>
    <table id="fleet-table">
      <thead><tr><th>device</th><th>labels</th><th>profile</th><th>model</th><th>version</th><th>online</th>
        <th>p95 ms</th><th>req/s</th><th>error %</th><th>drift</th><th>last seen</th></tr></thead>
      <tbody>${body || `<tr><td colspan="11" class="muted">${rows.length ? "no device matches the filters" : "no device has registered yet"}</td></tr>`}</tbody>
    </table>
    <div class="pager"><button id="prev" ${state.page ? "" : "disabled"}>previous</button>
      <span>page ${state.page + 1} of ${pages}</span><button id="next" ${state.page + 1 < pages ? "" : "disabled"}>next</button></div>
    ${drifting.size ? `<h3>Drift flags</h3>${rows.filter((r) => r.drift).map((r) => (r.drift_reasons || []).map((why) => `<p class="drift-reason"><b>${esc(r.device)}</b> ${esc(r.model)} v${esc(r.version)}: ${esc(why)}</p>`).join("")).join("")}` : ""}`;
  const refilter = () => {
    state.filters = { label: $("#f-label").value, version: $("#f-version").value, state: $("#f-state").value };
    state.page = 0;
    renderFleet();
    const input = $("#f-label");
    input.focus();
    input.setSelectionRange(input.value.length, input.value.length);
  };
  $("#f-label").addEventListener("change", refilter);
  $("#f-version").addEventListener("change", refilter);
  $("#f-state").addEventListener("change", refilter);
  $("#prev").addEventListener("click", () => { state.page -= 1; renderFleet(); });
  $("#next").addEventListener("click", () => { state.page += 1; renderFleet(); });
  for (const tr of document.querySelectorAll("tr.device-row")) {
    tr.addEventListener("click", () => { location.hash = `#/device/${encodeURIComponent(tr.dataset.device)}`; });
  }
  document.body.dataset.fleetRendered = String(rows.length);
}

// -- the device page ------------------------------------------------------------------------------

function loadPlotly() {
  if (state.plotly) return state.plotly;
  state.plotly = new Promise((ok, fail) => {
    const s = document.createElement("script");
    s.src = "/dashboard/plotly.min.js";
    s.onload = () => ok(window.Plotly);
    s.onerror = () => fail(new Error("could not load /dashboard/plotly.min.js from the hub"));
    document.head.appendChild(s);
  });
  return state.plotly;
}

let deviceBusy = false;

async function refreshDevice(id, quiet) {
  if (deviceBusy) return;
  deviceBusy = true;
  try {
    const doc = await api(`/v1/fleet/${encodeURIComponent(id)}?limit=120`);
    state.device = doc;
    await renderDevice(doc, quiet);
  } finally {
    deviceBusy = false;
  }
}

function layout(title, ytitle) {
  return {
    title: { text: title, font: { size: 13 } }, margin: { l: 50, r: 10, t: 30, b: 40 },
    xaxis: { type: "date" }, yaxis: { title: { text: ytitle }, rangemode: "tozero" }, legend: { orientation: "h" },
  };
}

async function renderDevice(doc, quiet) {
  const tele = doc.telemetry;
  const fleetRows = (state.fleet || []).filter((r) => r.device === doc.id);
  const models = Object.entries(tele.models);
  if (!quiet) {
    const dev = tele.latest_device;
    const errors = (dev && dev.errors) || [];
    $("#main").innerHTML = `
      <p><a href="#/">&larr; fleet</a></p>
      <h2 id="device-title">${esc(doc.id)} <span class="${doc.online ? "ok" : "bad"}">${doc.online ? "online" : "offline"}</span></h2>
      <p class="muted">profile ${esc(doc.profile || "-")} · labels ${esc(Object.entries(doc.labels).map(([k, v]) => `${k}=${v}`).join(", ") || "none")}
        · last seen ${esc(doc.last_seen || "-")}</p>
      <div class="cards">${Object.entries(doc.models).map(([name, m]) => `<div class="card"><b>${esc(name)}</b> v${esc(m.active)} · ${esc(m.state)}<br><span class="muted">${esc(m.reason || "")}</span></div>`).join("")}
      ${dev ? `<div class="card">cpu ${num(dev.cpu_percent)}% · memory ${dev.memory_used_bytes ? Math.round(dev.memory_used_bytes / 1e6) : "-"} MB ·
        temperature ${num(dev.temperature_c)} °C · agent ${esc(dev.agent_state || "-")}<br>
        <span class="muted">telemetry queue ${dev.queue ? `${dev.queue.messages} message(s), ${dev.queue.dropped} dropped` : "-"}</span></div>` : ""}</div>
      ${fleetRows.filter((r) => r.drift).map((r) => (r.drift_reasons || []).map((why) => `<p class="drift-reason">drift: ${esc(r.model)} v${esc(r.version)}: ${esc(why)}</p>`).join("")).join("")}
      ${errors.length ? `<h3>Recent errors</h3><ul id="device-errors">${errors.map((e) => `<li><b>×${e.count}</b> ${esc(e.message)} <span class="muted">${esc(ago(e.last))}</span></li>`).join("")}</ul>` : ""}
      ${models.length ? models.map(([name], i) => `<h3>${esc(name)}</h3><div class="charts">
          <div class="card chart" id="c-lat-${i}"></div><div class="card chart" id="c-tput-${i}"></div>
          <div class="card chart" id="c-err-${i}"></div><div class="card chart" id="c-out-${i}"></div></div>`).join("") : `<p class="muted">no telemetry from this device yet</p>`}`;
  }
  if (!models.length) return;
  const Plotly = await loadPlotly();
  models.forEach(([name, items], i) => {
    const t = items.map((x) => new Date(x.interval_end * 1000));
    const span = items.map((x) => Math.max(1e-9, x.interval_end - x.interval_start));
    Plotly.react(`c-lat-${i}`, ["p50_ms", "p95_ms", "p99_ms"].map((k) => ({ x: t, y: items.map((x) => x[k]), name: k.replace("_ms", ""), mode: "lines+markers", connectgaps: true })), layout("latency", "ms"), { displayModeBar: false });
    Plotly.react(`c-tput-${i}`, [
      { x: t, y: items.map((x, j) => x.requests / span[j]), name: "requests/s", mode: "lines" },
      { x: t, y: items.map((x) => x.rows_per_s), name: "rows/s", mode: "lines" },
    ], layout("throughput", "per second"), { displayModeBar: false });
    Plotly.react(`c-err-${i}`, [
      { x: t, y: items.map((x) => x.errors - (x.rejected || 0)), name: "errors", type: "bar", marker: { color: "#c0392b" } },
      { x: t, y: items.map((x) => x.rejected || 0), name: "rejected (503)", type: "bar", marker: { color: "#b7791f" } },
    ], { ...layout("errors per interval", "requests"), barmode: "stack" }, { displayModeBar: false });
    Plotly.react(`c-out-${i}`, outputTraces(items, (tele.validation || {})[name]), { ...layout("outputs: live against validation", "share"), xaxis: { type: "category" }, barmode: "group" }, { displayModeBar: false });
    for (const c of ["lat", "tput", "err", "out"]) document.getElementById(`c-${c}-${i}`).dataset.rendered = "1";
  });
  document.body.dataset.deviceRendered = doc.id;
}

function outputTraces(items, validation) {
  const live = {};
  let numeric = null;
  for (const x of items) {
    const o = x.outputs;
    if (!o) continue;
    if (o.kind === "classes") for (const [k, v] of Object.entries(o.classes)) live[k] = (live[k] || 0) + v;
    else if (o.kind === "numeric") numeric = o.outputs;
  }
  if (numeric) {
    const names = Object.keys(numeric);
    const traces = [{ x: names, y: names.map((n) => numeric[n].mean), name: "live mean (newest)", type: "bar", error_y: { array: names.map((n) => numeric[n].std) } }];
    if (validation && validation.kind === "numeric") traces.push({ x: names, y: names.map((n) => (validation.outputs[n] || {}).mean), name: "validation mean", type: "bar", error_y: { array: names.map((n) => (validation.outputs[n] || {}).std) } });
    return traces;
  }
  const total = Object.values(live).reduce((a, b) => a + b, 0) || 1;
  const ref = validation && validation.kind === "classes" ? validation.classes : {};
  const refTotal = Object.values(ref).reduce((a, b) => a + b, 0) || 1;
  const keys = [...new Set([...Object.keys(live), ...Object.keys(ref)])].sort((a, b) => Number(a) - Number(b));
  const traces = [{ x: keys.map((k) => `class ${k}`), y: keys.map((k) => (live[k] || 0) / total), name: "live", type: "bar" }];
  if (Object.keys(ref).length) traces.push({ x: keys.map((k) => `class ${k}`), y: keys.map((k) => (ref[k] || 0) / refTotal), name: "validation", type: "bar" });
  return traces;
}

// -- the rollouts page ----------------------------------------------------------------------------

const STATE_COLORS = { succeeded: "#1e8e3e", failed: "#c0392b", rolled_back: "#b7791f", pending: "#c7ccd6" };

function renderRollouts() {
  if (state.rollouts === "none") {
    $("#main").innerHTML = `<p class="muted">This hub has no MQTT broker (start it with --broker): no rollouts.</p>`;
    return;
  }
  const list = state.rollouts || [];
  $("#main").innerHTML = `<h2>Rollouts</h2>${list.length ? `<table id="rollouts-table"><thead><tr><th>id</th><th>model</th><th>version</th><th>state</th><th>wave</th><th>devices</th><th>progress</th><th>failure rate</th><th>reason</th></tr></thead><tbody>
    ${list.map((r) => {
      const total = Object.values(r.counts).reduce((a, b) => a + b, 0);
      const bar = Object.entries(r.counts).map(([s, n]) => `<i title="${esc(s)}: ${n}" style="width:${(100 * n) / Math.max(1, total)}%;background:${STATE_COLORS[s] || "#2f6fde"}"></i>`).join("");
      const done = (r.counts.succeeded || 0) + (r.counts.failed || 0) + (r.counts.rolled_back || 0);
      return `<tr class="rollout-row" data-rollout="${esc(r.id)}" data-state="${esc(r.state)}" data-done="${done}" data-total="${total}">
        <td>${esc(r.id)}</td><td>${esc(r.model)}</td><td>${r.version === null ? "rollback" : "v" + esc(r.version)}</td>
        <td class="${r.state === "aborted" ? "bad" : r.state === "completed" ? "ok" : ""}">${esc(r.state)}</td><td>${esc(r.wave)}</td>
        <td>${done}/${total}</td><td><div class="bar">${bar}</div><div class="legend muted">${Object.entries(r.counts).map(([s, n]) => `<i style="background:${STATE_COLORS[s] || "#2f6fde"}"></i>${esc(s)} ${n}`).join("")}</div></td>
        <td class="num">${(100 * r.failure_rate).toFixed(0)}%</td><td class="muted">${esc(r.reason)}</td></tr>`;
    }).join("")}</tbody></table>` : `<p class="muted">No rollout yet: <code>edgekit deploy MODEL:VERSION</code> starts one.</p>`}`;
}

// -- start ----------------------------------------------------------------------------------------

async function start() {
  takeToken();
  if (!state.token) return showLogin("");
  try {
    state.fleet = (await api("/v1/fleet")).devices;
  } catch (e) {
    if (e instanceof Unauthorized) return showLogin(e.message);
  }
  connect();
  show();
}

window.addEventListener("hashchange", () => { if (!location.hash.includes("token=")) show(); });
start();
