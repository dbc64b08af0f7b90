"""Corpus readers: JSONL(.gz), Parquet and directories of text files -> documents.

Every document gets a stable id, `<part>:<key>`: `part` is the record file's path relative to
the source (without extensions), `key` the record's `id` field, else its line (JSONL) or row
(Parquet) number; a text file's id is its relative path. Ids do not depend on how many
documents came before, so adding a file or a record elsewhere leaves them unchanged.

Bad input raises BadInputError naming the file and line: the `k2repro data` commands turn it
into exit code 2 before they write anything.
"""

from __future__ import annotations

import gzip
import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

from k2repro.errors import BadInputError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)
FORMATS = ("auto", "jsonl", "parquet", "text")
# Extensions read as domain "code" in a directory of text files; everything else is "prose".
CODE_SUFFIXES = frozenset(
    ".py .pyi .c .h .cc .cpp .hpp .cxx .rs .go .java .js .ts .tsx .jsx .rb .sh .bash .pl .pm "
    ".lua .scala .kt .swift .cs .php .r .jl .hs .ml .sql .cu .cuh .f90 .m .mm .zig .nim".split()
)
DEFAULT_DOMAIN = "other"  # records with no `domain` field
ID_FIELD = "id"
DOMAIN_FIELD = "domain"


@dataclass(frozen=True)
class RawDoc:
    doc_id: str
    domain: str
    text: str
    origin: str  # "<file>:<line>" for error messages and reports


def _suffix_of(path: Path) -> str:
    name = path.name.lower()
    for s in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _part_name(rel: Path) -> str:
    name = rel.as_posix()
    suffix = _suffix_of(rel)
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name


def _line_of(data: bytes, pos: int) -> int:
    return data.count(b"\n", 0, pos) + 1


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = _line_of(data, exc.start)
        raise BadInputError(f"{where}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:
        raise BadInputError(f"{path}: cannot read ({exc})") from None


def _record_doc(rec: object, where: str, part: str, line_key: str, text_field: str) -> RawDoc:
    if not isinstance(rec, dict):
        raise BadInputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if text_field not in rec:
        raise BadInputError(f"{where}: no text field '{text_field}' (set data.text_field)")
    text = rec[text_field]
    if not isinstance(text, str):
        raise BadInputError(f"{where}: field '{text_field}' is {type(text).__name__}, not a string")
    key = rec.get(ID_FIELD)
    key = line_key if key is None or key == "" else str(key)
    domain = rec.get(DOMAIN_FIELD) or DEFAULT_DOMAIN
    return RawDoc(f"{part}:{key}", str(domain), text, where)


def read_jsonl(path: Path, part: str, text_field: str = "text") -> Iterator[RawDoc]:
    """One document per non-empty line; the text is `text_field`."""
    text = _decode(_read_bytes(path), str(path))
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        yield _record_doc(rec, where, part, f"L{lineno}", text_field)


def read_parquet(path: Path, part: str, text_field: str = "text") -> Iterator[RawDoc]:
    """One document per row; the text is the column `text_field`."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise BadInputError(f"{path}: not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise BadInputError(f"{path}: no column '{text_field}' (columns: {', '.join(names)}; set data.text_field)")
    cols = [c for c in (text_field, ID_FIELD, DOMAIN_FIELD) if c in names]
    row = 0
    for batch in pf.iter_batches(columns=cols):
        for rec in batch.to_pylist():
            where = f"{path}:row {row}"
            if rec[text_field] is None:
                raise BadInputError(f"{where}: column '{text_field}' is null")
            yield _record_doc(rec, where, part, f"R{row}", text_field)
            row += 1


def read_text_file(path: Path, doc_id: str) -> RawDoc:
    """A whole file is one document; its domain comes from the extension."""
    text = _decode(_read_bytes(path), str(path))
    base = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    domain = "code" if Path(base).suffix.lower() in CODE_SUFFIXES else "prose"
    return RawDoc(doc_id, domain, text, f"{path}:1")


def _files(root: Path) -> list[Path]:
    """Regular files below `root` in sorted order, skipping hidden files and folders."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        out.append(p)
    return out


def source_files(source: str | Path, fmt: str = "auto") -> list[tuple[Path, str]]:
    """The files a source reads, in sorted order, each with its reader (`jsonl`, `parquet`,
    `text`).

    `auto`: a file by its extension; a folder that holds JSONL or Parquet files is read as
    those record files (other files there, such as a README, are ignored); any other folder
    is a folder of text files, one document per file. `jsonl`/`parquet`/`text` force a reader.
    """
    if fmt not in FORMATS:
        raise BadInputError(f"data.format must be one of {FORMATS} (got {fmt!r})")
    src = Path(source)
    if not src.exists():
        raise BadInputError(f"{src}: no such file or directory (data.source)")

    def kind_of(p: Path) -> str:
        s = _suffix_of(p)
        return "jsonl" if s in JSONL_SUFFIXES else "parquet" if s in PARQUET_SUFFIXES else "text"

    if src.is_file():
        return [(src, kind_of(src) if fmt == "auto" else fmt)]
    files = _files(src)
    if fmt == "text":
        return [(p, "text") for p in files]
    if fmt in ("jsonl", "parquet"):
        return [(p, fmt) for p in files if kind_of(p) == fmt]
    records = [(p, kind_of(p)) for p in files if kind_of(p) != "text"]
    return records or [(p, "text") for p in files]


def iter_file(path: Path, root: Path, kind: str, text_field: str = "text") -> Iterator[RawDoc]:
    """Documents of one file of a source."""
    rel = Path(path.name) if root.is_file() else path.relative_to(root)
    if kind == "text":
        yield read_text_file(path, rel.as_posix())
    elif kind == "parquet":
        yield from read_parquet(path, _part_name(rel), text_field)
    else:
        yield from read_jsonl(path, _part_name(rel), text_field)


def read_source(source: str | Path, text_field: str = "text", fmt: str = "auto", max_docs: int = 0) -> list[RawDoc]:
    """All documents of a source (a file or a folder), files in sorted order.

    `max_docs > 0` takes a slice for quick runs: documents round-robin across the files (so
    every file, and so every domain of the sample corpus, is represented), stopping after
    `max_docs`, which reads only the start of each file's stream.
    """
    root = Path(source)
    streams = [iter_file(p, root, kind, text_field) for p, kind in source_files(root, fmt)]
    if max_docs <= 0:
        return [d for s in streams for d in s]
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
