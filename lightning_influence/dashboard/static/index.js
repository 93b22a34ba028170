// The Influence dashboard: a TensorBoard dynamic plugin frontend (an ES module, no framework, no build step).
// TensorBoard loads it in an iframe whose base URL is /data/plugin/influence/, so every fetch is relative.
// Sign convention: I(z, z_test) = -s_test . grad L(z); positive = harmful, negative = helpful.

const PAGE = 50;
const state = {
  runs: [], run: null, epoch: null, tab: "points", point: null, example: null,
  mislabelEpoch: null, selected: new Set(), pointsShown: PAGE, examplesShown: PAGE, candidatesShown: PAGE,
};

// -- small helpers -------------------------------------------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "className") node.className = value;
    else if (key === "style") Object.assign(node.style, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  for (const child of children.flat()) if (child) node.append(child);
  return node;
}

async function getJSON(path, params = {}) {
  const query = new URLSearchParams(params).toString();
  const response = await fetch(query ? `${path}?${query}` : path);
  if (!response.ok) throw new Error(`${path}: ${response.status} ${await response.text()}`);
  return response.json();
}

const fmt = (v, digits = 3) => (v === null || v === undefined ? "–" : typeof v === "number" ? Number(v.toPrecision(digits)).toString() : Array.isArray(v) ? JSON.stringify(v) : String(v));
const sci = (v) => (v === null || v === undefined ? "–" : (v >= 0 ? "+" : "") + v.toExponential(2));
const params = (extra = {}) => ({ run: state.run, epoch: state.epoch, ...extra });

function rendering(input, size = "small") {
  if (!input) return h("div", { className: `render none ${size}` }, "no input");
  if (input.kind === "image") {
    return h("img", { className: `render image ${size}`, src: `data:image/png;base64,${input.png}`, alt: `input ${input.shape.join("×")}` });
  }
  const values = input.values || [];
  const more = input.truncated ? " …" : "";
  if (values.every((v) => Number.isInteger(v))) {  // token ids (text) or integer features
    return h("div", { className: `render tokens ${size}`, title: `shape ${input.shape.join("×")}` },
      values.map((v) => h("span", { className: "token" }, v)), more);
  }
  const max = Math.max(1e-12, ...values.map((v) => Math.abs(v ?? 0)));
  const width = 4 * values.length;
  const bars = values.map((v, i) => svg("rect", {
    x: 4 * i, width: 3, y: v >= 0 ? 20 - (20 * v) / max : 20, height: Math.max(0.5, (20 * Math.abs(v ?? 0)) / max),
    class: v >= 0 ? "pos" : "neg",
  }));
  return h("div", { className: `render tabular ${size}`, title: values.map((v) => fmt(v)).join(", ") + more },
    svg("svg", { viewBox: `0 0 ${Math.max(width, 1)} 40`, preserveAspectRatio: "none" }, bars),
    h("div", { className: "values" }, values.slice(0, 8).map((v) => fmt(v, 2)).join(" ") + (values.length > 8 || input.truncated ? " …" : "")));
}

function badge(trust) {
  const kind = (trust && trust.badge) || "unknown";
  const text = { ok: "trust ok", poor: "trust poor", unknown: "trust ?" }[kind];
  const title = trust && trust.residual !== undefined
    ? `residual ${fmt(trust.residual)}; repeat Spearman ${fmt(trust.repeat_spearman)}${(trust.reasons || []).length ? "; " + trust.reasons.join("; ") : ""}`
    : "no self-diagnosis in this analysis";
  return h("span", { className: `badge ${kind}`, title }, text);
}

function bar(value, max) {
  const fraction = max > 0 && value !== null ? Math.min(1, Math.abs(value) / max) : 0;
  return h("div", { className: "bar" },
    h("div", { className: `fill ${value > 0 ? "harmful" : "helpful"}`, style: { width: `${(100 * fraction).toFixed(1)}%` } }),
    h("span", { className: "bar-label" }, sci(value)));
}

function moreButton(shown, total, onClick) {
  return shown < total ? h("button", { className: "more", onclick: onClick }, `show ${Math.min(PAGE, total - shown)} more (${shown} of ${total})`) : null;
}

function setMain(...children) {
  const main = document.getElementById("li-main");
  main.replaceChildren(...children);
}

function showError(error) {
  setMain(h("div", { className: "error" }, String(error.message || error)));
}

// -- header: run / analysis / tabs ---------------------------------------------------------------------------
function currentRun() { return state.runs.find((r) => r.run === state.run); }

function header() {
  const run = currentRun();
  const runSelect = h("select", { id: "li-run", onchange: (e) => { state.run = e.target.value; resetRun(); draw(); } },
    state.runs.map((r) => h("option", { value: r.run, selected: r.run === state.run }, r.run)));
  const analyses = run ? run.analyses : [];
  const analysisSelect = h("select", { id: "li-analysis", onchange: (e) => { state.epoch = Number(e.target.value); resetAnalysis(); draw(); } },
    analyses.map((a) => h("option", { value: a.epoch, selected: a.epoch === state.epoch },
      `epoch ${a.epoch} · step ${a.global_step} · ${a.stage} · ${a.points} points · ${a.solver}`)));
  const tabs = [["points", "Points"], ["examples", "Training examples"], ["mislabel", "Mislabel"], ["trust", "Trust"]];
  return h("header", { className: "li-header" },
    h("div", { className: "selectors" },
      h("label", {}, "Run ", runSelect), h("label", {}, "Analysis ", analysisSelect)),
    h("nav", { className: "tabs" }, tabs.map(([key, label]) => h("button", {
      className: `tab ${state.tab === key ? "active" : ""}`, "data-tab": key,
      onclick: () => { state.tab = key; draw(); },
    }, label))),
    h("div", { className: "convention" }, "influence I(z, z_test) = −s_test · ∇L(z): ",
      h("span", { className: "harmful-text" }, "positive = harmful"), ", ",
      h("span", { className: "helpful-text" }, "negative = helpful"), " (not divided by n)"));
}

function resetRun() {
  const run = currentRun();
  const analyses = run ? run.analyses : [];
  state.epoch = analyses.length ? analyses[analyses.length - 1].epoch : null;
  state.mislabelEpoch = run && run.mislabel.length ? run.mislabel[run.mislabel.length - 1] : null;
  resetAnalysis();
}

function resetAnalysis() {
  state.point = null; state.example = null; state.selected = new Set();
  state.pointsShown = PAGE; state.examplesShown = PAGE; state.candidatesShown = PAGE;
}

async function draw() {
  const root = document.getElementById("li-root");
  root.replaceChildren(header(), h("main", { id: "li-main" }, h("div", { className: "loading" }, "loading…")));
  if (!state.run || state.epoch === null) {
    if (state.tab !== "mislabel" || state.mislabelEpoch === null) {
      setMain(h("div", { className: "empty" }, "No influence reports found. Train with InfluenceCallback (or run lightning-influence) so that <log_dir>/influence/epoch=N.json exists."));
      return;
    }
  }
  try {
    if (state.tab === "points") await drawPoints();
    else if (state.tab === "examples") await drawExamples();
    else if (state.tab === "mislabel") await drawMislabel();
    else await drawTrust();
  } catch (error) { showError(error); }
}

// -- points tab ----------------------------------------------------------------------------------------------
async function drawPoints() {
  const page = await getJSON("points", params({ offset: 0, limit: state.pointsShown }));
  if (state.point === null && page.points.length) state.point = page.points[0].val_index;
  const list = h("div", { className: "list", id: "li-points" },
    h("h3", {}, `Validation points (${page.total}), highest loss first`),
    page.points.map((p) => h("div", {
      className: `row point ${p.val_index === state.point ? "selected" : ""}`, "data-val-index": p.val_index,
      onclick: () => { state.point = p.val_index; drawPoints().catch(showError); },
    }, rendering(p.input), h("div", { className: "meta" },
      h("div", {}, h("b", {}, `val #${p.val_index}`), " ", badge(p.trust)),
      h("div", {}, `label ${fmt(p.label)} → pred ${fmt(p.prediction)}`),
      h("div", {}, `loss ${fmt(p.loss)}`)))),
    moreButton(page.points.length, page.total, () => { state.pointsShown += PAGE; drawPoints().catch(showError); }));
  const detail = state.point === null ? h("div", {}) : await pointDetail(state.point);
  setMain(h("div", { className: "split" }, list, detail));
}

async function pointDetail(valIndex) {
  const [point, history] = await Promise.all([
    getJSON("point", params({ val_index: valIndex })), getJSON("compare", { run: state.run, val_index: valIndex }),
  ]);
  const max = Math.max(0, ...[...point.harmful, ...point.helpful].map((e) => Math.abs(e.influence ?? 0)));
  const column = (kind, title) => h("div", { className: `influencers ${kind}`, id: `li-${kind}` },
    h("h4", {}, title),
    point[kind].map((e) => h("div", {
      className: "row example", "data-train-index": e.train_index, title: "click: every point this example influences",
      onclick: () => { state.example = e.train_index; state.tab = "examples"; draw(); },
    }, rendering(e.input), h("div", { className: "meta" },
      h("div", {}, h("b", {}, `train #${e.train_index}`), ` label ${fmt(e.label)} · pred ${fmt(e.prediction)}`),
      bar(e.influence, max),
      h("div", { className: "small" }, `loss change if removed ≈ ${sci(e.loss_change_if_removed)}`)))));
  return h("div", { className: "detail", id: "li-point-detail", "data-val-index": valIndex },
    h("div", { className: "point-head" }, rendering(point.input, "large"), h("div", {},
      h("h3", {}, `Validation point #${point.val_index}`),
      h("div", {}, `label ${fmt(point.label)} · prediction ${fmt(point.prediction)} · loss ${fmt(point.loss)} `, badge(point.trust)),
      point.histogram ? histogram(point.histogram) : null)),
    h("div", { className: "columns" }, column("harmful", "Harmful (raise its loss)"), column("helpful", "Helpful (lower its loss)")),
    comparison(history));
}

function histogram(hist) {
  const max = Math.max(1, ...hist.counts);
  const width = 4 * hist.counts.length;
  return h("div", { className: "histogram", title: `all ${hist.scored} scored training examples` },
    h("div", { className: "small" }, `scores of all ${hist.scored} scored examples: ${sci(hist.min)} … ${sci(hist.max)}`),
    svg("svg", { viewBox: `0 0 ${width} 30`, preserveAspectRatio: "none" }, hist.counts.map((c, i) => svg("rect", {
      x: 4 * i, width: 3.4, y: 30 - (30 * Math.sqrt(c)) / Math.sqrt(max), height: (30 * Math.sqrt(c)) / Math.sqrt(max), class: "hist",
    }))));
}

function comparison(history) {
  const chips = (pairs, fresh) => pairs.map(([index]) => h("span", {
    className: `chip ${fresh && fresh.includes(index) ? "new" : ""}`, title: fresh && fresh.includes(index) ? "new since the previous analysis" : "",
  }, index));
  return h("div", { className: "comparison", id: "li-compare" },
    h("h4", {}, `Across analyses (${history.analyses.length}): top lists per epoch, new entries highlighted`),
    h("table", {}, h("thead", {}, h("tr", {}, ["epoch", "step", "stage", "pred", "loss", "harmful", "kept", "helpful", "kept"].map((t) => h("th", {}, t)))),
      h("tbody", {}, history.analyses.map((a) => h("tr", { className: a.epoch === state.epoch ? "current" : "" },
        h("td", {}, a.epoch), h("td", {}, a.global_step), h("td", {}, a.stage), h("td", {}, fmt(a.prediction)), h("td", {}, fmt(a.loss)),
        h("td", {}, chips(a.harmful, a.harmful_new)), h("td", {}, a.harmful_kept ?? "–"),
        h("td", {}, chips(a.helpful, a.helpful_new)), h("td", {}, a.helpful_kept ?? "–"))))));
}

// -- training examples tab (cross-point view) ----------------------------------------------------------------
async function drawExamples() {
  const page = await getJSON("influencers", params({ offset: 0, limit: state.examplesShown }));
  if (state.example === null && page.examples.length) state.example = page.examples[0].train_index;
  const list = h("div", { className: "list", id: "li-influencers" },
    h("h3", {}, `Training examples in any top list (${page.total}), harmful to the most points first`),
    page.examples.map((e) => h("div", {
      className: `row example ${e.train_index === state.example ? "selected" : ""}`, "data-train-index": e.train_index,
      onclick: () => { state.example = e.train_index; drawExamples().catch(showError); },
    }, rendering(e.input), h("div", { className: "meta" },
      h("div", {}, h("b", {}, `train #${e.train_index}`), ` label ${fmt(e.label)} · pred ${fmt(e.prediction)}`),
      h("div", {}, h("span", { className: "harmful-text" }, `harmful to ${e.harmful_count}`), " · ",
        h("span", { className: "helpful-text" }, `helpful to ${e.helpful_count}`), ` of ${page.points} points`)))),
    moreButton(page.examples.length, page.total, () => { state.examplesShown += PAGE; drawExamples().catch(showError); }));
  const detail = state.example === null ? h("div", {}) : await exampleDetail(state.example);
  setMain(h("div", { className: "split" }, list, detail));
}

async function exampleDetail(trainIndex) {
  const e = await getJSON("example", params({ train_index: trainIndex }));
  const max = Math.max(0, ...e.points.map((p) => Math.abs(p.influence ?? 0)));
  return h("div", { className: "detail", id: "li-example-detail", "data-train-index": trainIndex },
    h("div", { className: "point-head" }, rendering(e.input, "large"), h("div", {},
      h("h3", {}, `Training example #${e.train_index}`),
      h("div", {}, `label ${fmt(e.label)} · prediction ${fmt(e.prediction)} · loss ${fmt(e.loss)}`),
      h("div", { className: "small" }, `harmful to ${e.harmful_count} point(s); influences from the ${e.source}`))),
    h("table", { className: "points-table" },
      h("thead", {}, h("tr", {}, ["val point", "label", "pred", "loss", "influence on it", "listed as"].map((t) => h("th", {}, t)))),
      h("tbody", {}, e.points.map((p) => h("tr", {
        className: "clickable", "data-val-index": p.val_index, title: "open this point",
        onclick: () => { state.point = p.val_index; state.tab = "points"; draw(); },
      }, h("td", {}, `#${p.val_index}`), h("td", {}, fmt(p.label)), h("td", {}, fmt(p.prediction)), h("td", {}, fmt(p.loss)),
        h("td", {}, bar(p.influence, max)), h("td", {}, p.kind === "scored" ? "–" : `${p.kind} #${p.rank + 1}`))))));
}

// -- mislabel tab --------------------------------------------------------------------------------------------
async function drawMislabel() {
  const run = currentRun();
  if (!run || !run.mislabel.length) {
    setMain(h("div", { className: "empty" }, "No mislabel report in this run: pass mislabel_candidates=N to InfluenceCallback."));
    return;
  }
  const page = await getJSON("mislabel", { run: state.run, epoch: state.mislabelEpoch, offset: 0, limit: state.candidatesShown });
  const epochSelect = h("select", { id: "li-mislabel-epoch", onchange: (ev) => { state.mislabelEpoch = Number(ev.target.value); state.selected = new Set(); drawMislabel().catch(showError); } },
    run.mislabel.map((ep) => h("option", { value: ep, selected: ep === state.mislabelEpoch }, `epoch ${ep}`)));
  const csvLink = h("a", { id: "li-relabel", className: "button", download: `relabel_epoch=${state.mislabelEpoch}.csv` });
  const toggle = (index, on) => { if (on) state.selected.add(index); else state.selected.delete(index); syncSelection(); };
  const table = h("table", { className: "candidates", id: "li-candidates" },
    h("thead", {}, h("tr", {}, ["", "rank", "input", "train", "given", "predicted", "self-influence I(z,z)", "loss", "loss rank"].map((t) => h("th", {}, t)))),
    h("tbody", {}, page.candidates.map((c) => h("tr", { className: c.label !== c.prediction ? "disagrees" : "", "data-train-index": c.train_index },
      h("td", {}, h("input", { type: "checkbox", checked: state.selected.has(c.train_index), onchange: (ev) => toggle(c.train_index, ev.target.checked) })),
      h("td", {}, c.rank + 1), h("td", {}, rendering(c.input)), h("td", {}, `#${c.train_index}`), h("td", {}, fmt(c.label)),
      h("td", {}, fmt(c.prediction)), h("td", {}, sci(c.self_influence)), h("td", {}, fmt(c.loss)), h("td", {}, c.loss_rank)))));
  const all = page.candidates.map((c) => c.train_index);
  setMain(h("div", { className: "mislabel" },
    h("div", { className: "toolbar" }, h("label", {}, "Mislabel report ", epochSelect),
      h("button", { id: "li-select-disagree", onclick: () => { state.selected = new Set(page.candidates.filter((c) => c.label !== c.prediction).map((c) => c.train_index)); syncSelection(); } }, "select given ≠ predicted"),
      h("button", { onclick: () => { state.selected = new Set(all); syncSelection(); } }, "select all shown"),
      h("button", { onclick: () => { state.selected = new Set(); syncSelection(); } }, "clear"), csvLink),
    h("div", { className: "small" }, `${page.total} candidates by |I(z, z)| (of ${page.train_size} training examples). ${page.definition || ""}`),
    h("div", { className: "split" }, h("div", {}, table,
      moreButton(page.candidates.length, page.total, () => { state.candidatesShown += PAGE; drawMislabel().catch(showError); })),
    confusion(page.confusion, page.candidates))));
  syncSelection();
}

// Reflect state.selected in the checkboxes and the download link, in place (no refetch, no redraw).
function syncSelection() {
  const doc = document;
  for (const box of doc.querySelectorAll("#li-candidates tbody input[type=checkbox]")) {
    box.checked = state.selected.has(Number(box.closest("tr").dataset.trainIndex));
  }
  const link = doc.getElementById("li-relabel");
  if (!link) return;
  const chosen = [...state.selected];
  link.textContent = `Download relabel CSV (${chosen.length} selected)`;
  link.classList.toggle("disabled", chosen.length === 0);
  if (chosen.length) link.href = `relabel.csv?${new URLSearchParams({ run: state.run, epoch: state.mislabelEpoch, train_indices: chosen.join(",") })}`;
  else link.removeAttribute("href");
}

function confusion(table, candidates) {
  const max = Math.max(1, ...table.counts.flat());
  return h("div", { className: "confusion", id: "li-confusion" },
    h("h4", {}, "Given (rows) vs predicted (columns) label among all candidates"),
    h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "given \\ pred"), table.labels.map((l) => h("th", {}, l)))),
      h("tbody", {}, table.labels.map((given, i) => h("tr", {}, h("th", {}, given), table.counts[i].map((count, j) => h("td", {
        className: `${i === j ? "diagonal" : ""} ${count ? "clickable" : ""}`, style: { background: count ? `rgba(${i === j ? "84, 110, 122" : "198, 40, 40"}, ${(0.12 + 0.6 * count / max).toFixed(2)})` : "" },
        title: count ? `select the shown candidates given ${given}, predicted ${table.labels[j]}` : "",
        onclick: () => {
          if (!count) return;
          state.selected = new Set(candidates.filter((c) => String(c.label) === given && String(c.prediction) === table.labels[j]).map((c) => c.train_index));
          syncSelection();
        },
      }, count || "")))))));
}

// -- trust tab -----------------------------------------------------------------------------------------------
async function drawTrust() {
  const t = await getJSON("trust", params());
  const s = t.solver;
  const settings = Object.entries(s.settings || {}).map(([k, v]) => `${k}=${fmt(v)}`).join(", ");
  const model = t.model || {};
  const warnings = t.warnings.length
    ? h("ul", { className: "warnings", id: "li-warnings" }, t.warnings.map((w) => h("li", { className: w.severity }, h("b", {}, `${w.severity} · ${w.code}: `), w.message)))
    : h("div", { className: "small", id: "li-warnings" }, t.diagnosed ? "No warnings." : "This analysis ran without self-diagnosis (diagnose=False).");
  const pointRows = t.points.map((p) => h("tr", { "data-val-index": p.val_index },
    h("td", {}, `#${p.val_index}`), h("td", {}, fmt(p.loss)), h("td", {}, residualBar(p.residual, t.limits.residual)),
    h("td", {}, fmt(p.repeat_pearson)), h("td", {}, fmt(p.repeat_spearman)), h("td", {}, badge(p))));
  setMain(h("div", { className: "trust", id: "li-trust" },
    h("div", { className: "cards" },
      card("solver", `${s.solver}${s.converged ? " (converged)" : " (NOT converged)"}`, `damping ${fmt(s.damping)} · scale ${fmt(s.scale)} · ${fmt(s.seconds)} s`),
      card("settings", settings || "–", ""),
      card("gradient ratio", fmt(model.gradient_ratio), "‖∇R‖ / rms‖∇L(z_i)‖: ≈0 at a minimum"),
      card("top eigenvalue", fmt(model.top_eigenvalue), "LiSSA minibatch H + λI"),
      t.loo ? card("leave-one-out", `Pearson ${fmt(t.loo.pearson)} · Spearman ${fmt(t.loo.spearman)}`, `${(t.loo.train_indices || []).length} retrainings, point #${t.loo.val_index}`) : null),
    h("h4", {}, "Warnings and what to do"), warnings,
    h("h4", {}, `Per point: residual ‖(H + λI) s_test − ∇L‖ / ‖∇L‖ (limit ${t.limits.residual}) and repeat-half agreement`),
    h("table", { className: "trust-points" }, h("thead", {}, h("tr", {}, ["point", "loss", "residual", "repeat Pearson", "repeat Spearman", ""].map((x) => h("th", {}, x)))),
      h("tbody", {}, pointRows)),
    h("h4", {}, "Solver trace"), traceChart(t.traces, s.solver)));
}

function card(title, value, note) {
  return h("div", { className: "card" }, h("div", { className: "small" }, title), h("div", { className: "value" }, value), h("div", { className: "small" }, note));
}

function residualBar(value, limit) {
  if (value === null || value === undefined) return "–";
  const fraction = Math.min(1, value / (2 * limit));
  return h("div", { className: "bar" }, h("div", { className: `fill ${value > limit ? "harmful" : "helpful"}`, style: { width: `${(100 * fraction).toFixed(1)}%` } }),
    h("span", { className: "bar-label" }, fmt(value)));
}

function traceChart(traces, solver) {
  const names = Object.keys(traces || {});
  if (!names.length) return h("div", { className: "small", id: "li-trace" }, "No solver trace in TensorBoard for this analysis (the exact solver records none).");
  const all = names.flatMap((n) => traces[n]).filter(([, v]) => v > 0 && Number.isFinite(v));
  const steps = all.map(([s]) => s);
  const logs = all.map(([, v]) => Math.log10(v));
  const [x0, x1] = [Math.min(...steps), Math.max(...steps, Math.min(...steps) + 1)];
  const [y0, y1] = [Math.floor(Math.min(...logs)), Math.ceil(Math.max(...logs, Math.min(...logs) + 1))];
  const W = 600, H = 180, P = 36;
  const X = (s) => P + ((W - 2 * P) * (s - x0)) / (x1 - x0);
  const Y = (v) => H - P + (-(H - 2 * P) * (Math.log10(v) - y0)) / (y1 - y0);
  const ticks = [];
  for (let e = y0; e <= y1; e++) ticks.push(svg("text", { x: 2, y: Y(10 ** e) + 4, class: "axis" }, document.createTextNode(`1e${e}`)));
  const lines = names.map((n, i) => svg("polyline", {
    class: `trace c${i % 4}`, points: traces[n].filter(([, v]) => v > 0).map(([s, v]) => `${X(s).toFixed(1)},${Y(v).toFixed(1)}`).join(" "),
  }));
  return h("div", { className: "trace-box", id: "li-trace" },
    svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "trace-chart" },
      svg("line", { x1: P, y1: H - P, x2: W - P, y2: H - P, class: "axis-line" }), svg("line", { x1: P, y1: P, x2: P, y2: H - P, class: "axis-line" }),
      ticks, svg("text", { x: W - P, y: H - 8, class: "axis", "text-anchor": "end" }, document.createTextNode(`step ${x0}–${x1}`)), lines),
    h("div", { className: "small" }, `${solver === "cg" ? "CG: largest relative residual per iteration" : "LiSSA: relative update per step"}, log scale; ${names.join(", ")}`));
}

// -- entry point ---------------------------------------------------------------------------------------------
export async function render() {
  const style = h("link", { rel: "stylesheet", href: "./style.css" });
  document.head.append(style);
  document.body.append(h("div", { id: "li-root", className: "li" }, h("div", { className: "loading" }, "loading runs…")));
  try {
    state.runs = (await getJSON("runs")).runs;
    state.run = state.runs.length ? state.runs[0].run : null;
    resetRun();
    await draw();
  } catch (error) {
    document.getElementById("li-root").replaceChildren(h("div", { className: "error" }, String(error.message || error)));
  }
}
