"""The UI in a real browser (Debian's Chromium through Playwright) on a store with a real
2-rank run that has the demo spike (faults=demo: half of step 200's batch replaced by random
tokens), found by `k2repro forensics`: the runs page lists it; a run that is training gains
steps on the page without a reload; the loss curve shades the spike at step 200 and hovering
it shows its value; a drag-zoom requests the new range; compare overlays two runs; the SQL
page returns rows and refuses COPY; the step page marks the injected samples; a heatmap cell
opens its step. Screenshots of every page go to reports/ui/ (docs/ui.md shows them).

One training launch serves the module (started first, so the live test watches it train)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from urllib.parse import parse_qs, urlparse

import pytest

from tests.conftest import REPO, k2, tiny_overrides
from tests.integration.test_replay import make_text_packed
from tests.ui.serve import Server

pytestmark = pytest.mark.browser

SHOTS = REPO / "reports" / "ui"
SPIKE_STEP = 200
STEPS = 220
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]
INSTALL = "apt-get install -y chromium (Debian; `make setup` does it) and pip install playwright (the dev extra)"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 2-rank training run (the demo fault at step 200) launched in the background, a
    synthetic reference run with evals beside it, and a `k2repro ui` server on the store."""
    from k2repro.audit.writer import append_table
    from k2repro.forensics.synthetic import SyntheticRun, write_run

    root = tmp_path_factory.mktemp("uibrowser")
    packed = make_text_packed(root / "data" / "packed")
    store = root / "store"
    args = tiny_overrides(packed, store, **{
        "parallel.nproc": 2, "train.max_steps": STEPS, "faults": "demo", "run.name": "ui-demo",
        "ckpt.interval": 100, "audit.flush_every": 5, "audit.layer_stats_every": 10})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "k2repro", "train", *args], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    write_run(store, SyntheticRun(run_id="reference", n_steps=STEPS, seed=5))
    append_table(store, "reference", "evals", {
        "step": [100, 200, 220] * 3, "metric": ["val/loss"] * 3 + ["val/ppl/prose"] * 3 + ["val/ppl/code"] * 3,
        "value": [3.2, 3.0, 2.95, 24.0, 20.1, 19.0, 30.0, 26.5, 25.1], "n_tokens": [512] * 9})
    srv = Server(store)
    w = {"root": root, "store": store, "proc": proc, "srv": srv, "t0": t0, "rid": None}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and w["rid"] is None:
        assert proc.poll() is None or proc.returncode == 0, proc.stderr.read()[-3000:]
        _, d = srv.json("/api/runs")
        live = [r for r in d["runs"] if r["run_id"] != "reference" and (r["steps"] or 0) >= 1]
        if live:
            w["rid"] = live[0]["run_id"]
        else:
            time.sleep(0.3)
    assert w["rid"], "the training run logged no step within 120 s"
    yield w
    if proc.poll() is None:
        proc.kill()
    srv.stop()


def finished(w: dict) -> dict:
    """Wait for the training to end, then run forensics into the store (once)."""
    if "spike" in w:
        return w
    out, err = w["proc"].communicate(timeout=300)
    assert w["proc"].returncode == 0, err[-3000:]
    w["train_s"] = time.monotonic() - w["t0"]
    f = k2("forensics", w["rid"], "--store", str(w["store"]), "--out", str(w["root"] / "rep"), "--json")
    assert f.returncode == 0, f.stderr[-2000:]
    spikes = json.loads(f.stdout)["spikes"]
    near = [s for s in spikes if abs(s["onset_step"] - SPIKE_STEP) <= 2]
    assert near, [s["onset_step"] for s in spikes]
    _, d = w["srv"].json(f"/api/runs/{w['rid']}/spikes")
    w["spike"] = next(s for s in d["spikes"] if abs(s["onset_step"] - SPIKE_STEP) <= 2)
    return w


@pytest.fixture(scope="module")
def browser():
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail(f"browser tests need Debian's Chromium on PATH: {INSTALL}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"browser tests need the playwright package: {INSTALL}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)  # the harness evaluates JS; the page keeps its CSP
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, errors


def open_page(pg, w: dict, path: str, shot: str | None = None) -> None:
    pg.goto(w["srv"].base + path)
    pg.wait_for_selector("body[data-ready='1']", timeout=30_000)
    assert pg.locator("#error").count() == 0, pg.locator("#error").inner_text()
    if shot:
        SHOTS.mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(SHOTS / f"{shot}.png"), full_page=True)


def chart_geometry(pg, x_value: float) -> dict:
    """CSS position of data x on the run chart, and the plot box."""
    return pg.evaluate("""(x) => { const u = document.getElementById('chart')._uplot, r = u.over.getBoundingClientRect();
        return {left: r.left + u.valToPos(x, 'x'), top: r.top, height: r.height, width: r.width, x0: r.left,
                cx: u.valToPos(x, 'x', true), bt: u.bbox.top, bh: u.bbox.height}; }""", x_value)


# ------------------------------------------------------------------ while it trains (first)
def test_a_training_run_gains_steps_without_a_reload(page, world) -> None:
    assert world["proc"].poll() is None, "the run finished before the live test could watch it"
    open_page(page, world, f"/run/{world['rid']}", shot="run-live")
    first = int(page.get_attribute("#chart", "data-last"))
    nav = []
    page.on("framenavigated", lambda f: nav.append(f.url))
    page.wait_for_function(f"+document.getElementById('chart').getAttribute('data-last') > {first}", timeout=60_000)
    assert int(page.get_attribute("#chart", "data-last")) > first
    assert nav == [] and "live" in page.inner_text("#live")


# ------------------------------------------------------------------ after it trained
def test_runs_page_lists_the_run(page, world) -> None:
    w = finished(world)
    open_page(page, w, "/", shot="runs")
    rows = page.locator("#runs tbody tr")
    assert rows.count() == 2
    text = page.inner_text("#runs")
    assert w["rid"] in text and "completed" in text and "reference" in text
    page.fill("#filter", "ui-demo")
    assert page.locator("#runs tbody tr").count() == 1


def test_run_page_shades_the_spike_at_step_200_and_hover_shows_its_value(page, world) -> None:
    w = finished(world)
    open_page(page, w, f"/run/{w['rid']}", shot="run")
    sp = w["spike"]
    assert page.locator("#spikes").inner_text().count(f"spike {sp['spike_id']}") == 1
    # the band: pixels of the plot column at the spike are tinted, a column far from it is white
    peak = sp["peak_step"]
    tint = page.evaluate("""([a, b]) => { const u = document.getElementById('chart')._uplot, c = u.ctx;
        const px = (x, y) => Array.from(c.getImageData(Math.round(u.valToPos(x, 'x', true)), Math.round(y), 1, 1).data);
        const ys = [0.55, 0.7, 0.85, 0.95].map(f => u.bbox.top + f * u.bbox.height);
        return {band: ys.map(y => px(a, y)), clear: ys.map(y => px(b, y))}; }""", [peak, 120])
    # (RGBA of the transparent chart canvas: the band is an orange/red fill of alpha >= 0.15)
    tinted = lambda p: p[3] >= 35 and p[0] - p[2] > 50  # noqa: E731
    assert sum(map(tinted, tint["band"])) >= 3, tint
    assert not any(map(tinted, tint["clear"])), tint
    # hover the peak: the tooltip names the step and its value, as the API has it
    _, c = w["srv"].json(f"/api/runs/{w['rid']}/curve?lo={peak}&hi={peak}")
    g = chart_geometry(page, peak)
    page.mouse.move(g["left"], g["top"] + g["height"] * 0.5)
    page.wait_for_function("document.getElementById('chart').hasAttribute('data-hover')")
    hover = page.get_attribute("#chart", "data-hover")
    assert f"step {peak}" in hover, hover
    shown = float(re.search(r"loss: (\S+)", hover).group(1))
    assert abs(shown - c["y"][0]) <= 1e-5 * abs(c["y"][0]), (shown, c["y"][0])
    assert "·" in hover and (sp["class"] in hover)  # the episode's class and severity
    assert page.is_visible("#tip")
    page.screenshot(path=str(SHOTS / "run-hover.png"))


def test_zoom_requests_the_selected_range(page, world) -> None:
    w = finished(world)
    open_page(page, w, f"/run/{w['rid']}")
    a, b = chart_geometry(page, 150), chart_geometry(page, 215)
    y = a["top"] + a["height"] * 0.5
    with page.expect_request(lambda r: "/curve?" in r.url and "lo=" in r.url) as req:
        page.mouse.move(a["left"], y)
        page.mouse.down()
        page.mouse.move((a["left"] + b["left"]) / 2, y, steps=4)
        page.mouse.move(b["left"], y, steps=4)
        page.mouse.up()
    q = parse_qs(urlparse(req.value.url).query)
    lo, hi = int(q["lo"][0]), int(q["hi"][0])
    assert abs(lo - 150) <= 3 and abs(hi - 215) <= 3, (lo, hi)
    page.wait_for_function(f"document.getElementById('chart').getAttribute('data-lo') == '{lo}'")
    assert int(page.get_attribute("#chart", "data-hi")) == hi
    page.screenshot(path=str(SHOTS / "run-zoom.png"))


def test_compare_overlays_two_runs(page, world) -> None:
    w = finished(world)
    open_page(page, w, f"/compare?runs={w['rid']},reference", shot="compare")
    assert page.get_attribute("#chart", "data-series") == "2"
    labels = page.evaluate("document.getElementById('chart')._uplot.series.slice(1).map(s => s.label)")
    assert labels == [w["rid"], "reference"]
    assert "first loss divergence" in page.inner_text("#diff")


def test_sql_page_returns_rows_and_refuses_copy(page, world) -> None:
    w = finished(world)
    open_page(page, w, "/sql")
    page.fill("#query", f"SELECT count(*) AS n, max(step) AS last FROM steps WHERE run_id = '{w['rid']}'")
    page.click("#run")
    page.wait_for_selector("#sqltable")
    assert page.locator("#sqltable tbody tr").inner_text().split() == [str(STEPS), str(STEPS)]
    assert page.get_attribute("#csv", "href").startswith("/api/sql?format=csv")
    page.fill("#query", "SELECT run_id, step, loss FROM steps ORDER BY loss DESC LIMIT 5")
    page.click("#run")
    page.wait_for_selector("#sqltable")
    page.click("#sqltable th[data-key='step']")  # sortable
    steps = [int(t) for t in page.locator("#sqltable tbody tr td:nth-child(2)").all_inner_texts()]
    assert steps == sorted(steps)
    page.screenshot(path=str(SHOTS / "sql.png"), full_page=True)
    page.fill("#query", "COPY steps TO 'stolen.csv'")
    page.click("#run")
    page.wait_for_selector("#error")
    assert "COPY statements are not allowed" in page.inner_text("#error")
    assert not (REPO / "stolen.csv").exists() and not (w["store"] / "stolen.csv").exists()


def test_step_page_shows_the_injected_samples(page, world) -> None:
    w = finished(world)
    open_page(page, w, f"/step/{w['rid']}/{SPIKE_STEP}", shot="step")
    assert page.locator("#samples tbody tr").count() == 8
    injected = page.locator("#samples tbody tr.injected")
    assert injected.count() == 4  # faults=demo: half of the batch
    assert injected.first.inner_text().count("injected fault") == 1
    assert page.locator("#events").inner_text().count("fault_injected") >= 1


def test_layers_heatmap_click_opens_that_step(page, world) -> None:
    w = finished(world)
    _, hm = w["srv"].json(f"/api/runs/{w['rid']}/layers")
    # layer stats every 10 steps: one bucket per logged step at most, so no empty stripes
    assert all(any(row[b] is not None for row in hm["z"]) for b in range(len(hm["bucket_start"])))
    open_page(page, w, f"/layers/{w['rid']}", shot="layers")
    box = page.locator("canvas.heat").bounding_box()
    page.mouse.click(box["x"] + 300 + (box["width"] - 310) * 0.5, box["y"] + 20)
    page.wait_for_url(re.compile(rf"/step/{re.escape(w['rid'])}/\d+$"))
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#samples tbody tr").count() == 8


def test_spike_and_evals_pages(page, world) -> None:
    w = finished(world)
    open_page(page, w, f"/spike/{w['rid']}/{w['spike']['spike_id']}", shot="spike")
    assert w["spike"]["class"] in page.inner_text("#reason")
    assert "[{" not in page.inner_text("main")  # faults nearby as a table, never raw JSON
    open_page(page, w, "/evals/reference", shot="evals")
    assert page.locator("#evalrows tbody tr").count() == 9
    assert page.locator(".chart canvas").count() >= 2


def test_offline_forensics_report_zooms_and_hovers_without_a_server(page, world) -> None:
    """The HTML report of `k2repro forensics`, opened as a file (no server): the same charts,
    inlined; the overview marks the episode at step 200 and hovering it shows its value."""
    w = finished(world)
    report = w["root"] / "rep" / w["rid"] / "forensics.html"
    page.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:") else route.continue_())
    page.goto(report.as_uri())
    page.wait_for_selector("div.k2chart[data-drawn='1'] canvas")
    assert page.locator("div.k2chart[data-drawn='1']").count() >= 3  # overview, zoom, heatmap
    box = page.locator("div.k2chart").first.locator("div").first
    g = page.evaluate("""(x) => { const el = document.querySelector('div.k2chart > div'), u = el._uplot,
        r = u.over.getBoundingClientRect(); return {left: r.left + u.valToPos(x, 'x'), top: r.top, h: r.height}; }""",
                      w["spike"]["peak_step"])
    page.mouse.move(g["left"], g["top"] + g["h"] * 0.5)
    page.wait_for_function("document.querySelector('div.k2chart > div').hasAttribute('data-hover')")
    hover = box.get_attribute("data-hover")
    assert "loss:" in hover and "step" in hover, hover
    page.screenshot(path=str(SHOTS / "report-forensics.png"), full_page=False)


def test_a_100_step_episode_of_a_240k_step_run_is_visible(page) -> None:
    """The reader's complaint about the old overview: on 240,000 steps a 100-step band is a
    fraction of a pixel. The shared charts draw every episode at least 4 px wide with a marker."""
    from k2repro.forensics.plots import assets_html, plot_script

    page.set_content(f"<html><head>{assets_html()}</head><body><div id='c' style='width:1000px'></div>"
                     f"{plot_script()}</body></html>")
    page.evaluate("""() => {
        const xs = [], ys = []; for (let s = 1; s <= 240000; s += 120) { xs.push(s); ys.push(xs.length === 1 ? 0 : 3); }
        K2Plot.line(document.getElementById('c'), {xs, series: [{label: 'loss', ys}],
                    bands: [{from: 120000, to: 120100, severity: 'malignant', label: 'slow'}]}); }""")
    page.wait_for_timeout(200)  # uPlot sizes and draws on its next frame
    cols = page.evaluate("""() => { const el = document.getElementById('c'), u = el._uplot, c = u.ctx, y = Math.round(u.bbox.top + 0.6 * u.bbox.height), x0 = Math.round(u.valToPos(120050, 'x', true));
        const tinted = dx => { const p = c.getImageData(x0 + dx, y, 1, 1).data; return p[3] >= 35 && p[0] - p[2] > 50; };
        const mark = c.getImageData(x0, Math.round(u.bbox.top + 2), 1, 1).data;
        let w = 0; for (let dx = -10; dx <= 10; dx++) if (tinted(dx)) w++;
        return {w, dpr: devicePixelRatio, mark: Array.from(mark), far: tinted(-200)}; }""")
    assert cols["w"] >= 4 * cols["dpr"] - 1 and not cols["far"], cols
    assert cols["mark"][3] > 200, cols  # the marker on top of the band
