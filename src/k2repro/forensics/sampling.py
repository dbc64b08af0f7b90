"""What a log's sampling can resolve: points, span, gaps, and the stretches where a spike
could hide between two logged points. Imports log every N steps, W&B down-samples to a fixed
number of points, and a sparse log may have dense bursts; the report states what the data
can show before it says what it found. Separate from detection: it reads only the steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from k2repro.forensics.episodes import EpisodeParams


def sampling_summary(steps: np.ndarray, ep: EpisodeParams) -> dict[str, Any]:
    """What the log's sampling can resolve: points, span, gaps, and the step ranges where a
    spike shorter than the local gap could sit between two logged points unseen."""
    steps = np.asarray(steps, dtype=np.int64)
    out: dict[str, Any] = {"points": int(steps.size)}
    if steps.size < 2:
        return out
    gaps = np.diff(steps)
    med = float(np.median(gaps))
    out.update({
        "first_step": int(steps[0]), "last_step": int(steps[-1]),
        "span_steps": int(steps[-1] - steps[0]), "median_gap": med,
        "max_gap": int(gaps.max()), "max_gap_at": int(steps[int(np.argmax(gaps))]),
        # coefficient of variation of the gaps: 0 for a log at a fixed interval
        "irregularity": round(float(np.std(gaps) / np.mean(gaps)), 4) if gaps.mean() > 0 else 0.0,
        "every_step": bool(np.all(gaps == 1)),
    })
    # stretches whose gaps exceed the transient horizon: a transient spike can hide there
    blind = gaps > max(ep.transient_horizon, 2 * med)
    ranges: list[dict[str, Any]] = []
    if blind.any():
        m = np.concatenate(([False], blind, [False])).astype(np.int8)
        d = np.diff(m)
        for a, b in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1), strict=True):
            g = gaps[a:b]
            ranges.append({"from_step": int(steps[a]), "to_step": int(steps[b]),
                           "median_gap": float(np.median(g)), "points": int(b - a + 1)})
        ranges.sort(key=lambda r: -(r["to_step"] - r["from_step"]))
    out["blind_ranges"] = ranges[:10]
    if ranges:
        r0 = ranges[0]
        out["resolution"] = (f"a spike shorter than ~{int(r0['median_gap']):,} steps may be invisible "
                             f"between steps {r0['from_step']:,} and {r0['to_step']:,}"
                             + (f" ({len(ranges) - 1} more such stretches)" if len(ranges) > 1 else ""))
    else:
        out["resolution"] = (f"every spike longer than {int(max(1, med)):,} "
                             f"step{'s' if med > 1 else ''} is seen (median gap {med:g})")
    return out


__all__ = ["sampling_summary"]
