"""`k2repro forensics RUN --replay` (issue 6, item 6): the onset window replays bit for bit
twice, and masking the suspect samples removes the spike of an injected bad batch (verdict
data), using the replay tool and the trainer's counterfactual sample mask."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.conftest import k2, tiny_overrides


def test_causal_check_blames_the_injected_batch(packed_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    r = k2("train", *tiny_overrides(packed_dir, store, **{
        "train.max_steps": 60, "ckpt.interval": 20, "faults.bad_batch_steps": [45]}))
    assert r.returncode == 0, r.stderr[-2000:]
    rid = re.search(r"run_id=(\S+)", r.stdout).group(1)
    before = sorted(p.name for p in store.iterdir())
    f = k2("forensics", rid, "--store", str(store), "--out", str(tmp_path / "rep"), "--replay", "--json",
           "--no-html")
    assert f.returncode == 0, f.stderr[-2000:]
    spikes = json.loads(f.stdout)["spikes"]
    sp = next(s for s in spikes if abs(s["onset_step"] - 45) <= 2)
    c = sp["causal"]
    assert c["replays_bit_exact"] == [True, True] and c["deterministic"]
    assert c["masked_samples"] and c["verdict"] == "data"
    assert c["masked_peak_loss"] < sp["peak_value"] if "peak_value" in sp else c["masked_peak_loss"] < c["peak"]
    assert c["excess_removed_share"] >= 0.5
    assert sorted(p.name for p in store.iterdir()) == before, "replays go to a temporary store"
    md = next((tmp_path / "rep").rglob("forensics.md")).read_text()
    assert "causal check, spike at" in md and "data" in md
