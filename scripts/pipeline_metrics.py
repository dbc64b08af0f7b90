"""Gather the pipeline's headline numbers into reports/metrics.json (for `dvc metrics show`).

Reads only stage outputs: the train store, the eval and forensics stores, the packed manifest.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import k2repro
from k2repro.config.load import load_params_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="reports/metrics.json")
    ap.add_argument("--root", default="pipeline", help="the pipeline's stores (train/, eval/, forensics/)")
    args = ap.parse_args()
    cfg = load_params_file(args.params)
    root = Path(args.root)
    out: dict = {}
    with k2repro.open_store(root / "train") as s:
        run_id = s.resolve_run_id(cfg.run.name)
        st = s.sql("SELECT step, loss, tokens, step_time_s FROM steps WHERE run_id = ? ORDER BY step", [run_id])
        last = st.tail(10)
        out["train"] = {
            "run_id": run_id, "steps": int(st["step"].max()),
            "final_loss": float(last["loss"].mean()), "tokens": int(st["tokens"].sum()),
            "steps_per_s": float(len(st) / st["step_time_s"].sum()),
        }
    evals_root = root / "eval"
    if evals_root.exists():
        with k2repro.open_store(evals_root) as s:
            ev = s.sql("SELECT step, metric, value FROM evals WHERE run_id = ? ORDER BY step", [run_id])
        if len(ev):
            lastc = ev[ev["step"] == ev["step"].max()]
            vals = dict(zip(lastc["metric"], lastc["value"]))
            out["val"] = {"step": int(ev["step"].max()), "loss": vals.get("val/loss"), "ppl": vals.get("val/ppl"),
                          **{k.replace("val/ppl/", "ppl_"): v for k, v in vals.items() if k.startswith("val/ppl/")}}
    fx_root = root / "forensics"
    if fx_root.exists():
        with k2repro.open_store(fx_root) as s:
            sp = s.sql("SELECT onset_step, class, severity FROM spikes WHERE run_id = ?", [run_id])
        out["spikes"] = {"count": len(sp), "onsets": [int(x) for x in sp["onset_step"]]}
    manifest = json.loads((Path(cfg.data.packed_dir) / "manifest.json").read_text())
    dd = manifest.get("dedup", {})
    out["data"] = {"dedup_ratio": dd.get("dedup_ratio"), "train_tokens": manifest["splits"]["train"]["n_tokens"],
                   "val_tokens": manifest["splits"]["val"]["n_tokens"]}
    clean = json.loads(json.dumps(out, default=float), parse_constant=lambda c: None)
    if isinstance(clean.get("val", {}).get("loss"), float) and math.isnan(clean["val"]["loss"]):
        clean["val"]["loss"] = None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    print(f"metrics -> {args.out}")


if __name__ == "__main__":
    main()
