"""The pipeline's train stage: train, write the loss curve DVC plots, keep the run.

DVC deletes a stage's outputs before it runs it, so the stage's own store (`pipeline/train`,
a cached DVC output: `dvc push/pull`, `dvc exp apply` and `dvc checkout` restore the run of
that revision) only ever holds the current experiment's run. Every experiment's run is also
kept in `runs/`, the store `k2repro runs`, `diff` and the UI read by default: a folder no
stage declares, so DVC never clears or checks it out, and runs made by `dvc exp run` sit next
to each other and next to runs made by hand. Files are hard-linked where the filesystem
allows (checkpoints cost no second copy) and copied elsewhere. The loss curve goes to
`reports/loss.csv`, tracked in git (`cache: false` outside any ignored folder), so that
`dvc plots diff A B` finds it in every experiment and revision.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("pipeline_stage")


def _link_tree(src: Path, dst: Path) -> int:
    """Hard-link (else copy) every file of `src` under `dst`; returns the number of files.
    A run already kept (a re-run of the same stage) is left as it is."""
    if dst.exists():
        return 0
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    n = 0
    for f in sorted(src.rglob("*")):
        target = tmp / f.relative_to(src)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)
        n += 1
    os.replace(tmp, dst)
    return n


def keep_runs(store: Path, keep: Path) -> list[str]:
    """Every run folder of `store` (its run id) also under `keep`; returns the ids kept now."""
    kept = []
    keep.mkdir(parents=True, exist_ok=True)
    for rd in sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (rd / "runs").is_dir() and _link_tree(rd, keep / rd.name):
            kept.append(rd.name)
    return kept


def train(params: str, store: Path, keep: Path, plot: Path) -> int:
    py = [sys.executable, "-m", "k2repro"]
    rc = subprocess.call([*py, "train", "--params", params])
    if rc != 0:
        return rc
    plot.parent.mkdir(parents=True, exist_ok=True)
    with plot.open("w") as fh:
        rc = subprocess.call([*py, "sql", "SELECT step, loss, grad_norm, lr FROM steps ORDER BY step",
                              "--store", str(store), "--csv"], stdout=fh)
    if rc != 0:
        return rc
    for rid in keep_runs(store, keep):
        print(f"run {rid} kept in {keep}/ (k2repro runs, k2repro diff see every experiment)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["train"])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--store", default="pipeline/train", help="the stage's store (its DVC output)")
    ap.add_argument("--keep", default="runs", help="the store every experiment's run is kept in")
    ap.add_argument("--plot", default="reports/loss.csv")
    a = ap.parse_args(argv)
    return train(a.params, Path(a.store), Path(a.keep), Path(a.plot))


if __name__ == "__main__":
    sys.exit(main())
