"""A training run that meets the machine, not bad input: an OSError (a folder that cannot be
made, a full disk) ends the run as failed with one scrubbed line, not a traceback that echoes
a credential from a path (found by the fault campaign's secrets and full-disk sections)."""

from __future__ import annotations

import re
from pathlib import Path

import k2repro
from tests.conftest import k2, tiny_overrides
from tests.integration.planted import SLACK


def test_an_os_error_is_one_scrubbed_line_and_a_failed_run(packed_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / f"ck-{SLACK}"
    blocker.write_text("a file where the checkpoint folder must go")
    store = tmp_path / "store"
    r = k2("train", *tiny_overrides(packed_dir, store, **{
        "train.max_steps": 6, "ckpt.interval": 3, "ckpt.dir": str(blocker / "sub")}))
    assert r.returncode == 1, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and SLACK not in r.stderr + r.stdout
    assert err[-1].startswith("k2repro train: error: NotADirectoryError"), err[-3:]
    rid = re.search(r"run_id=(\S+)", r.stdout).group(1)
    with k2repro.open_store(store) as s:
        assert s.run(rid)["status"] == "failed"
