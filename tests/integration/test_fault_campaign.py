"""The small fault campaign of `make test` (issue 11): 3 SIGKILLs with resumes and 5 bad inputs,
through the same script as `make faults` (scripts/fault_campaign.py), with real processes and
files. Then the campaign's own checker is shown to fail on a store with a duplicated segment,
so that its "survived" counts mean something."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
SCRIPT = REPO / "scripts" / "fault_campaign.py"


def _campaign_module():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("fault_campaign", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("faults")
    work = out / "work"
    r = subprocess.run([sys.executable, str(SCRIPT), "--kills", "3", "--bad-inputs", "5", "--nproc", "1",
                        "--steps", "32", "--sections", "kills,inputs", "--out", str(out), "--work", str(work)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"res": json.loads((out / "reliability.json").read_text()), "md": (out / "reliability.md").read_text(),
            "work": work, "log": r.stdout}


def test_three_kills_survive_with_nothing_lost(small: dict) -> None:
    k = small["res"]["kills"]
    c = k["counts"]
    assert c["kills"] == 3
    assert c["fired"] == c["store_opened"] == c["rows_once"] == c["ckpt_ok"] == 3, k["kills"]
    assert c["resumed_bit_identical"] == 3 and c["survived"] == 3, k["kills"]
    for rec in k["kills"]:
        assert rec["status"] == "crashed" and rec["resume"]["steps_compared"] > 0 and rec["resume"]["lineage_ok"]
        assert rec["lost_steps"] <= k["config"]["flush_every"]
    assert all(f["completed"] for f in k["finals"])
    assert "| 3 / 3 | **all of the above** |" in small["md"]


def test_five_bad_inputs_exit_2_and_write_nothing(small: dict) -> None:
    inp = small["res"]["inputs"]
    assert inp["total"] == 5
    assert {c["area"] for c in inp["cases"]} == {"cli", "config", "import", "sql"}
    for c in inp["cases"]:
        assert c["rc"] == c["expected_rc"] == 2, c
        assert c["nothing_written"] and c["hash_before"] == c["hash_after"], c
        assert c["message"] and not c["traceback"], c
    assert inp["ok"] == 5
    assert str(small["work"]) not in small["md"] and str(REPO) not in small["md"]  # no paths of this machine


def test_the_checker_fails_on_a_duplicated_segment(small: dict) -> None:
    fc = _campaign_module()
    store = small["work"] / "kills" / "store"
    ref = small["res"]["kills"]["reference_run"]
    ok = fc.inspect_run(store, ref, 0, 1, 8, 4)
    assert ok.rows_once and ok.ckpt_ok and ok.max_step == 32
    seg = sorted((store / ref / "steps").glob("*.parquet"))[0]
    shutil.copy2(seg, seg.with_name("r0-99999999.parquet"))  # the same rows twice
    bad = fc.inspect_run(store, ref, 0, 1, 8, 4)
    assert not bad.rows_once and any("each once" in p for p in bad.row_problems), bad.row_problems
    step_dir = sorted((store / ref / "checkpoints").glob("step_*"))[-1]
    (step_dir / "rank0.pt").write_bytes(b"torn")  # a final-named checkpoint that no longer verifies
    assert not fc.inspect_run(store, ref, 0, 1, 8, 4).ckpt_ok
