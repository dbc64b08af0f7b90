"""Check a release bundle, and bring one into a store so that it replays there.

`verify_bundle` checks MANIFEST.json's own checksum, then every listed file's size and
sha256, and that no file is missing or unlisted; each problem names its file.

`import_bundle` verifies first (a failing bundle is refused, exit 2, nothing written), then
builds `<store>/bundle-<head run id>/` in a dot folder: one folder per launch of the chain
(its tables, its DCP checkpoints under `checkpoints/`) and the shipped data under `data/`.
The paths a run recorded point at the machine it trained on, so the import rewrites them to
the imported copies (`data.packed_dir`, `ckpt.dir`, `audit.store` in the config and its
hparams, `data_manifest.path`, `checkpoints.path`, `runs.store_path`) and records each rewrite
in an `import` event and in `_import.json`. The run keeps its id, config hash and `source`,
so `k2repro replay RUN` works there. The folder is renamed into the store, then each launch's
dot folder is renamed to its run id, parents first: readers see a launch whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.audit import schema as S
from k2repro.errors import BadInputError
from k2repro.tools.export import BUNDLE_FORMAT, BUNDLE_JSON, MANIFEST_JSON, SELF_ZERO
from k2repro.tools.replay import get_key, set_key

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

Progress = Callable[[str], None]
#: Config keys that hold paths of the machine the run trained on.
PATH_KEYS = ("data.packed_dir", "ckpt.dir", "audit.store", "train.resume")


# ----------------------------------------------------------------------------- verify

def read_manifest(bundle: Path) -> dict[str, Any]:
    """MANIFEST.json, checked against its own sha256; BadInputError naming it otherwise."""
    path = Path(bundle) / MANIFEST_JSON
    if not Path(bundle).is_dir():
        raise BadInputError(f"bundle {bundle} does not exist")
    if not path.is_file():
        raise BadInputError(f"{bundle} is not a k2repro bundle: no {MANIFEST_JSON}")
    raw = path.read_bytes()
    try:
        body = json.loads(raw)
        claimed = body["self_sha256"]
        files = body["files"]
        assert isinstance(files, dict) and isinstance(claimed, str)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
        raise BadInputError(f"{path}: corrupt (not the JSON a bundle manifest holds)") from None
    text = raw.decode()
    zeroed = text.replace(f'"self_sha256": "{claimed}"', f'"self_sha256": "{SELF_ZERO}"', 1)
    if zeroed == text or hashlib.sha256(zeroed.encode()).hexdigest() != claimed:
        raise BadInputError(f"{path}: changed (its sha256 differs from the one it records)")
    if body.get("format") != BUNDLE_FORMAT:
        raise BadInputError(f"{path}: format {body.get('format')!r}, this k2repro reads {BUNDLE_FORMAT}")
    return body


def verify_bundle(bundle: str | Path) -> dict[str, Any]:
    """Every file against MANIFEST.json. Returns {ok, problems: [{file, problem}], files, bytes}.
    Raises BadInputError only when the folder is not a bundle at all."""
    from k2repro.data.packed import sha256_file

    bundle = Path(bundle)
    problems: list[dict[str, str]] = []
    try:
        body = read_manifest(bundle)
    except BadInputError as exc:
        if not bundle.is_dir() or not (bundle / MANIFEST_JSON).is_file():
            raise
        return {"bundle": str(bundle), "ok": False, "files": 0, "bytes": 0,
                "problems": [{"file": MANIFEST_JSON, "problem": str(exc).split(": ", 1)[-1]}]}
    files = body["files"]
    total = 0
    for rel, info in sorted(files.items()):
        f = bundle / rel
        if not f.is_file():
            problems.append({"file": rel, "problem": "missing"})
            continue
        size = f.stat().st_size
        total += size
        if size != int(info["bytes"]):
            problems.append({"file": rel, "problem": f"size {size} bytes, the manifest says {info['bytes']}"})
        elif sha256_file(f) != info["sha256"]:
            problems.append({"file": rel, "problem": "sha256 differs from the manifest"})
    for f in sorted(bundle.rglob("*")):
        rel = f.relative_to(bundle).as_posix()
        if f.is_file() and rel != MANIFEST_JSON and rel not in files:
            problems.append({"file": rel, "problem": "not listed in the manifest"})
    return {"bundle": str(bundle), "ok": not problems, "problems": problems, "files": len(files), "bytes": total,
            "run": body.get("run"), "runs": body.get("runs", [])}


# ----------------------------------------------------------------------------- import

def _replace_column(tbl: pa.Table, name: str, values: list) -> pa.Table:
    import pyarrow as pa

    i = tbl.schema.get_field_index(name)
    return tbl.set_column(i, tbl.schema.field(i), pa.array(values, type=tbl.schema.field(i).type))


def _rewrite(table: str, tbl: pa.Table, new: dict[str, str], ckpt_paths: dict[int, str],
             artifact_paths: dict[str, str], store_root: str) -> pa.Table:
    """The paths of one launch's table, moved to the imported copies."""
    if tbl.num_rows == 0:
        return tbl
    if table == "runs":
        cfgs = []
        for text in tbl.column("config_json").to_pylist():
            cfg = json.loads(text) if text else None
            if cfg is not None:
                for k, v in new.items():
                    set_key(cfg, k, v)
            cfgs.append(json.dumps(cfg, sort_keys=True, default=str) if cfg is not None else text)
        tbl = _replace_column(tbl, "config_json", cfgs)
        return _replace_column(tbl, "store_path", [store_root] * tbl.num_rows)
    if table == "hparams":
        keys = tbl.column("key").to_pylist()
        vals = [new.get(k, v) for k, v in zip(keys, tbl.column("value").to_pylist())]
        return _replace_column(tbl, "value", vals)
    if table == "data_manifest":
        arts = tbl.column("artifact").to_pylist()
        return _replace_column(tbl, "path", [artifact_paths.get(a, p) for a, p in
                                             zip(arts, tbl.column("path").to_pylist())])
    if table == "checkpoints":
        steps = tbl.column("step").to_pylist()
        return _replace_column(tbl, "path", [ckpt_paths.get(int(s), p) for s, p in
                                             zip(steps, tbl.column("path").to_pylist())])
    return tbl


def import_bundle(bundle: str | Path, store_root: str | Path | None = None,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Verify, then add the bundle's launches to the store; returns what was imported and
    every path rewrite."""
    import pyarrow.parquet as pq

    from k2repro.audit.migrate import SchemaTooNew
    from k2repro.audit.store import default_store, open_store
    from k2repro.audit.writer import (
        RUN_MARKER,
        atomic_write_bytes,
        ensure_store,
        to_arrow,
        write_segment,
    )

    say = progress or (lambda _m: None)
    bundle = Path(bundle)
    check = verify_bundle(bundle)
    if not check["ok"]:
        p = check["problems"][0]
        more = f" (and {len(check['problems']) - 1} more)" if len(check["problems"]) > 1 else ""
        raise BadInputError(f"bundle {bundle} failed verification: {p['file']}: {p['problem']}{more}; "
                            f"nothing imported")
    say(f"verified {check['files']} files ({check['bytes'] / 1e6:.2f} MB)")
    info = json.loads((bundle / BUNDLE_JSON).read_text())
    if int(info.get("schema_version", 0)) > S.SCHEMA_VERSION:
        raise SchemaTooNew(f"bundle {bundle} was exported with audit schema version {info['schema_version']}, "
                           f"newer than this k2repro's {S.SCHEMA_VERSION}: upgrade k2repro to import it")
    chain = [r["run_id"] for r in info["run"]["chain"]]
    root = Path(store_root) if store_root is not None else default_store()
    root.mkdir(parents=True, exist_ok=True)
    with open_store(root) as store:
        have = [r[0] for r in store.execute("SELECT DISTINCT run_id FROM runs_raw WHERE list_contains(?, run_id)",
                                            [chain]).fetchall()]
    if have:
        raise BadInputError(f"run {have[0]} is already in store {root}: nothing imported")
    ensure_store(root)
    final = root / f"bundle-{info['run']['head']}"
    if final.exists():
        raise BadInputError(f"{final} already exists: nothing imported")
    final_abs = final.resolve()
    store_abs = str(root.resolve())
    stage = root / f".k2imp-{secrets.token_hex(4)}"
    stage.mkdir()
    rewrites: dict[str, dict[str, list]] = {}
    try:
        data = info.get("data") or {}
        artifact_paths: dict[str, str] = {}
        if data.get("shipped"):
            shutil.copytree(bundle / "data", stage / "data")
            artifact_paths = {a["artifact"]: str(final_abs / a["bundle_path"]) for a in data["artifacts"]}
        shipped = {(c["run_id"], int(c["step"])): c for c in info.get("checkpoints", [])}
        now = datetime.now(timezone.utc)
        for rid in chain:
            rdir = stage / f".{rid}"
            rdir.mkdir()
            ckpt_paths: dict[int, str] = {}
            for (crid, step), c in shipped.items():
                if crid != rid:
                    continue
                dst = rdir / "checkpoints" / Path(c["dcp"]).name
                shutil.copytree(bundle / c["dcp"], dst)
                ckpt_paths[step] = str(final_abs / rid / "checkpoints" / dst.name)
            src_tables = bundle / "tables" / rid
            runs_tbl = pq.read_table(next((src_tables / "runs").glob("*.parquet")))
            cfg = json.loads(runs_tbl.column("config_json")[0].as_py() or "{}")
            new: dict[str, str] = {}
            if data.get("shipped") and get_key(cfg, "data.packed_dir") is not None:
                new["data.packed_dir"] = str(final_abs / data["packed_dir"])
            if get_key(cfg, "ckpt.dir"):
                new["ckpt.dir"] = ""
            if get_key(cfg, "audit.store") is not None:
                new["audit.store"] = store_abs
            resume = get_key(cfg, "train.resume")
            if resume:
                for (crid, _step), c in shipped.items():
                    if Path(str(resume)).name == Path(c["dcp"]).name and crid in str(resume):
                        new["train.resume"] = str(final_abs / crid / "checkpoints" / Path(c["dcp"]).name)
            rewrites[rid] = {k: [get_key(cfg, k), v] for k, v in new.items() if get_key(cfg, k) != v}
            for tdir in sorted(p for p in src_tables.iterdir() if p.is_dir() and p.name in S.TABLES):
                for seg in sorted(tdir.glob("*.parquet")):
                    tbl = _rewrite(tdir.name, pq.read_table(seg), new, ckpt_paths, artifact_paths, store_abs)
                    write_segment(rdir / tdir.name, seg.name, tbl)
            event = to_arrow("events", {
                "time": [now], "rank": [0], "step": [None], "kind": ["import"], "severity": ["info"],
                "detail": [json.dumps({"bundle": str(bundle.resolve()), "bundle_format": BUNDLE_FORMAT,
                                       "manifest_self_sha256": read_manifest(bundle)["self_sha256"],
                                       "rewrites": rewrites[rid], "checkpoints": sorted(ckpt_paths)},
                                      sort_keys=True)]}, rid)
            write_segment(rdir / "events", "import-00000000.parquet", event)
            marker = json.loads((src_tables / RUN_MARKER).read_text())
            marker.update(imported_from=str(bundle.resolve()), imported_at=now.isoformat())
            atomic_write_bytes(rdir / RUN_MARKER, json.dumps(marker).encode())
        record = {"bundle": str(bundle.resolve()), "imported_at": now.isoformat(), "runs": chain,
                  "head": info["run"]["head"], "rewrites": rewrites, "data": "data/" if data.get("shipped") else None}
        (stage / "_import.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(stage, final)
        except OSError:
            raise BadInputError(f"{final} already exists: nothing imported") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for rid in chain:  # parents first: a child never shows up without its parent
        os.rename(final / f".{rid}", final / rid)
    say(f"imported {', '.join(chain)} into {final}")
    return {"run_ids": chain, "head": info["run"]["head"], "store": str(root), "folder": str(final),
            "rewrites": rewrites, "checkpoints": [c["step"] for c in info.get("checkpoints", [])],
            "files_verified": check["files"]}


__all__ = ["verify_bundle", "read_manifest", "import_bundle", "PATH_KEYS"]
