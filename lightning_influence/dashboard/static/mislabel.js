// The Mislabel tab: candidates in the report's own ranking (named, defined, its score shown), the model's
// prediction and the suggested label kept apart, selections over every candidate (asked of the server, not the
// loaded page), a relabel CSV of the selection, and a link from each candidate to its influence on the points.

import { PAGE, currentRun, errorBox, fmt, getJSON, h, sci, state, text, writeHash } from "./common.js";
import { moreButton, rendering, select } from "./render.js";

let go = () => {};
export function setNavigator(fn) { go = fn; }
const URL_LIMIT = 1500;  // more selected indices than this: the CSV link asks for every candidate instead
let selectedAll = false;

function setMain(...children) { document.getElementById("li-main").replaceChildren(...children); }

function mislabelParams(extra = {}) { return { run: state.run, epoch: state.mislabelEpoch, ...extra }; }

export async function drawMislabel() {
  const run = currentRun();
  if (!run || !run.mislabel.length) {
    setMain(h("div", { className: "empty", id: "li-no-mislabel" }, "No mislabel report in this run: pass mislabel_candidates=N to InfluenceCallback, or run `lightning-influence mislabel CHECKPOINT`."));
    return;
  }
  if (!run.mislabel.includes(state.mislabelEpoch)) state.mislabelEpoch = run.mislabel[run.mislabel.length - 1];
  writeHash();
  const f = state.candidateFilters;
  const page = await getJSON("mislabel", mislabelParams({ offset: 0, limit: state.candidatesShown, order: state.order, ...f }));
  const bySignals = page.ranking !== "self_influence";
  const redraw = () => { state.candidatesShown = PAGE; drawMislabel().catch((e) => setMain(errorBox(e, "li-main-error"))); };
  const epochSelect = select("li-mislabel-epoch", run.mislabel.map((ep) => [ep, `epoch ${ep}`]), state.mislabelEpoch,
    (v) => { state.mislabelEpoch = Number(v); state.selected = new Set(); state.newLabels = new Map(); redraw(); }, "Mislabel report");
  const orderSelect = page.rankings.length > 1 ? select("li-order", page.rankings.map((r) => [r, r === page.ranking ? `${r} (the report's)` : r]), page.order,
    (v) => { state.order = v === page.ranking ? null : v; redraw(); }, "order by") : null;
  const filter = (key) => (v) => { f[key] = v || undefined; redraw(); };
  const labels = page.confusion.labels;
  const filters = h("div", { className: "toolbar" },
    select("li-filter-given", [["", "any"], ...labels.map((l) => [l, l])], f.label, filter("label"), "given"),
    select("li-filter-model", [["", "any"], ...labels.map((l) => [l, l])], f.model_prediction, filter("model_prediction"), "model predicts"),
    page.has_suggested ? select("li-filter-suggested", [["", "any"], ...page.suggestions.labels.map((l) => [l, l])], f.suggested_label, filter("suggested_label"), "suggested") : null,
    h("label", { title: "the model's own prediction differs from the given label" }, h("input", { type: "checkbox", checked: f.wrong === "1", onchange: (e) => filter("wrong")(e.target.checked ? "1" : "") }), " model disagrees"),
    h("form", { className: "search", onsubmit: (e) => { e.preventDefault(); filter("index")(e.target.elements[0].value); } },
      h("input", { type: "search", id: "li-candidate-search", placeholder: "train index", size: 8, value: f.index || "" })));
  const csvLink = h("a", { id: "li-relabel", className: "button", download: `relabel_epoch=${state.mislabelEpoch}.csv` });
  const columns = [["", ""], ["rank", "1 = most suspicious in this order"], ["input", ""], ["train", "training index"], ["given", "the label in the data"],
    ["model pred.", "the model's own prediction at the analysed weights"], page.has_suggested ? ["suggested", "the class the training signals point to (never the given one)"] : null,
    bySignals ? [`score (${page.ranking})`, page.ranking_definition] : null, ["I(z,z)", page.definition || "self-influence"], ["loss", "training loss"],
    ["loss rank", "1 = highest training loss"], page.has_flags ? ["flagged", "among the estimated number of wrong labels"] : null, ["new label", "written as new_label in the relabel CSV; edit it"], ["", ""]].filter((c) => c !== null);
  const table = h("table", { className: "candidates", id: "li-candidates" },
    h("thead", {}, h("tr", {}, columns.map(([t, title]) => h("th", { title: title || null }, t)))),
    h("tbody", {}, page.candidates.map((c) => h("tr", { className: text(c.label) !== text(c.model_prediction) ? "disagrees" : "", "data-train-index": c.train_index },
      h("td", {}, h("input", { type: "checkbox", "aria-label": `select #${c.train_index}`, checked: state.selected.has(c.train_index), onchange: (ev) => toggle(c.train_index, ev.target.checked) })),
      h("td", {}, c.rank), h("td", {}, rendering(c)), h("td", {}, `#${c.train_index}`), h("td", { className: "given" }, fmt(c.label)),
      h("td", { className: "model" }, fmt(c.model_prediction)), page.has_suggested ? h("td", { className: "suggested" }, fmt(c.suggested_label)) : null,
      bySignals ? h("td", { className: "score" }, fmt(c.score, 4)) : null, h("td", {}, sci(c.self_influence)), h("td", {}, fmt(c.loss)), h("td", {}, fmt(c.loss_rank)),
      page.has_flags ? h("td", { className: "flagged" }, c.flagged ? "yes" : "") : null,
      h("td", {}, h("input", { className: "new-label", size: 3, value: state.newLabels.get(c.train_index) ?? text(c.predicted), "aria-label": `new label of #${c.train_index}`,
        title: "the label the relabel CSV writes for this candidate (edit it; the row is then selected)", onchange: (ev) => editLabel(c, ev.target.value) })),
      h("td", {}, h("button", { className: "link open-example", title: "which monitored points this training example harms or helps", onclick: () => openExample(c.train_index) }, "influence"))))));
  const chooser = (query, label, id) => h("button", { id, onclick: () => selectWhere(query) }, label);
  setMain(h("div", { className: "mislabel" },
    h("div", { className: "toolbar" }, epochSelect, orderSelect,
      chooser({}, `select all ${page.all}`, "li-select-all"),
      chooser({ wrong: "1" }, "select where the model disagrees with the label", "li-select-disagree"),
      page.total !== page.all ? chooser({ ...f }, `select the ${page.total} matching`, "li-select-matching") : null,
      h("button", { onclick: () => { state.selected = new Set(); selectedAll = false; syncSelection(); } }, "clear"), csvLink,
      h("span", { className: "small" }, "new label: edit it in the table to override the suggestion")),
    h("div", { className: "ranking", id: "li-ranking" },
      h("b", {}, `${page.all} candidates ranked by ${page.ranking}`), ` (of ${fmt(page.train_size)} training examples, step ${fmt(page.global_step)}). `,
      page.ranking_definition,
      page.estimated_flips ? h("div", { id: "li-estimated-flips" }, `Estimated wrong labels: ${fmt(page.estimated_flips.estimate)}`
        + ` (interval ${fmt(page.estimated_flips.low)} to ${fmt(page.estimated_flips.high)}`
        + (page.estimated_flips.plausible_high != null ? `; plausible range ${fmt(page.estimated_flips.plausible_low)} to ${fmt(page.estimated_flips.plausible_high)}` : "")
        + `); the first ${fmt(page.estimated_flips.flagged)} candidates are flagged.`) : null,
      page.order !== page.ranking ? h("div", { className: "small" }, `Shown in the order of the stored ranking ${page.order}; ${page.outside} of its top ${page.all} are not candidates of this report and are not listed.`) : null,
      bySignals ? h("div", { className: "small" }, "The suggested label is the class the training signals point to; it is never the given label, so it is shown apart from the model's own prediction. The relabel CSV proposes it as new_label.")
        : h("div", { className: "small" }, page.signals_note || "")),
    page.rendered < page.all ? h("div", { className: "small" }, `Inputs are rendered for the first ${page.rendered} candidates only (a report written by an older version).`) : null,
    filters,
    h("div", { className: "split" }, h("div", { className: "table-scroll" }, table,
      page.candidates.length ? null : h("div", { className: "empty" }, "No candidate matches these filters."),
      moreButton(page.candidates.length, page.total, () => { state.candidatesShown += PAGE; drawMislabel().catch((e) => setMain(errorBox(e))); })),
    h("div", {}, labelTable(page.confusion, "li-confusion", "model_prediction",
      "Given label (rows) vs the model's prediction (columns), all candidates; off the diagonal: the model disagrees with the label"),
    page.suggestions ? labelTable(page.suggestions, "li-suggestions", "suggested_label",
      "Given label (rows) → suggested label (columns), all candidates") : null))));
  syncSelection();
}

function editLabel(candidate, value) {
  if (value.trim() === "" || value.trim() === text(candidate.predicted)) state.newLabels.delete(candidate.train_index);
  else state.newLabels.set(candidate.train_index, value.trim());
  state.selected.add(candidate.train_index);
  syncSelection();
}

function toggle(index, on) {
  if (on) state.selected.add(index); else state.selected.delete(index);
  selectedAll = false;
  syncSelection();
}

async function selectWhere(query) {
  try {
    const answer = await getJSON("select", mislabelParams(query));
    state.selected = new Set(answer.train_indices);
    selectedAll = Object.keys(query).length === 0;
    syncSelection();
  } catch (error) { document.getElementById("li-main").prepend(errorBox(error)); }
}

function openExample(trainIndex) {
  const run = currentRun();
  const epochs = run.analyses.map((a) => a.epoch);
  if (!epochs.length) { document.getElementById("li-main").prepend(errorBox(new Error("This run has no influence analysis to look the example up in (only a mislabel report)."))); return; }
  if (!epochs.includes(state.epoch)) state.epoch = epochs.includes(state.mislabelEpoch) ? state.mislabelEpoch : epochs[epochs.length - 1];
  state.example = trainIndex;
  go("examples");
}

// Reflect state.selected in the checkboxes and the download link, in place (no refetch, no redraw).
export function syncSelection() {
  for (const box of document.querySelectorAll("#li-candidates tbody input[type=checkbox]")) {
    box.checked = state.selected.has(Number(box.closest("tr").dataset.trainIndex));
  }
  const link = document.getElementById("li-relabel");
  if (!link) return;
  const chosen = [...state.selected];
  link.textContent = `Download relabel CSV (${chosen.length} selected)`;
  link.classList.toggle("disabled", chosen.length === 0);
  if (!chosen.length) { link.removeAttribute("href"); return; }
  const query = selectedAll && chosen.length > URL_LIMIT ? { all: "1" } : { train_indices: chosen.join(",") };
  const edited = [...state.newLabels].filter(([index]) => state.selected.has(index));
  if (edited.length) query.new_labels = edited.map(([index, label]) => `${index}:${label}`).join(",");
  link.href = `relabel.csv?${new URLSearchParams({ run: state.run, epoch: state.mislabelEpoch, ...query })}`;
}

function labelTable(table, id, field, title) {
  const max = Math.max(1, ...table.counts.flat());
  return h("div", { className: "confusion", id },
    h("h4", {}, title),
    h("table", {}, h("thead", {}, h("tr", {}, h("th", { className: "corner", title: "rows: given label; columns: " + (field === "model_prediction" ? "model prediction" : "suggested label") }, field === "model_prediction" ? "given\\pred" : "given\\sugg."), table.labels.map((l) => h("th", {}, l)))),
      h("tbody", {}, table.labels.map((given, i) => h("tr", {}, h("th", {}, given), table.counts[i].map((count, j) => h("td", {
        className: `${i === j ? "diagonal" : ""} ${count ? "clickable" : ""}`,
        style: { background: count ? `rgba(${i === j ? "84, 110, 122" : "198, 40, 40"}, ${(0.12 + 0.6 * count / max).toFixed(2)})` : "" },
        title: count ? `select every candidate given ${given}, ${field === "model_prediction" ? "predicted" : "suggested"} ${table.labels[j]}` : "",
        onclick: () => { if (count) selectWhere({ label: given, [field]: table.labels[j] }); },
      }, count || "")))))));
}
