// The Trust tab: solver, settings, the model-level diagnosis with its advice, per-point residuals against the
// analysis' own tolerance, repeat agreement, the solver trace (from TensorBoard's scalars) and leave-one-out.

import { errorBox, fmt, getJSON, h, params, svg } from "./common.js";
import { badge } from "./render.js";

function setMain(...children) { document.getElementById("li-main").replaceChildren(...children); }

export async function drawTrust() {
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
  const converged = s.converged === true ? " (converged)" : s.converged === false ? " (NOT converged)" : "";
  setMain(h("div", { className: "trust", id: "li-trust" },
    h("div", { className: "cards" },
      card("solver", `${fmt(s.solver)}${converged}`, `damping ${fmt(s.damping)} · scale ${fmt(s.scale)} · ${fmt(s.seconds)} s · residual ${fmt(s.residual)} (tolerance ${fmt(t.limits.residual)})`),
      card("settings", settings || "–", ""),
      card("gradient ratio", fmt(model.gradient_ratio), "‖∇R‖ / rms‖∇L(z_i)‖: ≈0 at a minimum"),
      card("top eigenvalue", fmt(model.top_eigenvalue), "of the curvature the solve used"),
      t.loo ? card("leave-one-out", `Pearson ${fmt(t.loo.pearson)} · Spearman ${fmt(t.loo.spearman)}`, `${(t.loo.train_indices || []).length} retrainings, point #${t.loo.val_index}`) : null),
    t.loo_error ? errorBox(t.loo_error) : null,
    h("h4", {}, "Warnings and what to do"), warnings,
    h("h4", {}, `Per point: residual ‖(H + λI) s_test − ∇L‖ / ‖∇L‖ against this analysis' tolerance ${fmt(t.limits.residual)}, and repeat-half agreement`),
    t.points.length ? h("table", { className: "trust-points" }, h("thead", {}, h("tr", {}, ["point", "loss", "residual", "repeat Pearson", "repeat Spearman", ""].map((x) => h("th", {}, x)))),
      h("tbody", {}, pointRows)) : h("div", { className: "small" }, "No points in this analysis."),
    h("h4", {}, "Solver trace"), traceChart(t.traces, s.solver, t.traces_error, t.epoch)));
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

function traceChart(traces, solver, traceError, epoch) {
  const names = Object.keys(traces || {});
  if (!names.length) {
    const why = traceError ? `TensorBoard's scalars could not be read (${traceError}).`
      : solver === "exact" ? "The exact solver records none."
        : `TensorBoard has no influence/${solver}_trace/epoch_${epoch}/ scalars for this run (they are written by the callback's TensorBoard logger; event files may not be loaded yet).`;
    return h("div", { className: "small", id: "li-trace" }, `No solver trace: ${why}`);
  }
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
