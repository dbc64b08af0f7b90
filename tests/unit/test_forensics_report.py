"""Reports: the HTML is well-formed, self-contained (plots inline, no external URL), the JSON
carries the spikes table's columns, the Markdown the impossible-analyses line, and the
`spikes` rows land in the store (replaced, not duplicated, on a rerun). Sample text comes
from real packed data made by the data pipeline."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

import k2repro
from k2repro.data.dedup import dedup
from k2repro.data.pack import pack
from k2repro.data.packed import PackedDataset
from k2repro.data.prepare import prepare
from k2repro.data.tokenizer import train_tokenizer
from k2repro.forensics.analyze import analyze_run
from k2repro.forensics.report import SPIKE_COLUMNS, to_json, write_reports, write_spike_rows
from k2repro.forensics.synthetic import InjectedSpike, SyntheticRun, write_run

REPO = Path(__file__).resolve().parents[2]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Checker(HTMLParser):
    """Tag balance, images and every URL-bearing attribute."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.imgs: list[str] = []
        self.urls: list[str] = []
        self.charts = 0
        self.scripts: list[dict] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        if tag == "div" and a.get("class") == "k2chart":
            self.charts += 1
        if tag == "script":
            self.scripts.append(a)
        for k in ("src", "href", "action", "data"):
            if a.get(k):
                self.urls.append(a[k])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):  # noqa: ANN001
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()

    def handle_data(self, data):  # noqa: ANN001
        self.text.append(data)


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("work")
    prepare(REPO / "data" / "sample", w / "prepared", max_docs=60, val_fraction=0.1)
    dedup(w / "prepared", w / "dedup")
    train_tokenizer(w / "dedup", w / "tokenizer", vocab_size=400, min_frequency=2)
    pack(w / "dedup", w / "tokenizer", w / "packed", seq_len=64)
    return w / "packed"


@pytest.fixture(scope="module")
def store(tmp_path_factory, packed: Path) -> Path:
    root = tmp_path_factory.mktemp("store")
    n = len(PackedDataset(packed, "train"))
    write_run(root, SyntheticRun(
        run_id="rep", n_steps=500, seed=11, batch=8, sample_id_mod=n,
        extra_hparams={"data.packed_dir": str(packed)},
        spikes=(InjectedSpike("bad_batch", 120), InjectedSpike("lr_spike", 300, size=50.0),
                InjectedSpike("nan", 460))))
    write_run(root, SyntheticRun(run_id="imp", n_steps=400, seed=12, loss_only=True,
                                 spikes=(InjectedSpike("bump", 200, size=0.8),)))
    return root


@pytest.fixture(scope="module")
def reports(store: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reports")
    s = k2repro.open_store(store)
    res = {rid: analyze_run(s, rid) for rid in ("rep", "imp")}
    paths = {rid: write_reports(r, out) for rid, r in res.items()}
    return {"res": res, "paths": paths, "out": out}


def test_html_is_well_formed_self_contained_with_plots(reports) -> None:
    html = reports["paths"]["rep"]["html"].read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    c = Checker()
    c.feed(html)
    c.close()
    assert c.errors == [] and c.stack == [], (c.errors, c.stack)
    # overview + per spike a zoom and (with layer stats) a heatmap
    n_spikes = len(reports["res"]["rep"].spikes)
    assert n_spikes == 3
    # charts (issue 20): overview + per spike a zoom and (with layer stats) a heatmap, drawn by the
    # inlined uPlot + plot.js from embedded JSON; no image, no script from elsewhere
    assert c.imgs == [] and c.charts >= 1 + 2 * n_spikes
    assert all("src" not in a for a in c.scripts), c.scripts
    specs = [json.loads(m) for m in re.findall(r'<script type="application/json">(.*?)</script>', html, re.S)]
    assert len(specs) == c.charts and {s["kind"] for s in specs} == {"line", "heat"}
    overview = specs[0]
    assert len(overview["bands"]) == n_spikes  # a marker per episode, however short
    assert [s["label"] for s in overview["series"]] == ["loss", "grad_norm"]  # grad norm in the legend
    assert overview["series"][1]["scale"] == "y2"  # on its own axis, not hidden behind the loss
    assert "uPlot" in html and "K2Plot" in html
    assert all(u.startswith(("data:", "#")) for u in c.urls), c.urls
    assert not re.search(r"https?://", html)
    heat = next(s for s in specs if s["kind"] == "heat")
    assert heat["data"]["params"] and len(heat["data"]["z"]) == len(heat["data"]["params"])


def test_report_shows_sample_text_doc_ids_and_features(reports) -> None:
    res = reports["res"]["rep"]
    sp = [s for s in res.spikes if s.data and s.data.verdict == "data"][0]
    top = sp.data.samples[0]
    assert top["doc_ids"] and top["text"].strip()
    assert {"tok_repeated_4gram_share", "tok_compression_ratio", "text_non_alpha_share"} <= set(top["features"])
    assert sp.data.batch_feature_median
    html = reports["paths"]["rep"]["html"].read_text(encoding="utf-8")
    assert top["doc_ids"][0] in html
    from html import escape

    assert escape(top["text"].strip().splitlines()[0][:30]) in html


def test_json_has_the_spikes_columns_and_is_strict(reports) -> None:
    obj = json.loads(reports["paths"]["rep"]["json"].read_text(encoding="utf-8"),
                     parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert obj["run_id"] == "rep"
    assert {"spikes", "impossible", "detectors", "notes"} <= set(obj)
    for s in obj["spikes"]:
        assert set(SPIKE_COLUMNS) <= set(s)
    classes = [s["class"] for s in obj["spikes"]]
    assert classes[-1] == "divergence" and obj["spikes"][-1]["magnitude"] is None
    assert to_json(reports["res"]["rep"])["spikes"] == obj["spikes"]


def test_urls_in_sample_text_do_not_become_urls_in_the_html(reports) -> None:
    from k2repro.forensics.report import to_html

    res = reports["res"]["rep"]
    sp = [s for s in res.spikes if s.data and s.data.verdict == "data"][0]
    saved = sp.data.samples[0].get("text")
    sp.data.samples[0]["text"] = "see https://example.org/x and http://example.com"
    try:
        html = to_html(res, plots=False)
    finally:
        sp.data.samples[0]["text"] = saved
    assert "example.org/x" in html
    assert not re.search(r"https?://", html)


def test_loss_only_report_lists_impossible_analyses(reports) -> None:
    obj = json.loads(reports["paths"]["imp"]["json"].read_text(encoding="utf-8"))
    assert len(obj["spikes"]) == 1
    assert any("layer_stats" in x for x in obj["impossible"])
    assert any("sample_stats" in x for x in obj["impossible"])
    md = reports["paths"]["imp"]["md"].read_text(encoding="utf-8")
    assert "## Not possible with this run's data" in md and "sample_stats" in md
    html = reports["paths"]["imp"]["html"].read_text(encoding="utf-8")
    assert "Not possible with this run" in html


def test_spike_rows_land_in_the_out_store_and_reruns_replace_them(reports, tmp_path: Path) -> None:
    res = reports["res"]["rep"]
    out_store = tmp_path / "forensics-store"
    write_spike_rows(res, out_store)
    write_spike_rows(res, out_store)
    df = k2repro.open_store(out_store).sql(
        "SELECT * FROM spikes WHERE run_id = ? ORDER BY spike_id", ["rep"])
    assert len(df) == len(res.spikes)
    assert df["onset_step"].tolist() == [s.episode.onset_step for s in res.spikes]
    assert df["class"].tolist() == [s.episode.cls for s in res.spikes]
    data_row = df[df["onset_step"] == 120].iloc[0]
    assert json.loads(data_row["top_samples"]) == res.spikes[0].top_samples != []
    assert json.loads(data_row["detail"])["data"]["verdict"] == "data"
