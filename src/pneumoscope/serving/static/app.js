"use strict";
// The page: upload several radiographs through POST /predict/batch, list them, show one at a time.
const $ = (id) => document.getElementById(id);
const MAX_FILES = 16;  // serve.MAX_FILES
let maxBytes = 20 * 1024 * 1024;  // replaced by /health's max_upload_bytes
let modelThreshold = null;  // /health's threshold: an error row's threshold in the CSV
const items = [];  // {n, name, result | null, error}
let sortDir = 0;  // 0: upload order, -1: highest probability first, 1: lowest first
let selected = null;

fetch("/health").then(r => r.json()).then(h => {
  if (h.max_upload_bytes) maxBytes = h.max_upload_bytes;
  modelThreshold = h.threshold;
  nameModel(h);
}).catch(() => {});

// The model served, under the title: its run's name, its backbone and its threshold.
function nameModel(h) {
  const name = document.createElement("b");
  name.textContent = h.model;
  const rest = (h.model !== h.backbone ? ` (${h.backbone})` : "") + ` · threshold ${fmt(h.threshold)}`
    + (h.backend === "onnxruntime" ? " · ONNX Runtime" : "");
  $("model").replaceChildren("Model: ", name, rest);
}

const drop = $("drop"), input = $("file");
["dragenter", "dragover"].forEach(e => drop.addEventListener(e, ev => { ev.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach(e => drop.addEventListener(e, ev => { ev.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", ev => { if (ev.dataTransfer.files.length) sendAll(Array.from(ev.dataTransfer.files)); });
input.addEventListener("change", () => { if (input.files.length) sendAll(Array.from(input.files)); input.value = ""; });
$("opacity").addEventListener("input", () => { $("heat").style.opacity = $("opacity").value / 100; });
$("sortprob").addEventListener("click", () => { sortDir = sortDir === -1 ? 1 : -1; renderRows(); });
$("csv").addEventListener("click", downloadCsv);

const fmt = (p) => p.toFixed(3);
// the decision rule, whatever the classes are called: at or above the threshold (and assessable)
const suspected = (r) => r.label !== null && r.prob >= r.threshold;
const probOf = (r) => `P(${(r.prob_of || "pneumonia").toLowerCase()})`;

// an N-class model: each class's probability as a bar (prob_<CLASS> fields), most probable first
function showClasses(r) {
  const box = $("classbars");
  const entries = Object.entries(r).filter(([k]) => k.startsWith("prob_") && k !== "prob_of").map(([k, v]) => [k.slice(5), v]);
  box.replaceChildren();
  box.hidden = entries.length === 0;
  entries.sort((a, b) => b[1] - a[1]);
  for (const [name, p] of entries) {
    const row = document.createElement("div");
    row.className = "classbar";
    const label = document.createElement("span");
    label.textContent = name;
    const bar = document.createElement("span");
    bar.className = "classbar-track";
    const fill = document.createElement("span");
    fill.className = "classbar-fill";
    fill.style.width = (100 * p).toFixed(1) + "%";
    bar.append(fill);
    const value = document.createElement("span");
    value.textContent = fmt(p);
    row.append(label, bar, value);
    box.append(row);
  }
}

function setStatus(text, error) { $("status").textContent = text; $("status").className = error ? "error" : ""; }

// Requests of at most MAX_FILES files and maxBytes bytes; a file alone over the limit is not sent.
function chunks(files) {
  const out = []; let cur = [], size = 0;
  for (const f of files) {
    if (f.size > maxBytes) continue;
    if (cur.length === MAX_FILES || size + f.size > maxBytes) { out.push(cur); cur = []; size = 0; }
    cur.push(f); size += f.size;
  }
  if (cur.length) out.push(cur);
  return out;
}

async function sendAll(files) {
  const first = items.length;
  const entries = files.map((f, i) => ({ n: first + i + 1, name: f.name, file: f, result: null, error: "" }));
  entries.forEach(e => items.push(e));
  entries.filter(e => e.file.size > maxBytes).forEach(e => {
    e.error = `${e.name} is ${e.file.size.toLocaleString()} bytes; the limit is ${maxBytes.toLocaleString()} bytes per request. Send a smaller file.`;
  });
  $("workspace").hidden = false;
  renderRows();
  let done = 0;
  for (const group of chunks(files)) {
    setStatus(`Analysing ${done + 1}–${done + group.length} of ${files.length}…`);
    const body = new FormData();
    group.forEach(f => body.append("files", f));
    const mine = entries.filter(e => group.includes(e.file));
    try {
      const res = await fetch("/predict/batch?heatmap=true", { method: "POST", body });
      const data = await res.json();
      if (!res.ok) throw new Error(`error ${res.status}: ${data.detail || res.statusText}`);
      data.results.forEach((r, i) => { if (r.error) mine[i].error = r.error; else mine[i].result = r; });
    } catch (err) {
      mine.forEach(e => { e.error = "Request failed: " + err.message; });
    }
    done += group.length;
    renderRows();
    if (selected === null || items.indexOf(selected) < first) show(entries.find(e => e.result || e.error));
  }
  entries.forEach(e => { delete e.file; });
  const failed = entries.filter(e => e.error);
  setStatus(summary(entries, failed), failed.length > 0);
}

// "7 of 8 analysed; 1 could not be read: notes.png: <why>": the first refusal's reason, as the row shows it.
function summary(entries, failed) {
  const done = `${entries.length - failed.length} of ${entries.length} analysed`;
  if (!failed.length) return done + ".";
  const e = failed[0];
  const why = e.error.startsWith(e.name) ? e.error : `${e.name}: ${e.error}`;
  return `${done}; ${failed.length} could not be read: ${why}` + (failed.length > 1 ? ` (and ${failed.length - 1} more: choose a row to see why)` : "");
}

// The worklist as CSV, one row per file in the order shown, built here from what the page holds.
const CSV_COLUMNS = ["file", "prob", "label", "threshold", "ood_reason", "error"];

function csvCell(v) {
  let s = v === null || v === undefined ? "" : String(v);
  if (/^[=+\-@\t\r]/.test(s)) s = "'" + s;  // a spreadsheet would run a cell starting so as a formula
  return /[",\r\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

function worklistCsv() {
  const rows = ordered().map(e => {
    const r = e.result || {};
    return [e.name, r.prob, r.label, r.threshold ?? modelThreshold, r.ood_reason, e.error];
  });
  return [CSV_COLUMNS, ...rows].map(row => row.map(csvCell).join(",")).join("\r\n") + "\r\n";
}

function downloadCsv() {
  const url = URL.createObjectURL(new Blob([worklistCsv()], { type: "text/csv" }));
  const a = document.createElement("a");
  a.href = url; a.download = "pneumoscope-worklist.csv";
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function ordered() {
  if (!sortDir) return items.slice();
  const key = (e) => (e.result ? e.result.prob : null);
  return items.slice().sort((a, b) => {
    const ka = key(a), kb = key(b);
    if (ka === null || kb === null) return (ka === null) - (kb === null) || a.n - b.n;  // unanalysed last
    return sortDir * (ka - kb) || a.n - b.n;
  });
}

function renderRows() {
  const tbody = $("rows");
  tbody.textContent = "";
  $("wl-count").textContent = `(${items.length})`;
  $("probcol").setAttribute("aria-sort", sortDir === -1 ? "descending" : sortDir === 1 ? "ascending" : "none");
  $("sortmark").textContent = sortDir === -1 ? "↓" : sortDir === 1 ? "↑" : "↕";
  for (const e of ordered()) {
    const tr = document.createElement("tr");
    const r = e.result;
    tr.className = r ? (r.label === null ? "na" : suspected(r) ? "pos" : "neg") : e.error ? "err" : "wait";
    if (e === selected) tr.classList.add("selected");
    const name = document.createElement("td");
    const btn = document.createElement("button");
    btn.type = "button"; btn.className = "rowbtn"; btn.textContent = e.name; btn.title = e.name;
    btn.disabled = !(r || e.error);
    if (e === selected) btn.setAttribute("aria-current", "true");
    btn.dataset.n = e.n;
    btn.addEventListener("click", () => {
      show(e); focusRow(e);
      if (window.matchMedia("(max-width: 800px)").matches) $("result").scrollIntoView({ block: "start" });
    });
    name.appendChild(btn);
    const prob = document.createElement("td");
    prob.className = "num";
    prob.textContent = r ? fmt(r.prob) : "–";
    const res = document.createElement("td");
    res.textContent = r ? (r.label === null ? "Cannot assess" : suspected(r) ? "Suspected" : "Below") : e.error ? "Error" : "Analysing…";
    if (r && r.label === null) res.title = r.ood_reason;
    tr.append(name, prob, res);
    tbody.appendChild(tr);
  }
}

// Selection changes only classes, so the focused button stays where it is.
function markSelected() {
  document.querySelectorAll("#rows .rowbtn").forEach(b => {
    const on = selected !== null && b.dataset.n === String(selected.n);
    b.closest("tr").classList.toggle("selected", on);
    if (on) b.setAttribute("aria-current", "true"); else b.removeAttribute("aria-current");
  });
}

function focusRow(e) { const b = document.querySelector(`.rowbtn[data-n="${e.n}"]`); if (b) b.focus(); }

// Up/Down move through the worklist, as in a reading list.
$("rows").addEventListener("keydown", ev => {
  if (ev.key !== "ArrowDown" && ev.key !== "ArrowUp") return;
  const list = ordered().filter(e => e.result || e.error);
  const i = list.indexOf(selected) + (ev.key === "ArrowDown" ? 1 : -1);
  if (i >= 0 && i < list.length) { ev.preventDefault(); show(list[i]); focusRow(list[i]); }
});

function show(e) {
  if (!e) return;
  selected = e;
  markSelected();
  const r = e.result;
  $("result").hidden = false;
  $("fname").textContent = e.name;
  const verdict = $("verdict");
  if (!r) {  // an error: its reason, and no probability bar or images
    verdict.className = "verdict err"; verdict.textContent = e.error;
    document.querySelector(".views").hidden = true;
    $("meter").hidden = true; $("meterlegend").hidden = true;
    return;
  }
  document.querySelector(".views").hidden = false;
  $("meter").hidden = false; $("meterlegend").hidden = false;
  const above = suspected(r);
  if (r.label === null) {  // not assessable: no diagnosis, in neutral colours; the probability for information only
    verdict.className = "verdict na";
    verdict.textContent = `Cannot assess: ${r.ood_reason}. No diagnosis is given (${probOf(r)} = ${fmt(r.prob)}, for information only).`;
  } else {
    verdict.className = "verdict " + (above ? "pos" : "neg");
    verdict.textContent = above
      ? `${r.label === "PNEUMONIA" ? "Pneumonia" : r.label} suspected: ${probOf(r)} = ${fmt(r.prob)}, at or above the threshold ${fmt(r.threshold)}`
      : `Below threshold (${r.label}): ${probOf(r)} = ${fmt(r.prob)}, under the threshold ${fmt(r.threshold)}`;
  }
  $("meterfill").style.width = (100 * r.prob).toFixed(1) + "%";
  $("meterfill").className = "meter-fill " + (r.label === null ? "dimmed" : above ? "pos" : "neg");
  $("meterthr").style.left = (100 * r.threshold).toFixed(1) + "%";
  $("meterlegend").textContent = `0 ← ${probOf(r)} → 1; the mark is the decision threshold (${fmt(r.threshold)}).`;
  showClasses(r);
  $("probname").textContent = probOf(r);  // what the worklist's probabilities are of
  $("base").src = $("under").src = "data:image/png;base64," + r.image_png;
  if (r.heatmap_png) {
    $("heat").src = "data:image/png;base64," + r.heatmap_png;
    $("stack").hidden = false; $("heatcontrols").hidden = false;
    $("heat").style.opacity = $("opacity").value / 100;
    $("camnote").textContent = "Grad-CAM for " + r.cam_target + ": where the model's evidence lies, not proof of a finding.";
  } else {
    $("stack").hidden = true; $("heatcontrols").hidden = true;
    $("camnote").textContent = r.label === null ? "No heatmap: there is no decision to explain."
      : r.heatmap_error ? "No heatmap: " + r.heatmap_error + "." : "No heatmap for this model backend.";
  }
}
