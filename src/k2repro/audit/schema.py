"""The audit store's tables: one place for every column, its type and its meaning.

Columns are declared as plain data so that the query side (`k2repro sql`, `k2repro runs`) can
build typed empty views without importing pyarrow; `arrow_schema(table)` builds the explicit
Arrow schema that every Parquet segment is written with. Floats are float64 so that a value
logged from an fp32 (or fp64) number round-trips bit for bit. docs/audit-store.md describes
the same tables for people; a test keeps the two in step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

#: Bump when a column changes type or meaning (adding a nullable column needs no bump:
#: views read segments with `union_by_name`, old segments show NULL there).
SCHEMA_VERSION = 2

#: logical type -> DuckDB type. Timestamps are UTC, microseconds.
DUCKDB_TYPES = {
    "string": "VARCHAR",
    "int64": "BIGINT",
    "int32": "INTEGER",
    "float64": "DOUBLE",
    "bool": "BOOLEAN",
    "timestamp": "TIMESTAMP WITH TIME ZONE",
}


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool = True
    doc: str = ""


def _c(name: str, type_: str, doc: str, nullable: bool = True) -> Column:
    assert type_ in DUCKDB_TYPES, type_
    return Column(name, type_, nullable, doc)


_RUN_ID = _c("run_id", "string", "the run (one per process launch)", nullable=False)

TABLES: dict[str, tuple[Column, ...]] = {
    "runs": (
        _RUN_ID,
        _c("name", "string", "run.name"),
        _c("started_at", "timestamp", "when the sink started (UTC)"),
        _c("parent_run_id", "string", "the run this one resumes, rolls back or replays"),
        _c("resumed_from_step", "int64", "the checkpoint step this run continued from"),
        _c("source", "string", "train, replay or import:<kind>"),
        _c("config_hash", "string", "hash of the computation-relevant resolved config"),
        _c("git_commit", "string", "HEAD of the working tree the run started from"),
        _c("git_dirty", "bool", "uncommitted changes to tracked files"),
        _c("world_size", "int32", "number of ranks"),
        _c("host", "string", "rank 0's host name"),
        _c("pid", "int64", "rank 0's process id"),
        _c("launcher", "string", "torchrun, slurm or python"),
        _c("argv", "string", "rank 0's command line (JSON list, redacted)"),
        _c("config_json", "string", "the resolved config (JSON, redacted)"),
        _c("store_path", "string", "the store root the run was written to"),
        _c("schema_version", "int32", "SCHEMA_VERSION of the writer"),
        _c("k2repro_version", "string", "k2repro version of the writer"),
    ),
    "hparams": (
        _RUN_ID,
        _c("key", "string", "dotted config key (every leaf of the resolved config)", nullable=False),
        _c("value", "string", "the value: strings as is, everything else as JSON (exact floats)"),
        _c("value_type", "string", "int, float, bool, str, null, list or dict", nullable=False),
    ),
    "env": (
        _RUN_ID,
        _c("rank", "int32", "the rank that captured the fact", nullable=False),
        _c("key", "string", "fact name: host, cpu.model, gpu.name, pkg.<name>, env.<VAR>, ...",
           nullable=False),
        _c("value", "string", "fact value (secrets redacted)"),
    ),
    "data_manifest": (
        _RUN_ID,
        _c("artifact", "string", "what it is: packed shard, tokenizer, manifest, ...", nullable=False),
        _c("path", "string", "path as the run saw it"),
        _c("sha256", "string", "sha256 of the file"),
        _c("n_docs", "int64", "documents in it"),
        _c("n_tokens", "int64", "tokens in it"),
        _c("bytes", "int64", "file size"),
        _c("detail", "string", "anything else (JSON)"),
    ),
    "steps": (
        _RUN_ID,
        _c("step", "int64", "optimizer step, from 1", nullable=False),
        _c("loss", "float64", "global token-weighted mean loss of the step's forward pass"),
        _c("grad_norm", "float64", "global gradient norm before clipping"),
        _c("lr", "float64", "learning rate used by this step's update"),
        _c("tokens", "int64", "tokens in the global batch"),
        _c("step_time_s", "float64", "wall time of the step"),
        _c("tokens_per_s", "float64", "tokens / step_time_s"),
        _c("loss_min", "float64", "smallest per-sample loss"),
        _c("loss_max", "float64", "largest per-sample loss"),
        _c("loss_std", "float64", "standard deviation of per-sample losses"),
        _c("logz_mean", "float64", "mean log-sum-exp of the output logits"),
        _c("skipped", "bool", "the update was computed but not applied"),
        _c("clipped", "bool", "grad_norm exceeded optim.clip_grad"),
        _c("batch_hash", "string", "hash of the global batch's sample ids in order"),
        _c("mfu", "float64", "model FLOPs utilisation, where peak FLOPs are known"),
        _c("peak_mem_bytes", "int64", "peak accelerator memory, where known"),
        _c("n_samples", "int64", "samples in the global batch"),
        _c("time", "timestamp", "wall clock at the end of the step (UTC)"),
    ),
    "layer_stats": (
        _RUN_ID,
        _c("step", "int64", "optimizer step", nullable=False),
        _c("param", "string", "parameter tensor name", nullable=False),
        _c("grad_norm", "float64", "L2 norm of the full (unsharded) gradient"),
        _c("param_norm", "float64", "L2 norm of the parameter before the update"),
        _c("update_norm", "float64", "L2 norm of the applied update (after the optimizer step)"),
        _c("update_ratio", "float64", "update_norm / param_norm"),
        _c("grad_max_abs", "float64", "largest |gradient| element"),
        _c("numel", "int64", "elements in the tensor"),
    ),
    "sample_stats": (
        _RUN_ID,
        _c("step", "int64", "optimizer step", nullable=False),
        _c("rank", "int32", "rank that computed the sample", nullable=False),
        _c("sample_id", "int64", "global sample id (position in the packed dataset)", nullable=False),
        _c("loss", "float64", "mean token loss of the sample"),
        _c("n_tokens", "int64", "tokens that count towards the loss"),
        _c("batch_pos", "int32", "position of the sample in the global batch"),
    ),
    "checkpoints": (
        _RUN_ID,
        _c("step", "int64", "the state after this many updates", nullable=False),
        _c("path", "string", "checkpoint directory"),
        _c("manifest_sha256", "string", "sha256 of the checkpoint manifest"),
        _c("bytes", "int64", "total size on disk"),
        _c("save_s", "float64", "seconds to write it"),
        _c("time", "timestamp", "when it was committed (UTC)"),
    ),
    "events": (
        _RUN_ID,
        _c("time", "timestamp", "when it was logged (UTC)", nullable=False),
        _c("rank", "int32", "rank that logged it", nullable=False),
        _c("step", "int64", "step it concerns, if any"),
        _c("kind", "string", "start, resume, spike, skip, rollback, nan, crash, fault_injected, "
                             "error, end, git_diff, audit_backpressure, ...", nullable=False),
        _c("severity", "string", "info, warning or error", nullable=False),
        _c("detail", "string", "JSON object (redacted)"),
    ),
    "evals": (
        _RUN_ID,
        _c("step", "int64", "checkpoint step evaluated", nullable=False),
        _c("metric", "string", "val/loss, val/ppl, val/ppl/<domain>, mem/exact_match, "
                               "mem/matched_prefix", nullable=False),
        _c("value", "float64", "metric value"),
        _c("n_tokens", "int64", "tokens evaluated"),
        _c("time", "timestamp", "when it was computed (UTC)"),
        _c("manifest_sha256", "string", "sha256 of the evaluated checkpoint's manifest"),
        _c("detail", "string", "evaluation settings (JSON)"),
    ),
    "spikes": (
        _RUN_ID,
        _c("spike_id", "int64", "number of the spike within the run"),
        _c("onset_step", "int64", "first step of the spike"),
        _c("peak_step", "int64", "step of the largest loss"),
        _c("end_step", "int64", "last step before the loss recovered"),
        _c("magnitude", "float64", "peak / baseline of the episode's signal (inf for a non-finite peak)"),
        _c("class", "string", "transient, slow, persistent or divergence"),
        _c("severity", "string", "benign or malignant"),
        _c("lead_signal", "string", "the signal that moved first"),
        _c("top_layer", "string", "parameter with the largest update-ratio jump"),
        _c("top_samples", "string", "JSON list of the worst sample ids"),
        _c("detail", "string", "anything else (JSON)"),
        _c("detected_at", "timestamp", "when forensics wrote it (UTC)"),
        _c("signal", "string", "the series the episode was opened on (loss, grad_norm, ...)"),
        _c("baseline", "float64", "clean level of the signal before onset (positive for a loss)"),
        _c("peak_value", "float64", "the signal's value at peak_step"),
        _c("excess", "float64", "peak_value - baseline"),
        _c("max_z", "float64", "largest robust z of the signal inside the episode"),
        _c("reason", "string", "one line: why the severity is what it is"),
    ),
    "metrics": (
        _RUN_ID,
        _c("step", "int64", "step the value belongs to"),
        _c("name", "string", "free-form scalar name (importers, callbacks)", nullable=False),
        _c("value", "float64", "the value"),
        _c("rank", "int32", "rank that logged it"),
        _c("time", "timestamp", "when it was logged (UTC)"),
    ),
    "run_end": (
        _RUN_ID,
        _c("rank", "int32", "rank that closed its sink", nullable=False),
        _c("status", "string", "completed, failed or interrupted (SIGINT/SIGTERM, stopped cleanly)", nullable=False),
        _c("ended_at", "timestamp", "when the sink closed (UTC)", nullable=False),
        _c("error", "string", "traceback or message of a failed run (redacted)"),
        _c("pid", "int64", "process id"),
        _c("host", "string", "host name"),
    ),
}

TABLE_DOCS: dict[str, str] = {
    "runs": "one row per run (process launch); the `runs` view adds the derived `status`",
    "hparams": "the resolved config, flattened to dotted keys",
    "env": "hardware and software facts, per rank",
    "data_manifest": "every data artefact the run used",
    "steps": "one row per optimizer step",
    "layer_stats": "per parameter tensor, every audit.layer_stats_every steps",
    "sample_stats": "per sample per step, written by the rank that computed it",
    "checkpoints": "one row per checkpoint",
    "events": "anything that happened",
    "evals": "per checkpoint and metric",
    "spikes": "loss spikes found by forensics",
    "metrics": "free-form scalar series without a column of their own",
    "run_end": "end marker, one row per rank that closed its sink",
}

#: Values written by one rank only; the others are written by every rank (rank-local).
GLOBAL_TABLES = ("runs", "hparams", "data_manifest", "steps", "layer_stats", "checkpoints",
                 "evals", "spikes")


def columns(table: str) -> tuple[Column, ...]:
    try:
        return TABLES[table]
    except KeyError:
        raise ValueError(f"unknown audit table '{table}' (known: {', '.join(TABLES)})") from None


@cache  # asked for every column of every live write
def column_names(table: str) -> tuple[str, ...]:
    return tuple(c.name for c in columns(table))


def schema_hash() -> str:
    """Changes whenever any column changes: the store's stubs and DuckDB file follow it."""
    text = repr(sorted((t, [(c.name, c.type, c.nullable) for c in cols]) for t, cols in TABLES.items()))
    return hashlib.sha256(f"{SCHEMA_VERSION}:{text}".encode()).hexdigest()[:12]


def _arrow_type(type_: str) -> pa.DataType:
    import pyarrow as pa

    return {
        "string": pa.string(),
        "int64": pa.int64(),
        "int32": pa.int32(),
        "float64": pa.float64(),
        "bool": pa.bool_(),
        "timestamp": pa.timestamp("us", tz="UTC"),
    }[type_]


@cache
def arrow_schema(table: str) -> pa.Schema:
    """The explicit Arrow schema every segment of `table` is written with."""
    import pyarrow as pa

    fields = [pa.field(c.name, _arrow_type(c.type), nullable=c.nullable) for c in columns(table)]
    return pa.schema(fields, metadata={"k2repro.table": table,
                                       "k2repro.schema_version": str(SCHEMA_VERSION)})


def __getattr__(name: str) -> object:
    # `SCHEMAS` is built on first use so that importing this module stays free of pyarrow.
    if name == "SCHEMAS":
        return {t: arrow_schema(t) for t in TABLES}
    raise AttributeError(name)
