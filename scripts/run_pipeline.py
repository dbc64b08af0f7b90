"""`make run`: the whole DVC pipeline on the bundled sample corpus, with progress, then where
the report and the store are.

Runs `dvc repro` in this checkout (a git repo with DVC initialised). DVC's analytics are off in
.dvc/config and DVC_NO_ANALYTICS=1 is set, so nothing tries the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    venv_bin = Path(sys.executable).parent
    env = dict(os.environ, DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    (REPO / "reports" / "pipeline").mkdir(parents=True, exist_ok=True)
    if not (REPO / ".git").exists():
        print("make run needs a git checkout (DVC tracks the pipeline in git)", file=sys.stderr)
        return 2
    t0 = time.time()
    print("== dvc repro (stages: prepare, dedup, tokenize, pack, train, eval, forensics, metrics)", flush=True)
    rc = subprocess.call([str(venv_bin / "dvc"), "repro", *sys.argv[1:]], cwd=REPO, env=env)
    if rc != 0:
        print(f"dvc repro failed (exit {rc})", file=sys.stderr)
        return rc
    metrics = REPO / "reports" / "metrics.json"
    print(f"\n== done in {time.time() - t0:.0f} s")
    if metrics.exists():
        m = json.loads(metrics.read_text())
        print(json.dumps(m, indent=2))
        run_id = m.get("train", {}).get("run_id", "")
        print(f"\nrun report:       reports/pipeline/report/{run_id}/report.html")
        print(f"forensics report: reports/pipeline/forensics/{run_id}/forensics.html")
    print("audit store:      runs (every experiment's run; try: .venv/bin/k2repro runs), this revision's: pipeline/train")
    print("metrics:          reports/metrics.json (dvc metrics show), loss curve: dvc plots show")
    print("browse it:        .venv/bin/k2repro ui --store pipeline   (then open http://127.0.0.1:8050/)")
    print("The demo config injects one known bad batch (faults.bad_batch_steps in conf/faults/demo.yaml);"
          " `dvc exp run -S faults=none` turns it off.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
