"""Corpus readers: JSONL (plain, .gz, .zst), Parquet, Hugging Face `datasets` saved to disk
and folders of text files -> documents, streamed with bounded memory.

`resolve_inputs` turns `data.inputs` (files, folders, globs; one or a list) into a sorted list
of `InputFile`s; `read_file` streams the documents of one of them. The split is per file so
an executor can hand files to workers; nothing here keeps more than one record batch (or one
JSONL line, or one text file) in memory, whatever the corpus size.

Every document gets a stable id, `<part>:<key>`: `part` is the record file's path relative to
the input (without extensions; a `datasets` folder counts as one file named by its folder,
plus `/<split>` for a DatasetDict), `key` the record's id field (`data.id_field`), else its
line (`L<n>`, JSONL) or row (`R<n>`, Parquet; for `datasets` the row across all its shards,
so re-saving with another shard count keeps the ids); a text file's id is its relative path.
Ids do not depend on how many documents came before, so adding a file or a record elsewhere
leaves them unchanged, and the same records give the same ids in every format.

Bad input raises BadInputError naming the file and line (or row), on one line: the
`k2repro data` commands turn it into exit code 2 before they write anything.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import logging
import os
import re
import unicodedata
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

from k2repro.errors import BadInputError

log = logging.getLogger(__name__)

_COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
JSONL_SUFFIXES = tuple(b + c for b in (".jsonl", ".ndjson") for c in ("", *_COMPRESSION))
PARQUET_SUFFIXES = (".parquet",)
# `datasets` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
FORMATS = ("auto", "jsonl", "parquet", "datasets", "text")
DS_STATE, DS_INFO, DS_DICT = "state.json", "dataset_info.json", "dataset_dict.json"
# Extensions read as domain "code" in a directory of text files; everything else is "prose".
CODE_SUFFIXES = frozenset(
    ".py .pyi .c .h .cc .cpp .hpp .cxx .rs .go .java .js .ts .tsx .jsx .rb .sh .bash .pl .pm "
    ".lua .scala .kt .swift .cs .php .r .jl .hs .ml .sql .cu .cuh .f90 .m .mm .zig .nim".split()
)
DEFAULT_DOMAIN = "other"  # records with no `domain` field
ID_FIELD = "id"
DOMAIN_FIELD = "domain"
BATCH_ROWS = 1024  # rows per Parquet record batch: bounds memory with long documents
# Files up to this size are fingerprinted by their full sha256; larger ones by sampled blocks.
FULL_HASH_MAX = 64 << 20
SAMPLE_BLOCKS, SAMPLE_BLOCK = 16, 1 << 20
_GLOB_CHARS = re.compile(r"[*?[]")


@dataclass(frozen=True)
class RawDoc:
    doc_id: str
    domain: str
    text: str
    origin: str  # "<file>:<line>" or "<file>:row <n>" for error messages and reports


@dataclass(frozen=True)
class InputFile:
    """One file of the corpus, as `resolve_inputs` found it.

    `format` is its reader (`jsonl`, `parquet`, `datasets`, `text`), `part` the id prefix of
    its documents (for `text` the whole document id), `compression` (`gzip`, `zstd` or None)
    how a JSONL or text file is compressed, `row0` the index of a `datasets` shard's first
    row in its dataset (0 elsewhere), so that one shard is readable on its own, `rel` the
    file's path below its input, with extensions (`code.jsonl.gz`, `hf/data-00000-of-00002.arrow`),
    for naming it in a manifest. Plain data: it pickles, for executors that ship it to workers."""

    path: Path
    format: str
    size: int
    part: str
    compression: str | None = None
    row0: int = 0
    rel: str = ""


def _one_line(exc: BaseException) -> str:
    """An exception's text on one line (pyarrow's messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _suffix_of(path: Path) -> str:
    name = path.name.lower()
    for s in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _compression_of(path: Path) -> str | None:
    return _COMPRESSION.get(path.suffix.lower())


def _kind_of(path: Path) -> str:
    s = _suffix_of(path)
    return "jsonl" if s in JSONL_SUFFIXES else "parquet" if s in PARQUET_SUFFIXES else "text"


def _part_name(rel: Path) -> str:
    name = rel.as_posix()
    suffix = _suffix_of(rel)
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name


# ---------------------------------------------------------------- finding the files


def _is_dataset_dir(d: Path) -> bool:
    """A `Dataset.save_to_disk` folder: state.json beside dataset_info.json or Arrow files."""
    return (d / DS_STATE).is_file() and ((d / DS_INFO).is_file() or any(d.glob("*.arrow")))


def _not_a_dataset(d: Path) -> BadInputError:
    what = "Arrow files but no" if any(d.glob("*.arrow")) else "no"
    return BadInputError(f"{d}: not a Hugging Face datasets folder ({what} {DS_STATE}; "
                         "write it with Dataset.save_to_disk)")


def _dataset_shards(d: Path, part: str) -> list[InputFile]:
    """The Arrow shards a `Dataset.save_to_disk` folder lists in its state.json, in that
    order, each with the index of its first row (counted from the memory-mapped stream's
    batch headers, so the data itself is not read)."""
    state_path = d / DS_STATE
    if not state_path.is_file():
        raise _not_a_dataset(d)
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        names = [e["filename"] for e in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"{state_path}: not a datasets state file ({_one_line(exc)})") from None
    if not names:
        raise BadInputError(f"{state_path}: lists no Arrow data files")
    out, row0 = [], 0
    for name in names:
        p = d / name
        if not p.is_file():
            raise BadInputError(f"{p}: missing (listed in {state_path})")
        rel = f"{part}/{name}" if part else name
        out.append(InputFile(p, "datasets", p.stat().st_size, part, None, row0, rel))
        row0 += _arrow_rows(p)
    return out


def _dataset_dir_files(d: Path, part: str) -> list[InputFile]:
    """A dataset folder, or a DatasetDict folder (one dataset per split, part `<part>/<split>`)."""
    if (d / DS_DICT).is_file():
        try:
            splits = json.loads((d / DS_DICT).read_text(encoding="utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BadInputError(f"{d / DS_DICT}: not a datasets dict file ({_one_line(exc)})") from None
        return [f for s in splits for f in _dataset_shards(d / s, f"{part}/{s}" if part else s)]
    return _dataset_shards(d, part)


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """(files, dataset folders) below `root`, sorted, skipping hidden files and folders; the
    files inside a dataset folder belong to it and are not listed."""
    def unreadable(err: OSError) -> None:
        raise BadInputError(f"{err.filename}: cannot list ({err.strerror})")

    files, datasets = [], []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        here = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        if here != root and (_is_dataset_dir(here) or (here / DS_DICT).is_file()):
            datasets.append(here)
            dirnames[:] = []
            continue
        files += [here / n for n in filenames if not n.startswith(".") and (here / n).is_file()]
    return sorted(files), sorted(datasets)


def _select(cands: list[tuple[Path, Path]], dsets: list[tuple[Path, str]], fmt: str,
            where: str) -> list[InputFile]:
    """InputFiles from candidate (file, base) and (dataset folder, part) pairs; `auto` keeps
    the record files and datasets when there are any (a README beside them is ignored), else
    reads every file as a text document."""
    if fmt == "text":
        chosen = [(p, b, "text") for p, b in cands]
        dsets = []
    else:
        loose = [p for p, _ in cands if p.suffix.lower() == ".arrow"]
        if loose and fmt in ("auto", "datasets"):
            raise _not_a_dataset(loose[0].parent)
        chosen = [(p, b, _kind_of(p)) for p, b in cands]
        if fmt in ("jsonl", "parquet"):
            chosen, dsets = [c for c in chosen if c[2] == fmt], []
        elif fmt == "datasets":
            chosen = []
        else:
            records = [c for c in chosen if c[2] != "text"]
            chosen = records if records or dsets else [(p, b, "text") for p, b, _ in chosen]
    out = []
    for p, base, kind in chosen:
        rel = p.relative_to(base)
        part = rel.as_posix() if kind == "text" else _part_name(rel)
        out.append(InputFile(p, kind, p.stat().st_size, part, _compression_of(p), 0, rel.as_posix()))
    for d, part in dsets:
        out += _dataset_dir_files(d, part)
    if not out:
        raise BadInputError(f"{where}: no input files" + (f" of format {fmt}" if fmt != "auto" else ""))
    return out


def _glob_root(pattern: str) -> Path:
    """The folder a glob's matches are named relative to: its leading part without wildcards."""
    parts = Path(pattern).parts
    fixed = []
    for p in parts[:-1]:
        if _GLOB_CHARS.search(p):
            break
        fixed.append(p)
    return Path(*fixed) if fixed else Path(".")


def _resolve_one(spec: str, fmt: str) -> list[InputFile]:
    if _GLOB_CHARS.search(spec) and not Path(spec).exists():  # `a[1].jsonl` may be a real name
        root = _glob_root(spec)
        matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
        if not matches:
            raise BadInputError(f"{spec}: the pattern matches no file (data.inputs)")
        cands: dict[Path, Path] = {}
        dsets: set[Path] = set()

        def dataset_of(p: Path) -> Path | None:
            """The dataset folder `p` is or lies in, up to the pattern's fixed folder: a
            pattern reaching into one (`**/*`) selects the whole dataset, not its files."""
            for d in (p, *p.parents):
                if _is_dataset_dir(d) or (d / DS_DICT).is_file():
                    return d
                if d == root:
                    return None
            return None

        for m in matches:
            d = dataset_of(m)
            if d is not None:
                dsets.add(d)
            elif m.is_dir():
                files, inner = _walk(m)
                cands.update((p, root) for p in files)
                dsets.update(inner)
            elif m.is_file():
                cands.setdefault(m, root)
        named = [(d, d.relative_to(root).as_posix() if d != root else Path(os.path.abspath(d)).name)
                 for d in sorted(dsets) if not any(x in dsets for x in d.parents)]
        return _select(sorted(cands.items()), named, fmt, spec)
    src = Path(spec)
    if not src.exists():
        what = "Hugging Face datasets folder" if fmt == "datasets" else "file or directory"
        raise BadInputError(f"{src}: no such {what} (data.inputs)")
    if src.is_file():
        return _select([(src, src.parent)], [], fmt, spec)
    name = Path(os.path.abspath(src)).name  # a dataset folder is named like one file
    if fmt != "text" and (_is_dataset_dir(src) or (src / DS_DICT).is_file()):
        return _dataset_dir_files(src, name)
    files, dsets = _walk(src)
    if fmt == "datasets" and not dsets:
        return _dataset_shards(src, name)  # raises: says what the folder lacks
    return _select([(p, src) for p in files], [(d, d.relative_to(src).as_posix()) for d in dsets], fmt, spec)


def _order(f: InputFile) -> tuple:
    return (tuple(f.part.split("/")), f.row0, f.path.as_posix())


def resolve_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike], fmt: str = "auto") -> list[InputFile]:
    """The files `data.inputs` names, sorted by id prefix (then shard), independent of the
    file system's listing order.

    Each input is a file, a folder or a glob (`*`, `?`, `[...]`, `**` recursive). A folder
    written by `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk`
    (dataset_dict.json) is one dataset named by its folder; any other folder is walked:
    `auto` keeps the JSONL/Parquet files and dataset folders found there, or, when there are
    none, reads every file as one text document. `jsonl`/`parquet`/`datasets`/`text` force a
    reader. Two different files whose documents would share an id prefix (`a.jsonl` beside
    `a.parquet`, or the same name in two inputs) are an error, not silently merged; so are
    `.arrow` files outside a dataset folder (a save_to_disk folder that lost its state.json).
    An existing path is taken literally even when its name holds glob characters.
    """
    if fmt not in FORMATS:
        raise BadInputError(f"data.format must be one of {FORMATS} (got {fmt!r})")
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not specs:
        raise BadInputError("data.inputs is empty")
    seen: dict[Path, InputFile] = {}
    for spec in specs:
        for f in _resolve_one(os.fspath(spec), fmt):
            seen.setdefault(f.path.resolve(), f)  # overlapping inputs name a file once
    files = sorted(seen.values(), key=_order)
    owner: dict[str, Path] = {}
    for f in files:
        unit = f.path.parent if f.format == "datasets" else f.path
        first = owner.setdefault(f.part, unit)
        if first != unit:
            raise BadInputError(f"{first} and {unit}: both give document ids '{f.part}:...' "
                                "(rename one, or read them as separate corpora)")
    log.info("inputs: %d files, %.1f MB (%s)", len(files), sum(f.size for f in files) / 1e6,
             ", ".join(sorted({f.format for f in files})))
    return files


# ---------------------------------------------------------------- reading one file


def _open_binary(path: Path, compression: str | None) -> io.BufferedIOBase:
    """A buffered binary stream of the decompressed bytes (gzip by zlib, zstd by pyarrow's
    codec: no extra dependency); decompression happens as the stream is read."""
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        import pyarrow as pa

        return io.BufferedReader(pa.input_stream(str(path), compression="zstd"), 1 << 20)
    return open(path, "rb")


_READ_ERRORS = (OSError, EOFError, zlib.error)


def _record_doc(rec: object, where: str, part: str, line_key: str, text_field: str,
                id_field: str = ID_FIELD) -> RawDoc:
    if not isinstance(rec, dict):
        raise BadInputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if text_field not in rec:
        raise BadInputError(f"{where}: no text field '{text_field}' (set data.text_field)")
    text = rec[text_field]
    if not isinstance(text, str):
        raise BadInputError(f"{where}: field '{text_field}' is {type(text).__name__}, not a string")
    key = rec.get(id_field)
    key = line_key if key is None or key == "" else str(key)
    domain = rec.get(DOMAIN_FIELD) or DEFAULT_DOMAIN
    return RawDoc(f"{part}:{key}", str(domain), text, where)


def _read_jsonl(f: InputFile, text_field: str, id_field: str) -> Iterator[RawDoc]:
    """One document per non-empty line, read and decompressed line by line."""
    lineno = 0
    try:
        with _open_binary(f.path, f.compression) as stream:
            for raw in stream:
                lineno += 1
                where = f"{f.path}:{lineno}"
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise BadInputError(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} "
                                        f"at column {exc.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BadInputError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
                yield _record_doc(rec, where, f.part, f"L{lineno}", text_field, id_field)
    except _READ_ERRORS as exc:
        what = f"cannot decompress ({f.compression})" if f.compression else "cannot read"
        raise BadInputError(f"{f.path}:{lineno + 1}: {what}: {_one_line(exc)}") from None


def _check_columns(f: InputFile, names: list[str], text_field: str) -> None:
    if text_field not in names:
        raise BadInputError(f"{f.path}: no column '{text_field}' (columns: {', '.join(names)}; "
                            "set data.text_field)")


def _batch_docs(f: InputFile, batch, row: int, key0: int, text_field: str, id_field: str) -> Iterator[RawDoc]:  # noqa: ANN001
    """Documents of one record batch; `row` is its first row in the file, `key0` in the
    dataset (they differ for later `datasets` shards)."""
    cols = {n: batch.column(i).to_pylist() for i, n in enumerate(batch.schema.names)
            if n in (text_field, id_field, DOMAIN_FIELD)}
    texts = cols[text_field]
    ids = cols.get(id_field, [None] * len(texts))
    domains = cols.get(DOMAIN_FIELD, [None] * len(texts))
    for i, text in enumerate(texts):
        where = f"{f.path}:row {row + i}"
        if text is None:
            raise BadInputError(f"{where}: column '{text_field}' is null")
        rec = {text_field: text, id_field: ids[i], DOMAIN_FIELD: domains[i]}
        yield _record_doc(rec, where, f.part, f"R{key0 + i}", text_field, id_field)


def _read_parquet(f: InputFile, text_field: str, id_field: str) -> Iterator[RawDoc]:
    """One document per row, read a record batch at a time (only the needed columns).

    Without pre-buffering and with a 1 MiB read buffer, memory follows the pages of one
    batch, not the row group (57 MB of text in row groups of 11 MB: 8 MB of Arrow memory at
    most, against 59 MB with pyarrow's defaults). Page checksums, where the writer stored
    them, are verified: a flipped byte is an error, not a changed document."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path, pre_buffer=False, buffer_size=1 << 20, page_checksum_verification=True)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise BadInputError(f"{f.path}: not a readable Parquet file ({_one_line(exc)})") from None
    names = pf.schema_arrow.names
    _check_columns(f, names, text_field)
    cols = [c for c in dict.fromkeys((text_field, id_field, DOMAIN_FIELD)) if c in names]
    row = 0
    for group in range(pf.num_row_groups):  # one group at a time: a bad page is placed by its group
        batches = pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=cols)
        yield from _guarded_batches(f, "Parquet", batches, row, row, text_field, id_field)
        row += pf.metadata.row_group(group).num_rows


def _guarded_batches(f: InputFile, what: str, batches: Iterator, row: int, key0: int, text_field: str,
                     id_field: str) -> Iterator[RawDoc]:
    """Documents of a stream of record batches; a batch that cannot be decoded is an error
    naming the file and the first row it would have held."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # a corrupt page surfaces only when its batch is read
            raise BadInputError(f"{f.path}:row {row}: not a readable {what} file ({_one_line(exc)})") from None
        yield from _batch_docs(f, batch, row, key0, text_field, id_field)
        row += batch.num_rows
        key0 += batch.num_rows


def _arrow_batches(path: Path, mapped: bool = False) -> tuple[Iterator, list[str]]:
    """(record batches, column names) of an Arrow IPC stream (what `datasets` writes) or IPC
    file. Read (the default), a batch is copied into memory and freed after use, so memory
    stays one batch whatever the shard size; memory-mapped, batches are views of the mapping
    (for counting rows from the batch headers without reading the data)."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path)) if mapped else pa.OSFile(str(path))
        try:
            reader = pa.ipc.open_stream(source)
            return iter(reader), reader.schema.names
        except pa.ArrowInvalid:
            f = pa.ipc.open_file(source)
            return (f.get_batch(i) for i in range(f.num_record_batches)), f.schema.names
    except Exception as exc:
        raise BadInputError(f"{path}: not a readable Arrow file ({_one_line(exc)})") from None


def _arrow_rows(path: Path) -> int:
    batches, _ = _arrow_batches(path, mapped=True)
    n = 0
    try:
        for b in batches:
            n += b.num_rows
    except Exception as exc:
        raise BadInputError(f"{path}:row {n}: not a readable Arrow file ({_one_line(exc)})") from None
    return n


def _read_datasets(f: InputFile, text_field: str, id_field: str) -> Iterator[RawDoc]:
    """One document per row of a `datasets` Arrow shard, a record batch at a time."""
    batches, names = _arrow_batches(f.path)
    _check_columns(f, names, text_field)
    yield from _guarded_batches(f, "Arrow", batches, 0, f.row0, text_field, id_field)


def _read_text(f: InputFile) -> Iterator[RawDoc]:
    """A whole file is one document (a document is a string, so this one file is in memory);
    its domain comes from the extension."""
    try:
        with _open_binary(f.path, f.compression) as stream:
            data = stream.read()
    except _READ_ERRORS as exc:
        raise BadInputError(f"{f.path}: cannot read ({_one_line(exc)})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise BadInputError(f"{f.path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    base = f.path.name[: -len(f.path.suffix)] if f.compression else f.path.name
    domain = "code" if Path(base).suffix.lower() in CODE_SUFFIXES else "prose"
    yield RawDoc(f.part, domain, text, f"{f.path}:1")


def read_file(f: InputFile, text_field: str = "text", id_field: str = ID_FIELD) -> Iterator[RawDoc]:
    """Stream the documents of one input file (see the module docstring for ids).

    Memory stays bounded by one JSONL line, one record batch or one text file; a bad record
    raises BadInputError naming the file and line (or row) when the stream reaches it."""
    if f.format == "jsonl":
        return _read_jsonl(f, text_field, id_field)
    if f.format == "parquet":
        return _read_parquet(f, text_field, id_field)
    if f.format == "datasets":
        return _read_datasets(f, text_field, id_field)
    if f.format == "text":
        return _read_text(f)
    raise BadInputError(f"{f.path}: unknown input format {f.format!r}")


def iter_inputs(files: Iterable[InputFile], text_field: str = "text", id_field: str = ID_FIELD) -> Iterator[RawDoc]:
    """The documents of several input files, one after the other, streamed."""
    for f in files:
        yield from read_file(f, text_field, id_field)


# ---------------------------------------------------------------- lineage


def fingerprint(f: InputFile | str | os.PathLike) -> dict:
    """What identifies an input's content for lineage, without reading terabytes.

    Up to FULL_HASH_MAX (64 MiB): `{"algo": "sha256", "sha256": ..., "digest": ...}`, the
    file's sha256. Larger: `{"algo": "sha256-sampled-16x1MiB", "digest": ...}`, the sha256 of
    the size and 16 blocks of 1 MiB at evenly spaced offsets (first and last included): it
    changes when the size or a sampled block changes, not necessarily for an edit elsewhere;
    the name says so, so nobody reads it as a full hash."""
    path = f.path if isinstance(f, InputFile) else Path(f)
    size = path.stat().st_size
    out: dict = {"path": path.as_posix(), "size": size}
    if size <= FULL_HASH_MAX:
        from k2repro.core.hashing import sha256_file

        digest = sha256_file(path)
        return out | {"algo": "sha256", "sha256": digest, "digest": digest}
    h = hashlib.sha256(b"k2repro sampled fingerprint v1\0" + str(size).encode())
    last = size - SAMPLE_BLOCK
    with open(path, "rb") as fh:
        for i in range(SAMPLE_BLOCKS):
            off = last * i // (SAMPLE_BLOCKS - 1)
            fh.seek(off)
            h.update(off.to_bytes(8, "big"))
            h.update(fh.read(SAMPLE_BLOCK))
    return out | {"algo": f"sha256-sampled-{SAMPLE_BLOCKS}x{SAMPLE_BLOCK >> 20}MiB", "digest": h.hexdigest()}


# ---------------------------------------------------------------- the API of earlier releases


def source_files(source: str | Path, fmt: str = "auto") -> list[tuple[Path, str]]:
    """The files a source reads, in sorted order, each with its reader (`jsonl`, `parquet`,
    `datasets`, `text`): `resolve_inputs` without the details."""
    return [(f.path, f.format) for f in resolve_inputs(source, fmt)]


def iter_file(path: Path, root: Path, kind: str, text_field: str = "text") -> Iterator[RawDoc]:
    """Documents of one file of a source (`read_file` of the matching InputFile)."""
    for f in resolve_inputs(root, kind):
        if f.path == path:
            yield from read_file(f, text_field)
            return
    raise BadInputError(f"{path}: not a {kind} file of {root}")


def read_source(source: str | Path | Sequence[str | Path], text_field: str = "text", fmt: str = "auto",
                max_docs: int = 0, id_field: str = ID_FIELD) -> list[RawDoc]:
    """All documents of a source (files, folders, globs), files in sorted order.

    `max_docs > 0` takes a slice for quick runs: documents round-robin across the files (so
    every file, and so every domain of the sample corpus, is represented), stopping after
    `max_docs`, which reads only the start of each file's stream.
    """
    files = resolve_inputs(source, fmt)
    if max_docs <= 0:
        return list(iter_inputs(files, text_field, id_field))
    streams = [read_file(f, text_field, id_field) for f in files]
    out: list[RawDoc] = []
    for group in zip_longest(*streams):
        for d in group:
            if d is not None:
                out.append(d)
                if len(out) >= max_docs:
                    return out
    return out


_TRAILING_WS = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")
# Unicode line breaks other than \n, and spaces other than " " and "\t".
_LINE_BREAKS = re.compile(r"\r\n|[\r\u0085\u2028\u2029\x0b\x0c]")
_ODD_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


def normalize_text(text: str) -> str:
    """Unicode NFC; line breaks to \\n; odd spaces to " "; control characters removed;
    trailing spaces per line removed; at most one blank line in a row; no leading/trailing
    blank lines. Leading indentation stays (it is syntax in code)."""
    text = unicodedata.normalize("NFC", text)
    text = _LINE_BREAKS.sub("\n", text)
    text = _ODD_SPACES.sub(" ", text)
    text = _CONTROL.sub("", text)
    text = _TRAILING_WS.sub("", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n")
