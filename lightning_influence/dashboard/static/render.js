// How one example is shown: image (zoomable), text (the report's formatter output, long text folded), tabular
// features (a small table), token ids or other values; plus the trust badge, influence bars and paging buttons.

import { PAGE, fmt, h, sci, svg } from "./common.js";

const FOLD = 160;  // characters of text shown before "more"

export function rendering(entry, size = "small") {
  const input = entry ? entry.input : null;
  const textValue = entry ? entry.text : null;
  if (textValue) return textRendering(textValue, size);
  if (!input) {
    const why = entry && entry.rendered === false ? "not rendered (a report written before every candidate had a thumbnail renders the top 64 only)" : "no input";
    return h("div", { className: `render none ${size}`, title: why }, entry && entry.rendered === false ? "not rendered" : "no input");
  }
  if (input.kind === "image") {
    const image = h("img", { className: `render image ${size}`, src: `data:image/png;base64,${input.png}`, alt: `input ${input.shape.join("×")}`, title: "click to enlarge" });
    image.addEventListener("click", (event) => { event.stopPropagation(); zoom(image.src, image.alt); });
    return image;
  }
  const values = input.values || [];
  const more = input.truncated ? " …" : "";
  if (values.length && values.every((v) => Number.isInteger(v))) {  // token ids without a formatter, or integer features
    return h("div", { className: `render tokens ${size}`, title: `shape ${input.shape.join("×")}: values ${values.join(" ")}${more}` },
      values.map((v) => h("span", { className: "token" }, v)), more);
  }
  return tabular(values, input, size);
}

function textRendering(value, size) {
  const long = value.length > FOLD;
  const node = h("div", { className: `render text ${size}`, title: size === "small" ? value : null });
  if (size === "small" || !long) { node.textContent = value; return node; }
  const short = h("span", {}, value.slice(0, FOLD) + "… ");
  const toggle = h("button", { className: "link", onclick: (e) => {
    e.stopPropagation();
    const open = node.classList.toggle("open");
    short.textContent = open ? value + " " : value.slice(0, FOLD) + "… ";
    toggle.textContent = open ? "less" : `more (${value.length} characters)`;
  } }, `more (${value.length} characters)`);
  node.append(short, toggle);
  return node;
}

function tabular(values, input, size) {
  const shown = size === "small" ? values.slice(0, 6) : values;
  const max = Math.max(1e-12, ...values.map((v) => Math.abs(v ?? 0)));
  const rows = shown.map((v, i) => h("tr", {}, h("th", {}, `x${i}`), h("td", {}, fmt(v, 3)),
    h("td", { className: "cell-bar" }, h("span", { className: v >= 0 ? "pos" : "neg", style: { width: `${(100 * Math.abs(v ?? 0) / max).toFixed(0)}%` } }))));
  const rest = values.length - shown.length;
  return h("div", { className: `render tabular ${size}`, title: `${values.length} features (shape ${input.shape.join("×")}): ${values.map((v) => fmt(v)).join(", ")}${input.truncated ? " …" : ""}` },
    h("table", { className: "features" }, h("tbody", {}, rows)),
    rest > 0 || input.truncated ? h("div", { className: "small" }, `+${rest} more${input.truncated ? " (truncated in the report)" : ""}`) : null);
}

export function zoom(src, alt) {
  const old = document.getElementById("li-zoom");
  if (old) old.remove();
  const overlay = h("div", { id: "li-zoom", className: "zoom", role: "dialog", title: "click or Escape to close", onclick: () => overlay.remove() },
    h("img", { src, alt }), h("div", { className: "small" }, alt));
  document.body.append(overlay);
}

export function badge(trust) {
  const kind = (trust && trust.badge) || "unknown";
  const label = { ok: "trust ok", poor: "trust poor", caution: "trust: model warning", unknown: "trust ?" }[kind] || kind;
  let title = "no self-diagnosis in this analysis";
  if (trust && trust.residual !== undefined) {
    title = `residual ${fmt(trust.residual)} (tolerance ${fmt(trust.limit)}); repeat Spearman ${fmt(trust.repeat_spearman)}`;
    if ((trust.reasons || []).length) title += "; " + trust.reasons.join("; ");
    if (kind === "caution") title += "; the point's solve is accurate, but the model-level diagnosis warns: " + trust.cautions.join(" | ");
  }
  return h("span", { className: `badge ${kind}`, title }, label);
}

export function bar(value, max) {
  const fraction = max > 0 && value !== null && value !== undefined ? Math.min(1, Math.abs(value) / max) : 0;
  return h("div", { className: "bar" },
    h("div", { className: `fill ${value > 0 ? "harmful" : "helpful"}`, style: { width: `${(100 * fraction).toFixed(1)}%` } }),
    h("span", { className: "bar-label" }, sci(value)));
}

export function moreButton(shown, total, onClick) {
  return shown < total ? h("button", { className: "more", onclick: onClick }, `show ${Math.min(PAGE, total - shown)} more (${shown} of ${total})`) : null;
}

export function histogram(hist) {
  const max = Math.max(1, ...hist.counts);
  const width = 4 * hist.counts.length;
  return h("div", { className: "histogram", title: `all ${hist.scored} scored training examples` },
    h("div", { className: "small" }, `scores of all ${hist.scored} scored examples: ${sci(hist.min)} … ${sci(hist.max)}`),
    svg("svg", { viewBox: `0 0 ${width} 30`, preserveAspectRatio: "none" }, hist.counts.map((c, i) => svg("rect", {
      x: 4 * i, width: 3.4, y: 30 - (30 * Math.sqrt(c)) / Math.sqrt(max), height: (30 * Math.sqrt(c)) / Math.sqrt(max), class: "hist",
    }))));
}

export function select(id, options, value, onChange, label) {
  return h("label", {}, label ? `${label} ` : null, h("select", { id, onchange: (e) => onChange(e.target.value) },
    options.map(([v, text]) => h("option", { value: v, selected: String(v) === String(value ?? "") }, text))));
}
