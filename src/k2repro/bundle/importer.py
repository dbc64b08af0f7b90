"""`import_bundle`: bring a release bundle into a store so that it replays there.

A bundle is untrusted input (docs/release-bundle.md, "Trust model"). The import verifies it
(`bundle/verify.py`), then validates everything it will read before it writes anything
(`plan_import`: run ids pass the run-id rule, every path is relative, inside the bundle and
listed, every row's `run_id` is its launch's), then builds `<store>/bundle-<head run id>/` in
a dot folder: one folder per launch of the chain (its tables, its DCP checkpoints under
`checkpoints/`) and the shipped data under `data/`. The paths a run recorded point at the
machine it trained on, so they are moved to the imported copies (`bundle/relocate.py`), each
rewrite recorded in an `import` event and in `_import.json`. The run keeps its id, config hash
and `source`, so `k2repro replay RUN` works there. The folder is renamed into the store, then
each launch's dot folder is renamed to its run id, parents first: readers see a launch whole
or not at all. Nothing is written outside that folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.audit import schema as S
from k2repro.bundle.manifest import BUNDLE_FORMAT, BUNDLE_JSON, read_manifest
from k2repro.bundle.relocate import rewrite_table
from k2repro.bundle.signing import load_public_key
from k2repro.bundle.verify import is_linked, safe_relpath, verify_bundle
from k2repro.core.atomic import atomic_dir
from k2repro.core.ids import check_run_id
from k2repro.core.layout import RUN_MARKER, step_dirname
from k2repro.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

Progress = Callable[[str], None]


def _bad(bundle: Path, what: str) -> BadInputError:
    return BadInputError(f"bundle {bundle}: {what}; nothing imported")


def read_bundle_json(bundle: Path) -> dict[str, Any]:
    """bundle.json, checked for the shape import relies on; BadInputError naming it otherwise."""
    path = bundle / BUNDLE_JSON
    try:
        info = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise _bad(bundle, f"no {BUNDLE_JSON}") from None
    except (ValueError, RecursionError):
        raise _bad(bundle, f"{BUNDLE_JSON} is not JSON") from None
    if not isinstance(info, dict):
        raise _bad(bundle, f"{BUNDLE_JSON} holds a {type(info).__name__}, not an object")
    sv = info.get("schema_version")
    if isinstance(sv, bool) or not isinstance(sv, int):
        raise _bad(bundle, f"{BUNDLE_JSON}: schema_version {sv!r} is not an integer")
    run = info.get("run")
    chain = run.get("chain") if isinstance(run, dict) else None
    if not isinstance(chain, list) or not chain or not all(isinstance(r, dict) for r in chain):
        raise _bad(bundle, f"{BUNDLE_JSON}: run.chain names no launch")
    for key in ("checkpoints",):
        if not isinstance(info.get(key, []), list):
            raise _bad(bundle, f"{BUNDLE_JSON}: {key} is not a list")
    if not isinstance(info.get("data") or {}, dict):
        raise _bad(bundle, f"{BUNDLE_JSON}: data is not an object")
    return info


def _run_ids(bundle: Path, info: dict[str, Any]) -> list[str]:
    """The chain's run ids, each a valid folder name (no separators, no `..`), distinct, with
    the head among them: they become folder names in the store."""
    ids = [r.get("run_id") for r in info["run"]["chain"]]
    for rid in [*ids, info["run"].get("head")]:
        try:
            check_run_id(rid)
        except BadInputError as exc:
            raise _bad(bundle, f"{BUNDLE_JSON}: {exc}") from None
    if len(set(ids)) != len(ids):
        raise _bad(bundle, f"{BUNDLE_JSON}: run.chain names a launch twice")
    if info["run"]["head"] not in ids:
        raise _bad(bundle, f"{BUNDLE_JSON}: run.head {info['run']['head']} is not in run.chain")
    return ids


def _plain_dir(bundle: Path, rel: str) -> Path | None:
    p = bundle / rel
    return p if safe_relpath(rel) and not is_linked(bundle, rel) and p.is_dir() else None


def _segment(bundle: Path, rel: str, rid: str, table: str, full: bool) -> pa.Table:
    """One table segment of launch `rid`, checked: readable Parquet, every row's `run_id` is
    `rid`, and a `runs` row's config is a JSON object. `full=False` reads only those columns."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(bundle / rel).names
        if "run_id" not in names or (table == "runs" and "config_json" not in names):
            raise _bad(bundle, f"{rel}: has no run_id or config_json column")
        cols = None if full else ["run_id"] + (["config_json"] if table == "runs" else [])
        tbl = pq.read_table(bundle / rel, columns=cols)
    except BadInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise _bad(bundle, f"{rel}: not a readable Parquet segment ({str(exc).splitlines()[0][:160]})") from None
    others = sorted({str(v) for v in tbl.column("run_id").to_pylist() if v != rid})
    if others:
        raise _bad(bundle, f"{rel}: holds rows of run {others[0]!r}, not of launch {rid} (a bundle cannot "
                           f"add rows to another run)")
    if table == "runs":
        for text in tbl.column("config_json").to_pylist():
            try:
                cfg = json.loads(text) if text else {}
                assert isinstance(cfg, dict)
            except (ValueError, AssertionError, RecursionError):
                raise _bad(bundle, f"{rel}: a config_json is not a JSON object") from None
    return tbl


def _plan_checkpoints(bundle: Path, info: dict[str, Any], ids: list[str], listed: set[str]
                      ) -> list[tuple[str, int, str]]:
    """(run id, step, DCP folder) of every shipped checkpoint: a launch of the chain, the
    folder `dcp/<run_id>/step_*` of this bundle, its manifest listed."""
    ckpts: list[tuple[str, int, str]] = []
    for c in info.get("checkpoints", []):
        try:
            rid, step, dcp = c["run_id"], int(c["step"]), c["dcp"]
        except (KeyError, TypeError, ValueError):
            raise _bad(bundle, f"{BUNDLE_JSON}: a checkpoint entry is corrupt ({str(c)[:120]})") from None
        if rid not in ids:
            raise _bad(bundle, f"{BUNDLE_JSON}: checkpoint of step {step} belongs to run {rid!r}, not to the chain")
        want = f"dcp/{rid}/{step_dirname(step)}" if step >= 0 else None
        if dcp != want or _plain_dir(bundle, dcp) is None or not (bundle / dcp / "manifest.json").is_file() \
                or f"{dcp}/manifest.json" not in listed:
            raise _bad(bundle, f"{BUNDLE_JSON}: checkpoint of step {step} names {str(dcp)[:200]!r}, not the "
                               f"folder {want} of this bundle")
        ckpts.append((rid, step, dcp))
    return ckpts


def _plan_data(bundle: Path, info: dict[str, Any], listed: set[str]) -> dict[str, str]:
    """{artefact: bundle path} of the shipped data: all of it under the bundle's data/."""
    data = info.get("data") or {}
    artifacts: dict[str, str] = {}
    if not data.get("shipped"):
        return artifacts
    if data.get("packed_dir") != "data/packed" or _plain_dir(bundle, "data/packed") is None \
            or "data/packed/manifest.json" not in listed:
        raise _bad(bundle, f"{BUNDLE_JSON}: data.packed_dir {str(data.get('packed_dir'))[:200]!r} is not the "
                           f"bundle's data/packed")
    for a in data.get("artifacts") or []:
        rel = a.get("bundle_path") if isinstance(a, dict) else None
        if not (isinstance(rel, str) and rel.startswith("data/") and rel in listed):
            raise _bad(bundle, f"{BUNDLE_JSON}: data artefact path {str(rel)[:200]!r} is not a file of the "
                               f"bundle's data/")
        artifacts[str(a.get("artifact"))] = rel
    return artifacts


def _plan_tables(bundle: Path, rid: str, listed: set[str]) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """({table: segment names}, run marker) of one launch, every segment checked (run ids)."""
    tdir = _plain_dir(bundle, f"tables/{rid}")
    if tdir is None or not any(f.startswith(f"tables/{rid}/runs/") for f in listed):
        raise _bad(bundle, f"tables/{rid}/runs: missing (every launch of the chain ships its tables)")
    try:
        marker = json.loads((tdir / RUN_MARKER).read_bytes())
        assert isinstance(marker, dict) and marker.get("run_id") == rid
    except (OSError, ValueError, AssertionError, RecursionError):
        raise _bad(bundle, f"tables/{rid}/{RUN_MARKER}: missing or not this launch's marker") from None
    got: dict[str, list[str]] = {}
    for rel in sorted(f for f in listed if f.startswith(f"tables/{rid}/")):
        parts = rel.split("/")
        if len(parts) != 4 or parts[3] == RUN_MARKER:
            continue
        table, seg = parts[2], parts[3]
        if table not in S.TABLES or not seg.endswith(".parquet"):
            continue
        _segment(bundle, rel, rid, table, full=False)
        got.setdefault(table, []).append(seg)
    if not got.get("runs"):
        raise _bad(bundle, f"tables/{rid}/runs: no segment")
    return got, marker


def plan_import(bundle: Path, info: dict[str, Any], files: dict[str, Any]) -> dict[str, Any]:
    """Everything import reads, checked before anything is written: run ids, checkpoint and
    data paths (relative, inside the bundle, listed in the verified manifest, no link), every
    table segment readable and every row's `run_id` that of its launch (rows cannot be forged
    into another run's history), the config of every `runs` row JSON. Only the columns checked
    are read here (a bundle's tables can be large); the write reads each segment again, whole,
    and checks it again. Returns the plan: ids, checkpoints, artefacts, segment names, markers."""
    ids = _run_ids(bundle, info)
    listed = set(files)
    ckpts = _plan_checkpoints(bundle, info, ids, listed)
    artifacts = _plan_data(bundle, info, listed)
    tables: dict[str, dict[str, list[str]]] = {}
    markers: dict[str, dict[str, Any]] = {}
    for rid in ids:
        tables[rid], markers[rid] = _plan_tables(bundle, rid, listed)
    return {"ids": ids, "checkpoints": ckpts, "artifacts": artifacts, "tables": tables, "markers": markers}


def _verified(bundle: Path, key: str | Path | None, say: Progress) -> tuple[dict[str, Any], Any]:
    """(verify_bundle's result, the public key or None); BadInputError when it failed."""
    pub = load_public_key(key) if key is not None else None
    check = verify_bundle(bundle, pub)
    if not check["ok"]:
        p = check["problems"][0]
        more = f" (and {len(check['problems']) - 1} more)" if len(check["problems"]) > 1 else ""
        raise BadInputError(f"bundle {bundle} failed verification: {p['file']}: {p['problem']}{more}; "
                            f"nothing imported")
    say(f"verified {check['files']} files ({check['bytes'] / 1e6:.2f} MB)"
        + (f", signed by key {check['signature']['key']}" if pub is not None else ""))
    return check, pub


def _target(root: Path, chain: list[str], head: str) -> Path:
    """`<store>/bundle-<head>`, once no launch of the chain is in the store yet and that
    folder does not exist (BadInputError otherwise); the store is made if it is new."""
    from k2repro.audit.store import open_store
    from k2repro.audit.storemeta import ensure_store

    root.mkdir(parents=True, exist_ok=True)
    with open_store(root) as store:
        have = [r[0] for r in store.execute("SELECT DISTINCT run_id FROM runs_raw WHERE list_contains(?, run_id)",
                                            [chain]).fetchall()]
    if have:
        raise BadInputError(f"run {have[0]} is already in store {root}: nothing imported")
    ensure_store(root)
    final = root / f"bundle-{head}"
    if final.exists():
        raise BadInputError(f"{final} already exists: nothing imported")
    return final


def _import_launch(bundle: Path, rid: str, plan: dict[str, Any], ctx: dict[str, Any], stage: Path,
                   record: dict[str, Any], artifact_paths: dict[str, str]) -> dict[str, list]:
    """One launch into `stage/.<rid>/`: its checkpoints, its tables with the paths moved, an
    `import` event and its run marker. Returns the config rewrites."""
    from k2repro.audit.writer import to_arrow, write_segment
    from k2repro.core.atomic import atomic_write_bytes

    final_abs = Path(record["folder"])
    rdir = stage / f".{rid}"
    rdir.mkdir()
    ckpt_paths: dict[int, str] = {}
    for crid, step, dcp in plan["checkpoints"]:
        if crid != rid:
            continue
        shutil.copytree(bundle / dcp, rdir / "checkpoints" / step_dirname(step), symlinks=True)
        ckpt_paths[step] = str(final_abs / rid / "checkpoints" / step_dirname(step))
    changes: dict[str, list] = {}
    for table, segs in sorted(plan["tables"][rid].items()):
        for seg in segs:
            tbl = _segment(bundle, f"tables/{rid}/{table}/{seg}", rid, table, full=True)
            write_segment(rdir / table, seg, rewrite_table(table, tbl, ctx, ckpt_paths, artifact_paths, changes))
    event = to_arrow("events", {
        "time": [record["now"]], "rank": [0], "step": [None], "kind": ["import"], "severity": ["info"],
        "detail": [json.dumps({"bundle": str(bundle.resolve()), "bundle_format": BUNDLE_FORMAT,
                               "manifest_self_sha256": record["manifest_self_sha256"],
                               "signed_by": record["signed_by"], "rewrites": changes,
                               "checkpoints": sorted(ckpt_paths)}, sort_keys=True, default=str)]}, rid)
    write_segment(rdir / "events", "import-00000000.parquet", event)
    marker = dict(plan["markers"][rid])
    marker.update(imported_from=str(bundle.resolve()), imported_at=record["now"].isoformat())
    atomic_write_bytes(rdir / RUN_MARKER, json.dumps(marker).encode())
    return changes


def _build(bundle: Path, plan: dict[str, Any], info: dict[str, Any], final: Path, stage: Path,
           record: dict[str, Any]) -> dict[str, dict[str, list]]:
    """Everything the import writes, into `stage`: the data, every launch, `_import.json`.
    Returns the rewrites by launch."""
    final_abs = final.resolve()
    shipped_data = bool((info.get("data") or {}).get("shipped"))
    ctx = {"store": record["store"], "packed": str(final_abs / "data" / "packed") if shipped_data else None,
           "data": str(final_abs / "data") if shipped_data else None,
           "resumes": [(rid, step_dirname(step), str(final_abs / rid / "checkpoints" / step_dirname(step)))
                       for rid, step, _ in plan["checkpoints"]]}
    artifact_paths: dict[str, str] = {}
    if shipped_data:
        shutil.copytree(bundle / "data", stage / "data", symlinks=True)
        artifact_paths = {a: str(final_abs / rel) for a, rel in plan["artifacts"].items()}
    rec = {**record, "folder": str(final_abs)}
    rewrites = {rid: _import_launch(bundle, rid, plan, ctx, stage, rec, artifact_paths) for rid in plan["ids"]}
    body = {"bundle": str(bundle.resolve()), "imported_at": record["now"].isoformat(), "runs": plan["ids"],
            "head": info["run"]["head"], "rewrites": rewrites, "data": "data/" if shipped_data else None,
            "signed_by": record["signed_by"]}
    (stage / "_import.json").write_text(json.dumps(body, indent=1, sort_keys=True, default=str) + "\n")
    return rewrites


def import_bundle(bundle: str | Path, store_root: str | Path | None = None,
                  progress: Progress | None = None, key: str | Path | None = None) -> dict[str, Any]:
    """Verify (and with `key`, check the signature), validate everything the import reads,
    then add the bundle's launches to the store; returns what was imported and every path
    rewrite. Nothing is written before every check passed, and nothing outside
    `<store>/bundle-<head>/` is written at all."""
    from k2repro.audit.versions import SchemaTooNew
    from k2repro.core.layout import default_store

    say = progress or (lambda _m: None)
    bundle = Path(bundle)
    check, pub = _verified(bundle, key, say)
    manifest = read_manifest(bundle)
    info = read_bundle_json(bundle)
    if info["schema_version"] > S.SCHEMA_VERSION:
        raise SchemaTooNew(f"bundle {bundle} was exported with audit schema version {info['schema_version']}, "
                           f"newer than this k2repro's {S.SCHEMA_VERSION}: upgrade k2repro to import it")
    plan = plan_import(bundle, info, manifest["files"])
    chain, head = plan["ids"], info["run"]["head"]
    root = Path(store_root) if store_root is not None else default_store()
    final = _target(root, chain, head)
    signed_by = check["signature"]["key"] if pub is not None else None
    record = {"store": str(root.resolve()), "now": datetime.now(timezone.utc), "signed_by": signed_by,
              "manifest_self_sha256": manifest["self_sha256"]}
    try:
        with atomic_dir(final, replace=False, tmp_prefix=".k2imp-") as stage:
            rewrites = _build(bundle, plan, info, final, stage, record)
    except FileExistsError:
        raise BadInputError(f"{final} already exists: nothing imported") from None
    for rid in chain:  # parents first: a child never shows up without its parent
        os.rename(final / f".{rid}", final / rid)
    say(f"imported {', '.join(chain)} into {final}")
    return {"run_ids": chain, "head": head, "store": str(root), "folder": str(final),
            "rewrites": rewrites, "checkpoints": [step for _, step, _ in plan["checkpoints"]],
            "files_verified": check["files"], "signed_by": signed_by}


__all__ = ["import_bundle", "plan_import", "read_bundle_json"]
