"""TensorBoard event files (`events.out.tfevents.*`): scalars only, one run per directory.

Read without TensorFlow or the `tensorboard` package: an event file is a sequence of TFRecords
(uint64 length, masked CRC-32C of the length, the bytes, masked CRC-32C of the bytes), each an
`Event` protocol buffer. The few fields we need are decoded from the wire format directly:

    Event:        1 wall_time (double), 2 step (int64), 5 summary, 7 session_log
    Summary:      1 value (repeated)
    Value:        1 tag, 2 simple_value (float), 8 tensor, 9 metadata
    TensorProto:  1 dtype, 2 tensor_shape, 4 tensor_content, 5 float_val, 6 double_val,
                  7 int_val, 10 int64_val
    SessionLog:   1 status (START = 1)

Scalars written as `simple_value` (tensorboardX, torch.utils.tensorboard, TF1) and as 0-d
tensors (TF2 `tf.summary.scalar`, plugin `scalars`) are both read. A directory's files are read
in order of their first event's time; a new file or a SessionLog START is a restart marker:
steps at or after the resumed step are replaced by the later values, as TensorBoard itself
purges them, and a `restart` event records it. A step that goes back without a marker is an
error naming the file and record.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k2repro.errors import BadInputError
from k2repro.importers.names import STEP_COLUMNS, NameMap
from k2repro.importers.parsed import ImportedRun, sha256_path

KIND = "tensorboard"
EVENT_GLOB = "*tfevents*"
#: Megatron writes some series against consumed samples/tokens, not iterations: left out.
OTHER_AXIS_SUFFIXES = (" vs samples", " vs tokens")

# ----------------------------------------------------------------------------- CRC-32C


def _crc_table() -> list[int]:
    poly = 0x82F63B78
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    t = _CRC_TABLE
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ----------------------------------------------------------------------------- protobuf wire


class _WireError(ValueError):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise _WireError("varint too long")


def fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of one message: ints for varints, bytes for the rest."""
    out = []
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _varint(buf, pos)
        elif wt == 1:
            if pos + 8 > n:
                raise _WireError("truncated fixed64")
            val, pos = buf[pos:pos + 8], pos + 8
        elif wt == 2:
            ln, pos = _varint(buf, pos)
            if pos + ln > n:
                raise _WireError("truncated bytes field")
            val, pos = buf[pos:pos + ln], pos + ln
        elif wt == 5:
            if pos + 4 > n:
                raise _WireError("truncated fixed32")
            val, pos = buf[pos:pos + 4], pos + 4
        else:
            raise _WireError(f"unsupported wire type {wt}")
        out.append((num, wt, val))
    return out


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


_DTYPES = {1: ("<f", 4), 2: ("<d", 8), 3: ("<i", 4), 4: ("<B", 1), 5: ("<h", 2), 6: ("<b", 1),
           9: ("<q", 8), 10: ("<?", 1), 19: ("<e", 2)}


def _tensor_scalar(buf: bytes) -> float | None:
    """The value of a 0-d numeric TensorProto, else None."""
    dtype = None
    dims = 0
    vals: list[float] = []
    content = None
    for num, wt, v in fields(buf):
        if num == 1 and wt == 0:
            dtype = v
        elif num == 2 and wt == 2:
            dims = sum(1 for n, _, _ in fields(v) if n == 2)
        elif num == 4 and wt == 2:
            content = v
        elif num == 5:
            vals += ([struct.unpack("<f", v)[0]] if wt == 5
                     else list(struct.unpack(f"<{len(v) // 4}f", v)))
        elif num == 6:
            vals += ([struct.unpack("<d", v)[0]] if wt == 1
                     else list(struct.unpack(f"<{len(v) // 8}d", v)))
        elif num in (7, 10):
            if wt == 0:
                vals.append(_signed64(v))
            else:
                p = 0
                while p < len(v):
                    x, p = _varint(v, p)
                    vals.append(_signed64(x))
        elif num == 13 and wt == 0:  # half_val: float16 bits
            vals.append(struct.unpack("<e", struct.pack("<H", v & 0xFFFF))[0])
    if dims or dtype not in _DTYPES:
        return None
    if content is not None:
        fmt, size = _DTYPES[dtype]
        if len(content) != size:
            return None
        return float(struct.unpack(fmt, content)[0])
    return float(vals[0]) if len(vals) == 1 else None


def _plugin(meta: bytes) -> str | None:
    for num, _, v in fields(meta):
        if num == 1:
            for n2, _, v2 in fields(v):
                if n2 == 1:
                    return v2.decode("utf-8", "replace")
    return None


@dataclass
class _Point:
    tag: str
    step: int
    value: float
    wall: float


def read_records(path: Path) -> list[bytes]:
    """The records of one event file; BadInputError names the record that is truncated or
    fails its checksum."""
    data = path.read_bytes()
    out = []
    pos, n, k = 0, len(data), 0
    while pos < n:
        k += 1
        if pos + 12 > n:
            raise BadInputError(f"{path}: record {k} (byte {pos}): truncated record header")
        hdr = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", hdr)
        (len_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if masked_crc(hdr) != len_crc:
            raise BadInputError(f"{path}: record {k} (byte {pos}): length checksum mismatch "
                                "(not a TensorBoard event file, or corrupt)")
        start, end = pos + 12, pos + 12 + length
        if end + 4 > n:
            raise BadInputError(f"{path}: record {k} (byte {pos}): truncated record "
                                f"({length} bytes announced, {max(0, n - start - 4)} present)")
        payload = data[start:end]
        (data_crc,) = struct.unpack("<I", data[end:end + 4])
        if masked_crc(payload) != data_crc:
            raise BadInputError(f"{path}: record {k} (byte {pos}): data checksum mismatch")
        out.append(payload)
        pos = end + 4
    return out


def _decode(path: Path, records: list[bytes], scalar_tags: dict[str, bool]
            ) -> tuple[float | None, list[tuple[int, str, Any]]]:
    """-> (first wall time, [(record no, 'point'|'start', payload)])."""
    first_wall = None
    out: list[tuple[int, str, Any]] = []
    for k, rec in enumerate(records, start=1):
        try:
            ev = fields(rec)
            wall, step, summary, session = 0.0, 0, None, None
            for num, wt, v in ev:
                if num == 1 and wt == 1:
                    wall = struct.unpack("<d", v)[0]
                elif num == 2 and wt == 0:
                    step = _signed64(v)
                elif num == 5 and wt == 2:
                    summary = v
                elif num == 7 and wt == 2:
                    session = v
            if first_wall is None:
                first_wall = wall
            if session is not None:
                status = next((v for n, w, v in fields(session) if n == 1 and w == 0), None)
                if status == 1:
                    out.append((k, "start", (step, wall)))
            if summary is None:
                continue
            for num, wt, v in fields(summary):
                if num != 1 or wt != 2:
                    continue
                tag, value, tensor, meta = None, None, None, None
                for n2, w2, v2 in fields(v):
                    if n2 == 1 and w2 == 2:
                        tag = v2.decode("utf-8", "replace")
                    elif n2 == 2 and w2 == 5:
                        value = struct.unpack("<f", v2)[0]
                    elif n2 == 8 and w2 == 2:
                        tensor = v2
                    elif n2 == 9 and w2 == 2:
                        meta = v2
                if tag is None:
                    continue
                if meta is not None:
                    plugin = _plugin(meta)
                    if plugin is not None:
                        scalar_tags.setdefault(tag, plugin == "scalars")
                if value is None and tensor is not None and scalar_tags.get(tag, True):
                    value = _tensor_scalar(tensor)
                if value is not None and scalar_tags.get(tag, True):
                    out.append((k, "point", _Point(tag, step, float(value), wall)))
        except (_WireError, struct.error, UnicodeDecodeError) as exc:
            raise BadInputError(f"{path}: record {k}: not a valid Event ({exc})") from None
    return first_wall, out


def find_runs(path: Path) -> dict[str, list[Path]]:
    """relative directory ('.' for PATH itself) -> its event files."""
    if path.is_file():
        return {".": [path]}
    if not path.is_dir():
        raise BadInputError(f"{path}: no such file or directory")
    runs: dict[str, list[Path]] = {}
    for f in sorted(path.rglob(EVENT_GLOB)):
        if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts):
            runs.setdefault(str(f.parent.relative_to(path)), []).append(f)
    if not runs:
        raise BadInputError(f"{path}: no TensorBoard event files (events.out.tfevents.*) below it")
    return runs


def read(path: str | Path, names: NameMap, offset: int = 0) -> list[ImportedRun]:
    """One ImportedRun per directory holding event files."""
    path = Path(path)
    runs = find_runs(path)
    return [_read_run(path, rel, files, names, offset, len(runs)) for rel, files in runs.items()]


#: tag -> step -> (value, wall time)
Series = dict[str, dict[int, tuple[float, float]]]


def _read_run(root: Path, rel: str, files: list[Path], names: NameMap, offset: int,
              n_runs: int) -> ImportedRun:
    import numpy as np
    import pyarrow as pa

    decoded = _decode_files(files)
    series, restarts, skipped_tags = _merge(decoded, offset)
    sha = sha256_path(root) if root.is_file() else sha256_path(files[0].parent, files)
    label = None if rel == "." and n_runs == 1 else rel
    run = ImportedRun(KIND, str(root if root.is_file() else root / rel), sha, source_run=label)
    if not series:
        raise BadInputError(f"{run.path}: no scalar summaries in the event file(s)")
    col_series, mapped = _map_series(run, series, names)
    all_steps = sorted(set().union(*[set(s) for s in col_series.values()])) if col_series else []
    run.steps = pa.array(np.asarray(all_steps, dtype=np.int64), type=pa.int64())
    for target, s in col_series.items():
        run.columns[target] = pa.array([s[x][0] if x in s else None for x in all_steps], type=pa.float64())
    if all_steps:
        walls = [min(s[x][1] for s in col_series.values() if x in s) for x in all_steps]
        run.columns["time"] = pa.array(walls, type=pa.float64())
    every_wall = [w for s in series.values() for _, w in s.values()]
    run.started_at, run.ended_at = min(every_wall), max(every_wall)
    loss = col_series.get("loss", {})
    for x in all_steps:
        if x in loss and not np.isfinite(loss[x][0]):
            run.event("nan", step=int(x), severity="warning", time_s=loss[x][1], signal="loss")
    for rs in restarts:
        run.event("restart", step=rs.pop("step"), severity="warning", time_s=rs.pop("time"), **rs)
    run.hparams.update({
        "import.kind": KIND, "import.path": run.path, "import.content_sha256": sha,
        "import.source_run": label, "import.files": [f.name for _, _, f, _ in decoded],
        "import.sampled": False, "import.step_offset": offset, "import.restarts": len(restarts),
        **{f"import.map.{t}": m for t, m in sorted(mapped.items())},
    })
    if skipped_tags:
        run.hparams["import.skipped_tags"] = sorted(skipped_tags)
    return run


def _decode_files(files: list[Path]) -> list[tuple[float, str, Path, list]]:
    """(first wall time, name, path, items) of each file, in the order they were written."""
    scalar_tags: dict[str, bool] = {}
    decoded = []
    for f in files:
        first_wall, items = _decode(f, read_records(f), scalar_tags)
        decoded.append((first_wall if first_wall is not None else float("inf"), f.name, f, items))
    decoded.sort(key=lambda d: (d[0], d[1]))
    return decoded


def _merge(decoded: list[tuple[float, str, Path, list]], offset: int
           ) -> tuple[Series, list[dict[str, Any]], set[str]]:
    """The files' points as one series per tag: a step going back after a restart marker (a
    new file, a SessionLog START) replaces the later points, as TensorBoard purges them.
    Returns (series, restarts, tags left out for counting samples or tokens)."""
    series: Series = {}
    last: dict[str, int] = {}
    restarts: list[dict[str, Any]] = []
    skipped_tags: set[str] = set()
    for fi, (_, _, f, items) in enumerate(decoded):
        marker: str | None = "new event file" if fi > 0 else None
        for k, what, payload in items:
            if what == "start":
                marker = "SessionLog START" if last else None
                continue
            p: _Point = payload
            if p.tag.endswith(OTHER_AXIS_SUFFIXES):
                skipped_tags.add(p.tag)
                continue
            step = p.step + offset
            if step < 1:
                raise BadInputError(f"{f}: record {k}: tag {p.tag!r} step {p.step}: steps are "
                                    "numbered from 1 (if the source counts from 0, pass --step-offset 1)")
            prev = last.get(p.tag)
            if prev is not None and step <= prev:
                if marker is None:
                    word = "repeats" if step == prev else "goes back"
                    raise BadInputError(f"{f}: record {k}: tag {p.tag!r} step {word} ({prev} then "
                                        f"{step}) without a restart marker")
                restarts.append({"step": step, "time": p.wall, "file": f.name, "record": k,
                                 "marker": marker, "previous_last_step": prev,
                                 "replaced_points": _purge(series, last, step)})
                marker = None
            elif marker is not None and prev is not None:
                marker = None  # the new file continues where the last one stopped
            series.setdefault(p.tag, {})[step] = (p.value, p.wall)
            last[p.tag] = step
    return series, restarts, skipped_tags


def _purge(series: Series, last: dict[str, int], step: int) -> int:
    """Drop every tag's points at or after `step` (a restart resumed there); returns how many."""
    purged = 0
    for tag, s in series.items():
        drop = [x for x in s if x >= step]
        for x in drop:
            del s[x]
        purged += len(drop)
        last[tag] = max(s) if s else 0
    return purged


def _map_series(run: ImportedRun, series: Series, names: NameMap) -> tuple[Series, dict[str, str]]:
    """Tags onto `steps` columns (returned, by target) or `metrics` series (put in the run);
    returns (column series, tag -> target)."""
    import numpy as np
    import pyarrow as pa

    mapped: dict[str, str] = {}
    col_series: Series = {}
    for tag in sorted(series):
        target, scale = names.target(tag)
        if target is None or target == "step":
            continue
        s = series[tag]
        if scale != 1.0:
            s = {k: (v * scale, w) for k, (v, w) in s.items()}
        if target in STEP_COLUMNS and target != "time" and target not in col_series:
            col_series[target] = s
        else:
            name = target if target not in run.metrics and target not in STEP_COLUMNS else tag
            st = np.fromiter(sorted(s), dtype=np.int64, count=len(s))
            run.metrics[name] = (pa.array(st), pa.array([s[x][0] for x in st], type=pa.float64()))
        mapped[tag] = target
    return col_series, mapped
