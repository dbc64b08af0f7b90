"""`AuditRun`: one rank of one run audited through `k2repro.audit.start` (docs/audit-api.md).

What a loop logs stays pending here (numbers, or tensors on their device) until a flush hands it,
typed, to the sink's writer thread; `close` records what the loop never gave (`audit_absent`)
and ends the run.
"""

from __future__ import annotations

import functools
import os
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.audit import layerstats
from k2repro.audit.hostvalues import (
    Host,
    as_float,
    as_step,
    keep,
    length,
    losses_by_step,
    sample_columns,
    scalar,
    step_columns,
)
from k2repro.audit.layerstats import LayerPending, layer_stats_writer, process_group
from k2repro.audit.runrow import EndsOnExit

if TYPE_CHECKING:  # pragma: no cover
    from k2repro.audit.sink import AuditSink

#: `events.kind` of the rows that list what this run's loop could not give (docs/audit-api.md).
ABSENT_EVENT = "audit_absent"
#: What a run can lack, each with the analyses its absence rules out (docs/audit-api.md).
ABSENT_RULES_OUT: dict[str, str] = {
    "steps": "every analysis (no loss curve)",
    "steps.loss": "spike detection on the loss, loss comparison in diff",
    "steps.grad_norm": "the grad_norm precursor",
    "steps.lr": "the lr precursor and lr checks",
    "steps.tokens": "tokens/s and token counts",
    "steps.batch_hash": "diff's first batch divergence (which step's data differs)",
    "layer_stats": "layer attribution, per-layer grad-norm and update/param-ratio precursors",
    "sample_stats": "data attribution (which samples drove a spike)",
    "checkpoints": "checkpoint-based eval",
    "data_manifest": "diff's data section (which data files were used)",
}


class AuditRun(EndsOnExit):
    """One rank of one audited run. Every rank calls every method (global tables are written by
    one rank: rank 0, but `layer_stats` the last rank, layerstats.py `layer_stats_writer`;
    `log_layer_stats` is collective under a process group)."""

    def __init__(self, sink: AuditSink, *, declared: Mapping[str, str] | None = None,
                 has_manifest: bool = False) -> None:
        self.sink = sink
        self.run_id = sink.run_id
        #: CPU time of the training thread in the audit's optimizer step hook (the exact update
        #: of log_layer_stats), which no hook of the caller's own sees (bench/integrations.py)
        self.hook_cpu_s = 0.0
        self.rank = sink.rank
        self.world_size = sink.world_size
        self.flush_every = max(1, sink.flush_every)
        self._declared = dict(declared or {})
        self._seen: set[str] = {"data_manifest"} if has_manifest else set()
        self._steps: list[tuple[int, Any, dict[str, Any]]] = []  # (step, time, columns)
        self._metrics: list[tuple[int, Any, str, Any]] = []  # (step, time, name, value)
        self._samples: list[tuple[int, Any, Any, Any]] = []  # (step, ids, losses, n_tokens)
        self._layers: list[layerstats.LayerRows] = []  # gathered (or a single process): flushable
        self._ungathered: list[layerstats.LayerRows] = []  # this rank's part, not yet gathered
        self._layer_prev: int | None = None  # step of the previous log_layer_stats call
        self._layer_gap: int | None = None  # steps between the last two calls
        self._pending_layer: LayerPending | None = None
        self._carry: dict[int, Any] = {}  # per-sample losses of steps whose row is not logged yet
        self._since_flush = 0
        self._t_last = time.perf_counter()
        self._closed = False
        self._failing = False  # closing a failed run: wait on no collective

    # -- logging ----------------------------------------------------------------------------

    def log_step(self, step: int, *, loss: Any = None, lr: Any = None, grad_norm: Any = None,
                 tokens: Any = None, batch_ids: Any = None, **extra: Any) -> None:
        """One optimizer step. Values are floats or 0-d tensors (kept on their device until the
        flush). `batch_ids`: the global batch's sample ids in order, stored as `batch_hash` (the
        trainer's hash, so diff can find where two runs' data part). Other keyword arguments go
        to their `steps` column if there is one (loss_max, step_time_s, ...), else to `metrics`
        as (step, name, value). `step_time_s` defaults to the time since the previous call.
        Flushes every `flush_every` calls."""
        from k2repro.audit.writer import utcnow

        step = as_step(step)
        now = time.perf_counter()
        cols: dict[str, Any] = {}
        for key, val in (("loss", loss), ("lr", lr), ("grad_norm", grad_norm), ("tokens", tokens)):
            if val is not None:
                cols[key] = scalar(val, key)
                self._seen.add(f"steps.{key}")
        known = _step_extra_columns()
        when = utcnow()
        for key, val in extra.items():
            if val is None:
                continue
            number = type(val) is float or type(val) is int  # the common case: a dozen a step, and
            if key in known:  # the ABC checks below cost more than the rest of the loop
                cols[key] = val if number or isinstance(val, str | bool) else scalar(val, key)
            elif not number and (isinstance(val, str | bytes) or isinstance(val, Mapping | list | tuple)):
                raise ValueError(f"log_step: '{key}' is not a steps column and not a number "
                                 "(use log_event for structured values)")
            else:
                self._metrics.append((step, when, key, val if number else scalar(val, key)))
        if batch_ids is not None:
            cols["batch_hash"] = keep(batch_ids, "batch_ids")
        if "batch_hash" in cols:
            self._seen.add("steps.batch_hash")
        cols.setdefault("step_time_s", now - self._t_last)
        self._t_last = now
        # Flush before this step, not after it: what the loop logs after log_step (its samples)
        # lands in the same flush as its step row.
        if self._since_flush >= self.flush_every:
            self.flush()
        self._steps.append((step, when, cols))
        self._seen.add("steps")
        self._since_flush += 1

    def log_samples(self, step: int, sample_ids: Any, losses: Any, n_tokens: Any = None) -> None:
        """Per-sample losses of this rank's part of the step's batch (`sample_stats`; every rank
        writes its own). `sample_ids` and `losses` are sequences or 1-d tensors of equal length;
        `n_tokens` an int for all or one per sample."""
        step = as_step(step)
        n_ids, n_loss = length(sample_ids), length(losses)
        if n_ids != n_loss:
            raise ValueError(f"log_samples: {n_ids} sample_ids but {n_loss} losses")
        if n_tokens is not None and not isinstance(n_tokens, int) and length(n_tokens) != n_ids:
            raise ValueError(f"log_samples: n_tokens has {length(n_tokens)} values for {n_ids} samples")
        self._samples.append((step, keep(sample_ids, "sample_ids"), keep(losses, "losses"),
                              n_tokens if n_tokens is None or isinstance(n_tokens, int)
                              else keep(n_tokens, "n_tokens")))
        self._seen.add("sample_stats")

    def log_layer_stats(self, step: int, model: Any, optimizer: Any = None, *, before: Any = None) -> None:
        """Per-parameter grad norm, parameter norm, update norm, update/param ratio and max |grad|
        (`layer_stats`) of the parameters that require grad.

        Call it after backward (and clipping) and before `optimizer.step()`. With `optimizer`,
        the parameters are copied now and the update is measured exactly by a one-shot
        optimizer step hook, so this holds one copy of the (local) parameters until the step
        (on CPU its buffers are kept for the next call: audit/layerstats.py `snapshot_of`).
        Without it, pass `before=` (the parameters before the update, a sequence in
        `named_parameters` order or a name -> tensor mapping) and call it after the step instead;
        with neither, update_norm and update_ratio are NULL. param_norm is always the norm before
        the update. Collective when a process group is initialized: every rank calls it."""
        step = as_step(step)
        self._finish_layer(update=None)  # the previous call's step never ran (e.g. an AMP skip)
        if self._layer_prev is not None:
            self._layer_gap = step - self._layer_prev
        self._layer_prev = step
        item = layerstats.measure(step, model, before=before, keep_snapshot=optimizer is not None)
        self._seen.add("layer_stats")
        self._pending_layer = item
        if item.snapshot is None:
            self._finish_layer(update=None)
            return

        def _after_step(_opt: Any, _args: Any, _kwargs: Any) -> None:
            c0 = time.thread_time()  # audit work inside the caller's optimizer step: counted
            self._finish_layer(update=layerstats.update_sq(item))
            self.hook_cpu_s += time.thread_time() - c0

        item.handle = layerstats.inner_optimizer(optimizer).register_step_post_hook(_after_step)

    def log_checkpoint(self, step: int, path: str | Path | None, *, manifest_sha256: str | None = None,
                       save_s: float | None = None, nbytes: int | None = None) -> None:
        """A checkpoint of the state after `step` updates (rank 0 writes it; `bytes` is the size
        on disk of the file or folder unless given; `path` None when unknown)."""
        step = as_step(step)
        self._seen.add("checkpoints")
        if self.rank != 0:
            return
        p = None if path is None else Path(path)
        if nbytes is None and p is not None and p.exists():
            nbytes = _size(p)
        self.sink.log_checkpoint({"step": step, "path": None if p is None else str(p),
                                  "manifest_sha256": manifest_sha256, "bytes": nbytes, "save_s": save_s})

    def log_event(self, kind: str, step: int | None = None, *, severity: str = "info", **detail: Any) -> None:
        """Anything that happened (`events`; every rank writes its own); `detail` is stored as
        redacted JSON."""
        if severity not in ("info", "warning", "error"):
            raise ValueError(f"severity must be info, warning or error (got {severity!r})")
        self.sink.log_event(str(kind), None if step is None else as_step(step), severity, detail or None)

    # -- lifecycle --------------------------------------------------------------------------

    def flush(self, wait: bool = False) -> None:
        """Move everything pending to the host (one transfer per device and dtype: a host-device
        sync) and hand it to the sink's writer thread. `wait=True` returns once it is on disk."""
        self._since_flush = 0
        steps, metrics, samples, layers = self._steps, self._metrics, self._samples, self._layers
        self._steps, self._metrics, self._samples, self._layers = [], [], [], []
        if self.rank != 0:  # global tables: rank 0 writes them, the others fetch nothing
            steps, metrics = [], []
        if self.rank != layer_stats_writer(self.world_size):  # ... but the last rank the layers
            layers = []  # (their gathers complete on the process group's threads, unwaited)
        elif self._failing:  # other ranks may be gone: the rows whose gather completes (bounded)
            layers = layerstats.completed(layers)
        elif not self._closed:  # a flush never waits on other ranks: what arrived, the rest later
            here = [m.arrived() for m in layers]
            self._layers = [m for m, h in zip(layers, here) if not h] + self._layers
            layers = [m for m, h in zip(layers, here) if h]
        host = Host()
        for _, _, cols in steps:
            for k, v in cols.items():
                cols[k] = host.add(v)
        metric_vals = [host.add(m[3]) for m in metrics]
        sample_vals = [(s[0], host.add(s[1]), host.add(s[2]), host.add(s[3])) for s in samples]
        layer_mats = [host.add(m) for m in layerstats.matrices(layers)]
        host.fetch()
        if steps:
            per_step = losses_by_step(sample_vals, host, self._carry) if self.world_size == 1 else {}
            self.sink.log_steps(step_columns(steps, host, per_step))
            top = max(st[0] for st in steps)  # samples logged before their step's row wait for it
            self._carry = {k: v for k, v in per_step.items() if k > top}
        if metrics:
            self.sink.log_metrics({"step": [m[0] for m in metrics], "name": [m[2] for m in metrics],
                                   "value": [as_float(host.get(v)) for v in metric_vals],
                                   "time": [m[1] for m in metrics], "rank": [self.rank] * len(metrics)})
        if sample_vals:
            self.sink.log_samples(sample_columns(sample_vals, host, self.rank))
        if layers:
            self.sink.log_layer_stats(layerstats.layer_columns(layers, [host.get(r) for r in layer_mats]))
        self.sink.flush(wait=wait)

    def close(self, status: str = "completed", error: str | None = None) -> None:
        """Flush, record what was never logged (an `audit_absent` event), end the run. A failed
        run skips collectives (other ranks may be gone). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._failing = status != "completed" and process_group() is not None
        try:
            if self._pending_layer is not None:
                if status == "completed" or process_group() is None:
                    self._finish_layer(update=None)
                else:
                    self._drop_layer()
            if self._failing:  # never gathered: other ranks may be gone
                self._ungathered = []
            else:
                self._gather()
            self.flush()
            if self.rank == 0:
                missing = {k: self._why(k) for k in ABSENT_RULES_OUT
                           if k not in self._seen and k not in self._declared}
                if missing:
                    self._log_absent(missing)
        except Exception:
            if status == "completed":
                status, error = "failed", traceback.format_exc()
            else:
                error = (error or "") + "\nwhile flushing the audit run:\n" + traceback.format_exc()
        self.sink.close(status, error)

    # -- the sink's columnar calls (docs/audit-api.md) ----------------------------------------

    def log_metrics(self, rows: dict[str, list]) -> None:
        """Free-form scalars as columns (`step`, `name`, `value`), written at the next flush."""
        self.sink.log_metrics(rows)

    def log(self, table: str, rows: dict[str, list]) -> None:
        """Columnar rows of any table by name, written at the next flush."""
        self.sink.log(table, rows)

    # -- internals --------------------------------------------------------------------------

    def _why(self, key: str) -> str:
        if key == "data_manifest":
            return "no data_manifest= given to start()"
        if key.startswith("steps."):
            return f"log_step was never given {key.split('.', 1)[1]}"
        method = {"steps": "log_step", "layer_stats": "log_layer_stats", "sample_stats": "log_samples",
                  "checkpoints": "log_checkpoint"}[key]
        return f"{method} was never called"

    def _log_absent(self, items: Mapping[str, str]) -> None:
        self.sink.log_event(ABSENT_EVENT, None, "info", {
            "absent": sorted(items), "reasons": dict(items),
            "rules_out": {k: ABSENT_RULES_OUT.get(k, "") for k in items}})

    def _finish_layer(self, update: Any) -> None:
        """Take the pending call's statistics, and under a process group start gathering them
        with the calls before it once they span a flush's worth of steps (flush_every): one
        collective per flush instead of one per call when layer statistics are taken every
        step. Which calls are gathered together depends only on their steps, the same on every
        rank, as a collective needs. Rows wait for their gather, so they reach the store up to
        one flush later than the steps."""
        item, self._pending_layer = self._pending_layer, None
        if item is None:
            return
        rows = layerstats.reduce(item, update)
        if self.world_size == 1 or process_group() is None:
            self._layers.append(rows)
            return
        self._ungathered.append(rows)
        gap = self._layer_gap
        if gap is None or gap <= 0 or rows.step - self._ungathered[0].step + gap >= self.flush_every:
            self._gather()

    def _gather(self) -> None:
        """Start the all_gather of the calls not yet gathered (collective)."""
        if not self._ungathered:
            return
        if process_group() is None:  # destroyed before close: one rank's shards are not the rows
            self.sink.log_event("layer_stats_dropped", None, "warning", {
                "steps": [r.step for r in self._ungathered],
                "reason": "the process group was destroyed before the audit run closed: these calls' "
                          "statistics could not be reduced over ranks (close the run first)"})
        else:
            layerstats.gather(self._ungathered)
            self._layers += self._ungathered
        self._ungathered = []

    def _drop_layer(self) -> None:
        item, self._pending_layer = self._pending_layer, None
        if item is not None and item.handle is not None:
            item.handle.remove()


@functools.cache
def _step_extra_columns() -> frozenset[str]:
    """`steps` columns a log_step keyword may fill (built once: log_step runs every step)."""
    from k2repro.audit import schema as S

    return frozenset(S.column_names("steps")) - {"run_id", "step", "time"}


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    total = 0
    for dirpath, _, files in os.walk(p):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


__all__ = ["AuditRun"]
