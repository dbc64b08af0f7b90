"""Writing the store: Arrow conversion against the explicit schema, atomic segments, the store's
schema stubs and DuckDB file, and whole-run writes for importers and replay.

Atomicity comes from names: a segment is written as `.<name>.tmp` (never matching `*.parquet`)
and renamed; a whole run is built in a dot folder beside its final place (the query layer skips
folders whose name starts with a dot) and renamed. A reader therefore sees a segment, or a run,
completely or not at all, and a SIGKILL at any moment leaves nothing torn.
"""

from __future__ import annotations

import json
import os
import secrets as _secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.audit import schema as S
from k2repro.audit.manifest import record, writer_of
from k2repro.audit.redact import REDACTED, Redactor, is_secret_name, scrub_table
from k2repro.audit.storemeta import ensure_store
from k2repro.core.atomic import atomic_dir, atomic_write_bytes
from k2repro.core.ids import check_run_id
from k2repro.core.layout import RUN_MARKER
from k2repro.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

#: Live segments are rewritten every flush while a run trains, by a thread that shares the
#: cores with training: snappy, dictionaries for strings only and min/max statistics only on
#: the columns queries filter on halve the cost of a small segment against zstd with
#: everything, at about the same size (`k2repro gc --compact` rewrites them with zstd).
LIVE_COMPRESSION = "snappy"
STAT_COLUMNS = ("run_id", "step", "rank", "sample_id", "param", "kind", "key")

#: Called by the writer after a segment's temp file is complete and before it is renamed:
#: (table, temp path). Fault injection uses it to die at the worst moment.
WriteHook = Callable[[str, Path], None]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# ----------------------------------------------------------------------------- Arrow conversion

def _ts_array(values: Sequence[Any], type_: pa.DataType) -> pa.Array:
    """Timestamps from datetimes, epoch seconds (int/float) or ISO strings."""
    import pyarrow as pa

    micros: list[int | None] = []
    for v in values:
        if v is None:
            micros.append(None)
        elif isinstance(v, datetime):
            if v.tzinfo is None:
                v = v.replace(tzinfo=timezone.utc)
            micros.append(int(round(v.timestamp() * 1e6)))
        elif isinstance(v, str):
            d = datetime.fromisoformat(v)
            d = d if d.tzinfo else d.replace(tzinfo=timezone.utc)
            micros.append(int(round(d.timestamp() * 1e6)))
        else:
            micros.append(int(round(float(v) * 1e6)))
    return pa.array(micros, type=pa.int64()).cast(type_)


def _to_bool(v: Any) -> bool:
    if isinstance(v, str):
        low = v.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no", ""):
            return False
        raise ValueError(f"not a boolean: {v!r}")
    return bool(v)


def _to_int(v: Any) -> int:
    """Exact only: 512.0 -> 512, but 2.5 is an error rather than a silent truncation."""
    if isinstance(v, str):
        return int(v)
    f = float(v)
    if f != int(f):
        raise ValueError(f"not an integer: {v!r}")
    return int(f)


def _fallback(values: Sequence[Any], type_: pa.DataType) -> pa.Array:
    import pyarrow as pa

    if pa.types.is_timestamp(type_):
        return _ts_array(values, type_)
    if pa.types.is_boolean(type_):
        conv: Callable[[Any], Any] = _to_bool
    elif pa.types.is_integer(type_):
        conv = _to_int
    elif pa.types.is_floating(type_):
        conv = float
    else:
        conv = str
    return pa.array([None if v is None else conv(v) for v in values], type=type_)


def _to_array(values: Any, type_: pa.DataType, where: str) -> pa.Array:
    import pyarrow as pa

    try:
        if isinstance(values, pa.Array | pa.ChunkedArray):
            return values.cast(type_)
        if pa.types.is_timestamp(type_):
            return _ts_array(list(values), type_)
        if pa.types.is_integer(type_):
            # pa.array(..., type=int64) truncates 2.5 to 2 silently; a safe cast refuses it.
            # (The cast only where the inferred type differs: it is a compute call, and the
            # live writer converts every column of every flush.)
            arr = pa.array(values)
            return arr if arr.type == type_ else arr.cast(type_)
        return pa.array(values, type=type_)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):  # any Arrow refusal: fall back
        pass
    try:
        return _fallback(list(values), type_)
    except Exception as exc:
        raise ValueError(f"{where}: cannot store values as {type_}: {exc}") from None


@lru_cache(maxsize=32)  # the run id column of every live write: the same (run id, rows) again
def repeat_string(value: str, n: int) -> pa.Array:
    """`n` copies of one string as an Arrow string array, built from buffers (a Python list of
    a million strings costs a second; this costs milliseconds). Arrow arrays are immutable,
    so a cached one is safe to share."""
    import numpy as np
    import pyarrow as pa

    b = value.encode()
    if n * len(b) >= 2**31:
        return pa.array([value] * n, type=pa.string())
    offsets = np.arange(n + 1, dtype=np.int32) * np.int32(len(b))
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(b * n))


def _redact_named_rows(table: str, tbl: pa.Table) -> pa.Table:
    """hparams/env rows whose key names a credential get their value REDACTED."""
    if table not in ("hparams", "env") or tbl.num_rows == 0:
        return tbl
    import pyarrow as pa

    keys = tbl.column("key").to_pylist()
    values = tbl.column("value").to_pylist()
    changed = False
    for i, k in enumerate(keys):
        if k is None or values[i] is None or values[i] == REDACTED:
            continue
        if table == "env" and k.startswith("pkg."):
            continue  # package names such as google-auth are not credentials
        if is_secret_name(k):
            values[i] = REDACTED
            changed = True
    if not changed:
        return tbl
    idx = tbl.schema.get_field_index("value")
    return tbl.set_column(idx, tbl.schema.field(idx), pa.array(values, type=pa.string()))


def to_arrow(table: str, data: Any, run_id: str, redactor: Redactor | None = None) -> pa.Table:
    """Conform `data` (a column -> values mapping, a pyarrow Table or a pandas DataFrame) to the
    table's explicit schema: unknown columns are an error, missing nullable columns become
    NULL, `run_id` is filled in, every string is redacted."""
    import pyarrow as pa

    schema = S.arrow_schema(table)
    if hasattr(data, "to_dict") and hasattr(data, "columns") and not isinstance(data, pa.Table):
        data = pa.Table.from_pandas(data, preserve_index=False)
    if isinstance(data, pa.Table):
        cols: Mapping[str, Any] = {n: data.column(n) for n in data.column_names}
        n = data.num_rows
    elif isinstance(data, Mapping):
        cols = data
        lengths = {k: len(v) for k, v in cols.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{table}: columns differ in length: {lengths}")
        n = next(iter(lengths.values()), 0)
    else:
        raise TypeError(f"{table}: expected a mapping of columns, a pyarrow Table or a DataFrame")
    known = S.column_names(table)
    unknown = [k for k in cols if k not in known]
    if unknown:
        raise ValueError(f"{table}: unknown column(s) {unknown} (known: {', '.join(schema.names)})")
    arrays = []
    for field in schema:
        where = f"{table}.{field.name}"
        vals = cols.get(field.name)
        if field.name == "run_id":
            if vals is not None:
                given = {v for v in (vals.to_pylist() if hasattr(vals, "to_pylist") else vals) if v is not None}
                if given - {run_id}:
                    raise ValueError(f"{where}: rows of other runs {sorted(given - {run_id})[:3]} "
                                     f"in a write for run {run_id}")
            arr = repeat_string(run_id, n)
        elif vals is None:
            if not field.nullable:
                raise ValueError(f"{where}: required column missing")
            arr = pa.nulls(n, type=field.type)
        else:
            arr = _to_array(vals, field.type, where)
            if not field.nullable and arr.null_count:
                raise ValueError(f"{where}: required column has {arr.null_count} null value(s)")
        if redactor and pa.types.is_string(field.type) and field.name != "run_id":
            arr = redactor.scrub_array(arr)
        arrays.append(arr)
    tbl = pa.Table.from_arrays(arrays, schema=schema)
    return _redact_named_rows(table, tbl)


# ----------------------------------------------------------------------------- files

def write_segment(table_dir: Path, name: str, tbl: pa.Table, on_write: WriteHook | None = None,
                  fsync: bool = False, scrubbed: bool = False) -> Path:
    """One Parquet segment, written as `.<name>.tmp` then renamed to `<name>`.

    Encoded in memory first: its sha256 for the segment manifest comes from the same bytes,
    and the file is one write (the writer thread's cost per segment is what the audit costs a
    training step, docs/audit-store.md). `scrubbed`: every string was already scrubbed by
    `to_arrow` with a redactor (the live writer, whose open segment is rewritten every flush:
    scrubbing its old rows again was a tenth of the writer's CPU)."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    if not scrubbed:
        tbl = scrub_table(tbl)  # credentials by value, whoever writes (audit/redact.py)
    names = tbl.schema.names
    sink = pa.BufferOutputStream()
    pq.write_table(tbl, sink, compression=LIVE_COMPRESSION, write_page_checksum=True,  # verify-store
                   write_statistics=[c for c in STAT_COLUMNS if c in names],
                   use_dictionary=[f.name for f in tbl.schema if pa.types.is_string(f.type)])
    data = memoryview(sink.getvalue())
    final = table_dir / name
    tmp = table_dir / f".{name}.tmp"
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except FileNotFoundError:  # the table's first segment
            table_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while data:  # one write normally; a short write (a full pipe, a signal) goes on
                data = data[os.write(fd, data):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:  # a full disk: give the space back, so that the end marker still fits
        tmp.unlink(missing_ok=True)
        raise
    if on_write is not None:
        on_write(table_dir.name, tmp)
    # The checksum is recorded before the rename: every segment a reader can see has one.
    buf = sink.getvalue()
    record(table_dir.parent, writer_of(name), [(f"{table_dir.name}/{name}", hashlib.sha256(buf).hexdigest(),
                                                buf.size)], fsync=fsync)
    os.replace(tmp, final)
    return final


def write_run_marker(run_dir: Path, run_id: str) -> None:
    """`_run.json`: lets tools find run folders at any depth without reading Parquet."""
    atomic_write_bytes(run_dir / RUN_MARKER, json.dumps({
        "run_id": run_id, "schema_version": S.SCHEMA_VERSION, "created_at": utcnow().isoformat(),
    }).encode())


# ----------------------------------------------------------------------------- whole runs

def _hparam_secrets(redactor: Redactor, data: Any) -> None:
    """Values of secret-named hparams are secrets everywhere else too."""
    if data is None:
        return
    if hasattr(data, "column_names"):
        keys, values = data.column("key").to_pylist(), data.column("value").to_pylist()
    elif hasattr(data, "columns") and hasattr(data, "to_dict"):
        keys, values = list(data["key"]), list(data["value"])
    else:
        keys, values = list(data.get("key", [])), list(data.get("value", []))
    redactor.add(*(v for k, v in zip(keys, values, strict=False) if k and is_secret_name(str(k))))


def write_run_tables(root: str | Path, run_id: str, tables: Mapping[str, Any],
                     secrets: Iterable[str] = ()) -> Path:
    """Write a complete run (importers, replay) atomically: every table is built in a dot
    folder beside `<root>/<run_id>` and the folder is renamed into place, so readers see the
    whole run or nothing. `tables` maps table name -> pyarrow Table (or column dict / pandas
    DataFrame); `runs` is required; `run_end` defaults to one `completed` row. Secrets in the
    environment, in `secrets` and under secret-named hparams are redacted."""
    check_run_id(run_id)
    root = Path(root)
    unknown = [t for t in tables if t not in S.TABLES]
    if unknown:
        raise ValueError(f"unknown audit table(s) {unknown} (known: {', '.join(S.TABLES)})")
    if "runs" not in tables:
        raise ValueError("write_run_tables: a run needs its `runs` row")
    final = root / run_id
    if final.exists():
        raise BadInputError(f"run {run_id} already exists in {root}")
    ensure_store(root)
    redactor = Redactor.from_env(secrets=secrets)
    _hparam_secrets(redactor, tables.get("hparams"))
    converted = {name: to_arrow(name, data, run_id, redactor) for name, data in tables.items()}
    if converted["runs"].num_rows != 1:
        raise ValueError(f"write_run_tables: `runs` must hold exactly one row (got {converted['runs'].num_rows})")
    if "run_end" not in converted:
        converted["run_end"] = to_arrow("run_end", {
            "rank": [0], "status": ["completed"], "ended_at": [utcnow()],
            "pid": [os.getpid()], "host": [socket.gethostname()]}, run_id)
    try:
        with atomic_dir(final, replace=False, tmp_prefix=f".k2tmp-{run_id}-") as stage:
            write_run_marker(stage, run_id)
            for name, tbl in converted.items():
                write_segment(stage / name, "r0-00000000.parquet", tbl)
    except FileExistsError:
        raise BadInputError(f"run {run_id} already exists in {root}") from None
    return final


def append_table(root: str | Path, run_id: str, table: str, data: Any,
                 secrets: Iterable[str] = ()) -> Path:
    """Add rows of one table to a run as one new atomic segment in `<root>/<run_id>/<table>/`
    (forensics' `spikes`, eval's `evals`, ...). `root` may be a different folder of the same
    store than the run's own (DVC stages keep disjoint outputs): the query layer joins on
    `run_id`, not on folders."""
    check_run_id(run_id)
    root = Path(root)
    ensure_store(root)
    redactor = Redactor.from_env(secrets=secrets)
    tbl = to_arrow(table, data, run_id, redactor)
    name = f"x-{time.time_ns():020d}-{_secrets.token_hex(4)}.parquet"
    return write_segment(root / run_id / table, name, tbl)
