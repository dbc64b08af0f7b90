"""The causal check of `k2repro forensics RUN --replay` (issue 6, item 6).

For one spike, from the newest checkpoint before its onset (or the initial state):
1. replay the onset window twice: each replay must equal the recorded run bit for bit; if one
   does not, nondeterminism or faulty hardware is suspect (Megatron reruns a step for this);
2. replay it once more with the top suspect samples masked out at the onset (they weigh
   nothing in that step's loss and gradient: `train.mask_steps` / `train.mask_sample_ids`):
   if the spike goes, the data caused it; if it stays, the optimizer state did (PaLM saw
   the latter: the same batches from an earlier state did not spike).

Replays train into a temporary store, so the user's store is not touched. This module decides
what to replay and what the replays show; launching them is the replay tool's job (a layer
above forensics), so the caller passes a `LaunchReplay` (`cli/forensics.py` binds
`k2repro.tools.replay.replay` to the store and the run).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: launch(from_step, to_step, out_store, overrides) -> the replay report (`bit_exact`,
#: `replay_run_id`): replays steps from_step..to_step of the analysed run into the store
#: `out_store`, with the dotted config `overrides` (None: the recorded config)
LaunchReplay = Callable[[int, int, Path, dict[str, Any] | None], dict[str, Any]]

#: the spike counts as gone when masking removes at least this share of its excess loss
GONE_SHARE = 0.5


def causal_check(result: Any, spike: Any, launch: LaunchReplay) -> dict[str, Any]:
    """Run the replays for one spike (`launch` starts each) and return what they showed; the
    caller records it on the spike (`Spike.causal`)."""
    import k2repro

    ep = spike.episode
    last = int(result.step_range[1]) if result.step_range else ep.end_step
    a, b = int(ep.onset_step), int(min(last, max(ep.peak_step, ep.onset_step) + 2))
    out: dict[str, Any] = {"from_step": a, "to_step": b}
    tmp = Path(tempfile.mkdtemp(prefix="k2repro-causal-"))
    try:
        reps = [launch(a, b, tmp / f"rep{k}", None) for k in range(2)]
        out["replays_bit_exact"] = [bool(r["bit_exact"]) for r in reps]
        out["deterministic"] = all(out["replays_bit_exact"])
        suspects = [int(x) for x in spike.top_samples]
        out["masked_samples"] = suspects
        if suspects:
            over = {"train.mask_steps": list(range(a, ep.peak_step + 1)), "train.mask_sample_ids": suspects}
            r = launch(a, b, tmp / "masked", over)
            with k2repro.open_store(tmp / "masked") as s:
                st = s.steps(r["replay_run_id"]).set_index("step")
            masked_peak = float(st.loc[a:ep.peak_step + 1, "loss"].max())
            excess = float(ep.peak_value - ep.baseline)
            share = 1.0 - (masked_peak - ep.baseline) / excess if excess > 0 else 0.0
            out.update(masked_peak_loss=masked_peak, baseline=float(ep.baseline), peak=float(ep.peak_value),
                       excess_removed_share=share, spike_without_suspects=share < GONE_SHARE)
            out["verdict"] = "data" if share >= GONE_SHARE else "optimizer_state"
            out["reason"] = (f"masking {len(suspects)} suspect sample(s) removed {share:.0%} of the excess loss"
                             f" (peak {ep.peak_value:.4g} -> {masked_peak:.4g}, baseline {ep.baseline:.4g})")
        else:
            out["verdict"] = "not_data"
            out["reason"] = "no suspect samples to mask: the data attribution did not blame the data"
        if not out["deterministic"]:
            out["verdict"] = "nondeterminism_or_hardware"
            out["reason"] = "a replay of the same window differed from the recorded run: " + out["reason"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
