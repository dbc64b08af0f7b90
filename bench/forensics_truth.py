"""The labelled forensics benchmark: realistic generated logs with known spikes, and real
public logs with none, put through the real `k2repro import` and the real forensics, scored
for k2repro and for the built-in guards of OLMo-core, llm-foundry and Megatron-LM.

    .venv/bin/python bench/forensics_truth.py [--quick] [--seed 0] [--out PATH] [--keep DIR]

Per category (`k2repro.forensics.realistic_categories.CATEGORIES`, plus `real`): each log is written
as a W&B chart CSV (one row per logged point; a restart branch is a second W&B run of the
same file), imported with `k2repro import wandb-csv` into a temporary store, and analysed
with `analyze_run` + `report.to_json` (what `k2repro forensics RUN --json` prints). The
peers' rules (`k2repro.forensics.peers`) run on the same imported points.

Scoring (the `definitions` key of the output says the same):
- a labelled spike counts only where the logged points can show it (`visible`; the others
  are counted as `invisible`);
- found: an episode of the same signal on the same tracker run whose onset is within 2
  logged points of the labelled onset (one episode per spike, nearest first);
- `fp_normal`: an unmatched episode whose onset lies outside every labelled spike (from 2
  points before its onset to 2 points after its end): an episode opened on normal loss;
  `extra`: an unmatched episode inside a labelled spike (a second episode of one incident,
  or the grad-norm view of a loss spike); extras are reported, not counted in F1;
- F1 from found / missed / fp_normal; a category without labelled spikes has F1 1 with no
  fp_normal and 0 otherwise;
- baselines (k2repro only): non-positive (or missing) for a loss episode, or implausible:
  more than max(6 noise sigmas, 5%) away from the noise-free level at onset (generated
  logs), outside the run's range of values (real logs);
- severity and class right: among found spikes, equal to the label;
- the record (not a goal): spikes without `reason` or `signal`, `excess` other than
  peak - baseline, `magnitude` other than peak / baseline.
Output: reports/bench/forensics_truth.json (`--out` elsewhere; `--quick` is the small set
the unit test runs and is not written to reports/ unless --out says so).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
REAL_LOGS = REPO / "tests" / "data" / "real-logs"
MATCH_POINTS = 2
PEERS = ("olmo_core", "llm_foundry", "megatron")
DETECTORS = ("k2repro", *PEERS)

GOALS = {
    "recall": ">= 0.95, onset within 2 logged points",
    "fp_normal": "0 episodes opened on normal loss",
    "bad_baselines": "0 non-positive or implausible baselines",
    "severity_accuracy": ">= 0.9",
    "f1_vs_peers": "k2repro F1 >= each peer's in every category, strictly higher overall",
}


# ----------------------------------------------------------------------------- scoring

@dataclass
class Found:
    """An episode, ours or a peer's, reduced to what scoring needs."""

    onset_step: int
    end_step: int
    signal: str = "loss"
    cls: str | None = None
    severity: str | None = None
    baseline: float | None = None


@dataclass
class Truth:
    onset_step: int
    end_step: int
    signal: str
    cls: str
    severity: str
    visible: bool = True
    kind: str = ""


@dataclass
class Tally:
    """Counts of one detector over some logs."""

    n_true: int = 0
    invisible: int = 0
    found: int = 0
    fp_normal: int = 0
    extra: int = 0
    episodes: int = 0
    onset_err_steps: list[int] = field(default_factory=list)
    onset_err_points: list[int] = field(default_factory=list)
    severity_right: int = 0
    class_right: int = 0
    baselines_nonpositive: int = 0
    baselines_implausible: int = 0
    # the record (k2repro only): spikes without the keys issue 18 adds, or inconsistent ones
    no_reason: int = 0
    no_signal: int = 0
    excess_mismatch: int = 0
    magnitude_mismatch: int = 0
    missed: list[dict] = field(default_factory=list)
    fp_where: list[dict] = field(default_factory=list)

    def add(self, o: Tally) -> None:
        for k in ("n_true", "invisible", "found", "fp_normal", "extra", "episodes",
                  "severity_right", "class_right", "baselines_nonpositive", "baselines_implausible",
                  "no_reason", "no_signal", "excess_mismatch", "magnitude_mismatch"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        self.onset_err_steps += o.onset_err_steps
        self.onset_err_points += o.onset_err_points
        self.missed += o.missed
        self.fp_where += o.fp_where

    def summary(self, with_severity: bool) -> dict[str, Any]:
        recall = self.found / self.n_true if self.n_true else None
        denom = self.found + self.fp_normal
        precision = self.found / denom if denom else None
        if self.n_true == 0:
            f1 = 1.0 if self.fp_normal == 0 else 0.0
        elif self.found == 0:
            f1 = 0.0
        else:
            f1 = 2 * precision * recall / (precision + recall)
        out: dict[str, Any] = {
            "n_true": self.n_true, "invisible": self.invisible, "found": self.found,
            "missed": self.n_true - self.found, "fp_normal": self.fp_normal, "extra": self.extra,
            "episodes": self.episodes, "recall": _r(recall), "precision": _r(precision), "f1": _r(f1),
            "onset_error_steps": _dist(self.onset_err_steps),
            "onset_error_points": _dist(self.onset_err_points),
            "missed_examples": self.missed[:5], "fp_examples": self.fp_where[:5],
        }
        if with_severity:
            out.update({
                "severity_accuracy": _r(self.severity_right / self.found) if self.found else None,
                "class_accuracy": _r(self.class_right / self.found) if self.found else None,
                "baselines_nonpositive": self.baselines_nonpositive,
                "baselines_implausible": self.baselines_implausible,
                "record": {"no_reason": self.no_reason, "no_signal": self.no_signal,
                           "excess_not_peak_minus_baseline": self.excess_mismatch,
                           "magnitude_not_peak_over_baseline": self.magnitude_mismatch},
            })
        return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


def _dist(v: list[int]) -> dict[str, Any] | None:
    if not v:
        return None
    a = np.asarray(v, dtype=np.float64)
    return {"median": float(np.median(a)), "max": float(a.max()), "mean": round(float(a.mean()), 2)}


def score_run(points: np.ndarray, truths: Iterable[Truth], found: Iterable[Found],
              clean: Any = None, value_range: tuple[float, float] | None = None,
              where: str = "", with_baselines: bool = False) -> Tally:
    """Score one detector's episodes on one tracker run against its labels.

    `points`: the run's logged steps (sorted); `clean(step) -> (level, sigma)` gives the
    noise-free level for the baseline check (generated logs); `value_range` the run's range
    of values (real logs)."""
    pts = np.asarray(points, dtype=np.int64)
    t_all = list(truths)
    eps = list(found)
    t = Tally(episodes=len(eps))

    def idx(step: int) -> int:
        return int(np.searchsorted(pts, step, side="left"))

    vis = [x for x in t_all if x.visible]
    t.n_true = len(vis)
    t.invisible = len(t_all) - len(vis)
    pairs = []
    for i, tr in enumerate(vis):
        ti = idx(tr.onset_step)
        for j, ep in enumerate(eps):
            if ep.signal != tr.signal:
                continue
            d = abs(idx(ep.onset_step) - ti)
            if d <= MATCH_POINTS:
                pairs.append((d, abs(ep.onset_step - tr.onset_step), i, j))
    used_t: set[int] = set()
    used_e: set[int] = set()
    for d, ds, i, j in sorted(pairs):
        if i in used_t or j in used_e:
            continue
        used_t.add(i)
        used_e.add(j)
        tr, ep = vis[i], eps[j]
        t.found += 1
        t.onset_err_steps.append(int(ds))
        t.onset_err_points.append(int(d))
        t.severity_right += int(ep.severity == tr.severity)
        t.class_right += int(ep.cls == tr.cls)
    for i, tr in enumerate(vis):
        if i not in used_t:
            t.missed.append({"where": where, "onset_step": tr.onset_step, "kind": tr.kind,
                             "signal": tr.signal})
    for j, ep in enumerate(eps):
        if j in used_e:
            continue
        ei = idx(ep.onset_step)
        inside = any(idx(x.onset_step) - MATCH_POINTS <= ei <= idx(max(x.end_step, x.onset_step)) + MATCH_POINTS
                     for x in t_all)
        if inside:
            t.extra += 1
        else:
            t.fp_normal += 1
            t.fp_where.append({"where": where, "onset_step": ep.onset_step, "signal": ep.signal,
                               "class": ep.cls, "severity": ep.severity, "baseline": ep.baseline})
    if with_baselines:
        for ep in eps:
            b = ep.baseline
            if ep.signal in ("loss", "grad_norm") and (b is None or not math.isfinite(b) or b <= 0):
                t.baselines_nonpositive += 1
                continue
            if ep.signal != "loss" or b is None:
                continue
            if clean is not None:
                level, sigma = clean(ep.onset_step)
                if abs(b - level) > max(6.0 * sigma, 0.05 * level):
                    t.baselines_implausible += 1
            elif value_range is not None and not value_range[0] <= b <= value_range[1]:
                t.baselines_implausible += 1
    return t


def check_record(obj: dict, t: Tally) -> None:
    """Count spikes whose record lacks `reason`/`signal` or whose `excess`/`magnitude` do
    not equal peak - baseline / peak / baseline (where both are finite)."""
    for s in obj.get("spikes", []):
        t.no_reason += int(not (isinstance(s.get("reason"), str) and s["reason"].strip()))
        t.no_signal += int(not s.get("signal"))
        pk, b = s.get("peak_value"), s.get("baseline")
        if isinstance(pk, (int, float)) and isinstance(b, (int, float)):
            ex, mag = s.get("excess"), s.get("magnitude")
            if isinstance(ex, (int, float)) and not math.isclose(ex, pk - b, rel_tol=1e-6, abs_tol=1e-9):
                t.excess_mismatch += 1
            if b and isinstance(mag, (int, float)) and not math.isclose(mag, pk / b, rel_tol=1e-6):
                t.magnitude_mismatch += 1


def ours_from_json(obj: dict) -> list[Found]:
    """k2repro's episodes from the report object (`signal` defaults to loss)."""
    return [Found(int(s["onset_step"]), int(s["end_step"]), s.get("signal") or "loss",
                  s.get("class"), s.get("severity"), s.get("baseline")) for s in obj.get("spikes", [])]


# ----------------------------------------------------------------------------- files

def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NaN"
    return repr(float(v))


def write_wandb_csv(path: Path, log: Any) -> dict[str, str]:
    """The log as a W&B chart export: one row per logged step of any run, one column group
    per run and metric, empty cells where a run has no point. Returns W&B run name -> label."""
    names = {f"{log.name}-{r.label}": r.label for r in log.runs}
    cols = ['"Step"']
    for wb, lab in names.items():
        r = log.run(lab)
        cols.append(f'"{wb} - train/loss"')
        if r.loss_min is not None:
            cols += [f'"{wb} - train/loss__MIN"', f'"{wb} - train/loss__MAX"']
        cols.append(f'"{wb} - train/grad_norm"')
    all_steps = np.unique(np.concatenate([r.steps for r in log.runs]))
    rows: dict[int, list[str]] = {int(s): [] for s in all_steps}
    for _wb, lab in names.items():
        r = log.run(lab)
        pos = {int(s): i for i, s in enumerate(r.steps)}
        width = 4 if r.loss_min is not None else 2
        for s in all_steps:
            i = pos.get(int(s))
            if i is None:
                rows[int(s)] += [""] * width
                continue
            cells = [_fmt(r.loss[i])]
            if r.loss_min is not None:
                cells += [_fmt(r.loss_min[i]), _fmt(r.loss_max[i])]
            cells.append(_fmt(r.grad_norm[i]))
            rows[int(s)] += cells
    with open(path, "w") as f:
        f.write(",".join(cols) + "\n")
        for s, cells in rows.items():
            f.write(",".join([f'"{s}"'] + [f'"{c}"' if c else '""' for c in cells]) + "\n")
    return names


def k2_import(path: Path, store: Path, name: str, run: str | None = None) -> dict[str, str]:
    """`k2repro import wandb-csv PATH --store STORE --json [--run RUN]` in this process;
    returns W&B run name -> run_id. Raises RuntimeError with the command's stderr when it
    fails."""
    from k2repro.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    argv = ["import", "wandb-csv", str(path), "--store", str(store), "--json", "--name", name]
    if run is not None:
        argv += ["--run", run]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"k2repro import {path.name} exited {rc}: {err.getvalue().strip()}")
    obj = json.loads(out.getvalue())
    return {r["source_run"]: r["run_id"] for r in obj["runs"]}


def analyse(store: Any, run_id: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The forensics report object and the series it analysed."""
    from k2repro.forensics.analyze import ForensicsParams, analyze_run
    from k2repro.forensics.report import to_json

    res = analyze_run(store, run_id, ForensicsParams())
    return to_json(res), res.series


def peers_on(series: dict[str, np.ndarray]) -> dict[str, list[Found]]:
    from k2repro.forensics.peers import run_peers

    st = np.asarray(series["step"], dtype=np.int64)
    sig: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in ("loss", "grad_norm"):
        v = series.get(name)
        if v is not None and np.asarray(v).size and np.isfinite(np.asarray(v, dtype=np.float64)).any():
            sig[name] = (st, np.asarray(v, dtype=np.float64))
    res = run_peers(sig)
    return {p: [Found(e.onset_step, e.end_step, e.signal) for e in eps] for p, eps in res.items()}


# ----------------------------------------------------------------------------- the run

def bench_generated(category: str, seed: int, quick: bool, work: Path, store: Path | None = None
                    ) -> tuple[dict[str, Tally], list[dict]]:
    """Import and score every log of one generated category (into the store at `store`,
    default WORK/store)."""
    import k2repro
    from k2repro.forensics.realistic_categories import category_logs

    tallies = {d: Tally() for d in DETECTORS}
    per_log = []
    store_root = store or work / "store"
    logs = category_logs(category, seed=seed, quick=quick)
    imported = []
    for log in logs:
        path = work / f"{log.name}.csv"
        names = write_wandb_csv(path, log)
        imported.append((names, k2_import(path, store_root, log.name)))
    st = k2repro.open_store(str(store_root))  # once: opening costs a quarter second
    for log, (names, ids) in zip(logs, imported, strict=True):
        row: dict[str, Any] = {"log": log.name, "sampling": log.sampling,
                               "labels": [s.to_dict() for s in log.spikes], "runs": {}}
        for wb, lab in names.items():
            r = log.run(lab)
            obj, series = analyse(st, ids[wb])
            truths = [Truth(s.onset_step, s.end_step, s.signal, s.cls, s.severity, s.visible, s.kind)
                      for s in log.spikes if s.run == lab]
            pts = np.asarray(series["step"], dtype=np.int64)

            def clean_at(step: int, r: Any = r) -> tuple[float, float]:
                # the noise-free level at the last logged point before onset, earlier
                # spikes' excess included (a spike on a level shift sits on the new level)
                i = min(max(int(np.searchsorted(r.steps, step)) - 1, 0), r.steps.size - 1)
                lv = r.level if r.level.size else r.clean
                return float(lv[i]), float(r.sigma[i])

            where = f"{log.name}/{lab}"
            if not _same_points(series, r):
                MISMATCHES.append(where)
            ours = ours_from_json(obj)
            t = score_run(pts, truths, ours, clean=clean_at, where=where, with_baselines=True)
            check_record(obj, t)
            tallies["k2repro"].add(t)
            pe = peers_on(series)
            for p in PEERS:
                tallies[p].add(score_run(pts, truths, pe[p], where=where))
            row["runs"][lab] = {
                "points": int(pts.size),
                "k2repro": [{"onset_step": e.onset_step, "end_step": e.end_step, "signal": e.signal,
                             "class": e.cls, "severity": e.severity,
                             "baseline": None if e.baseline is None else round(e.baseline, 5)}
                            for e in ours[:20]],
                "n_k2repro": len(ours),
                **{f"n_{p}": len(pe[p]) for p in PEERS},
            }
        per_log.append(row)
    return tallies, per_log


#: tracker runs whose imported points differ from the generated ones (must stay empty: the
#: benchmark scores what the import made of the file, which must be the generated log)
MISMATCHES: list[str] = []


def _same_points(series: dict[str, np.ndarray], r: Any) -> bool:
    """Steps, loss and grad norm as imported equal the generated log (logged NaNs included)."""
    st = np.asarray(series["step"], dtype=np.int64)
    if st.shape != r.steps.shape or not np.array_equal(st, r.steps):
        return False
    for name, want in (("loss", r.loss), ("grad_norm", r.grad_norm)):
        got = np.asarray(series.get(name), dtype=np.float64)
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-12, atol=0.0, equal_nan=True):
            return False
    return True


def real_labels() -> dict[str, list[dict]]:
    """File name -> labelled spikes of the shipped real logs (tests/data/real-logs/labels.json,
    where each label is justified). A CSV without an entry there is refused: a real log is
    scored only against labels someone wrote down."""
    obj = json.loads((REAL_LOGS / "labels.json").read_text())
    return {name: list(v.get("spikes", [])) for name, v in obj["files"].items()}


def bench_real(work: Path, max_runs: int | None = None, store: Path | None = None
               ) -> tuple[dict[str, Tally], list[dict]]:
    """The shipped real logs, scored against their labels (today all clean curves: every
    episode on them is a false positive).
    `max_runs`: import and analyse only that many tracker runs per file, the longest (quick
    mode)."""
    import k2repro

    tallies = {d: Tally() for d in DETECTORS}
    per_log = []
    store_root = store or work / "store"
    files = sorted(REAL_LOGS.glob("*.csv"))
    labels = real_labels()
    unlabelled = [p.name for p in files if p.name not in labels]
    if unlabelled:
        raise ValueError(f"{REAL_LOGS.name}/labels.json has no entry for {', '.join(unlabelled)}")
    all_ids = []
    for path in files:
        if max_runs is None:
            all_ids.append(k2_import(path, store_root, path.stem))
            continue
        # the longest runs only, each imported with --run (writing 37 runs costs seconds)
        pts = _points_per_run(path)
        ids: dict[str, str] = {}
        for wb in sorted(pts, key=lambda k: -pts[k])[:max_runs]:
            ids.update(k2_import(path, store_root, path.stem, run=wb))
        all_ids.append(ids)
    st = k2repro.open_store(str(store_root))
    for path, ids in zip(files, all_ids, strict=True):
        n_ours = {p: 0 for p in DETECTORS}
        chosen = list(ids.items())
        for wb, rid in chosen:
            obj, series = analyse(st, rid)
            pts = np.asarray(series["step"], dtype=np.int64)
            v = np.asarray(series.get("loss"), dtype=np.float64)
            fin = v[np.isfinite(v)]
            rng = (float(fin.min()), float(fin.max())) if fin.size else None
            ours = ours_from_json(obj)
            where = f"{path.name}/{wb}"
            truths = [Truth(int(x["onset_step"]), int(x["end_step"]), x.get("signal", "loss"),
                            x["class"], x["severity"], kind=x.get("kind", "real"))
                      for x in labels[path.name] if x.get("run") in (None, wb)]
            t = score_run(pts, truths, ours, value_range=rng, where=where, with_baselines=True)
            check_record(obj, t)
            tallies["k2repro"].add(t)
            pe = peers_on(series)
            for p in PEERS:
                tallies[p].add(score_run(pts, truths, pe[p], where=where))
            n_ours["k2repro"] += len(ours)
            for p in PEERS:
                n_ours[p] += len(pe[p])
        per_log.append({"log": path.name, "runs": len(_points_per_run(path)), "analysed": len(chosen),
                        "episodes": n_ours})
    return tallies, per_log


def _points_per_run(path: Path) -> dict[str, int]:
    """W&B run name -> number of points it has in the export."""
    import csv

    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows)
        cols = {i: c.rsplit(" - ", 1)[0] for i, c in enumerate(header)
                if i and " - " in c and not c.endswith(("__MIN", "__MAX"))}
        out = dict.fromkeys(cols.values(), 0)
        for row in rows:
            for i, run in cols.items():
                if i < len(row) and row[i] != "":
                    out[run] += 1
    return out


def goals(cats: dict[str, dict[str, Any]], overall: dict[str, Any]) -> dict[str, Any]:
    """Each goal with its measured value and whether it is met."""
    k = overall["k2repro"]
    worse = []
    for c, d in cats.items():
        for p in PEERS:
            if d["k2repro"]["f1"] is not None and d[p]["f1"] is not None and d["k2repro"]["f1"] < d[p]["f1"]:
                worse.append(f"{c}: k2repro {d['k2repro']['f1']} < {p} {d[p]['f1']}")
    strictly = all(k["f1"] is not None and overall[p]["f1"] is not None and k["f1"] > overall[p]["f1"]
                   for p in PEERS)
    bad = k["baselines_nonpositive"] + k["baselines_implausible"]
    return {
        "recall": {"value": k["recall"], "met": k["recall"] is not None and k["recall"] >= 0.95},
        "fp_normal": {"value": k["fp_normal"], "met": k["fp_normal"] == 0},
        "bad_baselines": {"value": bad, "met": bad == 0},
        "severity_accuracy": {"value": k["severity_accuracy"],
                              "met": k["severity_accuracy"] is not None and k["severity_accuracy"] >= 0.9},
        "f1_vs_peers": {"value": {"k2repro": k["f1"], **{p: overall[p]["f1"] for p in PEERS}},
                        "categories_where_a_peer_is_better": worse,
                        "met": not worse and strictly},
    }


def run_benchmark(quick: bool = False, seed: int = 0, keep: Path | None = None,
                  categories: tuple[str, ...] | None = None, real: bool = True) -> dict[str, Any]:
    """The whole benchmark; returns the report object."""
    from k2repro.forensics.realistic_categories import CATEGORIES

    t0 = time.perf_counter()
    MISMATCHES.clear()
    tmp = Path(tempfile.mkdtemp(prefix="k2-truth-")) if keep is None else keep
    tmp.mkdir(parents=True, exist_ok=True)
    cats: dict[str, dict[str, Any]] = {}
    logs: dict[str, list[dict]] = {}
    total = {d: Tally() for d in DETECTORS}
    try:
        for c in categories or CATEGORIES:
            work = tmp / c
            work.mkdir(parents=True, exist_ok=True)
            t1 = time.perf_counter()
            tallies, per_log = bench_generated(c, seed, quick, work)
            cats[c] = {d: tallies[d].summary(d == "k2repro") for d in DETECTORS}
            cats[c]["wall_s"] = round(time.perf_counter() - t1, 2)
            logs[c] = per_log
            for d in DETECTORS:
                total[d].add(tallies[d])
        if real and REAL_LOGS.is_dir() and any(REAL_LOGS.glob("*.csv")):
            work = tmp / "real"
            work.mkdir(parents=True, exist_ok=True)
            t1 = time.perf_counter()
            tallies, per_log = bench_real(work, max_runs=1 if quick else None)
            cats["real"] = {d: tallies[d].summary(d == "k2repro") for d in DETECTORS}
            cats["real"]["wall_s"] = round(time.perf_counter() - t1, 2)
            logs["real"] = per_log
            for d in DETECTORS:
                total[d].add(tallies[d])
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    overall = {d: total[d].summary(d == "k2repro") for d in DETECTORS}
    return {
        "bench": "forensics_truth", "quick": quick, "seed": seed,
        "wall_s": round(time.perf_counter() - t0, 2),
        "definitions": {"match": f"same signal, same run, onset within {MATCH_POINTS} logged points",
                        "fp_normal": "unmatched episode outside every labelled spike (+-2 points)",
                        "extra": "unmatched episode inside a labelled spike; not in F1",
                        "f1_without_labels": "1 if no fp_normal else 0",
                        "implausible_baseline": "more than max(6 sigma, 5%) from the noise-free "
                                                "level at onset (generated), outside the run's "
                                                "value range (real)"},
        "import_mismatches": list(MISMATCHES),
        "goals_wanted": GOALS,
        "goals": goals(cats, overall),
        "overall": overall,
        "categories": cats,
        "logs": logs,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small set (the unit test's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output JSON (default reports/bench/forensics_truth.json)")
    ap.add_argument("--keep", default=None, help="keep the generated CSVs and store in this folder")
    args = ap.parse_args(argv)
    rep = run_benchmark(quick=args.quick, seed=args.seed,
                        keep=Path(args.keep) if args.keep else None)
    from bench._common import OUT, machine

    out = Path(args.out) if args.out else OUT / "forensics_truth.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), **rep}, indent=1, sort_keys=True) + "\n")
    brief = {c: {"wall_s": v["wall_s"], **{d: {k: v[d][k] for k in ("recall", "f1", "fp_normal")}
                                           for d in DETECTORS}}
             for c, v in rep["categories"].items()}
    print(json.dumps({"goals": rep["goals"], "categories": brief, "wall_s": rep["wall_s"]}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
