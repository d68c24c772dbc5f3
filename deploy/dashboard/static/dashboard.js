// blip3o-rl dashboard: polls the JSON API and draws uPlot charts and the sample galleries.
// No build step. URL parameters: ?run=ID&compare=ID&smooth=0.6&poll=2000 (ms between polls).
"use strict";

// Panels: which metric keys share a chart, and the y scale of each chart (key names: rl/run_store.py).
// Keys in one panel measure the same thing in the same unit; any key no panel claims gets a panel of
// its own, so a version number never shares an axis with a fraction. Scales (see yRange):
//   fraction  0..1 always (accuracies, shares)       share  0..max, at most 1 (small fractions)
//   nonneg    0..max (KL, entropy, seconds, counts)   data   the data's range, padded (from 0 when >= 0 and near it)
//   unit      0..1 while every value fits, else data (eval results, guard statistics)
// A step where a metric was not measured is null: a gap in the line (spanGaps false), never a 0.
// Eval panels are sparse by design (every K steps), so their points are drawn and joined.
// Two policies can learn in one run: the AR policy (policy/*) and the diffusion decoder
// (diffusion/*, Flow-GRPO). A diffusion number shares its AR twin's panel only where both are the
// same count of the same thing on the same range (weight versions, zero-signal group share);
// otherwise it has a panel of its own right after its twin: its KL is per SDE step (the AR one per
// token), its clip share counts (image, SDE step) pairs, and its loss, gradient norm and learning
// rate belong to another model and optimizer, whose magnitudes would flatten one line on a shared axis.
const PANELS = [
  { id: "reward-mean", title: "Mean reward", scale: "data", match: (k) => k === "reward/mean" },
  { id: "reward-functions", title: "Reward per function", scale: "data", match: (k) => k.startsWith("reward/") && k !== "reward/std" },
  { id: "reward-std", title: "Reward std within the step", scale: "nonneg", match: (k) => k === "reward/std" },
  { id: "geneval", title: "GenEval accuracy per tag", scale: "fraction", match: (k) => k.startsWith("geneval/") },
  { id: "ocr", title: "OCR exact-match share", scale: "fraction", match: (k) => k.startsWith("ocr/") },
  { id: "kl", title: "KL to reference", scale: "nonneg", match: (k) => k === "policy/kl" },
  { id: "diffusion-kl", title: "Diffusion: KL to the frozen decoder (per SDE step)", scale: "nonneg", match: (k) => k === "diffusion/kl" },
  { id: "entropy", title: "Entropy (nats per token)", scale: "nonneg", match: (k) => k === "policy/entropy" },
  { id: "clip-fraction", title: "Clipped token share", scale: "share", match: (k) => k.startsWith("policy/clip_") },
  { id: "diffusion-clip-fraction", title: "Diffusion: clipped (image, SDE step) share", scale: "share", match: (k) => k === "diffusion/clip_fraction" },
  { id: "loss", title: "Policy loss", scale: "data", match: (k) => k === "policy/loss" },
  { id: "diffusion-loss", title: "Diffusion: loss and clipped surrogate", scale: "data", match: (k) => k === "diffusion/loss" || k === "diffusion/policy_loss" },
  { id: "grad-norm", title: "Gradient norm", scale: "nonneg", match: (k) => k === "policy/grad_norm" },
  { id: "diffusion-grad-norm", title: "Diffusion: gradient norm", scale: "nonneg", match: (k) => k === "diffusion/grad_norm" },
  { id: "ratio-max", title: "Largest importance ratio", scale: "data", match: (k) => k === "policy/ratio_max" },
  { id: "diffusion-ratio", title: "Diffusion: smallest and largest importance ratio (per SDE step)", scale: "data", match: (k) => k === "diffusion/ratio_max" || k === "diffusion/ratio_min" },
  { id: "diffusion-logprob-diff", title: "Diffusion: largest |learner - sampler| log-prob (per SDE step)", scale: "nonneg", match: (k) => k === "diffusion/logprob_diff" },
  { id: "lr", title: "Learning rate", scale: "nonneg", match: (k) => k === "policy/lr" },
  { id: "diffusion-lr", title: "Diffusion: learning rate", scale: "nonneg", match: (k) => k === "diffusion/lr" },
  // both versions count published weight updates from 0: one axis shows which policy moves (a
  // diffusion-only run keeps policy/version flat)
  { id: "version", title: "Policy version", scale: "nonneg", match: (k) => k === "policy/version" || k === "diffusion/version" },
  { id: "staleness", title: "Rollout staleness (versions behind)", scale: "nonneg", match: (k) => k === "policy/staleness" },
  // the async schedule (schedule/*, async runs): steps launched and not yet trained when this step
  // trained, how far behind the learner its rows were sampled, and rows sampled again for being too old
  { id: "schedule-in-flight", title: "Steps in flight (launched, not yet trained)", scale: "nonneg", match: (k) => k === "schedule/in_flight_steps" },
  { id: "schedule-staleness", title: "Staleness of the step's rows (versions behind): min, mean, max", scale: "nonneg", match: (k) => /^schedule\/staleness_(min|mean|max)$/.test(k) },
  { id: "schedule-resampled", title: "Stale rows sampled again", scale: "nonneg", match: (k) => k === "schedule/stale_rows_resampled" },
  { id: "zero-signal", title: "Zero-signal groups (share)", scale: "fraction", match: (k) => k === "groups/zero_signal_share" || k === "diffusion/zero_signal_share" },
  { id: "eval-time", title: "In-run eval time (s)", scale: "nonneg", sparse: true, match: (k) => k === "time/eval" },
  { id: "time", title: "Step time by stage (s)", scale: "nonneg", match: (k) => k.startsWith("time/") },
  { id: "throughput", title: "Throughput (images/s)", scale: "nonneg", match: (k) => k.startsWith("throughput/") },
  // statistics of the step's images (rl/guard/image_stats.py): what the reward-hacking guard watches
  { id: "images-dark_share", title: "Dark-pixel share", scale: "fraction", match: (k) => k === "images/dark_share" },
  { id: "images-brightness", title: "Mean brightness (luma, 0 black .. 1 white)", scale: "fraction", match: (k) => k === "images/brightness" },
  { id: "images-colour_entropy", title: "Colour entropy (bits, at most 6)", scale: "nonneg", match: (k) => k === "images/colour_entropy" },
  { id: "images-edge_density", title: "Edge density (share of pixels)", scale: "share", match: (k) => k === "images/edge_density" },
  { id: "images-group_diversity", title: "Diversity within a group (0: all alike)", scale: "share", match: (k) => k === "images/group_diversity" },
];
const panelCache = new Map();

function slug(text) {
  return text.replace(/[^A-Za-z0-9_]+/g, "-");
}

function panelOf(key) {
  if (!panelCache.has(key)) panelCache.set(key, findPanel(key));
  return panelCache.get(key);
}

// The panel of a metric key: a fixed one; else one per reward component's request latency
// (reward_latency/<component>/<p50|p90|p99|max>), one per eval benchmark (eval/<bench>/<name>: all
// but the last part), one per guard statistic (guard/<statistic>[/...]), or one for the key alone.
// `rank` orders the page (compared element by element): fixed panels in PANELS order with the latency
// panels right after the step times, then eval, guard and the rest by name.
function findPanel(key) {
  const fixed = PANELS.findIndex((p) => p.match(key));
  if (fixed >= 0) return { ...PANELS[fixed], rank: [0, fixed] };
  const [head, ...rest] = key.split("/");
  if (head === "reward_latency" && rest.length > 1) {
    const component = rest.slice(0, -1).join("/");
    const after = PANELS.findIndex((p) => p.id === "time");
    return { id: slug(`reward-latency-${component}`), title: `Reward latency: ${component} (s per request)`,
             scale: "nonneg", rank: [0, after, component] };
  }
  if (head === "eval") {
    const bench = rest.slice(0, -1).join("/") || "overall";
    return { id: slug(`eval-${bench}`), title: `Eval: ${bench}`, scale: "unit", sparse: true, rank: [1, bench] };
  }
  if (head === "guard" && rest.length) {
    return { id: slug(`guard-${rest[0]}`), title: `Guard: ${rest[0]}`, scale: "unit", rank: [2, rest[0]] };
  }
  return { id: slug(`metric-${key}`), title: key, scale: "data", rank: [3, key] };
}

function comparePanels(a, b) {
  for (let i = 0; i < Math.max(a.rank.length, b.rank.length); i++) {
    if (a.rank[i] === undefined || b.rank[i] === undefined) return a.rank[i] === undefined ? -1 : 1;
    if (a.rank[i] !== b.rank[i]) return a.rank[i] < b.rank[i] ? -1 : 1;
  }
  return 0;
}

// y range of a panel from the finite min/max uPlot found in its data (null/inf when there is none).
function yRange(scale) {
  return (u, min, max) => {
    const has = Number.isFinite(min) && Number.isFinite(max);
    if (scale === "fraction" || (scale === "unit" && (!has || (min >= 0 && max <= 1)))) return [0, 1];
    if (!has) return [0, 1];
    if (scale === "share") return [0, max > 0 ? Math.min(1, max * 1.15) : 1];
    if (scale === "nonneg" || ((scale === "data" || scale === "unit") && min >= 0 && max > 0 && min <= 0.5 * max)) {
      return [0, max > 0 ? max * 1.15 : 1];
    }
    // a constant (also one smoothing left off by rounding: 0.1 vs 0.10000000000000002) gets +-10%;
    // a zero-width range would make uPlot's tick loop run away
    const constant = max - min <= 1e-9 * Math.max(Math.abs(max), Math.abs(min), 1e-12);
    const pad = constant ? Math.max(Math.abs(max) * 0.1, 0.1) : 0.08 * (max - min);
    return [min - pad, max + pad];
  };
}

// y tick labels: uPlot's own (Intl, at most 3 decimals) unless the ticks are finer than that, where
// it would write a learning rate of 1e-5 as 0, 0, 0 (or 0.0015 as 0.002): there in exponent
// notation, with the digits the tick step needs (1e-5, 1.5e-5).
function yTickLabels(u, splits, axisIndex, space, incr) {
  return splits.map((v) => {
    if (v === null || v === undefined) return "";
    if (incr >= 1e-3 || v === 0) return uPlot.fmtNum(v);
    const digits = Math.min(15, Math.max(1, Math.ceil(Math.log10(Math.abs(v) / incr) + 1e-9) + 1));
    return Number(v.toPrecision(digits)).toExponential();
  });
}

const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];

const params = new URLSearchParams(location.search);
const state = {
  runs: [],
  runId: params.get("run"),
  compareId: params.get("compare") || "",
  smooth: Number(params.get("smooth") || 0),
  pollMs: Number(params.get("poll") || 2000),
  series: {},        // run id -> {steps: [], values: {key: []}, events: n}
  charts: {},        // panel id -> {plot, element, signature, panel}
  galleries: {},     // sample kind ("train", "eval") -> step shown
  detail: null,      // last /api/runs/{id} answer for the shown run
};
window.dashboard = state; // read by the browser test (chart point counts)

const $ = (id) => document.getElementById(id);

async function getJSON(url) {
  const response = await fetch(url);
  if (response.status === 401) location.reload(); // the session is gone: the page asks for the token again
  if (!response.ok) {
    const body = await response.json();
    throw new Error(`${url}: ${response.status} ${body.detail ?? body.message}`);
  }
  return response.json();
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

// Align tables [steps, ...columns] on the union of their steps; a step a run does not have is null.
function joinOnSteps(tables) {
  if (tables.length === 1) return tables[0];
  const steps = [...new Set(tables.flatMap((t) => t[0]))].sort((a, b) => a - b);
  const position = new Map(steps.map((step, i) => [step, i]));
  const joined = [steps];
  for (const [own, ...columns] of tables) {
    for (const column of columns) {
      const aligned = new Array(steps.length).fill(null);
      own.forEach((step, i) => { aligned[position.get(step)] = column[i]; });
      joined.push(aligned);
    }
  }
  return joined;
}

function shownRuns() {
  return [state.runId, state.compareId].filter((id) => id && state.series[id]);
}

// Panels with at least one measured value in a shown run, in display order.
function activePanels() {
  const panels = new Map();
  for (const runId of shownRuns()) {
    for (const [key, values] of Object.entries(state.series[runId].values)) {
      if (values.some((v) => v !== null && v !== undefined)) panels.set(panelOf(key).id, panelOf(key));
    }
  }
  return [...panels.values()].sort(comparePanels);
}

function chartData(panel) {
  // One table per shown run: [steps, ...smoothed values of this panel's keys]; joined on steps.
  const tables = [], series = [];
  shownRuns().forEach((runId, runIndex) => {
    const held = state.series[runId];
    const keys = Object.keys(held.values).filter((k) => panelOf(k).id === panel.id).sort();
    if (!keys.length) return;
    tables.push([held.steps, ...keys.map((k) => smooth(held.values[k], state.smooth))]);
    keys.forEach((k) => series.push({ runIndex, key: k, runId }));
  });
  return tables.length ? { data: joinOnSteps(tables), series } : null;
}

function drawCharts() {
  const box = $("charts");
  const width = Math.max(380, Math.floor(box.clientWidth / Math.max(1, Math.floor(box.clientWidth / 460))) - 30);
  const panels = activePanels();
  const wanted = new Set(panels.map((p) => p.id));
  for (const [id, chart] of Object.entries(state.charts)) {
    if (!wanted.has(id)) { chart.plot.destroy(); chart.element.remove(); delete state.charts[id]; }
  }
  let previous = null;
  for (const panel of panels) {
    const built = chartData(panel);
    const existing = state.charts[panel.id];
    const signature = built.series.map((s) => `${s.runId}|${s.key}`).join(",") + `|${width}`;
    if (existing && existing.signature === signature) {
      existing.plot.setData(built.data);
    } else {
      if (existing) { existing.plot.destroy(); existing.element.remove(); }
      state.charts[panel.id] = makeChart(panel, built, signature, width);
    }
    const element = state.charts[panel.id].element;
    // keep the page in panel order whatever order the panels appeared in
    if (previous ? previous.nextSibling !== element : box.firstChild !== element) box.insertBefore(element, previous ? previous.nextSibling : box.firstChild);
    previous = element;
    element.dataset.points = String(state.series[state.runId]?.steps.length ?? 0);
  }
}

function makeChart(panel, built, signature, width) {
  const element = document.createElement("div");
  element.className = "chart";
  element.id = `chart-${panel.id}`;
  element.dataset.testid = `chart-${panel.id}`;
  element.dataset.scale = panel.scale;
  element.innerHTML = "<h3></h3>";
  element.querySelector("h3").textContent = panel.title;
  const colours = {};
  const series = [{ label: "step" }].concat(built.series.map((s) => {
    colours[s.key] = colours[s.key] || PALETTE[Object.keys(colours).length % PALETTE.length];
    const label = state.compareId ? `${s.key} [${s.runIndex === 0 ? "A" : "B"}]` : s.key;
    return {
      label, stroke: colours[s.key], width: 1.5, dash: s.runIndex === 0 ? undefined : [6, 4],
      spanGaps: Boolean(panel.sparse), points: panel.sparse ? { show: true, size: 6 } : {},
    };
  }));
  const plot = new uPlot({
    width, height: 220, series,
    scales: { x: { time: false }, y: { range: yRange(panel.scale) } },
    axes: [{ label: "step" }, { size: 60, values: yTickLabels }],
    legend: { live: true },
  }, built.data, element);
  return { plot, element, signature, panel };
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

// ---- galleries: one step's samples with prompt and reward breakdown; "train" (the step's rollouts)
// and "eval" (in-run evaluation images, shown once the run has any). Element ids: PREFIX[kind] + name.
const GALLERY_PREFIX = { train: "", eval: "eval-" };

async function drawGallery(detail, kind) {
  const el = (name) => $(GALLERY_PREFIX[kind] + name);
  const steps = kind === "eval" ? detail.eval_sample_steps : detail.sample_steps;
  el("gallery-box").hidden = kind === "eval" && !steps.length;
  const slider = el("step-slider");
  slider.max = String(Math.max(0, steps.length - 1));
  if (!steps.length) { el("gallery").innerHTML = ""; el("gallery-step").textContent = "(none yet)"; return; }
  if (el("follow").checked || !steps.includes(state.galleries[kind])) slider.value = String(steps.length - 1);
  const step = steps[Number(slider.value)];
  if (step === state.galleries[kind] && el("gallery").children.length) return;
  const response = await getJSON(`/api/runs/${encodeURIComponent(detail.id)}/samples?step=${step}&kind=${kind}`);
  state.galleries[kind] = step;
  el("gallery-step").textContent = `step ${step}`;
  const gallery = el("gallery");
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
      await drawGallery(detail, "train");
      await drawGallery(detail, "eval");
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
  state.galleries = {};
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
for (const [kind, prefix] of Object.entries(GALLERY_PREFIX)) {
  $(prefix + "step-slider").oninput = () => {
    $(prefix + "follow").checked = false;
    if (state.detail) drawGallery(state.detail, kind);
  };
}
window.addEventListener("resize", () => drawCharts());
poll();
