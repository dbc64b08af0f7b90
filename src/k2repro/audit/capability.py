"""What each tool can do for a run, by the run's `source`, said at once and in one line.

A run trained by k2repro (`train`, `replay`) carries everything: its resolved config, the
packed data's manifest and DCP checkpoints. A run recorded by another training loop through
the audit API (`api`, `api:transformers`, `api:lightning`) carries what that loop logged: its
checkpoints are the other framework's own folders, its config is not a k2repro model config.
An imported run (`import:*`) carries curves and what the log held. Tools that need more than a
run of that source holds refuse up front with this line, instead of failing later on a detail
(an unknown config key, a checkpoint format) that hides the reason.

It reads only a run's `runs.source` value, a fact of the audit records, and tools of several
layers use it (eval, replay, the CLI): it sits in the shared audit layer, below all of them.
"""

from __future__ import annotations

#: Tools that read only the audit records: they work for every source.
RECORD_TOOLS = ("runs", "sql", "diff", "forensics", "report")

#: Tools that need a k2repro-trained run, and what they need from it.
NEEDS_K2REPRO = {
    "eval": "the run's k2repro model config, packed data and DCP checkpoints",
    "replay": "the run's k2repro config, packed data and DCP checkpoints",
}


def origin(source: str | None) -> str:
    """'k2repro', 'api' or 'import' for a `runs.source` value (absent: an older k2repro run)."""
    s = (source or "train").strip()
    if s.startswith("api"):
        return "api"
    if s.startswith("import"):
        return "import"
    return "k2repro"


def describe(source: str | None) -> str:
    s = source or "train"
    return {"api": f"recorded by another training loop through the audit API ({s})",
            "import": f"imported from another tool's logs ({s})"}.get(origin(s), f"trained by k2repro ({s})")


#: Tools that work for every source but can do less for a run k2repro did not train.
PARTIAL = {
    "batch": "shows only the sample ids and losses the loop logged (run.log_samples), and token ids "
             "where the run recorded a fixed-length token layout (the OLMo-core callback); it cannot "
             "recompute the batch from a seed and data order, or decode text, without a k2repro run",
}


def partial_line(tool: str, run_id: str, source: str | None) -> str:
    """One line saying what `tool` can still do for a run k2repro did not train (empty if all)."""
    if origin(source) == "k2repro" or tool not in PARTIAL:
        return ""
    return f"run {run_id} was {describe(source)}: `{tool}` {PARTIAL[tool]}"


def can_do(tool: str, source: str | None) -> bool:
    return tool not in NEEDS_K2REPRO or origin(source) == "k2repro"


def capability_line(tool: str, run_id: str, source: str | None, n_checkpoints: int | None = None) -> str:
    """One line: why `tool` cannot work on this run and what can (empty if it can)."""
    if can_do(tool, source):
        return ""
    ckpts = ""
    if n_checkpoints and origin(source) == "api":
        ckpts = (f"; its {n_checkpoints} recorded checkpoint(s) are that loop's own folders, "
                 "not k2repro checkpoints: evaluate them with that framework")
    return (f"run {run_id} was {describe(source)}: `{tool}` needs {NEEDS_K2REPRO[tool]}{ckpts}. "
            f"For this run k2repro can: {', '.join(RECORD_TOOLS)}; cannot: {', '.join(NEEDS_K2REPRO)}")


__all__ = ["RECORD_TOOLS", "NEEDS_K2REPRO", "PARTIAL", "origin", "describe", "can_do", "capability_line",
           "partial_line"]
