"""An episode's class and severity, each with the rule that decides it (docs/forensics.md,
"Classes and severity"; the thresholds are `EpisodeParams`).

Finding an episode (episodes.py) measures its shape: onset, peak, baseline, noise band,
recovery, duration. Judging it is separate because the evidence comes from more than the
shape: a restart from a checkpoint before onset (the lineage, logical_run.py) or the guard's
rollback makes a spike malignant, so analyze judges an episode again once it has that
evidence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from k2repro.forensics.episodes import Episode, EpisodeParams


def episode_class(nonfinite: bool, recovered: bool, runaway: bool, duration_steps: int, p: EpisodeParams) -> str:
    """divergence (a non-finite value and no recovery, or a run-away); transient (recovered,
    duration <= transient_horizon); slow (recovered, duration <= slow_horizon); else persistent."""
    if (nonfinite and not recovered) or runaway:
        return "divergence"
    if recovered and duration_steps <= p.transient_horizon:
        return "transient"
    if recovered and duration_steps <= p.slow_horizon:
        return "slow"
    return "persistent"


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def judge(ep: Episode, p: EpisodeParams, last_step: int, restart: dict | None = None) -> None:
    """Set `severity` and its one-line `reason` from the evidence (see EpisodeParams).

    `restart`: {run_id, from_step, spiked, at_step, value} of a run restarted from a
    checkpoint before onset (the lineage), or None."""
    what = ep.signal
    if ep.nonfinite and ep.cls == "divergence":
        ep.severity = "malignant"
        ep.reason = f"malignant: {what} became non-finite at step {ep.peak_step} and did not come back"
        return
    if ep.cls == "divergence":
        ep.severity = "malignant"
        ep.reason = (f"malignant: {what} kept rising to {_fmt(ep.peak_value)} "
                     f"({_fmt(ep.magnitude)}x baseline) and did not come back")
        return
    if restart is not None:
        lead = ep.onset_step - int(restart["from_step"])
        tail = (f"and the restarted run spiked again (step {restart['at_step']}: {_fmt(restart['value'])})"
                if restart.get("spiked") else
                "and the restarted run did not spike" if restart.get("spiked") is False else
                "(the restarted run logged nothing over the spike's steps)")
        ep.severity = "malignant"
        ep.reason = (f"malignant: training was restarted from step {restart['from_step']}, "
                     f"{lead} steps before onset ({restart['run_id']}), {tail}")
        return
    for e in ep.interventions:
        if e.get("kind") in ("rollback", "abort"):
            ep.severity = "malignant"
            ep.reason = f"malignant: the spike guard's {e.get('kind')} at step {e.get('step')}"
            return
    band = f"{_fmt(ep.baseline)} +- {_fmt(ep.band)}"
    if not ep.recovered or ep.duration_steps > p.slow_horizon:
        ep.severity = "malignant"
        if ep.recovered:
            ep.reason = (f"malignant: above the noise band ({band}) for {ep.duration_steps} steps, "
                         f"longer than slow_horizon={p.slow_horizon}")
        elif ep.censored:
            ep.reason = (f"malignant: not back within the noise band ({band}) when the log ends, "
                         f"{last_step - ep.onset_step} steps after onset")
        else:
            ep.reason = (f"malignant: not back within the noise band ({band}) "
                         f"within slow_horizon={p.slow_horizon} steps")
        return
    ep.severity = "benign"
    when = f"after {ep.duration_steps} step{'s' if ep.duration_steps != 1 else ''}"
    if ep.nonfinite:
        ep.reason = (f"benign: {what} was non-finite at step {ep.peak_step}, then the run went on "
                     f"within the noise band ({band}) {when} (an overflowed step, skipped)")
        return
    if ep.resolution_steps and ep.resolution_steps > max(1, p.sustain_steps):
        when += f" (next logged point {ep.resolution_steps} steps later)"
    ep.reason = f"benign: back within the noise band ({band}) {when}, by itself"


__all__ = ["episode_class", "judge"]
