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
    li.append(time, " ", el("span", "msg", e.message));
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
  // `spotrun up` prints /login#token=...: the fragment never reaches the server.
  const m = /^#token=(.+)$/.exec(window.location.hash);
  if (!m) { return; }
  history.replaceState(null, "", window.location.pathname);
  document.getElementById("token").value = decodeURIComponent(m[1]);
  document.getElementById("login-form").submit();
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("time[datetime]").forEach((t) => {
    if (!t.closest(".workers")) { localTime(t); }
  });
  const page = document.body.dataset.page;
  if (page === "jobs") { liveJobList(); }
  if (page === "job") {
    const id = document.body.dataset.jobId;
    if (!FINAL.has(document.getElementById("job-state").dataset.state)) { liveJob(id); }
  }
  if (page === "login") { loginFromFragment(); }
});
