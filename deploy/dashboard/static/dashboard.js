// blip3o-rl dashboard: polls the JSON API and draws uPlot charts and the sample gallery.
// No build step. URL parameters: ?run=ID&compare=ID&smooth=0.6&poll=2000 (ms between polls).
"use strict";

// Which chart a metric key goes to (first match wins); key names come from rl/run_store.py.
const CHART_GROUPS = [
  { id: "reward-mean", title: "Mean reward", match: (k) => k === "reward/mean" },
  { id: "reward-functions", title: "Reward per function", match: (k) => k.startsWith("reward/") && k !== "reward/std" },
  { id: "geneval", title: "GenEval accuracy per tag", match: (k) => k.startsWith("geneval/") },
  { id: "ocr", title: "OCR reward", match: (k) => k.startsWith("ocr/") },
  { id: "kl", title: "KL to reference", match: (k) => k === "policy/kl" },
  { id: "entropy", title: "Entropy", match: (k) => k === "policy/entropy" },
  { id: "clip-fraction", title: "Clip fraction", match: (k) => k === "policy/clip_fraction" },
  { id: "time", title: "Step time by stage (s)", match: (k) => k.startsWith("time/") },
  { id: "throughput", title: "Throughput", match: (k) => k.startsWith("throughput/") },
  { id: "other", title: "Other metrics", match: () => true },
];
const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];

const params = new URLSearchParams(location.search);
const state = {
  runs: [],
  runId: params.get("run"),
  compareId: params.get("compare") || "",
  smooth: Number(params.get("smooth") || 0),
  pollMs: Number(params.get("poll") || 2000),
  series: {},        // run id -> {steps: [], values: {key: []}, events: n}
  charts: {},        // group id -> {plot, signature}
  galleryStep: null, // step shown in the gallery
  detail: null,      // last /api/runs/{id} answer for the shown run
};
window.dashboard = state; // read by the browser test (chart point counts)

const $ = (id) => document.getElementById(id);

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status} ${(await response.json()).detail}`);
  return response.json();
}

function groupOf(key) {
  return CHART_GROUPS.find((g) => g.match(key)).id;
}

// TensorBoard-style exponential moving average, debiased so early points are not pulled to 0.
function smooth(values, weight) {
  if (weight <= 0) return values;
  let last = 0, n = 0;
  return values.map((v) => {
    if (v === null || v === undefined) return v;
    last = last * weight + (1 - weight) * v;
    n += 1;
    return last / (1 - Math.pow(weight, n));
  });
}

// ---- metrics: fetch only the steps after the last one we hold, append, redraw
async function refreshSeries(runId, detail) {
  let held = state.series[runId];
  // A resume drops steps after the checkpoint: start over when the event count says one happened.
  const resumed = held && detail.events.slice(held.events).some((e) => e.kind === "resume");
  if (!held || resumed) held = state.series[runId] = { steps: [], values: {}, events: 0 };
  held.events = detail.events.length;
  const since = held.steps.length ? held.steps[held.steps.length - 1] : null;
  const fresh = await getJSON(`/api/runs/${encodeURIComponent(runId)}/metrics` + (since === null ? "" : `?since=${since}`));
  const before = held.steps.length;
  for (const key of new Set([...Object.keys(held.values), ...Object.keys(fresh.values)])) {
    const old = held.values[key] || new Array(before).fill(null);
    held.values[key] = old.concat(fresh.values[key] || new Array(fresh.steps.length).fill(null));
  }
  held.steps = held.steps.concat(fresh.steps);
}

function chartData(group) {
  // One table per shown run: [steps, ...smoothed values of this group's keys]; joined on steps.
  const tables = [], series = [];
  [state.runId, state.compareId].filter(Boolean).forEach((runId, runIndex) => {
    const held = state.series[runId];
    if (!held) return;
    const keys = Object.keys(held.values).filter((k) => groupOf(k) === group.id).sort();
    if (!keys.length) return;
    tables.push([held.steps, ...keys.map((k) => smooth(held.values[k], state.smooth))]);
    keys.forEach((k) => series.push({ runIndex, key: k, runId }));
  });
  if (!tables.length) return null;
  const data = tables.length === 1 ? tables[0] : uPlot.join(tables);
  return { data, series };
}

function drawCharts() {
  const box = $("charts");
  const width = Math.max(380, Math.floor(box.clientWidth / Math.max(1, Math.floor(box.clientWidth / 460))) - 30);
  for (const group of CHART_GROUPS) {
    const built = chartData(group);
    const existing = state.charts[group.id];
    if (!built) {
      if (existing) { existing.plot.destroy(); existing.element.remove(); delete state.charts[group.id]; }
      continue;
    }
    const signature = built.series.map((s) => `${s.runId}|${s.key}`).join(",") + `|${width}`;
    if (existing && existing.signature === signature) {
      existing.plot.setData(built.data);
    } else {
      if (existing) { existing.plot.destroy(); existing.element.remove(); }
      state.charts[group.id] = makeChart(group, built, signature, width);
    }
    const element = state.charts[group.id].element;
    element.dataset.points = String(state.series[state.runId]?.steps.length ?? 0);
  }
}

function makeChart(group, built, signature, width) {
  const element = document.createElement("div");
  element.className = "chart";
  element.id = `chart-${group.id}`;
  element.dataset.testid = `chart-${group.id}`;
  element.innerHTML = `<h3>${group.title}</h3>`;
  // Keep charts in CHART_GROUPS order whatever order they appear in.
  const after = CHART_GROUPS.slice(CHART_GROUPS.indexOf(group) + 1).map((g) => state.charts[g.id]).find(Boolean);
  $("charts").insertBefore(element, after ? after.element : null);
  const colours = {};
  const series = [{ label: "step" }].concat(built.series.map((s) => {
    colours[s.key] = colours[s.key] || PALETTE[Object.keys(colours).length % PALETTE.length];
    const label = state.compareId ? `${s.key} [${s.runIndex === 0 ? "A" : "B"}]` : s.key;
    return { label, stroke: colours[s.key], width: 1.5, dash: s.runIndex === 0 ? undefined : [6, 4], spanGaps: true };
  }));
  const plot = new uPlot({
    width, height: 220, series,
    scales: { x: { time: false } },
    axes: [{ label: "step" }, { size: 60 }],
    legend: { live: true },
  }, built.data, element);
  return { plot, element, signature };
}

// ---- runs list, events, config
function drawRuns() {
  const list = $("runs");
  list.innerHTML = "";
  for (const run of state.runs) {
    const item = document.createElement("li");
    item.dataset.runId = run.id;
    item.className = run.id === state.runId ? "selected" : "";
    item.innerHTML = `<span class="status ${run.status}">${run.status}</span>`;
    item.append(`${run.name} · step ${run.last_step ?? "-"}`);
    item.title = run.id;
    item.onclick = () => selectRun(run.id);
    list.append(item);
  }
  const compare = $("compare");
  const options = [["", "(none)"]].concat(state.runs.filter((r) => r.id !== state.runId).map((r) => [r.id, `${r.name} (${r.id})`]));
  if (compare.options.length !== options.length || [...compare.options].some((o, i) => o.value !== options[i][0])) {
    compare.innerHTML = "";
    for (const [value, text] of options) compare.append(new Option(text, value, false, value === state.compareId));
  }
  $("empty").hidden = state.runs.length > 0;
}

function drawDetail(detail) {
  $("run-title").textContent = `${detail.name} (${detail.id}) · ${detail.status}`;
  $("config").textContent = JSON.stringify(detail.config, null, 2);
  $("events").innerHTML = "";
  for (const event of detail.events.slice(-30).reverse()) {
    const item = document.createElement("li");
    item.innerHTML = `<span class="kind"></span> <span class="when"></span><br><span class="message"></span>`;
    item.querySelector(".kind").textContent = event.kind;
    item.querySelector(".when").textContent = new Date(event.time * 1000).toLocaleTimeString();
    item.querySelector(".message").textContent = event.message;
    $("events").append(item);
  }
}

// ---- gallery: one step's samples with prompt and reward breakdown
async function drawGallery(detail) {
  const slider = $("step-slider");
  const steps = detail.sample_steps;
  slider.max = String(Math.max(0, steps.length - 1));
  if (!steps.length) { $("gallery").innerHTML = ""; $("gallery-step").textContent = "(none yet)"; return; }
  if ($("follow").checked || !steps.includes(state.galleryStep)) slider.value = String(steps.length - 1);
  const step = steps[Number(slider.value)];
  if (step === state.galleryStep && $("gallery").children.length) return;
  const response = await getJSON(`/api/runs/${encodeURIComponent(detail.id)}/samples?step=${step}`);
  state.galleryStep = step;
  $("gallery-step").textContent = `step ${step}`;
  const gallery = $("gallery");
  gallery.innerHTML = "";
  for (const sample of response.samples) {
    const card = document.createElement("div");
    card.className = "card";
    card.innerHTML = `<img alt="sample"><div class="prompt"></div><div class="reward"></div><table></table>`;
    card.querySelector("img").src = sample.image_url;
    card.querySelector(".prompt").textContent = sample.prompt;
    card.querySelector(".reward").textContent = `reward ${sample.reward.toFixed(3)}`;
    for (const [name, value] of Object.entries(sample.components)) {
      const row = card.querySelector("table").insertRow();
      row.insertCell().textContent = name;
      row.insertCell().textContent = value.toFixed(3);
    }
    gallery.append(card);
  }
}

// ---- the poll loop
async function poll() {
  try {
    state.runs = await getJSON("/api/runs");
    if (!state.runs.some((r) => r.id === state.runId)) state.runId = state.runs.length ? state.runs[0].id : null;
    if (!state.runs.some((r) => r.id === state.compareId)) state.compareId = "";
    drawRuns();
    if (state.runId) {
      const detail = await getJSON(`/api/runs/${encodeURIComponent(state.runId)}`);
      state.detail = detail;
      drawDetail(detail);
      await refreshSeries(state.runId, detail);
      if (state.compareId) await refreshSeries(state.compareId, await getJSON(`/api/runs/${encodeURIComponent(state.compareId)}`));
      drawCharts();
      await drawGallery(detail);
    }
    $("live").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    $("live").textContent = `poll failed: ${error.message}`;
  }
  setTimeout(poll, state.pollMs);
}

function saveUrl() {
  const query = new URLSearchParams({ run: state.runId || "", compare: state.compareId, smooth: String(state.smooth) });
  if (params.has("poll")) query.set("poll", String(state.pollMs));
  history.replaceState(null, "", `?${query}`);
}

function selectRun(runId) {
  state.runId = runId;
  if (state.compareId === runId) state.compareId = "";
  state.galleryStep = null;
  state.detail = null;
  saveUrl();
  drawRuns();
  drawCharts();
}

$("compare").onchange = (event) => { state.compareId = event.target.value; saveUrl(); drawCharts(); };
$("smooth").value = String(state.smooth);
$("smooth-value").textContent = state.smooth.toFixed(2);
$("smooth").oninput = (event) => {
  state.smooth = Number(event.target.value);
  $("smooth-value").textContent = state.smooth.toFixed(2);
  saveUrl();
  drawCharts();
};
$("step-slider").oninput = () => {
  $("follow").checked = false;
  if (state.detail) drawGallery(state.detail);
};
window.addEventListener("resize", () => drawCharts());
poll();
