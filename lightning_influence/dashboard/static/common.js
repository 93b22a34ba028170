// Shared state, DOM helpers, JSON fetching with readable errors, and the URL-hash state of the Influence tab.

export const PAGE = 50;
export const state = {
  runs: [], unreadable: [], run: null, epoch: null, tab: "points", point: null, example: null,
  mislabelEpoch: null, selected: new Set(), newLabels: new Map(), pointsShown: PAGE, examplesShown: PAGE, candidatesShown: PAGE,
  pointSort: "loss", exampleSort: "harmful_count", filters: {}, candidateFilters: {}, order: null,
};
export const HASH_KEYS = ["run", "epoch", "tab", "point", "example", "mislabel", "sort", "esort", "order", "label", "prediction", "wrong"];

export function h(tag, attrs = {}, ...children) {
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

export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  for (const child of children.flat()) if (child) node.append(child);
  return node;
}

// Every route answers JSON; an error is {error, hint, status}. Anything else (a proxy's HTML page) is cut short.
export class RouteError extends Error {
  constructor(path, status, error, hint) { super(error); this.path = path; this.status = status; this.hint = hint; }
}

export async function getJSON(path, params = {}) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== null && v !== undefined && v !== "")).toString();
  let response;
  try {
    response = await fetch(query ? `${path}?${query}` : path);
  } catch (error) {
    throw new RouteError(path, 0, `${path}: the TensorBoard server did not answer (${error.message}).`, "Is TensorBoard still running? Reload when it is.");
  }
  const text = await response.text();
  let body = null;
  try { body = JSON.parse(text); } catch (_) { body = null; }
  if (!response.ok) {
    if (body && body.error) throw new RouteError(path, response.status, body.error, body.hint);
    throw new RouteError(path, response.status, `${path}: HTTP ${response.status} ${text.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").slice(0, 200)}`, null);
  }
  if (body === null) throw new RouteError(path, response.status, `${path}: the answer is not JSON.`, null);
  return body;
}

export function errorBox(error, id = null) {
  return h("div", { className: "error", id, role: "alert" },
    h("div", { className: "error-message" }, String((error && error.message) || error)),
    error && error.hint ? h("div", { className: "hint" }, error.hint) : null);
}

export const fmt = (v, digits = 3) => (v === null || v === undefined ? "–" : typeof v === "number" ? Number(v.toPrecision(digits)).toString() : Array.isArray(v) ? JSON.stringify(v) : String(v));
export const sci = (v) => (v === null || v === undefined ? "–" : (v >= 0 ? "+" : "") + v.toExponential(2));
export const params = (extra = {}) => ({ run: state.run, epoch: state.epoch, ...extra });
export const text = (v) => (v === null || v === undefined ? "" : Array.isArray(v) ? v.join(",") : String(v));

export function currentRun() { return state.runs.find((r) => r.run === state.run); }

// -- URL hash: TensorBoard keeps plugin state as p.<plugin>.<key> in its own hash; standalone, our own hash. --
function hashTarget() {
  try {
    if (window.top !== window && window.top.location.origin === window.location.origin) return { win: window.top, prefix: "p.influence." };
  } catch (_) { /* another origin: use our own hash */ }
  return { win: window, prefix: "" };
}

export function readHash() {
  const { win, prefix } = hashTarget();
  const result = {};
  for (const part of win.location.hash.replace(/^#/, "").split("&")) {
    const at = part.indexOf("=");
    if (at < 0) continue;
    const key = decodeURIComponent(part.slice(0, at));
    if (key.startsWith(prefix) && HASH_KEYS.includes(key.slice(prefix.length))) result[key.slice(prefix.length)] = decodeURIComponent(part.slice(at + 1));
  }
  return result;
}

export function writeHash() {
  const { win, prefix } = hashTarget();
  const values = {
    run: state.run, epoch: state.epoch, tab: state.tab, point: state.point, example: state.example,
    mislabel: state.mislabelEpoch, sort: state.pointSort === "loss" ? null : state.pointSort,
    esort: state.exampleSort === "harmful_count" ? null : state.exampleSort, order: state.order,
    label: state.filters.label, prediction: state.filters.prediction, wrong: state.filters.wrong,
  };
  const kept = win.location.hash.replace(/^#/, "").split("&").filter((part) => part && !(prefix ? part.startsWith(prefix) : HASH_KEYS.includes(decodeURIComponent(part.split("=")[0]))));
  const ours = Object.entries(values).filter(([, v]) => v !== null && v !== undefined && v !== "")
    .map(([k, v]) => `${encodeURIComponent(prefix + k)}=${encodeURIComponent(v)}`);
  const hash = `#${[...kept, ...ours].join("&")}`;
  if (hash !== win.location.hash) win.history.replaceState(win.history.state, "", hash);
}
