"""Rebuild the bundled sample corpus (prose.jsonl.gz, code.jsonl.gz) from a Debian system.

This is how the committed files were made; SOURCES.md states what went in and under which
licences. It is not part of the pipeline: `k2repro data prepare` reads the committed files.

    python data/sample/build_corpus.py \
        --python-lib 3.11.2=/usr/lib/python3.11 \
        --python-lib 3.11.7=<CPython 3.11.7 prefix>/lib/python3.11 \
        --python-lib 3.12.1=<CPython 3.12.1 prefix>/lib/python3.12

The first --python-lib gives the full standard library; the later ones (other releases)
add only the modules of NEAR_DUP_PACKAGES, so the corpus holds the same module in two or
three releases: exact duplicates where nothing changed, near duplicates where a patch touched
it, as vendored copies in real code corpora do.

Output is deterministic for the same inputs (sorted walk, gzip mtime 0, sorted keys).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
from pathlib import Path

MAX_BYTES = 48 * 1024
MIN_BYTES = 256
DOC_DIR = "/usr/share/doc"
LICENSES_DIR = "/usr/share/common-licenses"
# Prose files from /usr/share/doc/<pkg>/ besides copyright (names as Debian ships them).
DOC_NAME = re.compile(r"^(README|NEWS|FAQ|TODO|BUGS|HISTORY|INSTALL|CONTRIBUTING|USAGE)([._-].*)?$", re.I)
# Packages of the standard library taken again from the later releases.
NEAR_DUP_PACKAGES = ("asyncio", "concurrent", "email", "http", "json", "logging", "urllib", "xml")
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "turtledemo"}


def _read_text(path: Path) -> str | None:
    data = gzip.open(path).read() if path.name.endswith(".gz") else path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if MIN_BYTES <= len(data) <= MAX_BYTES else None


def debian_prose() -> list[dict]:
    """copyright files of every installed package, plus README/NEWS-like files of packages
    whose copyright file is in (so every prose record's licence is in the corpus too)."""
    recs: list[dict] = []
    docs = Path(DOC_DIR)
    included: set[str] = set()
    for pkg_dir in sorted(p for p in docs.iterdir() if p.is_dir() and not p.is_symlink()):
        c = pkg_dir / "copyright"
        if c.is_file() and not c.is_symlink() and (text := _read_text(c)) is not None:
            included.add(pkg_dir.name)
            recs.append({"id": f"debian-copyright/{pkg_dir.name}", "domain": "prose", "text": text,
                         "source": f"Debian package {pkg_dir.name}: /usr/share/doc/{pkg_dir.name}/copyright",
                         "licence": "the terms the file itself states for the package"})
    for pkg_dir in sorted(p for p in docs.iterdir() if p.is_dir() and not p.is_symlink()):
        if pkg_dir.name not in included:
            continue
        for f in sorted(pkg_dir.rglob("*")):
            if not f.is_file() or f.is_symlink():
                continue
            base = f.name[:-3] if f.name.endswith(".gz") else f.name
            if not DOC_NAME.match(base) or (text := _read_text(f)) is None:
                continue
            rel = f.relative_to(docs).as_posix()
            rid = rel[:-3] if rel.endswith(".gz") else rel
            recs.append({"id": f"debian-doc/{rid}", "domain": "prose", "text": text,
                         "source": f"Debian package {pkg_dir.name}: /usr/share/doc/{rel}",
                         "licence": f"that of Debian package {pkg_dir.name} "
                                    f"(record debian-copyright/{pkg_dir.name})"})
    for f in sorted(Path(LICENSES_DIR).iterdir()):
        if f.is_file() and not f.is_symlink():
            text = f.read_text(encoding="utf-8")
            recs.append({"id": f"common-licenses/{f.name}", "domain": "prose", "text": text,
                         "source": f"Debian package base-files: /usr/share/common-licenses/{f.name}",
                         "licence": "verbatim copying of the licence document is permitted (see its text)"})
    return recs


def python_code(libs: list[tuple[str, Path]]) -> list[dict]:
    recs: list[dict] = []
    for i, (version, root) in enumerate(libs):
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(root)
            if any(part in SKIP_DIRS for part in rel.parts[:-1]) or f.is_symlink():
                continue
            if i > 0 and rel.parts[0] not in NEAR_DUP_PACKAGES:
                continue
            text = _read_text(f)
            if text is None:
                continue
            recs.append({"id": f"cpython-{version}/Lib/{rel.as_posix()}", "domain": "code", "text": text,
                         "source": f"CPython {version} standard library: Lib/{rel.as_posix()}",
                         "licence": "PSF-2.0 (Python Software Foundation License Version 2)",
                         "_order": (rel.as_posix(), i)})
    # The same module of different releases next to each other, as in a repository dump.
    recs.sort(key=lambda r: r.pop("_order"))
    return recs


def write_jsonl_gz(path: Path, recs: list[dict]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        for r in recs:
            gz.write((json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python-lib", action="append", required=True, metavar="VERSION=DIR")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = ap.parse_args()
    libs = [(v, Path(d)) for v, d in (s.split("=", 1) for s in args.python_lib)]
    out = Path(args.out)
    for name, recs in (("prose", debian_prose()), ("code", python_code(libs))):
        write_jsonl_gz(out / f"{name}.jsonl.gz", recs)
        size = sum(len(r["text"].encode()) for r in recs)
        print(f"{name}: {len(recs)} records, {size / 1e6:.1f} MB text, "
              f"{(out / f'{name}.jsonl.gz').stat().st_size / 1e6:.2f} MB compressed")


if __name__ == "__main__":
    main()
