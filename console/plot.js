// @ts-check
// Small line charts in SVG for the metrics page: one chart per figure, a line per series
// (p50 and p95, say), the time axis shared by the last hour. No charting library: these are a
// few dozen points, and the console loads nothing from outside hearth.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 360;
const HEIGHT = 150;
const PAD = { left: 48, right: 8, top: 10, bottom: 22 };
const COLOURS = ["#b4441b", "#2a6fdb", "#1f7a3d", "#7a3db4"];

/**
 * @typedef {{label: string, points: {t: number, v: number}[]}} Line
 */

/** @param {string} tag @param {Record<string, string | number>} attrs */
function el(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
}

/** @param {number} v @param {string} unit */
function format(v, unit) {
  if (unit === "s") return v < 1 ? `${(v * 1000).toFixed(v < 0.01 ? 1 : 0)} ms` : `${v.toFixed(2)} s`;
  return `${Number.isInteger(v) ? v : v.toFixed(1)}${unit ? ` ${unit}` : ""}`;
}

/**
 * A chart of `lines` over [from, to] (milliseconds since the epoch), in a <figure> whose
 * caption names it and whose label reads out the latest values.
 * @param {string} title
 * @param {Line[]} lines
 * @param {string} unit "s" for durations, else a unit word
 * @param {number} from
 * @param {number} to
 */
export function lineChart(title, lines, unit, from, to) {
  const all = lines.flatMap((l) => l.points.map((p) => p.v));
  const max = Math.max(...all, unit === "s" ? 0.001 : 1);
  const x = (/** @type {number} */ t) => PAD.left + ((t - from) / (to - from || 1)) * (WIDTH - PAD.left - PAD.right);
  const y = (/** @type {number} */ v) => HEIGHT - PAD.bottom - (v / max) * (HEIGHT - PAD.top - PAD.bottom);
  const svg = el("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, width: "100%", role: "img" });
  svg.append(
    el("line", { x1: PAD.left, y1: y(0), x2: WIDTH - PAD.right, y2: y(0), stroke: "#d9dde3" }),
    el("line", { x1: PAD.left, y1: y(max), x2: WIDTH - PAD.right, y2: y(max), stroke: "#eef0f3" }),
  );
  const text = (/** @type {string} */ s, /** @type {number} */ tx, /** @type {number} */ ty, anchor = "end") => {
    const t = el("text", { x: tx, y: ty, "font-size": 10, fill: "#5b6270", "text-anchor": anchor });
    t.textContent = s;
    return t;
  };
  svg.append(
    text(format(max, unit), PAD.left - 4, y(max) + 4),
    text("0", PAD.left - 4, y(0) + 4),
    text("an hour ago", PAD.left, HEIGHT - 6, "start"),
    text("now", WIDTH - PAD.right, HEIGHT - 6),
  );
  lines.forEach((line, i) => {
    const colour = COLOURS[i % COLOURS.length];
    const pts = line.points.map((p) => `${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join(" ");
    if (line.points.length > 1) svg.append(el("polyline", { points: pts, fill: "none", stroke: colour, "stroke-width": 2 }));
    for (const p of line.points) svg.append(el("circle", { cx: x(p.t), cy: y(p.v), r: 2.5, fill: colour }));
  });
  const latest = lines
    .map((l) => (l.points.length ? `${l.label} ${format(l.points[l.points.length - 1].v, unit)}` : `${l.label}: no data`))
    .join(", ");
  svg.setAttribute("aria-label", `${title}, latest minute: ${latest}`);
  const figure = document.createElement("figure");
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  const legend = document.createElement("p");
  legend.className = "legend";
  lines.forEach((l, i) => {
    const key = document.createElement("span");
    key.style.setProperty("--swatch", COLOURS[i % COLOURS.length]);
    key.textContent = l.label;
    legend.append(key);
  });
  figure.append(caption, svg, legend);
  return figure;
}
