"""The HTML report's charting script: draws each ``figure.ac-fig`` from its JSON spec as inline SVG.

Written for this report, inlined in the page (no library, no network). Drag across a chart to zoom into those
steps (every chart of the run follows: they share the x axis), double-click or "reset zoom" to go back; hovering
shows the step and each series' value, with a crosshair on every chart of the run. The static figure the page
carries is removed once a chart is drawn; where the script does not run it stays. Safe to include more than once
(a notebook's output cells): the first copy installs ``window.autopsyCharts``, later copies only draw new figures.
"""

__all__ = ["CHART_JS"]

CHART_JS = r"""
(() => {
"use strict";
if (window.autopsyCharts) { window.autopsyCharts.scan(); return; }
const ML = 62, MR = 14, MB = 34, PH = 200, LANE = 19;  // margins, plot height, a row of finding labels
let uid = 0;
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const trim = (s) => s.replace("e+", "e").replace(/\.?0+e/, "e");
function fmtv(v) {
  if (v === null || !isFinite(v)) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e6 || a < 1e-3)) return trim(v.toExponential(4));
  return String(Number(v.toPrecision(5)));
}
function fmtTick(v, step, sci) {
  if (Math.abs(v) < step * 1e-6) return "0";
  const a = Math.abs(v);
  if (sci || a >= 1e6 || a < 1e-3) {
    const p = Math.max(0, Math.min(4, Math.floor(Math.log10(a) + 1e-9) - Math.floor(Math.log10(step) + 1e-9)));
    return trim(v.toExponential(p));
  }
  return v.toFixed(Math.max(0, Math.min(8, -Math.floor(Math.log10(step) + 1e-9))));
}
function nice(lo, hi, n, integer) {
  const span = hi - lo;
  if (!(span > 0)) return {step: 1, ticks: [lo]};
  const raw = span / Math.max(n, 1), p = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / p;
  let step = (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * p;
  if (integer) step = Math.max(1, Math.round(step));
  const ticks = [], k0 = Math.ceil(lo / step - 1e-9);
  for (let k = k0; k * step <= hi + step * 1e-9 && ticks.length < 50; k++) ticks.push(k * step);
  return {step, ticks};
}
function logTicks(lo, hi) {  // lo, hi: log10 of the range
  const out = [];
  for (let e = Math.floor(lo); e <= Math.ceil(hi); e++) {
    for (const m of (hi - lo < 2 ? [1, 2, 5] : [1])) {
      const t = Math.log10(m) + e;
      if (t >= lo - 1e-9 && t <= hi + 1e-9) out.push(t);
    }
  }
  return out;
}
function bisect(xs, v) { let lo = 0, hi = xs.length; while (lo < hi) { const m = (lo + hi) >> 1; if (xs[m] < v) lo = m + 1; else hi = m; } return lo; }
function nearest(xs, v) {
  if (!xs.length) return -1;
  const i = bisect(xs, v);
  if (i <= 0) return 0;
  if (i >= xs.length) return xs.length - 1;
  return v - xs[i - 1] <= xs[i] - v ? i - 1 : i;
}
function fitY(d, x0, x1) {  // the Python y_range rule, on the points inside [x0, x1]
  let v = [];
  const take = (xs, ys) => { const a = bisect(xs, x0), b = bisect(xs, x1 + 1e-9); for (let i = a; i < b; i++) v.push(ys[i]); };
  for (const s of d.s) take(s.x, s.y);
  for (const k of d.k) if (k.y) take(k.x, k.y);
  if (!v.length) return d.y;
  v = v.concat(d.h.map((h) => h.y));
  if (d.log) v = v.filter((a) => a > 0).map(Math.log10);
  if (!v.length) return d.y;
  let lo = Math.min(...v), hi = Math.max(...v);
  const level = Math.max(Math.abs(lo), Math.abs(hi)), need = d.log ? 0.3 : (level > 0 ? d.mr * level : 1);
  if (hi - lo < need) { const mid = (lo + hi) / 2; lo = mid - need / 2; hi = mid + need / 2; }
  const pad = (hi - lo) * d.pad;
  lo -= pad; hi += pad;
  return d.log ? [Math.pow(10, lo), Math.pow(10, hi)] : [lo, hi];
}
const DASH = {dashed: "5 3", dashdot: "7 3 1.5 3", dotted: "1.5 2.5", solid: ""};
function glyph(shape, x, y, c) {
  if (shape === "o") return `<circle cx="${x}" cy="${y}" r="3.5" fill="none" stroke="${c}" stroke-width="1.4"/>`;
  if (shape === "star") {
    let p = "";
    for (let i = 0; i < 10; i++) { const r = i % 2 ? 3.2 : 8, a = Math.PI * (i / 5 - 0.5); p += `${(x + r * Math.cos(a)).toFixed(1)},${(y + r * Math.sin(a)).toFixed(1)} `; }
    return `<polygon points="${p}" fill="${c}" stroke="#fff" stroke-width="0.8"/>`;
  }
  return `<path d="M${x - 4} ${y - 4}L${x + 4} ${y + 4}M${x - 4} ${y + 4}L${x + 4} ${y - 4}" stroke="${c}" stroke-width="2.2"/>`;
}
function keys(d) {
  const key = (c, dash, text, sym) => `<span class="ac-key">` + (sym ? `<b style="color:${c}">${sym}</b>` :
    `<i style="border-top-color:${c};border-top-style:${dash ? "dashed" : "solid"}"></i>`) + `${esc(text)}</span>`;
  const sym = {x: "\u2716", o: "\u25cb", star: "\u2605"};
  return d.s.map((s) => key(s.c, false, s.l)).join("") + d.k.map((k) => key(k.c, false, k.l, sym[k.sh] || "\u25cf")).join("") +
    d.h.map((h) => key(h.c, true, h.t)).join("") + d.v.filter((v) => !v.p).map((v) => key(v.c, true, v.t)).join("");
}
class Group {
  constructor(dom) { this.charts = []; this.full = dom.slice(); this.dom = dom.slice(); this.zoomed = false; }
  zoom(a, b) {
    if (b - a < 2) { const m = (a + b) / 2; a = m - 1; b = m + 1; }
    this.dom = [Math.max(a, this.full[0]), Math.min(b, this.full[1])]; this.zoomed = true; this.redraw();
  }
  reset() { this.dom = this.full.slice(); this.zoomed = false; this.redraw(); }
  redraw() { for (const c of this.charts) c.draw(); }
  hover(step, from) { for (const c of this.charts) c.hover(step, c === from); }
}
class Chart {
  constructor(fig, group, d) {
    this.fig = fig; this.group = group; this.id = ++uid; this.width = 0; this.d = d;
    const head = document.createElement("div");
    head.className = "ac-head";
    head.innerHTML = `<span class="ac-title">${esc(d.t)}</span><span class="ac-keys">${keys(d)}</span>` +
      `<button type="button" class="ac-reset" hidden>reset zoom</button>`;
    const box = this.box = document.createElement("div");
    box.className = "ac-box";
    box.setAttribute("role", "img");
    box.setAttribute("aria-label", d.alt);
    box.innerHTML = `<div class="ac-plotsvg"></div><div class="ac-labels"></div><div class="ac-sel"></div><div class="ac-tip" role="status"></div>`;
    const old = fig.querySelector(".ac-static");
    fig.insertBefore(head, old || fig.firstChild);
    fig.insertBefore(box, old || head.nextSibling);
    if (old) old.remove();
    [this.svgBox, this.labels, this.sel, this.tip] = box.children;
    this.reset = head.querySelector(".ac-reset");
    this.reset.addEventListener("click", () => this.group.reset());
    box.addEventListener("pointerdown", (e) => this.down(e));
    box.addEventListener("pointermove", (e) => this.move(e));
    box.addEventListener("pointerup", (e) => this.up(e));
    box.addEventListener("pointerleave", () => { if (!this.drag) this.group.hover(null, this); });
    box.addEventListener("dblclick", () => this.group.reset());
    fig.classList.add("ac-live");
  }
  px(e) { const r = this.box.getBoundingClientRect(); return e.clientX - r.left; }
  step(px) { const [a, b] = this.group.dom; return a + (px - ML) / this.pw * (b - a); }
  down(e) {
    const x = this.px(e);
    if (e.button !== 0 || x < ML || x > ML + this.pw) return;
    this.drag = {x};
    try { this.box.setPointerCapture(e.pointerId); } catch (_) { /* a synthetic event has no capture */ }
    e.preventDefault();
  }
  move(e) {
    const x = Math.min(Math.max(this.px(e), ML), ML + this.pw);
    if (this.drag) {
      const s = this.sel.style;
      s.display = "block"; s.left = Math.min(x, this.drag.x) + "px"; s.width = Math.abs(x - this.drag.x) + "px";
      s.top = this.mt + "px"; s.height = this.ph + "px";
      return;
    }
    const raw = this.px(e);
    this.group.hover(raw < ML || raw > ML + this.pw ? null : this.step(x), this);
  }
  up(e) {
    if (!this.drag) return;
    const x = Math.min(Math.max(this.px(e), ML), ML + this.pw), x0 = this.drag.x;
    this.drag = null; this.sel.style.display = "none";
    if (Math.abs(x - x0) > 5) this.group.zoom(this.step(Math.min(x, x0)), this.step(Math.max(x, x0)));
  }
  hover(step, source) {
    const cross = this.svgBox.querySelector(".ac-cross"), dots = this.svgBox.querySelector(".ac-dots");
    if (!cross) return;
    if (step === null) { cross.setAttribute("visibility", "hidden"); dots.innerHTML = ""; this.tip.style.display = "none"; return; }
    const d = this.d, tol = 12 / this.pw * (this.group.dom[1] - this.group.dom[0]);
    let at = Math.round(step), dotHtml = "";
    const rows = [];
    d.s.forEach((s, i) => {  // a sparse series (an eval every N steps) answers within half its spacing
      const j = nearest(s.x, step);
      if (j < 0 || Math.abs(s.x[j] - step) > Math.max(tol, s.gap / 2)) return;
      if (i === 0 || rows.length === 0) at = s.x[j];
      rows.push(`<div><b style="color:${s.c}">${esc(s.l)}</b> ${esc(fmtv(s.y[j]))}${s.x[j] !== at ? ` <span>@ ${s.x[j]}</span>` : ""}</div>`);
      dotHtml += `<circle cx="${this.sx(s.x[j]).toFixed(1)}" cy="${this.sy(s.y[j]).toFixed(1)}" r="3.5" fill="${s.c}" stroke="#fff"/>`;
    });
    for (const k of d.k) {
      const j = nearest(k.x, step);
      if (j >= 0 && Math.abs(k.x[j] - step) <= tol / 2) rows.push(`<div><b style="color:${k.c}">${esc(k.hv)}</b> @ ${k.x[j]}</div>`);
    }
    for (const v of d.v) if (Math.abs(v.x - step) <= tol / 2) rows.push(`<div style="color:${v.c}">${esc(v.t)}</div>`);
    const x = this.sx(at);
    cross.setAttribute("x1", x.toFixed(1)); cross.setAttribute("x2", x.toFixed(1)); cross.setAttribute("visibility", "visible");
    dots.innerHTML = source ? dotHtml : "";
    if (!source) { this.tip.style.display = "none"; return; }
    this.tip.innerHTML = `<div class="ac-tipstep">step ${esc(at)}</div>` + rows.join("");
    const t = this.tip.style;
    t.display = "block"; t.top = this.mt + 4 + "px";
    const w = this.tip.offsetWidth;
    t.left = (x + 14 + w > ML + this.pw ? Math.max(0, x - 14 - w) : x + 14) + "px";
  }
  draw() {
    const d = this.d, [x0, x1] = this.group.dom, W = Math.max(this.box.clientWidth, 240);
    const pw = this.pw = W - ML - MR, ph = this.ph = PH;
    this.width = W;
    this.sx = (v) => ML + (v - x0) / (x1 - x0) * pw;
    const rows = this.placeLabels(x0, x1), MT = this.mt = 8 + rows * LANE, H = MT + ph + MB;
    this.box.style.height = H + "px";
    const [y0, y1] = this.group.zoomed && !d.yf ? fitY(d, x0, x1) : d.y;
    const L = d.log, ty = (v) => (L ? Math.log10(Math.max(v, 1e-300)) : v), Y0 = ty(y0), Y1 = ty(y1);
    this.sy = (v) => MT + (1 - (ty(v) - Y0) / (Y1 - Y0)) * ph;
    const sx = this.sx, sy = this.sy, clip = `ac-clip-${this.id}`, o = [];
    o.push(`<svg width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" aria-hidden="true">`,
      `<defs><clipPath id="${clip}"><rect x="${ML}" y="${MT}" width="${pw}" height="${ph}"/></clipPath></defs>`,
      `<rect class="ac-plot" x="${ML}" y="${MT}" width="${pw}" height="${ph}" fill="#fff"/>`);
    const yt = L ? logTicks(Y0, Y1).map((t) => ({v: Math.pow(10, t), s: Math.pow(10, t)})) :
      (({step, ticks}) => ticks.map((v) => ({v, s: step})))(nice(y0, y1, Math.max(2, Math.round(ph / 45)), false));
    for (const t of yt) {
      const y = sy(t.v).toFixed(1);
      o.push(`<line class="ac-grid" x1="${ML}" x2="${ML + pw}" y1="${y}" y2="${y}"/>`,
        `<text x="${ML - 6}" y="${y}" text-anchor="end" dominant-baseline="middle">${esc(L ? fmtv(t.v) : fmtTick(t.v, t.s, d.sci))}</text>`);
    }
    const xt = nice(x0, x1, Math.max(2, Math.round(pw / 90)), true);
    for (const v of xt.ticks) {
      const x = sx(v).toFixed(1);
      o.push(`<line class="ac-grid" x1="${x}" x2="${x}" y1="${MT}" y2="${MT + ph}"/>`,
        `<text x="${x}" y="${MT + ph + 15}" text-anchor="middle">${esc(fmtTick(v, xt.step, false))}</text>`);
    }
    o.push(`<line class="ac-axis" x1="${ML}" x2="${ML + pw}" y1="${MT + ph}" y2="${MT + ph}"/>`,
      `<line class="ac-axis" x1="${ML}" x2="${ML}" y1="${MT}" y2="${MT + ph}"/>`,
      `<text x="${ML + pw / 2}" y="${H - 3}" text-anchor="middle">step</text>`,
      `<text transform="translate(13 ${MT + ph / 2}) rotate(-90)" text-anchor="middle">${esc(d.yl)}</text>`,
      `<g clip-path="url(#${clip})">`);
    for (const [a, b, c] of d.sp) o.push(`<rect x="${sx(a).toFixed(1)}" y="${MT}" width="${Math.max(sx(b) - sx(a), 0).toFixed(1)}" height="${ph}" fill="${c}" opacity="0.08"/>`);
    for (const h of d.h) {
      const y = sy(h.y);
      if (h.sh === "above") o.push(`<rect x="${ML}" y="${MT}" width="${pw}" height="${Math.max(y - MT, 0).toFixed(1)}" fill="${h.c}" opacity="0.06"/>`);
      o.push(`<line x1="${ML}" x2="${ML + pw}" y1="${y.toFixed(1)}" y2="${y.toFixed(1)}" stroke="${h.c}" stroke-width="1.3" stroke-dasharray="${DASH[h.d] || ""}"/>`);
    }
    for (const s of d.s) {
      const a = Math.max(bisect(s.x, x0) - 1, 0), b = Math.min(bisect(s.x, x1) + 1, s.x.length);
      let p = "";
      for (let i = a; i < b; i++) p += (i === a ? "M" : "L") + sx(s.x[i]).toFixed(1) + " " + sy(s.y[i]).toFixed(1);
      if (p) o.push(`<path d="${p}" fill="none" stroke="${s.c}" stroke-width="1.5" stroke-linejoin="round"/>`);
      if (s.m) for (let i = a; i < b; i++) o.push(`<circle cx="${sx(s.x[i]).toFixed(1)}" cy="${sy(s.y[i]).toFixed(1)}" r="2.6" fill="${s.c}"/>`);
    }

    for (const k of d.k) {
      if (!k.y) continue;
      for (let i = 0; i < k.x.length; i++) if (k.x[i] >= x0 && k.x[i] <= x1) o.push(glyph(k.sh, +sx(k.x[i]).toFixed(1), +sy(k.y[i]).toFixed(1), k.c));
    }
    o.push(`</g>`);
    for (const k of d.k) {  // pinned to an edge: a NaN has no height
      if (k.y) continue;
      const y = k.e === "bottom" ? MT + ph - 5 : MT + 5;
      for (const x of k.x) if (x >= x0 && x <= x1) o.push(glyph(k.sh, +sx(x).toFixed(1), y, k.c));
    }
    for (const v of d.v) {  // a finding's line runs up to its label
      if (v.x < x0 || v.x > x1) continue;
      const x = sx(v.x).toFixed(1), top = v.row === undefined ? MT : 4 + v.row * LANE + LANE - 3;
      o.push(`<line x1="${x}" x2="${x}" y1="${top}" y2="${MT + ph}" stroke="${v.c}" stroke-width="1.3" stroke-dasharray="${DASH[v.d] || ""}"/>`);
    }
    o.push(`<line class="ac-cross" x1="0" x2="0" y1="${MT}" y2="${MT + ph}" visibility="hidden"/><g class="ac-dots"></g></svg>`);
    this.svgBox.innerHTML = o.join("");
    this.fig.dataset.x0 = String(x0); this.fig.dataset.x1 = String(x1);
    this.reset.hidden = !this.group.zoomed;
  }
  placeLabels(x0, x1) {  // above the plot, in as few rows as keep them apart: a label never hides a point
    const shown = this.d.v.filter((v) => { v.row = undefined; return v.p && v.x >= x0 && v.x <= x1; });
    this.labels.innerHTML = shown.map((v) => `<div class="ac-lab" style="color:${v.c};border-color:${v.c};max-width:${this.pw}px">${esc(v.t)}</div>`).join("");
    const rows = [];
    shown.forEach((v, i) => {
      const el = this.labels.children[i], w = el.offsetWidth, x = this.sx(v.x);
      let a = x - 1;
      if (a + w > ML + this.pw + MR) a = Math.max(x + 1 - w, 0);
      let r = rows.findIndex((row) => row.every(([p, q]) => a + w + 6 <= p || a >= q + 6));
      if (r < 0) { r = rows.length; rows.push([]); }
      rows[r].push([a, a + w]);
      v.row = r;
      el.style.left = a.toFixed(1) + "px";
      el.style.top = 4 + r * LANE + "px";
    });
    return rows.length;
  }
}
function scan(root) {
  for (const fig of (root || document).querySelectorAll("figure.ac-fig:not([data-ac])")) {
    fig.dataset.ac = "1";
    try {
      const owner = fig.closest(".autopsy") || document.body, key = fig.dataset.group || "";
      owner.acGroups = owner.acGroups || {};
      const d = JSON.parse(fig.querySelector("script.ac-data").textContent);
      for (const s of d.s) { const g = s.x.slice(1).map((x, i) => x - s.x[i]).sort((a, b) => a - b); s.gap = g.length ? g[g.length >> 1] : 0; }
      const g = owner.acGroups[key] = owner.acGroups[key] || new Group(d.x);
      const c = new Chart(fig, g, d);
      g.charts.push(c);
      c.draw();
      // redrawn on the next frame, not inside the observer (a height change there would loop)
      const redraw = () => { if (c.box.clientWidth !== c.width) c.draw(); };
      if (window.ResizeObserver) new ResizeObserver(() => requestAnimationFrame(redraw)).observe(c.box);
    } catch (err) {
      fig.dataset.ac = "failed";
      if (window.console) console.warn("autopsy chart:", err);
    }
  }
}
window.autopsyCharts = {scan};
scan();
})();
"""
