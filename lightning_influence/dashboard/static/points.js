// The Points tab (validation points, their harmful and helpful training examples, epochs compared) and the
// Training examples tab (which points one example influences; which classes harm which).
// A click replaces only the detail pane: the list keeps its scroll position and nothing is refetched twice.

import { PAGE, currentRun, errorBox, fmt, getJSON, h, params, sci, state, text, writeHash } from "./common.js";
import { badge, bar, histogram, moreButton, rendering, select } from "./render.js";

let go = () => {};  // set by index.js: switch tab and redraw
export function setNavigator(fn) { go = fn; }

function setMain(...children) { document.getElementById("li-main").replaceChildren(...children); }

function toolbar(page, sorts, sortValue, onSort, searchLabel, onSearch, filterKeys) {
  const f = state.filters;
  const change = (key) => (value) => { f[key] = value || undefined; onSort(sortValue); };
  return h("div", { className: "toolbar list-toolbar" },
    select("li-sort", sorts, sortValue, onSort, "sort"),
    filterKeys.includes("label") ? select("li-filter-label", [["", "any"], ...page.labels.map((l) => [l, l])], f.label, change("label"), "label") : null,
    filterKeys.includes("prediction") ? select("li-filter-prediction", [["", "any"], ...page.predictions.map((l) => [l, l])], f.prediction, change("prediction"), "pred") : null,
    h("label", { title: "only label ≠ prediction" }, h("input", { type: "checkbox", id: "li-filter-wrong", checked: f.wrong === "1", onchange: (e) => change("wrong")(e.target.checked ? "1" : "") }), " misclassified"),
    h("form", { className: "search", onsubmit: (e) => { e.preventDefault(); onSearch(Number(e.target.elements[0].value)); } },
      h("input", { type: "search", id: "li-search", placeholder: searchLabel, inputmode: "numeric", size: 8 })));
}

function filterParams() {
  const f = state.filters;
  return { label: f.label, prediction: f.prediction, wrong: f.wrong };
}

// -- points tab ----------------------------------------------------------------------------------------------
export async function drawPoints() {
  const page = await getJSON("points", params({ offset: 0, limit: state.pointsShown, sort: state.pointSort, ensure: state.point, ...filterParams() }));
  if (page.all === 0) {
    setMain(h("div", { className: "empty", id: "li-no-points" }, `This analysis (epoch ${state.epoch}) has no validation points: the report's "points" list is empty, so there is nothing to explain. `,
      "The callback explains the num_worst highest-loss points of its stage; check that the validation data reached it."));
    return;
  }
  const visible = page.points.map((p) => p.val_index);
  const missing = state.point !== null && !visible.includes(state.point) ? state.point : null;
  if (!visible.includes(state.point)) state.point = visible.length ? visible[0] : null;  // kept when it is in this analysis
  writeHash();
  const redraw = () => { state.pointsShown = PAGE; drawPoints().catch(showMainError); };
  const sorts = [["loss", "highest loss"], ["influence", "largest harmful influence"], ["residual", "largest residual"], ["index", "index"]];
  const list = h("div", { className: "list", id: "li-points", role: "listbox", "aria-label": "validation points" },
    h("h3", {}, `Validation points (${page.total}${page.total !== page.all ? ` of ${page.all}` : ""})`),
    missing !== null ? h("div", { className: "small", id: "li-point-missing" }, `Point #${missing} is not among these points at epoch ${state.epoch}${page.total !== page.all ? " with these filters" : ""}.`) : null,
    page.model_warnings.length ? h("div", { className: "model-warning", id: "li-model-warning" }, "Model-level warning: ", page.model_warnings.map((w) => w.code).join(", "), " (see Trust); badges say \"model warning\".") : null,
    page.points.length ? null : h("div", { className: "empty" }, "No point matches these filters."),
    page.points.map((p) => h("div", {
      className: `row point ${p.val_index === state.point ? "selected" : ""}`, "data-val-index": p.val_index, tabIndex: 0, role: "option",
      onclick: () => selectPoint(p.val_index),
    }, rendering(p), h("div", { className: "meta" },
      h("div", {}, h("b", {}, `val #${p.val_index}`), " ", badge(p.trust)),
      h("div", { className: text(p.label) !== text(p.prediction) ? "wrong" : "" }, `label ${fmt(p.label)} → pred ${fmt(p.prediction)}`),
      h("div", {}, `loss ${fmt(p.loss)}`)))),
    moreButton(page.points.length, page.total, () => { state.pointsShown += PAGE; drawPoints().catch(showMainError); }));
  const controls = toolbar(page, sorts, state.pointSort, (v) => { state.pointSort = v; redraw(); }, "val index", (index) => {
    state.point = index; state.filters = {}; redraw();
  }, ["label", "prediction"]);
  const detail = h("div", { id: "li-detail-box" });
  setMain(h("div", { className: "split" }, h("div", {}, controls, list), detail));
  if (state.point !== null) await showPointDetail(state.point);
  scrollIntoList("li-points", state.point, "valIndex");
}

export async function selectPoint(valIndex) {
  state.point = valIndex;
  for (const row of document.querySelectorAll("#li-points .row")) row.classList.toggle("selected", Number(row.dataset.valIndex) === valIndex);
  writeHash();
  await showPointDetail(valIndex);
}

async function showPointDetail(valIndex) {
  const box = document.getElementById("li-detail-box");
  try {
    const detail = await pointDetail(valIndex);
    if (state.point === valIndex && box.isConnected) box.replaceChildren(detail);
  } catch (error) { box.replaceChildren(errorBox(error, "li-detail-error")); }
}

async function pointDetail(valIndex) {
  const [point, history] = await Promise.all([
    getJSON("point", params({ val_index: valIndex })),
    getJSON("compare", { run: state.run, val_index: valIndex }).catch((error) => ({ error })),
  ]);
  const max = Math.max(0, ...[...point.harmful, ...point.helpful].map((e) => Math.abs(e.influence ?? 0)));
  const column = (kind, title) => h("div", { className: `influencers ${kind}`, id: `li-${kind}` },
    h("h4", {}, title),
    point[kind].length ? null : h("div", { className: "small" }, "none listed"),
    point[kind].map((e) => h("div", {
      className: "row example", "data-train-index": e.train_index, tabIndex: 0, title: "click: every point this example influences",
      onclick: () => { state.example = e.train_index; go("examples"); },
    }, rendering(e), h("div", { className: "meta" },
      h("div", {}, h("span", { className: "rank" }, `${e.rank}.`), " ", h("b", {}, `train #${e.train_index}`), ` label ${fmt(e.label)} · pred ${fmt(e.prediction)}`),
      bar(e.influence, max),
      h("div", { className: "small" }, `loss change if removed ≈ ${sci(e.loss_change_if_removed)}`)))));
  return h("div", { className: "detail", id: "li-point-detail", "data-val-index": valIndex },
    h("div", { className: "point-head" }, rendering(point, "large"), h("div", { className: "head-text" },
      h("h3", {}, `Validation point #${point.val_index}`),
      h("div", {}, `label ${fmt(point.label)} · prediction ${fmt(point.prediction)} · loss ${fmt(point.loss)} `, badge(point.trust)),
      point.histogram ? histogram(point.histogram) : null,
      point.scores_error ? h("div", { className: "warning-note", id: "li-scores-error" }, "No histogram: ", point.scores_error.error, h("div", { className: "small" }, point.scores_error.hint)) : null)),
    h("div", { className: "columns" }, column("harmful", "Harmful (raise its loss)"), column("helpful", "Helpful (lower its loss)")),
    history.error ? errorBox(history.error) : comparison(history));
}

function comparison(history) {
  const chips = (pairs, fresh) => pairs.map(([index]) => h("button", {
    className: `chip ${fresh && fresh.includes(index) ? "new" : ""}`, title: `training example #${index}${fresh && fresh.includes(index) ? " (new since the previous analysis)" : ""}: open it`,
    onclick: () => { state.example = index; go("examples"); },
  }, index));
  return h("div", { className: "comparison", id: "li-compare" },
    h("h4", {}, `Across analyses (${history.analyses.length}): top lists per epoch, new entries highlighted`),
    (history.skipped || []).length ? h("div", { className: "small" }, `skipped unreadable: ${history.skipped.map((s) => `epoch ${s.epoch} (${s.reason})`).join("; ")}`) : null,
    h("table", {}, h("thead", {}, h("tr", {}, ["epoch", "step", "stage", "pred", "loss", "harmful", "kept", "helpful", "kept"].map((t) => h("th", {}, t)))),
      h("tbody", {}, history.analyses.map((a) => h("tr", { className: a.epoch === state.epoch ? "current" : "" },
        h("td", {}, a.epoch), h("td", {}, fmt(a.global_step)), h("td", {}, fmt(a.stage)), h("td", {}, fmt(a.prediction)), h("td", {}, fmt(a.loss)),
        h("td", {}, chips(a.harmful, a.harmful_new)), h("td", {}, a.harmful_kept ?? "–"),
        h("td", {}, chips(a.helpful, a.helpful_new)), h("td", {}, a.helpful_kept ?? "–"))))));
}

// -- training examples tab -----------------------------------------------------------------------------------
export async function drawExamples() {
  const page = await getJSON("influencers", params({ offset: 0, limit: state.examplesShown, sort: state.exampleSort, ensure: state.example, ...filterParams() }));
  if (state.example === null && page.examples.length) state.example = page.examples[0].train_index;
  writeHash();
  const redraw = () => { state.examplesShown = PAGE; drawExamples().catch(showMainError); };
  const sorts = [["harmful_count", "harmful to most points"], ["helpful_count", "helpful to most points"], ["total_influence", "largest total influence"], ["index", "index"]];
  const list = h("div", { className: "list", id: "li-influencers", role: "listbox" },
    h("h3", {}, `Training examples in any top list (${page.total})`),
    page.examples.map((e) => h("div", {
      className: `row example ${e.train_index === state.example ? "selected" : ""}`, "data-train-index": e.train_index, tabIndex: 0, role: "option",
      onclick: () => selectExample(e.train_index),
    }, rendering(e), h("div", { className: "meta" },
      h("div", {}, h("b", {}, `train #${e.train_index}`), ` label ${fmt(e.label)} · pred ${fmt(e.prediction)}`),
      h("div", {}, h("span", { className: "harmful-text" }, `harmful to ${e.harmful_count}`), " · ",
        h("span", { className: "helpful-text" }, `helpful to ${e.helpful_count}`), ` of ${page.points} points`)))),
    moreButton(page.examples.length, page.total, () => { state.examplesShown += PAGE; drawExamples().catch(showMainError); }));
  const controls = toolbar(page, sorts, state.exampleSort, (v) => { state.exampleSort = v; redraw(); }, "train index",
    (index) => { state.example = index; state.filters = {}; redraw(); }, ["label", "prediction"]);
  const detail = h("div", { id: "li-detail-box" });
  const classes = h("div", { id: "li-classes-box" });
  setMain(h("div", { className: "split" }, h("div", {}, controls, list), h("div", {}, detail, classes)));
  const work = [state.example !== null ? showExampleDetail(state.example) : null, drawClasses(classes)];
  await Promise.all(work.filter(Boolean));
  scrollIntoList("li-influencers", state.example, "trainIndex");
}

export async function selectExample(trainIndex) {
  state.example = trainIndex;
  for (const row of document.querySelectorAll("#li-influencers .row")) row.classList.toggle("selected", Number(row.dataset.trainIndex) === trainIndex);
  writeHash();
  await showExampleDetail(trainIndex);
}

async function showExampleDetail(trainIndex) {
  const box = document.getElementById("li-detail-box");
  try {
    const detail = await exampleDetail(trainIndex);
    if (state.example === trainIndex && box.isConnected) box.replaceChildren(detail);
  } catch (error) { box.replaceChildren(errorBox(error, "li-detail-error")); }
}

async function exampleDetail(trainIndex) {
  const e = await getJSON("example", params({ train_index: trainIndex }));
  const max = Math.max(0, ...e.points.map((p) => Math.abs(p.influence ?? 0)));
  return h("div", { className: "detail", id: "li-example-detail", "data-train-index": trainIndex },
    h("div", { className: "point-head" }, rendering(e, "large"), h("div", { className: "head-text" },
      h("h3", {}, `Training example #${e.train_index}`),
      h("div", {}, `label ${fmt(e.label)} · prediction ${fmt(e.prediction)} · loss ${fmt(e.loss)}`),
      h("div", { className: "small" }, `harmful to ${e.harmful_count} point(s); influences from the ${e.source}`),
      e.scores_error ? h("div", { className: "warning-note", id: "li-scores-error" }, "Full scores unavailable, showing the top lists: ", e.scores_error.error) : null)),
    e.points.length ? null : h("div", { className: "empty" }, `Example #${e.train_index} is in no top list of this analysis (epoch ${e.epoch}) and the run has no full score table (save_scores=True) to read its influence on every point from.`),
    e.points.length ? h("table", { className: "points-table" },
      h("thead", {}, h("tr", {}, ["val point", "", "label", "pred", "loss", "influence on it", "listed as"].map((t) => h("th", {}, t)))),
      h("tbody", {}, e.points.map((p) => h("tr", {
        className: "clickable", "data-val-index": p.val_index, title: "open this point",
        onclick: () => { state.point = p.val_index; go("points"); },
      }, h("td", {}, `#${p.val_index}`), h("td", {}, rendering(p)), h("td", {}, fmt(p.label)), h("td", {}, fmt(p.prediction)), h("td", {}, fmt(p.loss)),
        h("td", {}, bar(p.influence, max)), h("td", {}, p.kind === "scored" ? "–" : `${p.kind} #${p.rank}`))))) : null);
}

async function drawClasses(box) {
  try {
    const c = await getJSON("classes", params());
    if (!c.rows.length) return;
    const max = Math.max(1e-12, ...c.cells.flat().map((cell) => cell.harmful_sum));
    box.replaceChildren(h("div", { className: "classes", id: "li-classes" },
      h("h4", {}, "Which training classes harm which validation classes (summed harmful influence in the top lists)"),
      h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "train \\ val"), c.columns.map((col) => h("th", {}, col)))),
        h("tbody", {}, c.rows.map((row, i) => h("tr", {}, h("th", {}, row), c.cells[i].map((cell) => h("td", {
          title: `${cell.harmful} harmful and ${cell.helpful} helpful entries; summed harmful influence ${sci(cell.harmful_sum)}`,
          style: { background: cell.harmful_sum > 0 ? `rgba(198, 40, 40, ${(0.1 + 0.6 * cell.harmful_sum / max).toFixed(2)})` : "" },
        }, cell.harmful ? `${cell.harmful}` : "")))))),
      h("div", { className: "small" }, "cell: number of harmful top-list entries; colour: their summed influence.")));
  } catch (error) { box.replaceChildren(errorBox(error)); }
}

export function showMainError(error) { setMain(errorBox(error, "li-main-error")); }

function scrollIntoList(listId, index, key) {
  const list = document.getElementById(listId);
  if (!list || index === null) return;
  const row = [...list.querySelectorAll(".row")].find((r) => Number(r.dataset[key]) === index);
  if (!row) return;
  const top = row.offsetTop - list.offsetTop;
  if (top < list.scrollTop || top > list.scrollTop + list.clientHeight - row.offsetHeight) list.scrollTop = Math.max(0, top - 40);
}

// Keyboard: ↑/↓ (or k/j) move the selection in the list of the current tab.
export function moveSelection(delta) {
  const listId = state.tab === "points" ? "li-points" : state.tab === "examples" ? "li-influencers" : null;
  if (!listId) return false;
  const rows = [...document.querySelectorAll(`#${listId} .row`)];
  if (!rows.length) return false;
  const key = state.tab === "points" ? "valIndex" : "trainIndex";
  const current = state.tab === "points" ? state.point : state.example;
  const at = rows.findIndex((r) => Number(r.dataset[key]) === current);
  const next = rows[Math.max(0, Math.min(rows.length - 1, at + delta))];
  const value = Number(next.dataset[key]);
  next.focus({ preventScroll: true });
  scrollIntoList(listId, value, key);
  if (state.tab === "points") selectPoint(value); else selectExample(value);
  return true;
}

export function currentAnalysis() {
  const run = currentRun();
  return run ? run.analyses.find((a) => a.epoch === state.epoch) : null;
}
