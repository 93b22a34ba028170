// The Influence dashboard: a TensorBoard dynamic plugin frontend (ES modules, no framework, no build step).
// TensorBoard loads it in an iframe whose base URL is /data/plugin/influence/, so every fetch is relative.
// Sign convention: I(z, z_test) = -s_test . grad L(z); positive = harmful, negative = helpful.
// State lives in the URL hash (TensorBoard's p.influence.* keys), so a link restores run, epoch, tab, point and
// example. New analyses appear on TensorBoard's reload (its experimental.DataReloaded message) and by a cheap
// poll of /runs.

import { PAGE, currentRun, errorBox, getJSON, h, readHash, state, writeHash } from "./common.js";
import { drawMislabel, setNavigator as mislabelNavigator } from "./mislabel.js";
import { drawExamples, drawPoints, moveSelection, setNavigator as pointsNavigator, showMainError } from "./points.js";
import { drawTrust } from "./trust.js";

const POLL_MS = 15000;
const TABS = [["points", "Points"], ["examples", "Training examples"], ["mislabel", "Mislabel"], ["trust", "Trust"]];
let runsText = "";

function header() {
  const run = currentRun();
  const runSelect = h("select", { id: "li-run", onchange: (e) => { state.run = e.target.value; resetRun(); draw(); } },
    state.runs.map((r) => h("option", { value: r.run, selected: r.run === state.run }, r.run)));
  const analyses = run ? run.analyses : [];
  const analysisSelect = h("select", { id: "li-analysis", disabled: analyses.length ? null : true,
    onchange: (e) => { state.epoch = Number(e.target.value); resetPaging(); draw(); } },
  analyses.length ? analyses.map((a) => h("option", { value: a.epoch, selected: a.epoch === state.epoch },
    `epoch ${a.epoch} · step ${a.global_step ?? "?"} · ${a.stage ?? "?"} · ${a.points} points · ${a.solver ?? "?"}${a.converged === false ? " · NOT converged" : ""}`))
    : h("option", {}, "no analysis"));
  return h("header", { className: "li-header" },
    h("div", { className: "selectors" }, h("label", {}, "Run ", runSelect), h("label", {}, "Analysis ", analysisSelect)),
    h("nav", { className: "tabs", role: "tablist" }, TABS.map(([key, label]) => h("button", {
      className: `tab ${state.tab === key ? "active" : ""}`, "data-tab": key, role: "tab", "aria-selected": state.tab === key ? "true" : "false",
      onclick: () => navigate(key),
    }, label))),
    h("div", { className: "convention" }, "influence I(z, z_test) = −s_test · ∇L(z): ",
      h("span", { className: "harmful-text" }, "positive = harmful"), ", ",
      h("span", { className: "helpful-text" }, "negative = helpful"), " (not divided by n) · keys: ↑ ↓ move, Esc closes zoom"));
}

function unreadableBanner() {
  if (!state.unreadable.length) return null;
  return h("details", { className: "unreadable", id: "li-unreadable" },
    h("summary", {}, `${state.unreadable.length} report file(s) could not be read and are skipped; everything else works.`),
    h("ul", {}, state.unreadable.map((u) => h("li", {}, h("code", {}, u.path), `: ${u.reason}`, u.hint ? h("div", { className: "small" }, u.hint) : null))));
}

function resetRun() {
  const run = currentRun();
  const analyses = run ? run.analyses : [];
  state.epoch = analyses.length ? analyses[analyses.length - 1].epoch : null;
  state.mislabelEpoch = run && run.mislabel.length ? run.mislabel[run.mislabel.length - 1] : null;
  state.point = null; state.example = null; state.selected = new Set(); state.newLabels = new Map(); state.filters = {}; state.candidateFilters = {}; state.order = null;
  resetPaging();
}

function resetPaging() { state.pointsShown = PAGE; state.examplesShown = PAGE; state.candidatesShown = PAGE; }

function navigate(tab) { state.tab = tab; draw(); }

async function draw() {
  const root = document.getElementById("li-root");
  const listScroll = document.querySelector(".list")?.scrollTop;
  root.replaceChildren(header(), unreadableBanner() || "", h("main", { id: "li-main" }, h("div", { className: "loading" }, "loading…")));
  writeHash();
  const run = currentRun();
  if (!run) {
    root.querySelector("#li-main").replaceChildren(h("div", { className: "empty", id: "li-empty" }, state.unreadable.length
      ? "No readable influence report: see the unreadable files above."
      : "No influence reports found. Train with InfluenceCallback (or run lightning-influence) so that <log_dir>/influence/epoch=N.json exists."));
    return;
  }
  if (state.epoch === null && state.tab !== "mislabel") {
    root.querySelector("#li-main").replaceChildren(h("div", { className: "empty", id: "li-only-mislabel" },
      `Run ${run.run} has no influence analysis${run.mislabel.length ? ", only a mislabel report (epochs " + run.mislabel.join(", ") + ")" : ""}. `,
      run.mislabel.length ? h("button", { onclick: () => navigate("mislabel") }, "open the Mislabel tab") : null));
    return;
  }
  try {
    if (state.tab === "points") await drawPoints();
    else if (state.tab === "examples") await drawExamples();
    else if (state.tab === "mislabel") await drawMislabel();
    else await drawTrust();
  } catch (error) { showMainError(error); }
  const list = document.querySelector(".list");
  if (list && listScroll && !list.querySelector(".row.selected")) list.scrollTop = listScroll;
}

// -- live refresh ----------------------------------------------------------------------------------------------
async function refreshRuns() {
  let answer;
  try { answer = await getJSON("runs"); } catch (_) { return; }  // a failed poll changes nothing on screen
  const fresh = JSON.stringify(answer);
  if (fresh === runsText) return;
  runsText = fresh;
  const before = currentRun();
  const wasLatest = before && before.analyses.length && state.epoch === before.analyses[before.analyses.length - 1].epoch;
  state.runs = answer.runs; state.unreadable = answer.unreadable || [];
  if (!currentRun()) { state.run = state.runs.length ? state.runs[0].run : null; resetRun(); draw(); return; }
  const run = currentRun();
  if (state.epoch === null || !run.analyses.some((a) => a.epoch === state.epoch) || (wasLatest && state.tab !== "mislabel")) {
    state.epoch = run.analyses.length ? run.analyses[run.analyses.length - 1].epoch : null;
  }
  if (state.mislabelEpoch === null || !run.mislabel.includes(state.mislabelEpoch)) state.mislabelEpoch = run.mislabel.length ? run.mislabel[run.mislabel.length - 1] : null;
  draw();
}

function listenForReload() {
  try {  // TensorBoard's iframe plugin protocol: send it a MessagePort, then answer its broadcasts on it
    const channel = new MessageChannel();
    channel.port1.onmessage = (event) => {
      let message = null;
      try { message = JSON.parse(event.data); } catch (_) { return; }
      if (message.isReply) return;
      channel.port1.postMessage(JSON.stringify({ type: message.type, id: message.id, payload: null, error: null, isReply: true }));
      if (message.type === "experimental.DataReloaded" || message.type === "experimental.RunsChanged") {
        const seen = document.documentElement.dataset;  // counted, so a test can tell the reload from the poll
        seen.reloads = String(Number(seen.reloads || 0) + 1);
        refreshRuns();
      }
    };
    if (window.parent !== window) window.parent.postMessage("experimental.bootstrap", "*", [channel.port2]);
  } catch (_) { /* not inside TensorBoard: polling only */ }
  setInterval(() => { if (!document.hidden) refreshRuns(); }, POLL_MS);
}

// -- dark mode: the OS setting, and TensorBoard's own dark-mode switch when we can see it ------------------------
function followDarkMode() {
  const apply = () => {
    let dark = window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches;
    try {
      const body = window.parent !== window ? window.parent.document.body : null;
      if (body) dark = body.classList.contains("dark-mode");
    } catch (_) { /* another origin */ }
    document.documentElement.classList.toggle("dark", dark);
  };
  apply();
  try {
    if (window.parent !== window) new MutationObserver(apply).observe(window.parent.document.body, { attributes: true, attributeFilter: ["class"] });
  } catch (_) { /* another origin */ }
  if (window.matchMedia) window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", apply);
}

function onKey(event) {
  if (event.key === "Escape") { document.getElementById("li-zoom")?.remove(); return; }
  if (["INPUT", "SELECT", "TEXTAREA"].includes(event.target.tagName)) return;
  if (event.key === "ArrowDown" || event.key === "j") { if (moveSelection(1)) event.preventDefault(); }
  else if (event.key === "ArrowUp" || event.key === "k") { if (moveSelection(-1)) event.preventDefault(); }
  else if (event.key === "Enter" && event.target.classList?.contains("row")) event.target.click();
}

function applyHash(saved) {
  if (saved.run && state.runs.some((r) => r.run === saved.run)) state.run = saved.run;
  resetRun();
  const run = currentRun();
  if (!run) return;
  const number = (v) => (v === undefined || v === "" || Number.isNaN(Number(v)) ? null : Number(v));
  if (number(saved.epoch) !== null && run.analyses.some((a) => a.epoch === number(saved.epoch))) state.epoch = number(saved.epoch);
  if (number(saved.mislabel) !== null && run.mislabel.includes(number(saved.mislabel))) state.mislabelEpoch = number(saved.mislabel);
  if (TABS.some(([key]) => key === saved.tab)) state.tab = saved.tab;
  state.point = number(saved.point); state.example = number(saved.example);
  state.pointSort = saved.sort || "loss"; state.exampleSort = saved.esort || "harmful_count"; state.order = saved.order || null;
  state.filters = { label: saved.label, prediction: saved.prediction, wrong: saved.wrong };
}

export async function render() {
  document.head.append(h("link", { rel: "stylesheet", href: "./style.css" }));
  document.body.append(h("div", { id: "li-root", className: "li" }, h("div", { className: "loading" }, "loading runs…")));
  followDarkMode();
  pointsNavigator(navigate); mislabelNavigator(navigate);
  document.addEventListener("keydown", onKey);
  try {
    const answer = await getJSON("runs");
    runsText = JSON.stringify(answer);
    state.runs = answer.runs; state.unreadable = answer.unreadable || [];
    state.run = state.runs.length ? state.runs[0].run : null;
    applyHash(readHash());
    await draw();
  } catch (error) {
    document.getElementById("li-root").replaceChildren(errorBox(error, "li-main-error"));
  }
  listenForReload();
}
