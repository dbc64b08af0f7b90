"""The logical run and its restarts: what forensics reads about a run beyond its own rows.

A run resumed, rolled back or imported as restart segments is one training curve spread over
several run ids (each child names its parent and the step it resumed from). Forensics reads
the ancestors' steps up to each resume point first, so the curve reads as one (`--no-lineage`
reads the run alone), and asks which runs were restarted from a checkpoint of this curve:
a restart before a spike's onset is the lineage's evidence that the spike was malignant.
Separate from `source.py`, which answers questions about a single run id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from k2repro.forensics.episodes import Episode
from k2repro.forensics.source import RunSource


@dataclass
class LogicalRun:
    """The step signals of the logical run (`series`, step order), the run ids it was read
    from, oldest first (`segments`: run_id, first_step, last_step), and what the reading
    noticed (`notes`, for the report)."""

    series: dict[str, np.ndarray]
    segments: list[dict]
    notes: list[str] = field(default_factory=list)


def read_logical_run(src: RunSource, run: dict, signal: str, lineage: bool) -> LogicalRun:
    """The run's step signals (`run`: its runs row); with `lineage`, the logical run: each
    ancestor's steps up to the step its child resumed from come first (one curve across
    resumes, rollbacks and imported restart segments)."""
    st = src.steps(signal)
    notes: list[str] = []
    if src.dup_steps:
        notes.append(f"steps: {src.dup_steps} step numbers were logged twice; one row of each was used")
    if src.unlogged:
        notes.append(f"steps: {src.unlogged} rows have no {signal} (not logged) and were left out")
    first = int(st["step"][0]) if st["step"].size else None
    segments = [{"run_id": src.run_id, "first_step": first,
                 "last_step": int(st["step"][-1]) if st["step"].size else None}]
    row, seen = run, {src.run_id}
    parts = [st]
    while lineage and row.get("parent_run_id") and row.get("resumed_from_step") is not None:
        parent = str(row["parent_run_id"])
        if parent in seen or len(seen) > 10_000:
            break
        seen.add(parent)
        psrc = RunSource(src.con, parent)
        if not psrc.exists():
            notes.append(f"lineage: parent run {parent} is not in the store; its steps are not read")
            break
        pst = _before(psrc.steps(signal), int(row["resumed_from_step"]), first)
        if pst["step"].size:
            parts.insert(0, pst)
            segments.insert(0, {"run_id": parent, "first_step": int(pst["step"][0]),
                                "last_step": int(pst["step"][-1])})
            first = int(pst["step"][0])
        row = psrc.run_row()
    if len(parts) == 1:
        return LogicalRun(st, segments, notes)
    keys = [k for k in st if all(k in q for q in parts)]
    out = {k: np.concatenate([q[k] for q in parts]) for k in keys}
    notes.append(
        f"logical run: {len(parts)} segments read as one curve through the lineage "
        f"({' -> '.join(str(g['run_id']) for g in segments[:6])}"
        f"{' -> ...' if len(segments) > 6 else ''}); steps {segments[0]['first_step']}"
        f"-{segments[-2]['last_step']} come from the ancestors (--no-lineage reads this run alone)")
    return LogicalRun(out, segments, notes)


def _before(pst: dict[str, np.ndarray], cut: int, first: int | None) -> dict[str, np.ndarray]:
    """A parent's steps up to the resume point `cut`, and before the child's first step."""
    keep = pst["step"] <= cut
    if first is not None:
        keep &= pst["step"] < first
    return {k: v[keep] for k, v in pst.items()}


def find_restarts(src: RunSource, segments: list[dict]) -> list[dict]:
    """Runs restarted from a checkpoint of this run or of an ancestor segment (resumes,
    rollbacks, stitched import branches; replays are checks, not restarts): the lineage
    evidence for severity."""
    table = "runs_raw" if src.columns("runs_raw") else "runs"
    if "parent_run_id" not in src.columns(table):
        return []
    out: list[dict] = []
    for seg in segments:
        rows = src.con.execute(
            f"SELECT run_id, resumed_from_step, source FROM {table} WHERE parent_run_id = ? "
            "AND resumed_from_step IS NOT NULL", [seg["run_id"]]).fetchall()
        for rid, frm, source in rows:
            if str(source or "").startswith("replay") or any(rid == g["run_id"] for g in segments):
                continue
            rng = src.con.execute("SELECT min(step), max(step) FROM steps WHERE run_id = ?",
                                  [rid]).fetchone()
            out.append({"run_id": rid, "from_step": int(frm), "parent_run_id": seg["run_id"],
                        "source": source, "first_step": rng[0], "last_step": rng[1]})
    return out


def restart_evidence(src: RunSource, ep: Episode, restarts: list[dict]) -> dict[str, Any] | None:
    """The restart nearest before onset that covers it, and whether it spiked there."""
    cands = [r for r in restarts if r["from_step"] < ep.onset_step
             and r["last_step"] is not None and r["last_step"] >= ep.onset_step]
    if not cands:
        return None
    r = max(cands, key=lambda r: r["from_step"])
    hi = max(ep.end_step, ep.onset_step + ep.duration_steps)
    vals = src.con.execute(
        f"SELECT step, {ep.signal}::DOUBLE FROM steps WHERE run_id = ? AND step BETWEEN ? AND ? "
        f"AND {ep.signal} IS NOT NULL ORDER BY step", [r["run_id"], ep.onset_step, hi]).fetchall() \
        if ep.signal in src.columns("steps") else []
    ev = dict(r, spiked=None, at_step=None, value=None)
    if vals:
        arr = np.array([v for _, v in vals], dtype=np.float64)
        k = int(np.nanargmax(np.where(np.isfinite(arr), arr, np.inf)))
        bar = ep.baseline + max(ep.band, 0.25 * ep.excess if np.isfinite(ep.excess) else ep.band)
        ev.update(spiked=bool(not np.isfinite(arr[k]) or arr[k] > bar), at_step=int(vals[k][0]),
                  value=float(arr[k]))
    return ev


__all__ = ["LogicalRun", "find_restarts", "read_logical_run", "restart_evidence"]
