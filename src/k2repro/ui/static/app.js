/* k2repro UI pages: vanilla JS over the JSON API (/api/...). No framework, nothing fetched
   from elsewhere. Each page is a function of the URL; the shell names it in <body data-page>. */
(function () {
  "use strict";
  const P = window.K2Plot, fmt = P.fmt;
  const main = document.getElementById("main");
  const qs = new URLSearchParams(location.search);
  const parts = location.pathname.split("/").filter(Boolean).map(decodeURIComponent);

  function h(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v === true ? "" : v);
    }
    for (const k of kids.flat()) if (k != null) e.append(k.nodeType ? k : document.createTextNode(String(k)));
    return e;
  }
  async function api(path) {
    const r = await fetch(path, { credentials: "same-origin" });
    const body = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
    if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
    return body;
  }
  const enc = encodeURIComponent;
  const runLink = id => h("a", { href: `/run/${enc(id)}` }, id);
  const badge = s => h("span", { class: `badge s-${s}` }, s || "?");
  function fail(e) { main.append(h("p", { class: "err", id: "error" }, String(e.message || e))); }
  function isNum(v) { return typeof v === "number"; }

  /* a sortable table: cols [{key, label, fmt?, num?}] */
  function table(cols, rows, opts = {}) {
    let sortKey = null, dir = 1;
    const tbody = h("tbody");
    const thead = h("thead", {}, h("tr", {}, cols.map(c => h("th", { onclick: () => { dir = sortKey === c.key ? -dir : 1; sortKey = c.key; fill(); }, "data-key": c.key }, c.label || c.key))));
    function fill() {
      let rs = rows.slice();
      if (sortKey) rs.sort((a, b) => { const x = a[sortKey], y = b[sortKey]; return (x == null) - (y == null) || (x < y ? -dir : x > y ? dir : 0); });
      tbody.innerHTML = "";
      rs.forEach(r => tbody.append(h("tr", { class: opts.rowClass ? opts.rowClass(r) : null },
        cols.map(c => { const v = r[c.key]; const out = c.fmt ? c.fmt(v, r) : (isNum(v) ? fmt(v) : (v == null ? "" : typeof v === "object" ? JSON.stringify(v) : String(v)));
          return h("td", { class: (c.num || (!c.fmt && isNum(v))) ? "num" : null }, out); }))));
    }
    fill();
    return h("div", { class: "wrap" }, h("table", { id: opts.id }, thead, tbody));
  }
  function kvSearch(rows, keyCol, title, id) {
    const box = h("div", { id });
    const input = h("input", { type: "search", placeholder: `search ${title}`, oninput: () => draw() });
    const holder = h("div");
    function draw() {
      const t = input.value.toLowerCase();
      holder.innerHTML = "";
      holder.append(table(Object.keys(rows[0] || { key: 1 }).map(k => ({ key: k })),
        rows.filter(r => !t || Object.values(r).some(v => String(v).toLowerCase().includes(t)))));
    }
    draw();
    box.append(h("h2", {}, title), input, holder);
    return box;
  }

  // ------------------------------------------------------------------ runs
  async function pageRuns() {
    const d = await api("/api/runs");
    main.innerHTML = "";
    const filter = h("input", { type: "search", id: "filter", placeholder: "filter: name, id, tag, source", oninput: () => draw() });
    const status = h("select", { id: "status", onchange: () => draw() }, ["", "running", "completed", "failed", "crashed", "interrupted"].map(s => h("option", { value: s }, s || "any status")));
    const cmp = h("button", { id: "compare", onclick: () => { const ids = [...document.querySelectorAll("input.pick:checked")].map(c => c.value); if (ids.length) location.href = `/compare?runs=${ids.map(enc).join(",")}`; } }, "compare selected");
    const holder = h("div"), tree = h("div", { class: "tree", id: "lineage" });
    main.append(h("h1", {}, `Runs (${d.runs.length})`), h("p", { class: "muted" }, `store ${d.store}`),
      h("div", { class: "controls" }, filter, status, cmp), holder, h("h2", {}, "Lineage"), tree);
    function draw() {
      const t = filter.value.toLowerCase(), s = status.value;
      const rows = d.runs.filter(r => (!s || r.status === s) && (!t || [r.run_id, r.name, r.source, (r.tags || []).join(" ")].join(" ").toLowerCase().includes(t)));
      holder.innerHTML = "";
      holder.append(table([
        { key: "pick", label: "", fmt: (v, r) => h("input", { type: "checkbox", class: "pick", value: r.run_id }) },
        { key: "status", fmt: v => badge(v) }, { key: "run_id", label: "run", fmt: v => runLink(v) }, { key: "name" },
        { key: "tags", fmt: v => (v || []).join(", ") }, { key: "source" }, { key: "steps" }, { key: "last_loss", label: "last loss" },
        { key: "started_at", label: "started", fmt: v => (v || "").replace("T", " ").slice(0, 19) },
      ], rows, { id: "runs" }));
    }
    draw();
    const byParent = {};
    d.runs.forEach(r => (byParent[r.parent_run_id || ""] = byParent[r.parent_run_id || ""] || []).push(r));
    const ids = new Set(d.runs.map(r => r.run_id));
    function node(r, depth) {
      const rel = r.source && r.source !== "train" ? r.source : (r.parent_run_id ? "resume" : "");
      const li = h("div", { style: `padding-left:${depth * 1.5}em` }, depth ? "└ " : "", runLink(r.run_id), " ", badge(r.status),
        r.resumed_from_step != null ? ` from step ${r.resumed_from_step}` : "", rel ? ` (${rel})` : "");
      tree.append(li);
      (byParent[r.run_id] || []).forEach(c => node(c, depth + 1));
    }
    d.runs.filter(r => !r.parent_run_id || !ids.has(r.parent_run_id)).forEach(r => {
      node(r, 0);
      if (byParent[r.run_id]) {
        const fam = [r.run_id]; (function walk(x) { (byParent[x] || []).forEach(c => { fam.push(c.run_id); walk(c.run_id); }); })(r.run_id);
        tree.append(h("div", { style: "padding-left:1.5em" }, h("a", { href: `/compare?runs=${fam.map(enc).join(",")}` }, "compare this family")));
      }
    });
    if (d.runs.some(r => r.status === "running")) setTimeout(pageRuns, 3000);
  }

  // ------------------------------------------------------------------ run
  async function pageRun() {
    const id = parts[1];
    const d = await api(`/api/runs/${enc(id)}`);
    const rid = d.run.run_id;
    main.innerHTML = "";
    const state = { col: qs.get("col") || "loss", x: qs.get("x") || "step", logY: qs.get("log") === "1", smooth: 0, lo: null, hi: null };
    const sel = h("select", { id: "series", onchange: () => { state.col = sel.value; state.lo = state.hi = null; load(); } },
      d.columns.map(c => h("option", { value: c, selected: c === state.col }, c)), d.metrics.map(m => h("option", { value: `metric:${m}` }, `metric: ${m}`)));
    const xsel = h("select", { id: "xaxis", onchange: () => { state.x = xsel.value; load(); } }, ["step", "tokens", "time"].map(x => h("option", { value: x, selected: x === state.x }, x)));
    const logc = h("input", { type: "checkbox", id: "logy", checked: state.logY, onchange: () => { state.logY = logc.checked; draw(); } });
    const sm = h("input", { type: "range", id: "smooth", min: 0, max: 0.99, step: 0.01, value: 0, oninput: () => { state.smooth = +sm.value; draw(); } });
    const reset = h("button", { id: "reset", onclick: () => { state.lo = state.hi = null; load(); } }, "reset zoom");
    const info = h("span", { id: "range", class: "muted" });
    const chart = h("div", { class: "chart", id: "chart" });
    main.append(h("h1", {}, d.run.name || rid, " ", badge(d.run.status)),
      h("dl", { class: "kv" }, ["run_id", "source", "parent_run_id", "resumed_from_step", "world_size", "started_at", "ended_at", "git_commit", "config_hash", "host"].filter(k => d.run[k] != null).map(k => [h("dt", {}, k), h("dd", {}, k === "parent_run_id" ? runLink(d.run[k]) : String(d.run[k]))]).flat()),
      h("p", {}, d.has_layers ? h("a", { href: `/layers/${enc(rid)}` }, "layers heatmap") : "", " ", d.n_evals ? h("a", { href: `/evals/${enc(rid)}` }, "evals") : "", " ",
        h("a", { href: `/step/${enc(rid)}/${d.first_step || 1}` }, "steps")),
      h("div", { class: "controls" }, h("label", {}, "series ", sel), h("label", {}, "x ", xsel), h("label", {}, logc, " log y"), h("label", {}, "smoothing ", sm), reset, info), chart);
    let cur = null;
    const bands = d.spikes.map(s => ({ from: s.onset_step, to: s.end_step ?? s.peak_step ?? s.onset_step, severity: s.severity, label: `${s.class} · ${s.severity}`, s }));
    const evs = d.events.filter(e => ["fault_injected", "rollback", "skip", "nan", "resume", "error"].includes(e.kind) && e.step != null);
    function xOf(c) { return state.x === "tokens" ? c.tokens : state.x === "time" ? c.time : c.step; }
    function stepToX(c, step) {  // a step -> the chosen x unit (nearest kept point)
      if (state.x === "step" || !c.step.length) return step;
      let i = c.step.findIndex(s => s >= step); if (i < 0) i = c.step.length - 1;
      return xOf(c)[i];
    }
    function xToStep(c, x) {
      if (state.x === "step") return Math.round(x);
      const xs = xOf(c); let i = xs.findIndex(v => v >= x); if (i < 0) i = xs.length - 1; return c.step[i];
    }
    function draw() {
      if (!cur) return;
      const c = cur, xs = xOf(c);
      if (xs.some(v => v == null)) { info.textContent = `no ${state.x} recorded for this series`; return; }
      P.line(chart, {
        xs, xLabel: state.x, xTime: state.x === "time", yLabel: state.col, logY: state.logY,
        series: [{ label: state.col, ys: P.ema(c.y, state.smooth) }],
        bands: bands.map(b => ({ ...b, from: stepToX(c, b.from), to: stepToX(c, b.to) })),
        marks: d.checkpoints.map(k => ({ x: stepToX(c, k.step), label: `ckpt ${k.step}`, color: "#1e8449", row: 0 }))
          .concat(evs.map((e, i) => ({ x: stepToX(c, e.step), label: e.kind, color: "#c0392b", row: 1 + (i % 2) }))),
        onZoom: (a, b) => { state.lo = Math.max(c.first_step, xToStep(c, a)); state.hi = Math.max(state.lo, xToStep(c, b)); load(); },
      });
      info.textContent = `steps ${c.lo}..${c.hi} · ${c.n} points${c.downsampled ? `, ${c.step.length} drawn (min/max per bucket)` : ""}`;
      chart.setAttribute("data-lo", c.lo); chart.setAttribute("data-hi", c.hi); chart.setAttribute("data-last", c.last_step);
    }
    async function load() {
      const q = new URLSearchParams({ col: state.col, x: state.x, points: Math.max(400, Math.round((chart.clientWidth || 1000) * 2)) });
      if (state.lo != null) { q.set("lo", state.lo); q.set("hi", state.hi); }
      try { cur = await api(`/api/runs/${enc(rid)}/curve?${q}`); draw(); } catch (e) { fail(e); }
    }
    await load();
    // live: a run that trains gains steps without a reload
    let status = d.run.status;
    async function poll() {
      if (status !== "running") { document.getElementById("live").textContent = ""; return; }
      document.getElementById("live").textContent = "live: refreshing every 2 s";
      try { status = (await api(`/api/runs/${enc(rid)}`)).run.status; if (state.lo == null) await load(); } catch (e) { /* next time */ }
      setTimeout(poll, 2000);
    }
    setTimeout(poll, 2000);
    if (d.spikes.length) main.append(h("h2", {}, "Spikes"), table([
      { key: "spike_id", label: "#", fmt: v => h("a", { href: `/spike/${enc(rid)}/${v}` }, `spike ${v}`) },
      { key: "onset_step", label: "onset", fmt: v => h("a", { href: `/step/${enc(rid)}/${v}` }, String(v)) }, { key: "peak_step", label: "peak" }, { key: "end_step", label: "end" },
      { key: "class" }, { key: "severity" }, { key: "magnitude" }, { key: "lead_signal", label: "lead" }, { key: "top_layer", label: "top layer" }, { key: "reason" },
    ], d.spikes, { id: "spikes", rowClass: r => r.severity === "malignant" ? "malignant" : null }));
    if (d.checkpoints.length) main.append(h("h2", {}, "Checkpoints"), table([{ key: "step" }, { key: "bytes" }, { key: "save_s" }, { key: "manifest_sha256", label: "manifest sha256", fmt: v => (v || "").slice(0, 16) }, { key: "time" }], d.checkpoints));
    if (evs.length) main.append(h("h2", {}, "Events"), table([{ key: "step", fmt: v => h("a", { href: `/step/${enc(rid)}/${v}` }, String(v)) }, { key: "kind" }, { key: "severity" }, { key: "rank" },
      { key: "detail", fmt: v => v && typeof v === "object" ? Object.entries(v).map(([k, x]) => `${k}=${Array.isArray(x) ? x.slice(0, 12).join(",") : x}`).join("  ") : (v || "") }], evs, { id: "events" }));
    main.append(h("div", { class: "grid2" }, kvSearch(d.hparams.map(r => ({ key: r.key, value: r.value })), "key", "hparams", "hparams"),
      kvSearch(d.env.filter(r => r.rank === 0).map(r => ({ key: r.key, value: r.value })), "key", "env (rank 0)", "env")));
    if (d.data_manifest.length) main.append(h("h2", {}, "Data manifest"), table(Object.keys(d.data_manifest[0]).map(k => ({ key: k, fmt: k === "sha256" ? v => (v || "").slice(0, 16) : null })), d.data_manifest, { id: "manifest" }));
    if (d.family.length > 1) main.append(h("h2", {}, "Lineage"), table([{ key: "run_id", fmt: v => runLink(v) }, { key: "relation" }, { key: "source" }, { key: "resumed_from_step", label: "from step" }, { key: "first_step" }, { key: "last_step" }], d.family),
      h("a", { href: `/compare?runs=${d.family.map(f => enc(f.run_id)).join(",")}` }, "compare the family (forks of one line)"));
  }

  // ------------------------------------------------------------------ compare
  async function pageCompare() {
    const ids = (qs.get("runs") || "").split(",").filter(Boolean);
    const col = qs.get("col") || "loss", x = qs.get("x") || "step";
    main.innerHTML = "";
    main.append(h("h1", {}, `Compare ${ids.length} runs`));
    const ctl = h("div", { class: "controls" },
      h("label", {}, "series ", h("select", { id: "series", onchange: e => { qs.set("col", e.target.value); location.search = qs; } }, ["loss", "grad_norm", "lr", "tokens_per_s", "loss_max", "logz_mean"].map(c => h("option", { value: c, selected: c === col }, c)))),
      h("label", {}, "align by ", h("select", { id: "align", onchange: e => { qs.set("x", e.target.value); location.search = qs; } }, ["step", "tokens"].map(c => h("option", { value: c, selected: c === x }, c)))));
    const chart = h("div", { class: "chart", id: "chart" });
    main.append(ctl, chart);
    const d = await api(`/api/compare?runs=${ids.map(enc).join(",")}&col=${enc(col)}&x=${x}&points=1500`);
    const all = new Set(); d.curves.forEach(c => (x === "tokens" ? c.tokens : c.step).forEach(v => all.add(v)));
    const xs = [...all].sort((a, b) => a - b), pos = new Map(xs.map((v, i) => [v, i]));
    const series = d.curves.map((c, i) => { const ys = new Array(xs.length).fill(null); (x === "tokens" ? c.tokens : c.step).forEach((v, k) => ys[pos.get(v)] = c.y[k]);
      const info = d.runs[i] || {}; return { label: `${c.run_id}${info.parent_run_id ? ` (fork @${info.resumed_from_step})` : ""}`, ys, dash: info.parent_run_id ? [6, 3] : null }; });
    const marks = [];
    const diffBox = h("div", { id: "diff" });
    main.append(h("h2", {}, "Config diff (against the first run)"), diffBox);
    for (const other of ids.slice(1)) {
      try {
        const df = await api(`/api/diff?a=${enc(ids[0])}&b=${enc(other)}`);
        const rows = [];
        for (const [k, v] of Object.entries(df.config.changed)) rows.push({ run: other, key: k, a: v[0], b: v[1] });
        for (const [k, v] of Object.entries(df.config.added)) rows.push({ run: other, key: k, a: "", b: v });
        for (const [k, v] of Object.entries(df.config.removed)) rows.push({ run: other, key: k, a: v, b: "" });
        const fd = df.first_loss_divergence_step ?? df.first_batch_divergence_step;
        if (fd != null && x === "step") marks.push({ x: fd, label: `first divergence ${other.slice(0, 18)} @${fd}`, color: "#8e44ad" });
        diffBox.append(h("p", { class: "first-divergence" }, `${ids[0]} vs ${other}: first loss divergence ${df.first_loss_divergence_step ?? "none"}, first batch divergence ${df.first_batch_divergence_step ?? "none"}`),
          rows.length ? table([{ key: "run" }, { key: "key" }, { key: "a", label: ids[0], fmt: v => v == null ? "" : String(v) }, { key: "b", label: "this run", fmt: v => v == null ? "" : String(v) }], rows) : h("p", { class: "muted" }, "same config"));
      } catch (e) { diffBox.append(h("p", { class: "err" }, String(e.message))); }
    }
    P.line(chart, { xs, xLabel: x, yLabel: col, series, marks });
    chart.setAttribute("data-series", series.length);
  }

  // ------------------------------------------------------------------ layers
  async function pageLayers() {
    const rid = parts[1];
    const state = { col: qs.get("col") || "update_ratio", agg: qs.get("agg") || "max", lo: qs.get("lo"), hi: qs.get("hi"), log: true };
    main.innerHTML = "";
    const col = h("select", { id: "col", onchange: () => { state.col = col.value; load(); } }, ["update_ratio", "grad_norm", "param_norm", "update_norm", "grad_max_abs"].map(c => h("option", { value: c, selected: c === state.col }, c)));
    const agg = h("select", { id: "agg", onchange: () => { state.agg = agg.value; load(); } }, ["max", "mean", "min"].map(c => h("option", { value: c, selected: c === state.agg }, c)));
    const lo = h("input", { type: "text", id: "lo", size: 8, placeholder: "from step", value: state.lo || "" }), hi = h("input", { type: "text", id: "hi", size: 8, placeholder: "to step", value: state.hi || "" });
    const info = h("span", { class: "muted", id: "info" }), holder = h("div", { id: "heat" });
    main.append(h("h1", {}, "Layers of ", runLink(rid)), h("div", { class: "controls" }, h("label", {}, "column ", col), h("label", {}, "aggregate ", agg), lo, hi,
      h("button", { onclick: () => { state.lo = lo.value; state.hi = hi.value; load(); } }, "range"), info),
      h("p", { class: "muted" }, "log colour scale; hover a cell for its value, click it to open that step"), holder);
    async function load() {
      const q = new URLSearchParams({ col: state.col, agg: state.agg, buckets: Math.max(50, Math.min(800, Math.floor(((holder.clientWidth || 1100) - 310) / 2))) });
      if (state.lo) q.set("lo", state.lo); if (state.hi) q.set("hi", state.hi);
      try {
        const d = await api(`/api/runs/${enc(rid)}/layers?${q}`);
        P.heat(holder, d, { log: true, onClick: step => { location.href = `/step/${enc(rid)}/${step}`; } });
        info.textContent = `${d.params.length} tensors × ${d.bucket_start.length} buckets, steps ${d.lo}..${d.hi}, ${d.ms} ms${d.cached ? " (cache)" : ""}`;
      } catch (e) { fail(e); }
    }
    await load();
  }

  // ------------------------------------------------------------------ step
  async function pageStep() {
    const rid = parts[1], step = parts[2];
    const d = await api(`/api/runs/${enc(rid)}/steps/${enc(step)}`);
    main.innerHTML = "";
    const nav = h("p", {}, d.prev_step != null ? h("a", { href: `/step/${enc(d.run_id)}/${d.prev_step}`, id: "prev" }, `← step ${d.prev_step}`) : "", "  ",
      d.next_step != null ? h("a", { href: `/step/${enc(d.run_id)}/${d.next_step}`, id: "next" }, `step ${d.next_step} →`) : "");
    const inj = d.samples.filter(s => s.injected).length;
    main.append(h("h1", {}, `Step ${d.step} of `, runLink(d.run_id)), nav,
      h("dl", { class: "kv" }, [["loss", fmt(d.step_loss)], ["batch hash", d.batch_hash], ["logged ids == recomputed", String(d.agree)], ["batch hash agrees", String(d.batch_hash_agrees)], ["data matches run", String(d.data_matches_run)],
        ["injected samples", inj ? `${inj} (marked)` : "none"]].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "–")]).flat()),
      d.notes.length ? h("ul", {}, d.notes.map(n => h("li", { class: "muted" }, n))) : "");
    main.append(h("h2", {}, "Samples"), table([
      { key: "batch_pos", label: "pos" }, { key: "rank" }, { key: "sample_id", label: "sample" }, { key: "loss" }, { key: "n_tokens", label: "tokens" },
      { key: "injected", fmt: v => v ? h("span", { class: "badge s-failed" }, "injected fault") : "" },
      { key: "docs", label: "documents / text", fmt: v => h("div", {}, (v || []).map(x => h("div", {}, h("b", {}, x.doc_id), x.domain ? ` (${x.domain})` : "", x.snippet ? h("div", { class: "snippet" }, x.snippet) : ""))) },
    ], d.samples, { id: "samples", rowClass: r => r.injected ? "injected" : null }));
    if (d.events.length) main.append(h("h2", {}, "Events at this step"), table([{ key: "kind" }, { key: "severity" }, { key: "rank" },
      { key: "detail", fmt: v => v && typeof v === "object" ? Object.entries(v).map(([k, x]) => `${k}=${Array.isArray(x) ? x.join(",") : x}`).join("  ") : (v || "") }], d.events, { id: "events" }));
  }

  // ------------------------------------------------------------------ spike
  async function pageSpike() {
    const rid = parts[1], sid = parts[2];
    const s = await api(`/api/runs/${enc(rid)}/spikes/${enc(sid)}`);
    const det = s.detail || {};
    main.innerHTML = "";
    const stepA = st => h("a", { href: `/step/${enc(s.run_id)}/${st}` }, String(st));
    main.append(h("h1", {}, `Spike ${s.spike_id} of `, runLink(s.run_id)),
      h("p", { id: "reason", class: s.severity === "malignant" ? "malignant" : "" }, `${s.class} · ${s.severity}: ${s.reason || ""}`),
      h("dl", { class: "kv" }, [["onset", stepA(s.onset_step)], ["peak", stepA(s.peak_step)], ["end", s.end_step], ["signal", s.signal], ["magnitude", fmt(s.magnitude)], ["baseline", fmt(s.baseline)],
        ["peak value", fmt(s.peak_value)], ["max z", fmt(s.max_z)], ["lead signal", s.lead_signal], ["top layer", s.top_layer]].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "–")]).flat()));
    const chart = h("div", { class: "chart", id: "chart" });
    main.append(h("h2", {}, "Around the episode"), chart);
    const lead = Math.max(20, (s.end_step - s.onset_step) * 2);
    try {
      const c = await api(`/api/runs/${enc(s.run_id)}/curve?col=${enc(s.signal || "loss")}&lo=${Math.max(1, s.onset_step - lead)}&hi=${s.end_step + lead}&points=2000`);
      P.line(chart, { xs: c.step, series: [{ label: s.signal || "loss", ys: c.y }], bands: [{ from: s.onset_step, to: s.end_step, severity: s.severity, label: `${s.class} · ${s.severity}` }], height: 260 });
    } catch (e) { fail(e); }
    if ((det.precursors || []).length) main.append(h("h2", {}, "Precursors"), table([{ key: "signal" }, { key: "step", fmt: v => stepA(v) }, { key: "lead_steps", label: "lead (steps)" }, { key: "z" }], det.precursors, { id: "precursors" }));
    if (det.layers) main.append(h("h2", {}, "Layers"), h("p", {}, `top: ${(det.layers.top || []).map(x => x.param || x).slice(0, 8).join(", ")}`, det.layers.note ? ` (${det.layers.note})` : ""));
    if (det.data) {
      main.append(h("h2", {}, "Data"), h("p", { id: "verdict" }, `verdict: ${det.data.verdict} — ${det.data.reason || ""}`));
      if ((det.data.samples || []).length) main.append(table([{ key: "sample_id", label: "sample" }, { key: "loss" }, { key: "z" }, { key: "doc_ids", label: "documents", fmt: v => (v || []).join(", ") }, { key: "text", fmt: v => h("div", { class: "snippet" }, (v || "").slice(0, 300)) }], det.data.samples, { id: "samples" }));
    }
    if ((det.faults || []).length) main.append(h("h2", {}, "Injected faults nearby"), table([{ key: "step", fmt: v => stepA(v) }, { key: "kind", fmt: (v, r) => v || (r.detail || {}).kind }, { key: "detail", fmt: v => v && typeof v === "object" ? Object.entries(v).filter(([k]) => k !== "sample_ids").map(([k, x]) => `${k}: ${Array.isArray(x) ? x.length + " values" : x}`).join(" · ") : (v || "") }], det.faults, { id: "faults" }));
  }

  // ------------------------------------------------------------------ evals
  async function pageEvals() {
    const rid = parts[1];
    const d = await api(`/api/runs/${enc(rid)}/evals`);
    main.innerHTML = "";
    main.append(h("h1", {}, "Evals of ", runLink(d.run_id)));
    const names = Object.keys(d.series);
    if (!names.length) { main.append(h("p", { class: "muted", id: "none" }, "no evaluations in the store (run `k2repro eval`)")); return; }
    const groups = {};
    names.forEach(m => { const g = m.startsWith("val/ppl/") ? "val/ppl per domain" : m; (groups[g] = groups[g] || []).push(m); });
    for (const [g, ms] of Object.entries(groups)) {
      const div = h("div", { class: "chart" }); main.append(h("h2", {}, g), div);
      const all = [...new Set(ms.flatMap(m => d.series[m].step))].sort((a, b) => a - b);
      P.line(div, { xs: all, xLabel: "checkpoint step", height: 220, series: ms.map(m => ({ label: m, ys: all.map(st => { const i = d.series[m].step.indexOf(st); return i < 0 ? null : d.series[m].value[i]; }) })) });
    }
    main.append(h("h2", {}, "All rows"), table([{ key: "step" }, { key: "metric" }, { key: "value" }, { key: "n_tokens" }, { key: "time" }], d.rows, { id: "evalrows" }));
  }

  // ------------------------------------------------------------------ sql
  async function pageSql() {
    main.innerHTML = "";
    const ta = h("textarea", { id: "query", spellcheck: "false" }, qs.get("q") || "SELECT run_id, name, status, started_at FROM runs ORDER BY started_at DESC");
    const out = h("div", { id: "result" }), dl = h("a", { id: "csv", hidden: true }, "download CSV");
    async function go() {
      out.innerHTML = ""; dl.hidden = true;
      const q = ta.value;
      try {
        const r = await api(`/api/sql?q=${enc(q)}&limit=1000`);
        const rows = r.rows.map(row => Object.fromEntries(r.columns.map((c, i) => [c, row[i]])));
        out.append(h("p", { class: "muted", id: "rowcount" }, `${r.rows.length} rows${r.truncated ? " (cut at the row limit)" : ""} in ${r.ms} ms`), table(r.columns.map(c => ({ key: c })), rows, { id: "sqltable" }));
        dl.href = `/api/sql?format=csv&limit=10000&q=${enc(q)}`; dl.hidden = false;
      } catch (e) { out.append(h("p", { class: "err", id: "error" }, String(e.message))); }
    }
    main.append(h("h1", {}, "SQL"), h("p", { class: "muted" }, "read-only (the allow-list and sandbox of `k2repro sql`), 10 s and 10,000 rows per query; tables in docs/audit-store.md"),
      ta, h("div", { class: "controls" }, h("button", { id: "run", onclick: go }, "run"), dl), out);
    ta.addEventListener("keydown", e => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) go(); });
    if (qs.get("q")) go();
  }

  const pages = { runs: pageRuns, run: pageRun, compare: pageCompare, layers: pageLayers, step: pageStep, spike: pageSpike, evals: pageEvals, sql: pageSql };
  const page = document.body.dataset.page;
  (pages[page] || pageRuns)().then(() => document.body.setAttribute("data-ready", "1"), e => { main.innerHTML = ""; fail(e); document.body.setAttribute("data-ready", "1"); });
})();
