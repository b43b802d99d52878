// spotrun dashboard: live updates over Server-Sent Events. No framework, no build step.
// Text from the server is only ever set with textContent, never parsed as HTML.
"use strict";

const STATE_WORDS = {
  queued: "Waiting for a worker", running: "Running", succeeded: "Succeeded",
  failed: "Failed", cancelled: "Cancelled",
};
const FINAL = new Set(["succeeded", "failed", "cancelled"]);

function localTime(el) {
  const t = new Date(el.getAttribute("datetime"));
  if (!isNaN(t)) { el.textContent = t.toLocaleString(); }
}

function progressWords(p) {
  if (p.total) { return `${p.step} of ${p.total} steps (${Math.round(100 * p.step / p.total)}%)`; }
  return p.step ? `step ${p.step}` : "";
}

function setBar(bar, job) {
  const p = job.progress;
  if (p.total) { bar.max = p.total; bar.value = p.step; }
  else { bar.max = 1; bar.value = job.state === "succeeded" ? 1 : 0; }
}

function setBadge(badge, state) {
  badge.textContent = STATE_WORDS[state] || state;
  badge.className = `badge state-${state}`;
  badge.dataset.state = state;
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) { node.className = cls; }
  if (text !== undefined) { node.textContent = text; }
  return node;
}

// ------------------------------------------------------------------ job list

function jobRow(job) {
  const li = el("li", "job");
  li.dataset.jobId = job.id;
  const head = el("div", "job-head");
  const link = el("a", "job-name", job.pipeline);
  link.href = `/jobs/${encodeURIComponent(job.id)}`;
  head.append(link, el("span", "badge"));
  const meta = el("div", "job-meta");
  const time = el("time");
  time.setAttribute("datetime", job.created_at);
  localTime(time);
  meta.append(el("span", "progress-text"), el("span", "worker"), time, el("span", "job-id", job.id));
  const bar = el("progress", "bar");
  li.append(head, bar, meta);
  return li;
}

function updateRow(li, job) {
  li.dataset.state = job.state;
  setBadge(li.querySelector(".badge"), job.state);
  setBar(li.querySelector("progress"), job);
  li.querySelector(".progress-text").textContent = progressWords(job.progress);
  li.querySelector(".worker").textContent = job.worker ? `on ${job.worker}` : "";
}

function liveJobList() {
  const list = document.getElementById("jobs");
  const source = new EventSource("/v1/stream/jobs");
  source.addEventListener("job", (ev) => {
    const job = JSON.parse(ev.data);
    let li = list.querySelector(`li[data-job-id="${CSS.escape(job.id)}"]`);
    if (!li) {
      li = jobRow(job);
      list.prepend(li);
      document.getElementById("no-jobs").hidden = true;
    }
    updateRow(li, job);
  });
}

// ------------------------------------------------------------ training curve

const SVG = "http://www.w3.org/2000/svg";
const MAX_POINTS = 300; // as the server keeps (store.py MAX_METRIC_POINTS)
const INTERRUPTIONS = new Set(["preempted", "lease_expired", "handed_back"]);
const curve = { series: [], marks: [] };

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) { node.setAttribute(k, String(v)); }
  return node;
}

function numericMetrics(metrics) {
  const out = {};
  for (const [k, v] of Object.entries(metrics || {})) {
    if (typeof v === "number" && isFinite(v)) { out[k] = v; }
  }
  return out;
}

function addPoint(job) {
  // The job's JSON puts the metrics beside step and total in "progress".
  const { step: _step, total: _total, ...reported } = job.progress;
  const metrics = numericMetrics(reported);
  if (!Object.keys(metrics).length) { return; }
  const last = curve.series[curve.series.length - 1];
  if (last && last.step === job.progress.step && last.attempt === job.attempt) { return; }
  curve.series.push({ step: job.progress.step, attempt: job.attempt, metrics });
  if (curve.series.length > MAX_POINTS) {
    // Every other point but the newest, as the server thins it.
    curve.series = curve.series.filter((_, i, a) => i === 0 || i === a.length - 1 || i % 2 === 0);
  }
}

// Where each interruption and resume falls: the last step its attempt reported, and the
// first step the next attempt did.
function markSteps() {
  const out = [];
  for (const m of curve.marks) {
    const pts = curve.series.filter((p) => p.attempt === m.attempt);
    if (!pts.length) { continue; }
    const resumed = m.kind === "resumed";
    out.push({ kind: resumed ? "resumed" : (m.kind === "preempted" ? "preempted" : "lost"),
               step: resumed ? pts[0].step : pts[pts.length - 1].step, message: m.message });
  }
  return out;
}

function drawCurve() {
  const svg = document.getElementById("curve");
  const legend = document.getElementById("curve-legend");
  if (!svg || !curve.series.length) { return; }
  document.getElementById("curve-section").hidden = false;
  const W = 600, H = 200, PAD = 8;
  const steps = curve.series.map((p) => p.step);
  const x0 = Math.min(...steps), x1 = Math.max(...steps);
  const xOf = (s) => PAD + (W - 2 * PAD) * (x1 > x0 ? (s - x0) / (x1 - x0) : 0.5);
  const keys = [...new Set(curve.series.flatMap((p) => Object.keys(p.metrics)))];
  const nodes = [];
  const items = [];
  keys.forEach((key, i) => {
    const pts = curve.series.filter((p) => key in p.metrics);
    const ys = pts.map((p) => p.metrics[key]);
    const lo = Math.min(...ys), hi = Math.max(...ys);
    // Each metric on its own scale: loss and accuracy differ by orders of magnitude.
    const yOf = (v) => H - PAD - (H - 2 * PAD) * (hi > lo ? (v - lo) / (hi - lo) : 0.5);
    const line = svgEl("polyline", {
      class: `line line-${i % 6}`, "data-metric": key, fill: "none",
      points: pts.map((p) => `${xOf(p.step).toFixed(1)},${yOf(p.metrics[key]).toFixed(1)}`).join(" "),
    });
    nodes.push(line);
    const li = el("li", `legend-${i % 6}`, `${key} ${ys[ys.length - 1].toPrecision(4)} (${lo.toPrecision(3)} to ${hi.toPrecision(3)})`);
    items.push(li);
  });
  for (const m of markSteps()) {
    const g = svgEl("g", { class: `marker marker-${m.kind}` });
    const x = xOf(m.step).toFixed(1);
    g.append(svgEl("line", { x1: x, x2: x, y1: 0, y2: H }));
    const title = svgEl("title");
    title.textContent = m.message;
    g.append(title);
    nodes.push(g);
  }
  svg.replaceChildren(...nodes);
  legend.replaceChildren(...items);
}

function initCurve() {
  const svg = document.getElementById("curve");
  if (!svg) { return; }
  curve.series = JSON.parse(svg.dataset.series || "[]");
  curve.marks = JSON.parse(svg.dataset.marks || "[]");
  drawCurve();
}

function updateCurve(job) {
  addPoint(job);
  curve.marks = (job.events || [])
    .filter((e) => INTERRUPTIONS.has(e.kind) || e.kind === "resumed")
    .map((e) => ({ kind: e.kind, attempt: e.attempt, message: e.message }));
  drawCurve();
}

// ------------------------------------------------------------------- one job

function showJob(job) {
  setBadge(document.getElementById("job-state"), job.state);
  setBar(document.getElementById("job-progress"), job);
  document.getElementById("job-progress-text").textContent = progressWords(job.progress);
  let where = "";
  if (job.worker) {
    if (job.state === "running") { where = `Running on worker ${job.worker}.`; }
    else if (FINAL.has(job.state)) { where = `Ran on worker ${job.worker}.`; }
    else { where = `Last ran on worker ${job.worker}.`; }
  }
  document.getElementById("job-worker").textContent = where;
  const timeline = document.getElementById("timeline");
  const items = (job.events || []).map((e) => {
    const li = el("li");
    li.dataset.kind = e.kind;
    const time = el("time");
    time.setAttribute("datetime", e.at);
    localTime(time);
    if (e.detail) {
      // The plain line; how it was worked out opens under it.
      const details = el("details", "msg");
      details.append(el("summary", "", e.message), el("p", "detail", e.detail));
      li.append(time, " ", details);
    } else {
      li.append(time, " ", el("span", "msg", e.message));
    }
    return li;
  });
  if (items.length) { timeline.replaceChildren(...items); }
  const hasResult = job.result !== null && job.result !== undefined;
  document.getElementById("result-section").hidden = !hasResult && !job.error;
  const result = document.getElementById("job-result");
  result.hidden = !hasResult;
  result.textContent = hasResult ? JSON.stringify(job.result, null, 2) : "";
  const error = document.getElementById("job-error");
  error.hidden = !job.error;
  error.textContent = job.error || "";
  const cancel = document.getElementById("cancel-form");
  if (cancel && FINAL.has(job.state)) { cancel.hidden = true; }
  updateCurve(job);
}

function liveJob(jobId) {
  const source = new EventSource(`/v1/stream/jobs/${encodeURIComponent(jobId)}`);
  source.addEventListener("job", (ev) => showJob(JSON.parse(ev.data)));
  // The job ended: the stream is done, do not let the browser reconnect; load the page
  // once more for what only the server works out (the cost of the whole run).
  source.addEventListener("end", () => { source.close(); window.location.reload(); });
}

// --------------------------------------------------------------------- login

function loginFromFragment() {
  // `spotrun up` prints /login#token=...: the fragment never reaches the server. The
  // token is filled in, not sent: a link alone must never sign anyone in (someone else's
  // link would sign you into their account), so the user confirms with a click.
  const m = /^#token=(.+)$/.exec(window.location.hash);
  if (!m) { return; }
  history.replaceState(null, "", window.location.pathname);
  document.getElementById("token").value = decodeURIComponent(m[1]);
  document.getElementById("from-link").hidden = false;
  document.getElementById("sign-in").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("time[datetime]").forEach((t) => {
    if (!t.closest(".workers")) { localTime(t); }
  });
  const page = document.body.dataset.page;
  if (page === "jobs") { liveJobList(); }
  if (page === "job") {
    initCurve();
    const id = document.body.dataset.jobId;
    if (!FINAL.has(document.getElementById("job-state").dataset.state)) { liveJob(id); }
  }
  if (page === "login") { loginFromFragment(); }
});
