/* k2repro plotting on uPlot (vendor/uPlot.iife.min.js): line charts with spike bands, marks,
   hover values and drag-to-zoom; a canvas heatmap. Used by the UI pages and, inlined, by the
   offline HTML reports (no server: the same code, the data embedded as JSON). */
(function () {
  "use strict";
  const COLORS = ["#2a62c9", "#d35400", "#1e8449", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d", "#b7950b"];
  const BAND = { malignant: "rgba(192,57,43,0.22)", benign: "rgba(214,137,16,0.18)" };

  function fmt(v) {
    if (v == null || !isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(3);
    return (+v.toPrecision(6)).toString();
  }

  function ema(ys, alpha) {
    if (!alpha) return ys;
    const out = new Array(ys.length); let m = null;
    for (let i = 0; i < ys.length; i++) {
      const y = ys[i];
      if (y == null) { out[i] = null; continue; }
      m = m == null ? y : alpha * m + (1 - alpha) * y; out[i] = m;
    }
    return out;
  }

  function tip(text, ev) {
    const t = document.getElementById("k2tip") || document.getElementById("tip");
    if (!t) return;
    if (!text) { t.hidden = true; return; }
    t.textContent = text; t.hidden = false;
    t.style.left = (ev.clientX + 14) + "px"; t.style.top = (ev.clientY + 10) + "px";
  }

  /* opts: {xs, series:[{label, ys, color, dash}], xLabel, yLabel, logY, bands:[{from, to, label, severity}],
            marks:[{x, label, color}], width, height, onZoom(lo, hi), xTime} */
  function line(el, opts) {
    el.innerHTML = "";
    const width = opts.width || Math.max(320, el.clientWidth || 900);
    const bands = opts.bands || [], marks = opts.marks || [];
    const series = [{ label: opts.xLabel || "step", value: (u, v) => fmt(v) }];
    opts.series.forEach((s, i) => series.push({
      label: s.label, stroke: s.color || COLORS[i % COLORS.length], width: s.width || 1.25,
      dash: s.dash, points: { show: !!s.points, size: 4 }, spanGaps: !!s.spanGaps, value: (u, v) => fmt(v),
      scale: s.scale || "y",
    }));
    const y2 = opts.series.find(s => s.scale === "y2");
    const data = [opts.xs].concat(opts.series.map(s => opts.logY ? s.ys.map(v => (v != null && v > 0) ? v : null) : s.ys));
    function drawOverlays(u) {
      const ctx = u.ctx, top = u.bbox.top, h = u.bbox.height;
      ctx.save();
      ctx.font = `${Math.round(11 * devicePixelRatio)}px system-ui, sans-serif`;
      ctx.textAlign = "left"; ctx.textBaseline = "alphabetic";  // uPlot's axes leave other settings behind
      bands.forEach((b, bi) => {
        let x0 = u.valToPos(b.from, "x", true), x1 = u.valToPos(b.to, "x", true);
        if (x1 < u.bbox.left || x0 > u.bbox.left + u.bbox.width) return;
        const minw = 4 * devicePixelRatio;             // an episode never thinner than 4 px
        if (x1 - x0 < minw) { const c = (x0 + x1) / 2; x0 = c - minw / 2; x1 = c + minw / 2; }
        ctx.fillStyle = BAND[b.severity] || BAND.benign;
        ctx.fillRect(x0, top, x1 - x0, h);
        ctx.fillStyle = b.severity === "malignant" ? "#c0392b" : "#b9770e";
        ctx.beginPath(); const cx = (x0 + x1) / 2;      // a marker per episode, visible at any zoom
        ctx.moveTo(cx - 5 * devicePixelRatio, top); ctx.lineTo(cx + 5 * devicePixelRatio, top);
        ctx.lineTo(cx, top + 8 * devicePixelRatio); ctx.fill();
        // labels of neighbouring episodes stagger over three rows instead of overprinting
        if (b.label) ctx.fillText(b.label, Math.min(x1 + 3, u.bbox.left + u.bbox.width - 120 * devicePixelRatio), top + (20 + 13 * (bi % 3)) * devicePixelRatio);
      });
      marks.forEach((m, i) => {
        const x = u.valToPos(m.x, "x", true);
        if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) return;
        ctx.strokeStyle = m.color || "#7f8c8d"; ctx.setLineDash([4, 4]); ctx.lineWidth = devicePixelRatio;
        ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + h); ctx.stroke();
        // labels of nearby marks stagger (a fault and a checkpoint at one step stay readable)
        if (m.label) { ctx.fillStyle = m.color || "#7f8c8d"; ctx.fillText(m.label, x + 3, top + h - (6 + 14 * (m.row ?? (i % 3))) * devicePixelRatio); }
      });
      ctx.restore();
    }
    const u = new uPlot({
      width, height: opts.height || 320, series, legend: { live: true },
      scales: Object.assign({ x: { time: !!opts.xTime }, y: opts.logY ? { distr: 3 } : (opts.yRange ? { range: () => opts.yRange } : {}) },
        y2 ? { y2: y2.logY ? { distr: 3 } : (opts.y2Range ? { range: () => opts.y2Range } : {}) } : {}),
      axes: [{ label: opts.xLabel || "step" }, { label: opts.yLabel || "", size: 70, values: (u, vs) => vs.map(v => v == null ? "" : fmt(v)) }]
        .concat(y2 ? [{ scale: "y2", side: 1, label: y2.label, size: 70, stroke: y2.color, grid: { show: false }, values: (u, vs) => vs.map(v => v == null ? "" : fmt(v)) }] : []),
      cursor: { drag: { x: true, y: false, setScale: false } },
      hooks: {
        draw: [drawOverlays],
        setSelect: [u => {
          if (u.select.width < 3 || !opts.onZoom) return;
          const lo = u.posToVal(u.select.left, "x"), hi = u.posToVal(u.select.left + u.select.width, "x");
          u.setSelect({ left: 0, width: 0, top: 0, height: 0 }, false);
          opts.onZoom(lo, hi);
        }],
        setCursor: [u => {
          const i = u.cursor.idx;
          if (i == null || u.cursor.left < 0) { tip(null); el.removeAttribute("data-hover"); return; }
          const parts = [`${opts.xLabel || "step"} ${opts.xTime ? new Date(u.data[0][i] * 1000).toISOString() : fmt(u.data[0][i])}`];
          for (let k = 1; k < u.data.length; k++) if (u.data[k][i] != null) parts.push(`${u.series[k].label}: ${fmt(u.data[k][i])}`);
          const b = bands.find(b => u.data[0][i] >= b.from && u.data[0][i] <= b.to);
          if (b && b.label) parts.push(b.label);
          const text = parts.join("  ·  ");
          el.setAttribute("data-hover", text);
          const r = u.over.getBoundingClientRect();
          tip(text, { clientX: r.left + u.cursor.left, clientY: r.top + u.cursor.top });
        }],
      },
    }, data, el);
    u.over.addEventListener("mouseleave", () => tip(null));
    el._uplot = u;  // scripts and tests reach the chart (scales, valToPos) through its element
    return u;
  }

  function color(t) { // 0..1 -> viridis-like
    const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
    t = Math.max(0, Math.min(1, t)); const f = t * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(f)), w = f - i;
    const c = stops[i].map((v, k) => Math.round(v + w * (stops[i + 1][k] - v)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  function diverge(t) { // 0..1 -> blue, white, red (a log ratio around 0)
    t = Math.max(0, Math.min(1, t));
    const a = t < 0.5 ? [33, 102, 172] : [178, 24, 43], w = t < 0.5 ? 1 - 2 * t : 2 * t - 1;
    return `rgb(${Math.round(255 + w * (a[0] - 255))},${Math.round(255 + w * (a[1] - 255))},${Math.round(255 + w * (a[2] - 255))})`;
  }

  /* h: {params, bucket_start, z, hi}; opts: {onClick(step, param), log, diverging, label} */
  function heat(el, h, opts) {
    el.innerHTML = "";
    const rowH = 14, labelW = 300, cols = h.bucket_start.length;
    const width = Math.max(400, el.clientWidth || 1100), plotW = width - labelW - 10;
    const cv = document.createElement("canvas"); cv.className = "heat";
    cv.width = width; cv.height = h.params.length * rowH + 30; el.appendChild(cv);
    const ctx = cv.getContext("2d");
    const vals = h.z.flat().filter(v => v != null && (!opts.log || v > 0));
    const tr = v => opts.log ? Math.log10(v) : v;
    let lo = Math.min(...vals.map(tr)), hi = Math.max(...vals.map(tr)); if (!(hi > lo)) { hi = lo + 1; }
    if (opts.diverging) { const m = Math.max(Math.abs(lo), Math.abs(hi), 0.5); lo = -m; hi = m; }
    const paint = opts.diverging ? diverge : color;
    ctx.font = "12px ui-monospace, monospace"; ctx.textBaseline = "middle";
    const cw = plotW / cols;
    h.params.forEach((p, r) => {
      ctx.fillStyle = "#1d2330"; ctx.fillText(p.length > 42 ? "…" + p.slice(-41) : p, 2, r * rowH + rowH / 2);
      h.z[r].forEach((v, c) => {
        ctx.fillStyle = (v == null || (opts.log && v <= 0)) ? "#eee" : paint((tr(v) - lo) / (hi - lo));
        ctx.fillRect(labelW + c * cw, r * rowH, Math.ceil(cw), rowH - 1);
      });
    });
    ctx.fillStyle = "#667"; ctx.textBaseline = "top";
    for (let k = 0; k <= 4; k++) {
      const c = Math.min(cols - 1, Math.round(k * (cols - 1) / 4));
      ctx.fillText(String(h.bucket_start[c]), labelW + c * cw, h.params.length * rowH + 6);
    }
    function at(ev) {
      const r = cv.getBoundingClientRect(), x = ev.clientX - r.left, y = ev.clientY - r.top;
      const c = Math.floor((x - labelW) / cw), row = Math.floor(y / rowH);
      if (c < 0 || c >= cols || row < 0 || row >= h.params.length) return null;
      const end = c + 1 < cols ? h.bucket_start[c + 1] - 1 : h.hi;
      return { step: h.bucket_start[c], end, param: h.params[row], v: h.z[row][c] };
    }
    cv.addEventListener("mousemove", ev => {
      const a = at(ev); if (!a) { tip(null); return; }
      tip(`${a.param}  steps ${a.step}..${a.end}: ${fmt(a.v)}${opts.label ? " " + opts.label : ""}`, ev);
    });
    cv.addEventListener("mouseleave", () => tip(null));
    cv.addEventListener("click", ev => { const a = at(ev); if (a && opts.onClick) opts.onClick(a.step, a.param); });
    return cv;
  }

  /* offline reports: every div.k2chart holds its spec in a child script of type application/json
     child ({kind: "line"|"heat", ...the options of line()/heat()}); drawn once the page has loaded */
  function renderAll(root) {
    (root || document).querySelectorAll("div.k2chart").forEach(el => {
      const src = el.querySelector("script[type='application/json']");
      if (!src || el.dataset.drawn) return;
      const spec = JSON.parse(src.textContent);
      const box = document.createElement("div"); el.appendChild(box);
      if (spec.kind === "heat") heat(box, spec.data, spec); else line(box, spec);
      el.dataset.drawn = "1";
    });
  }

  window.K2Plot = { line, heat, ema, fmt, COLORS, renderAll };
  if (document.querySelector("div.k2chart")) {
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", () => renderAll());
    else renderAll();
  }
})();
